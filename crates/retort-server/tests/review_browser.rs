//! End to end in real headless Chromium (Debian's `chromium` + `chromium-driver`, driven over
//! WebDriver with fantoccini): open the queue, edit an answer and accept it, reject another with
//! the keyboard, write an own answer, reload and see every decision persisted, export and check
//! the files; a model answer carrying markup stays inert text throughout.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (or `CHROMIUM` / `CHROMEDRIVER`);
//! `scripts/fetch-assets` installs them. Skipped when they are missing, unless
//! `RETORT_REQUIRE_ASSETS=1` (the README's test command), where their absence fails the test.
//! With `RETORT_SCREENSHOT=PATH` the item page is saved as a PNG there.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use retort_server::review::{ReviewOptions, serve};
use retort_teacher::synth::export::{PREFERENCES, STAGE1, STAGE2};
use retort_teacher::synth::testing::ledger_with;
use retort_teacher::synth::{Store, export};
use serde_json::{Value, json};

const PAYLOAD: &str =
    r#"<img src=x onerror="window.__xss=1"></textarea><script>window.__xss=2</script>"#;

fn tool(var: &str, default: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    p.is_file().then_some(p)
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_browser(chromium: &Path, driver: &Path, profile: &Path) -> (Driver, Client) {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver(child);
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1100",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let caps = caps.as_object().unwrap().clone();
    let t0 = Instant::now();
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot start a Chromium session through chromedriver: {e}"),
        }
    }
}

fn hash(i: usize) -> String {
    format!("{i:064x}")
}

