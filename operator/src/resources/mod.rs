//! Pure desired-state builders: one file per child kind, each a function of the ChatCluster.

pub mod configmap;
pub mod deployment;
pub mod hpa;
pub mod ingress;
pub mod pdb;
pub mod placement;
pub mod service;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{BackendSpec, ChatCluster, ManagedBackend};

/// Port the gateway serves WebSockets, HTTP, probes and metrics on.
pub const GATEWAY_PORT: i32 = 8080;
/// Where the gateway keeps its files; an emptyDir because the root filesystem is read-only.
pub const GATEWAY_DATA_DIR: &str = "/var/lib/confab";
/// Where a PersistentVolumeClaim of attachments is mounted (spec.attachments.persistentVolumeClaim).
pub const GATEWAY_ATTACHMENTS_DIR: &str = "/var/lib/confab-attachments";
/// Where the gateway image installs its binary (gateway/Dockerfile); the preStop hook runs it.
pub const GATEWAY_BINARY: &str = "/usr/local/bin/confab-gateway";
/// Where the downward-API volume with the pod's own annotations is mounted.
pub const PODINFO_DIR: &str = "/etc/confab/podinfo";
/// The file in it the gateway watches for `confab.dev/drain: "true"`.
pub const DRAIN_ANNOTATION_FILE: &str = "/etc/confab/podinfo/annotations";
/// Label value of `app.kubernetes.io/managed-by` on every child.
pub const MANAGED_BY: &str = "confab-operator";

/// Why a child could not be built.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum BuildError {
    #[error("the ChatCluster has no {0} yet (it must come from the API server)")]
    MissingMetadata(&'static str),
}

/// What a child is for; it becomes the `app.kubernetes.io/component` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Gateway,
    Redis,
    RabbitMq,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Redis => "redis",
            Component::RabbitMq => "rabbitmq",
        }
    }
}

/// A backend the operator can run itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagedKind {
    Redis,
    RabbitMq,
}

impl ManagedKind {
    pub fn component(self) -> Component {
        match self {
            ManagedKind::Redis => Component::Redis,
            ManagedKind::RabbitMq => Component::RabbitMq,
        }
    }
    pub fn port(self) -> i32 {
        match self {
            ManagedKind::Redis => 6379,
            ManagedKind::RabbitMq => 5672,
        }
    }
    pub fn port_name(self) -> &'static str {
        match self {
            ManagedKind::Redis => "redis",
            ManagedKind::RabbitMq => "amqp",
        }
    }
    pub fn default_image(self) -> &'static str {
        match self {
            ManagedKind::Redis => "redis:7.4",
            ManagedKind::RabbitMq => "rabbitmq:4.1",
        }
    }
    pub fn data_path(self) -> &'static str {
        match self {
            ManagedKind::Redis => "/data",
            ManagedKind::RabbitMq => "/var/lib/rabbitmq",
        }
    }
    /// The spec of this backend when it is managed.
    pub fn managed(self, cc: &ChatCluster) -> Option<&ManagedBackend> {
        let backend: Option<&BackendSpec> = match self {
            ManagedKind::Redis => cc.spec.redis.as_ref(),
            ManagedKind::RabbitMq => cc.spec.rabbitmq.as_ref(),
        };
        backend.and_then(|b| b.managed.as_ref())
    }
    /// The URL gateways use to reach the managed instance through its Service.
    pub fn url(self, cc: &ChatCluster) -> String {
        let host = backend_name(cc, self);
        match self {
            ManagedKind::Redis => format!("redis://{host}:6379"),
            // The default guest account; the managed broker lifts its loopback-only rule (dev only).
            ManagedKind::RabbitMq => format!("amqp://guest:guest@{host}:5672/%2f"),
        }
    }
}

/// Name of the gateway's Deployment, ConfigMap, Service, PDB and HPA.
pub fn gateway_name(cc: &ChatCluster) -> String {
    format!("{}-gateway", cc.name_any())
}

/// Name of the headless Service that gives each gateway pod a DNS name.
pub fn headless_name(cc: &ChatCluster) -> String {
    format!("{}-gateway-headless", cc.name_any())
}

/// Name of a managed backend's StatefulSet and Service.
pub fn backend_name(cc: &ChatCluster, kind: ManagedKind) -> String {
    format!("{}-{}", cc.name_any(), kind.component().as_str())
}

/// Labels that select the pods of one component of one ChatCluster.
pub fn selector_labels(cc: &ChatCluster, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            format!("confab-{}", component.as_str()),
        ),
        ("app.kubernetes.io/instance".to_owned(), cc.name_any()),
    ])
}

/// Every label a child carries: the selector plus ownership and grouping labels.
pub fn labels(cc: &ChatCluster, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cc, component);
    labels.insert(
        "app.kubernetes.io/component".to_owned(),
        component.as_str().to_owned(),
    );
    labels.insert("app.kubernetes.io/part-of".to_owned(), "confab".to_owned());
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        MANAGED_BY.to_owned(),
    );
    labels
}

/// A label selector string, as the scale subresource and `kubectl -l` want it.
pub fn selector_string(cc: &ChatCluster) -> String {
    selector_labels(cc, Component::Gateway)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The controller owner reference that ties a child's life to its ChatCluster; with
/// `blockOwnerDeletion`, a foreground deletion of the ChatCluster waits for its children.
pub fn owner_ref(cc: &ChatCluster) -> Result<OwnerReference, BuildError> {
    let mut owner = cc
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("uid"))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// Metadata of a child: name, the ChatCluster's namespace, labels and owner reference.
pub fn child_meta(
    cc: &ChatCluster,
    name: String,
    component: Component,
) -> Result<ObjectMeta, BuildError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(
            cc.namespace()
                .ok_or(BuildError::MissingMetadata("namespace"))?,
        ),
        labels: Some(labels(cc, component)),
        owner_references: Some(vec![owner_ref(cc)?]),
        ..ObjectMeta::default()
    })
}

/// FNV-1a, 64 bit: a hash that is stable across Rust releases, so pod-template annotations
/// only change when their input does (std's `DefaultHasher` makes no such promise).
pub fn stable_hash(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
pub(crate) mod testing {
    //! A sample ChatCluster for builder tests.
    use crate::crd::ChatCluster;

    pub fn sample() -> ChatCluster {
        crate::sample::sample_cluster()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_reference_points_at_the_chatcluster_as_controller() {
        let cc = testing::sample();
        let owner = owner_ref(&cc).expect("sample has a uid");
        assert_eq!(owner.kind, "ChatCluster");
        assert_eq!(owner.api_version, "confab.dev/v1alpha1");
        assert_eq!(owner.name, "demo");
        assert_eq!(owner.uid, "11111111-2222-3333-4444-555555555555");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
    }

    #[test]
    fn a_chatcluster_not_yet_stored_cannot_own_children() {
        let mut cc = testing::sample();
        cc.metadata.uid = None;
        assert_eq!(owner_ref(&cc), Err(BuildError::MissingMetadata("uid")));
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        assert_eq!(stable_hash(b""), "cbf29ce484222325");
        assert_eq!(stable_hash(b"a"), "af63dc4c8601ec8c");
        assert_ne!(stable_hash(b"ab"), stable_hash(b"ba"));
    }

    #[test]
    fn selector_string_lists_name_and_instance() {
        assert_eq!(
            selector_string(&testing::sample()),
            "app.kubernetes.io/instance=demo,app.kubernetes.io/name=confab-gateway"
        );
    }
}
