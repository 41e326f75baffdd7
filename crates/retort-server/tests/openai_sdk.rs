//! `retort serve` driven by the official `openai` Python SDK (`scripts/conformance/openai_sdk.py`):
//! chat (plain, `n`, logprobs, streaming with usage), completions (generation, `echo` +
//! `logprobs` as lm-eval-harness asks, a list of prompts) and the SDK's error classes.
//! The SDK is installed by `scripts/fetch-assets` into `target/py` (or set `RETORT_PYTHON`).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::Command;

use retort_model::{Arch, WeightFormat};
use retort_server::{ServeOptions, serve};
use retort_test::{tiny_config, write_tiny_model};

fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        std::env::var_os("RETORT_PYTHON").map(PathBuf::from),
        Some(root.join("target/py/bin/python3")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn the_openai_sdk_parses_every_answer() {
    let Some(py) = python() else {
        assert!(
            std::env::var("RETORT_REQUIRE_ASSETS").is_err(),
            "the openai SDK is missing (RETORT_REQUIRE_ASSETS is set)\nhint: scripts/fetch-assets installs it into target/py"
        );
        eprintln!(
            "SKIPPED: the openai Python SDK is not installed (scripts/fetch-assets installs it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.max_position_embeddings = 512;
    let model = write_tiny_model(dir.path(), &cfg, 21);
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = ServeOptions {
        device: candle_core::Device::Cpu,
        model,
        name: Some("tiny".into()),
        host: "127.0.0.1".into(),
        port: 0,
        weights: WeightFormat::F32,
        max_batch: 8,
        max_queue: 16,
        kv_cache_memory: 16 << 20,
        prefill_chunk: 256,
        api_key: None,
    };
    std::thread::spawn(move || serve(opts, |addr| tx.send(addr).unwrap()).unwrap());
    let addr = rx.recv().unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/conformance/openai_sdk.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(format!("http://{addr}/v1"))
        .arg("tiny")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the SDK's checks failed:\n{stdout}");
    assert!(stdout.contains("all checks passed"));
}
