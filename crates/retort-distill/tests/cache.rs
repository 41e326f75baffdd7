//! The logit cache on tiny models: training from a cache with k = V equals training with the
//! online teacher (losses and gradient norms, step by step); an interrupted labelling resumes
//! into the same bytes; recoding to a smaller k equals labelling at that k; and every guard
//! refuses with a hint that names the command which rebuilds the cache.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use retort_data::ReadOptions;
use retort_distill::batch::Truncation;
use retort_distill::cache::label::{LabelObserver, LabelOptions, Silent as SilentLabel, label};
use retort_distill::cache::manifest::ShardInfo;
use retort_distill::cache::{Codec, Manifest, Reader, recode};
use retort_distill::recipe::Recipe;
use retort_distill::setup::prepare;
use retort_distill::trainer::{RunOptions, Silent, run};
use retort_model::Arch;
use retort_test::{WORDS, tiny_config, write_tiny_model};

fn write_data(path: &Path, n: usize, seed: u64) {
    let mut x = seed;
    let words = &WORDS[3..];
    let mut word = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        words[(x >> 33) as usize % words.len()]
    };
    let mut out = String::new();
    for i in 0..n {
        let q: Vec<&str> = (0..3 + i % 4).map(|_| word()).collect();
        let a: Vec<&str> = (0..4 + i % 3).map(|_| word()).collect();
        let rec = serde_json::json!({"id": format!("r{i}"), "messages": [
            {"role": "user", "content": q.join(" ")},
            {"role": "assistant", "content": a.join(" ")}]});
        out.push_str(&format!("{rec}\n"));
    }
    fs_err::write(path, out).unwrap();
}

struct Fx {
    _dir: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
    data: PathBuf,
    vocab: usize,
}

fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.num_hidden_layers = 3;
    let teacher = write_tiny_model(&root, &cfg, 1);
    let data = root.join("data.jsonl");
    write_data(&data, 20, 5);
    Fx {
        _dir: dir,
        root,
        teacher,
        data,
        vocab: cfg.vocab_size,
    }
}

fn opts(fx: &Fx, out: &str, k: usize, codec: Codec) -> LabelOptions {
    LabelOptions {
        device: candle_core::Device::Cpu,
        teacher: fx.teacher.clone(),
        data: fx.data.clone(),
        read: ReadOptions::default(),
        out: fx.root.join(out),
        k,
        temperature: 1.0,
        min_prob: 0.0,
        codec,
        max_len: 24,
        truncation: Truncation::Right,
        batch_size: 3,
        shard_samples: 4,
        chunk_rows: 7,
        matmul: Default::default(),
        command: format!("retort label --out {out}"),
    }
}

fn label_ok(o: &LabelOptions) -> Manifest {
    let r = label(o, &AtomicBool::new(false), &mut SilentLabel).unwrap();
    assert!(!r.interrupted && r.manifest.complete);
    r.manifest
}

fn recipe(fx: &Fx, teacher: &str, student: &str, name: &str) -> PathBuf {
    let text = format!(
        r#"
[teacher]
{teacher}
[student]
{student}
[train]
batch_size = 2
grad_accum = 2
max_len = 24
warmup_ratio = 0.1
chunk_rows = 5
[[stages]]
name = "kd"
data = "{data}"
method = "kd"
loss = "forward_kl"
alpha = 0.5
temperature = 2.0
epochs = 1
lr = 0.01
"#,
        data = fx.data.display()
    );
    let p = fx.root.join(name);
    fs_err::write(&p, text).unwrap();
    p
}

