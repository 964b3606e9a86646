//! The `ChatCluster` custom resource: spec, status and the CRD generated from them.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Confab resource.
pub const GROUP: &str = "confab.dev";

/// A fleet of Confab gateways and, optionally, the Redis and RabbitMQ they share.
// kube's derive takes one `printcolumn(...)` per column, which clippy reads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "confab.dev",
    version = "v1alpha1",
    kind = "ChatCluster",
    plural = "chatclusters",
    singular = "chatcluster",
    shortname = "cc",
    category = "confab",
    namespaced,
    status = "ChatClusterStatus",
    derive = "PartialEq",
    doc = "A fleet of Confab chat gateways wired to Postgres, Redis and RabbitMQ",
    scale(
        spec_replicas_path = ".spec.gateway.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Gateway pods ready"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections",
        description = "Live client connections"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(self.gateway.replicas <= 1 && !has(self.gateway.autoscaling)) || has(self.rabbitmq) || has(self.redis)",
     "message": "more than one gateway needs a bus between them: add spec.rabbitmq or spec.redis, or run one replica"}
]))]
pub struct ChatClusterSpec {
    pub gateway: GatewaySpec,
    pub auth: AuthSpec,
    pub postgres: PostgresSpec,
    /// Shared presence, typing and rate-limit state; without it each gateway keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<BackendSpec>,
    /// Event routing between gateways; without it Redis pub/sub (or the in-process bus) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<BackendSpec>,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,
}

impl ChatClusterSpec {
    /// What is wrong with this spec, each as a sentence saying what to change. The CRD's CEL
    /// rules refuse most of these at admission; this catches objects stored before a rule
    /// existed and API servers that do not evaluate CEL.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.gateway.image.trim().is_empty() {
            problems
                .push("spec.gateway.image is empty: set it to a confab-gateway image".to_owned());
        }
        if self.auth.jwt_secret_ref.is_some() == self.auth.jwt_public_key_ref.is_some() {
            problems.push(
                "set exactly one of spec.auth.jwtSecretRef and spec.auth.jwtPublicKeyRef"
                    .to_owned(),
            );
        }
        for (name, backend) in [("redis", &self.redis), ("rabbitmq", &self.rabbitmq)] {
            if let Some(b) = backend
                && b.managed.is_some() == b.external.is_some()
            {
                problems.push(format!(
                    "set exactly one of spec.{name}.managed and spec.{name}.external"
                ));
            }
        }
        if let Some(a) = &self.gateway.autoscaling
            && a.min_replicas > a.max_replicas
        {
            problems.push(format!(
                "spec.gateway.autoscaling.minReplicas ({}) exceeds maxReplicas ({}): lower min or raise max",
                a.min_replicas, a.max_replicas
            ));
        }
        let many = self.gateway.replicas > 1 || self.gateway.autoscaling.is_some();
        if many && self.redis.is_none() && self.rabbitmq.is_none() {
            problems.push(
                "more than one gateway needs a bus between them: add spec.rabbitmq or spec.redis, or run one replica"
                    .to_owned(),
            );
        }
        problems
    }
}

/// The gateway pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
     "message": "gateway.autoscaling.minReplicas must not exceed maxReplicas"}
]))]
pub struct GatewaySpec {
    /// Container image of confab-gateway.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Pod count when autoscaling is not set.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Connections one pod accepts before refusing new ones.
    #[serde(default = "default_max_connections_per_pod")]
    #[schemars(range(min = 1))]
    pub max_connections_per_pod: i32,
    /// Browser origins allowed to open WebSockets (exact match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// Horizontal autoscaling on live connections per pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1))]
    pub target_connections_per_pod: i32,
}

/// How gateways verify tokens: an HS256 secret or an RS256 public key, never both.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.jwtSecretRef) != has(self.jwtPublicKeyRef)",
     "message": "set exactly one of auth.jwtSecretRef and auth.jwtPublicKeyRef"}
]))]
pub struct AuthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_ref: Option<SecretKeyRef>,
}

/// The message store; always external (a managed Postgres is not offered).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Secret key holding a `postgres://` URL.
    pub url_secret_ref: SecretKeyRef,
}

/// A key of a Secret in the ChatCluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A backend either run by the operator (for development) or reached by URL.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.managed) != has(self.external)",
     "message": "set exactly one of managed and external"}
]))]
pub struct BackendSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalBackend>,
}

/// A single-node instance the operator runs as a StatefulSet (no clustering, for development).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedBackend {
    /// Only one node: the operator does not configure Redis replication or RabbitMQ clustering.
    #[serde(default = "default_backend_replicas")]
    #[schemars(range(min = 0, max = 1))]
    pub replicas: i32,
    /// Size of the data volume, e.g. `1Gi`.
    #[serde(default = "default_storage")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub storage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Overrides the default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A backend outside the cluster's control, reached through a URL kept in a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalBackend {
    pub url_secret_ref: SecretKeyRef,
}

/// How a change of the pod template rolls the fleet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Seconds a draining pod spreads its clients' reconnects over.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: i32,
    /// Fleet-wide ceiling on reconnects a rollout may cause.
    #[serde(default = "default_max_reconnects")]
    #[schemars(range(min = 1))]
    pub max_reconnects_per_second: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            drain_seconds: default_drain_seconds(),
            max_reconnects_per_second: default_max_reconnects(),
        }
    }
}

/// Per-user flow limits and frame size.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    #[serde(default = "default_messages_per_second")]
    #[schemars(range(min = 1))]
    pub messages_per_second: i32,
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1))]
    pub burst: i32,
    #[serde(default = "default_max_frame_bytes")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_frame_bytes: i32,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            messages_per_second: default_messages_per_second(),
            burst: default_burst(),
            max_frame_bytes: default_max_frame_bytes(),
        }
    }
}

