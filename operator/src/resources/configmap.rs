//! The gateway's ConfigMap: every non-secret `CONFAB_*` setting.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{
    BuildError, Component, DRAIN_ANNOTATION_FILE, GATEWAY_ATTACHMENTS_DIR, GATEWAY_DATA_DIR,
    GATEWAY_PORT, ManagedKind, child_meta, gateway_name,
};
use crate::crd::ChatCluster;

/// Which bus the gateways use to reach each other: RabbitMQ when configured, else Redis
/// pub/sub, else the in-process bus (one pod only; the CRD refuses more without a bus).
pub fn bus(cc: &ChatCluster) -> &'static str {
    if cc.spec.rabbitmq.is_some() {
        "rabbitmq"
    } else if cc.spec.redis.is_some() {
        "redis"
    } else {
        "local"
    }
}

/// The settings, as the gateway reads them from its environment.
pub fn settings(cc: &ChatCluster) -> BTreeMap<String, String> {
    let spec = &cc.spec;
    let mut data = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        data.insert(k.to_owned(), v);
    };
    set("CONFAB_LISTEN", format!("0.0.0.0:{GATEWAY_PORT}"));
    set("CONFAB_BUS", bus(cc).to_owned());
    set("CONFAB_LOG_FORMAT", "json".to_owned());
    set("CONFAB_DATA_DIR", GATEWAY_DATA_DIR.to_owned());
    set(
        "CONFAB_DRAIN_SECONDS",
        spec.rollout.drain_seconds.to_string(),
    );
    // The Deployment mounts the pod's annotations there (downward API).
    set(
        "CONFAB_DRAIN_ANNOTATION_FILE",
        DRAIN_ANNOTATION_FILE.to_owned(),
    );
    set(
        "CONFAB_MAX_CONNECTIONS",
        spec.gateway.max_connections_per_pod.to_string(),
    );
    set(
        "CONFAB_MAX_FRAME_BYTES",
        spec.limits.max_frame_bytes.to_string(),
    );
    set(
        "CONFAB_MESSAGES_PER_SECOND",
        spec.limits.messages_per_second.to_string(),
    );
    set("CONFAB_MESSAGE_BURST", spec.limits.burst.to_string());
    set(
        "CONFAB_CONNECTS_PER_SECOND",
        spec.limits.connects_per_second.to_string(),
    );
    set(
        "CONFAB_CONNECT_BURST",
        spec.limits.connect_burst.to_string(),
    );
    if let Some(per_address) = spec.limits.max_connections_per_address {
        set(
            "CONFAB_MAX_CONNECTIONS_PER_ADDRESS",
            per_address.to_string(),
        );
    }
    if !spec.gateway.trusted_proxies.is_empty() {
        set(
            "CONFAB_TRUSTED_PROXIES",
            spec.gateway.trusted_proxies.join(","),
        );
    }
    if !spec.gateway.allowed_origins.is_empty() {
        set(
            "CONFAB_ALLOWED_ORIGINS",
            spec.gateway.allowed_origins.join(","),
        );
    }
    if let Some(endpoint) = spec
        .telemetry
        .as_ref()
        .and_then(|t| t.otlp_endpoint.clone())
    {
        set("CONFAB_OTLP_ENDPOINT", endpoint);
    }
    if let Some(attachments) = &spec.attachments {
        if let Some(s3) = &attachments.s3 {
            set("CONFAB_ATTACHMENTS", "s3".to_owned());
            set("CONFAB_S3_BUCKET", s3.bucket.clone());
            if let Some(endpoint) = &s3.endpoint {
                set("CONFAB_S3_ENDPOINT", endpoint.clone());
            }
            if let Some(region) = &s3.region {
                set("CONFAB_S3_REGION", region.clone());
            }
        } else if attachments.persistent_volume_claim.is_some() {
            set("CONFAB_ATTACHMENTS", "local".to_owned());
            set("CONFAB_ATTACHMENTS_DIR", GATEWAY_ATTACHMENTS_DIR.to_owned());
        }
    }
    // Managed backends are reached through their Service; external ones come from Secrets
    // (see the Deployment), so no credential ever lands in a ConfigMap.
    if ManagedKind::Redis.managed(cc).is_some() {
        set("CONFAB_REDIS_URL", ManagedKind::Redis.url(cc));
    }
    if ManagedKind::RabbitMq.managed(cc).is_some() {
        set("CONFAB_AMQP_URL", ManagedKind::RabbitMq.url(cc));
    }
    data
}

