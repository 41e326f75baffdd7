//! The HTTP backend and the synth pipeline against a server that fails ~30% of requests on
//! purpose (429 + Retry-After, 500, malformed JSON, past-timeout responses, dropped
//! connections): every item completes, each request is answered and recorded exactly once, and
//! the output equals a run against a clean server.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use retort_teacher::synth::run::{OUTPUT, Quiet};
use retort_teacher::synth::{Pipeline, run};
use retort_teacher::{HttpConfig, HttpTeacher, retry::RetryPolicy};
use retort_test::fake_openai::{FakeConfig, start};

const SEEDS: &str = r#"{"id": "s1", "user_context": "I am a 35-year-old business owner.", "question": "Is Dogcoin a good investment?"}
{"id": "s2", "user_context": "I am 62 and retire in three years.", "question": "Should I move my savings into index funds?"}
{"id": "s3", "user_context": "I am a student with no savings yet.", "question": "Should I invest before I have an emergency fund?"}
"#;

fn pipeline(dir: &Path, url: &str, system: &str) -> Pipeline {
    fs_err::write(dir.join("seeds.jsonl"), SEEDS).unwrap();
    Pipeline::parse(&pipeline_text(url, system), &dir.join("pipeline.toml")).unwrap()
}

fn pipeline_text(url: &str, system: &str) -> String {
    format!(
        r#"
[teacher]
url = "{url}"
[seeds]
path = "seeds.jsonl"
fields = ["user_context", "question"]
labels = ["User context", "Question"]
[expand]
examples_per_prompt = 2
ask_for = 5
requests_per_round = 4
target = 30
[filter]
rouge_l_max = 0.9
[[filter.field]]
name = "question"
ends_with = ["?"]
[answer]
system = "{system}"
template = "User context: {{{{ user_context }}}}\nQuestion: {{{{ question }}}}"
max_tokens = 32
retry_max_tokens = 128
"#
    )
}

fn teacher(url: &str, timeout: Duration) -> HttpTeacher {
    HttpTeacher::connect(HttpConfig {
        concurrency: 4,
        timeout,
        retry: RetryPolicy {
            max_attempts: 30,
            base: Duration::from_millis(10),
            max_wait: Duration::from_secs(2),
        },
        ..HttpConfig::new(url)
    })
    .unwrap()
}

/// The output without provenance (which names the server's URL and so differs between servers).
fn content(dir: &Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    fs_err::read_to_string(dir.join(OUTPUT))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["input"].clone(), v["messages"].clone())
        })
        .collect()
}

