//! `retort serve` against retort's own HTTP client: the probe, chat completions equal to the
//! local backend's, SSE streaming equal to the whole answer, `prompt_logprobs` equal to the
//! model's log-softmax, and the API key.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use candle_core::{D, Device, IndexOp, Tensor};
use retort_data::Message;
use retort_model::{Arch, WeightFormat, checkpoint};
use retort_server::{ServeOptions, serve};
use retort_teacher::openai::CompletionResponse;
use retort_teacher::{GenRequest, HttpConfig, HttpTeacher, LocalTeacher, Sampling, Teacher};
use retort_test::{tiny_config, write_chat_data, write_tiny_model};

fn start(model: &Path, api_key: Option<&str>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = ServeOptions {
        device: candle_core::Device::Cpu,
        model: model.to_path_buf(),
        name: Some("tiny".into()),
        host: "127.0.0.1".into(),
        port: 0,
        weights: WeightFormat::F32,
        max_batch: 16,
        max_queue: 64,
        kv_cache_memory: 64 << 20,
        prefill_chunk: 256,
        api_key: api_key.map(str::to_string),
    };
    std::thread::spawn(move || serve(opts, |addr| tx.send(addr).unwrap()).unwrap());
    rx.recv().unwrap()
}

fn requests() -> Vec<GenRequest> {
    ["hello world", "why is the sky blue ?", "the stock market"]
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            messages: vec![Message::user(*p)],
            sampling: Sampling {
                max_tokens: 10,
                temperature: 0.9,
                top_p: 0.95,
                seed: 40 + i as u64,
                n: 2,
                ..Default::default()
            },
            prefill: (i == 2).then(|| "yes the".to_string()),
        })
        .collect()
}

#[test]
fn served_answers_equal_the_local_backend_and_streaming_equals_whole() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), &tiny_config(Arch::Llama), 3);
    let addr = start(&model, None);
    let url = format!("http://{addr}/v1");
    let http = HttpTeacher::connect(HttpConfig::new(&url)).unwrap();
    let caps = http.capabilities();
    assert_eq!(caps.models, ["tiny"]);
    assert!(caps.n && caps.logprobs, "{caps:?}");

    let local =
        LocalTeacher::load(&model, WeightFormat::F32, 1, &candle_core::Device::Cpu).unwrap();
    let reqs = requests();
    let mut via_http = vec![None; reqs.len()];
    http.generate(&reqs, &mut |i, o| via_http[i] = Some(o.unwrap()));
    let mut via_local = vec![None; reqs.len()];
    local.generate(&reqs, &mut |i, o| via_local[i] = Some(o.unwrap()));
    for (i, (h, l)) in via_http.iter().zip(&via_local).enumerate() {
        let (h, l) = (h.as_ref().unwrap(), l.as_ref().unwrap());
        assert_eq!(h.len(), 2);
        let texts = |g: &Vec<retort_teacher::Generation>| {
            g.iter()
                .map(|g| (g.text.clone(), g.finish))
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(h), texts(l), "request {i}");
    }

    // Streaming: the deltas of each choice add up to the whole answer.
    let body = serde_json::json!({
        "model": "tiny", "messages": [{"role": "user", "content": "hello world"}],
        "n": 2, "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 40, "stream": true,
    });
    let text = ureq::post(&format!("{url}/chat/completions"))
        .send_json(&body)
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let mut streamed = [String::new(), String::new()];
    let mut finishes = 0;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let c = &v["choices"][0];
        if let Some(s) = c["delta"]["content"].as_str() {
            streamed[c["index"].as_u64().unwrap() as usize].push_str(s);
        }
        finishes += usize::from(c["finish_reason"].is_string());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert_eq!(finishes, 2);
    let whole = via_http[0].as_ref().unwrap();
    assert_eq!(streamed[0], whole[0].text);
    assert_eq!(streamed[1], whole[1].text);
}

