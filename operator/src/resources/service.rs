//! Services: the gateway's load-balanced and headless Services, and each managed backend's.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildError, Component, GATEWAY_PORT, ManagedKind, backend_name, child_meta, gateway_name,
    headless_name, selector_labels,
};
use crate::crd::ChatCluster;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// The Service clients (through an ingress) connect to; only ready pods receive clients.
pub fn gateway_service(cc: &ChatCluster) -> Result<Service, BuildError> {
    Ok(Service {
        metadata: child_meta(cc, gateway_name(cc), Component::Gateway)?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(cc, Component::Gateway)),
            ports: Some(vec![port("http", GATEWAY_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// One DNS record per gateway pod, including pods that are not ready: the operator and
/// Prometheus reach each pod's `/metrics` this way, also while it drains.
pub fn headless_service(cc: &ChatCluster) -> Result<Service, BuildError> {
    Ok(Service {
        metadata: child_meta(cc, headless_name(cc), Component::Gateway)?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(cc, Component::Gateway)),
            ports: Some(vec![port("http", GATEWAY_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The governing (headless) Service of a managed backend's StatefulSet, which gateways reach
/// it through.
pub fn backend_service(cc: &ChatCluster, kind: ManagedKind) -> Result<Service, BuildError> {
    Ok(Service {
        metadata: child_meta(cc, backend_name(cc, kind), kind.component())?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(cc, kind.component())),
            ports: Some(vec![port(kind.port_name(), kind.port())]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    #[test]
    fn gateway_service_selects_gateway_pods_on_the_http_port() {
        let svc = gateway_service(&sample()).expect("builds");
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-gateway"));
        let spec = svc.spec.expect("spec");
        assert_eq!(
            spec.selector.expect("selector")["app.kubernetes.io/name"],
            "confab-gateway"
        );
        let ports = spec.ports.expect("ports");
        assert_eq!(
            (ports[0].port, ports[0].target_port.clone()),
            (8080, Some(IntOrString::String("http".into())))
        );
        assert_eq!(
            svc.metadata.owner_references.expect("owners")[0].kind,
            "ChatCluster"
        );
    }

    #[test]
    fn headless_service_publishes_every_pod_even_when_not_ready() {
        let svc = headless_service(&sample()).expect("builds");
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-gateway-headless"));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert!(svc.metadata.owner_references.is_some());
    }

    #[test]
    fn backend_services_expose_redis_and_amqp_ports() {
        let cc = sample();
        let redis = backend_service(&cc, ManagedKind::Redis).expect("builds");
        assert_eq!(redis.metadata.name.as_deref(), Some("demo-redis"));
        assert_eq!(
            redis
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .expect("ports")[0]
                .port,
            6379
        );
        assert_eq!(
            redis.metadata.labels.as_ref().expect("labels")["app.kubernetes.io/component"],
            "redis"
        );
        let amqp = backend_service(&cc, ManagedKind::RabbitMq).expect("builds");
        assert_eq!(
            amqp.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .expect("ports")[0]
                .port,
            5672
        );
        assert_eq!(
            amqp.spec.and_then(|s| s.selector).expect("selector")["app.kubernetes.io/name"],
            "confab-rabbitmq"
        );
        assert!(amqp.metadata.owner_references.is_some());
    }
}
