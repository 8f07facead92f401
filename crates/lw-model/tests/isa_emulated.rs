//! The AVX-VNNI and AVX-512 VNNI kernels (256- and 512-bit) give the AVX2
//! kernels' bits, on
//! every case of the probe library (`examples/isa_probe.rs`), run in an x86
//! emulator by `scripts/isa_emulate.py`: this CPU need not have VNNI. On
//! emulated CPUs that lack a set, its kernels stop on an invalid opcode. The emulator
//! (`bochscpu-python`) comes from the Python in `LONGWRITER_TEST_PYTHON`
//! (.ci/run installs it in its venv); outside CI the test says it is
//! skipped when there is none.

#![cfg(target_arch = "x86_64")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The probe library `cargo test` built beside this test's binary
/// (`target/<profile>/examples`).
fn probe_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lies in target/<profile>/deps");
    profile_dir.join("examples").join("libisa_probe.so")
}

fn emulator_python() -> Option<String> {
    if let Ok(p) = std::env::var("LONGWRITER_TEST_PYTHON") {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must set LONGWRITER_TEST_PYTHON to a Python with bochscpu-python (.ci/run does)"
    );
    None
}

#[test]
fn vnni_kernels_give_the_avx2_bits_in_an_emulator() {
    use lw_model::kernels::Isa;
    if !lw_model::kernels::available() {
        eprintln!("SKIPPED: this CPU lacks AVX2, which builds the cases");
        return;
    }
    let Some(python) = emulator_python() else {
        eprintln!("SKIPPED: no Python with bochscpu-python (set LONGWRITER_TEST_PYTHON)");
        return;
    };
    let lib = probe_library();
    assert!(
        lib.exists(),
        "{} is missing: `cargo test` builds it, or `cargo build -p lw-model --example isa_probe`",
        lib.display()
    );
    // `cargo test` of this test alone does not rebuild examples.
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::fs::metadata(&lib)
        .and_then(|m| m.modified())
        .expect("the library's time");
    let kernels = std::fs::read_dir(crate_dir.join("src/kernels"))
        .expect("src/kernels")
        .map(|e| e.expect("a kernel file").path());
    let sources = kernels.chain(
        ["src/quant.rs", "examples/isa_probe.rs"]
            .into_iter()
            .map(|s| crate_dir.join(s)),
    );
    for source in sources {
        let changed = std::fs::metadata(&source).and_then(|m| m.modified());
        assert!(
            changed.is_ok_and(|t| t <= built),
            "{} changed after {} was built: `cargo build -p lw-model --example isa_probe`",
            source.display(),
            lib.display()
        );
    }
    let script = crate_dir.join("../../scripts/isa_emulate.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&lib)
        .arg("--json")
        .output()
        .expect("run the emulator harness");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) && stderr.contains("not installed") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI's Python lacks the emulator: {stderr}"
        );
        eprintln!("SKIPPED: {stderr}");
        return;
    }
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the harness printed no report ({e}); status {}:\n{stderr}",
            out.status
        )
    });
    let cases = report["cases"].as_array().expect("cases");
    // Fourteen kernels (the group kernels with four input rows and one,
    // the three GEMMs, the 32-weight and Q5_K group kernels), three seeds
    // each.
    assert_eq!(cases.len(), 42, "{report}");
    let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
    assert_eq!(report["isas"], serde_json::json!(names));
    for case in cases {
        let compared = case["compared"].as_array().expect("compared");
        let kinds: Vec<&str> = compared.iter().filter_map(|k| k.as_str()).collect();
        for name in &names {
            assert!(
                kinds.contains(&format!("emulated {name}").as_str()),
                "{case}"
            );
        }
        assert!(kinds.contains(&"native avx2"), "{case}");
        assert_eq!(case["faults"], serde_json::json!({}), "{case}");
        assert_eq!(case["same_bits"], true, "{case}");
    }
    // Where the emulated CPU lacks a set, its kernel stops on an invalid
    // opcode (6): the instructions that ran above were that set's.
    // (model, set, whether the model runs it)
    let expected = [
        ("corei7_skylake_x", "avx2", true),
        ("corei7_skylake_x", "avx-vnni", false),
        ("corei7_skylake_x", "avx512-vnni", false),
        ("corei7_skylake_x", "avx512-zmm", false),
        ("arrow_lake", "avx-vnni", true),
        ("arrow_lake", "avx512-vnni", false),
        ("arrow_lake", "avx512-zmm", false),
    ];
    for (model, set, runs) in expected {
        let run = &report["partial_models"][model][set];
        if runs {
            assert_eq!(
                run["fault"],
                serde_json::Value::Null,
                "{model} {set}: {report}"
            );
            assert_eq!(run["same_bits"], true, "{model} {set}: {report}");
        } else {
            assert_eq!(run["fault"], 6, "{model} {set}: {report}");
        }
    }
    assert!(out.status.success(), "{stderr}");
    assert_eq!(report["ok"], true);
}