fn train_records(recipe: &Path, out: &Path) -> Vec<serde_json::Value> {
    let plan = prepare(Recipe::load(recipe, &[]).unwrap(), &Device::Cpu).unwrap();
    let opts = RunOptions {
        out: out.to_path_buf(),
        ..Default::default()
    };
    run(&plan, &opts, &mut Silent).unwrap();
    fs_err::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn training_from_a_full_vocabulary_cache_equals_the_online_teacher() {
    let fx = fixture();
    label_ok(&opts(&fx, "full", fx.vocab, Codec::F32));
    let t = format!("path = \"{}\"", fx.teacher.display());
    let online = recipe(&fx, &t, "num_layers = 2", "online.toml");
    let cached = recipe(
        &fx,
        &format!("{t}\ncache = \"{}\"", fx.root.join("full").display()),
        "num_layers = 2",
        "cached.toml",
    );
    let a = train_records(&online, &fx.root.join("run-online"));
    let b = train_records(&cached, &fx.root.join("run-cached"));
    assert_eq!(a.len(), b.len());
    let mut steps = 0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["kind"], y["kind"]);
        for f in ["loss", "ce", "kd", "grad_norm", "nll"] {
            if let (Some(u), Some(v)) = (x[f].as_f64(), y[f].as_f64()) {
                assert!(
                    close(u, v, 1e-4),
                    "{} {f}: online {u} vs cache {v}",
                    x["kind"]
                );
            }
        }
        steps += (x["kind"] == "train") as usize;
    }
    assert!(steps >= 4, "{steps} steps");
    // A cache that holds every sample trains without building the teacher's model, though its
    // path is given (and its identity checked against the cache's).
    let plan = prepare(Recipe::load(&cached, &[]).unwrap(), &Device::Cpu).unwrap();
    assert!(plan.teacher.is_none() && plan.teacher_id.is_some() && plan.cache.is_some());
    // The same with the student from a directory and no live teacher at all.
    let student = fx.root.join("run-online/model");
    let cache_only = recipe(
        &fx,
        &format!("cache = \"{}\"", fx.root.join("full").display()),
        &format!("path = \"{}\"", student.display()),
        "cache-only.toml",
    );
    let plan = prepare(Recipe::load(&cache_only, &[]).unwrap(), &Device::Cpu).unwrap();
    assert!(plan.teacher.is_none() && plan.cache.is_some());
    assert!(
        plan.summary().contains("from the cache only"),
        "{}",
        plan.summary()
    );
    let c = train_records(&cache_only, &fx.root.join("run-cache-only"));
    assert!(
        c.iter()
            .any(|r| r["kind"] == "train" && r["kd"].as_f64().is_some())
    );
    // Held-out data that is not in the cache: NLL only, no KD metric, no error.
    let other = fx.root.join("other.jsonl");
    write_data(&other, 6, 77);
    let text = fs_err::read_to_string(&cache_only).unwrap().replace(
        "method = \"kd\"",
        &format!("eval_data = \"{}\"\nmethod = \"kd\"", other.display()),
    );
    fs_err::write(&cache_only, text).unwrap();
    let c = train_records(&cache_only, &fx.root.join("run-cache-only-eval"));
    let evals: Vec<_> = c.iter().filter(|r| r["kind"] == "eval").collect();
    assert!(!evals.is_empty());
    for e in evals {
        assert!(
            e["nll"].as_f64().is_some_and(f64::is_finite) && e["kd"].is_null(),
            "{e}"
        );
    }
}

#[test]
fn recoding_to_a_smaller_k_equals_labelling_at_that_k() {
    let fx = fixture();
    label_ok(&opts(&fx, "full", fx.vocab, Codec::F32));
    label_ok(&opts(&fx, "k5", 5, Codec::F32));
    let full = Reader::open(&fx.root.join("full"), false).unwrap();
    recode::recode(
        &full,
        5,
        0.0,
        Codec::F32,
        &fx.root.join("full-k5"),
        "recode",
    )
    .unwrap();
    let a = Reader::open(&fx.root.join("k5"), false).unwrap();
    let b = Reader::open(&fx.root.join("full-k5"), false).unwrap();
    let c = recode::compare(&a, &b).unwrap();
    assert_eq!(c.samples, a.len());
    assert!(c.max_kl < 1e-6 && c.top1_agreement == 1.0, "{c:?}");
    // q8 stays close to f32: KL per token well under 1e-3 nats.
    recode::recode(
        &full,
        5,
        0.0,
        Codec::Q8,
        &fx.root.join("full-k5-q8"),
        "recode",
    )
    .unwrap();
    let q = Reader::open(&fx.root.join("full-k5-q8"), false).unwrap();
    let c = recode::compare(&a, &q).unwrap();
    assert!(c.mean_kl < 1e-3 && c.top1_agreement > 0.95, "{c:?}");
    assert!(q.manifest.bytes() < a.manifest.bytes());
    // A recoded format-2 cache still serves any tokenizer: label log-probs and turns carried
    // over unchanged, the tokenizer copied.
    assert!(q.manifest.serves_any_tokenizer());
    assert_eq!(
        q.teacher_tokenizer().unwrap().fingerprint(),
        a.manifest.tokenizer_fingerprint
    );
    for si in 0..b.manifest.shards.len() {
        for (e, t) in b.shard_entries(si).unwrap() {
            let o = full.get(&e.key).unwrap().unwrap();
            assert_eq!((&t.label_logp, &t.turns), (&o.label_logp, &o.turns));
            assert!(t.turns.is_some());
        }
    }
}

