//! Cross-tokenizer KD end to end: a teacher whose vocabulary is the student's in another order
//! (same strings, permuted ids; its embedding rows permuted to match, so it computes the same
//! distributions over strings) trained with `cross_tokenizer = "gold"` and the teacher's full
//! vocabulary as top-k gives the run of same-tokenizer KD from the original teacher: every
//! token aligns one to one, every teacher token maps to a student token, and GOLD with all
//! tokens matched is the same-tokenizer loss. And the recipe checks around it.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use retort_data::ReadOptions;
use retort_distill::batch::Truncation;
use retort_distill::cache::label::{LabelOptions, Silent as SilentLabel, label};
use retort_distill::cache::{Codec, Manifest, Reader};
use retort_distill::recipe::Recipe;
use retort_distill::setup::prepare;
use retort_distill::trainer::{RunOptions, Silent, run};
use retort_model::Arch;
use retort_test::{SPECIALS, WORDS, tiny_config, write_chat_data, write_tiny_model};

/// New id of the tiny vocabulary's id `i`: specials stay, words in reverse order.
fn perm(i: usize) -> usize {
    let s = SPECIALS.len();
    if i < s {
        i
    } else {
        s + WORDS.len() - 1 - (i - s)
    }
}

/// `dir/permuted`: the model at `src` with the tiny tokenizer's word ids reversed.
fn permuted_copy(src: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("permuted");
    fs_err::create_dir_all(&out).unwrap();
    for e in fs_err::read_dir(src).unwrap() {
        let e = e.unwrap();
        fs_err::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.embed_tokens.weight";
    let w = tensors[name].clone();
    let v = w.dim(0).unwrap();
    // new[perm(i)] = old[i]  ⇔  new[j] = old[perm⁻¹(j)] = old[perm(j)] (perm is an involution).
    let idx: Vec<u32> = (0..v).map(|j| perm(j) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
    tensors.insert(name.into(), w.index_select(&idx, 0).unwrap());
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    // The tokenizer: the same strings, permuted ids.
    let tok = retort_test::tiny_tokenizer_with_ids(perm);
    tok.save_hf(&out).unwrap();
    out
}

fn recipe(
    root: &Path,
    name: &str,
    teacher: &Path,
    student: &Path,
    data: &Path,
    extra: &str,
) -> PathBuf {
    let text = format!(
        r#"
[teacher]
path = "{}"
[student]
path = "{}"
[train]
batch_size = 2
grad_accum = 2
max_len = 24
warmup_ratio = 0.1
chunk_rows = 5
[[stages]]
name = "kd"
data = "{}"
method = "kd"
loss = "forward_kl"
alpha = 0.5
temperature = 2.0
epochs = 1
lr = 0.01
{extra}
"#,
        teacher.display(),
        student.display(),
        data.display()
    );
    let p = root.join(name);
    fs_err::write(&p, text).unwrap();
    p
}

fn records(recipe: &Path, out: &Path) -> Vec<serde_json::Value> {
    let plan = prepare(Recipe::load(recipe, &[]).unwrap(), &Device::Cpu).unwrap();
    run(
        &plan,
        &RunOptions {
            out: out.to_path_buf(),
            ..Default::default()
        },
        &mut Silent,
    )
    .unwrap();
    fs_err::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A 3-layer teacher, its permuted-vocabulary copy, a 1-layer student and 10 conversations.
struct Pair {
    dir: tempfile::TempDir,
    teacher: PathBuf,
    student: PathBuf,
    permuted: PathBuf,
    data: PathBuf,
    vocab: usize,
}

impl Pair {
    fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut cfg = tiny_config(Arch::Llama);
        cfg.num_hidden_layers = 3;
        let teacher = write_tiny_model(&root.join("t"), &cfg, 1);
        cfg.num_hidden_layers = 1;
        let student = write_tiny_model(&root.join("s"), &cfg, 9);
        let permuted = permuted_copy(&teacher, root);
        let data = root.join("d.jsonl");
        write_chat_data(&data, 10);
        Pair {
            teacher,
            student,
            permuted,
            data,
            vocab: cfg.vocab_size,
            dir,
        }
    }
}

#[test]
fn gold_from_a_permuted_vocabulary_teacher_trains_as_same_tokenizer_kd() {
    let Pair {
        dir,
        teacher,
        student,
        permuted,
        data,
        vocab: v,
    } = Pair::new();
    let root = dir.path();
    let same = recipe(root, "same.toml", &teacher, &student, &data, "");
    let cross = recipe(
        root,
        "cross.toml",
        &permuted,
        &student,
        &data,
        &format!("cross_tokenizer = \"gold\"\ncross_top_k = {v}"),
    );
    let a = records(&same, &root.join("run-same"));
    let b = records(&cross, &root.join("run-cross"));
    assert_same_runs(&a, &b, 1e-4, "same tokenizer vs cross");
    let steps = a
        .iter()
        .filter(|x| x["kind"] == "train" && x["kd"].as_f64().is_some_and(|k| k > 0.0))
        .count();
    assert!(steps >= 2, "{steps} KD steps");
    // The permuted teacher without cross_tokenizer is refused, naming the option.
    let plain = recipe(root, "plain.toml", &permuted, &student, &data, "");
    let e = prepare(Recipe::load(&plain, &[]).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cross_tokenizer"), "{e}");
    // ULD trains too (no mapping needed) and gives another loss.
    let uld = recipe(
        root,
        "uld.toml",
        &permuted,
        &student,
        &data,
        "cross_tokenizer = \"uld\"",
    );
    let c = records(&uld, &root.join("run-uld"));
    assert!(c.iter().any(
        |r| r["kind"] == "train" && r["kd"].as_f64().is_some_and(|k| k.is_finite() && k > 0.0)
    ));
}

/// Label `data` with `teacher` into `out` (format 2) at temperature 1, max_len 24.
fn label_cache(teacher: &Path, data: &Path, out: &Path, k: usize, codec: Codec) -> Manifest {
    let opts = LabelOptions {
        device: Device::Cpu,
        teacher: teacher.to_path_buf(),
        data: data.to_path_buf(),
        read: ReadOptions::default(),
        out: out.to_path_buf(),
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
        command: format!("retort label --out {}", out.display()),
    };
    let r = label(&opts, &AtomicBool::new(false), &mut SilentLabel).unwrap();
    assert!(r.manifest.complete);
    r.manifest
}

/// The recipe at `p` with its `[teacher] path = …` line replaced by `with`.
fn swap_teacher(p: &Path, teacher: &Path, with: &str, name: &str) -> PathBuf {
    let text = fs_err::read_to_string(p)
        .unwrap()
        .replace(&format!("path = \"{}\"", teacher.display()), with);
    let out = p.with_file_name(name);
    fs_err::write(&out, text).unwrap();
    out
}

fn assert_same_runs(a: &[serde_json::Value], b: &[serde_json::Value], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["kind"], y["kind"]);
        for f in ["loss", "ce", "kd", "grad_norm", "nll"] {
            assert_eq!(
                x[f].is_null(),
                y[f].is_null(),
                "{what}: {f} in one run only"
            );
            if let (Some(u), Some(w)) = (x[f].as_f64(), y[f].as_f64()) {
                assert!(
                    (u - w).abs() <= tol * u.abs().max(1.0),
                    "{what}: {} {f}: {u} vs {w}",
                    x["kind"]
                );
            }
        }
    }
}

/// One labelling serves a student of another tokenizer: GOLD from a format-2 cache of the
/// permuted-vocabulary teacher (labelled at T = 1, trained at T = 2, so the stored top-k and
/// label log-probs are re-tempered) trains as GOLD with the teacher live, step by step; the
/// guards around it refuse with hints.
#[test]
fn gold_from_a_cache_trains_as_gold_online() {
    let Pair {
        dir,
        student,
        permuted,
        data,
        vocab: v,
        ..
    } = Pair::new();
    let root = dir.path();
    let online = recipe(
        root,
        "online.toml",
        &permuted,
        &student,
        &data,
        &format!("cross_tokenizer = \"gold\"\ncross_top_k = {v}"),
    );
    let cache = root.join("cache");
    let m = label_cache(&permuted, &data, &cache, v, Codec::F32);
    // The manifest says which tokenizer the positions belong to, and the cache holds it.
    assert_eq!(m.format_version, 2);
    assert!(m.serves_any_tokenizer(), "{m:?}");
    let stored = Reader::open(&cache, false)
        .unwrap()
        .teacher_tokenizer()
        .unwrap();
    assert_eq!(
        stored.fingerprint(),
        retort_test::tiny_tokenizer_with_ids(perm).fingerprint()
    );
    assert_ne!(
        stored.fingerprint(),
        retort_test::tiny_tokenizer_with_ids(|i| i).fingerprint()
    );
    let cache_line = format!("cache = \"{}\"", cache.display());
    let only = swap_teacher(&online, &permuted, &cache_line, "cached.toml");
    let a = records(&online, &root.join("run-online"));
    let b = records(&only, &root.join("run-cached"));
    assert!(
        a.iter()
            .any(|r| r["kind"] == "train" && r["kd"].as_f64().is_some_and(|k| k > 0.0))
    );
    assert_same_runs(&a, &b, 1e-4, "cache (f32) vs online");
    // The compact codec: log-probs rounded to 1/16 nat, label log-probs to f16.
    let q8 = root.join("cache-q8");
    label_cache(&permuted, &data, &q8, v, Codec::Q8);
    let q8_line = format!("cache = \"{}\"", q8.display());
    let c = records(
        &swap_teacher(&online, &permuted, &q8_line, "q8.toml"),
        &root.join("run-q8"),
    );
    assert_same_runs(&a, &c, 2e-2, "cache (q8) vs online");

    // A same-tokenizer KD stage on this cache is refused, naming the option.
    let plain = recipe(root, "plain.toml", &permuted, &student, &data, "");
    let plain = swap_teacher(&plain, &permuted, &cache_line, "plain-cached.toml");
    let e = prepare(Recipe::load(&plain, &[]).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cross_tokenizer"), "{e}");
    // A format-1 cache stores no offsets: refused with the relabel command.
    let manifest = cache.join("manifest.json");
    let text = fs_err::read_to_string(&manifest).unwrap();
    fs_err::write(
        &manifest,
        text.replace("\"format_version\": 2", "\"format_version\": 1"),
    )
    .unwrap();
    let e = prepare(Recipe::load(&only, &[]).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("format 1") && e.contains("retort label"), "{e}");
    // The tokenizer files replaced by another tokenizer's: refused.
    fs_err::write(&manifest, &text).unwrap();
    retort_test::tiny_tokenizer_with_ids(|i| i)
        .save_hf(&cache.join("tokenizer"))
        .unwrap();
    let e = prepare(Recipe::load(&only, &[]).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not the tokenizer"), "{e}");
}

#[test]
fn cross_tokenizer_needs_a_kd_stage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny_config(Arch::Llama);
    let teacher = write_tiny_model(&root.join("t"), &cfg, 1);
    let data = root.join("d.jsonl");
    write_chat_data(&data, 4);
    let p = recipe(
        root,
        "r.toml",
        &teacher,
        &teacher,
        &data,
        "cross_tokenizer = \"uld\"\ncross_top_k = 0",
    );
    let e = Recipe::load(&p, &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("cross_top_k"), "{e}");
    let p = recipe(
        root,
        "r.toml",
        &teacher,
        &teacher,
        &data,
        "cross_tokenizer = \"gold\"",
    );
    let text = fs_err::read_to_string(&p)
        .unwrap()
        .replace("method = \"kd\"", "method = \"sft\"");
    fs_err::write(&p, text).unwrap();
    let e = Recipe::load(&p, &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("not \"kd\""), "{e}");
}
