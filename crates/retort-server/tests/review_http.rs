//! The review server over real HTTP: pages, decisions, and the guards (host, token, forgery,
//! headers, escaping). The browser test (`review_browser.rs`) drives the same pages in Chromium.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::sync::mpsc;

use retort_server::review::{ReviewOptions, serve};
use retort_teacher::synth::testing::ledger_with;
use retort_teacher::synth::{Status, Store};

const PAYLOAD: &str =
    r#"<img src=x onerror="window.__xss=1"></textarea><script>window.__xss=2</script>"#;

/// Start `retort review` on `host` (port 0) over a 6-item ledger; its base URL as printed.
fn start(host: &str) -> (tempfile::TempDir, String, std::net::SocketAddr) {
    start_with(host, 6)
}

fn start_with(host: &str, n: usize) -> (tempfile::TempDir, String, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.sqlite");
    ledger_with(&db, n, |i| {
        if i == 2 {
            (PAYLOAD.into(), PAYLOAD.into())
        } else {
            (format!("question {i}"), format!("answer {i}"))
        }
    });
    let (tx, rx) = mpsc::channel();
    let opts = ReviewOptions {
        db,
        host: host.into(),
        port: 0,
        reviewer: "ana".into(),
    };
    std::thread::spawn(move || {
        serve(opts, |addr, url| tx.send((addr, url)).unwrap()).unwrap();
    });
    let (addr, url) = rx.recv().unwrap();
    (dir, url, addr)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

fn accept(csrf: &str) -> Vec<(&str, &str)> {
    vec![
        ("csrf", csrf),
        ("action", "accept"),
        ("input", "question 0"),
        ("answer", "answer 0"),
        ("human", "0"),
        ("reason", ""),
        ("back", ""),
    ]
}

fn hash(i: usize) -> String {
    format!("{i:064x}")
}

/// The anti-forgery token as the item page embeds it.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[at..at + 64].to_string()
}

