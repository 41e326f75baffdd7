//! The review pages: a queue with filters and one page per item, server-rendered HTML from
//! templates compiled into the binary, plus one small script for shortcuts, the live diff and
//! unsent-edit drafts. Nothing is loaded from elsewhere.
//!
//! Routes: `GET /` (queue), `GET /item/{hash}`, `POST /item/{hash}` (a decision, then the next
//! item in the same filter), `POST /api/diff` (word diff of an edit against the teacher's
//! original), `GET /static/…`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use minijinja::value::Serde;
use minijinja::{Environment, Value, context};
use serde::{Deserialize, Serialize};

use super::diff::{Span, changed, word_diff};
use super::error::{Error, Result};
use super::guard::{Guard, guard};
use retort_teacher::synth::review::{
    Action, Filter, NewDecision, Origin, Status, Store, normalise,
};

pub const PER_PAGE: usize = 50;

pub struct ReviewOptions {
    /// The ledger `retort synth` wrote (`OUT/ledger.sqlite`).
    pub db: PathBuf,
    pub host: String,
    pub port: u16,
    /// Recorded with every decision.
    pub reviewer: String,
}

struct App {
    store: Mutex<Store>,
    pages: Environment<'static>,
    guard: Arc<Guard>,
    reviewer: String,
    db: String,
}

/// The queue's filter and page as they travel in URLs (every field optional, empty = unset).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct QueueQuery {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub min: String,
    #[serde(default)]
    pub max: String,
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub page: String,
}

impl QueueQuery {
    fn filter(&self) -> Filter {
        let num = |s: &str| s.trim().parse::<usize>().ok();
        Filter {
            status: Status::parse(&self.status),
            origin: Origin::parse(&self.origin),
            min_chars: num(&self.min),
            max_chars: num(&self.max),
            text: Some(self.q.trim().to_string()).filter(|q| !q.is_empty()),
        }
    }

    fn page(&self) -> usize {
        self.page.trim().parse::<usize>().unwrap_or(1).max(1)
    }

    /// The filter as a query string (without the page), for links that keep it.
    fn query_string(&self) -> String {
        let pairs = [
            ("status", &self.status),
            ("origin", &self.origin),
            ("min", &self.min),
            ("max", &self.max),
            ("q", &self.q),
        ];
        pairs
            .iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| format!("{k}={}", encode(v.trim())))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// Percent-encoding for a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn with_query(path: &str, qs: &str) -> String {
    if qs.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{qs}")
    }
}

/// The page templates; HTML auto-escaping is on for every value (`.html` names).
fn pages() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("layout.html", include_str!("assets/layout.html"))?;
    env.add_template("queue.html", include_str!("assets/queue.html"))?;
    env.add_template("item.html", include_str!("assets/item.html"))?;
    Ok(env)
}

/// The review router over an open store (what `serve` runs; tests drive it directly).
pub fn router(store: Store, guard: Guard, reviewer: String) -> Result<Router> {
    let guard = Arc::new(guard);
    let app = Arc::new(App {
        db: store.path().display().to_string(),
        store: Mutex::new(store),
        pages: pages()?,
        guard: guard.clone(),
        reviewer,
    });
    Ok(Router::new()
        .route("/", get(queue))
        .route("/item/{hash}", get(item_page).post(decide))
        .route("/api/diff", axum::routing::post(diff))
        .route("/static/review.js", get(script))
        .route("/static/review.css", get(style))
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(guard, guard_fn)))
}

async fn guard_fn(
    s: State<Arc<Guard>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    guard(s, req, next).await
}

/// Serve the review pages until Ctrl-C. `ready` gets the bound address and the URL to open
/// (with the token when one is required).
pub fn serve(opts: ReviewOptions, ready: impl FnOnce(SocketAddr, String)) -> Result<()> {
    let store = Store::open(&opts.db)?;
    crate::http::serve_until_ctrl_c(&opts.host, opts.port, |addr| {
        let guard = Guard::new(&opts.host, addr.port());
        let url = match &guard.token {
            Some(t) => format!("http://{addr}/?token={t}"),
            None => format!("http://{addr}/"),
        };
        let app = router(store, guard, opts.reviewer)?;
        ready(addr, url);
        Ok(app)
    })
}

fn error_page(status: StatusCode, e: &dyn std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{e}\n"),
    )
        .into_response()
}

fn html(app: &App, template: &str, ctx: minijinja::Value) -> Response {
    match app.pages.get_template(template).and_then(|t| t.render(ctx)) {
        Ok(body) => Html(body).into_response(),
        Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, &Error::from(e)),
    }
}

