//! A fake OpenAI-compatible server for tests of the HTTP backend and the synth pipeline: plain
//! `std::net`, one thread per connection, keep-alive, and faults injected on purpose.
//!
//! Answers are a pure function of the request body, so a run against a faulty server must end
//! with exactly the output of a run against a clean one:
//! - a chat request whose last user message contains `Write N new` gets N records
//!   `User context: …\nQuestion: …?` made of words derived from the body's hash;
//! - any other chat request gets `Answer: <hash words>`;
//! - a request with `max_tokens` < 64 that is not an expansion gets `finish_reason: "length"`
//!   if its body hash is odd (to exercise the regenerate-on-cut-off path).
//!
//! Faults (with probability `fault_rate`, chosen by a seeded generator): 429 with
//! `Retry-After`, 500, a 200 with malformed JSON, a response slower than `slow`, or a dropped
//! connection (closed after the request is read, no response).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub fault_rate: f64,
    pub retry_after: &'static str,
    /// How long a "slow" fault sleeps before answering (set it past the client's timeout).
    pub slow: Duration,
    /// Delay before every normal answer (to make a run take a while).
    pub latency: Duration,
    pub seed: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            fault_rate: 0.0,
            retry_after: "0.2",
            slow: Duration::from_millis(1500),
            latency: Duration::ZERO,
            seed: 7,
        }
    }
}

/// What the server saw, per kind of event.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub requests: usize,
    pub ok: usize,
    pub rate_limited: usize,
    pub server_errors: usize,
    pub malformed: usize,
    pub slow: usize,
    pub dropped: usize,
    /// Successful answers per body hash.
    pub ok_by_body: HashMap<String, usize>,
    /// For bodies that got a 429: (time of the 429, time of the next request with that body).
    pub retry_gaps: Vec<Duration>,
}

pub struct FakeServer {
    pub url: String,
    pub stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(
            self.url
                .trim_start_matches("http://")
                .trim_end_matches("/v1"),
        );
    }
}

const WORDS: &[&str] = &[
    "teacher",
    "nurse",
    "pilot",
    "farmer",
    "retired",
    "student",
    "engineer",
    "baker",
    "savings",
    "pension",
    "bonds",
    "shares",
    "gold",
    "crypto",
    "rent",
    "house",
    "loan",
    "salary",
    "twins",
    "startup",
    "index",
    "dividends",
    "debt",
    "tax",
    "fund",
    "market",
    "risk",
    "income",
    "children",
    "grandchildren",
    "car",
    "travel",
    "wedding",
    "divorce",
    "bonus",
    "options",
    "euro",
    "dollar",
    "yen",
    "silver",
    "oil",
    "energy",
    "banks",
    "healthcare",
    "software",
    "robots",
    "water",
    "land",
    "art",
    "wine",
    "watches",
    "stamps",
    "coins",
    "ETFs",
    "REITs",
    "annuities",
    "insurance",
    "mortgage",
    "leasing",
    "franchise",
    "patents",
    "royalties",
    "tuition",
    "scholarship",
];

