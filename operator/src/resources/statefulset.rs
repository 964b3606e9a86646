//! StatefulSets of the managed (development) Redis and RabbitMQ, each with its own volume.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, ExecAction, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecurityContext, TCPSocketAction, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildError, ManagedKind, backend_name, child_meta, labels, placement, selector_labels,
};
use crate::crd::{ChatCluster, ManagedBackend};

/// UID and GID of the `redis` and `rabbitmq` users in the official Debian-based images.
pub const BACKEND_UID: i64 = 999;

fn exec_probe(command: &[&str], initial_delay: i32, period: i32, timeout: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(command.iter().map(|s| (*s).to_owned()).collect()),
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn tcp_probe(port: &str, initial_delay: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String(port.to_owned()),
            ..TCPSocketAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        timeout_seconds: Some(5),
        failure_threshold: Some(6),
        ..Probe::default()
    }
}

fn container(kind: ManagedKind, managed: &ManagedBackend) -> Container {
    let image = managed
        .image
        .clone()
        .unwrap_or_else(|| kind.default_image().to_owned());
    let (args, env, readiness, liveness, read_only_root) = match kind {
        ManagedKind::Redis => (
            // No password on a dev instance reachable only inside the cluster, so protected
            // mode (which refuses non-loopback clients without one) must be off.
            Some(
                [
                    "redis-server",
                    "--appendonly",
                    "yes",
                    "--dir",
                    "/data",
                    "--protected-mode",
                    "no",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            None,
            exec_probe(&["redis-cli", "ping"], 5, 5, 3),
            tcp_probe("redis", 15),
            true,
        ),
        ManagedKind::RabbitMq => (
            None,
            // Lets the default guest account connect from other pods (dev only).
            Some(vec![EnvVar {
                name: "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".to_owned(),
                value: Some("-rabbit loopback_users []".to_owned()),
                ..EnvVar::default()
            }]),
            exec_probe(
                &["rabbitmq-diagnostics", "-q", "check_port_connectivity"],
                20,
                10,
                10,
            ),
            exec_probe(&["rabbitmq-diagnostics", "-q", "ping"], 60, 30, 15),
            // The image's entrypoint writes its config under /etc/rabbitmq.
            false,
        ),
    };
    Container {
        name: kind.component().as_str().to_owned(),
        image: Some(image),
        resources: Some(placement::resources(
            managed.pod.as_ref(),
            None,
            kind.component(),
        )),
        args,
        env,
        ports: Some(vec![ContainerPort {
            name: Some(kind.port_name().to_owned()),
            container_port: kind.port(),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".to_owned(),
            mount_path: kind.data_path().to_owned(),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(BACKEND_UID),
            run_as_group: Some(BACKEND_UID),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(read_only_root),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// `None` when this backend is not managed by the operator.
pub fn statefulset(cc: &ChatCluster, kind: ManagedKind) -> Result<Option<StatefulSet>, BuildError> {
    let Some(managed) = kind.managed(cc) else {
        return Ok(None);
    };
    let name = backend_name(cc, kind);
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_owned()),
            // Labelled so that the finalizer can find and delete the claims on clean-up.
            labels: Some(labels(cc, kind.component())),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: managed.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(managed.storage.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    };
    Ok(Some(StatefulSet {
        metadata: child_meta(cc, name.clone(), kind.component())?,
        spec: StatefulSetSpec {
            replicas: Some(managed.replicas),
            service_name: Some(name),
            selector: LabelSelector {
                match_labels: Some(selector_labels(cc, kind.component())),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cc, kind.component())),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(kind, managed)),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        },
        status: None,
    }))
}

fn pod_spec(kind: ManagedKind, managed: &ManagedBackend) -> PodSpec {
    let mut pod = PodSpec {
        containers: vec![container(kind, managed)],
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            fs_group: Some(BACKEND_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    // One pod: nothing to spread.
    placement::apply(&mut pod, managed.pod.as_ref(), Vec::new());
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    fn pod(sts: &StatefulSet) -> &PodSpec {
        sts.spec.template.spec.as_ref().expect("pod spec")
    }

    #[test]
    fn redis_statefulset_has_probes_storage_and_an_owner() {
        let sts = statefulset(&sample(), ManagedKind::Redis)
            .expect("builds")
            .expect("managed");
        assert_eq!(sts.metadata.name.as_deref(), Some("demo-redis"));
        assert_eq!(
            sts.metadata.owner_references.as_ref().expect("owners")[0].kind,
            "ChatCluster"
        );
        let spec = &sts.spec;
        assert_eq!(spec.service_name.as_deref(), Some("demo-redis"));
        assert_eq!(spec.replicas, Some(1));
        let claim = &spec.volume_claim_templates.as_ref().expect("claims")[0];
        let requests = claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref());
        assert_eq!(
            requests.expect("requests")["storage"],
            Quantity("2Gi".into())
        );
        assert_eq!(
            claim.metadata.labels.as_ref().expect("claim labels")["app.kubernetes.io/instance"],
            "demo"
        );
        let c = &pod(&sts).containers[0];
        assert_eq!(c.image.as_deref(), Some("redis:7.4"));
        let ready = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.exec.as_ref())
            .and_then(|e| e.command.clone());
        assert_eq!(ready, Some(vec!["redis-cli".to_owned(), "ping".to_owned()]));
        assert!(
            c.liveness_probe
                .as_ref()
                .and_then(|p| p.tcp_socket.as_ref())
                .is_some()
        );
        assert_eq!(
            c.volume_mounts.as_ref().expect("mounts")[0].mount_path,
            "/data"
        );
        assert_eq!(
            c.security_context.as_ref().and_then(|s| s.run_as_non_root),
            Some(true)
        );
    }

    #[test]
    fn rabbitmq_statefulset_listens_on_amqp_and_admits_remote_guest() {
        let mut cc = sample();
        if let Some(managed) = cc.spec.rabbitmq.as_mut().and_then(|r| r.managed.as_mut()) {
            managed.image = Some("rabbitmq:4.1-management".into());
            managed.storage_class_name = Some("fast".into());
        }
        let sts = statefulset(&cc, ManagedKind::RabbitMq)
            .expect("builds")
            .expect("managed");
        let c = &pod(&sts).containers[0];
        assert_eq!(c.image.as_deref(), Some("rabbitmq:4.1-management"));
        assert_eq!(c.ports.as_ref().expect("ports")[0].container_port, 5672);
        let env = c.env.as_ref().expect("env");
        assert_eq!(env[0].value.as_deref(), Some("-rabbit loopback_users []"));
        assert!(
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.exec.as_ref())
                .is_some()
        );
        let spec = &sts.spec;
        let claim = &spec.volume_claim_templates.as_ref().expect("claims")[0];
        assert_eq!(
            claim
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref()),
            Some("fast")
        );
        assert_eq!(
            c.volume_mounts.as_ref().expect("mounts")[0].mount_path,
            "/var/lib/rabbitmq"
        );
    }

    #[test]
    fn backend_pods_get_default_resources_and_their_overrides() {
        let mut cc = sample();
        let sts = statefulset(&cc, ManagedKind::Redis)
            .expect("builds")
            .expect("managed");
        assert_eq!(
            pod(&sts).containers[0].resources,
            Some(placement::default_resources(
                crate::resources::Component::Redis
            ))
        );
        assert_eq!(pod(&sts).topology_spread_constraints, None);
        if let Some(m) = cc.spec.redis.as_mut().and_then(|r| r.managed.as_mut()) {
            m.pod = Some(crate::sample::sample_pod_overrides());
        }
        let sts = statefulset(&cc, ManagedKind::Redis)
            .expect("builds")
            .expect("managed");
        placement::assert_has_sample_overrides(pod(&sts));
    }

    #[test]
    fn external_or_absent_backends_get_no_statefulset() {
        let mut cc = sample();
        cc.spec.redis = None;
        assert_eq!(statefulset(&cc, ManagedKind::Redis), Ok(None));
    }
}
