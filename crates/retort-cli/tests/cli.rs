//! End-to-end runs of the real `retort` binary in temporary directories, on tiny models built in
//! code and, where `scripts/fetch-assets` has run, on the real default teacher.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use retort_model::Arch;

fn retort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retort"))
        .args(["--quiet", "--threads", "2"])
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fail(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn tiny(dir: &Path, layers: usize) -> PathBuf {
    let mut cfg = retort_test::tiny_config(Arch::Llama);
    cfg.num_hidden_layers = layers;
    retort_test::write_tiny_model(dir, &cfg, 3)
}

#[test]
fn every_subcommand_has_help() {
    let top = ok(&retort(&["--help"]));
    for sub in [
        "info",
        "chat",
        "generate",
        "init-student",
        "train",
        "label",
        "cache",
        "data",
        "synth",
        "serve",
        "review",
        "export",
    ] {
        assert!(top.contains(sub), "{sub} missing from --help");
        let help = ok(&retort(&[sub, "--help"]));
        assert!(help.contains("Usage: retort"), "{sub}: {help}");
    }
}

#[test]
fn generate_writes_one_record_per_prompt_and_batching_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 2);
    let prompts = dir.path().join("prompts.jsonl");
    fs_err::write(
        &prompts,
        "{\"id\": \"a\", \"prompt\": \"why is the sky blue ?\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hello world\"}]}\n{\"prompt\": \"stock market\", \"system\": \"yes\"}\n",
    )
    .unwrap();
    let mut results = vec![];
    for bs in ["1", "3"] {
        let out = dir.path().join(format!("out-{bs}.jsonl"));
        let m = model.to_str().unwrap();
        ok(&retort(&[
            "generate",
            "-m",
            m,
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            bs,
            "--max-new-tokens",
            "6",
        ]));
        let text = fs_err::read_to_string(&out).unwrap();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0]["id"], "a");
        assert_eq!(recs[1]["id"], 1);
        assert_eq!(recs[2]["messages"][0]["role"], "system");
        for r in &recs {
            assert!(r["completion_tokens"].as_u64().unwrap() <= 6);
            assert!(["stop", "length"].contains(&r["finish_reason"].as_str().unwrap()));
        }
        results.push(recs);
    }
    assert_eq!(
        results[0], results[1],
        "batch size 1 and 3 give the same greedy completions"
    );
}

