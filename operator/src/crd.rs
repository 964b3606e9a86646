//! The `ChatCluster` custom resource: spec, status and the CRD generated from them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Confab resource.
pub const GROUP: &str = "confab.dev";
/// Annotation on a ChatCluster that stops the operator from changing anything of it while
/// `"true"` (a break-glass switch for manual surgery on its children).
pub const PAUSED_ANNOTATION: &str = "confab.dev/paused";

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
     "message": "more than one gateway needs a bus between them: add spec.rabbitmq or spec.redis, or run one replica"},
    {"rule": "!has(self.attachments) || !has(self.attachments.persistentVolumeClaim) || (self.gateway.replicas <= 1 && !has(self.gateway.autoscaling))",
     "message": "attachments on a PersistentVolumeClaim serve one replica: use attachments.s3 for more"}
]))]
pub struct ChatClusterSpec {
    /// The gateway pods: image, count, placement, ingress and per-pod limits.
    pub gateway: GatewaySpec,
    /// How gateways verify client tokens.
    pub auth: AuthSpec,
    /// The message store (always external).
    pub postgres: PostgresSpec,
    /// Shared presence, typing and rate-limit state; without it each gateway keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<BackendSpec>,
    /// Event routing between gateways; without it Redis pub/sub (or the in-process bus) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<BackendSpec>,
    /// How a change of the gateway pod template rolls the fleet.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Per-user and per-address flow limits the gateways enforce.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Where gateways push traces and metrics over OTLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,
    /// Where attachment bytes are kept: an S3-compatible bucket, or a PersistentVolumeClaim for
    /// a single-replica development cluster. Without it each pod keeps them in its own
    /// emptyDir (lost with the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<AttachmentsSpec>,
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
        if self.gateway.replicas < 0 {
            problems.push(format!(
                "spec.gateway.replicas is {}: set it to 0 or more",
                self.gateway.replicas
            ));
        }
        for (i, proxy) in self.gateway.trusted_proxies.iter().enumerate() {
            if proxy.parse::<IpAddr>().is_err() {
                problems.push(format!(
                    "spec.gateway.trustedProxies[{i}] ({proxy:?}) is not an IP address: list the ingress controller's addresses"
                ));
            }
        }
        if let Some(ingress) = &self.gateway.ingress
            && ingress.host.trim().is_empty()
        {
            problems
                .push("spec.gateway.ingress.host is empty: set the public host name".to_owned());
        }
        if self.gateway.resources.is_some()
            && self
                .gateway
                .pod
                .as_ref()
                .is_some_and(|p| p.resources.is_some())
        {
            problems.push(
                "set the gateway's resources in one place: spec.gateway.pod.resources (spec.gateway.resources is the older spelling)"
                    .to_owned(),
            );
        }
        for (name, backend) in [("redis", &self.redis), ("rabbitmq", &self.rabbitmq)] {
            if let Some(m) = backend.as_ref().and_then(|b| b.managed.as_ref())
                && !(0..=1).contains(&m.replicas)
            {
                problems.push(format!(
                    "spec.{name}.managed.replicas is {}: a managed backend runs 0 or 1 replica",
                    m.replicas
                ));
            }
        }
        let many = self.gateway.replicas > 1 || self.gateway.autoscaling.is_some();
        if let Some(a) = &self.attachments {
            if a.s3.is_some() == a.persistent_volume_claim.is_some() {
                problems.push(
                    "set exactly one of spec.attachments.s3 and spec.attachments.persistentVolumeClaim"
                        .to_owned(),
                );
            }
            if many && a.persistent_volume_claim.is_some() {
                problems.push(
                    "attachments on a PersistentVolumeClaim serve one replica: use spec.attachments.s3 for more"
                        .to_owned(),
                );
            }
            if let Some(s3) = &a.s3
                && s3.bucket.trim().is_empty()
            {
                problems.push("spec.attachments.s3.bucket is empty: name the bucket".to_owned());
            }
        }
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
     "message": "gateway.autoscaling.minReplicas must not exceed maxReplicas"},
    {"rule": "!has(self.resources) || !has(self.pod) || !has(self.pod.resources)",
     "message": "set the gateway's resources in one place: gateway.pod.resources"}
]))]
pub struct GatewaySpec {
    /// Container image of confab-gateway.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Pod count when autoscaling is not set (one by default: more need spec.redis or
    /// spec.rabbitmq between them).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Compute resources of the gateway container; the same as gateway.pod.resources (the
    /// older spelling). Default: requests 250m CPU and 256Mi, limit 1Gi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Connections one pod accepts before refusing new ones (CONFAB_MAX_CONNECTIONS).
    #[serde(default = "default_max_connections_per_pod")]
    #[schemars(range(min = 1))]
    pub max_connections_per_pod: i32,
    /// Browser origins allowed to open WebSockets (exact match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// IP addresses of the proxies (the ingress controller's pods) whose X-Forwarded-For the
    /// gateways trust (CONFAB_TRUSTED_PROXIES). Behind an ingress without it every client
    /// shares the ingress's address, and so its per-address limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// Horizontal autoscaling on live connections per pod; replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Placement, scheduling and resources of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOverrides>,
    /// An Ingress in front of the gateway Service, terminating TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
}