/// `--matmul bf16` labels (weights packed once, bf16 products) stay within a small KL of f32's,
/// the manifest records the products, and a cache resumes only with the same ones.
#[test]
fn bf16_products_label_close_to_f32_and_are_recorded() {
    use retort_kernels::MatmulPrecision;
    let fx = fixture();
    label_ok(&opts(&fx, "f32", 5, Codec::F32));
    let mut o = opts(&fx, "bf16", 5, Codec::F32);
    o.matmul = MatmulPrecision::Bf16;
    let m = label_ok(&o);
    assert_eq!(m.matmul, MatmulPrecision::Bf16);
    let a = Reader::open(&fx.root.join("f32"), false).unwrap();
    let b = Reader::open(&fx.root.join("bf16"), false).unwrap();
    assert_eq!(a.manifest.matmul, MatmulPrecision::F32);
    let c = recode::compare(&a, &b).unwrap();
    assert_eq!(c.samples, a.len());
    assert!(c.mean_kl < 1e-3 && c.top1_agreement > 0.95, "{c:?}");
    if retort_kernels::bf16_gemm::available() {
        // The bf16 products did run: the values are not f32's.
        assert!(c.max_kl > 0.0, "{c:?}");
    }
    let mut other = o.clone();
    other.matmul = MatmulPrecision::F32;
    let e = label(&other, &AtomicBool::new(false), &mut SilentLabel)
        .unwrap_err()
        .to_string();
    assert!(e.contains("matmul differs"), "{e}");
}

/// Stops labelling after `after` batches.
struct StopAfter<'a> {
    after: usize,
    seen: usize,
    flag: &'a AtomicBool,
}