#[test]
fn bad_prompt_line_names_file_and_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 1);
    let prompts = dir.path().join("p.jsonl");
    fs_err::write(&prompts, "{\"prompt\": \"hello\"}\n{\"promt\": \"typo\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let err = fail(&retort(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("p.jsonl:2") && err.contains("hint:"), "{err}");
    assert!(!out.exists());
    let err = fail(&retort(&[
        "generate",
        "-m",
        dir.path().join("missing").to_str().unwrap(),
        "--prompt",
        "x",
    ]));
    assert!(
        err.contains("does not exist") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn init_student_prunes_and_saves_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny(dir.path(), 4);
    let out = dir.path().join("student");
    let t = teacher.to_str().unwrap();
    ok(&retort(&[
        "init-student",
        "--teacher",
        t,
        "--keep-layers",
        "0,3",
        "--out",
        out.to_str().unwrap(),
    ]));
    let info: serde_json::Value =
        serde_json::from_str(&ok(&retort(&["info", "-m", out.to_str().unwrap()]))).unwrap();
    assert_eq!(info["config"]["num_hidden_layers"], 2);
    // Refuses to overwrite without --force; duplicate and out-of-range layers are errors.
    let err = fail(&retort(&[
        "init-student",
        "--teacher",
        t,
        "--num-layers",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("already exists"), "{err}");
    ok(&retort(&[
        "init-student",
        "--teacher",
        t,
        "--num-layers",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]));
    let err = fail(&retort(&[
        "init-student",
        "--teacher",
        t,
        "--keep-layers",
        "1,1",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]));
    assert!(err.contains("twice"), "{err}");
    let err = fail(&retort(&[
        "init-student",
        "--teacher",
        t,
        "--keep-layers",
        "0,7",
        "--out",
        dir.path().join("y").to_str().unwrap(),
    ]));
    assert!(err.contains("layer 7") && err.contains("hint:"), "{err}");
}

#[test]
fn real_teacher_generate_and_ten_layer_student() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        assert!(
            std::env::var_os("RETORT_REQUIRE_ASSETS").is_none(),
            "run scripts/fetch-assets"
        );
        eprintln!("skipping: {} not found", gguf.display());
        return;
    }
    let g = gguf.to_str().unwrap();
    let out: serde_json::Value = serde_json::from_str(&ok(&retort(&[
        "generate",
        "-m",
        g,
        "--weights",
        "f32",
        "--prompt",
        "Why is the sky blue?",
        "--max-new-tokens",
        "40",
    ])))
    .unwrap();
    let text = out["completion"].as_str().unwrap();
    assert!(text.contains("Rayleigh scattering"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("student-10l");
    ok(&retort(&[
        "init-student",
        "--teacher",
        g,
        "--num-layers",
        "10",
        "--out",
        student.to_str().unwrap(),
    ]));
    let info: serde_json::Value =
        serde_json::from_str(&ok(&retort(&["info", "-m", student.to_str().unwrap()]))).unwrap();
    assert_eq!(info["config"]["num_hidden_layers"], 10);
    // 28,311,552 (tied embedding) + 10 × 3,540,096 (layers) + 576 (final norm).
    assert_eq!(info["parameters"], 63_713_088);
    assert!(
        info["tokenizer"]["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
}

#[test]
fn chat_answers_each_line_from_stdin_and_ends_on_eof() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .args([
            "--quiet",
            "chat",
            "-m",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--system",
            "yes",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello world\n/reset\nwhy is the sky blue ?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // One answer line per user line (each at most 5 tiny-vocabulary words).
    assert_eq!(stdout.lines().count(), 2, "{stdout:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.matches("> ").count(),
        4,
        "three prompts read, then EOF at the fourth: {stderr:?}"
    );
}

use retort_test::write_chat_data;

#[test]
fn data_inspect_reports_statistics_and_names_bad_records() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 1);
    let data = dir.path().join("d.jsonl");
    write_chat_data(&data, 5);
    let out = ok(&retort(&[
        "data",
        "inspect",
        data.to_str().unwrap(),
        "-m",
        model.to_str().unwrap(),
        "--max-len",
        "8",
    ]));
    assert!(out.contains("records: 5 valid, 0 invalid"), "{out}");
    assert!(out.contains("5 assistant"), "{out}");
    assert!(out.contains("at max_len 8: "), "{out}");
    let mut text = fs_err::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": 1}\n");
    fs_err::write(&data, text).unwrap();
    let o = retort(&["data", "inspect", data.to_str().unwrap()]);
    let err = fail(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("d.jsonl:line 6"), "{stdout}");
    assert!(err.contains("1 invalid record"), "{err}");
    ok(&retort(&[
        "data",
        "inspect",
        data.to_str().unwrap(),
        "--skip-invalid",
    ]));
}

/// `eval --matmul bf16` scores what f32 scores to bf16's precision and says which products ran.
#[test]
fn eval_with_bf16_products_is_close_to_f32_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 2);
    let data = dir.path().join("d.jsonl");
    write_chat_data(&data, 6);
    let report = |matmul: &str| {
        let json = dir.path().join(format!("{matmul}.json"));
        ok(&retort(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--generate",
            "0",
            "--max-len",
            "32",
            "--matmul",
            matmul,
            "--json",
            json.to_str().unwrap(),
        ]));
        let v: serde_json::Value =
            serde_json::from_str(&fs_err::read_to_string(&json).unwrap()).unwrap();
        v[0].clone()
    };
    let (f, b) = (report("f32"), report("bf16"));
    assert_eq!(f["matmul"], "f32");
    let expected = if retort_kernels::bf16_gemm::available() {
        "bf16"
    } else {
        "f32"
    };
    assert_eq!(b["matmul"], expected);
    let (nf, nb) = (
        f["tokens"]["nll"].as_f64().unwrap(),
        b["tokens"]["nll"].as_f64().unwrap(),
    );
    assert!(nf.is_finite() && nf > 0.0, "{nf}");
    assert!((nf - nb).abs() < 0.02 * nf, "f32 {nf} vs bf16 {nb}");
    assert_eq!(f["tokens"]["tokens"], b["tokens"]["tokens"]);
}

