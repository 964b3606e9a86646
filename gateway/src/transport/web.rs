//! The web chat page at `/`: static files embedded in the binary, and dev-mode one-click sign-in.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::Gateway;
use super::http::ApiError;
use crate::chat::check_user_id;
use crate::chat::error::ChatError;

/// Only files from this origin; no inline script or style, no framing. `'self'` in
/// `connect-src` also covers the same-origin `ws://` upgrade (CSP level 3). `blob:` images are
/// the attachment thumbnails the page fetched itself (with its token, which `<img src>` cannot
/// send) and shows through object URLs.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's files: URL path, content type, bytes.
pub const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/style.css"),
    ),
    (
        "/vendor/socket.io.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/vendor/socket.io.min.js"),
    ),
];

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary; revalidating keeps a restarted gateway's page current.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DevTokenRequest {
    pub user_id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DevTokenReply {
    pub token: String,
    pub user_id: String,
    pub name: String,
    pub exp: i64,
}

const DEV_TOKEN_HOURS: i64 = 24;

/// Mints a token for anyone who asks. Mounted only when the gateway signs with its generated dev
/// secret, which never protects anything real.
async fn dev_token(
    State(gw): State<Arc<Gateway>>,
    body: Result<Json<DevTokenRequest>, JsonRejection>,
) -> Result<Json<DevTokenReply>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError(ChatError::invalid(e.body_text())))?;
    check_user_id("userId", &req.user_id)?;
    let name = req
        .name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| req.user_id.clone());
    check_user_id("name", &name)?;
    let token = gw
        .auth
        .mint(
            &req.user_id,
            &name,
            vec![],
            vec![],
            chrono::Duration::hours(DEV_TOKEN_HOURS),
        )
        .ok_or_else(|| {
            tracing::error!("dev token requested but the key cannot sign");
            ApiError(ChatError::Unavailable)
        })?;
    let exp = chrono::Utc::now().timestamp() + DEV_TOKEN_HOURS * 3600;
    Ok(Json(DevTokenReply {
        token,
        user_id: req.user_id,
        name,
        exp,
    }))
}

/// Lets the page decide whether to offer one-click sign-in.
async fn dev_info() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "devMode": true }))
}

/// The page's routes; the dev endpoints exist only when `dev_mode` (elsewhere they are 404).
pub fn routes(dev_mode: bool) -> Router<Arc<Gateway>> {
    let mut router = Router::new();
    for &(path, content_type, body) in ASSETS {
        router = router.route(path, get(move || async move { asset(content_type, body) }));
    }
    if dev_mode {
        router = router
            .route("/api/dev", get(dev_info))
            .route("/api/dev/token", post(dev_token));
    }
    router
}

#[cfg(test)]
mod tests;
