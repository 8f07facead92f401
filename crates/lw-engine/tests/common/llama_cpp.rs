//! Where llama.cpp's source tree is, for the tests of both crates that read
//! its reference files (lw-engine's vocabulary tests, the binary's
//! `tokenize` test; the binary's tests include this file by path).

use std::path::PathBuf;

/// llama.cpp's `models/` directory (vocabulary-only GGUF files with test cases), from
/// `LONGWRITER_LLAMA_CPP_SRC` (the llama.cpp source tree) or the copy
/// `.ci/run` unpacks from the llama-cpp-python 0.3.36 source package. `None`
/// when absent, which fails under CI (`CI` set): `.ci/run` must fetch it.
pub fn llama_cpp_models() -> Option<PathBuf> {
    let dir = match std::env::var_os("LONGWRITER_LLAMA_CPP_SRC") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/longwriter/llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"),
    };
    let models = dir.join("models");
    if models.is_dir() {
        return Some(models);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: .ci/run must fetch llama.cpp's source (llama-cpp-python 0.3.36) into ~/.cache/longwriter/llama-cpp, or set LONGWRITER_LLAMA_CPP_SRC",
        models.display()
    );
    eprintln!(
        "SKIPPED: no llama.cpp source at {} (set LONGWRITER_LLAMA_CPP_SRC)",
        dir.display()
    );
    None
}