/// Scheduling and resources of pods the operator runs; what is left out keeps its default.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Node and pod affinity rules (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Replaces the default spread (gateways: one per node where possible, and across zones);
    /// an empty list turns spreading off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Labels a node must have to run the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets holding registry credentials for the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Compute resources of the main container; replaces the default requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// An Ingress routing a public host to the gateways, with TLS ending there.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// IngressClass to use; the cluster's default class when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Public host name clients connect to, e.g. `chat.example.com`.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Secret (type kubernetes.io/tls) with the host's certificate; `<name>-gateway-tls` when
    /// left out (the name cert-manager's ingress-shim fills when the Ingress is annotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// Extra annotations, e.g. `cert-manager.io/cluster-issuer`; they win over the defaults
    /// (ingress-nginx timeouts long enough for WebSockets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Horizontal autoscaling on live connections per pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest gateway pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    /// Most gateway pods (also the ceiling of a rollout's surge).
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Average live connections per pod the HPA aims for (metric `confab_connections`,
    /// served to the HPA by a custom-metrics adapter).
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
    /// Secret key holding the HS256 signing secret (CONFAB_JWT_SECRET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the RS256 public key, PEM (CONFAB_JWT_PUBLIC_KEY).
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
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
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
    /// Run a single-node instance in the cluster (development only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedBackend>,
    /// Use an existing instance, reached by a URL kept in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalBackend>,
}

/// A single-node instance the operator runs as a StatefulSet (no clustering, for development).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// A StatefulSet's volume claim templates are immutable: refuse at admission what the API
// server would refuse on every apply later.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.storage == oldSelf.storage",
     "message": "managed storage cannot change once created (StatefulSet volume claims are immutable): delete the backend (remove it, apply, add it back) to resize"},
    {"rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
     "message": "managed storageClassName cannot change once created (StatefulSet volume claims are immutable)"}
]))]
pub struct ManagedBackend {
    /// Only one node: the operator does not configure Redis replication or RabbitMQ clustering.
    #[serde(default = "default_backend_replicas")]
    #[schemars(range(min = 0, max = 1))]
    pub replicas: i32,
    /// Size of the data volume, e.g. `1Gi`.
    #[serde(default = "default_storage")]
    // Bounded lengths keep the CEL transition rules' estimated cost small.
    #[schemars(
        regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"),
        length(max = 32)
    )]
    pub storage: String,
    /// StorageClass of the data volume; the cluster's default when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Overrides the default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Placement, scheduling and resources of the backend's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOverrides>,
}

/// A backend outside the cluster's control, reached through a URL kept in a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalBackend {
    /// Secret key holding the backend's URL (`redis://…` or `amqp://…`).
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

/// Per-user and per-address flow limits and frame size.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Messages per second one user may send (CONFAB_MESSAGES_PER_SECOND).
    #[serde(default = "default_messages_per_second")]
    #[schemars(range(min = 1))]
    pub messages_per_second: i32,
    /// Messages one user may send in a burst (CONFAB_MESSAGE_BURST).
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1))]
    pub burst: i32,
    /// Largest WebSocket frame or message accepted, in bytes (CONFAB_MAX_FRAME_BYTES).
    #[serde(default = "default_max_frame_bytes")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_frame_bytes: i32,
    /// New connections per second from one client address (CONFAB_CONNECTS_PER_SECOND). A
    /// rollout's reconnect ramp passes through these buckets: behind an ingress, set
    /// gateway.trustedProxies so each client has its own.
    #[serde(default = "default_connects_per_second")]
    #[schemars(range(min = 1))]
    pub connects_per_second: i32,
    /// Burst of new connections from one client address (CONFAB_CONNECT_BURST).
    #[serde(default = "default_connect_burst")]
    #[schemars(range(min = 1))]
    pub connect_burst: i32,
    /// Open connections one client address may hold on one pod
    /// (CONFAB_MAX_CONNECTIONS_PER_ADDRESS); the gateway's default when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections_per_address: Option<i32>,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            messages_per_second: default_messages_per_second(),
            burst: default_burst(),
            max_frame_bytes: default_max_frame_bytes(),
            connects_per_second: default_connects_per_second(),
            connect_burst: default_connect_burst(),
            max_connections_per_address: None,
        }
    }
}

