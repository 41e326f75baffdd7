//! When to retry an HTTP request and how long to wait: exponential backoff with jitter, capped,
//! and the server's `Retry-After` honoured on 429 and 503.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all (the first included).
    pub max_attempts: usize,
    /// Wait before the second attempt; doubles with each further attempt.
    pub base: Duration,
    /// No wait is longer than this (a longer `Retry-After` is cut to it).
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(500),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// What one attempt ended with, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Done,
    /// Worth another attempt; `retry_after` is the server's own wait, if it gave one.
    Retry {
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (bad request, auth, unknown model).
    Fatal,
}

/// The verdict for an HTTP status (`None`: the request did not get a response at all —
/// refused, dropped or timed out, which is worth retrying).
pub fn verdict(status: Option<u16>, retry_after: Option<&str>) -> Verdict {
    match status {
        None => Verdict::Retry { retry_after: None },
        Some(200..=299) => Verdict::Done,
        Some(s @ (408 | 409 | 425 | 429 | 500..=599)) => Verdict::Retry {
            retry_after: if s == 429 || s == 503 {
                retry_after.and_then(parse_retry_after)
            } else {
                None
            },
        },
        Some(_) => Verdict::Fatal,
    }
}

/// `Retry-After` in seconds (integer or decimal). HTTP dates are not honoured (backoff applies).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

impl RetryPolicy {
    /// Wait after failed attempt number `attempt` (1-based): the server's `Retry-After` if
    /// given, else `base·2^(attempt-1)` scaled by a jitter in [0.5, 1) (`jitter01` uniform in
    /// [0, 1)); never more than `max_wait`.
    pub fn wait(&self, attempt: usize, retry_after: Option<Duration>, jitter01: f64) -> Duration {
        let w = match retry_after {
            Some(d) => d,
            None => {
                let exp =
                    self.base.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
                Duration::from_secs_f64(
                    exp.min(self.max_wait.as_secs_f64()) * (0.5 + 0.5 * jitter01.clamp(0.0, 1.0)),
                )
            }
        };
        w.min(self.max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_sorted_into_retry_and_fatal() {
        assert_eq!(verdict(Some(200), None), Verdict::Done);
        assert_eq!(verdict(None, None), Verdict::Retry { retry_after: None });
        assert_eq!(
            verdict(Some(429), Some("3")),
            Verdict::Retry {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            verdict(Some(503), Some("0.5")),
            Verdict::Retry {
                retry_after: Some(Duration::from_millis(500))
            }
        );
        // Retry-After only counts for 429/503; an HTTP date is not parsed.
        assert_eq!(
            verdict(Some(500), Some("3")),
            Verdict::Retry { retry_after: None }
        );
        assert_eq!(
            verdict(Some(429), Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Verdict::Retry { retry_after: None }
        );
        for s in [400, 401, 403, 404, 422] {
            assert_eq!(verdict(Some(s), None), Verdict::Fatal, "{s}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max_wait: Duration::from_secs(1),
        };
        assert!(p.wait(1, None, 1.0 - 1e-12) <= Duration::from_millis(100));
        assert!(p.wait(1, None, 1.0 - 1e-12) > Duration::from_millis(99));
        assert_eq!(p.wait(1, None, 0.0).as_millis(), 50);
        assert_eq!(p.wait(3, None, 0.0).as_millis(), 200);
        assert_eq!(
            p.wait(9, None, 0.0).as_millis(),
            500,
            "capped at max_wait before jitter"
        );
        assert_eq!(
            p.wait(2, Some(Duration::from_millis(700)), 0.0).as_millis(),
            700
        );
        assert_eq!(
            p.wait(2, Some(Duration::from_secs(30)), 0.0),
            Duration::from_secs(1)
        );
    }
}
