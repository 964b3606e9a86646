//! The gateway PodDisruptionBudget: voluntary evictions take one pod at a time.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, Component, child_meta, gateway_name, selector_labels};
use crate::crd::ChatCluster;

/// Node drains evict one gateway at a time, so at most one pod's clients reconnect at once.
pub fn pdb(cc: &ChatCluster) -> Result<PodDisruptionBudget, BuildError> {
    Ok(PodDisruptionBudget {
        metadata: child_meta(cc, gateway_name(cc), Component::Gateway)?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(cc, Component::Gateway)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    #[test]
    fn pdb_allows_one_gateway_down_and_selects_gateway_pods() {
        let pdb = pdb(&sample()).expect("builds");
        assert_eq!(pdb.metadata.name.as_deref(), Some("demo-gateway"));
        assert_eq!(
            pdb.metadata.owner_references.as_ref().expect("owners")[0].name,
            "demo"
        );
        let spec = pdb.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        let labels = spec.selector.and_then(|s| s.match_labels).expect("labels");
        assert_eq!(labels["app.kubernetes.io/name"], "confab-gateway");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    }
}