pub fn configmap(cc: &ChatCluster) -> Result<ConfigMap, BuildError> {
    Ok(ConfigMap {
        metadata: child_meta(cc, gateway_name(cc), Component::Gateway)?,
        data: Some(settings(cc)),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        AttachmentsClaim, AttachmentsSpec, BackendSpec, ExternalBackend, S3AttachmentsSpec,
        S3CredentialsRef, SecretKeyRef,
    };
    use crate::resources::testing::sample;

    #[test]
    fn configmap_carries_gateway_settings_for_kubernetes() {
        let cm = configmap(&sample()).expect("builds");
        let data = cm.data.expect("has data");
        assert_eq!(data["CONFAB_LISTEN"], "0.0.0.0:8080");
        assert_eq!(data["CONFAB_LOG_FORMAT"], "json");
        assert_eq!(data["CONFAB_DATA_DIR"], "/var/lib/confab");
        assert_eq!(data["CONFAB_BUS"], "rabbitmq");
        assert_eq!(data["CONFAB_DRAIN_SECONDS"], "60");
        assert_eq!(
            data["CONFAB_DRAIN_ANNOTATION_FILE"],
            "/etc/confab/podinfo/annotations"
        );
        assert_eq!(data["CONFAB_MAX_CONNECTIONS"], "10000");
        assert_eq!(data["CONFAB_MAX_FRAME_BYTES"], "65536");
        assert_eq!(data["CONFAB_MESSAGES_PER_SECOND"], "10");
        assert_eq!(data["CONFAB_MESSAGE_BURST"], "20");
        assert_eq!(data["CONFAB_CONNECTS_PER_SECOND"], "50");
        assert_eq!(data["CONFAB_CONNECT_BURST"], "200");
        assert_eq!(data["CONFAB_MAX_CONNECTIONS_PER_ADDRESS"], "100");
        assert_eq!(data["CONFAB_TRUSTED_PROXIES"], "10.0.0.10,10.0.0.11");
        assert_eq!(
            data["CONFAB_ALLOWED_ORIGINS"],
            "https://chat.example.com,https://app.example.com"
        );
        assert_eq!(
            data["CONFAB_OTLP_ENDPOINT"],
            "http://otel-collector.observability:4317"
        );
        assert_eq!(data["CONFAB_REDIS_URL"], "redis://demo-redis:6379");
        assert_eq!(
            data["CONFAB_AMQP_URL"],
            "amqp://guest:guest@demo-rabbitmq:5672/%2f"
        );
    }

    #[test]
    fn configmap_is_named_labelled_and_owned() {
        let cm = configmap(&sample()).expect("builds");
        assert_eq!(cm.metadata.name.as_deref(), Some("demo-gateway"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("chat"));
        let labels = cm.metadata.labels.expect("labels");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "confab-operator");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        let owners = cm.metadata.owner_references.expect("owner refs");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].name, "demo");
    }

    #[test]
    fn external_backend_urls_stay_out_of_the_configmap() {
        let mut cc = sample();
        let external = BackendSpec {
            managed: None,
            external: Some(ExternalBackend {
                url_secret_ref: SecretKeyRef {
                    name: "r".into(),
                    key: "url".into(),
                },
            }),
        };
        cc.spec.redis = Some(external.clone());
        cc.spec.rabbitmq = Some(external);
        cc.spec.telemetry = None;
        cc.spec.gateway.trusted_proxies.clear();
        cc.spec.limits.max_connections_per_address = None;
        let data = settings(&cc);
        assert!(!data.contains_key("CONFAB_TRUSTED_PROXIES"));
        assert!(!data.contains_key("CONFAB_MAX_CONNECTIONS_PER_ADDRESS"));
        assert!(!data.contains_key("CONFAB_REDIS_URL"));
        assert!(!data.contains_key("CONFAB_AMQP_URL"));
        assert!(!data.contains_key("CONFAB_OTLP_ENDPOINT"));
    }

    #[test]
    fn every_setting_the_configmap_sets_is_one_the_gateway_reads() {
        let config = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway/src/config.rs"
        ))
        .expect("gateway/src/config.rs");
        let data = settings(&sample());
        assert!(data.len() >= 18, "the sample sets every setting: {data:?}");
        let unknown: Vec<_> = data
            .keys()
            .filter(|key| !config.contains(&format!("env = \"{key}\"")))
            .collect();
        assert_eq!(
            unknown,
            Vec::<&String>::new(),
            "names the gateway does not read"
        );
    }

    #[test]
    fn attachments_go_to_the_configured_bucket_or_the_claim_directory() {
        let mut cc = sample();
        assert!(!settings(&cc).contains_key("CONFAB_ATTACHMENTS"));
        cc.spec.attachments = Some(AttachmentsSpec {
            s3: Some(S3AttachmentsSpec {
                bucket: "confab-files".into(),
                endpoint: Some("http://minio.storage:9000".into()),
                region: Some("eu-central-1".into()),
                credentials_secret_ref: S3CredentialsRef {
                    name: "confab-s3".into(),
                    access_key_id_key: "accessKeyId".into(),
                    secret_access_key_key: "secretAccessKey".into(),
                },
            }),
            persistent_volume_claim: None,
        });
        let data = settings(&cc);
        assert_eq!(data["CONFAB_ATTACHMENTS"], "s3");
        assert_eq!(data["CONFAB_S3_BUCKET"], "confab-files");
        assert_eq!(data["CONFAB_S3_ENDPOINT"], "http://minio.storage:9000");
        assert_eq!(data["CONFAB_S3_REGION"], "eu-central-1");
        assert!(
            !data.keys().any(|k| k.contains("ACCESS_KEY")),
            "credentials come from the Secret, never the ConfigMap"
        );
        let config = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway/src/config.rs"
        ))
        .expect("gateway/src/config.rs");
        for key in data.keys() {
            assert!(config.contains(&format!("env = \"{key}\"")), "{key}");
        }
        cc.spec.attachments = Some(AttachmentsSpec {
            s3: None,
            persistent_volume_claim: Some(AttachmentsClaim {
                claim_name: "confab-attachments".into(),
            }),
        });
        let data = settings(&cc);
        assert_eq!(data["CONFAB_ATTACHMENTS"], "local");
        assert_eq!(data["CONFAB_ATTACHMENTS_DIR"], GATEWAY_ATTACHMENTS_DIR);
        assert!(!data.contains_key("CONFAB_S3_BUCKET"));
    }

    #[test]
    fn bus_follows_the_configured_backends() {
        let mut cc = sample();
        assert_eq!(bus(&cc), "rabbitmq");
        cc.spec.rabbitmq = None;
        assert_eq!(bus(&cc), "redis");
        cc.spec.redis = None;
        assert_eq!(bus(&cc), "local");
    }
}