/// Where attachment bytes are kept.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.s3) != has(self.persistentVolumeClaim)",
     "message": "set exactly one of attachments.s3 and attachments.persistentVolumeClaim"}
]))]
pub struct AttachmentsSpec {
    /// An S3-compatible bucket shared by every gateway (CONFAB_ATTACHMENTS=s3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3AttachmentsSpec>,
    /// An existing PersistentVolumeClaim mounted at the gateway's attachment directory: one
    /// replica only (development).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<AttachmentsClaim>,
}

/// The bucket and how to reach it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3AttachmentsSpec {
    /// Bucket name (CONFAB_S3_BUCKET).
    #[schemars(length(min = 1, max = 63))]
    pub bucket: String,
    /// Endpoint of an S3-compatible service, e.g. `http://minio.storage:9000`
    /// (CONFAB_S3_ENDPOINT); AWS itself when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    /// Region of the bucket (CONFAB_S3_REGION); `us-east-1` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Secret holding the access key id and secret access key.
    pub credentials_secret_ref: S3CredentialsRef,
}

/// A Secret with S3 credentials under two keys.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the access key id (CONFAB_S3_ACCESS_KEY_ID).
    #[serde(default = "default_access_key_id_key")]
    pub access_key_id_key: String,
    /// Key of the secret access key (CONFAB_S3_SECRET_ACCESS_KEY).
    #[serde(default = "default_secret_access_key_key")]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "accessKeyId".to_owned()
}

fn default_secret_access_key_key() -> String {
    "secretAccessKey".to_owned()
}

/// A PersistentVolumeClaim in the ChatCluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentsClaim {
    /// Name of the claim (created beforehand, ReadWriteOnce is enough for one replica).
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// Where traces and metrics are pushed over OTLP.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// OTLP/HTTP endpoint, e.g. `http://otel-collector.observability:4318`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// What the operator last observed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    /// One-word summary: Pending, Progressing, Ready, Degraded, Paused or Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The generation whose every child the API server accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Gateway pods the Deployment has (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    /// Gateway pods ready.
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
    /// The HorizontalPodAutoscaler's view, when autoscaling is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// Ready, Progressing and Degraded, each with the generation it describes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Whether the HPA can read `confab_connections` and what it decided.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// False while the HPA cannot compute a scale (e.g. no custom-metrics adapter serves
    /// `confab_connections`); the fleet then stays at its current size.
    #[serde(default)]
    pub scaling_active: bool,
    /// The HPA's reason for ScalingActive (e.g. `FailedGetPodsMetric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The HPA's message for ScalingActive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Pods the HPA last saw.
    #[serde(default)]
    pub current_replicas: i32,
    /// Pods the HPA wants.
    #[serde(default)]
    pub desired_replicas: i32,
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
    Paused,
    Terminating,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Paused => "Paused",
            Phase::Terminating => "Terminating",
        }
    }
}

