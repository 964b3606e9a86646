//! Tests of the page's routes through the real router, as `App::build` wires it.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{ASSETS, CONTENT_SECURITY_POLICY};
use crate::app::App;
use crate::config::Config;

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(&name)
            .map(|v| v.to_str().expect("ascii header"))
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn app(config: &Config) -> App {
    App::build(config, "127.0.0.1:0".parse().expect("address"))
        .await
        .expect("the app builds")
}

/// A gateway on its generated dev secret (no key configured), in a private data directory.
async fn dev_app() -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_test();
    config.jwt_secret = None;
    config.data_dir = dir.path().to_path_buf();
    let app = app(&config).await;
    assert!(
        app.dev_secret_path.is_some(),
        "no key configured means dev mode"
    );
    (app, dir)
}

async fn call(app: &App, method: &str, path: &str, body: Option<Value>) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .router
        .clone()
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("the router always answers");
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 4 << 20)
        .await
        .expect("body")
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn the_page_is_served_at_the_root_with_a_strict_content_security_policy() {
    let app = app(&Config::for_test()).await;
    let page = call(&app, "GET", "/", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header(header::CONTENT_TYPE),
        "text/html; charset=utf-8"
    );
    let csp = page.header(header::CONTENT_SECURITY_POLICY);
    assert_eq!(csp, CONTENT_SECURITY_POLICY);
    assert!(csp.starts_with("default-src 'self';"), "{csp}");
    assert!(
        !csp.contains("unsafe"),
        "no unsafe-inline/unsafe-eval: {csp}"
    );
    assert_eq!(page.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");

    let html = String::from_utf8(page.body).expect("utf-8");
    assert!(html.contains(r#"<script src="/vendor/socket.io.min.js"></script>"#));
    assert!(html.contains(r#"<script type="module" src="/app.js"></script>"#));
    // Every script tag loads a file: the policy would block inline code anyway, and the page
    // must not depend on it.
    for tag in html.split("<script").skip(1) {
        let open = tag.split('>').next().unwrap_or_default();
        assert!(open.contains("src=\"/"), "inline script: <script{open}>");
        assert!(
            tag[open.len() + 1..].starts_with("</script>"),
            "script with a body"
        );
    }
    assert!(
        !html.contains("style=\""),
        "inline styles are blocked by the policy"
    );
    let handler = html.split(" on").skip(1).find(|rest| {
        let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
        !name.is_empty() && rest[name.len()..].starts_with('=')
    });
    assert!(
        handler.is_none(),
        "inline handlers are blocked by the policy"
    );
}

#[tokio::test]
async fn every_asset_is_served_with_its_content_type_and_exact_bytes() {
    let app = app(&Config::for_test()).await;
    for &(path, content_type, bytes) in ASSETS {
        let got = call(&app, "GET", path, None).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert_eq!(got.header(header::CONTENT_TYPE), content_type, "{path}");
        assert_eq!(
            got.header(header::CONTENT_SECURITY_POLICY),
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(got.body, bytes, "{path}");
    }
    let script = call(&app, "GET", "/app.js", None).await;
    assert!(String::from_utf8_lossy(&script.body).contains("clientMsgId"));
    let css = call(&app, "GET", "/style.css", None).await;
    assert!(String::from_utf8_lossy(&css.body).contains("@media"));
}

#[tokio::test]
async fn the_vendored_socket_io_client_is_the_pinned_release() {
    let app = app(&Config::for_test()).await;
    let got = call(&app, "GET", "/vendor/socket.io.min.js", None).await;
    assert_eq!(got.status, StatusCode::OK);
    let head = String::from_utf8_lossy(&got.body[..200.min(got.body.len())]).into_owned();
    let pinned: Value = serde_json::from_str(include_str!("../../../../tests/js/package.json"))
        .expect("tests/js/package.json");
    let version = pinned["dependencies"]["socket.io-client"]
        .as_str()
        .expect("socket.io-client is pinned");
    assert!(
        head.contains(&format!("Socket.IO v{version}")),
        "the vendored bundle is not socket.io-client {version}: {head}"
    );
}

#[tokio::test]
async fn unknown_paths_stay_json_404s() {
    let app = app(&Config::for_test()).await;
    let got = call(&app, "GET", "/nope.js", None).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn dev_mode_mints_a_token_that_the_gateway_accepts() {
    let (app, _dir) = dev_app().await;
    let info = call(&app, "GET", "/api/dev", None).await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(info.json(), json!({"devMode": true}));

    let got = call(
        &app,
        "POST",
        "/api/dev/token",
        Some(json!({"userId": "carol", "name": "Carol"})),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let reply = got.json();
    assert_eq!(reply["userId"], "carol");
    assert_eq!(reply["name"], "Carol");
    let token = reply["token"].as_str().expect("a token");
    let who = app.gateway.auth.verify(token).expect("the token verifies");
    assert_eq!(who.user_id, "carol");
    assert_eq!(who.name, "Carol");
    assert!(who.roles.is_empty(), "dev tokens grant no roles");
    assert_eq!(reply["exp"].as_i64(), Some(who.exp));

    let unnamed = call(
        &app,
        "POST",
        "/api/dev/token",
        Some(json!({"userId": "dave"})),
    )
    .await;
    assert_eq!(unnamed.json()["name"], "dave");
}

#[tokio::test]
async fn dev_mode_refuses_malformed_token_requests() {
    let (app, _dir) = dev_app().await;
    for body in [
        json!({"userId": ""}),
        json!({"userId": "a\nb"}),
        json!({"userId": "x".repeat(201)}),
        json!({"userId": "eve", "roles": ["admin"]}),
        json!({"name": "nobody"}),
    ] {
        let got = call(&app, "POST", "/api/dev/token", Some(body.clone())).await;
        assert_eq!(got.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(got.json()["error"]["code"], "invalid", "{body}");
    }
}

#[tokio::test]
async fn with_a_configured_secret_there_is_no_dev_sign_in() {
    let app = app(&Config::for_test()).await;
    assert!(app.dev_secret_path.is_none());
    let token = call(
        &app,
        "POST",
        "/api/dev/token",
        Some(json!({"userId": "mallory"})),
    )
    .await;
    assert_eq!(token.status, StatusCode::NOT_FOUND);
    assert_eq!(token.json()["error"]["code"], "not_found");
    let info = call(&app, "GET", "/api/dev", None).await;
    assert_eq!(info.status, StatusCode::NOT_FOUND);
    // The page itself is still there, for pasted tokens.
    assert_eq!(call(&app, "GET", "/", None).await.status, StatusCode::OK);
}
