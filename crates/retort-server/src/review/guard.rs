//! What stands between the review page and the rest of the world.
//!
//! - **Loopback by default, rebinding-proof**: bound to 127.0.0.1, the server answers only
//!   requests whose `Host` is the loopback address it listens on, so a web page that re-points its
//!   own domain at 127.0.0.1 (DNS rebinding) cannot read or drive it.
//! - **A token off loopback**: with `--host`, every request must carry the token printed at start
//!   — once in the URL (`?token=…`, swapped at once for an `HttpOnly`, `SameSite=Strict` cookie
//!   and redirected away so it does not linger in the address bar) and then in the cookie.
//! - **Cross-site forgery**: every state-changing request carries a per-start secret (a hidden form
//!   field, or the `X-CSRF-Token` header for `fetch`), which a foreign page cannot read; requests a
//!   browser marks as cross-site (`Sec-Fetch-Site`) or whose `Origin` is not this server are
//!   refused before that.
//! - **No markup from data**: templates escape every value (minijinja's HTML auto-escape), the
//!   script writes text with `textContent` only, and the Content-Security-Policy allows no inline
//!   script, so even a missed escape could not run. Model output is text, always.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub const COOKIE: &str = "retort_review_token";

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Debug, Clone)]
pub struct Guard {
    /// `Host` values accepted without a token; `None` when a token is required instead.
    pub loopback_hosts: Option<Vec<String>>,
    pub token: Option<String>,
    /// The per-start anti-forgery secret.
    pub csrf: String,
}

impl Guard {
    /// A guard for a server bound to `host:port`: loopback hosts need no token, others do.
    pub fn new(host: &str, port: u16) -> Guard {
        let loopback = matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]");
        Guard {
            loopback_hosts: loopback.then(|| {
                ["127.0.0.1", "localhost", "[::1]"]
                    .iter()
                    .map(|h| format!("{h}:{port}"))
                    .collect()
            }),
            token: (!loopback).then(random_secret),
            csrf: random_secret(),
        }
    }

    pub fn csrf_ok(&self, given: &str) -> bool {
        same(given.as_bytes(), self.csrf.as_bytes())
    }
}

/// 32 random bytes as hex.
pub fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Equality whose time does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The middleware: host check, token, cross-site refusal, security headers.
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    if let Some(allowed) = &g.loopback_hosts
        && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&host))
    {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this review server answers only on {}; Host `{host}` is refused \
                 (DNS-rebinding protection)\nhint: open the address `retort review` printed, or \
                 start it with --host to serve other addresses (a token is then required)",
                allowed.join(", ")
            ),
        );
    }
    if let Some(token) = &g.token {
        let in_query = req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "token")
                .map(|(_, v)| v.to_string())
        });
        if let Some(given) = in_query {
            if !same(given.as_bytes(), token.as_bytes()) {
                return refuse(StatusCode::UNAUTHORIZED, "wrong token");
            }
            // Swap the token in the URL for a cookie and drop it from the address bar.
            let rest: Vec<&str> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|kv| !kv.starts_with("token="))
                .collect();
            let target = if rest.is_empty() {
                req.uri().path().to_string()
            } else {
                format!("{}?{}", req.uri().path(), rest.join("&"))
            };
            let mut r = StatusCode::SEE_OTHER.into_response();
            if let (Ok(loc), Ok(c)) = (
                HeaderValue::from_str(&target),
                HeaderValue::from_str(&format!(
                    "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
                )),
            ) {
                r.headers_mut().insert(header::LOCATION, loc);
                r.headers_mut().insert(header::SET_COOKIE, c);
            }
            return r;
        }
        let ok = cookie(headers, COOKIE).is_some_and(|c| same(c.as_bytes(), token.as_bytes()));
        if !ok {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this review server needs its token\nhint: open the URL `retort review` printed \
                 at start (it ends in ?token=…)",
            );
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !matches!(site, "" | "same-origin" | "none") {
            return refuse(StatusCode::FORBIDDEN, "cross-site request refused");
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
            if !origin_host.eq_ignore_ascii_case(&host) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    &format!("request from origin `{origin}` refused"),
                );
            }
        }
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        // Not `no-referrer`: under it Chromium sends `Origin: null` with our own form posts.
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_needs_no_token_other_hosts_do() {
        let g = Guard::new("127.0.0.1", 8080);
        assert!(g.token.is_none());
        assert!(
            g.loopback_hosts
                .as_ref()
                .unwrap()
                .contains(&"localhost:8080".to_string())
        );
        let g = Guard::new("0.0.0.0", 8080);
        assert_eq!(g.token.as_ref().unwrap().len(), 64);
        assert!(g.loopback_hosts.is_none());
        assert_ne!(g.token.as_ref(), Some(&g.csrf));
        assert!(g.csrf_ok(&g.csrf.clone()));
        assert!(!g.csrf_ok(""));
        assert!(!g.csrf_ok(&g.csrf[1..]));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; retort_review_token=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