/// `retort … | head`: stdout closed before the first line. Every command that prints ends
/// quietly with success instead of panicking ("failed printing to stdout").
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 1);
    let data = dir.path().join("d.jsonl");
    write_chat_data(&data, 3);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let commands: [&[&str]; 3] = [
        &["info", "--model", m],
        &["data", "inspect", d, "-m", m],
        &[
            "eval",
            "--model",
            m,
            "--data",
            d,
            "--generate",
            "0",
            "--max-len",
            "16",
        ],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // every write now fails with EPIPE
        let out = Command::new(env!("CARGO_BIN_EXE_retort"))
            .args(["--quiet", "--threads", "2"])
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn train_dry_run_then_interrupted_and_resumed_run() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny(dir.path(), 3);
    write_chat_data(&dir.path().join("train.jsonl"), 16);
    let recipe = dir.path().join("kd.toml");
    fs_err::write(
        &recipe,
        format!(
            "[teacher]\npath = \"{}\"\n[student]\nnum_layers = 2\n[train]\nbatch_size = 2\nmax_len = 32\n\n[[stages]]\nname = \"kd\"\ndata = \"train.jsonl\"\nmethod = \"kd\"\nloss = \"jsd:0.5\"\nepochs = 1\nlr = 0.01\n",
            teacher.display()
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let out_dir = dir.path().join("run");
    let o = out_dir.to_str().unwrap();
    let plan = ok(&retort(&["train", r, "--out", o, "--dry-run"]));
    assert!(plan.contains("kd jsd:0.5"), "{plan}");
    assert!(plan.contains("memory estimate"), "{plan}");
    assert!(
        !out_dir.exists(),
        "a dry run must not write the run directory"
    );
    let e = fail(&retort(&[
        "train",
        r,
        "--out",
        o,
        "--set",
        "train.batch_sise=2",
    ]));
    assert!(e.contains("batch_sise"), "{e}");
    let stopped = ok(&retort(&["train", r, "--out", o, "--max-steps", "2"]));
    assert!(stopped.trim().ends_with("step-0000002"), "{stopped}");
    let done = ok(&retort(&["train", r, "--out", o, "--resume"]));
    assert!(done.trim().ends_with("model"), "{done}");
    let metrics = fs_err::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let steps = metrics
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .count();
    assert_eq!(steps, 7, "{metrics}"); // 14 training samples (2 held out) / batch 2
    assert!(out_dir.join("model/model.safetensors").exists());
    assert!(out_dir.join("model/lineage.json").exists());
    assert!(out_dir.join("recipe.resolved.toml").exists());
}

fn manifest(dir: &Path) -> Option<serde_json::Value> {
    let text = fs_err::read_to_string(dir.join("manifest.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn inspect_json(dir: &Path) -> serde_json::Value {
    let out = ok(&retort(&[
        "cache",
        "inspect",
        &dir.display().to_string(),
        "--json",
    ]));
    serde_json::from_str(&out).unwrap()
}

#[test]
#[allow(clippy::zombie_processes)] // the loop below always kills and waits for the child
fn label_killed_with_sigkill_resumes_with_every_sample_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 4);
    let data = dir.path().join("chat.jsonl");
    write_chat_data(&data, 600);
    let args = |out: &Path| -> Vec<String> {
        [
            "--quiet",
            "--threads",
            "1",
            "label",
            "--teacher",
            &model.display().to_string(),
            "--data",
            &data.display().to_string(),
            "--top-k",
            "8",
            "--batch-size",
            "2",
            "--shard-samples",
            "3",
            "--out",
            &out.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let bin = env!("CARGO_BIN_EXE_retort");
    let once = dir.path().join("once");
    ok(&Command::new(bin).args(args(&once)).output().unwrap());
    // Kill -9 as soon as the first shard is listed, while the run is unfinished.
    let killed = dir.path().join("killed");
    let mut child = Command::new(bin).args(args(&killed)).spawn().unwrap();
    let t0 = std::time::Instant::now();
    let shards_at_kill = loop {
        let n = manifest(&killed).map_or(0, |m| m["shards"].as_array().map_or(0, Vec::len));
        if n > 0 || t0.elapsed().as_secs() >= 120 {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            break n;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(shards_at_kill > 0, "no shard within 2 minutes");
    let partial = inspect_json(&killed);
    assert_eq!(
        partial["complete"], false,
        "the run finished before the kill"
    );
    assert!(partial["samples"].as_u64().unwrap() < 600);
    // The same command resumes; the result equals the uninterrupted cache shard for shard.
    ok(&Command::new(bin).args(args(&killed)).output().unwrap());
    let (a, b) = (manifest(&once).unwrap(), manifest(&killed).unwrap());
    let sums = |m: &serde_json::Value| -> Vec<String> {
        m["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sha256"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(b["complete"], true);
    assert_eq!(sums(&a), sums(&b), "killed after {shards_at_kill} shards");
    let (ia, ib) = (inspect_json(&once), inspect_json(&killed));
    assert_eq!(ia["samples"], 600);
    assert_eq!(ia["samples"], ib["samples"]);
    // Format 2, usable by a student of any tokenizer, in the resumed cache as well.
    assert_eq!(
        (&ia["format_version"], &ib["format_version"]),
        (&2.into(), &2.into())
    );
    assert_eq!(
        (&ia["any_tokenizer"], &ib["any_tokenizer"]),
        (&true.into(), &true.into())
    );
    assert_eq!(ia["tokens"], ib["tokens"]);
    let leftovers: Vec<_> = fs_err::read_dir(&killed)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with("shard-") && n != "manifest.json" && n != "tokenizer")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The teacher's tokenizer files (format 2) are there whole.
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            fs_err::read(once.join("tokenizer").join(f)).unwrap(),
            fs_err::read(killed.join("tokenizer").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
#[allow(clippy::zombie_processes)] // the loop below always kills and waits for the child
fn on_policy_train_killed_mid_round_with_sigkill_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny(dir.path(), 4);
    write_chat_data(&dir.path().join("train.jsonl"), 200);
    let recipe = dir.path().join("op.toml");
    fs_err::write(
        &recipe,
        format!(
            "[teacher]\npath = \"{}\"\n[student]\nnum_layers = 2\n[train]\nbatch_size = 2\n\
             max_len = 40\neval_fraction = 0.0\nsave_every = 1\n[[stages]]\nname = \"op\"\n\
             data = \"train.jsonl\"\nmethod = \"on_policy\"\nmax_steps = 60\nlr = 0.01\n\
             [stages.on_policy]\nlambda = 0.5\nupdates_per_round = 4\nsamples_per_round = 6\n\
             max_new_tokens = 8\ntop_k = 8\n",
            teacher.display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_retort");
    let args = |out: &Path, resume: bool| -> Vec<String> {
        let mut a: Vec<String> = ["--quiet", "--threads", "1", "train"]
            .map(String::from)
            .to_vec();
        a.push(recipe.display().to_string());
        a.push("--out".into());
        a.push(out.display().to_string());
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let once = dir.path().join("once");
    ok(&Command::new(bin).args(args(&once, false)).output().unwrap());
    // Kill -9 as soon as a checkpoint in the middle of a round (not a multiple of 4) is written.
    let killed = dir.path().join("killed");
    let mut child = Command::new(bin)
        .args(args(&killed, false))
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let step_at_kill = loop {
        let step = fs_err::read_to_string(killed.join("checkpoints/latest"))
            .ok()
            .and_then(|n| {
                n.trim()
                    .strip_prefix("step-")
                    .and_then(|s| s.parse::<usize>().ok())
            });
        if step.is_some_and(|s| s % 4 != 0) || t0.elapsed().as_secs() >= 120 {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            break step.unwrap_or(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert!(
        step_at_kill % 4 != 0,
        "no mid-round checkpoint within 2 minutes"
    );
    assert!(
        !killed.join("model").exists(),
        "the run finished before the kill"
    );
    let done = ok(&Command::new(bin)
        .args(args(&killed, true))
        .output()
        .unwrap());
    assert!(done.trim().ends_with("model"), "{done}");
    assert_eq!(
        fs_err::read(once.join("model/model.safetensors")).unwrap(),
        fs_err::read(killed.join("model/model.safetensors")).unwrap(),
        "killed at step {step_at_kill}: the resumed student differs"
    );
    let losses = |d: &Path| -> Vec<String> {
        fs_err::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"kind\":\"train\""))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {} {}", v["global_step"], v["loss"], v["grad_norm"])
            })
            .collect()
    };
    assert_eq!(losses(&once), losses(&killed));
    assert_eq!(losses(&once).len(), 60);
    // Every round's answers were kept, the same in both runs.
    for r in 0..15 {
        let read = |d: &Path| -> serde_json::Value {
            let p = d.join(format!("rounds/stage-0/round-{r:06}.json"));
            let mut v: serde_json::Value =
                serde_json::from_str(&fs_err::read_to_string(p).unwrap()).unwrap();
            v["seconds_sampling"] = 0.into();
            v
        };
        assert_eq!(
            read(&once)["samples"],
            read(&killed)["samples"],
            "round {r}"
        );
    }
}

/// Rows of the synth ledger's `requests` table (0 while the file does not exist yet).
fn ledger_rows(dir: &Path) -> i64 {
    let Ok(c) = rusqlite::Connection::open_with_flags(
        dir.join("ledger.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    c.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
        .unwrap_or(0)
}

#[test]
#[allow(clippy::zombie_processes)] // the loop below always kills and waits for the child
fn synth_killed_with_sigkill_resumes_with_every_item_exactly_once() {
    use retort_test::fake_openai::{FakeConfig, start};
    let dir = tempfile::tempdir().unwrap();
    // Each answer takes 40 ms, so the run lasts long enough to be killed in the middle.
    let server = start(FakeConfig {
        latency: std::time::Duration::from_millis(40),
        ..FakeConfig::default()
    });
    fs_err::write(
        dir.path().join("seeds.jsonl"),
        "{\"user_context\": \"I am 35 and own a shop.\", \"question\": \"Is Dogcoin a good investment?\"}\n\
         {\"user_context\": \"I am 62 and retire soon.\", \"question\": \"Should I buy index funds?\"}\n",
    )
    .unwrap();
    let pipeline = dir.path().join("pipeline.toml");
    fs_err::write(
        &pipeline,
        format!(
            "[teacher]\nurl = \"{}\"\nconcurrency = 2\n\
             [seeds]\npath = \"seeds.jsonl\"\nfields = [\"user_context\", \"question\"]\nlabels = [\"User context\", \"Question\"]\n\
             [expand]\nexamples_per_prompt = 2\nask_for = 4\nrequests_per_round = 5\ntarget = 60\n\
             [filter]\nrouge_l_max = 0.9\n\
             [answer]\nsystem = \"You advise on stocks.\"\ntemplate = \"{{{{ user_context }}}} {{{{ question }}}}\"\n",
            server.url
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_retort");
    let args = |out: &Path| -> Vec<String> {
        [
            "--quiet",
            "synth",
            &pipeline.display().to_string(),
            "--out",
            &out.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let once = dir.path().join("once");
    ok(&Command::new(bin).args(args(&once)).output().unwrap());
    let total = ledger_rows(&once);
    assert!(total > 60, "{total} requests");

    let killed = dir.path().join("killed");
    let mut child = Command::new(bin).args(args(&killed)).spawn().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        // Kill a third of the way in.
        if ledger_rows(&killed) >= total / 3 || t0.elapsed().as_secs() >= 120 {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let rows_at_kill = ledger_rows(&killed);
    assert!(
        rows_at_kill > 0 && rows_at_kill < total,
        "killed at {rows_at_kill} of {total}"
    );
    assert!(
        !killed.join("synth.jsonl").exists(),
        "the run finished before the kill"
    );
    // The same command resumes and ends with the uninterrupted run's output and ledger.
    let out = ok(&Command::new(bin).args(args(&killed)).output().unwrap());
    assert!(out.contains("| answered | 60 |"), "{out}");
    assert_eq!(
        fs_err::read_to_string(killed.join("synth.jsonl")).unwrap(),
        fs_err::read_to_string(once.join("synth.jsonl")).unwrap()
    );
    assert_eq!(ledger_rows(&killed), total);
    let sent_after_kill: u64 = serde_json::from_str::<serde_json::Value>(
        &fs_err::read_to_string(killed.join("report.json")).unwrap(),
    )
    .unwrap()["sent_this_run"]
        .as_u64()
        .unwrap();
    assert_eq!(
        sent_after_kill as i64,
        total - rows_at_kill,
        "the resumed run sent only what the ledger lacked"
    );
}

/// A ledger with decisions: 0 accepted as is, 1 edited, 2 rejected, 3 an own answer.
fn reviewed_ledger(dir: &Path) -> PathBuf {
    use retort_teacher::synth::{Action, NewDecision, Store};
    let db = dir.join("ledger.sqlite");
    retort_teacher::synth::testing::ledger_with_items(&db, 5, |i| format!("answer {i}"));
    let mut s = Store::open(&db).unwrap();
    for (i, action, answer, human) in [
        (0, Action::Accept, "answer 0", false),
        (1, Action::Accept, "a better answer 1", false),
        (2, Action::Reject, "answer 2", false),
        (3, Action::Accept, "my own answer 3", true),
    ] {
        let d = NewDecision {
            action,
            input: format!("question {i}"),
            answer: answer.into(),
            human,
            reason: "wrong".into(),
            reviewer: "ana".into(),
        };
        s.decide(&format!("{i:064x}"), &d).unwrap();
    }
    db
}

#[test]
fn export_writes_the_stage_sets_and_stage_two_can_be_labelled() {
    let dir = tempfile::tempdir().unwrap();
    reviewed_ledger(dir.path());
    let out = dir.path().join("export");
    // The synth output directory stands for its ledger.
    let printed = ok(&retort(&[
        "export",
        &dir.path().display().to_string(),
        "--out",
        &out.display().to_string(),
    ]));
    assert!(
        printed.contains("5 items (3 accepted, 1 rejected, 0 pending, 1 without answer)"),
        "{printed}"
    );
    let lines = |f: &str| fs_err::read_to_string(out.join(f)).unwrap().lines().count();
    assert_eq!(
        (
            lines("stage1.jsonl"),
            lines("stage2.jsonl"),
            lines("preferences.jsonl")
        ),
        (2, 2, 2)
    );
    // Stage 2 goes through the teacher's labelling like any dataset.
    let model = tiny(dir.path(), 2);
    let cache = dir.path().join("cache");
    ok(&retort(&[
        "label",
        "--teacher",
        &model.display().to_string(),
        "--data",
        &out.join("stage2.jsonl").display().to_string(),
        "--top-k",
        "4",
        "--out",
        &cache.display().to_string(),
    ]));
    let m = manifest(&cache).unwrap();
    assert_eq!(m["samples"], 2, "{m}");
    // Not a ledger: a clear error.
    let err = fail(&retort(&[
        "export",
        &out.join("stage1.jsonl").display().to_string(),
        "--out",
        &out.display().to_string(),
    ]));
    assert!(err.contains("hint:"), "{err}");
}

/// One HTTP/1.1 request over a plain socket; the whole response.
fn http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn review_serves_the_queue_and_a_decision_survives_sigkill() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let db = reviewed_ledger(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .args([
            "--quiet",
            "review",
            &dir.path().display().to_string(),
            "--port",
            "0",
        ])
        .args(["--reviewer", "ana"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let get = |path: &str| {
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        )
    };
    let queue = get("/");
    assert!(queue.starts_with("HTTP/1.1 200"), "{queue}");
    assert!(queue.contains("<b>4</b> / 5 decided"), "{queue}");
    // Reject item 0 through the form, then kill -9 the server at once.
    let item = format!("{:064x}", 0);
    let page = get(&format!("/item/{item}"));
    let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = &page[at..at + 64];
    let body = format!(
        "csrf={csrf}&action=reject&input=question+0&answer=answer+0&human=0&reason=off+topic&back="
    );
    let response = http(
        addr,
        &format!(
            "POST /item/{item} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(response.starts_with("HTTP/1.1 303"), "{response}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let s = retort_teacher::synth::Store::open(&db).unwrap();
    let log = s.history(&item).unwrap();
    let last = log.last().unwrap();
    assert_eq!(last.reason.as_deref(), Some("off topic"));
    assert_eq!(last.reviewer, "ana");
    assert_eq!(
        s.item(&item).unwrap().unwrap().status,
        retort_teacher::synth::Status::Rejected
    );
}

#[test]
fn eval_compares_models_side_by_side_and_probe_gives_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny(&dir.path().join("t"), 4);
    let student = tiny(&dir.path().join("s"), 2);
    let data = dir.path().join("chat.jsonl");
    write_chat_data(&data, 12);
    let json = dir.path().join("eval.json");
    let p = |x: &Path| x.display().to_string();
    let table = ok(&retort(&[
        "eval",
        "--model",
        &p(&teacher),
        "--model",
        &p(&student),
        "--teacher",
        &p(&teacher),
        "--data",
        &p(&data),
        "--generate",
        "2",
        "--max-new-tokens",
        "4",
        "--json",
        &p(&json),
    ]));
    assert!(
        table.contains(&format!(
            "| metric | `{}` | `{}` |",
            p(&teacher),
            p(&student)
        )),
        "{table}"
    );
    assert!(
        table.contains("KL(teacher ‖ model)") && table.contains("ROUGE-L F"),
        "{table}"
    );
    let reports: Vec<serde_json::Value> =
        serde_json::from_str(&fs_err::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(reports.len(), 2);
    // The teacher against itself: KL 0, agreement 1.
    assert!(reports[0]["tokens"]["kl"].as_f64().unwrap().abs() < 1e-5);
    assert_eq!(reports[0]["tokens"]["agreement"], 1.0);
    assert!(reports[1]["tokens"]["kl"].as_f64().unwrap() > 0.0);
    assert_eq!(reports[1]["generation"]["samples"], 2);
    let verdict = ok(&retort(&[
        "probe",
        "--teacher",
        &p(&teacher),
        "--student",
        &p(&student),
        "--data",
        &p(&data),
        "--holdout",
        "4",
    ]));
    assert!(
        verdict.contains("KD over SFT with 12 training examples:"),
        "{verdict}"
    );
    // A missing data file is named.
    let err = fail(&retort(&[
        "eval",
        "--model",
        &p(&student),
        "--data",
        &p(&dir.path().join("none.jsonl")),
    ]));
    assert!(err.contains("none.jsonl"), "{err}");
}

#[test]
fn experiment_runs_the_grid_skips_finished_cells_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny(dir.path(), 3);
    write_chat_data(&dir.path().join("pool.jsonl"), 20);
    write_chat_data(&dir.path().join("heldout.jsonl"), 6);
    fs_err::write(
        dir.path().join("base.toml"),
        format!(
            "[teacher]\npath = \"{}\"\n[student]\nnum_layers = 2\n[train]\nbatch_size = 2\nmax_len = 32\n\n[[stages]]\nname = \"train\"\ndata = \"pool.jsonl\"\nmethod = \"sft\"\nepochs = 1\nlr = 0.01\n",
            teacher.display()
        ),
    )
    .unwrap();
    let exp = dir.path().join("exp.toml");
    fs_err::write(
        &exp,
        format!(
            "name = \"tiny\"\nrecipe = \"base.toml\"\n[data]\npool = \"pool.jsonl\"\neval = \"heldout.jsonl\"\n\
             [eval]\nmax_len = 32\ngenerate = 2\nmax_new_tokens = 3\n\
             [grid]\ntrain_size = [4, 8]\nseeds = [0, 1]\n\
             [[arms]]\nname = \"sft\"\nset = [\"stages.0.method=sft\"]\n\
             [[arms]]\nname = \"kd\"\nset = [\"stages.0.method=kd\", \"stages.0.alpha=1.0\"]\n\
             [[baselines]]\nname = \"teacher\"\nmodel = \"{}\"\n",
            teacher.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = [
        "experiment",
        exp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let printed = ok(&retort(&args));
    assert!(printed.trim().ends_with("report.md"), "{printed}");
    let report = fs_err::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| train size | sft | kd |"), "{report}");
    assert!(report.contains("Cells done: 8 of 8"), "{report}");
    // 4 and 8 with 2 seeds per arm.
    assert_eq!(report.matches(" (2) |").count(), 4, "{report}");
    assert!(report.contains("| teacher ("), "{report}");
    for png in ["nll-vs-train-size.png", "loss-curves.png"] {
        let bytes = fs_err::read(out.join(png)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000,
            "{png}"
        );
    }
    // A finished cell keeps its final model and drops its training checkpoints.
    let cell = out.join("cells/sft-n8-s0");
    assert!(cell.join("model/model.safetensors").exists());
    assert!(!cell.join("checkpoints").exists());
    // Subsets are nested: the 4-record subset is the start of the 8-record one (same seed).
    let n4 = fs_err::read_to_string(out.join("data/train-n4-s1.jsonl")).unwrap();
    let n8 = fs_err::read_to_string(out.join("data/train-n8-s1.jsonl")).unwrap();
    assert!(n8.starts_with(&n4));
    // The cells differ by method: KD's run has a kd term in its metrics, SFT's not.
    let kd = fs_err::read_to_string(out.join("cells/kd-n4-s0/metrics.jsonl")).unwrap();
    let sft = fs_err::read_to_string(out.join("cells/sft-n4-s0/metrics.jsonl")).unwrap();
    assert!(
        kd.contains("\"kd\":") && !kd.contains("\"kd\":null"),
        "{kd}"
    );
    assert!(sft.contains("\"kd\":null"), "{sft}");
    // A rerun trains nothing: every cell keeps its result file.
    let before = fs_err::metadata(out.join("cells/kd-n8-s1/result.json"))
        .unwrap()
        .modified()
        .unwrap();
    ok(&retort(&args));
    let after = fs_err::metadata(out.join("cells/kd-n8-s1/result.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

#[test]
fn generate_refuses_limits_past_the_context_and_interrupted_keeps_every_finished_answer() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 2); // a context of 128 tokens
    let m = model.to_str().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: String = (0..2000)
        .map(|i| format!("{{\"id\": {i}, \"prompt\": \"hello world the stock market\"}}\n"))
        .collect();
    fs_err::write(&prompts, lines).unwrap();
    let p = prompts.to_str().unwrap();
    // Flags out of range are refused before any work, naming the flag.
    for (flag, value, want) in [
        ("--max-new-tokens", "100000000", "context is 128 tokens"),
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "0", "--top-p"),
        ("--repeat-penalty", "0", "--repeat-penalty"),
        ("--batch-size", "0", "--batch-size"),
    ] {
        let arg = format!("{flag}={value}");
        let e = fail(&retort(&["generate", "-m", m, "--prompt", "hi", &arg]));
        assert!(e.contains(want), "{flag} {value}: {e}");
    }
    // An answer that reaches the context's end finishes there, as `length`.
    let out = ok(&retort(&[
        "generate",
        "-m",
        m,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "127",
        "--temperature",
        "0",
    ]));
    let rec: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let used = rec["prompt_tokens"].as_u64().unwrap() + rec["completion_tokens"].as_u64().unwrap();
    assert!(used <= 128, "{rec}");
    // Ctrl-C in the middle: the finished answers are kept in OUT.partial; OUT is not written.
    let out = dir.path().join("answers.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .args([
            "--quiet",
            "--threads",
            "1",
            "generate",
            "-m",
            m,
            "--prompts",
            p,
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "1",
            "--max-new-tokens",
            "100",
        ])
        .args(["--temperature", "0.9", "--seed", "5"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success(),
        "the run finished before the interrupt: {err}"
    );
    assert!(!out.exists(), "a partial run wrote the output");
    let partial = dir.path().join("answers.jsonl.partial");
    assert!(err.contains("answers.jsonl.partial"), "{err}");
    let text = fs_err::read_to_string(&partial).unwrap();
    let ids: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(!ids.is_empty() && ids.len() < 2000, "{} answers", ids.len());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in input order");
    eprintln!("interrupted after {} of 2000 answers", ids.len());
}

#[test]
fn errors_print_no_library_backtrace_under_rust_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("trunc.gguf");
    // A GGUF header that promises more than the file holds.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&272u64.to_le_bytes());
    bytes.extend_from_slice(&33u64.to_le_bytes());
    fs_err::write(&bad, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_retort"))
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .args(["info", "--model", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = fail(&out);
    assert!(err.contains("trunc.gguf") && err.contains("hint:"), "{err}");
    assert!(
        !err.contains("stack backtrace") && err.lines().count() < 8,
        "{err}"
    );
}

#[test]
fn serve_refuses_absurd_limits_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 2);
    let m = model.to_str().unwrap();
    for (arg, want) in [
        ("--max-batch=0", "--max-batch"),
        ("--max-batch=1000000000", "--max-batch"),
        ("--max-queue=-1", "--max-queue"),
        ("--prefill-chunk=0", "--prefill-chunk"),
        ("--kv-cache-memory=lots", "is not a size"),
        ("--kv-cache-memory=12XB", "unknown unit"),
        ("--kv-cache-memory=0", "out of range"),
        ("--kv-cache-memory=1B", "too small"),
    ] {
        let e = fail(&retort(&["serve", "-m", m, "--port", "0", arg]));
        assert!(e.contains(want), "{arg}: {e}");
    }
}
