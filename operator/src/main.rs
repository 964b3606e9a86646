//! confab-operator: `crd` prints the CRD; no argument runs the operator with leader election.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use confab_operator::controller::{self, Context};
use confab_operator::crd;
use confab_operator::fleet::{self, HttpConnectionSource};
use confab_operator::metrics::{self, Metrics};
use confab_operator::resources::{
    ManagedKind, configmap, deployment, hpa, ingress, pdb, service, statefulset,
};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{info, warn};

const USAGE: &str = "usage: confab-operator [run | crd]

  run   watch ChatClusters and reconcile them (the default)
  crd   print the ChatCluster CustomResourceDefinition as YAML

Settings (environment): CONFAB_OPERATOR_METRICS_ADDR (0.0.0.0:8080), POD_NAME, POD_NAMESPACE,
CONFAB_OPERATOR_LEASE_NAME (confab-operator), CONFAB_OPERATOR_LEADER_ELECTION (true),
CONFAB_OPERATOR_WATCH_NAMESPACES (comma-separated; empty: every namespace),
CONFAB_OPERATOR_LOG_FORMAT (json|text), RUST_LOG (info).";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("run") => run().await,
        Some("crd") => {
            print!("{}", crd::crd_yaml()?);
            Ok(())
        }
        // Not in the usage: the test suite validates every builder's output with it.
        Some("dump-sample") => dump_sample(),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// Every child the builders make for the sample ChatCluster, as a YAML stream.
fn dump_sample() -> anyhow::Result<()> {
    let mut cc = confab_operator::sample::sample_cluster();
    // Backend pod overrides too, so that their rendering is validated as well.
    if let Some(managed) = cc.spec.redis.as_mut().and_then(|r| r.managed.as_mut()) {
        managed.pod = Some(confab_operator::sample::sample_pod_overrides());
    }
    let mut docs: Vec<serde_json::Value> = vec![
        serde_json::to_value(configmap::configmap(&cc)?)?,
        serde_json::to_value(deployment::deployment(
            &cc,
            &deployment::Inputs {
                secret_hash: Some("0123456789abcdef".to_owned()),
                ..deployment::Inputs::default()
            },
        )?)?,
        serde_json::to_value(service::gateway_service(&cc)?)?,
        serde_json::to_value(service::headless_service(&cc)?)?,
        serde_json::to_value(pdb::pdb(&cc)?)?,
    ];
    if let Some(hpa) = hpa::hpa(&cc)? {
        docs.push(serde_json::to_value(hpa)?);
    }
    if let Some(ingress) = ingress::ingress(&cc)? {
        docs.push(serde_json::to_value(ingress)?);
    }
    for kind in [ManagedKind::Redis, ManagedKind::RabbitMq] {
        docs.push(serde_json::to_value(service::backend_service(&cc, kind)?)?);
        if let Some(sts) = statefulset::statefulset(&cc, kind)? {
            docs.push(serde_json::to_value(sts)?);
        }
    }
    for doc in docs {
        print!("---\n{}", serde_saphyr::to_string(&doc)?);
    }
    Ok(())
}

