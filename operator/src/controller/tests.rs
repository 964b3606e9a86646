//! Reconcile tests against a tower-test mock API server (the controller-rs `fixtures.rs` way).

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
    /// The Postgres URL Secret does not exist.
    SecretMissing,
    /// The spec names both a JWT secret and a public key.
    InvalidSpec,
    /// The ChatCluster is being deleted.
    Cleanup,
}

/// One request the operator made.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
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

impl Scenario {
    fn cluster(self) -> ChatCluster {
        let cc = sample_cluster();
        match self {
            Scenario::FinalizerCreation => cc,
            Scenario::FirstApply | Scenario::ReadyFleet | Scenario::SecretMissing => {
                with_finalizer(cc)
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
        }
    }

    /// The answer of the mock API server to one request.
    fn respond(self, cc: &ChatCluster, seen: &Seen) -> (StatusCode, Value) {
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
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "chat"}, "data": {key: "c2VjcmV0"}}),
            );
        }
        if path.ends_with("/chatclusters/demo") || path.ends_with("/chatclusters/demo/status") {
            let mut stored = serde_json::to_value(cc).expect("serializes");
            if seen.method == Method::PATCH && path.ends_with("/status") {
                stored["status"] = seen.body["status"].clone();
            }
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
        if path.ends_with("/persistentvolumeclaims") && seen.method == Method::DELETE {
            return (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": []}),
            );
        }
        if seen.is_apply() {
            let mut applied = seen.body.clone();
            applied["metadata"]["generation"] = json!(1);
            if self == Scenario::ReadyFleet {
                if path.contains("/deployments/") {
                    applied["status"] = json!({"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2});
                } else if path.contains("/statefulsets/") {
                    applied["status"] = json!({"replicas": 1, "readyReplicas": 1});
                }
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

/// Runs one reconcile of the scenario's ChatCluster against the mock API server and returns
/// its outcome with every request the operator made, in order.
async fn run(scenario: Scenario) -> (Result<Action>, Vec<Seen>, Arc<Context>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        Some("test".into()),
    ));
    let cc = scenario.cluster();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server_seen = seen.clone();
    let server_cc = cc.clone();
    let server = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let seen = Seen {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, answer) = scenario.respond(&server_cc, &seen);
            server_seen.lock().expect("not poisoned").push(seen);
            let response = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).expect("serializes")))
                .expect("valid response");
            send.send_response(response);
        }
    });
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(cc), ctx.clone()),
    )
    .await
    .expect("reconcile finished in time");
    server.abort();
    let seen = seen.lock().expect("not poisoned").clone();
    (result, seen, ctx)
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
    let event = seen
        .iter()
        .find(|s| s.method == Method::POST && s.path.ends_with("/events"))
        .expect("an event");
    assert_eq!(event.body["reason"], "Applied");
    assert_eq!(event.body["regarding"]["name"], "demo");
}

#[tokio::test]
async fn a_ready_fleet_reports_ready_and_resyncs_slowly() {
    let (result, seen, _) = run(Scenario::ReadyFleet).await;
    assert_eq!(result.expect("reconcile succeeds"), Action::requeue(RESYNC));
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
    let degraded = condition_of(status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretMissing");
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
