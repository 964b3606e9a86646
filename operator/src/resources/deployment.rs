//! The gateway Deployment: hardened pods, probes, Secrets by reference, draining rollouts.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext, SleepAction,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildError, Component, GATEWAY_DATA_DIR, GATEWAY_PORT, child_meta, configmap, gateway_name,
    labels, selector_labels, stable_hash,
};
use crate::crd::{ChatCluster, SecretKeyRef};
use crate::rollout;

/// Pod annotation whose change rolls the fleet when only the ConfigMap changed.
pub const CONFIG_HASH_ANNOTATION: &str = "confab.dev/config-hash";
/// UID of the non-root user the gateway image runs as (distroless `nonroot`).
pub const GATEWAY_UID: i64 = 65532;
/// Seconds the pod keeps serving after it is told to stop, so that endpoints controllers and
/// load balancers stop sending new clients before the gateway starts draining on SIGTERM.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;

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

/// How many pods may drain at once, assuming pods are full unless told otherwise.
pub fn max_surge(cc: &ChatCluster, observed_connections_per_pod: Option<i64>) -> i32 {
    let per_pod =
        observed_connections_per_pod.unwrap_or(i64::from(cc.spec.gateway.max_connections_per_pod));
    rollout::pods_draining_at_once(
        cc.spec.rollout.max_reconnects_per_second,
        cc.spec.rollout.drain_seconds,
        per_pod,
    )
}

pub fn deployment(
    cc: &ChatCluster,
    observed_connections_per_pod: Option<i64>,
) -> Result<Deployment, BuildError> {
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
        resources: cc.spec.gateway.resources.clone(),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 1)),
        startup_probe: Some(http_probe("/healthz", 2, 30)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
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
                mount_path: "/etc/podinfo".to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(false),
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
                // The `confab.dev/drain` annotation reaches the gateway through this file.
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
    Ok(Deployment {
        metadata: child_meta(cc, name, Component::Gateway)?,
        spec: DeploymentSpec {
            // With autoscaling the HPA owns the replica count; leaving it out of the applied
            // object keeps server-side apply from fighting the HPA.
            replicas: if cc.spec.gateway.autoscaling.is_some() {
                None
            } else {
                Some(cc.spec.gateway.replicas)
            },
            selector: LabelSelector {
                match_labels: Some(selector_labels(cc, Component::Gateway)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(max_surge(
                        cc,
                        observed_connections_per_pod,
                    ))),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cc, Component::Gateway)),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash(cc),
                    )])),
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
    use crate::crd::{BackendSpec, ExternalBackend};
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
        let d = deployment(&sample(), None).expect("builds");
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
        let d = deployment(&sample(), None).expect("builds");
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
    fn deployment_takes_credentials_from_secrets_by_reference() {
        let d = deployment(&sample(), None).expect("builds");
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
        let d = deployment(&cc, None).expect("builds");
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
        let d = deployment(&cc, None).expect("builds");
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
        assert_eq!(deployment(&cc, None).expect("builds").spec.replicas, None);
        cc.spec.gateway.autoscaling = None;
        assert_eq!(
            deployment(&cc, None).expect("builds").spec.replicas,
            Some(3)
        );
    }

    #[test]
    fn rollout_surges_by_the_drain_budget_and_never_goes_unavailable() {
        let cc = sample();
        let d = deployment(&cc, None).expect("builds");
        let spec = &d.spec;
        let ru = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .expect("rolling update");
        // 500 reconnects/s × 60 s ÷ 10 000 connections per full pod = 3 pods at once.
        assert_eq!(ru.max_surge, Some(IntOrString::Int(3)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        let pod = spec.template.spec.as_ref().expect("pod");
        assert_eq!(pod.termination_grace_period_seconds, Some(75));
        let d = deployment(&cc, Some(1_000)).expect("builds");
        let ru = d
            .spec
            .strategy
            .and_then(|s| s.rolling_update)
            .expect("rolling update");
        assert_eq!(ru.max_surge, Some(IntOrString::Int(30)));
    }

    #[test]
    fn a_settings_change_changes_the_pod_template() {
        let cc = sample();
        let before = config_hash(&cc);
        let mut changed = cc.clone();
        changed.spec.limits.burst += 1;
        assert_ne!(before, config_hash(&changed));
        let d = deployment(&changed, None).expect("builds");
        let annotations = d
            .spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .expect("annotations");
        assert_eq!(annotations[CONFIG_HASH_ANNOTATION], config_hash(&changed));
    }
}
