//! Reconcile tests against a tower-test mock API server (the controller-rs `fixtures.rs` way).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::*;
use crate::exposition::GatewayMetrics;
use crate::sample::sample_cluster;

/// What the mock API server holds and how it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// A ChatCluster seen for the first time, without our finalizer.
    FinalizerCreation,
    /// Finalizer present, Secrets present, pods not ready yet.
    FirstApply,
    /// As `FirstApply`, but the Deployment and StatefulSets report every pod ready.
    ReadyFleet,
    /// A new image on a fleet with live connections: the rollout has begun, one pod of three
    /// is on the new template, one old pod is draining.
    BusyFleet,
    /// The operator may not list pods (an old chart's RBAC).
    PodsForbidden,
    /// The Postgres URL Secret does not exist.
    SecretMissing,
    /// The spec names both a JWT secret and a public key.
    InvalidSpec,
    /// The ChatCluster is being deleted.
    Cleanup,
    /// The API server refuses the managed Redis StatefulSet (a storage change), and the spec
    /// has a new gateway image: generation 3, last fully applied 2.
    RefusedStatefulSet,
    /// Autoscaling was just turned on: the live Deployment has 4 replicas, applied by the
    /// operator.
    AutoscalingTurnedOn,
    /// `confab.dev/paused: "true"`.
    Paused,
    /// The HPA reports it cannot read `confab_connections` (no custom-metrics adapter).
    NoMetricsAdapter,
    /// No Redis, no RabbitMQ, no autoscaling, no ingress, one gateway: the optional children
    /// do not exist.
    Minimal,
}

/// One request the operator made.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Seen {
    fn is_apply(&self) -> bool {
        self.method == Method::PATCH
            && self.query.contains("fieldManager=confab-operator")
            && self.query.contains("force=true")
    }
}

fn with_finalizer(mut cc: ChatCluster) -> ChatCluster {
    cc.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    cc
}

