//! The gateway pods as the operator sees them: live connections per pod, read through a
//! [`ConnectionSource`] (the last known value kept while a pod does not answer), and each pod's
//! `controller.kubernetes.io/pod-deletion-cost`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::controller::FIELD_MANAGER;
use crate::crd::ChatCluster;
use crate::exposition::{self, GatewayMetrics, ParseError};
use crate::metrics::Metrics;
use crate::resources::{self, GATEWAY_PORT};
use crate::rollout;

/// The annotation the ReplicaSet controller reads to pick which pods a scale-down removes
/// first (lowest cost first).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// How long one pod's `/metrics` may take, connecting included: a reconcile waits for it.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// A gateway's page is a few kilobytes; anything far larger is not worth reading.
pub const MAX_PAGE_BYTES: usize = 4 << 20;
/// Pods read at the same time, so a large fleet costs ⌈pods ÷ 16⌉ timeouts at worst.
const SCRAPE_CONCURRENCY: usize = 16;

/// Where one gateway pod serves its metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    pub name: String,
    pub addr: SocketAddr,
}

/// Why one pod's connections could not be read.
#[derive(thiserror::Error, Debug)]
pub enum ScrapeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("the page is larger than {MAX_PAGE_BYTES} bytes")]
    TooLarge,
    #[error("the page is not UTF-8")]
    NotUtf8,
    #[error("unreadable metrics: {0}")]
    Parse(#[from] ParseError),
}

impl ScrapeError {
    /// A short, stable name for the error kind (a Prometheus label value).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Request(_) => "request",
            ScrapeError::Status(_) => "status",
            ScrapeError::TooLarge => "too_large",
            ScrapeError::NotUtf8 | ScrapeError::Parse(_) => "parse",
        }
    }
}

/// Reads one gateway pod's live connections; reconcile tests inject counts through it.
pub trait ConnectionSource: Send + Sync {
    fn read<'a>(&'a self, pod: &'a PodTarget)
    -> BoxFuture<'a, Result<GatewayMetrics, ScrapeError>>;
}

/// The real source: `GET http://<podIP>:<http port>/metrics`, unauthenticated, with a timeout.
pub struct HttpConnectionSource {
    client: HttpClient<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpConnectionSource {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            // Kept-alive connections are reused by the next round of reads.
            client: HttpClient::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn fetch(&self, pod: &PodTarget) -> Result<GatewayMetrics, ScrapeError> {
        let request = http::Request::get(format!("http://{}/metrics", pod.addr))
            .header(http::header::ACCEPT, "text/plain;version=0.0.4")
            .body(Empty::new())
            .map_err(|e| ScrapeError::Request(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| ScrapeError::Request(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_PAGE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    ScrapeError::TooLarge
                } else {
                    ScrapeError::Request(e.to_string())
                }
            })?
            .to_bytes();
        let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::NotUtf8)?;
        Ok(exposition::gateway_metrics(text)?)
    }
}

impl ConnectionSource for HttpConnectionSource {
    fn read<'a>(
        &'a self,
        pod: &'a PodTarget,
    ) -> BoxFuture<'a, Result<GatewayMetrics, ScrapeError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.fetch(pod))
                .await
                .unwrap_or(Err(ScrapeError::Timeout(self.timeout)))
        })
    }
}

/// One gateway pod, from its API object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPod {
    pub name: String,
    /// The uid (the name when the object has none): a pod recreated under the same name starts
    /// afresh.
    pub key: String,
    pub ready: bool,
    /// Deleted and shutting down: its preStop hook is draining it.
    pub terminating: bool,
    /// Where to read it: running with an IP and either Ready or draining. A pod that is
    /// starting, or not ready for another reason, keeps its last known count.
    pub target: Option<PodTarget>,
    /// Its current deletion-cost annotation, when readable.
    pub deletion_cost: Option<i32>,
}

/// The port named `http` of the gateway container, as the operator's Deployment declares it.
fn http_port(pod: &Pod) -> u16 {
    pod.spec
        .as_ref()
        .into_iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(GATEWAY_PORT as u16)
}

