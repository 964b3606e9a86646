//! `Origin` allow-list on WebSocket upgrades and polling: cross-site WebSocket hijacking stops here.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::protocol::{ErrorBody, ErrorReply};

/// The origins allowed to open realtime connections. Matching is exact: scheme, host and port.
pub struct OriginPolicy {
    pub allowed: Vec<String>,
}

impl OriginPolicy {
    /// `None` (no `Origin` header: not a browser) passes; `null`, look-alikes and anything
    /// not listed are refused.
    pub fn permits(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(o) => self.allowed.iter().any(|a| a == o),
        }
    }
}

pub async fn check(State(policy): State<Arc<OriginPolicy>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let realtime = path.starts_with("/socket.io") || path == "/ws";
    if realtime {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        if !policy.permits(origin) {
            tracing::warn!(origin = ?origin.map(|o| o.escape_debug().to_string()), "refused a realtime request from a foreign origin");
            let body = ErrorReply {
                error: ErrorBody {
                    code: "forbidden".into(),
                    message: "origin not allowed".into(),
                },
            };
            return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_listed_origins_pass_and_non_browsers_are_let_through() {
        let p = OriginPolicy {
            allowed: vec!["https://chat.example.com".into()],
        };
        assert!(p.permits(None));
        assert!(p.permits(Some("https://chat.example.com")));
        assert!(!p.permits(Some("null")));
        assert!(!p.permits(Some("https://chat.example.com.evil.io")));
        assert!(!p.permits(Some("https://evilchat.example.com")));
        assert!(!p.permits(Some("http://chat.example.com")));
        assert!(!p.permits(Some("https://chat.example.com:8443")));
    }
}
