//! `retort serve` under hostile and heavy clients: every bad request gets OpenAI's JSON error
//! shape with the right status and a normal request right after still completes; a short
//! request is answered within a few decoding steps while a long one runs; a client that goes
//! away (streamed or not) frees its rows; a full server answers 503 with `Retry-After`; the
//! key/value caches stay within their budget and the process's memory stays bounded.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use retort_model::{Arch, WeightFormat};
use retort_server::{ServeOptions, serve};
use retort_test::{tiny_config, write_tiny_model};

/// Context of the test model: long enough for a 2000-token answer.
const CONTEXT: usize = 4096;
/// Key/value cache budget: tiny rows take 128 bytes a position, so 4 MiB is 8 rows of 4096.
const BUDGET: u64 = 4 << 20;

fn start(model: &Path) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = ServeOptions {
        device: candle_core::Device::Cpu,
        model: model.to_path_buf(),
        name: Some("tiny".into()),
        host: "127.0.0.1".into(),
        port: 0,
        weights: WeightFormat::F32,
        max_batch: 4,
        max_queue: 4,
        kv_cache_memory: BUDGET,
        prefill_chunk: 64,
        api_key: None,
    };
    std::thread::spawn(move || serve(opts, |addr| tx.send(addr).unwrap()).unwrap());
    rx.recv().unwrap()
}

fn model(dir: &Path) -> std::path::PathBuf {
    let mut cfg = tiny_config(Arch::Llama);
    cfg.max_position_embeddings = CONTEXT;
    write_tiny_model(dir, &cfg, 11)
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// Send one request over a fresh connection (`Connection: close`) and read the whole reply.
fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Chunked bodies (SSE): keep the data lines only, which is all the tests read.
    Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// Open a request and leave it running: returns the connection, read up to the first SSE data
/// line for streams, or nothing read for plain requests.
fn open(addr: SocketAddr, path: &str, body: &str, stream: bool) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    if stream {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "stream closed early");
            if line.starts_with("data: ") && line.contains("\"content\"") {
                break;
            }
        }
    }
    r
}

