//! The GGUF parser on arbitrary bytes: it must return a header or an error,
//! never panic, hang or allocate beyond the input's size. Where it accepts a
//! file, every tensor it lists must lie within the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = lw_model::gguf::parse(data) {
        for t in &header.tensors {
            assert!(t.start + t.size <= data.len());
            assert_eq!(t.size % t.qtype.block_bytes(), 0);
        }
        let _ = header.string("general.architecture");
        let _ = header.strings("tokenizer.ggml.tokens");
    }
});
