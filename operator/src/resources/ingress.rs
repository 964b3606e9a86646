//! The gateway Ingress: a public host to the gateway Service, TLS ending at the ingress.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};

use super::{BuildError, Component, child_meta, gateway_name};
use crate::crd::ChatCluster;

/// ingress-nginx closes a proxied connection that sends nothing for 60 s by default, which
/// would cut idle WebSockets between heartbeats under load; an hour, as its WebSocket guide
/// suggests. Buffering is off so events are not held back.
pub fn default_annotations() -> BTreeMap<String, String> {
    [
        ("nginx.ingress.kubernetes.io/proxy-read-timeout", "3600"),
        ("nginx.ingress.kubernetes.io/proxy-send-timeout", "3600"),
        ("nginx.ingress.kubernetes.io/proxy-buffering", "off"),
        ("nginx.ingress.kubernetes.io/ssl-redirect", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The TLS Secret's name: the spec's, or `<cluster>-gateway-tls`.
pub fn tls_secret_name(cc: &ChatCluster) -> Option<String> {
    let ingress = cc.spec.gateway.ingress.as_ref()?;
    Some(
        ingress
            .tls_secret_name
            .clone()
            .unwrap_or_else(|| format!("{}-tls", gateway_name(cc))),
    )
}

/// `None` when the ChatCluster asks for no Ingress (the reconciler then deletes one left from
/// before).
pub fn ingress(cc: &ChatCluster) -> Result<Option<Ingress>, BuildError> {
    let Some(spec) = &cc.spec.gateway.ingress else {
        return Ok(None);
    };
    let mut meta = child_meta(cc, gateway_name(cc), Component::Gateway)?;
    let mut annotations = default_annotations();
    annotations.extend(spec.annotations.clone());
    meta.annotations = Some(annotations);
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: gateway_name(cc),
            port: Some(ServiceBackendPort {
                name: Some("http".to_owned()),
                ..ServiceBackendPort::default()
            }),
        }),
        ..IngressBackend::default()
    };
    Ok(Some(Ingress {
        metadata: meta,
        spec: Some(K8sIngressSpec {
            ingress_class_name: spec.class_name.clone(),
            tls: Some(vec![IngressTLS {
                hosts: Some(vec![spec.host.clone()]),
                secret_name: tls_secret_name(cc),
            }]),
            rules: Some(vec![IngressRule {
                host: Some(spec.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".to_owned()),
                        path_type: "Prefix".to_owned(),
                        backend,
                    }],
                }),
            }]),
            ..K8sIngressSpec::default()
        }),
        status: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    #[test]
    fn the_ingress_ends_tls_for_the_host_and_routes_everything_to_the_gateway_service() {
        let ing = ingress(&sample()).expect("builds").expect("asked for");
        assert_eq!(ing.metadata.name.as_deref(), Some("demo-gateway"));
        assert_eq!(
            ing.metadata.owner_references.as_ref().expect("owners")[0].name,
            "demo"
        );
        let spec = ing.spec.expect("spec");
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        let tls = &spec.tls.expect("tls")[0];
        assert_eq!(tls.hosts, Some(vec!["chat.example.com".to_owned()]));
        assert_eq!(tls.secret_name.as_deref(), Some("chat-example-com-tls"));
        let rule = &spec.rules.expect("rules")[0];
        assert_eq!(rule.host.as_deref(), Some("chat.example.com"));
        let path = &rule.http.as_ref().expect("http").paths[0];
        assert_eq!(
            (path.path.as_deref(), path.path_type.as_str()),
            (Some("/"), "Prefix")
        );
        let service = path.backend.service.as_ref().expect("service backend");
        assert_eq!(service.name, "demo-gateway");
        assert_eq!(
            service.port.as_ref().and_then(|p| p.name.as_deref()),
            Some("http")
        );
    }

    #[test]
    fn websocket_timeouts_are_set_and_the_users_annotations_win() {
        let mut cc = sample();
        if let Some(i) = cc.spec.gateway.ingress.as_mut() {
            i.annotations.insert(
                "nginx.ingress.kubernetes.io/proxy-read-timeout".into(),
                "7200".into(),
            );
            i.tls_secret_name = None;
        }
        let ing = ingress(&cc).expect("builds").expect("asked for");
        let annotations = ing.metadata.annotations.expect("annotations");
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"],
            "7200"
        );
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"],
            "3600"
        );
        assert_eq!(annotations["cert-manager.io/cluster-issuer"], "letsencrypt");
        let tls = &ing.spec.and_then(|s| s.tls).expect("tls")[0];
        assert_eq!(tls.secret_name.as_deref(), Some("demo-gateway-tls"));
    }

    #[test]
    fn no_ingress_unless_asked() {
        let mut cc = sample();
        cc.spec.gateway.ingress = None;
        assert_eq!(ingress(&cc), Ok(None));
    }
}
