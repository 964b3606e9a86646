//! The gateway Deployment: hardened pods, probes, Secrets by reference, draining rollouts.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildError, Component, GATEWAY_ATTACHMENTS_DIR, GATEWAY_BINARY, GATEWAY_DATA_DIR, GATEWAY_PORT,
    PODINFO_DIR, child_meta, configmap, gateway_name, labels, placement, selector_labels,
    stable_hash,
};
use crate::crd::{ChatCluster, SecretKeyRef};
use crate::rollout;

/// Pod annotation whose change rolls the fleet when only the ConfigMap changed.
pub const CONFIG_HASH_ANNOTATION: &str = "confab.dev/config-hash";
/// Pod annotation whose change rolls the fleet when a referenced Secret's value changed: env
/// from a Secret is read only when a container starts.
pub const SECRET_HASH_ANNOTATION: &str = "confab.dev/secret-hash";
/// UID of the non-root user the gateway image runs as (distroless `nonroot`).
pub const GATEWAY_UID: i64 = 65532;
/// The preStop hook: the gateway drains (readiness 503, new upgrades refused with
/// `Retry-After`, clients told to reconnect elsewhere spread over `CONFAB_DRAIN_SECONDS`) and
/// the hook returns when the drain is done; SIGTERM follows. The exec inherits the container's
/// environment, so the command finds the gateway as the server does. Load balancers that still
/// send a client during their endpoint update get the 503 and retry on another pod.
pub fn pre_stop_command() -> Vec<String> {
    vec![
        GATEWAY_BINARY.to_owned(),
        "drain".to_owned(),
        "--wait".to_owned(),
    ]
}

