//! Operator metrics (reconciles, errors by kind, duration, gateway pod reads) and the HTTP
//! server for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// The operator's own metrics, registered once and shared by every reconcile.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
    /// Failed reads of gateway pods' connections and failed pod patches, by kind.
    pub fleet_errors: Family<ErrorLabels, Counter>,
    pub deletion_cost_patches: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("confab_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        // 1 ms .. ~16 s: a reconcile is a handful of API calls.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let leader = Gauge::default();
        let fleet_errors = Family::<ErrorLabels, Counter>::default();
        let deletion_cost_patches = Counter::default();
        registry.register("reconciles", "Reconciliations started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconciliation took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "fleet_errors",
            "Failures to list gateway pods, read their connections or patch them, by kind",
            fleet_errors.clone(),
        );
        registry.register(
            "deletion_cost_patches",
            "Gateway pods whose pod-deletion-cost annotation was updated",
            deletion_cost_patches.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            fleet_errors,
            deletion_cost_patches,
        }
    }
}

/// Observes a reconcile's duration when dropped, whichever way the reconcile ends.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard drops.
    pub fn start_reconcile(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    pub fn record_error(&self, label: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: label.to_owned(),
            })
            .inc();
    }

    pub fn record_fleet_error(&self, label: &str) {
        self.fleet_errors
            .get_or_create(&ErrorLabels {
                error: label.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition (OpenMetrics flavour).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `/metrics` and `/healthz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics)
}

/// Serves the router on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).await
}

/// Binds the metrics address, failing early with the address in the message.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_expose_reconciles_errors_by_kind_and_duration() {
        let metrics = Metrics::default();
        {
            let _timer = metrics.start_reconcile();
        }
        metrics.record_error("kube");
        metrics.record_error("kube");
        metrics.record_fleet_error("timeout");
        metrics.deletion_cost_patches.inc();
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains("confab_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"confab_operator_reconcile_errors_total{error="kube"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("confab_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"confab_operator_fleet_errors_total{error="timeout"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("confab_operator_deletion_cost_patches_total 1"),
            "{text}"
        );
    }
}
