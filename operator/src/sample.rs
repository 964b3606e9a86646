//! A fully populated sample ChatCluster, shared by tests and `confab-operator dump-sample`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{
    AuthSpec, AutoscalingSpec, BackendSpec, ChatCluster, ChatClusterSpec, GatewaySpec, IngressSpec,
    LimitsSpec, ManagedBackend, PodOverrides, PostgresSpec, RolloutSpec, SecretKeyRef,
    TelemetrySpec,
};

/// Gateway pod overrides with every field but the spread set: amd64 nodes of the `chat` pool.
pub fn sample_pod_overrides() -> PodOverrides {
    PodOverrides {
        affinity: Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/arch".to_owned(),
                            operator: "In".to_owned(),
                            values: Some(vec!["amd64".to_owned()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        }),
        topology_spread_constraints: None,
        tolerations: vec![Toleration {
            key: Some("dedicated".to_owned()),
            operator: Some("Equal".to_owned()),
            value: Some("chat".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        }],
        node_selector: BTreeMap::from([("pool".to_owned(), "chat".to_owned())]),
        priority_class_name: Some("chat-critical".to_owned()),
        image_pull_secrets: vec![LocalObjectReference {
            name: "registry".to_owned(),
        }],
        resources: None,
    }
}

/// `demo` in namespace `chat`, as the API server would return it: every optional part set,
/// Redis and RabbitMQ managed, autoscaling on.
pub fn sample_cluster() -> ChatCluster {
    let resources = ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), Quantity("250m".to_owned())),
                ("memory".to_owned(), Quantity("256Mi".to_owned())),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), Quantity("512Mi".to_owned()))].into()),
        ..ResourceRequirements::default()
    };
    let managed = || {
        Some(BackendSpec {
            managed: Some(ManagedBackend {
                replicas: 1,
                storage: "2Gi".to_owned(),
                storage_class_name: None,
                image: None,
                pod: None,
            }),
            external: None,
        })
    };
    ChatCluster {
        metadata: ObjectMeta {
            name: Some("demo".to_owned()),
            namespace: Some("chat".to_owned()),
            uid: Some("11111111-2222-3333-4444-555555555555".to_owned()),
            generation: Some(1),
            resource_version: Some("1".to_owned()),
            ..ObjectMeta::default()
        },
        spec: ChatClusterSpec {
            gateway: GatewaySpec {
                image: "ghcr.io/confab/confab-gateway:0.1.0".to_owned(),
                replicas: 3,
                resources: Some(resources),
                max_connections_per_pod: 10_000,
                allowed_origins: vec![
                    "https://chat.example.com".to_owned(),
                    "https://app.example.com".to_owned(),
                ],
                trusted_proxies: vec!["10.0.0.10".to_owned(), "10.0.0.11".to_owned()],
                autoscaling: Some(AutoscalingSpec {
                    min_replicas: 2,
                    max_replicas: 10,
                    target_connections_per_pod: 5_000,
                }),
                pod: Some(sample_pod_overrides()),
                ingress: Some(IngressSpec {
                    class_name: Some("nginx".to_owned()),
                    host: "chat.example.com".to_owned(),
                    tls_secret_name: Some("chat-example-com-tls".to_owned()),
                    annotations: BTreeMap::from([(
                        "cert-manager.io/cluster-issuer".to_owned(),
                        "letsencrypt".to_owned(),
                    )]),
                }),
            },
            auth: AuthSpec {
                jwt_secret_ref: Some(SecretKeyRef {
                    name: "confab-auth".to_owned(),
                    key: "jwt-secret".to_owned(),
                }),
                jwt_public_key_ref: None,
            },
            postgres: PostgresSpec {
                url_secret_ref: SecretKeyRef {
                    name: "confab-postgres".to_owned(),
                    key: "url".to_owned(),
                },
            },
            redis: managed(),
            rabbitmq: managed(),
            rollout: RolloutSpec {
                drain_seconds: 60,
                max_reconnects_per_second: 500,
            },
            limits: LimitsSpec {
                messages_per_second: 10,
                burst: 20,
                max_frame_bytes: 65_536,
                connects_per_second: 50,
                connect_burst: 200,
                max_connections_per_address: Some(100),
            },
            telemetry: Some(TelemetrySpec {
                otlp_endpoint: Some("http://otel-collector.observability:4317".to_owned()),
            }),
            attachments: None,
        },
        status: None,
    }
}