fn secret_env(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Environment taken from Secrets by reference, so values never pass through the operator.
pub fn secret_envs(cc: &ChatCluster) -> Vec<EnvVar> {
    let spec = &cc.spec;
    let mut env = Vec::new();
    if let Some(secret) = &spec.auth.jwt_secret_ref {
        env.push(secret_env("CONFAB_JWT_SECRET", secret));
    }
    if let Some(key) = &spec.auth.jwt_public_key_ref {
        env.push(secret_env("CONFAB_JWT_PUBLIC_KEY", key));
    }
    env.push(secret_env(
        "CONFAB_DATABASE_URL",
        &spec.postgres.url_secret_ref,
    ));
    if let Some(external) = spec.redis.as_ref().and_then(|r| r.external.as_ref()) {
        env.push(secret_env("CONFAB_REDIS_URL", &external.url_secret_ref));
    }
    if let Some(external) = spec.rabbitmq.as_ref().and_then(|r| r.external.as_ref()) {
        env.push(secret_env("CONFAB_AMQP_URL", &external.url_secret_ref));
    }
    if let Some(s3) = spec.attachments.as_ref().and_then(|a| a.s3.as_ref()) {
        let creds = &s3.credentials_secret_ref;
        for (name, key) in [
            ("CONFAB_S3_ACCESS_KEY_ID", &creds.access_key_id_key),
            ("CONFAB_S3_SECRET_ACCESS_KEY", &creds.secret_access_key_key),
        ] {
            env.push(secret_env(
                name,
                &SecretKeyRef {
                    name: creds.name.clone(),
                    key: key.clone(),
                },
            ));
        }
    }
    env
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The hash of the gateway settings, put on the pod template so a settings change rolls pods.
pub fn config_hash(cc: &ChatCluster) -> String {
    let settings = configmap::settings(cc);
    let flat: String = settings.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    stable_hash(flat.as_bytes())
}

/// The most pods the fleet can have: the surge is capped there.
pub fn fleet_ceiling(cc: &ChatCluster) -> i32 {
    match &cc.spec.gateway.autoscaling {
        Some(autoscaling) => autoscaling.max_replicas,
        None => cc.spec.gateway.replicas,
    }
}

/// How many pods may drain at once (the Deployment's `maxSurge`), from the connections per pod
/// observed (the fullest pod's), assuming full pods (`maxConnectionsPerPod`) while unknown.
pub fn rollout_plan(cc: &ChatCluster, observed_connections_per_pod: Option<i64>) -> rollout::Plan {
    rollout::plan(
        cc.spec.rollout.max_reconnects_per_second,
        cc.spec.rollout.drain_seconds,
        observed_connections_per_pod,
        i64::from(cc.spec.gateway.max_connections_per_pod),
        fleet_ceiling(cc),
    )
}

/// What the gateway Deployment is built from besides the ChatCluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// Connections on the fullest pod, when known (the rollout budget).
    pub connections_per_pod: Option<i64>,
    /// Hash of the referenced Secrets' values (`None` leaves the annotation out).
    pub secret_hash: Option<String>,
    /// Set the replica count even with autoscaling: the apply that hands `spec.replicas` over
    /// to the HPA carries the live count.
    pub replicas_override: Option<i32>,
}

impl Inputs {
    pub fn with_connections(connections_per_pod: Option<i64>) -> Self {
        Self {
            connections_per_pod,
            ..Self::default()
        }
    }
}

pub fn deployment(cc: &ChatCluster, inputs: &Inputs) -> Result<Deployment, BuildError> {
    let observed_connections_per_pod = inputs.connections_per_pod;
    let name = gateway_name(cc);
    let container = Container {
        name: "gateway".to_owned(),
        image: Some(cc.spec.gateway.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: GATEWAY_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: name.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: Some(secret_envs(cc)),
        resources: Some(placement::resources(
            cc.spec.gateway.pod.as_ref(),
            cc.spec.gateway.resources.as_ref(),
            Component::Gateway,
        )),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 1)),
        startup_probe: Some(http_probe("/healthz", 2, 30)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(pre_stop_command()),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(GATEWAY_UID),
            run_as_group: Some(GATEWAY_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".to_owned(),
                mount_path: GATEWAY_DATA_DIR.to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "podinfo".to_owned(),
                mount_path: PODINFO_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let mut pod = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(false),
        // The preStop drain and the SIGTERM that follows both run inside this period.
        termination_grace_period_seconds: Some(rollout::termination_grace_seconds(
            cc.spec.rollout.drain_seconds,
        )),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(GATEWAY_UID),
            fs_group: Some(GATEWAY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![
            Volume {
                name: "data".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            Volume {
                // The `confab.dev/drain` annotation reaches the gateway through this file
                // (CONFAB_DRAIN_ANNOTATION_FILE in the ConfigMap); the kubelet refreshes it
                // when the annotations change, without restarting the container.
                name: "podinfo".to_owned(),
                downward_api: Some(DownwardAPIVolumeSource {
                    items: Some(vec![DownwardAPIVolumeFile {
                        path: "annotations".to_owned(),
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.annotations".to_owned(),
                            ..ObjectFieldSelector::default()
                        }),
                        ..DownwardAPIVolumeFile::default()
                    }]),
                    ..DownwardAPIVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    if let Some(claim) = cc
        .spec
        .attachments
        .as_ref()
        .and_then(|a| a.persistent_volume_claim.as_ref())
    {
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: "attachments".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
        if let Some(gateway) = pod.containers.first_mut() {
            gateway
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: "attachments".to_owned(),
                    mount_path: GATEWAY_ATTACHMENTS_DIR.to_owned(),
                    ..VolumeMount::default()
                });
        }
    }
    placement::apply(
        &mut pod,
        cc.spec.gateway.pod.as_ref(),
        placement::default_gateway_spread(cc),
    );
    let mut annotations = BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), config_hash(cc))]);
    if let Some(hash) = &inputs.secret_hash {
        annotations.insert(SECRET_HASH_ANNOTATION.to_owned(), hash.clone());
    }
    Ok(Deployment {
        metadata: child_meta(cc, name, Component::Gateway)?,
        spec: DeploymentSpec {
            // With autoscaling the HPA owns the replica count; leaving it out of the applied
            // object keeps server-side apply from fighting the HPA (after the hand-over, see
            // controller::hand_replicas_to_hpa, so that the count is not reset to 1).
            replicas: match (&cc.spec.gateway.autoscaling, inputs.replicas_override) {
                (_, Some(replicas)) => Some(replicas),
                (Some(_), None) => None,
                (None, None) => Some(cc.spec.gateway.replicas),
            },
            selector: LabelSelector {
                match_labels: Some(selector_labels(cc, Component::Gateway)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                // New pods first, then as many old ones drain together as the reconnect
                // budget allows; never fewer serving pods than asked for.
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(
                        rollout_plan(cc, observed_connections_per_pod).pods_at_once,
                    )),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cc, Component::Gateway)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        AttachmentsClaim, AttachmentsSpec, BackendSpec, ExternalBackend, S3AttachmentsSpec,
        S3CredentialsRef,
    };
    use crate::resources::testing::sample;

    fn container(d: &Deployment) -> &Container {
        &d.spec.template.spec.as_ref().expect("pod").containers[0]
    }

    fn env_secret<'a>(c: &'a Container, name: &str) -> Option<&'a SecretKeySelector> {
        c.env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)?
            .value_from
            .as_ref()?
            .secret_key_ref
            .as_ref()
    }

    #[test]
    fn deployment_probes_healthz_and_readyz_on_the_http_port() {
        let d = deployment(&sample(), &Inputs::default()).expect("builds");
        let c = container(&d);
        let live = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("liveness");
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(live.port, IntOrString::String("http".into()));
        let ready = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness");
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(c.ports.as_ref().expect("ports")[0].container_port, 8080);
    }

    #[test]
    fn deployment_runs_non_root_with_a_read_only_root_filesystem() {
        let d = deployment(&sample(), &Inputs::default()).expect("builds");
        let c = container(&d);
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let mounts = c.volume_mounts.as_ref().expect("mounts");
        assert!(
            mounts.iter().any(|m| m.mount_path == "/var/lib/confab"),
            "data dir must be writable"
        );
        let pod = d.spec.template.spec.as_ref().expect("pod");
        assert_eq!(
            pod.security_context
                .as_ref()
                .and_then(|s| s.run_as_non_root),
            Some(true)
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn s3_credentials_come_from_their_secret_and_a_claim_is_mounted_for_attachments() {
        let mut cc = sample();
        cc.spec.attachments = Some(AttachmentsSpec {
            s3: Some(S3AttachmentsSpec {
                bucket: "confab-files".into(),
                endpoint: None,
                region: None,
                credentials_secret_ref: S3CredentialsRef {
                    name: "confab-s3".into(),
                    access_key_id_key: "id".into(),
                    secret_access_key_key: "secret".into(),
                },
            }),
            persistent_volume_claim: None,
        });
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        let c = container(&d);
        let id = env_secret(c, "CONFAB_S3_ACCESS_KEY_ID").expect("key id from secret");
        assert_eq!((id.name.as_str(), id.key.as_str()), ("confab-s3", "id"));
        let secret = env_secret(c, "CONFAB_S3_SECRET_ACCESS_KEY").expect("secret from secret");
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("confab-s3", "secret")
        );
        assert!(
            crate::controller::secret_refs(&cc)
                .iter()
                .any(|(field, r)| field.contains("attachments") && r.key == "secret"),
            "a missing credentials Secret is reported and its rotation rolls the pods"
        );

        cc.spec.attachments = Some(AttachmentsSpec {
            s3: None,
            persistent_volume_claim: Some(AttachmentsClaim {
                claim_name: "confab-attachments".into(),
            }),
        });
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        let pod = d.spec.template.spec.as_ref().expect("pod");
        let volume = pod
            .volumes
            .as_ref()
            .and_then(|v| v.iter().find(|v| v.name == "attachments"))
            .expect("attachments volume");
        assert_eq!(
            volume
                .persistent_volume_claim
                .as_ref()
                .map(|p| p.claim_name.as_str()),
            Some("confab-attachments")
        );
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .and_then(|m| m.iter().find(|m| m.name == "attachments"))
            .expect("mounted");
        assert_eq!(mount.mount_path, GATEWAY_ATTACHMENTS_DIR);
        assert!(env_secret(container(&d), "CONFAB_S3_ACCESS_KEY_ID").is_none());
    }

    #[test]
    fn deployment_takes_credentials_from_secrets_by_reference() {
        let d = deployment(&sample(), &Inputs::default()).expect("builds");
        let c = container(&d);
        let jwt = env_secret(c, "CONFAB_JWT_SECRET").expect("jwt from secret");
        assert_eq!(
            (jwt.name.as_str(), jwt.key.as_str()),
            ("confab-auth", "jwt-secret")
        );
        let db = env_secret(c, "CONFAB_DATABASE_URL").expect("db from secret");
        assert_eq!(
            (db.name.as_str(), db.key.as_str()),
            ("confab-postgres", "url")
        );
        assert!(
            env_secret(c, "CONFAB_REDIS_URL").is_none(),
            "managed redis comes from the ConfigMap"
        );
        assert!(
            c.env
                .as_ref()
                .expect("env")
                .iter()
                .all(|e| e.value.is_none()),
            "no literal values in env"
        );
        let from = c.env_from.as_ref().expect("envFrom");
        assert_eq!(
            from[0].config_map_ref.as_ref().map(|r| r.name.as_str()),
            Some("demo-gateway")
        );
    }

    #[test]
    fn external_backends_and_public_keys_are_wired_from_their_secrets() {
        let mut cc = sample();
        cc.spec.auth.jwt_secret_ref = None;
        cc.spec.auth.jwt_public_key_ref = Some(SecretKeyRef {
            name: "keys".into(),
            key: "pub.pem".into(),
        });
        cc.spec.redis = Some(BackendSpec {
            managed: None,
            external: Some(ExternalBackend {
                url_secret_ref: SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                },
            }),
        });
        cc.spec.rabbitmq = Some(BackendSpec {
            managed: None,
            external: Some(ExternalBackend {
                url_secret_ref: SecretKeyRef {
                    name: "amqp".into(),
                    key: "url".into(),
                },
            }),
        });
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        let c = container(&d);
        assert!(env_secret(c, "CONFAB_JWT_SECRET").is_none());
        assert_eq!(
            env_secret(c, "CONFAB_JWT_PUBLIC_KEY").map(|s| s.key.as_str()),
            Some("pub.pem")
        );
        assert_eq!(
            env_secret(c, "CONFAB_REDIS_URL").map(|s| s.name.as_str()),
            Some("redis")
        );
        assert_eq!(
            env_secret(c, "CONFAB_AMQP_URL").map(|s| s.name.as_str()),
            Some("amqp")
        );
    }

    #[test]
    fn deployment_is_labelled_owned_and_selects_its_own_pods() {
        let cc = sample();
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        assert_eq!(d.metadata.name.as_deref(), Some("demo-gateway"));
        assert_eq!(
            d.metadata.owner_references.as_ref().expect("owners")[0].uid,
            "11111111-2222-3333-4444-555555555555"
        );
        let spec = &d.spec;
        let selector = spec.selector.match_labels.as_ref().expect("selector");
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .expect("pod labels");
        assert!(
            selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "selector must match pod labels"
        );
        assert_eq!(pod_labels["app.kubernetes.io/component"], "gateway");
    }

    #[test]
    fn autoscaled_deployment_leaves_replicas_to_the_hpa() {
        let mut cc = sample();
        assert_eq!(
            deployment(&cc, &Inputs::default())
                .expect("builds")
                .spec
                .replicas,
            None
        );
        cc.spec.gateway.autoscaling = None;
        assert_eq!(
            deployment(&cc, &Inputs::default())
                .expect("builds")
                .spec
                .replicas,
            Some(3)
        );
    }

    fn rolling_update(d: &Deployment) -> &RollingUpdateDeployment {
        d.spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .expect("rolling update")
    }

    #[test]
    fn rollout_surges_by_the_drain_budget_and_never_goes_unavailable() {
        let cc = sample();
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        let ru = rolling_update(&d);
        // Unknown counts: 500 reconnects/s × 60 s ÷ 10 000 connections per full pod = 3.
        assert_eq!(ru.max_surge, Some(IntOrString::Int(3)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(
            d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
            Some("RollingUpdate")
        );
        let d = deployment(&cc, &Inputs::with_connections(Some(6_000))).expect("builds");
        assert_eq!(rolling_update(&d).max_surge, Some(IntOrString::Int(5)));
        // 30 pods' worth of budget, but the fleet never exceeds autoscaling.maxReplicas.
        let d = deployment(&cc, &Inputs::with_connections(Some(1_000))).expect("builds");
        assert_eq!(rolling_update(&d).max_surge, Some(IntOrString::Int(10)));
    }

    #[test]
    fn a_fixed_fleet_caps_the_surge_at_its_replicas() {
        let mut cc = sample();
        cc.spec.gateway.autoscaling = None;
        cc.spec.gateway.replicas = 4;
        let d = deployment(&cc, &Inputs::with_connections(Some(10))).expect("builds");
        assert_eq!(rolling_update(&d).max_surge, Some(IntOrString::Int(4)));
        let plan = rollout_plan(&cc, Some(100_000));
        assert_eq!(
            plan,
            rollout::Plan {
                connections_per_pod: 100_000,
                pods_at_once: 1
            }
        );
    }

    #[test]
    fn pods_get_the_drain_window_plus_margin_to_terminate() {
        let mut cc = sample();
        let pod = |cc: &ChatCluster| {
            deployment(cc, &Inputs::default())
                .expect("builds")
                .spec
                .template
                .spec
                .expect("pod")
        };
        assert_eq!(pod(&cc).termination_grace_period_seconds, Some(75));
        cc.spec.rollout.drain_seconds = 0;
        assert_eq!(pod(&cc).termination_grace_period_seconds, Some(15));
    }

    #[test]
    fn the_pre_stop_hook_starts_the_drain_and_waits_for_it() {
        let d = deployment(&sample(), &Inputs::default()).expect("builds");
        let hook = container(&d)
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .expect("preStop");
        assert_eq!(
            hook.exec.as_ref().and_then(|e| e.command.clone()),
            Some(vec![
                "/usr/local/bin/confab-gateway".to_owned(),
                "drain".to_owned(),
                "--wait".to_owned()
            ])
        );
        assert!(hook.sleep.is_none() && hook.http_get.is_none());
    }

    #[test]
    fn the_gateway_binary_path_is_where_its_dockerfile_installs_it() {
        let dockerfile = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway/Dockerfile"
        ))
        .expect("gateway/Dockerfile");
        assert!(
            dockerfile.contains(&format!(" {GATEWAY_BINARY}\n"))
                && dockerfile.contains(&format!("ENTRYPOINT [\"{GATEWAY_BINARY}\"]")),
            "gateway/Dockerfile no longer installs {GATEWAY_BINARY}"
        );
    }

    #[test]
    fn the_pod_sees_its_own_annotations_in_a_file() {
        let d = deployment(&sample(), &Inputs::default()).expect("builds");
        let pod = d.spec.template.spec.as_ref().expect("pod");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "podinfo")
            .expect("podinfo volume");
        let items = volume
            .downward_api
            .as_ref()
            .and_then(|d| d.items.as_ref())
            .expect("downward API items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].path, "annotations");
        assert_eq!(
            items[0].field_ref.as_ref().map(|f| f.field_path.as_str()),
            Some("metadata.annotations")
        );
        let mount = container(&d)
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "podinfo")
            .expect("podinfo mount");
        assert_eq!(mount.mount_path, "/etc/confab/podinfo");
        assert_eq!(mount.read_only, Some(true));
        // The gateway is told where the file is, and how long to drain, by the ConfigMap.
        let settings = configmap::settings(&sample());
        assert_eq!(
            settings["CONFAB_DRAIN_ANNOTATION_FILE"],
            format!("{}/{}", mount.mount_path, items[0].path)
        );
        assert_eq!(settings["CONFAB_DRAIN_SECONDS"], "60");
    }

    #[test]
    fn a_secret_hash_goes_on_the_pod_template_so_rotation_rolls_the_fleet() {
        let cc = sample();
        let annotations = |hash: Option<&str>| {
            let inputs = Inputs {
                secret_hash: hash.map(str::to_owned),
                ..Inputs::default()
            };
            deployment(&cc, &inputs)
                .expect("builds")
                .spec
                .template
                .metadata
                .and_then(|m| m.annotations)
                .expect("annotations")
        };
        assert_eq!(annotations(Some("abc"))[SECRET_HASH_ANNOTATION], "abc");
        assert!(!annotations(None).contains_key(SECRET_HASH_ANNOTATION));
    }

    #[test]
    fn the_hand_over_apply_carries_the_live_replicas_even_with_autoscaling() {
        let inputs = Inputs {
            replicas_override: Some(7),
            ..Inputs::default()
        };
        assert_eq!(
            deployment(&sample(), &inputs)
                .expect("builds")
                .spec
                .replicas,
            Some(7)
        );
    }

    #[test]
    fn pod_overrides_and_default_spread_reach_the_gateway_pods() {
        let mut cc = sample();
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        let pod = d.spec.template.spec.as_ref().expect("pod");
        placement::assert_has_sample_overrides(pod);
        assert_eq!(
            pod.topology_spread_constraints,
            Some(placement::default_gateway_spread(&cc))
        );
        // gateway.resources (the older spelling) still applies.
        assert_eq!(container(&d).resources, cc.spec.gateway.resources);
        cc.spec.gateway.resources = None;
        cc.spec.gateway.pod = None;
        let d = deployment(&cc, &Inputs::default()).expect("builds");
        assert_eq!(
            container(&d).resources,
            Some(placement::default_resources(Component::Gateway))
        );
        let pod = d.spec.template.spec.as_ref().expect("pod");
        assert_eq!(pod.priority_class_name, None);
        assert_eq!(
            pod.topology_spread_constraints.as_ref().map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn a_settings_change_changes_the_pod_template() {
        let cc = sample();
        let before = config_hash(&cc);
        let mut changed = cc.clone();
        changed.spec.limits.burst += 1;
        assert_ne!(before, config_hash(&changed));
        let d = deployment(&changed, &Inputs::default()).expect("builds");
        let annotations = d
            .spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .expect("annotations");
        assert_eq!(annotations[CONFIG_HASH_ANNOTATION], config_hash(&changed));
    }
}
