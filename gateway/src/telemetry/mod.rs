//! Telemetry: OpenTelemetry metrics (Prometheus text at `/metrics`, OTLP when configured),
//! `tracing` logs (text or JSON) with audit events, and spans exported over OTLP.
//!
//! - [`metrics`]: the instruments ([`Metrics`]), shared through an `Arc` by the chat service and
//!   the transports.
//! - [`instrumented`]: backend decorators timing every store, bus, presence and limits call.
//! - [`audit`]: the audit log (connects, auth failures, membership changes, admin actions).

pub mod audit;
pub mod instrumented;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, OtlpEndpoint};
pub use metrics::{Backend, ConnectionGuard, Metrics, Stamp, Transport};

/// How often metrics are pushed over OTLP.
const OTLP_METRICS_INTERVAL: Duration = Duration::from_secs(15);
const OTLP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the Prometheus exporter: {0}")]
    Prometheus(String),
    #[error("invalid setting CONFAB_OTLP_ENDPOINT: cannot set up the OTLP exporter: {0}")]
    Otlp(String),
}

fn resource(node_id: Option<&str>) -> Resource {
    let mut builder = Resource::builder().with_service_name("confab-gateway");
    if let Some(node) = node_id {
        builder = builder.with_attribute(KeyValue::new("service.instance.id", node.to_owned()));
    }
    builder.build()
}

/// The gateway's instruments: recording into a Prometheus registry (and pushing over OTLP when
/// `otlp` is set) when `enabled`, no-ops otherwise.
pub fn build_metrics(
    enabled: bool,
    otlp: Option<&OtlpEndpoint>,
    node_id: &str,
) -> Result<Arc<Metrics>, TelemetryError> {
    if !enabled {
        return Ok(Metrics::disabled());
    }
    let registry = prometheus::Registry::new();
    let prometheus = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        // Scope labels on every series would only repeat "confab-gateway".
        .scope_info_enabled(false)
        .build()
        .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
    let mut builder = SdkMeterProvider::builder()
        .with_resource(resource(Some(node_id)))
        .with_reader(prometheus);
    if let Some(endpoint) = otlp {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_endpoint(endpoint.signal_url("metrics"))
            .with_timeout(OTLP_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        builder = builder.with_reader(
            PeriodicReader::builder(exporter)
                .with_interval(OTLP_METRICS_INTERVAL)
                .build(),
        );
    }
    Ok(Metrics::new(builder.build(), registry))
}

/// `GET /metrics`: the Prometheus text exposition of every instrument.
pub fn routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    let Some(registry) = metrics.registry() else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are disabled (CONFAB_METRICS=false)\n",
        )
            .into_response();
    };
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&registry.gather()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Span export over OTLP (http/protobuf), batched on the SDK's own thread.
pub fn otlp_tracer_provider(
    endpoint: &OtlpEndpoint,
    node_id: Option<&str>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.signal_url("traces"))
        .with_timeout(OTLP_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource(node_id))
        .with_batch_exporter(exporter)
        .build())
}

/// The process's log subscriber: `format` lines to `writer`, filtered by `filter`
/// (`RUST_LOG`), and, with a `tracer`, this crate's INFO-and-above spans exported through it.
///
/// Text lines print user-controlled values Debug-quoted (`?field`, or `escape_debug()`), so a
/// value with a newline or another control character cannot start a line of its own; JSON lines
/// escape them by construction.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
    tracer: Option<SdkTracer>,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => fmt.json().with_current_span(true).boxed(),
        LogFormat::Text => fmt.fmt_fields(escaping_fields()).boxed(),
    };
    let logs = Registry::default().with(fmt.with_filter(filter));
    // Two types rather than an `Option` layer: a `None` layer would enable every callsite the
    // log filter leaves out.
    match tracer {
        Some(t) => Box::new(
            logs.with(
                tracing_opentelemetry::layer()
                    .with_tracer(t)
                    // This crate's spans, not every dependency's INFO events.
                    .with_filter(Targets::new().with_target("confab_gateway", LevelFilter::INFO)),
            ),
        ),
        None => Box::new(logs),
    }
}

/// Text-line fields with every control character escaped (`\n` → `\\n`), whatever the field's
/// sigil: `?` values are already quoted and escaped, and this also covers `%` values (error
/// texts that may quote foreign input), so no value can end a line or move the cursor.
fn escaping_fields()
-> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let escaped = escape_controls(&text);
        if field.name() == "message" {
            write!(w, "{escaped}")
        } else {
            write!(w, "{}={escaped}", field.name())
        }
    })
    .delimited(" ")
}

/// `text` with each control character replaced by its Rust escape; borrowed when there is none.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What [`init`] set up, to flush at exit.
#[derive(Default)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Exports the spans still batched. Blocking (the OTLP client is synchronous): call it from
    /// outside the async runtime, or through `spawn_blocking`.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("confab-gateway: span export at shutdown failed: {e}");
        }
    }
}

/// Installs the process's subscriber: logs to stderr in `format`, spans over OTLP when
/// `otlp` is set.
pub fn init(
    format: LogFormat,
    otlp: Option<&OtlpEndpoint>,
    node_id: Option<&str>,
) -> Result<TracingGuard, TelemetryError> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = otlp
        .map(|endpoint| otlp_tracer_provider(endpoint, node_id))
        .transpose()?;
    let tracer = provider.as_ref().map(|p| p.tracer("confab-gateway"));
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    let subscriber = subscriber(format, filter, std::io::stderr, ansi, tracer);
    // A second init (tests) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(TracingGuard { provider })
}

#[cfg(test)]
mod tests;