/// A gateway pod as the API server lists it.
fn pod(name: &str, phase: &str, ready: bool, cost: Option<&str>, terminating: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "chat", "uid": format!("uid-{name}"),
                     "labels": {"app.kubernetes.io/name": "confab-gateway", "app.kubernetes.io/instance": "demo"},
                     "annotations": {}},
        "spec": {"containers": [{"name": "gateway", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": phase, "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    });
    if let Some(cost) = cost {
        pod["metadata"]["annotations"][fleet::DELETION_COST_ANNOTATION] = json!(cost);
    }
    if terminating {
        pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    pod
}

/// What the mock API server stores; pod patches change it, as a real one would.
struct Stored {
    cluster: ChatCluster,
    pods: Vec<Value>,
    /// The value (base64) of every referenced Secret key.
    secret_value: String,
}

impl Scenario {
    fn cluster(self) -> ChatCluster {
        let cc = sample_cluster();
        match self {
            Scenario::FinalizerCreation => cc,
            Scenario::FirstApply
            | Scenario::ReadyFleet
            | Scenario::PodsForbidden
            | Scenario::SecretMissing => with_finalizer(cc),
            Scenario::BusyFleet => {
                let mut cc = with_finalizer(cc);
                cc.spec.gateway.image = "ghcr.io/confab/confab-gateway:0.2.0".to_owned();
                cc.metadata.generation = Some(2);
                cc
            }
            Scenario::InvalidSpec => {
                let mut cc = with_finalizer(cc);
                cc.spec.auth.jwt_public_key_ref = Some(SecretKeyRef {
                    name: "keys".into(),
                    key: "pub.pem".into(),
                });
                cc
            }
            Scenario::Cleanup => {
                let mut cc = with_finalizer(cc);
                cc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
                cc
            }
            Scenario::RefusedStatefulSet => {
                let mut cc = with_finalizer(cc);
                cc.spec.gateway.image = "ghcr.io/confab/confab-gateway:0.3.0".to_owned();
                cc.metadata.generation = Some(3);
                cc.status = Some(ChatClusterStatus {
                    observed_generation: Some(2),
                    phase: Some(Phase::Ready),
                    ..ChatClusterStatus::default()
                });
                cc
            }
            Scenario::AutoscalingTurnedOn | Scenario::NoMetricsAdapter => with_finalizer(cc),
            Scenario::Paused => {
                let mut cc = with_finalizer(cc);
                cc.metadata.annotations =
                    Some([(PAUSED_ANNOTATION.to_owned(), "true".to_owned())].into());
                cc
            }
            Scenario::Minimal => {
                let mut cc = with_finalizer(cc);
                cc.spec.redis = None;
                cc.spec.rabbitmq = None;
                cc.spec.gateway.autoscaling = None;
                cc.spec.gateway.ingress = None;
                cc.spec.gateway.replicas = 1;
                cc
            }
        }
    }

    /// The live gateway Deployment a GET returns.
    fn live_deployment(self) -> Option<Value> {
        let (replicas, manager) = match self {
            Scenario::AutoscalingTurnedOn => (4, FIELD_MANAGER),
            Scenario::Minimal => return None,
            // Handed over long ago.
            _ => (3, HANDOVER_MANAGER),
        };
        Some(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "demo-gateway", "namespace": "chat", "generation": 1,
                         "managedFields": [{"manager": manager, "operation": "Apply", "apiVersion": "apps/v1",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app.kubernetes.io/name": "confab-gateway"}},
                     "template": {"metadata": {}, "spec": {"containers": []}}},
        }))
    }

    fn pods(self) -> Vec<Value> {
        match self {
            Scenario::BusyFleet => vec![
                // On the old template, full, never given a cost.
                pod("gw-a", "Running", true, None, false),
                // Its cost is current.
                pod("gw-b", "Running", true, Some("4000"), false),
                // Its cost is 1 000 connections behind.
                pod("gw-c", "Running", true, Some("2000"), false),
                // Old, deleted by the rollout, draining.
                pod("gw-d", "Running", false, Some("9000"), true),
                // New, starting.
                pod("gw-e", "Pending", false, None, false),
                // New, ready, but its /metrics does not answer.
                pod("gw-f", "Running", true, None, false),
            ],
            Scenario::ReadyFleet => vec![
                pod("gw-a", "Running", true, Some("10"), false),
                pod("gw-b", "Running", true, Some("20"), false),
            ],
            _ => Vec::new(),
        }
    }

    /// The answer of the mock API server to one request.
    fn respond(self, stored: &mut Stored, seen: &Seen) -> (StatusCode, Value) {
        let not_found = || {
            (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
            )
        };
        let path = seen.path.as_str();
        if path.contains("/secrets/") {
            let name = path.rsplit('/').next().unwrap_or_default();
            if self == Scenario::SecretMissing && name == "confab-postgres" {
                return not_found();
            }
            let key = if name == "confab-auth" {
                "jwt-secret"
            } else {
                "url"
            };
            return (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "chat"}, "data": {key: stored.secret_value}}),
            );
        }
        if path == "/api/v1/namespaces/chat/pods" && seen.method == Method::GET {
            if self == Scenario::PodsForbidden {
                return (
                    StatusCode::FORBIDDEN,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "pods is forbidden"}),
                );
            }
            return (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": stored.pods}),
            );
        }
        if let Some(name) = path.strip_prefix("/api/v1/namespaces/chat/pods/") {
            assert_eq!(seen.method, Method::PATCH, "{seen:?}");
            let Some(pod) = stored
                .pods
                .iter_mut()
                .find(|p| p["metadata"]["name"] == name)
            else {
                return not_found();
            };
            for (key, value) in seen.body["metadata"]["annotations"]
                .as_object()
                .expect("annotations patch")
            {
                pod["metadata"]["annotations"][key] = value.clone();
            }
            return (StatusCode::OK, pod.clone());
        }
        if seen.method == Method::PATCH && path.ends_with("/chatclusters/demo/status") {
            // Kept, so that the next reconcile sees what this one reported.
            stored.cluster.status =
                Some(serde_json::from_value(seen.body["status"].clone()).expect("a status"));
        }
        let cc = &stored.cluster;
        if path.ends_with("/chatclusters/demo") || path.ends_with("/chatclusters/demo/status") {
            let mut stored = serde_json::to_value(cc).expect("serializes");
            if seen.method == Method::PATCH && !path.ends_with("/status") {
                // A JSON patch of the finalizers: answer with the list it leaves.
                stored["metadata"]["finalizers"] = if self == Scenario::Cleanup {
                    json!([])
                } else {
                    json!([FINALIZER])
                };
            }
            return (StatusCode::OK, stored);
        }
        if path.ends_with("/events") && seen.method == Method::POST {
            return (StatusCode::CREATED, seen.body.clone());
        }
        if path.contains("/events/") && seen.method == Method::PATCH {
            // The recorder counts a repeated event into the series of the first one.
            let name = path.rsplit('/').next().unwrap_or_default();
            return (
                StatusCode::OK,
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                       "metadata": {"name": name, "namespace": "chat"},
                       "eventTime": "2026-01-01T00:00:00.000000Z"}),
            );
        }
        if path.ends_with("/persistentvolumeclaims") && seen.method == Method::DELETE {
            return (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": []}),
            );
        }
        if seen.method == Method::GET && path.ends_with("/deployments/demo-gateway") {
            return match self.live_deployment() {
                Some(live) => (StatusCode::OK, live),
                None => not_found(),
            };
        }
        if seen.method == Method::GET {
            // Optional children looked up before a delete: none exists.
            return not_found();
        }
        if self == Scenario::RefusedStatefulSet
            && seen.is_apply()
            && path.ends_with("/statefulsets/demo-redis")
        {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                       "message": "StatefulSet.apps \"demo-redis\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"}),
            );
        }
        if seen.method == Method::PATCH
            && seen
                .query
                .contains("fieldManager=confab-operator-handover-to-hpa")
        {
            return (StatusCode::OK, seen.body.clone());
        }
        if seen.is_apply() {
            let mut applied = seen.body.clone();
            applied["metadata"]["generation"] = json!(cc.metadata.generation.unwrap_or(1));
            match self {
                Scenario::ReadyFleet if path.contains("/deployments/") => {
                    applied["status"] = json!({"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2});
                }
                Scenario::BusyFleet if path.contains("/deployments/") => {
                    // The HPA holds the fleet at three; the rollout has surged.
                    applied["spec"]["replicas"] = json!(3);
                    applied["status"] = json!({"observedGeneration": 2, "replicas": 5, "readyReplicas": 4, "updatedReplicas": 1});
                }
                Scenario::NoMetricsAdapter if path.contains("/horizontalpodautoscalers/") => {
                    applied["status"] = json!({"currentReplicas": 3, "desiredReplicas": 3, "conditions": [
                        {"type": "AbleToScale", "status": "True", "reason": "SucceededGetScale"},
                        {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric",
                         "message": "the HPA was unable to compute the replica count: unable to get metric confab_connections: no custom metrics API (custom.metrics.k8s.io) registered"}]});
                }
                Scenario::ReadyFleet | Scenario::BusyFleet if path.contains("/statefulsets/") => {
                    applied["status"] = json!({"replicas": 1, "readyReplicas": 1});
                }
                _ => {}
            }
            return (StatusCode::OK, applied);
        }
        if seen.method == Method::DELETE {
            return not_found();
        }
        panic!(
            "unexpected request in {self:?}: {} {}?{}",
            seen.method, seen.path, seen.query
        );
    }
}

