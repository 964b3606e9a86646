//! Pod placement and resources: the defaults (gateways spread over nodes and zones, requests and
//! limits per component) and the user's `pod` overrides on top of them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Component, selector_labels};
use crate::crd::{ChatCluster, PodOverrides};

/// Node label every node carries; gateways go one per node where the scheduler can.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";
/// Zone label set by cloud providers; gateways spread across zones where there are several.
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect(),
    )
}

/// Requests the scheduler can plan with and a memory limit, per component. A gateway holds
/// `maxConnectionsPerPod` idle connections in well under 256Mi (a few KiB each, BENCHMARKS.md);
/// no CPU limit, so a burst of reconnects is not throttled.
pub fn default_resources(component: Component) -> ResourceRequirements {
    let (cpu, memory, limit) = match component {
        Component::Gateway => ("250m", "256Mi", "1Gi"),
        Component::Redis => ("50m", "64Mi", "512Mi"),
        Component::RabbitMq => ("100m", "256Mi", "1Gi"),
    };
    ResourceRequirements {
        requests: quantities(&[("cpu", cpu), ("memory", memory)]),
        limits: quantities(&[("memory", limit)]),
        ..ResourceRequirements::default()
    }
}

/// The default spread of gateway pods: at most one more per node than on any other eligible
/// node (hard, so three gateways never share a node while others are free) and, softly, across
/// zones. `pod-template-hash` keeps old and new pods of a rollout spread each on their own.
pub fn default_gateway_spread(cc: &ChatCluster) -> Vec<TopologySpreadConstraint> {
    let constraint = |key: &str, when: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        when_unsatisfiable: when.to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(cc, Component::Gateway)),
            ..LabelSelector::default()
        }),
        match_label_keys: Some(vec!["pod-template-hash".to_owned()]),
        // Nodes the pods cannot run on (tainted, or outside their affinity) are no domain.
        node_taints_policy: Some("Honor".to_owned()),
        node_affinity_policy: Some("Honor".to_owned()),
        ..TopologySpreadConstraint::default()
    };
    vec![
        constraint(HOSTNAME_KEY, "DoNotSchedule"),
        constraint(ZONE_KEY, "ScheduleAnyway"),
    ]
}

/// The main container's resources: the overrides', else `fallback` (an older field), else the
/// component's default.
pub fn resources(
    overrides: Option<&PodOverrides>,
    fallback: Option<&ResourceRequirements>,
    component: Component,
) -> ResourceRequirements {
    overrides
        .and_then(|o| o.resources.clone())
        .or_else(|| fallback.cloned())
        .unwrap_or_else(|| default_resources(component))
}

/// Puts the scheduling overrides on a pod spec; `default_spread` applies unless the overrides
/// give their own list (an empty one turns spreading off).
pub fn apply(
    pod: &mut PodSpec,
    overrides: Option<&PodOverrides>,
    default_spread: Vec<TopologySpreadConstraint>,
) {
    let spread = overrides
        .and_then(|o| o.topology_spread_constraints.clone())
        .unwrap_or(default_spread);
    pod.topology_spread_constraints = (!spread.is_empty()).then_some(spread);
    let Some(o) = overrides else {
        return;
    };
    pod.affinity = o.affinity.clone();
    pod.tolerations = (!o.tolerations.is_empty()).then(|| o.tolerations.clone());
    pod.node_selector = (!o.node_selector.is_empty()).then(|| o.node_selector.clone());
    pod.priority_class_name = o.priority_class_name.clone();
    pod.image_pull_secrets =
        (!o.image_pull_secrets.is_empty()).then(|| o.image_pull_secrets.clone());
}

/// Asserts that a pod spec carries every scheduling field of `sample_pod_overrides()`.
#[cfg(test)]
pub(crate) fn assert_has_sample_overrides(pod: &PodSpec) {
    let o = crate::sample::sample_pod_overrides();
    assert_eq!(pod.affinity, o.affinity);
    assert_eq!(pod.tolerations.as_ref(), Some(&o.tolerations));
    assert_eq!(pod.node_selector.as_ref(), Some(&o.node_selector));
    assert_eq!(pod.priority_class_name, o.priority_class_name);
    assert_eq!(pod.image_pull_secrets.as_ref(), Some(&o.image_pull_secrets));
    assert!(
        pod.affinity.is_some() && o.priority_class_name.is_some(),
        "the sample sets them"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    #[test]
    fn gateways_spread_hard_over_nodes_and_softly_over_zones() {
        let spread = default_gateway_spread(&sample());
        let keys: Vec<_> = spread
            .iter()
            .map(|c| {
                (
                    c.topology_key.as_str(),
                    c.when_unsatisfiable.as_str(),
                    c.max_skew,
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("kubernetes.io/hostname", "DoNotSchedule", 1),
                ("topology.kubernetes.io/zone", "ScheduleAnyway", 1)
            ]
        );
        let selector = spread[0]
            .label_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .expect("selector");
        assert_eq!(selector["app.kubernetes.io/name"], "confab-gateway");
        assert_eq!(selector["app.kubernetes.io/instance"], "demo");
    }

    #[test]
    fn an_empty_spread_override_turns_spreading_off_and_none_keeps_the_default() {
        let cc = sample();
        let mut pod = PodSpec::default();
        apply(&mut pod, None, default_gateway_spread(&cc));
        assert_eq!(pod.topology_spread_constraints.map(|c| c.len()), Some(2));
        let off = PodOverrides {
            topology_spread_constraints: Some(Vec::new()),
            ..PodOverrides::default()
        };
        let mut pod = PodSpec::default();
        apply(&mut pod, Some(&off), default_gateway_spread(&cc));
        assert_eq!(pod.topology_spread_constraints, None);
    }

    #[test]
    fn resources_come_from_the_override_then_the_older_field_then_the_default() {
        let mut overrides = PodOverrides::default();
        let older = ResourceRequirements {
            limits: quantities(&[("memory", "2Gi")]),
            ..ResourceRequirements::default()
        };
        assert_eq!(
            resources(None, None, Component::Gateway),
            default_resources(Component::Gateway)
        );
        assert_eq!(
            resources(Some(&overrides), Some(&older), Component::Gateway),
            older
        );
        overrides.resources = Some(default_resources(Component::Redis));
        assert_eq!(
            resources(Some(&overrides), Some(&older), Component::Gateway),
            default_resources(Component::Redis)
        );
        let gateway = default_resources(Component::Gateway);
        assert_eq!(
            gateway.requests.as_ref().expect("requests")["memory"],
            Quantity("256Mi".into())
        );
        assert!(
            !gateway.limits.as_ref().expect("limits").contains_key("cpu"),
            "no CPU limit: reconnect bursts are not throttled"
        );
    }
}
