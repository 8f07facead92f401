//! The chat-template renderer on arbitrary templates (a GGUF file or a
//! tokenizer_config.json brings its own): compiling and rendering return
//! text or an error, never a panic or a hang (the renderer has fuel).
//! Input: the template source, a 0 byte, then a message's content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lw_core::Message;

fuzz_target!(|data: &[u8]| {
    let (source, content) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"Hello"[..]),
    };
    let (Ok(source), Ok(content)) = (std::str::from_utf8(source), std::str::from_utf8(content))
    else {
        return;
    };
    let Ok(template) = lw_engine::ChatTemplate::new(source, "<s>", "</s>") else {
        return;
    };
    let messages = [
        Message::system(content),
        Message::user(content),
        Message::assistant(content),
        Message::user("And again?"),
    ];
    let _ = template.render(&messages, true);
    let _ = template.render(&messages[..1], false);
});