async fn value(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

/// Wait until `script` (a JS expression) is true.
async fn until(c: &Client, script: &str) {
    let t0 = Instant::now();
    loop {
        let v = c
            .execute(&format!("return !!({script});"), vec![])
            .await
            .unwrap();
        if v == Value::Bool(true) {
            return;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let url = c
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let page = c.source().await.unwrap_or_default();
            panic!(
                "timed out waiting for {script}\nat {url}:\n{}",
                &page[..page.len().min(3000)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Press keys with nothing focused (the page's shortcuts).
async fn keys(c: &Client, k: &str) {
    c.execute(
        "document.activeElement && document.activeElement.blur();",
        vec![],
    )
    .await
    .unwrap();
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys(k)
        .await
        .unwrap();
}

async fn inert(c: &Client) {
    let v = c
        .execute(
            "return [window.__xss === undefined, document.querySelectorAll('main img, main script').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(v, json!([true, 0]), "model output ran or became markup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_in_chromium_edit_accept_reject_reload_export() {
    let (Some(chromium), Some(driver)) = (
        tool("CHROMIUM", "/usr/bin/chromium"),
        tool("CHROMEDRIVER", "/usr/bin/chromedriver"),
    ) else {
        assert!(
            std::env::var("RETORT_REQUIRE_ASSETS").as_deref() != Ok("1"),
            "Chromium and ChromeDriver are required (RETORT_REQUIRE_ASSETS=1) but missing\n\
             hint: scripts/fetch-assets installs them (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: no /usr/bin/chromium + /usr/bin/chromedriver");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.sqlite");
    // Item 2 carries markup in its input and answer; item 4 has no teacher answer.
    ledger_with(&db, 6, |i| match i {
        2 => (PAYLOAD.into(), PAYLOAD.into()),
        _ => (
            format!("Should I buy index funds now? ({i})"),
            format!("Index funds spread risk across many stocks. ({i})"),
        ),
    });
    let (tx, rx) = mpsc::channel();
    let opts = ReviewOptions {
        db: db.clone(),
        host: "127.0.0.1".into(),
        port: 0,
        reviewer: "ana".into(),
    };
    std::thread::spawn(move || serve(opts, |_, url| tx.send(url).unwrap()).unwrap());
    let url = rx.recv().unwrap();
    let (_driver, c) = start_browser(&chromium, &driver, &dir.path().join("profile")).await;

    // 1. The queue: six items, the payload shown as text.
    c.goto(&url).await.unwrap();
    assert_eq!(c.find_all(Locator::Css("tr.row")).await.unwrap().len(), 6);
    assert!(text(&c, "#count").await.starts_with("6 matching"));
    assert!(text(&c, "#queue").await.contains("<img src=x onerror="));
    inert(&c).await;

    // 2. Open item 1 from the queue, edit its answer, see the live diff, accept.
    c.find(Locator::Css("tr.row:nth-child(1) a.open"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(path(&c).await, format!("/item/{}", hash(0)));
    let answer = c.find(Locator::Css("#answer")).await.unwrap();
    answer.send_keys(" Keep fees low.").await.unwrap();
    until(&c, "document.querySelector('#answer-diff ins') && document.querySelector('#answer-diff ins').textContent.includes('fees')").await;
    c.find(Locator::Css("#accept"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The next item opens.
    until(&c, &format!("location.pathname === '/item/{}'", hash(1))).await;

    // 3. Reject item 2 with the keyboard: r focuses the reason, Enter rejects.
    keys(&c, "r").await;
    until(&c, "document.activeElement.id === 'reason'").await;
    c.find(Locator::Css("#reason"))
        .await
        .unwrap()
        .send_keys("off topic\u{E007}")
        .await
        .unwrap();
    until(&c, &format!("location.pathname === '/item/{}'", hash(2))).await;

    // 4. The payload item: textareas hold it as text, byte for byte; nothing ran.
    assert_eq!(value(&c, "#input").await, PAYLOAD);
    assert_eq!(value(&c, "#answer").await, PAYLOAD);
    inert(&c).await;
    // k goes back, j forward.
    keys(&c, "k").await;
    until(&c, &format!("location.pathname === '/item/{}'", hash(1))).await;
    keys(&c, "j").await;
    until(&c, &format!("location.pathname === '/item/{}'", hash(2))).await;
    keys(&c, "a").await; // accepted as is
    until(&c, &format!("location.pathname === '/item/{}'", hash(3))).await;

    // 5. An edit typed but never sent survives leaving the page (a crash or a closed tab).
    c.find(Locator::Css("#answer"))
        .await
        .unwrap()
        .send_keys(" Unsent words.")
        .await
        .unwrap();
    c.goto(&url).await.unwrap();
    c.goto(&format!("{url}item/{}", hash(3))).await.unwrap();
    assert!(value(&c, "#answer").await.ends_with(" Unsent words."));
    assert!(
        c.find(Locator::Css("#draft-notice"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );
    keys(&c, "s").await; // skip: decides nothing
    until(&c, &format!("location.pathname === '/item/{}'", hash(4))).await;

    // 6. Item 5 has no teacher answer: write one, Ctrl+Enter accepts from the text box.
    assert!(c.find(Locator::Css("#no-answer")).await.is_ok());
    keys(&c, "w").await;
    until(&c, "document.activeElement.id === 'answer'").await;
    c.find(Locator::Css("#answer"))
        .await
        .unwrap()
        .send_keys("Only invest money you will not need for five years.\u{E009}\u{E007}")
        .await
        .unwrap();
    until(&c, &format!("location.pathname === '/item/{}'", hash(5))).await;

    // 7. Reload: every decision is there.
    c.goto(&format!("{url}item/{}", hash(0))).await.unwrap();
    c.refresh().await.unwrap();
    assert_eq!(text(&c, "#status").await, "accepted");
    assert!(text(&c, "#decided").await.starts_with("edited · ana"));
    assert_eq!(
        value(&c, "#answer").await,
        "Index funds spread risk across many stocks. (0) Keep fees low."
    );
    assert!(
        text(&c, "#answer-diff ins")
            .await
            .contains("Keep fees low.")
    );
    if let Some(out) = std::env::var_os("RETORT_SCREENSHOT") {
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        fs_err::write(out, png).unwrap();
    }
    c.goto(&format!("{url}item/{}", hash(1))).await.unwrap();
    assert_eq!(text(&c, "#status").await, "rejected");
    c.goto(&format!("{url}?status=accepted")).await.unwrap();
    assert_eq!(c.find_all(Locator::Css("tr.row")).await.unwrap().len(), 3);
    assert!(text(&c, "#progress").await.starts_with("4 / 6 decided"));
    inert(&c).await;
    c.close().await.unwrap();

    // 8. Export: the edited answer in both stages, the payload verbatim, one preference pair.
    let out = dir.path().join("export");
    let sum = export(&Store::open(&db).unwrap(), &out).unwrap();
    assert_eq!((sum.stage1, sum.stage2, sum.preferences), (2, 2, 1));
    let read = |f: &str| -> Vec<Value> {
        fs_err::read_to_string(out.join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let answers = |rows: &[Value]| -> Vec<String> {
        rows.iter()
            .map(|r| r["messages"][2]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        answers(&read(STAGE1)),
        [
            "Index funds spread risk across many stocks. (0) Keep fees low.",
            PAYLOAD
        ]
    );
    assert_eq!(
        answers(&read(STAGE2)),
        [
            "Index funds spread risk across many stocks. (0) Keep fees low.",
            "Only invest money you will not need for five years."
        ]
    );
    let pairs = read(PREFERENCES);
    assert_eq!(
        pairs[0]["rejected"][0]["content"],
        "Index funds spread risk across many stocks. (0)"
    );
    assert_eq!(read(STAGE2)[1]["provenance"]["review"]["origin"], "human");
    assert_eq!(read(STAGE1)[0]["provenance"]["review"]["reviewer"], "ana");
}