#[test]
fn prompt_logprobs_are_the_models_log_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), &tiny_config(Arch::Llama), 4);
    let addr = start(&model, None);
    let ids: Vec<u32> = vec![1, 5, 6, 7, 8, 2, 9];
    let body =
        serde_json::json!({"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 3});
    let resp: CompletionResponse = ureq::post(&format!("http://{addr}/v1/completions"))
        .send_json(&body)
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let rows = resp.choices[0].prompt_logprobs.clone().unwrap();
    assert_eq!(rows.len(), ids.len());
    assert!(rows[0].is_none());
    let (m, _) = checkpoint::load(&model, WeightFormat::F32, &Device::Cpu).unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&m.logits(&x).unwrap().i(0).unwrap(), D::Minus1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for p in 1..ids.len() {
        let row = rows[p].as_ref().unwrap();
        let want = &logp[p - 1];
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|a, b| want[*b].total_cmp(&want[*a]));
        for (r, &id) in order.iter().take(3).enumerate() {
            let e = &row[&id.to_string()];
            assert!((e.logprob - want[id]).abs() < 1e-5, "position {p}");
            assert_eq!(e.rank, Some(r + 1));
        }
        // The prompt's own token is always there, with its true rank.
        let own = &row[&ids[p].to_string()];
        assert!((own.logprob - want[ids[p] as usize]).abs() < 1e-5);
        assert_eq!(
            own.rank,
            Some(1 + order.iter().position(|&i| i == ids[p] as usize).unwrap())
        );
        assert!(row.len() == 3 || row.len() == 4);
    }
}

#[test]
fn an_api_key_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), &tiny_config(Arch::Llama), 5);
    let addr = start(&model, Some("s3cret"));
    let url = format!("http://{addr}/v1");
    let status = ureq::get(&format!("{url}/models"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 401);
    let err = HttpTeacher::connect(HttpConfig::new(&url))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("401"), "{err}");
    let ok = HttpTeacher::connect(HttpConfig {
        api_key: Some("s3cret".into()),
        ..HttpConfig::new(&url)
    })
    .unwrap();
    assert_eq!(ok.capabilities().models, ["tiny"]);
}

#[test]
fn labelling_over_http_writes_the_cache_local_labelling_writes() {
    use retort_distill::cache::label::{LabelOptions, Silent, label, label_with};
    use retort_distill::cache::{Codec, Reader};
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), &tiny_config(Arch::Llama), 6);
    let data = dir.path().join("chat.jsonl");
    write_chat_data(&data, 20);
    let addr = start(&model, None);
    let opts = |out: &str| LabelOptions {
        device: candle_core::Device::Cpu,
        teacher: model.clone(),
        data: data.clone(),
        read: Default::default(),
        out: dir.path().join(out),
        k: 8,
        temperature: 1.0,
        min_prob: 0.0,
        codec: Codec::F32,
        max_len: 64,
        truncation: retort_distill::batch::Truncation::Right,
        batch_size: 4,
        shard_samples: 7,
        chunk_rows: 64,
        matmul: Default::default(),
        command: "test".into(),
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let local = label(&opts("local"), &stop, &mut Silent).unwrap();
    let (_, tok) = checkpoint::load(&model, WeightFormat::F32, &Device::Cpu).unwrap();
    let scorer = retort_teacher::remote_label::RemoteScorer::connect(
        HttpConfig::new(format!("http://{addr}/v1")),
        tok.vocab_size(),
        8,
    )
    .unwrap();
    let remote = label_with(&opts("remote"), &scorer, &tok, &stop, &mut Silent).unwrap();
    assert!(local.manifest.complete && remote.manifest.complete);
    assert_eq!(remote.manifest.positions(), local.manifest.positions());
    assert!(
        remote
            .manifest
            .teacher
            .sha256
            .starts_with("remote:tiny@http://")
    );
    let (a, b) = (
        Reader::open(&dir.path().join("local"), false).unwrap(),
        Reader::open(&dir.path().join("remote"), false).unwrap(),
    );
    let mut rows = 0;
    for si in 0..a.manifest.shards.len() {
        for (e, ta) in a.shard_entries(si).unwrap() {
            let tb = b.get(&e.key).unwrap().expect("every sample in both caches");
            assert_eq!(ta.positions, tb.positions);
            assert_eq!(ta.ids, tb.ids, "same top-k ids in the same order");
            for (x, y) in ta.logp.iter().zip(&tb.logp) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
            for (x, y) in ta.log_tail.iter().zip(&tb.log_tail) {
                // The server's tail is 1 − Σ top-k (f64 from f32 log-probs): close, not exact.
                assert!((x.exp() - y.exp()).abs() < 1e-5, "tail {x} vs {y}");
            }
            // Format 2 from a server too: the answer tokens' own log-probs (the server returns
            // the prompt token beside the top-k, in it or not) and the teacher's turn offsets.
            assert_eq!(ta.label_logp.len(), ta.rows());
            for (x, y) in ta.label_logp.iter().zip(&tb.label_logp) {
                assert!((x - y).abs() < 1e-5, "label {x} vs {y}");
            }
            assert!(ta.turns.as_ref().is_some_and(|t| !t.is_empty()));
            assert_eq!(ta.turns, tb.turns);
            rows += ta.rows();
        }
    }
    assert_eq!(rows, local.manifest.positions());
    let c = retort_distill::cache::recode::compare(&a, &b).unwrap();
    assert!(c.mean_kl < 1e-6 && c.top1_agreement == 1.0, "{c:?}");
    // The remote cache serves a student of another tokenizer as the local one does: it holds
    // the tokenizer given for the server (`--tokenizer`).
    assert!(b.manifest.serves_any_tokenizer());
    assert_eq!(
        b.teacher_tokenizer().unwrap().fingerprint(),
        tok.fingerprint()
    );
}