/// Connection counts injected per pod name; a pod without one does not answer.
#[derive(Default)]
struct InjectedConnections {
    counts: Mutex<HashMap<String, GatewayMetrics>>,
    reads: Mutex<Vec<String>>,
}

impl InjectedConnections {
    fn set(&self, counts: &[(&str, i64, bool)]) {
        let mut map = self.counts.lock().expect("not poisoned");
        map.clear();
        for &(pod, connections, draining) in counts {
            map.insert(
                pod.to_owned(),
                GatewayMetrics {
                    connections,
                    draining,
                },
            );
        }
    }

    fn take_reads(&self) -> Vec<String> {
        let mut reads = std::mem::take(&mut *self.reads.lock().expect("not poisoned"));
        reads.sort();
        reads
    }
}

impl ConnectionSource for InjectedConnections {
    fn read<'a>(
        &'a self,
        pod: &'a fleet::PodTarget,
    ) -> futures::future::BoxFuture<'a, Result<GatewayMetrics, fleet::ScrapeError>> {
        self.reads
            .lock()
            .expect("not poisoned")
            .push(pod.name.clone());
        let answer = self
            .counts
            .lock()
            .expect("not poisoned")
            .get(&pod.name)
            .copied()
            .ok_or(fleet::ScrapeError::Timeout(fleet::SCRAPE_TIMEOUT));
        Box::pin(async move { answer })
    }
}

/// A mock API server holding one scenario, and a Context talking to it; several reconciles
/// share its memory, as in the running operator.
struct Mock {
    ctx: Arc<Context>,
    source: Arc<InjectedConnections>,
    stored: Arc<Mutex<Stored>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Mock {
    fn new(scenario: Scenario) -> Mock {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let source = Arc::new(InjectedConnections::default());
        let ctx = Arc::new(Context::new(
            client,
            Arc::new(Metrics::default()),
            Some("test".into()),
            source.clone(),
        ));
        let stored = Arc::new(Mutex::new(Stored {
            cluster: scenario.cluster(),
            pods: scenario.pods(),
            secret_value: "c2VjcmV0".to_owned(),
        }));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (server_seen, server_stored) = (seen.clone(), stored.clone());
        let server = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let seen = Seen {
                    method: parts.method,
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (status, answer) = {
                    let mut stored = server_stored.lock().expect("not poisoned");
                    scenario.respond(&mut stored, &seen)
                };
                server_seen.lock().expect("not poisoned").push(seen);
                let response = Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).expect("serializes")))
                    .expect("valid response");
                send.send_response(response);
            }
        });
        Mock {
            ctx,
            source,
            stored,
            seen,
            server,
        }
    }

    /// One reconcile; returns its outcome and the requests it made, in order.
    async fn reconcile(&self) -> (Result<Action>, Vec<Seen>) {
        let cc = self.stored.lock().expect("not poisoned").cluster.clone();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            reconcile(Arc::new(cc), self.ctx.clone()),
        )
        .await
        .expect("reconcile finished in time");
        let seen = std::mem::take(&mut *self.seen.lock().expect("not poisoned"));
        (result, seen)
    }
}

/// Runs one reconcile of the scenario's ChatCluster against the mock API server and returns
/// its outcome with every request the operator made, in order.
async fn run(scenario: Scenario) -> (Result<Action>, Vec<Seen>, Arc<Context>) {
    let mock = Mock::new(scenario);
    let (result, seen) = mock.reconcile().await;
    (result, seen, mock.ctx.clone())
}

fn applied<'a>(seen: &'a [Seen], kind: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.is_apply() && s.body["kind"] == kind)
        .collect()
}