fn default_replicas() -> i32 {
    1
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
fn default_connects_per_second() -> i32 {
    50
}
fn default_connect_burst() -> i32 {
    200
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
    fn attachments_on_a_claim_serve_one_replica_and_need_exactly_one_place() {
        let claim = AttachmentsSpec {
            s3: None,
            persistent_volume_claim: Some(AttachmentsClaim {
                claim_name: "files".into(),
            }),
        };
        let mut spec = sample_cluster().spec;
        spec.attachments = Some(claim.clone());
        assert_eq!(
            spec.problems(),
            vec![
                "attachments on a PersistentVolumeClaim serve one replica: use spec.attachments.s3 for more"
            ]
        );
        spec.gateway.autoscaling = None;
        spec.gateway.replicas = 1;
        assert_eq!(spec.problems(), Vec::<String>::new());
        spec.attachments = Some(AttachmentsSpec::default());
        assert_eq!(
            spec.problems(),
            vec![
                "set exactly one of spec.attachments.s3 and spec.attachments.persistentVolumeClaim"
            ]
        );
        // The CRD carries the same rules for admission.
        let crd = serde_json::to_string(&ChatCluster::crd()).expect("crd json");
        assert!(crd.contains("has(self.s3) != has(self.persistentVolumeClaim)"));
        assert!(crd.contains("attachments on a PersistentVolumeClaim serve one replica"));
    }

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

    /// Every property path in a schema that has no description.
    fn undescribed(node: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (name, child) in props {
                let here = format!("{path}.{name}");
                if child
                    .get("description")
                    .and_then(|d| d.as_str())
                    .is_none_or(str::is_empty)
                {
                    out.push(here.clone());
                }
                undescribed(child, &here, out);
            }
        }
        if let Some(items) = node.get("items") {
            undescribed(items, &format!("{path}[]"), out);
        }
        if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
            undescribed(values, &format!("{path}{{}}"), out);
        }
    }

    #[test]
    fn every_crd_field_has_a_description() {
        let crd = serde_json::to_value(ChatCluster::crd()).expect("serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        undescribed(&schema["properties"]["spec"], ".spec", &mut missing);
        undescribed(&schema["properties"]["status"], ".status", &mut missing);
        assert_eq!(missing, Vec::<String>::new());
        assert!(
            schema["properties"]["spec"]["properties"]["gateway"]["properties"]["pod"]["properties"]
                ["affinity"]["description"]
                .is_string()
        );
    }

    #[test]
    fn the_minimal_spec_a_user_writes_is_accepted() {
        let spec: ChatClusterSpec = serde_json::from_value(serde_json::json!({
            "gateway": {"image": "ghcr.io/confab/confab-gateway:0.1.0"},
            "auth": {"jwtSecretRef": {"name": "confab-auth", "key": "jwt-secret"}},
            "postgres": {"urlSecretRef": {"name": "confab-postgres", "key": "url"}},
        }))
        .expect("deserializes");
        assert_eq!(spec.gateway.replicas, 1, "one gateway needs no bus");
        assert_eq!(spec.problems(), Vec::<String>::new());
        // The CRD defaults replicas to the same 1, so the bus rule holds at admission too.
        let crd = serde_json::to_value(ChatCluster::crd()).expect("serializes");
        let gateway = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["gateway"];
        assert_eq!(gateway["properties"]["replicas"]["default"], 1);
        assert_eq!(
            gateway["properties"]["replicas"]["minimum"].as_f64(),
            Some(0.0)
        );
    }

    #[test]
    fn managed_storage_is_immutable_at_admission() {
        let crd = serde_json::to_value(ChatCluster::crd()).expect("serializes");
        let redis = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["redis"]["properties"]["managed"];
        let rules: Vec<&str> = redis["x-kubernetes-validations"]
            .as_array()
            .expect("rules")
            .iter()
            .filter_map(|r| r["rule"].as_str())
            .collect();
        assert!(
            rules.contains(&"self.storage == oldSelf.storage"),
            "{rules:?}"
        );
        assert!(
            rules
                .iter()
                .any(|r| r.contains("self.storageClassName == oldSelf.storageClassName"))
        );
    }

    #[test]
    fn negative_replicas_stored_past_admission_are_a_problem() {
        let mut spec = sample_cluster().spec;
        spec.gateway.replicas = -1;
        assert_eq!(
            spec.problems(),
            vec!["spec.gateway.replicas is -1: set it to 0 or more"]
        );
    }

    #[test]
    fn trusted_proxies_must_be_ip_addresses() {
        let mut spec = sample_cluster().spec;
        spec.gateway.trusted_proxies = vec!["10.0.0.1".into(), "ingress-nginx".into()];
        assert_eq!(
            spec.problems(),
            vec![
                "spec.gateway.trustedProxies[1] (\"ingress-nginx\") is not an IP address: list the ingress controller's addresses"
            ]
        );
    }

    #[test]
    fn the_crd_fits_a_client_side_apply() {
        // kubectl's (and Tilt's) client-side apply keeps the object as JSON in an annotation,
        // and all annotations together may hold 256 KiB: leave room.
        let json = serde_json::to_vec(&ChatCluster::crd()).expect("serializes");
        assert!(
            json.len() < 224 * 1024,
            "the CRD is {} bytes of JSON",
            json.len()
        );
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