fn ledger_counts(dir: &Path) -> (i64, i64, i64) {
    let c = rusqlite::Connection::open(dir.join("ledger.sqlite")).unwrap();
    c.query_row(
        "SELECT COUNT(*), COUNT(DISTINCT key), SUM(status = 'done') FROM requests",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

#[test]
fn a_faulty_server_still_yields_every_item_exactly_once() {
    let stop = AtomicBool::new(false);
    // Reference: a clean server.
    let clean = start(FakeConfig::default());
    let dir_a = tempfile::tempdir().unwrap();
    let pa = pipeline(dir_a.path(), &clean.url, "You advise on stocks.");
    let ra = run(
        &pa,
        &teacher(&clean.url, Duration::from_secs(10)),
        &stop,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(ra.funnel.kept, 30);
    assert_eq!(ra.funnel.answered, 30);
    assert!(
        ra.funnel.regenerated > 0,
        "some answers were cut off and regenerated: {:?}",
        ra.funnel
    );

    // The same pipeline against a server failing 30% of requests.
    let faulty = start(FakeConfig {
        fault_rate: 0.3,
        retry_after: "0.2",
        slow: Duration::from_millis(1500),
        ..FakeConfig::default()
    });
    let dir_b = tempfile::tempdir().unwrap();
    let pb = pipeline(dir_b.path(), &faulty.url, "You advise on stocks.");
    let rb = run(
        &pb,
        &teacher(&faulty.url, Duration::from_millis(500)),
        &stop,
        &mut Quiet,
    )
    .unwrap();
    let s = faulty.stats.lock().unwrap().clone();
    eprintln!(
        "faulty server: {} requests, {} ok, {} 429, {} 500, {} malformed, {} slow, {} dropped",
        s.requests, s.ok, s.rate_limited, s.server_errors, s.malformed, s.slow, s.dropped
    );
    for (what, n) in [
        ("429", s.rate_limited),
        ("500", s.server_errors),
        ("malformed", s.malformed),
        ("slow", s.slow),
        ("dropped", s.dropped),
    ] {
        assert!(n > 0, "the run met no `{what}` fault");
    }
    let faults = s.rate_limited + s.server_errors + s.malformed + s.slow + s.dropped;
    let rate = faults as f64 / (s.requests - 1) as f64; // minus GET /models
    assert!((0.2..0.4).contains(&rate), "fault rate {rate}");
    // Every item completed, with the same content as against the clean server.
    assert_eq!(rb.funnel.answered, 30, "{:?}", rb.funnel);
    assert!(rb.funnel.failed.is_empty(), "{:?}", rb.funnel.failed);
    assert_eq!(content(&rb.dir), content(&ra.dir));
    // Exactly once: each request content got one successful answer from the server, and the
    // ledger holds one done row per request.
    let dup: Vec<_> = s.ok_by_body.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        dup.is_empty(),
        "request bodies answered more than once: {dup:?}"
    );
    let (rows, distinct, done) = ledger_counts(&rb.dir);
    assert_eq!((rows, distinct, done), (rows, rows, rows));
    // the probe's chat request is not in the ledger
    assert_eq!(
        rows as usize,
        s.ok - 1,
        "every successful answer recorded once"
    );
    assert_eq!(ledger_counts(&ra.dir).0, rows);
    // Retry-After honoured: the retry of a 429'd request came no sooner than 0.2 s.
    assert!(!s.retry_gaps.is_empty());
    for g in &s.retry_gaps {
        assert!(
            *g >= Duration::from_millis(195),
            "retried after {g:?} despite Retry-After: 0.2"
        );
    }

    // Run again: everything comes from the ledger, nothing is sent, the output is unchanged.
    let before = fs_err::read(rb.dir.join(OUTPUT)).unwrap();
    let again = run(
        &pb,
        &teacher(&faulty.url, Duration::from_millis(500)),
        &stop,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(again.funnel.sent_this_run, 0);
    assert_eq!(fs_err::read(rb.dir.join(OUTPUT)).unwrap(), before);

    // A changed system prompt re-sends only the answers.
    let pc = pipeline(dir_a.path(), &clean.url, "You are a careful stock advisor.");
    let rc = run(
        &pc,
        &teacher(&clean.url, Duration::from_secs(10)),
        &stop,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(
        rc.funnel.sent_this_run,
        rc.funnel.kept + rc.funnel.regenerated
    );
    assert_eq!(rc.funnel.expand_requests, ra.funnel.expand_requests);
}

#[test]
fn a_client_error_fails_at_once_and_a_dead_server_is_named() {
    // Nothing listens on this port (bound, then dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = HttpTeacher::connect(HttpConfig {
        retry: RetryPolicy {
            max_attempts: 2,
            base: Duration::from_millis(1),
            max_wait: Duration::from_millis(5),
        },
        ..HttpConfig::new(format!("http://127.0.0.1:{port}/v1"))
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("hint:"),
        "{err}"
    );

    let clean = start(FakeConfig::default());
    let err = HttpTeacher::connect(HttpConfig {
        model: Some("gpt-9".into()),
        ..HttpConfig::new(&clean.url)
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("gpt-9") && err.contains("fake"), "{err}");
}

#[test]
fn the_shipped_example_pipelines_read_and_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["stock-advisor", "healthbench", "main-job"] {
        let p = Pipeline::read(&root.join(name).join("pipeline.toml")).unwrap();
        assert!(
            p.teacher.model.is_some() && p.expand.prefill.is_some(),
            "{name}"
        );
        if p.seeds.path.exists() {
            let seeds =
                retort_teacher::synth::run::read_seeds(&p.seeds.path, &p.seeds.fields).unwrap();
            assert_eq!(seeds.len(), 8, "{name}");
        }
    }
    let main = Pipeline::read(&root.join("main-job/pipeline.toml")).unwrap();
    assert!(main.answer.repeat_penalty > 1.0 && main.expand.repeat_penalty > 1.0);
    // A penalty of 0 is refused with the section named.
    let bad = pipeline_text("http://127.0.0.1:9", "s").replace(
        "retry_max_tokens = 128",
        "retry_max_tokens = 128\nrepeat_penalty = 0.0",
    );
    let err = Pipeline::parse(&bad, Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[answer] repeat_penalty"), "{err}");
    // A misspelt key is named.
    let err = Pipeline::parse("[teacher]\nmodle = \"x\"\n", Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("modle") && err.contains("p.toml") && err.contains("hint:"),
        "{err}"
    );
}