async fn queue(State(app): State<Arc<App>>, Query(q): Query<QueueQuery>) -> Response {
    let filter = q.filter();
    let page = q.page();
    let result = {
        let store = app.store.lock().unwrap_or_else(|p| p.into_inner());
        store.progress().and_then(|p| {
            let (rows, n) = store.queue(&filter, page - 1, PER_PAGE)?;
            Ok((p, rows, n))
        })
    };
    let (progress, rows, matching) = match result {
        Ok(x) => x,
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let pages = matching.div_ceil(PER_PAGE).max(1);
    let qs = q.query_string();
    let page_link = |p: usize| match qs.as_str() {
        "" => format!("/?page={p}"),
        qs => format!("/?{qs}&page={p}"),
    };
    html(
        &app,
        "queue.html",
        context! {
            db => app.db.clone(),
            reviewer => app.reviewer.clone(),
            progress => Value::from(Serde(&progress)),
            decided => progress.decided(),
            rows => Value::from(Serde(&rows)),
            matching => matching,
            page => page,
            pages => pages,
            prev_page => (page > 1).then(|| page_link(page - 1)),
            next_page => (page < pages).then(|| page_link(page + 1)),
            qs => qs,
            query => Value::from(Serde(&q)),
            statuses => Status::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            origins => Origin::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        },
    )
}

/// What the reviewer typed, when a decision was refused: shown again so nothing is lost.
struct Draft {
    input: String,
    answer: String,
    human: bool,
    reason: String,
    error: String,
}

fn render_item(app: &App, hash: &str, q: &QueueQuery, draft: Option<Draft>) -> Response {
    let filter = q.filter();
    let found = {
        let store = app.store.lock().unwrap_or_else(|p| p.into_inner());
        (|| -> Result<_> {
            let Some(item) = store.item(hash)? else {
                return Ok(None);
            };
            let prev = store.neighbour(hash, &filter, false)?;
            let next = store.neighbour(hash, &filter, true)?;
            let history = store.history(hash)?;
            let progress = store.progress()?;
            Ok(Some((item, prev, next, history, progress)))
        })()
    };
    let (item, prev, next, history, progress) = match found {
        Ok(Some(x)) => x,
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                &Error::invalid(
                    format!("no item `{hash}`"),
                    "the ledger was rewritten by a newer `retort synth` run; go back to the queue",
                ),
            );
        }
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let qs = q.query_string();
    let (input, answer, human, reason, error) = match draft {
        Some(d) => (d.input, d.answer, d.human, d.reason, Some(d.error)),
        None => (
            item.input.clone(),
            item.answer.clone().unwrap_or_default(),
            item.original_answer.is_none()
                || item
                    .decision
                    .as_ref()
                    .is_some_and(|d| d.origin == Some(Origin::Human)),
            String::new(),
            None,
        ),
    };
    let answer_diff: Vec<Span> = item
        .original_answer
        .as_deref()
        .map(|o| word_diff(o, &answer))
        .unwrap_or_default();
    let input_diff = word_diff(&item.original_input, &input);
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let provenance = format!("{:#}", item.provenance);
    let mut r = html(
        app,
        "item.html",
        context! {
            db => app.db.clone(),
            reviewer => app.reviewer.clone(),
            csrf => app.guard.csrf.clone(),
            progress => Value::from(Serde(&progress)),
            decided => progress.decided(),
            item => Value::from(Serde(&item)),
            system => item.system(),
            input => input,
            answer => answer,
            human => human,
            reason => reason,
            error => error,
            answer_changed => changed(&answer_diff),
            answer_diff => Value::from(Serde(&answer_diff)),
            input_changed => changed(&input_diff),
            input_diff => Value::from(Serde(&input_diff)),
            provenance => provenance,
            history => Value::from(Serde(&history)),
            queue_link => with_query("/", &qs),
            qs => qs.clone(),
            prev_link => prev.map(|h| with_query(&format!("/item/{h}"), &qs)),
            next_link => next.map(|h| with_query(&format!("/item/{h}"), &qs)),
            reasons => ["wrong facts", "off topic", "unsafe advice", "unclear or rambling", "cut off", "duplicate"],
        },
    );
    *r.status_mut() = status;
    r
}

async fn item_page(
    State(app): State<Arc<App>>,
    Path(hash): Path<String>,
    Query(q): Query<QueueQuery>,
) -> Response {
    render_item(&app, &hash, &q, None)
}

#[derive(Debug, Deserialize)]
struct DecisionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    input: String,
    #[serde(default)]
    answer: String,
    #[serde(default)]
    human: String,
    #[serde(default)]
    reason: String,
    /// The queue filter the reviewer is working through (a query string).
    #[serde(default)]
    back: String,
}

