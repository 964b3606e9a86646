//! `confab-gateway`: parse config → init telemetry → build the app → serve until a signal.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use confab_gateway::app::{self, App};
use confab_gateway::config::{Cli, Command, Config, DrainArgs};
use confab_gateway::telemetry;

/// One line naming the setting, instead of clap's multi-line report.
fn setting_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let first = e
        .to_string()
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned();
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return first;
    };
    let long = arg
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches("--");
    let env = Cli::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()));
    match env {
        Some(env) => format!("invalid setting {env}: {first}"),
        None => first,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn token(config: &Config, args: &confab_gateway::config::TokenArgs) -> Result<String, String> {
    let (auth, _) = app::authenticator(config).map_err(|e| e.to_string())?;
    let ttl = chrono::Duration::from_std(args.ttl).map_err(|e| format!("invalid --ttl: {e}"))?;
    auth.mint(
        &args.sub,
        args.name.as_deref().unwrap_or(&args.sub),
        args.roles.clone(),
        args.departments.clone(),
        ttl,
    )
    .ok_or_else(|| {
        "cannot mint tokens with CONFAB_JWT_PUBLIC_KEY: set CONFAB_JWT_SECRET or use the dev secret"
            .into()
    })
}

async fn conformance(listen: std::net::SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("conformance mode listening on http://{listen}");
    confab_gateway::transport::engineio::conformance::serve(listener, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn serve(config: Config) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            format!(
                "invalid setting CONFAB_LISTEN: cannot listen on {}: {e}",
                config.listen
            )
        })?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let app = App::build(&config, local)
        .await
        .map_err(|e| e.to_string())?;
    let host = if local.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        local.ip().to_string()
    };
    let url = format!("http://{host}:{}", local.port());
    println!("Confab gateway listening on {url}");
    if let Some(path) = &app.dev_secret_path {
        let mint = |sub: &str, name: &str| {
            app.gateway
                .auth
                .mint(sub, name, vec![], vec![], chrono::Duration::hours(24))
                .unwrap_or_default()
        };
        println!(
            "Dev mode: tokens are signed with the secret in {} (set CONFAB_JWT_SECRET in production).",
            path.display()
        );
        println!("Dev token for alice (24h): {}", mint("alice", "Alice"));
        println!("Dev token for bob   (24h): {}", mint("bob", "Bob"));
        println!("More: confab-gateway token --sub carol --name Carol");
    }
    tracing::info!(%url, "serving");
    // The first signal starts the drain; a second one stops at once.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = first_tx.send(());
        shutdown_signal().await;
        let _ = second_tx.send(());
    });
    app::serve(
        listener,
        app,
        async move {
            let _ = first_rx.await;
        },
        async move {
            let _ = second_rx.await;
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// `confab-gateway drain`: asks the gateway to drain and, with `--wait`, waits until it has.
async fn drain(config: &Config, args: &DrainArgs) -> Result<(), String> {
    let url = args.url.clone().unwrap_or_else(|| {
        let listen = config.listen;
        let host = if listen.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            listen.ip().to_string()
        };
        format!("http://{host}:{}", listen.port())
    });
    let url = url.trim_end_matches('/').to_owned();
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let (auth, _) = app::authenticator(config).map_err(|e| e.to_string())?;
            auth.mint(
                "confab-drain",
                "confab-gateway drain",
                vec!["admin".into()],
                vec![],
                chrono::Duration::minutes(10),
            )
            .ok_or_else(|| {
                "cannot mint an admin token with CONFAB_JWT_PUBLIC_KEY: pass --token or set CONFAB_ADMIN_TOKEN".to_owned()
            })?
        }
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let started = client
        .post(format!("{url}/admin/drain"))
        .bearer_auth(&token)
        .send()
        .await
        .map_err(|e| format!("cannot reach the gateway at {url}: {e}"))?;
    let status = started.status();
    let body = started.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!("{url} refused the drain: {status}: {body}"));
    }
    println!("{body}");
    if !args.wait {
        return Ok(());
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let Ok(response) = client
            .get(format!("{url}/admin/drain"))
            .bearer_auth(&token)
            .send()
            .await
        else {
            // Gone: the gateway finished and exited.
            return Ok(());
        };
        let body = response.text().await.unwrap_or_default();
        let state: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if state["state"] == "drained" {
            println!("{body}");
            return Ok(());
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("confab-gateway: {}", setting_error(&e));
            return ExitCode::from(2);
        }
    };
    let serving = matches!(cli.command, Some(Command::Serve) | None);
    // Spans go over OTLP only from the server; a bad endpoint stops start-up in one line.
    let otlp = match cli.config.otlp() {
        Ok(otlp) => otlp.filter(|_| serving),
        Err(e) => {
            eprintln!("confab-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let tracing = match telemetry::init(
        cli.config.log_format,
        otlp.as_ref(),
        cli.config.node_id.as_deref(),
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("confab-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.command {
        Some(Command::Token(args)) => token(&cli.config, args).map(|t| println!("{t}")),
        Some(Command::Drain(args)) => drain(&cli.config, args).await,
        Some(Command::Conformance(args)) => conformance(args.listen).await,
        Some(Command::Serve) | None => serve(cli.config).await,
    };
    // The last spans; the OTLP client blocks, so off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