impl LabelObserver for StopAfter<'_> {
    fn start(&mut self, _: usize, _: usize) {}
    fn progress(&mut self, _: usize) {
        self.seen += 1;
        if self.seen >= self.after {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn shard(&mut self, _: &ShardInfo) {}
}

#[test]
fn interrupted_labelling_resumes_into_the_same_bytes() {
    let fx = fixture();
    let once = label_ok(&opts(&fx, "once", 6, Codec::Q8));
    let o = opts(&fx, "twice", 6, Codec::Q8);
    let flag = AtomicBool::new(false);
    let mut obs = StopAfter {
        after: 3,
        seen: 0,
        flag: &flag,
    };
    let r = label(&o, &flag, &mut obs).unwrap();
    assert!(r.interrupted && !r.manifest.complete);
    let done = r.manifest.shards.len();
    assert!(done >= 1 && done < once.shards.len(), "{done} shards");
    // Unfinished caches are refused for training without a live teacher.
    let e = Reader::open(&o.out, false).unwrap_err().to_string();
    assert!(
        e.contains("unfinished") && e.contains("retort label --out twice"),
        "{e}"
    );
    let twice = label_ok(&o);
    let sums = |m: &Manifest| {
        m.shards
            .iter()
            .map(|s| s.sha256.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(sums(&once), sums(&twice));
    assert_eq!(once.positions(), twice.positions());
    // Labelling a finished cache again does nothing.
    let again = label(&o, &AtomicBool::new(false), &mut SilentLabel).unwrap();
    assert_eq!(again.positions_this_run, 0);
    // Other settings into the same directory are refused.
    let mut other = o.clone();
    other.k = 7;
    let e = label(&other, &AtomicBool::new(false), &mut SilentLabel)
        .unwrap_err()
        .to_string();
    assert!(e.contains("k differs") && e.contains("hint:"), "{e}");
}

#[test]
fn guards_refuse_mismatched_or_damaged_caches_with_the_rebuild_command() {
    let fx = fixture();
    let m = label_ok(&opts(&fx, "c", 4, Codec::Q8));
    let dir = fx.root.join("c");
    let student_dir = fx.root.join("student");
    let mut cfg = tiny_config(Arch::Llama);
    cfg.num_hidden_layers = 2;
    fs_err::create_dir_all(&student_dir).unwrap();
    let student = write_tiny_model(&student_dir, &cfg, 2);
    let cache_only = recipe(
        &fx,
        &format!("cache = \"{}\"", dir.display()),
        &format!("path = \"{}\"", student.display()),
        "r.toml",
    );
    let prep = || {
        prepare(Recipe::load(&cache_only, &[]).unwrap(), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(prep(), "", "a matching cache prepares");
    // Another version of the data.
    let orig = fs_err::read_to_string(&fx.data).unwrap();
    fs_err::write(&fx.data, format!("{orig}\n")).unwrap();
    let e = prep();
    assert!(
        e.contains("another version of the data") && e.contains("hint:"),
        "{e}"
    );
    assert!(e.contains(&m.command), "{e}");
    fs_err::write(&fx.data, &orig).unwrap();
    // Another tokenizer.
    let mut bad = m.clone();
    bad.tokenizer_fingerprint = "0".repeat(64);
    bad.write(&dir).unwrap();
    let e = prep();
    assert!(
        e.contains("another tokenizer") && e.contains(&m.command),
        "{e}"
    );
    m.write(&dir).unwrap();
    // A truncated shard, then one with a flipped byte.
    let shard = dir.join(&m.shards[1].file);
    let bytes = fs_err::read(&shard).unwrap();
    fs_err::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = Reader::open(&dir, false).unwrap_err().to_string();
    let here = format!(
        "delete `{}` and label again into it: retort label",
        dir.display()
    );
    assert!(e.contains("truncated") && e.contains(&here), "{e}");
    let mut flipped = bytes.clone();
    flipped[20] ^= 0x40;
    fs_err::write(&shard, &flipped).unwrap();
    let e = Reader::open(&dir, false).unwrap_err().to_string();
    assert!(e.contains("checksum") && e.contains(&here), "{e}");
    fs_err::write(&shard, &bytes).unwrap();
    assert_eq!(prep(), "");
    // A max_len other than the cache's: samples are missing, and the hint says why.
    let e = prepare(
        Recipe::load(&cache_only, &["train.max_len=12".into()]).unwrap(),
        &Device::Cpu,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.contains("not in logit cache") && e.contains("max_len 24"),
        "{e}"
    );
}

/// `dst`: the format-2 cache `src` rewritten as retort wrote format 1 (no label log-probs, no
/// turns, no tokenizer files, a manifest without the new fields).
fn as_format_1(src: &Path, dst: &Path) {
    use retort_distill::cache::codec;
    use retort_distill::cache::shard::{Entry, ShardBuilder};
    let r = Reader::open(src, false).unwrap();
    let mut m = r.manifest.clone();
    fs_err::create_dir_all(dst).unwrap();
    for (si, s) in m.shards.iter_mut().enumerate() {
        let mut b = ShardBuilder::default();
        for (e, t) in r.shard_entries(si).unwrap() {
            let (block, raw_len) =
                codec::encode(&t, m.encoding.codec, m.teacher.vocab_size, 1).unwrap();
            b.push(
                Entry {
                    raw_len: raw_len as u32,
                    ..e
                },
                &block,
            );
        }
        let bytes = b.finish();
        fs_err::write(dst.join(&s.file), &bytes).unwrap();
        s.bytes = bytes.len() as u64;
        s.sha256 = retort_data::files::sha256_hex(&bytes);
    }
    m.format_version = 1;
    let mut json = serde_json::to_value(&m).unwrap();
    let o = json.as_object_mut().unwrap();
    assert!(o.remove("tokenizer").is_some() && o.remove("offsets").is_some());
    fs_err::write(
        dst.join("manifest.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}

/// Caches written before format 2 keep loading: same-tokenizer training from a format-1 copy
/// equals training from the format-2 original, and resuming a format-1 cache with this retort
/// is refused (its blocks would mix formats).
#[test]
fn format_1_caches_keep_loading() {
    let fx = fixture();
    let m = label_ok(&opts(&fx, "v2", 8, Codec::Q8));
    assert_eq!(m.format_version, 2);
    assert!(fx.root.join("v2/tokenizer/tokenizer.json").exists());
    let v1 = fx.root.join("v1");
    as_format_1(&fx.root.join("v2"), &v1);
    let old = Reader::open(&v1, false).unwrap();
    assert_eq!(old.manifest.format_version, 1);
    assert!(!old.manifest.serves_any_tokenizer());
    let e = old.teacher_tokenizer().unwrap_err().to_string();
    assert!(e.contains("format 1") && e.contains("retort label"), "{e}");
    let t = format!("path = \"{}\"", fx.teacher.display());
    let runs: Vec<Vec<serde_json::Value>> = ["v2", "v1"]
        .iter()
        .map(|c| {
            let r = recipe(
                &fx,
                &format!("{t}\ncache = \"{}\"", fx.root.join(c).display()),
                "num_layers = 2",
                &format!("{c}.toml"),
            );
            train_records(&r, &fx.root.join(format!("run-{c}")))
        })
        .collect();
    assert_eq!(runs[0].len(), runs[1].len());
    assert!(
        runs[1]
            .iter()
            .any(|r| r["kind"] == "train" && r["kd"].as_f64().is_some())
    );
    for (x, y) in runs[0].iter().zip(&runs[1]) {
        for f in ["loss", "kd", "grad_norm"] {
            assert_eq!(x[f], y[f], "{f}");
        }
    }
    let mut resume = opts(&fx, "v1", 8, Codec::Q8);
    resume.out = v1;
    let e = label(&resume, &AtomicBool::new(false), &mut SilentLabel)
        .unwrap_err()
        .to_string();
    assert!(e.contains("format_version differs"), "{e}");
}