fn status_patch(seen: &[Seen]) -> &Seen {
    seen.iter()
        .find(|s| s.method == Method::PATCH && s.path.ends_with("/status"))
        .expect("a status patch")
}

fn condition_of<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .expect("condition present")
}

#[tokio::test]
async fn first_sight_adds_the_finalizer_and_nothing_else() {
    let (result, seen, _) = run(Scenario::FinalizerCreation).await;
    assert_eq!(result.expect("reconcile succeeds"), Action::await_change());
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].method, Method::PATCH);
    assert_eq!(
        seen[0].path,
        "/apis/confab.dev/v1alpha1/namespaces/chat/chatclusters/demo"
    );
    let ops = seen[0].body.as_array().expect("a JSON patch");
    assert_eq!(ops[1]["op"], "add");
    assert_eq!(ops[1]["value"], json!([FINALIZER]));
}

#[tokio::test]
async fn first_apply_creates_every_child_with_owner_references_by_server_side_apply() {
    let (result, seen, ctx) = run(Scenario::FirstApply).await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(RECHECK)
    );
    for (kind, count) in [
        ("ConfigMap", 1),
        ("Deployment", 1),
        ("Service", 4),
        ("PodDisruptionBudget", 1),
        ("HorizontalPodAutoscaler", 1),
        ("StatefulSet", 2),
    ] {
        let children = applied(&seen, kind);
        assert_eq!(children.len(), count, "{kind} applies: {seen:#?}");
        for child in children {
            let owner = &child.body["metadata"]["ownerReferences"][0];
            assert_eq!(
                owner["uid"], "11111111-2222-3333-4444-555555555555",
                "{kind} owner"
            );
            assert_eq!(owner["controller"], true);
            assert!(child.path.starts_with("/api"), "{}", child.path);
            assert!(child.path.contains("/namespaces/chat/"), "{}", child.path);
        }
    }
    assert_eq!(
        applied(&seen, "Deployment")[0].path,
        "/apis/apps/v1/namespaces/chat/deployments/demo-gateway"
    );
    assert!(
        ctx.metrics
            .encode()
            .expect("encodes")
            .contains("confab_operator_reconciles_total 1")
    );
}

#[tokio::test]
async fn status_patch_reports_progressing_with_observed_generation() {
    let (_, seen, _) = run(Scenario::FirstApply).await;
    let patch = status_patch(&seen);
    assert!(
        patch.is_apply(),
        "status is server-side applied: {}",
        patch.query
    );
    let status = &patch.body["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["phase"], "Progressing");
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/instance=demo,app.kubernetes.io/name=confab-gateway"
    );
    assert_eq!(condition_of(status, "Progressing")["status"], "True");
    assert_eq!(condition_of(status, "Ready")["status"], "False");
    assert_eq!(condition_of(status, "Degraded")["status"], "False");
    assert_eq!(condition_of(status, "Ready")["observedGeneration"], 1);
    // No gateway pod exists yet: none has connections.
    assert_eq!(status["connections"], 0);
    let event = seen
        .iter()
        .find(|s| s.method == Method::POST && s.path.ends_with("/events"))
        .expect("an event");
    assert_eq!(event.body["reason"], "Applied");
    assert_eq!(event.body["regarding"]["name"], "demo");
}

#[tokio::test]
async fn a_ready_fleet_reports_ready_and_resyncs_often_enough_to_keep_counts_fresh() {
    let (result, seen, _) = run(Scenario::ReadyFleet).await;
    assert_eq!(result.expect("reconcile succeeds"), Action::requeue(RESYNC));
    assert!(RESYNC <= Duration::from_secs(30));
    let status = &status_patch(&seen).body["status"];
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["readyReplicas"], 2);
    assert_eq!(condition_of(status, "Ready")["status"], "True");
    assert_eq!(condition_of(status, "Progressing")["status"], "False");
    let reasons: Vec<_> = seen
        .iter()
        .filter(|s| s.path.ends_with("/events"))
        .map(|s| s.body["reason"].clone())
        .collect();
    assert_eq!(reasons, [json!("Applied"), json!("Ready")]);
}

