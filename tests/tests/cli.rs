//! The command line as a newcomer and an operator meet it: defaults, tokens, bad settings.

use std::process::Command;

use confab_tests::{gateway_bin, start};

const SECRET: &str = "cli-test-secret-cli-test-secret-cli!";

fn gateway(dir: &std::path::Path) -> Command {
    let mut c = Command::new(gateway_bin());
    c.current_dir(dir).env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("CONFAB_") && k != "CONFAB_GATEWAY_BIN" {
            c.env_remove(k);
        }
    }
    c
}

async fn conversations(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{url}/api/conversations"))
        .bearer_auth(token)
        .send()
        .await
        .expect("HTTP request")
}

#[tokio::test]
async fn no_arguments_serves_embedded_defaults_and_prints_the_url_and_two_working_dev_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Only the port is moved off 8080 (through the env twin), so parallel runs do not collide.
    let mut cmd = gateway(dir.path());
    cmd.env("CONFAB_LISTEN", "127.0.0.1:0");
    let running = start(cmd);
    assert!(running.url.starts_with("http://127.0.0.1:"));
    let tokens: Vec<String> = running
        .stdout
        .iter()
        .filter(|l| l.starts_with("Dev token for"))
        .map(|l| l.rsplit(' ').next().expect("token at the end").to_owned())
        .collect();
    assert_eq!(tokens.len(), 2, "two dev tokens: {:?}", running.stdout);
    for token in &tokens {
        let res = conversations(&running.url, token).await;
        assert_eq!(res.status(), 200);
    }
    assert!(dir.path().join("confab-data/confab.db").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .expect("exists")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(
            mode("confab-data/confab.db"),
            0o600,
            "the database is private"
        );
        assert_eq!(mode("confab-data"), 0o700, "the data directory is private");
        for side in ["confab-data/confab.db-wal", "confab-data/confab.db-shm"] {
            if dir.path().join(side).exists() {
                assert_eq!(mode(side), 0o600, "{side}");
            }
        }
    }
    let secret = std::fs::read_to_string(dir.path().join("confab-data/dev-jwt-secret"))
        .expect("dev secret kept");
    assert!(secret.len() >= 32);
    drop(running);

    // The dev secret is kept: yesterday's token still works after a restart.
    let mut cmd = gateway(dir.path());
    cmd.env("CONFAB_LISTEN", "127.0.0.1:0");
    let again = start(cmd);
    assert_eq!(conversations(&again.url, &tokens[0]).await.status(), 200);
}

#[tokio::test]
async fn the_token_command_mints_tokens_the_gateway_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gateway(dir.path())
        .env("CONFAB_JWT_SECRET", SECRET)
        .args([
            "token",
            "--sub",
            "carol",
            "--name",
            "Carol",
            "--role",
            "agent",
            "--department",
            "d1",
            "--ttl",
            "2h",
        ])
        .output()
        .expect("token command runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let mut cmd = gateway(dir.path());
    cmd.env("CONFAB_JWT_SECRET", SECRET)
        .args(["--listen", "127.0.0.1:0"]);
    let running = start(cmd);
    assert!(
        !running.stdout.iter().any(|l| l.contains("Dev token")),
        "no dev tokens when a secret is configured"
    );
    assert_eq!(conversations(&running.url, &token).await.status(), 200);
    let foreign = gateway(dir.path())
        .env(
            "CONFAB_JWT_SECRET",
            "another-secret-another-secret-another!",
        )
        .args(["token", "--sub", "carol"])
        .output()
        .expect("token command runs");
    let foreign = String::from_utf8(foreign.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    assert_eq!(conversations(&running.url, &foreign).await.status(), 401);
}

#[tokio::test]
async fn dev_mode_refuses_a_non_loopback_listen_address_unless_dev_is_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The Docker image's CONFAB_LISTEN, without a secret: refused before anything is bound.
    let out = gateway(dir.path())
        .env("CONFAB_LISTEN", "0.0.0.0:0")
        .output()
        .expect("gateway runs");
    assert!(!out.status.success(), "dev mode on 0.0.0.0 must not serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got {stderr:?}");
    assert!(
        lines[0].contains("CONFAB_LISTEN") && lines[0].contains("--dev"),
        "{:?}",
        lines[0]
    );
    assert!(out.stdout.is_empty(), "no URL, no dev token printed");
    assert!(
        !dir.path().join("confab-data/dev-jwt-secret").exists(),
        "no dev secret generated"
    );

    // --dev accepts it: dev tokens are printed and work.
    let mut cmd = gateway(dir.path());
    cmd.env("CONFAB_LISTEN", "0.0.0.0:0").arg("--dev");
    let running = start(cmd);
    let token = running
        .stdout
        .iter()
        .find(|l| l.starts_with("Dev token for alice"))
        .and_then(|l| l.rsplit(' ').next())
        .expect("a dev token")
        .to_owned();
    assert_eq!(conversations(&running.url, &token).await.status(), 200);
}

#[test]
fn an_invalid_setting_stops_start_up_with_one_line_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &str, &str)] = &[
        ("CONFAB_LISTEN", "nowhere", "CONFAB_LISTEN"),
        (
            "CONFAB_DATABASE_URL",
            "mysql://db/chat",
            "CONFAB_DATABASE_URL",
        ),
        ("CONFAB_JWT_SECRET", "short", "CONFAB_JWT_SECRET"),
        ("CONFAB_MAX_FRAME_BYTES", "12", "CONFAB_MAX_FRAME_BYTES"),
        ("CONFAB_BUS", "carrier-pigeon", "CONFAB_BUS"),
        (
            "CONFAB_ALLOWED_ORIGINS",
            "chat.example.com",
            "CONFAB_ALLOWED_ORIGINS",
        ),
    ];
    for (key, value, named) in cases {
        let out = gateway(dir.path())
            .env(key, value)
            .env("CONFAB_DATA_DIR", dir.path().join("data"))
            .output()
            .expect("gateway runs");
        assert!(!out.status.success(), "{key}={value} must stop start-up");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{key}={value}: one line, got {stderr:?}");
        assert!(
            lines[0].contains(named),
            "{key}={value}: {:?} names {named}",
            lines[0]
        );
        assert!(out.stdout.is_empty(), "nothing served, nothing printed");
    }
}