/// `CONFAB_OPERATOR_WATCH_NAMESPACES`: namespace names, comma-separated; none means all.
fn watch_namespaces(value: &str) -> anyhow::Result<Vec<String>> {
    let mut namespaces = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let valid = name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            bail!("CONFAB_OPERATOR_WATCH_NAMESPACES: {name:?} is not a namespace name");
        }
        if !namespaces.iter().any(|n| n == name) {
            namespaces.push(name.to_owned());
        }
    }
    Ok(namespaces)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if env_or("CONFAB_OPERATOR_LOG_FORMAT", "json") == "text" {
        builder.init();
    } else {
        builder.json().init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run() -> anyhow::Result<()> {
    init_tracing();
    let metrics_addr: SocketAddr = env_or("CONFAB_OPERATOR_METRICS_ADDR", "0.0.0.0:8080")
        .parse()
        .context("CONFAB_OPERATOR_METRICS_ADDR must be host:port")?;
    let leader_election = match env_or("CONFAB_OPERATOR_LEADER_ELECTION", "true").as_str() {
        "true" => true,
        "false" => false,
        other => bail!("CONFAB_OPERATOR_LEADER_ELECTION must be true or false, not {other:?}"),
    };
    let namespaces = watch_namespaces(&env_or("CONFAB_OPERATOR_WATCH_NAMESPACES", ""))?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = metrics::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr}"))?;
    info!(%metrics_addr, "serving /metrics and /healthz");
    let server_metrics = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, server_metrics).await {
            warn!(error = %e, "metrics server stopped");
        }
    });

    let pod = std::env::var("POD_NAME").ok();
    let connections = Arc::new(HttpConnectionSource::new(fleet::SCRAPE_TIMEOUT));
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        pod.clone(),
        connections,
    ));

    // A stop flag shared by the signal handler and the controller's shutdown trigger.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        let _ = stop_tx.send(true);
    });

    if namespaces.is_empty() {
        info!("watching ChatClusters in every namespace");
    } else {
        info!(namespaces = %namespaces.join(","), "watching ChatClusters in these namespaces only");
    }
    if !leader_election {
        controller::run(ctx, &namespaces, wait_true(stop_rx)).await;
        return Ok(());
    }

    let namespace = match std::env::var("POD_NAMESPACE") {
        Ok(ns) => ns,
        Err(_) => client.default_namespace().to_owned(),
    };
    let identity = pod.unwrap_or_else(|| format!("confab-operator-{}", std::process::id()));
    let manager = LeaseManagerBuilder::new(
        client.clone(),
        env_or("CONFAB_OPERATOR_LEASE_NAME", "confab-operator"),
    )
    .with_namespace(namespace.clone())
    .with_identity(identity.clone())
    .with_field_manager(format!("confab-operator-lease-{identity}"))
    .with_duration(15)
    .with_grace(5)
    .build()
    .await
    .context("cannot set up the leader lease")?;
    let (leader_rx, lease_task) = manager.watch().await;
    info!(%namespace, %identity, "waiting for the leader lease");
    loop {
        // Standby until this replica leads, or stop.
        tokio::select! {
            _ = wait_true(leader_rx.clone()) => {},
            _ = wait_true(stop_rx.clone()) => break,
        }
        if *stop_rx.borrow() {
            break;
        }
        info!(%identity, "leading: starting the controller");
        metrics.leader.set(1);
        let mut lost = leader_rx.clone();
        let mut stop = stop_rx.clone();
        controller::run(ctx.clone(), &namespaces, async move {
            tokio::select! {
                _ = wait_false(&mut lost) => {},
                _ = wait_true_ref(&mut stop) => {},
            }
        })
        .await;
        metrics.leader.set(0);
        if *stop_rx.borrow() {
            break;
        }
        warn!(%identity, "lost the leader lease: controller stopped, standing by");
    }
    // Dropping the last receiver makes the lease task release the lease for a fast hand-over.
    drop(leader_rx);
    match lease_task.await {
        Ok(Ok(_)) => info!("released the leader lease"),
        Ok(Err(e)) => warn!(error = %e, "could not release the leader lease"),
        Err(e) => warn!(error = %e, "lease task failed"),
    }
    Ok(())
}

async fn wait_true(mut rx: tokio::sync::watch::Receiver<bool>) {
    wait_true_ref(&mut rx).await;
}

async fn wait_true_ref(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn wait_false(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| !*v).await;
}

#[cfg(test)]
mod tests {
    use super::watch_namespaces;

    #[test]
    fn watch_namespaces_are_split_trimmed_and_checked() {
        assert_eq!(
            watch_namespaces(" chat, team-b ,chat,").expect("valid"),
            ["chat", "team-b"]
        );
        assert!(watch_namespaces("").expect("valid").is_empty());
        let err = watch_namespaces("chat,Team_B").expect_err("invalid");
        assert!(
            err.to_string()
                .contains("\"Team_B\" is not a namespace name"),
            "{err}"
        );
    }
}
