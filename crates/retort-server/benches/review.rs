//! Latency of the review pages over a large ledger: the issue asks for 10,000 items without lag.
//! Builds a ledger of N items with answers of realistic length (~1,100 characters), starts
//! `retort review` on loopback, and times each request end to end over HTTP (server work +
//! rendering + transfer; the browser's own layout is not included).
//!
//!     cargo bench -p retort-server --bench review [-- --items 10000 --reps 30]
//!
//! Prints median and 95th-percentile milliseconds per page kind.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::sync::mpsc;
use std::time::Instant;

use retort_server::review::{ReviewOptions, serve};
use retort_teacher::synth::testing::ledger_with;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = arg(&args, "--items", "10000").parse().unwrap();
    let reps: usize = arg(&args, "--reps", "30").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.sqlite");
    let t0 = Instant::now();
    let sentence = "Diversify across sectors and keep an emergency fund before investing. ";
    ledger_with(&db, n, |i| {
        (
            format!(
                "User context: investor {i}, age {}.\nQuestion: should I rebalance now?",
                20 + i % 50
            ),
            sentence.repeat(12 + i % 8) + &format!("(answer {i})"),
        )
    });
    eprintln!(
        "built a ledger of {n} items in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let (tx, rx) = mpsc::channel();
    let opts = ReviewOptions {
        db,
        host: "127.0.0.1".into(),
        port: 0,
        reviewer: "bench".into(),
    };
    std::thread::spawn(move || serve(opts, |_, url| tx.send(url).unwrap()).unwrap());
    let url = rx.recv().unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let hash = |i: usize| format!("{i:064x}");
    let page = agent
        .get(format!("{url}item/{}", hash(0)))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = page[at..at + 64].to_string();

    let time = |name: &str, f: &mut dyn FnMut(usize) -> u16| {
        let mut ms = Vec::with_capacity(reps);
        for r in 0..reps {
            let t = Instant::now();
            let status = f(r);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(status == 200 || status == 303, "{name}: HTTP {status}");
        }
        ms.sort_by(f64::total_cmp);
        let p95 = ms[((ms.len() as f64 * 0.95).ceil() as usize).min(ms.len()) - 1];
        println!(
            "{name:<44} median {:>7.2} ms   p95 {:>7.2} ms",
            ms[ms.len() / 2],
            p95
        );
    };
    let get = |path: String| {
        agent
            .get(format!("{url}{path}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    println!("{n} items, {reps} requests each");
    time("queue, first page", &mut |_| get(String::new()));
    time("queue, page 150", &mut |_| get("?page=150".into()));
    time("queue, status=pending, page 100", &mut |_| {
        get("?status=pending&page=100".into())
    });
    time("queue, text search (rare word)", &mut |r| {
        get(format!("?q=answer%20{}", 9000 + r))
    });
    time("queue, length 900–1000 chars", &mut |_| {
        get("?min=900&max=1000".into())
    });
    time("item page (mid-queue, with neighbours)", &mut |r| {
        get(format!("item/{}", hash(5000 + r)))
    });
    time("item page, filtered status=pending", &mut |r| {
        get(format!("item/{}?status=pending", hash(7000 + r)))
    });
    time("decision (accept, edited) + redirect", &mut |r| {
        let h = hash(100 + r);
        agent
            .post(format!("{url}item/{h}"))
            .send_form([
                ("csrf", csrf.as_str()),
                ("action", "accept"),
                (
                    "input",
                    &format!(
                        "User context: investor {}, age {}.\nQuestion: should I rebalance now?",
                        100 + r,
                        20 + (100 + r) % 50
                    ),
                ),
                ("answer", "An edited answer."),
                ("human", "0"),
                ("reason", ""),
                ("back", "status=pending"),
            ])
            .unwrap()
            .status()
            .as_u16()
    });
    time("live diff of a 1,000-char answer", &mut |r| {
        agent
            .post(format!("{url}api/diff"))
            .header("X-CSRF-Token", &csrf)
            .send_json(serde_json::json!({
                "item": hash(3000 + r),
                "input": "x",
                "answer": sentence.repeat(14) + "one more edit",
            }))
            .unwrap()
            .status()
            .as_u16()
    });
}
