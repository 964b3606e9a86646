//! The gateway HorizontalPodAutoscaler, scaling on live connections per pod.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{BuildError, Component, child_meta, gateway_name};
use crate::crd::ChatCluster;

/// The per-pod metric the HPA reads (the gateway's connection gauge, served to the HPA by a
/// metrics adapter such as prometheus-adapter).
pub const CONNECTIONS_METRIC: &str = "confab_connections";

/// `None` when the ChatCluster does not ask for autoscaling (the reconciler then deletes any
/// HPA left from before).
pub fn hpa(cc: &ChatCluster) -> Result<Option<HorizontalPodAutoscaler>, BuildError> {
    let Some(autoscaling) = &cc.spec.gateway.autoscaling else {
        return Ok(None);
    };
    Ok(Some(HorizontalPodAutoscaler {
        metadata: child_meta(cc, gateway_name(cc), Component::Gateway)?,
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: gateway_name(cc),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".to_owned(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier {
                        name: CONNECTIONS_METRIC.to_owned(),
                        selector: None,
                    },
                    target: MetricTarget {
                        type_: "AverageValue".to_owned(),
                        average_value: Some(Quantity(
                            autoscaling.target_connections_per_pod.to_string(),
                        )),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            // Scaling down drains pods, which makes their clients reconnect: go slowly.
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(300),
                    policies: Some(vec![HPAScalingPolicy {
                        type_: "Pods".to_owned(),
                        value: 1,
                        period_seconds: 60,
                    }]),
                    ..HPAScalingRules::default()
                }),
                ..HorizontalPodAutoscalerBehavior::default()
            }),
        },
        status: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    #[test]
    fn hpa_targets_the_gateway_deployment_on_connections_per_pod() {
        let hpa = hpa(&sample()).expect("builds").expect("autoscaling is set");
        assert_eq!(hpa.metadata.name.as_deref(), Some("demo-gateway"));
        assert_eq!(
            hpa.metadata.owner_references.as_ref().expect("owners")[0].name,
            "demo"
        );
        let spec = hpa.spec;
        assert_eq!(spec.scale_target_ref.kind, "Deployment");
        assert_eq!(spec.scale_target_ref.name, "demo-gateway");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 10));
        let pods = spec
            .metrics
            .expect("metrics")
            .remove(0)
            .pods
            .expect("pods metric");
        assert_eq!(pods.metric.name, "confab_connections");
        assert_eq!(pods.target.average_value, Some(Quantity("5000".into())));
    }

    #[test]
    fn no_hpa_without_autoscaling() {
        let mut cc = sample();
        cc.spec.gateway.autoscaling = None;
        assert_eq!(hpa(&cc), Ok(None));
    }
}