#[test]
fn pages_escape_model_output_and_send_security_headers() {
    let (_dir, url, _) = start("127.0.0.1");
    let a = agent();
    let mut r = a.get(format!("{url}item/{}", hash(2))).call().unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let page = r.body_mut().read_to_string().unwrap();
    assert!(
        !page.contains("<img src=x"),
        "raw markup from the model reached the page"
    );
    assert!(!page.contains("</textarea><script>"));
    assert!(
        page.contains("&lt;img src=x onerror="),
        "the payload is shown as text"
    );
    // The only script is ours, loaded from /static.
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    let queue = a
        .get(&url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(!queue.contains("<img src=x") && queue.contains("&lt;img src=x"));
    // The script itself never writes markup.
    let js = a
        .get(format!("{url}static/review.js"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        !js.contains("innerHTML")
            && !js.contains("insertAdjacentHTML")
            && !js.contains("document.write")
    );
}

#[test]
fn decisions_need_the_form_token_and_same_origin() {
    let (dir, url, addr) = start("127.0.0.1");
    let a = agent();
    let page = a
        .get(format!("{url}item/{}", hash(0)))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let token = csrf(&page);
    let post = |form: &[(&str, &str)], origin: Option<&str>, site: Option<&str>| {
        let mut req = a.post(format!("{url}item/{}", hash(0)));
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if let Some(s) = site {
            req = req.header("Sec-Fetch-Site", s);
        }
        req.send_form(form.iter().copied()).unwrap()
    };
    let db = dir.path().join("ledger.sqlite");
    let decided = || Store::open(&db).unwrap().history(&hash(0)).unwrap().len();
    // A forged form (no or wrong token), a cross-site post, a foreign origin: refused, nothing written.
    assert_eq!(post(&accept(""), None, None).status(), 403);
    assert_eq!(post(&accept("0000"), None, None).status(), 403);
    let token = token.as_str();
    assert_eq!(post(&accept(token), None, Some("cross-site")).status(), 403);
    assert_eq!(
        post(&accept(token), Some("http://evil.example"), None).status(),
        403
    );
    assert_eq!(decided(), 0);
    // The real form: a redirect to the next item, and the decision is on disk.
    let own_origin = format!("http://{addr}");
    let r = post(
        &accept(token),
        Some(own_origin.as_str()),
        Some("same-origin"),
    );
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/item/{}", hash(1)));
    assert_eq!(decided(), 1);
    let s = Store::open(&db).unwrap();
    assert_eq!(s.item(&hash(0)).unwrap().unwrap().status, Status::Accepted);
    // A refused decision (reject without a reason) shows the page again with what was typed.
    let mut r = post(
        &[
            ("csrf", token),
            ("action", "reject"),
            ("input", "question 1"),
            ("answer", "my careful edit"),
            ("human", "0"),
            ("reason", ""),
            ("back", "status=pending"),
        ],
        None,
        None,
    );
    assert_eq!(r.status(), 422);
    let page = r.body_mut().read_to_string().unwrap();
    assert!(page.contains("a rejection needs a reason") && page.contains("my careful edit"));
    // The server enforces the reason's limit itself (the page's field does too).
    let long = "x".repeat(100_000);
    let mut r = post(
        &[
            ("csrf", token),
            ("action", "reject"),
            ("input", "question 1"),
            ("answer", "answer 1"),
            ("human", "0"),
            ("reason", long.as_str()),
            ("back", ""),
        ],
        None,
        None,
    );
    assert_eq!(r.status(), 422);
    let page = r.body_mut().read_to_string().unwrap();
    assert!(
        page.contains("longer than 500 characters"),
        "{}",
        &page[..page.len().min(400)]
    );
    // Invalid UTF-8 in a field is refused, not replaced.
    let body =
        format!("csrf={token}&action=reject&input=q&answer=%FF%FEa&human=0&reason=bad&back=");
    let r = a
        .post(format!("{url}item/{}", hash(1)))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(body.as_bytes())
        .unwrap();
    assert_eq!(r.status(), 400);
    let s = Store::open(&db).unwrap();
    assert_eq!(s.history(&hash(1)).unwrap().len(), 0, "nothing was stored");
}

#[test]
fn loopback_refuses_foreign_host_headers() {
    let (_dir, url, addr) = start("127.0.0.1");
    let a = agent();
    assert_eq!(a.get(&url).call().unwrap().status(), 200);
    let r = a
        .get(&url)
        .header("Host", format!("evil.example:{}", addr.port()))
        .call()
        .unwrap();
    assert_eq!(r.status(), 421, "DNS rebinding must not reach the pages");
    let r = a
        .get(format!("http://localhost:{}/", addr.port()))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn off_loopback_every_request_needs_the_token() {
    let (_dir, url, addr) = start("0.0.0.0");
    let (base, token) = url.split_once("?token=").unwrap();
    assert_eq!(token.len(), 64);
    let base = base.replace("0.0.0.0", "127.0.0.1");
    let a = agent();
    let mut r = a.get(&base).call().unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.body_mut().read_to_string().unwrap().contains("?token="));
    assert_eq!(
        a.get(format!("{base}?token=wrong"))
            .call()
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        a.get(format!("{base}static/review.css"))
            .call()
            .unwrap()
            .status(),
        401
    );
    // The token in the URL is swapped for a cookie, and the address bar loses it.
    let r = a.get(format!("{base}?token={token}")).call().unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = a.get(&base).header("Cookie", &pair).call().unwrap();
    assert_eq!(r.status(), 200);
    // Any Host is fine then: the token is what counts.
    let r = a
        .get(&base)
        .header("Cookie", &pair)
        .header("Host", format!("review.lan:{}", addr.port()))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn queue_pages_keep_the_filter() {
    let (_dir, url, _) = start_with("127.0.0.1", 130);
    let a = agent();
    let page = |q: &str| {
        a.get(format!("{url}{q}"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
            // Attribute values as the browser reads them (minijinja escapes `/` and `&`).
            .replace("&#x2f;", "/")
            .replace("&amp;", "&")
    };
    let first = page("");
    assert!(first.contains("130 matching · page 1 of 3"), "{first}");
    assert!(first.contains(r#"href="/?page=2" id="next-page""#));
    assert!(!first.contains("prev-page"));
    // 104 of 130 are pending (every fifth has no answer); the filter travels with the pages.
    let pending = page("?status=pending&page=3");
    assert!(pending.contains("104 matching · page 3 of 3"), "{pending}");
    assert!(pending.contains(r#"href="/?status=pending&page=2" id="prev-page""#));
    assert_eq!(pending.matches(r#"class="row status-pending""#).count(), 4);
    // An item link carries the filter, so next/previous stay inside it.
    assert!(
        pending.contains("?status=pending\">"),
        "item links keep the filter"
    );
}
