//! The tokenizer (and chat template) a GGUF file's metadata describes, on
//! arbitrary bytes: building it returns a tokenizer or an error, never a
//! panic; a tokenizer it builds encodes and decodes text without panicking,
//! and decoding what it encoded never fails.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = lw_model::gguf::GgufFile::from_bytes(Path::new("fuzz.gguf"), data) else {
        return;
    };
    let Ok(tokenizer) = lw_engine::gguf::tokenizer_from_gguf(&file) else {
        return;
    };
    for text in ["Hello, world! 12345", "河水流向大海。", " \n\t<|im_start|>user\n", ""] {
        if let Ok(ids) = tokenizer.encode(text, true) {
            let _ = tokenizer.decode(&ids);
        }
    }
    let _ = tokenizer.decode(&[0, 1, 2, u32::MAX]);
});