/// `n` words drawn from a hash.
fn words(seed: &str, n: usize) -> String {
    let h = Sha256::digest(seed.as_bytes());
    (0..n)
        .map(|i| WORDS[h[i % 32] as usize % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn answer_for(body: &serde_json::Value, body_hash: &str) -> (String, &'static str) {
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    if let Some(pos) = last.find("Write ") {
        let n: usize = last[pos + 6..]
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(3);
        let text = (0..n)
            .map(|i| {
                let s = format!("{body_hash}{i}");
                format!(
                    "{}. User context: I am a {} with {}.\nQuestion: Should I buy {}?",
                    i + 1,
                    words(&s, 3),
                    words(&format!("{s}x"), 3),
                    words(&format!("{s}y"), 3)
                )
            })
            .collect::<Vec<_>>()
            .join("\n\n");
        return (text, "stop");
    }
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(1000);
    let odd = u8::from_str_radix(&body_hash[63..], 16).unwrap_or(0) % 2 == 1;
    if max_tokens < 64 && odd {
        return (format!("Answer cut: {}", words(body_hash, 4)), "length");
    }
    (format!("Answer: {}", words(body_hash, 12)), "stop")
}

fn respond(stream: &mut TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn handle(
    stream: TcpStream,
    cfg: &FakeConfig,
    stats: &Mutex<Stats>,
    rng: &AtomicU64,
    last_429: &Mutex<HashMap<String, Instant>>,
) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut stream = stream;
    loop {
        // Request line and headers.
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if method == "GET" && path.ends_with("/models") {
            let _ = respond(
                &mut stream,
                "200 OK",
                "",
                r#"{"object":"list","data":[{"id":"fake","object":"model","owned_by":"test"}]}"#,
            );
            continue;
        }
        let body_hash = hex::encode(Sha256::digest(&body));
        // Seeded draw: x in [0, 1), then which fault.
        let r = rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let x = (r >> 11) as f64 / (1u64 << 53) as f64;
        {
            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
            s.requests += 1;
            if let Some(t) = last_429
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&body_hash)
            {
                s.retry_gaps.push(t.elapsed());
            }
        }
        if x < cfg.fault_rate {
            let kind = ((x / cfg.fault_rate) * 5.0) as usize;
            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
            match kind {
                0 => {
                    s.rate_limited += 1;
                    drop(s);
                    last_429
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(body_hash.clone(), Instant::now());
                    let _ = respond(
                        &mut stream,
                        "429 Too Many Requests",
                        &format!("Retry-After: {}\r\n", cfg.retry_after),
                        r#"{"error":{"message":"rate limited"}}"#,
                    );
                    continue;
                }
                1 => {
                    s.server_errors += 1;
                    drop(s);
                    let _ = respond(
                        &mut stream,
                        "500 Internal Server Error",
                        "",
                        r#"{"error":{"message":"boom"}}"#,
                    );
                    continue;
                }
                2 => {
                    s.malformed += 1;
                    drop(s);
                    let _ = respond(
                        &mut stream,
                        "200 OK",
                        "",
                        r#"{"id":"x","choices":[{"index":0,"message":{"role":"assis"#,
                    );
                    continue;
                }
                3 => {
                    s.slow += 1;
                    drop(s);
                    std::thread::sleep(cfg.slow);
                    let _ = respond(&mut stream, "200 OK", "", r#"{"choices":[]}"#);
                    return;
                }
                _ => {
                    s.dropped += 1;
                    return; // closes the connection without a response
                }
            }
        }
        std::thread::sleep(cfg.latency);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let n = v["n"].as_u64().unwrap_or(1) as usize;
        let (text, finish) = answer_for(&v, &body_hash);
        let choices: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}))
            .collect();
        let resp = serde_json::json!({
            "id": format!("chatcmpl-{}", &body_hash[..8]), "object": "chat.completion", "created": 0, "model": "fake",
            "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": 20 * n, "total_tokens": 10 + 20 * n},
        });
        if respond(&mut stream, "200 OK", "", &resp.to_string()).is_ok() {
            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
            s.ok += 1;
            *s.ok_by_body.entry(body_hash).or_default() += 1;
        }
    }
}

/// Start the server on a free loopback port; it stops when dropped.
pub fn start(cfg: FakeConfig) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, st2) = (stats.clone(), stop.clone());
    std::thread::spawn(move || {
        let rng = Arc::new(AtomicU64::new(cfg.seed));
        let last_429 = Arc::new(Mutex::new(HashMap::new()));
        for conn in listener.incoming() {
            if st2.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let (cfg, stats, rng, last) = (cfg.clone(), s2.clone(), rng.clone(), last_429.clone());
            std::thread::spawn(move || handle(conn, &cfg, &stats, &rng, &last));
        }
    });
    FakeServer {
        url: format!("http://{addr}/v1"),
        stats,
        stop,
    }
}