/// An on-policy stage graded by `retort serve` (top-k and the sampled tokens' log-probs through
/// `prompt_logprobs`) trains as the same stage graded by the teacher in-process.
#[test]
fn an_on_policy_round_graded_by_a_server_equals_the_local_one() {
    use retort_distill::onpolicy::RoundFile;
    use retort_distill::recipe::Recipe;
    use retort_distill::trainer::{Outcome, RunOptions, Silent, run};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.num_hidden_layers = 3;
    let teacher = write_tiny_model(&dir.path().join("t"), &cfg, 6);
    cfg.num_hidden_layers = 2;
    let student = write_tiny_model(&dir.path().join("s"), &cfg, 7);
    write_chat_data(&dir.path().join("chat.jsonl"), 16);
    let addr = start(&teacher, None);
    let recipe = |name: &str, teacher_line: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "[teacher]\n{teacher_line}\n[student]\npath = \"{}\"\n[train]\nbatch_size = 2\n\
             grad_accum = 2\nmax_len = 40\neval_fraction = 0.0\n[[stages]]\nname = \"op\"\n\
             data = \"chat.jsonl\"\nmethod = \"on_policy\"\nmax_steps = 4\nlr = 0.01\n\
             [stages.on_policy]\nupdates_per_round = 2\nsamples_per_round = 6\nmax_new_tokens = 6\ntop_k = 8\n",
            student.display()
        );
        fs_err::write(&p, text).unwrap();
        p
    };
    let local = recipe("local", &format!("path = \"{}\"", teacher.display()));
    let remote = recipe("remote", &format!("url = \"http://{addr}/v1\""));
    let train = |recipe: &Path, out: &str| {
        let mut plan =
            retort_distill::setup::prepare(Recipe::load(recipe, &[]).unwrap(), &Device::Cpu)
                .unwrap();
        // `retort train`'s and `retort experiment`'s own step: [teacher] url → the grader.
        retort_teacher::remote_label::attach_server(&mut plan).unwrap();
        assert_eq!(plan.scorer.is_some(), recipe.ends_with("remote.toml"));
        let opts = RunOptions {
            out: dir.path().join(out),
            ..Default::default()
        };
        assert!(matches!(
            run(&plan, &opts, &mut Silent).unwrap(),
            Outcome::Finished(_)
        ));
        let lines = fs_err::read_to_string(dir.path().join(out).join("metrics.jsonl")).unwrap();
        let records: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let rounds: Vec<RoundFile> = (0..2)
            .map(|r| {
                let p = retort_distill::onpolicy::round_path(&dir.path().join(out), 0, r);
                let mut f: RoundFile =
                    serde_json::from_str(&fs_err::read_to_string(p).unwrap()).unwrap();
                f.seconds_sampling = 0.0;
                f.recipe_sha256.clear(); // the recipes differ in their [teacher]
                f
            })
            .collect();
        (records, rounds)
    };
    let (a, ra) = train(&local, "local");
    let (b, rb) = train(&remote, "remote");
    // The student wrote the same answers (its sampling does not depend on the grader) …
    // (Round 0 bit for bit; round 1 from weights trained on grades that differ in the last
    // float bits, so its log-probs may too.)
    assert!(ra[0] == rb[0], "round 0 differs");
    for (s, t) in ra[1].samples.iter().zip(&rb[1].samples) {
        assert_eq!((&s.ids, &s.text, &s.finish), (&t.ids, &t.text, &t.finish));
        for (p, q) in s
            .logp
            .iter()
            .zip(&t.logp)
            .chain(s.entropy.iter().zip(&t.entropy))
        {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    }
    assert!(ra.iter().all(|r| r.samples.iter().all(|s| s.student)));
    // … and the teacher graded them alike, so every step and round record agrees.
    assert_eq!(a.len(), b.len());
    let mut compared = 0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["kind"], y["kind"]);
        for key in ["loss", "ce", "kd", "grad_norm", "teacher_nll", "reverse_kl"] {
            if let (Some(p), Some(q)) = (x[key].as_f64(), y[key].as_f64()) {
                assert!(
                    (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                    "{key}: {p} (local) vs {q} (server)"
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 4 * 4 + 2 * 2, "{compared} values compared");
}