#[tokio::test]
async fn a_missing_secret_degrades_with_a_fix_and_applies_nothing() {
    let (result, seen, _) = run(Scenario::SecretMissing).await;
    assert_eq!(
        result.expect("a missing secret is not an error"),
        Action::requeue(RECHECK)
    );
    assert!(
        seen.iter()
            .all(|s| !s.is_apply() || s.path.ends_with("/status")),
        "no child applied: {seen:#?}"
    );
    let status = &status_patch(&seen).body["status"];
    assert_eq!(status["phase"], "Degraded");
    assert!(
        status.get("observedGeneration").is_none(),
        "nothing applied: {status:#}"
    );
    let degraded = condition_of(status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretMissing");
    assert_eq!(degraded["observedGeneration"], 1);
    let message = degraded["message"].as_str().expect("message");
    assert!(
        message.contains(
            "Secret chat/confab-postgres (from spec.postgres.urlSecretRef) does not exist"
        ),
        "{message}"
    );
    assert!(
        message
            .contains("kubectl -n chat create secret generic confab-postgres --from-literal=url="),
        "{message}"
    );
    let event = seen
        .iter()
        .find(|s| s.path.ends_with("/events"))
        .expect("a warning event");
    assert_eq!(event.body["type"], "Warning");
}

#[tokio::test]
async fn an_invalid_spec_degrades_before_any_secret_is_read() {
    let (result, seen, _) = run(Scenario::InvalidSpec).await;
    assert!(result.is_ok());
    assert!(
        seen.iter().all(|s| !s.path.contains("/secrets/")),
        "{seen:#?}"
    );
    let degraded = condition_of(&status_patch(&seen).body["status"], "Degraded").clone();
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert_eq!(
        degraded["message"],
        "set exactly one of spec.auth.jwtSecretRef and spec.auth.jwtPublicKeyRef"
    );
}

#[tokio::test]
async fn deletion_removes_volume_claims_then_the_finalizer() {
    let (result, seen, _) = run(Scenario::Cleanup).await;
    assert_eq!(result.expect("cleanup succeeds"), Action::await_change());
    let delete = seen
        .iter()
        .position(|s| s.method == Method::DELETE)
        .expect("claims deleted");
    assert_eq!(
        seen[delete].path,
        "/api/v1/namespaces/chat/persistentvolumeclaims"
    );
    assert!(
        seen[delete]
            .query
            .contains("labelSelector=app.kubernetes.io%2Finstance%3Ddemo"),
        "{}",
        seen[delete].query
    );
    let unfinalize = seen
        .iter()
        .position(|s| s.method == Method::PATCH)
        .expect("finalizer removed");
    assert!(unfinalize > delete, "finalizer goes only after clean-up");
    let ops = seen[unfinalize].body.as_array().expect("a JSON patch");
    assert_eq!(
        ops[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    assert!(applied(&seen, "Deployment").is_empty());
}

#[test]
fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(2), Duration::from_secs(10));
    assert_eq!(backoff(4), Duration::from_secs(40));
    assert_eq!(backoff(10), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

#[tokio::test]
async fn errors_are_counted_by_kind_and_retried_with_growing_delays() {
    let (_, _, ctx) = run(Scenario::FinalizerCreation).await;
    let cc = Arc::new(sample_cluster());
    let error = Error::MissingField("namespace");
    assert_eq!(
        error_policy(cc.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(cc, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    let text = ctx.metrics.encode().expect("encodes");
    assert!(
        text.contains(r#"confab_operator_reconcile_errors_total{error="missing_field"} 2"#),
        "{text}"
    );
}

fn deployment_of(seen: &[Seen]) -> &Value {
    let deployments = applied(seen, "Deployment");
    assert_eq!(deployments.len(), 1, "{seen:#?}");
    &deployments[0].body
}

fn pod_patches(seen: &[Seen]) -> Vec<(String, Value)> {
    seen.iter()
        .filter(|s| {
            s.method == Method::PATCH && s.path.starts_with("/api/v1/namespaces/chat/pods/")
        })
        .map(|s| {
            assert_eq!(s.content_type, "application/merge-patch+json");
            assert!(
                s.query.contains("fieldManager=confab-operator"),
                "{}",
                s.query
            );
            (
                s.path.rsplit('/').next().unwrap_or_default().to_owned(),
                s.body["metadata"]["annotations"][fleet::DELETION_COST_ANNOTATION].clone(),
            )
        })
        .collect()
}

/// The counts of `Scenario::BusyFleet`: gw-e is starting, gw-f does not answer.
fn busy_counts(source: &InjectedConnections) {
    source.set(&[
        ("gw-a", 6_000, false),
        ("gw-b", 4_000, false),
        ("gw-c", 3_000, false),
        ("gw-d", 500, true),
    ]);
}

#[tokio::test]
async fn a_template_change_rolls_with_the_surge_the_connections_allow() {
    let mock = Mock::new(Scenario::BusyFleet);
    busy_counts(&mock.source);
    let (result, seen) = mock.reconcile().await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(RECHECK)
    );
    // Ready pods and the draining one are read; the starting one is not.
    assert_eq!(
        mock.source.take_reads(),
        ["gw-a", "gw-b", "gw-c", "gw-d", "gw-f"]
    );
    let list = seen
        .iter()
        .position(|s| s.method == Method::GET && s.path == "/api/v1/namespaces/chat/pods")
        .expect("pods listed");
    assert!(
        seen[list].query.contains(
            "labelSelector=app.kubernetes.io%2Finstance%3Ddemo%2Capp.kubernetes.io%2Fname%3Dconfab-gateway"
        ),
        "by the Deployment's selector: {}",
        seen[list].query
    );
    let deployment = deployment_of(&seen);
    let apply = seen
        .iter()
        .position(|s| s.is_apply() && s.body["kind"] == "Deployment")
        .expect("applied");
    assert!(list < apply, "counts are read before the surge is set");

    // The fullest pod not yet going away has 6 000: 500/s × 60 s ÷ 6 000 = 5 pods at once.
    let strategy = &deployment["spec"]["strategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 5);
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 75);
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "ghcr.io/confab/confab-gateway:0.2.0");
    assert_eq!(
        container["lifecycle"]["preStop"],
        json!({"exec": {"command": ["/usr/local/bin/confab-gateway", "drain", "--wait"]}})
    );
    assert_eq!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "podinfo")
            .expect("podinfo volume")["downwardAPI"],
        json!({"items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]})
    );
    assert!(
        container["volumeMounts"]
            .as_array()
            .expect("mounts")
            .contains(
                &json!({"name": "podinfo", "mountPath": "/etc/confab/podinfo", "readOnly": true})
            ),
        "{container:#}"
    );
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"],
        "demo-gateway"
    );
    let config = &applied(&seen, "ConfigMap")[0].body["data"];
    assert_eq!(config["CONFAB_DRAIN_SECONDS"], "60");
    assert_eq!(
        config["CONFAB_DRAIN_ANNOTATION_FILE"],
        "/etc/confab/podinfo/annotations"
    );
}

#[tokio::test]
async fn deletion_costs_follow_the_connection_counts() {
    let mock = Mock::new(Scenario::BusyFleet);
    busy_counts(&mock.source);
    let (_, seen) = mock.reconcile().await;
    // gw-a had no cost, gw-c's was 1 000 behind; gw-b's is current, gw-d is going away, gw-e
    // and gw-f have no count.
    assert_eq!(
        pod_patches(&seen),
        [
            ("gw-a".to_owned(), json!("6000")),
            ("gw-c".to_owned(), json!("3000"))
        ]
    );
    let text = mock.ctx.metrics.encode().expect("encodes");
    assert!(
        text.contains("confab_operator_deletion_cost_patches_total 2"),
        "{text}"
    );
    assert!(
        text.contains(r#"confab_operator_fleet_errors_total{error="timeout"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn status_reports_the_connections_and_the_rollout_progress() {
    let mock = Mock::new(Scenario::BusyFleet);
    busy_counts(&mock.source);
    let (_, seen) = mock.reconcile().await;
    let status = &status_patch(&seen).body["status"];
    // Every known count, the draining pod's included.
    assert_eq!(status["connections"], 13_500);
    assert_eq!(
        status["rollout"],
        json!({"updatedReplicas": 1, "podsDrainingAtOnce": 5, "connectionsPerPod": 6000,
               "drainingPods": 1, "podsWithoutCounts": 2})
    );
    assert_eq!(status["phase"], "Progressing");
    let progressing = condition_of(status, "Progressing");
    assert_eq!(progressing["status"], "True");
    assert_eq!(
        progressing["message"],
        "rolling: 1 of 3 pods on the current revision, 5 draining at once \
         (1 draining now, 4 ready, 6000 connections per pod)"
    );
    assert_eq!(status["observedGeneration"], 2);
}

#[tokio::test(start_paused = true)]
async fn deletion_cost_patches_are_rate_bound_and_unknown_counts_are_kept() {
    let mock = Mock::new(Scenario::BusyFleet);
    busy_counts(&mock.source);
    let (_, first) = mock.reconcile().await;
    assert_eq!(pod_patches(&first).len(), 2);

    // gw-a empties at once; gw-b stops answering.
    mock.source.set(&[
        ("gw-a", 100, false),
        ("gw-c", 3_000, false),
        ("gw-d", 400, true),
    ]);
    tokio::time::advance(Duration::from_secs(10)).await;
    let (_, second) = mock.reconcile().await;
    assert_eq!(pod_patches(&second), [], "gw-a was patched 10 s ago");
    let status = &status_patch(&second).body["status"];
    // gw-b's last known 4 000 still counts, and is now the fullest pod: 30 000 ÷ 4 000 = 7.
    assert_eq!(status["connections"], 100 + 4_000 + 3_000 + 400);
    assert_eq!(status["rollout"]["connectionsPerPod"], 4_000);
    assert_eq!(
        deployment_of(&second)["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
        7
    );

    tokio::time::advance(Duration::from_secs(21)).await;
    let (_, third) = mock.reconcile().await;
    // 31 s after its last patch gw-a gets its new cost; gw-b's stale count is never written.
    assert_eq!(pod_patches(&third), [("gw-a".to_owned(), json!("100"))]);
    let stored = mock.stored.lock().expect("not poisoned");
    let costs: Vec<_> = stored
        .pods
        .iter()
        .map(|p| p["metadata"]["annotations"][fleet::DELETION_COST_ANNOTATION].clone())
        .collect();
    assert_eq!(
        costs,
        [
            json!("100"),
            json!("4000"),
            json!("3000"),
            json!("9000"),
            Value::Null,
            Value::Null
        ]
    );
}

#[tokio::test]
async fn pods_that_never_answered_have_unknown_connections_not_zero() {
    let (result, seen, ctx) = run(Scenario::ReadyFleet).await;
    assert!(result.is_ok());
    let status = &status_patch(&seen).body["status"];
    assert!(status.get("connections").is_none(), "{status:#}");
    assert_eq!(status["rollout"]["podsWithoutCounts"], 2);
    // Planned as full pods: 500/s × 60 s ÷ 10 000.
    assert_eq!(status["rollout"]["connectionsPerPod"], 10_000);
    assert_eq!(
        deployment_of(&seen)["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
        3
    );
    assert_eq!(pod_patches(&seen), []);
    assert!(
        ctx.metrics
            .encode()
            .expect("encodes")
            .contains(r#"confab_operator_fleet_errors_total{error="timeout"} 2"#)
    );
}

#[tokio::test]
async fn a_forbidden_pod_list_is_logged_not_a_failed_reconcile() {
    let (result, seen, ctx) = run(Scenario::PodsForbidden).await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(RECHECK)
    );
    assert_eq!(
        deployment_of(&seen)["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
        3
    );
    let status = &status_patch(&seen).body["status"];
    assert!(status.get("connections").is_none(), "{status:#}");
    let text = ctx.metrics.encode().expect("encodes");
    assert!(
        text.contains(r#"confab_operator_fleet_errors_total{error="list_pods"} 1"#),
        "{text}"
    );
    assert!(
        !text.contains("confab_operator_reconcile_errors_total{"),
        "{text}"
    );
}

fn requests<'a>(seen: &'a [Seen], method: Method, path_part: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.method == method && s.path.contains(path_part))
        .collect()
}

#[tokio::test]
async fn a_refused_statefulset_does_not_hold_back_the_new_gateway_image() {
    let (result, seen, ctx) = run(Scenario::RefusedStatefulSet).await;
    assert_eq!(
        result.expect("a refusal is reported, not a failed reconcile"),
        Action::requeue(RECHECK)
    );
    // Everything after the refused child was still applied, the new image included.
    let image = &deployment_of(&seen)["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(image, "ghcr.io/confab/confab-gateway:0.3.0");
    for kind in ["PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress"] {
        assert_eq!(applied(&seen, kind).len(), 1, "{kind}");
    }
    assert_eq!(applied(&seen, "StatefulSet").len(), 2, "rabbitmq too");
    let status = &status_patch(&seen).body["status"];
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(
        status["observedGeneration"], 2,
        "generation 3 is not fully applied"
    );
    let degraded = condition_of(status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ApplyFailed");
    assert_eq!(degraded["observedGeneration"], 3);
    let message = degraded["message"].as_str().expect("message");
    assert!(message.starts_with("the API server refused StatefulSet demo-redis: StatefulSet.apps \"demo-redis\" is invalid: spec: Forbidden"), "{message}");
    assert!(message.ends_with("(422)"), "{message}");
    let warning = seen
        .iter()
        .find(|s| {
            s.method == Method::POST && s.path.ends_with("/events") && s.body["type"] == "Warning"
        })
        .expect("a Warning event");
    assert_eq!(warning.body["reason"], "ApplyFailed");
    assert!(
        warning.body["note"]
            .as_str()
            .expect("note")
            .contains("StatefulSet demo-redis")
    );
    assert!(
        ctx.metrics
            .encode()
            .expect("encodes")
            .contains(r#"confab_operator_reconcile_errors_total{error="apply"} 1"#)
    );
}

#[tokio::test]
async fn turning_autoscaling_on_hands_the_live_replicas_over_before_dropping_them() {
    let mock = Mock::new(Scenario::AutoscalingTurnedOn);
    let (result, seen) = mock.reconcile().await;
    result.expect("reconcile succeeds");
    let order: Vec<_> = seen
        .iter()
        .filter(|s| s.path.ends_with("/deployments/demo-gateway"))
        .map(|s| {
            (
                s.method.clone(),
                s.query.contains("handover"),
                s.query.contains("force=true"),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            (Method::GET, false, false),
            (Method::PATCH, true, false),
            (Method::PATCH, false, true)
        ],
        "look, hand over (without force), then apply"
    );
    let handover = seen
        .iter()
        .find(|s| {
            s.query
                .contains("fieldManager=confab-operator-handover-to-hpa")
        })
        .expect("hand-over apply");
    assert_eq!(handover.content_type, "application/apply-patch+yaml");
    assert_eq!(handover.body["spec"], json!({"replicas": 4}));
    assert!(deployment_of(&seen)["spec"].get("replicas").is_none());
}

#[tokio::test]
async fn a_handed_over_deployment_is_looked_at_once_then_left_to_the_hpa() {
    let mock = Mock::new(Scenario::FirstApply);
    let (_, seen) = mock.reconcile().await;
    assert_eq!(requests(&seen, Method::GET, "/deployments/").len(), 1);
    assert!(seen.iter().all(|s| !s.query.contains("handover")));
    let (_, seen) = mock.reconcile().await;
    assert_eq!(requests(&seen, Method::GET, "/deployments/").len(), 0);
    assert!(deployment_of(&seen)["spec"].get("replicas").is_none());
}

#[tokio::test]
async fn a_paused_cluster_is_left_alone() {
    let (result, seen, _) = run(Scenario::Paused).await;
    assert_eq!(result.expect("reconcile succeeds"), Action::await_change());
    assert!(
        seen.iter()
            .all(|s| !s.is_apply() || s.path.ends_with("/status")),
        "{seen:#?}"
    );
    assert!(requests(&seen, Method::DELETE, "/").is_empty());
    assert!(
        requests(&seen, Method::GET, "/pods").is_empty(),
        "no fleet reads either"
    );
    let status = &status_patch(&seen).body["status"];
    assert_eq!(status["phase"], "Paused");
    assert_eq!(condition_of(status, "Progressing")["reason"], "Paused");
}

#[tokio::test]
async fn absent_optional_children_are_looked_up_once_and_never_deleted_blindly() {
    let mock = Mock::new(Scenario::Minimal);
    let (result, seen) = mock.reconcile().await;
    result.expect("reconcile succeeds");
    assert!(requests(&seen, Method::DELETE, "/").is_empty(), "{seen:#?}");
    let looked_up: Vec<_> = requests(&seen, Method::GET, "/apis")
        .iter()
        .chain(requests(&seen, Method::GET, "/api/v1/namespaces/chat/services").iter())
        .map(|s| s.path.clone())
        .filter(|p| !p.contains("chatclusters"))
        .collect();
    for path in [
        "/apis/apps/v1/namespaces/chat/statefulsets/demo-redis",
        "/apis/apps/v1/namespaces/chat/statefulsets/demo-rabbitmq",
        "/api/v1/namespaces/chat/services/demo-redis",
        "/apis/autoscaling/v2/namespaces/chat/horizontalpodautoscalers/demo-gateway",
        "/apis/networking.k8s.io/v1/namespaces/chat/ingresses/demo-gateway",
    ] {
        assert!(
            looked_up.iter().any(|p| p == path),
            "{path} in {looked_up:?}"
        );
    }
    // Steady state: known absent, so neither looked up nor deleted.
    let (_, seen) = mock.reconcile().await;
    assert!(requests(&seen, Method::DELETE, "/").is_empty(), "{seen:#?}");
    let gets: Vec<_> = requests(&seen, Method::GET, "/")
        .iter()
        .map(|s| s.path.clone())
        .filter(|p| !p.contains("/secrets/") && !p.ends_with("/pods"))
        .collect();
    assert_eq!(gets, Vec::<String>::new());
}

#[tokio::test]
async fn rotating_a_secret_changes_the_pod_template_hash() {
    let mock = Mock::new(Scenario::FirstApply);
    let hash = |seen: &[Seen]| {
        deployment_of(seen)["spec"]["template"]["metadata"]["annotations"]
            [deployment::SECRET_HASH_ANNOTATION]
            .as_str()
            .expect("secret hash")
            .to_owned()
    };
    let (_, seen) = mock.reconcile().await;
    let before = hash(&seen);
    let (_, seen) = mock.reconcile().await;
    assert_eq!(hash(&seen), before, "unchanged Secrets keep the template");
    mock.stored.lock().expect("not poisoned").secret_value = "cm90YXRlZA==".to_owned();
    let (_, seen) = mock.reconcile().await;
    assert_ne!(hash(&seen), before);
    assert_eq!(hash(&seen).len(), 32);
    assert!(!hash(&seen).contains("c2VjcmV0"));
}

#[tokio::test]
async fn an_hpa_without_its_metric_shows_in_status_and_warns_once() {
    let mock = Mock::new(Scenario::NoMetricsAdapter);
    let (result, seen) = mock.reconcile().await;
    result.expect("reconcile succeeds");
    let autoscaling = &status_patch(&seen).body["status"]["autoscaling"];
    assert_eq!(autoscaling["scalingActive"], false);
    assert_eq!(autoscaling["reason"], "FailedGetPodsMetric");
    assert!(
        autoscaling["message"]
            .as_str()
            .expect("message")
            .contains("custom.metrics.k8s.io")
    );
    assert_eq!(
        (
            autoscaling["currentReplicas"].clone(),
            autoscaling["desiredReplicas"].clone()
        ),
        (json!(3), json!(3))
    );
    let warnings: Vec<_> = seen
        .iter()
        .filter(|s| s.path.ends_with("/events") && s.body["reason"] == "AutoscalingInactive")
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].body["type"], "Warning");
    assert!(
        warnings[0].body["note"]
            .as_str()
            .expect("note")
            .contains("custom-metrics adapter")
    );
    // Already reported: the next reconcile does not warn again.
    let (_, seen) = mock.reconcile().await;
    assert!(
        seen.iter()
            .all(|s| s.body["reason"] != "AutoscalingInactive")
    );
}

#[test]
fn an_hpa_that_has_not_run_yet_is_not_reported_failing() {
    let hpa = HorizontalPodAutoscaler::default();
    let status = autoscaling_status(&hpa);
    assert!(status.scaling_active);
    assert_eq!(status.reason, None);
}