/// Where traces and metrics are pushed over OTLP.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// What the operator last observed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Gateway pods the Deployment has (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Live connections across the fleet, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// Label selector of the gateway pods (the scale subresource reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Hash of the gateway pod template the fleet is rolling to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// The connection-draining rollout: budget, progress and what it was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// How the gateway fleet rolls, as of the last reconcile.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Gateway pods on the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Pods that may drain at once (the Deployment's maxSurge; maxUnavailable is 0).
    #[serde(default)]
    pub pods_draining_at_once: i32,
    /// Connections per pod the budget was computed with: the fullest pod's, or
    /// spec.gateway.maxConnectionsPerPod while no pod has reported.
    #[serde(default)]
    pub connections_per_pod: i64,
    /// Pods draining now (terminating, or reporting confab_draining).
    #[serde(default)]
    pub draining_pods: i32,
    /// Pods whose connection count the operator has not been able to read yet.
    #[serde(default)]
    pub pods_without_counts: i32,
}

/// The one-word summary `kubectl get chatclusters` shows.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Progressing,
    Ready,
    Degraded,
    Terminating,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Terminating => "Terminating",
        }
    }
}

fn default_replicas() -> i32 {
    2
}
fn default_max_connections_per_pod() -> i32 {
    10_000
}
fn default_min_replicas() -> i32 {
    2
}
fn default_target_connections() -> i32 {
    5_000
}
fn default_backend_replicas() -> i32 {
    1
}
fn default_storage() -> String {
    "1Gi".to_owned()
}
fn default_drain_seconds() -> i32 {
    60
}
fn default_max_reconnects() -> i32 {
    500
}
fn default_messages_per_second() -> i32 {
    10
}
fn default_burst() -> i32 {
    20
}
fn default_max_frame_bytes() -> i32 {
    65_536
}

/// The CRD as YAML, exactly what `crds/chatcluster.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let body = serde_saphyr::to_string(&ChatCluster::crd())?;
    Ok(format!(
        "# Generated by `confab-operator crd`; do not edit.\n---\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::sample_cluster;

    #[test]
    fn the_sample_spec_has_no_problems() {
        assert_eq!(sample_cluster().spec.problems(), Vec::<String>::new());
    }

    #[test]
    fn both_jwt_kinds_at_once_is_a_problem_that_says_what_to_fix() {
        let mut spec = sample_cluster().spec;
        spec.auth.jwt_public_key_ref = Some(SecretKeyRef {
            name: "k".into(),
            key: "pem".into(),
        });
        assert_eq!(
            spec.problems(),
            vec!["set exactly one of spec.auth.jwtSecretRef and spec.auth.jwtPublicKeyRef"]
        );
    }

    #[test]
    fn managed_and_external_redis_together_is_a_problem() {
        let mut spec = sample_cluster().spec;
        if let Some(redis) = spec.redis.as_mut() {
            redis.external = Some(ExternalBackend {
                url_secret_ref: SecretKeyRef {
                    name: "r".into(),
                    key: "u".into(),
                },
            });
        }
        assert_eq!(
            spec.problems(),
            vec!["set exactly one of spec.redis.managed and spec.redis.external"]
        );
    }

    #[test]
    fn many_gateways_without_a_bus_is_a_problem() {
        let mut spec = sample_cluster().spec;
        spec.redis = None;
        spec.rabbitmq = None;
        assert_eq!(spec.problems().len(), 1);
        assert!(spec.problems()[0].contains("add spec.rabbitmq or spec.redis"));
        spec.gateway.autoscaling = None;
        spec.gateway.replicas = 1;
        assert!(spec.problems().is_empty());
    }

    #[test]
    fn inverted_autoscaling_bounds_are_a_problem() {
        let mut spec = sample_cluster().spec;
        if let Some(a) = spec.gateway.autoscaling.as_mut() {
            a.min_replicas = 5;
            a.max_replicas = 2;
        }
        assert!(
            spec.problems()[0]
                .starts_with("spec.gateway.autoscaling.minReplicas (5) exceeds maxReplicas (2)")
        );
    }

    #[test]
    fn crd_has_subresources_short_name_columns_and_cel_rules() {
        let crd = ChatCluster::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["cc".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        let subresources = version.subresources.as_ref().expect("subresources");
        assert!(subresources.status.is_some());
        let scale = subresources.scale.as_ref().expect("scale subresource");
        assert_eq!(scale.spec_replicas_path, ".spec.gateway.replicas");
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .expect("columns")
            .iter()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(columns, ["Ready", "Connections", "Phase", "Age"]);
        let json = serde_json::to_string(&crd).expect("serializes");
        assert!(json.contains("has(self.managed) != has(self.external)"));
        assert!(json.contains(r#""x-kubernetes-list-map-keys":["type"]"#));
        assert!(json.contains(r#""x-kubernetes-list-type":"map""#));
    }

    #[test]
    fn crds_directory_matches_the_generated_crd() {
        let generated = crd_yaml().expect("crd serializes");
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/chatcluster.yaml");
        let on_disk = std::fs::read_to_string(root).expect("crds/chatcluster.yaml exists");
        assert!(
            on_disk == generated,
            "crds/chatcluster.yaml is stale: run scripts/gen-crds.sh"
        );
    }

    #[test]
    fn chart_crd_is_byte_identical_to_the_top_level_crd() {
        let top = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/chatcluster.yaml"
        ))
        .expect("top-level crd");
        let chart = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/confab-operator/crds/chatcluster.yaml"
        ))
        .expect("chart crd");
        assert!(
            top == chart,
            "charts/confab-operator/crds/chatcluster.yaml differs: run scripts/gen-crds.sh"
        );
    }
}