/// Percent-decode every value of a form body and refuse one that is not UTF-8 (axum's `Form`
/// would replace the bad bytes silently). Returns the field at fault.
fn form_is_utf8(body: &[u8]) -> std::result::Result<(), String> {
    for pair in body.split(|&b| b == b'&') {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let mut out = Vec::with_capacity(value.len());
        let mut i = 0;
        while i < value.len() {
            match value[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < value.len() => {
                    let hex = std::str::from_utf8(&value[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        if std::str::from_utf8(&out).is_err() || std::str::from_utf8(key).is_err() {
            return Err(String::from_utf8_lossy(key).into_owned());
        }
    }
    Ok(())
}

async fn decide(
    State(app): State<Arc<App>>,
    Path(hash): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(field) = form_is_utf8(&body) {
        return error_page(
            StatusCode::BAD_REQUEST,
            &Error::invalid(
                format!("the form's `{field}` is not valid UTF-8"),
                "submit the page from a browser, which sends UTF-8; nothing was saved",
            ),
        );
    }
    let f: DecisionForm = match serde_urlencoded_form(&body) {
        Ok(f) => f,
        Err(e) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                &Error::invalid(
                    format!("the form cannot be read: {e}"),
                    "submit the page from a browser; nothing was saved",
                ),
            );
        }
    };
    if !app.guard.csrf_ok(&f.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            &Error::invalid(
                "the form's anti-forgery token is missing or stale",
                "reload the page (the server was restarted) and decide again",
            ),
        );
    }
    let q: QueueQuery = serde_urlencoded_lite(&f.back);
    let Some(action) = Action::parse(&f.action) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            &Error::invalid(
                format!("unknown action `{}`", f.action),
                "use accept, reject or skip",
            ),
        );
    };
    let d = NewDecision {
        action,
        input: f.input.clone(),
        answer: f.answer.clone(),
        human: f.human == "1",
        reason: f.reason.clone(),
        reviewer: app.reviewer.clone(),
    };
    let result = {
        let mut store = app.store.lock().unwrap_or_else(|p| p.into_inner());
        store
            .decide(&hash, &d)
            .and_then(|_| store.neighbour(&hash, &q.filter(), true))
    };
    match result {
        Ok(next) => {
            let qs = q.query_string();
            let to = match next {
                Some(h) => with_query(&format!("/item/{h}"), &qs),
                None => with_query("/", &qs),
            };
            Redirect::to(&to).into_response()
        }
        Err(retort_teacher::Error::Invalid { reason, hint }) => render_item(
            &app,
            &hash,
            &q,
            Some(Draft {
                input: normalise(&f.input),
                answer: normalise(&f.answer),
                human: f.human == "1",
                reason: f.reason,
                error: format!("{reason} — {hint}"),
            }),
        ),
        Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// A form body as axum's `Form` reads it (after [`form_is_utf8`] has checked it).
fn serde_urlencoded_form(body: &[u8]) -> std::result::Result<DecisionForm, String> {
    serde_urlencoded::from_bytes(body).map_err(|e| e.to_string())
}

/// The `back` field is our own query string; read it with the same parser axum's `Query` uses.
/// A `back` that does not parse (edited by hand) returns to the whole queue, unfiltered: it only
/// decides which page comes next, never what is stored.
fn serde_urlencoded_lite(qs: &str) -> QueueQuery {
    let uri = format!("/?{qs}");
    uri.parse::<axum::http::Uri>()
        .ok()
        .and_then(|u| Query::<QueueQuery>::try_from_uri(&u).ok())
        .map(|Query(q)| q)
        .unwrap_or_default()
}

#[derive(Debug, Deserialize)]
struct DiffRequest {
    item: String,
    #[serde(default)]
    input: String,
    #[serde(default)]
    answer: String,
}

#[derive(Debug, Serialize)]
struct DiffResponse {
    input: Vec<Span>,
    answer: Vec<Span>,
}

async fn diff(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<DiffRequest>,
) -> Response {
    let token = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !app.guard.csrf_ok(token) {
        return (StatusCode::FORBIDDEN, "anti-forgery token missing\n").into_response();
    }
    let item = {
        let store = app.store.lock().unwrap_or_else(|p| p.into_inner());
        store.item(&req.item)
    };
    match item {
        Ok(Some(item)) => axum::Json(DiffResponse {
            input: word_diff(&item.original_input, &normalise(&req.input)),
            answer: item
                .original_answer
                .as_deref()
                .map(|o| word_diff(o, &normalise(&req.answer)))
                .unwrap_or_default(),
        })
        .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such item\n").into_response(),
        Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/review.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/review.css"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_round_trip_and_encode() {
        let q = QueueQuery {
            status: "pending".into(),
            q: "a&b=c d%".into(),
            min: " 10 ".into(),
            ..Default::default()
        };
        let qs = q.query_string();
        assert_eq!(qs, "status=pending&min=10&q=a%26b%3Dc%20d%25");
        let back = serde_urlencoded_lite(&qs);
        assert_eq!(back.q, "a&b=c d%");
        assert_eq!(back.filter(), q.filter());
        assert_eq!(back.filter().min_chars, Some(10));
        assert_eq!(serde_urlencoded_lite("").filter(), Filter::default());
    }
}