/// `/metrics` as name → value.
fn metrics(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    let r = send(addr, "GET", "/metrics", "");
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Wait until `pred(metrics)` holds, at most `secs`.
fn until(
    addr: SocketAddr,
    secs: u64,
    what: &str,
    pred: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
) {
    let t0 = Instant::now();
    loop {
        let m = metrics(addr);
        if pred(&m) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what} did not happen within {secs} s: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_bytes() -> u64 {
    let s = fs_err::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

const OK_CHAT: &str =
    r#"{"model":"tiny","messages":[{"role":"user","content":"hello world"}],"max_tokens":4}"#;

/// A normal request completes, quickly, after whatever came before.
fn healthy(addr: SocketAddr, after: &str) {
    let t0 = Instant::now();
    let r = send(addr, "POST", "/v1/chat/completions", OK_CHAT);
    assert_eq!(r.status, 200, "after {after}: {}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        v["choices"][0]["message"]["content"].is_string(),
        "after {after}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "after {after}: a normal request took {:?}",
        t0.elapsed()
    );
}

#[test]
fn hostile_requests_get_json_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(&model(dir.path()));
    let rss0 = rss_bytes();
    let long_text = "hello world ".repeat(CONTEXT);
    let chat = |extra: &str| {
        format!(r#"{{"model":"tiny","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
    };
    // (case, path, body, status, the error's `param` or a piece of its message)
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "context overflow",
            "/v1/chat/completions",
            chat(r#","max_tokens":100000000"#),
            400,
            "maximum context length is 4096 tokens",
        ),
        (
            "huge max_tokens x n",
            "/v1/chat/completions",
            chat(r#","max_tokens":2000000,"n":16"#),
            400,
            "maximum context length",
        ),
        (
            "over-long prompt",
            "/v1/chat/completions",
            format!(r#"{{"messages":[{{"role":"user","content":"{long_text}"}}]}}"#),
            400,
            "maximum context length",
        ),
        (
            "n too large",
            "/v1/chat/completions",
            chat(r#","n":17"#),
            400,
            "n",
        ),
        (
            "n negative",
            "/v1/chat/completions",
            chat(r#","n":-1"#),
            400,
            "n",
        ),
        (
            "n zero",
            "/v1/chat/completions",
            chat(r#","n":0"#),
            400,
            "n",
        ),
        (
            "max_tokens zero",
            "/v1/chat/completions",
            chat(r#","max_tokens":0"#),
            400,
            "max_tokens",
        ),
        (
            "temperature negative",
            "/v1/chat/completions",
            chat(r#","temperature":-1"#),
            400,
            "temperature",
        ),
        (
            "top_p negative",
            "/v1/chat/completions",
            chat(r#","top_p":-5"#),
            400,
            "top_p",
        ),
        (
            "top_p zero",
            "/v1/chat/completions",
            chat(r#","top_p":0"#),
            400,
            "top_p",
        ),
        (
            "top_p above one",
            "/v1/chat/completions",
            chat(r#","top_p":1.5"#),
            400,
            "top_p",
        ),
        (
            "repetition_penalty zero",
            "/v1/chat/completions",
            chat(r#","repetition_penalty":0"#),
            400,
            "repetition_penalty",
        ),
        (
            "repetition_penalty negative",
            "/v1/chat/completions",
            chat(r#","repetition_penalty":-1"#),
            400,
            "repetition_penalty",
        ),
        (
            "top_logprobs huge",
            "/v1/chat/completions",
            chat(r#","logprobs":true,"top_logprobs":100000000"#),
            400,
            "top_logprobs",
        ),
        (
            "top_logprobs without logprobs",
            "/v1/chat/completions",
            chat(r#","top_logprobs":3"#),
            400,
            "top_logprobs",
        ),
        (
            "empty stop string",
            "/v1/chat/completions",
            chat(r#","stop":[""]"#),
            400,
            "stop",
        ),
        (
            "no messages",
            "/v1/chat/completions",
            r#"{"messages":[]}"#.into(),
            400,
            "messages",
        ),
        (
            "content null",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":null}]}"#.into(),
            400,
            "messages[0].content",
        ),
        (
            "unknown role",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"robot","content":"x"}]}"#.into(),
            400,
            "messages[0].role",
        ),
        (
            "messages missing",
            "/v1/chat/completions",
            "{}".into(),
            400,
            "messages",
        ),
        (
            "malformed JSON",
            "/v1/chat/completions",
            "{\"messages\": [".into(),
            400,
            "invalid request body",
        ),
        (
            "not JSON",
            "/v1/chat/completions",
            "hello".into(),
            400,
            "invalid request body",
        ),
        (
            "JSON array",
            "/v1/chat/completions",
            "[]".into(),
            400,
            "invalid request body",
        ),
        (
            "wrong type",
            "/v1/chat/completions",
            chat(r#","temperature":"hot""#),
            400,
            "temperature",
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
            "model",
        ),
        (
            "empty completion prompt",
            "/v1/completions",
            r#"{"prompt":""}"#.into(),
            400,
            "prompt",
        ),
        (
            "empty id prompt",
            "/v1/completions",
            r#"{"prompt":[]}"#.into(),
            400,
            "prompt",
        ),
        (
            "id outside vocabulary",
            "/v1/completions",
            r#"{"prompt":[1,1000000000]}"#.into(),
            400,
            "prompt",
        ),
        (
            "prompt_logprobs zero",
            "/v1/completions",
            r#"{"prompt":[1,5,6],"prompt_logprobs":0}"#.into(),
            400,
            "prompt_logprobs",
        ),
        (
            "completion logprobs huge",
            "/v1/completions",
            r#"{"prompt":"hello","logprobs":1000}"#.into(),
            400,
            "logprobs",
        ),
        (
            "completion context overflow",
            "/v1/completions",
            r#"{"prompt":"hello","max_tokens":100000000}"#.into(),
            400,
            "maximum context length",
        ),
        (
            "prompt_logprobs too many entries",
            "/v1/completions",
            format!(
                r#"{{"prompt":"{}","prompt_logprobs":1024}}"#,
                "hello world ".repeat(1100)
            ),
            400,
            "prompt_logprobs",
        ),
        (
            "unknown route",
            "/v1/embeddings",
            "{}".into(),
            404,
            "no route",
        ),
    ];
    let mut peak_rss = rss0;
    for (case, path, body, status, expect) in &cases {
        let r = send(addr, "POST", path, body);
        assert_eq!(r.status, *status, "{case}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {}", r.body));
        let err = &v["error"];
        let message = err["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{case}: {v}"));
        assert!(
            err["type"].is_string() && err["code"].is_number(),
            "{case}: {v}"
        );
        let param = err["param"].as_str().unwrap_or("");
        assert!(
            param == *expect || message.contains(expect),
            "{case}: wanted `{expect}` in param or message: {v}"
        );
        assert!(
            r.headers.contains("application/json"),
            "{case}: {}",
            r.headers
        );
        healthy(addr, case);
        peak_rss = peak_rss.max(rss_bytes());
    }
    let m = metrics(addr);
    assert_eq!(m["retort_rows_in_flight"], 0.0, "{m:?}");
    assert!(m["retort_kv_cache_peak_bytes"] <= BUDGET as f64, "{m:?}");
    assert_eq!(m["retort_context_tokens"], CONTEXT as f64);
    // The test process holds the tiny model, the test harness and the server: nothing a hostile
    // request did may have grown it by more than a few tens of MB.
    let grown = peak_rss.saturating_sub(rss0);
    eprintln!("RSS {} MB → peak {} MB", rss0 >> 20, peak_rss >> 20);
    assert!(grown < 200 << 20, "RSS grew by {} MB", grown >> 20);
}

const LONG: &str = r#"{"model":"tiny","messages":[{"role":"user","content":"the stock market"}],"max_tokens":2000,"ignore_eos":true,"temperature":0.8,"seed":1"#;

#[test]
fn a_short_request_finishes_within_a_few_steps_beside_a_long_one() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(&model(dir.path()));
    let mut long = open(
        addr,
        "/v1/chat/completions",
        &format!("{LONG},\"stream\":true}}"),
        true,
    );
    let before = metrics(addr);
    let r = send(
        addr,
        "POST",
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"ignore_eos":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let m = metrics(addr);
    // The decoding steps the short request spent in the model thread, from its arrival to its
    // answer (HTTP round trips excluded: a tiny model decodes a step in well under 1 ms).
    let d = |k: &str| m[k] - before[k];
    assert_eq!(d("retort_request_decode_steps_count"), 1.0, "{m:?}");
    let steps = d("retort_request_decode_steps_sum");
    eprintln!(
        "the 1-token request waited {steps} decoding steps beside a 2000-token one ({} steps \
         passed in all, HTTP included)",
        d("retort_decode_steps_total")
    );
    assert!(steps <= 2.0, "{steps} steps: {m:?}");
    assert_eq!(
        m["retort_requests_running"], 1.0,
        "the long request runs on: {m:?}"
    );
    // The long request then finishes with all its tokens.
    let mut rest = String::new();
    long.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("\"finish_reason\":\"length\""),
        "{}",
        &rest[rest.len().saturating_sub(400)..]
    );
    assert!(rest.contains("data: [DONE]"));
    let m = metrics(addr);
    assert!(m["retort_generation_tokens_total"] >= 2001.0, "{m:?}");
    assert_eq!(m["retort_rows_in_flight"], 0.0, "{m:?}");
}

#[test]
fn clients_that_go_away_free_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(&model(dir.path()));
    // Mid-stream: read the first token, then hang up.
    let conn = open(
        addr,
        "/v1/chat/completions",
        &format!("{LONG},\"stream\":true}}"),
        true,
    );
    until(addr, 5, "the stream running", |m| {
        m["retort_requests_running"] == 1.0
    });
    drop(conn);
    until(addr, 5, "the stream's cancellation", |m| {
        m["retort_requests_cancelled_total"] == 1.0
            && m["retort_requests_running"] == 0.0
            && m["retort_rows_in_flight"] == 0.0
    });
    // Mid-request: a plain request, hung up while it decodes.
    let conn = open(addr, "/v1/chat/completions", &format!("{LONG}}}"), false);
    until(addr, 5, "the request running", |m| {
        m["retort_requests_running"] == 1.0
    });
    conn.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    until(addr, 5, "the request's cancellation", |m| {
        m["retort_requests_cancelled_total"] == 2.0 && m["retort_rows_in_flight"] == 0.0
    });
    // Nothing decodes once both are gone.
    let s = metrics(addr)["retort_decode_steps_total"];
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metrics(addr)["retort_decode_steps_total"], s);
    healthy(addr, "two cancellations");
}

#[test]
fn a_full_server_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(&model(dir.path()));
    // 4 rows decode and 4 wait: two requests of n = 4 fill the server.
    let body = format!("{LONG},\"n\":4,\"stream\":true}}");
    let a = open(addr, "/v1/chat/completions", &body, true);
    let b = open(
        addr,
        "/v1/chat/completions",
        &format!("{LONG},\"n\":4}}"),
        false,
    );
    until(addr, 5, "eight rows in flight", |m| {
        m["retort_rows_in_flight"] == 8.0
    });
    let r = send(addr, "POST", "/v1/chat/completions", OK_CHAT);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains("retry-after: 1"), "{}", r.headers);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("capacity"));
    let m = metrics(addr);
    assert!(m["retort_kv_cache_peak_bytes"] <= BUDGET as f64, "{m:?}");
    drop(a);
    b.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    drop(b);
    until(addr, 10, "the rows freed", |m| {
        m["retort_rows_in_flight"] == 0.0
    });
    healthy(addr, "a full server");
}

#[test]
fn the_context_end_is_a_normal_finish_streamed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(&model(dir.path()));
    // No max_tokens: the rest of the context.
    let body = r#"{"messages":[{"role":"user","content":"hello"}],"ignore_eos":true"#;
    let r = send(addr, "POST", "/v1/chat/completions", &format!("{body}}}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        CONTEXT as u64,
        "prompt + completion fill the context: {u}"
    );
    let r = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &format!(r#"{body},"stream":true,"stream_options":{{"include_usage":true}}}}"#),
    );
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"finish_reason\":\"length\""));
    assert!(
        r.body.contains(&format!("\"total_tokens\":{CONTEXT}")),
        "usage chunk missing"
    );
}