impl GatewayPod {
    /// `None` for an object without a name, which the API server never returns.
    pub fn from_pod(pod: &Pod) -> Option<GatewayPod> {
        let name = pod.metadata.name.clone()?;
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let target = match ip {
            Some(ip) if running && (ready || terminating) => Some(PodTarget {
                name: name.clone(),
                addr: SocketAddr::new(ip, http_port(pod)),
            }),
            _ => None,
        };
        let deletion_cost = pod
            .annotations()
            .get(DELETION_COST_ANNOTATION)
            .and_then(|v| v.trim().parse().ok());
        Some(GatewayPod {
            key: pod.metadata.uid.clone().unwrap_or_else(|| name.clone()),
            name,
            ready,
            terminating,
            target,
            deletion_cost,
        })
    }
}

/// What the operator knows of one pod after a round of reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReading {
    pub pod: GatewayPod,
    /// This round's reading, or the last known one; `None` when the pod never answered.
    pub metrics: Option<GatewayMetrics>,
    /// Read in this round (not remembered).
    pub fresh: bool,
}

/// The fleet after a round of reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// False when the pods could not be listed: then nothing is known.
    pub listed: bool,
    pub pods: Vec<PodReading>,
}

impl Observation {
    /// Live connections across the fleet: the sum of every known count. Unknown when the pods
    /// could not be listed or when no pod's count is known (an empty fleet has 0).
    pub fn connections(&self) -> Option<i64> {
        if !self.listed {
            return None;
        }
        let known: Vec<i64> = self
            .pods
            .iter()
            .filter_map(|r| r.metrics.map(|m| m.connections))
            .collect();
        if known.is_empty() && !self.pods.is_empty() {
            return None;
        }
        Some(known.into_iter().fold(0_i64, i64::saturating_add))
    }

    /// The figure for the drain budget: the fullest pod that is not already going away.
    pub fn connections_per_pod(&self) -> Option<i64> {
        rollout::connections_per_pod(
            self.pods
                .iter()
                .filter(|r| !r.pod.terminating)
                .filter_map(|r| r.metrics.map(|m| m.connections)),
        )
    }

    /// Pods draining now: terminating, or saying so in `confab_draining`.
    pub fn draining_pods(&self) -> i32 {
        let n = self
            .pods
            .iter()
            .filter(|r| r.pod.terminating || r.metrics.is_some_and(|m| m.draining))
            .count();
        i32::try_from(n).unwrap_or(i32::MAX)
    }

    /// Pods whose connection count has never been read.
    pub fn unknown_pods(&self) -> i32 {
        let n = self.pods.iter().filter(|r| r.metrics.is_none()).count();
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

/// What the operator remembers of one pod between reconciles.
#[derive(Clone, Copy, Debug, Default)]
struct PodMemory {
    metrics: Option<GatewayMetrics>,
    cost_patched_at: Option<Instant>,
}

/// Per ChatCluster, per pod: the last known reading and the time of the last deletion-cost
/// patch. Lost on restart, which costs one round of patches and a round of unknown counts.
#[derive(Default)]
pub struct FleetMemory {
    clusters: Mutex<HashMap<String, HashMap<String, PodMemory>>>,
}

impl FleetMemory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, PodMemory>>> {
        self.clusters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Folds this round's reads into what is remembered and forgets pods that are gone. A
    /// failed or skipped read keeps the last known value: unknown is not 0.
    fn merge(
        &self,
        cluster: &str,
        round: Vec<(GatewayPod, Option<GatewayMetrics>)>,
    ) -> Vec<PodReading> {
        let mut clusters = self.lock();
        let previous = clusters.remove(cluster).unwrap_or_default();
        let mut kept = HashMap::with_capacity(round.len());
        let mut readings = Vec::with_capacity(round.len());
        for (pod, read) in round {
            let mut memory = previous.get(&pod.key).copied().unwrap_or_default();
            if read.is_some() {
                memory.metrics = read;
            }
            readings.push(PodReading {
                metrics: memory.metrics,
                fresh: read.is_some(),
                pod: pod.clone(),
            });
            kept.insert(pod.key, memory);
        }
        clusters.insert(cluster.to_owned(), kept);
        readings
    }

    fn since_cost_patch(&self, cluster: &str, pod: &str, now: Instant) -> Option<Duration> {
        let at = self.lock().get(cluster)?.get(pod)?.cost_patched_at?;
        Some(now.saturating_duration_since(at))
    }

    fn cost_patched(&self, cluster: &str, pod: &str, at: Instant) {
        if let Some(memory) = self.lock().get_mut(cluster).and_then(|c| c.get_mut(pod)) {
            memory.cost_patched_at = Some(at);
        }
    }

    /// Drops everything about a ChatCluster (it is being deleted).
    pub fn forget(&self, cluster: &str) {
        self.lock().remove(cluster);
    }
}

/// The key a ChatCluster's pods are remembered under.
pub fn cluster_key(cc: &ChatCluster) -> String {
    format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
}

/// Lists the ChatCluster's gateway pods (the Deployment's selector) and reads each one's
/// connections. Never fails: a pod that does not answer is logged, counted in
/// `confab_operator_connection_scrape_errors_total` and keeps its last known count; when the
/// pods cannot be listed nothing is known and the rollout plans for full pods.
pub async fn observe(
    client: &Client,
    source: &dyn ConnectionSource,
    memory: &FleetMemory,
    metrics: &Metrics,
    cc: &ChatCluster,
) -> Observation {
    let ns = cc.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let listed = match api
        .list(&ListParams::default().labels(&resources::selector_string(cc)))
        .await
    {
        Ok(list) => list,
        Err(e) => {
            warn!(chatcluster = %cluster_key(cc), error = %e, "cannot list gateway pods; connection counts unknown");
            metrics.record_fleet_error("list_pods");
            return Observation::default();
        }
    };
    let pods: Vec<GatewayPod> = listed
        .items
        .iter()
        .filter_map(GatewayPod::from_pod)
        .collect();
    // Collected first: a closure held across the await trips the Send check of the
    // controller's future (rust-lang/rust#102211).
    let pending: Vec<_> = pods
        .iter()
        .map(|pod| read_pod(source, metrics, cc, pod))
        .collect();
    let reads: Vec<Option<GatewayMetrics>> = stream::iter(pending)
        .buffered(SCRAPE_CONCURRENCY)
        .collect()
        .await;
    Observation {
        listed: true,
        pods: memory.merge(&cluster_key(cc), pods.into_iter().zip(reads).collect()),
    }
}

/// One pod's reading, `None` when it is not readable now or does not answer.
async fn read_pod(
    source: &dyn ConnectionSource,
    metrics: &Metrics,
    cc: &ChatCluster,
    pod: &GatewayPod,
) -> Option<GatewayMetrics> {
    let target = pod.target.as_ref()?;
    match source.read(target).await {
        Ok(read) => Some(read),
        Err(e) => {
            warn!(chatcluster = %cluster_key(cc), pod = %pod.name, addr = %target.addr, error = %e,
                "cannot read the pod's connections; keeping the last known count");
            metrics.record_fleet_error(e.metric_label());
            None
        }
    }
}

/// Keeps each pod's deletion cost near its connection count so a scale-down removes the
/// emptiest pods first; patches only what [`rollout::deletion_cost_due`] allows, from counts
/// read in this round, and never a pod that is already going away. Returns the pods patched.
pub async fn update_deletion_costs(
    client: &Client,
    memory: &FleetMemory,
    metrics: &Metrics,
    cc: &ChatCluster,
    observation: &Observation,
) -> Vec<String> {
    let ns = cc.namespace().unwrap_or_default();
    let cluster = cluster_key(cc);
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let mut patched = Vec::new();
    for reading in &observation.pods {
        let (pod, Some(read)) = (&reading.pod, reading.metrics) else {
            continue;
        };
        if !reading.fresh || pod.terminating {
            continue;
        }
        let now = Instant::now();
        let since = memory.since_cost_patch(&cluster, &pod.key, now);
        let Some(cost) = rollout::deletion_cost_due(pod.deletion_cost, read.connections, since)
        else {
            continue;
        };
        let body = serde_json::json!({
            "metadata": {"annotations": {DELETION_COST_ANNOTATION: cost.to_string()}}
        });
        match api.patch(&pod.name, &params, &Patch::Merge(&body)).await {
            Ok(_) => {
                memory.cost_patched(&cluster, &pod.key, now);
                metrics.deletion_cost_patches.inc();
                debug!(chatcluster = %cluster, pod = %pod.name, cost, "deletion cost updated");
                patched.push(pod.name.clone());
            }
            // Deleted since it was listed: nothing to keep up to date.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                warn!(chatcluster = %cluster, pod = %pod.name, error = %e, "cannot patch the pod's deletion cost");
                metrics.record_fleet_error("patch_pod");
            }
        }
    }
    patched
}

#[cfg(test)]
#[path = "fleet/tests.rs"]
mod tests;
