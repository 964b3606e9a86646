//! The ChatCluster reconciler: applies children, keeps gateway pods' deletion costs, reports
//! status (connections, rollout progress) and conditions, cleans up.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::crd::{ChatCluster, ChatClusterStatus, Phase, RolloutStatus, SecretKeyRef};
use crate::error::{Error, Result};
use crate::fleet::{self, ConnectionSource, FleetMemory, Observation};
use crate::metrics::Metrics;
use crate::resources::{self, ManagedKind, configmap, deployment, hpa, pdb, service, statefulset};
use crate::rollout::Plan;

/// The finalizer that lets the operator delete what owner references do not cover.
pub const FINALIZER: &str = "confab.dev/cleanup";
/// The one field manager every server-side apply uses.
pub const FIELD_MANAGER: &str = "confab-operator";
/// How often a healthy cluster is looked at again even without a change: the pods' connection
/// counts, `status.connections` and the deletion costs are only as fresh as this.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How soon a cluster that is rolling out or waiting for a Secret is looked at again.
pub const RECHECK: Duration = Duration::from_secs(15);
/// First and last delay of the per-object exponential backoff after errors.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Where live connections per gateway pod come from (HTTP in production).
    pub connections: Arc<dyn ConnectionSource>,
    /// Last known counts and deletion-cost patch times per pod.
    pub fleet: FleetMemory,
    /// Consecutive failures per object, for the backoff; cleared by a success.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        instance: Option<String>,
        connections: Arc<dyn ConnectionSource>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            connections,
            fleet: FleetMemory::default(),
            failures: Mutex::default(),
        }
    }

    fn record_failure(&self, key: String) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn clear_failures(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(key);
    }
}

/// The delay before the n-th retry (n ≥ 1): 5 s, 10 s, 20 s, … capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_MIN.saturating_mul(1 << exponent).min(BACKOFF_MAX)
}

fn object_key(cc: &ChatCluster) -> String {
    format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
}

/// Reconciles one ChatCluster: finalizer first, then apply or clean-up.
pub async fn reconcile(cc: Arc<ChatCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start_reconcile();
    let ns = cc.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<ChatCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let key = object_key(&cc);
    let action = finalizer(&api, FINALIZER, cc, |event| async {
        match event {
            Finalizer::Apply(cc) => apply(&cc, &ctx).await,
            Finalizer::Cleanup(cc) => cleanup(&cc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.clear_failures(&key);
    Ok(action)
}

/// Counts the error by kind and retries with a per-object exponential backoff.
pub fn error_policy(cc: Arc<ChatCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.record_error(error.metric_label());
    let failures = ctx.record_failure(object_key(&cc));
    let delay = backoff(failures);
    warn!(chatcluster = %object_key(&cc), error = %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn publish(ctx: &Context, cc: &ChatCluster, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    // An event is a courtesy: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &cc.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

/// Server-side applies a child with the operator's field manager, taking over conflicting
/// fields (`force`), and returns the object as the API server now has it.
async fn apply_child<K>(client: &Client, ns: &str, child: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = child
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("child name"))?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(child),
        )
        .await?)
}

/// Deletes a child the spec no longer asks for; absence is success.
async fn delete_child<K>(client: &Client, ns: &str, name: &str) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What is wrong with the referenced Secrets, each as a sentence saying what to fix.
async fn secret_problems(client: &Client, ns: &str, cc: &ChatCluster) -> Result<Vec<String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut problems = Vec::new();
    for (field, reference) in secret_refs(cc) {
        match secrets.get_opt(&reference.name).await? {
            None => problems.push(format!(
                "Secret {ns}/{name} (from {field}) does not exist: create it, e.g. `kubectl -n {ns} create secret generic {name} --from-literal={key}=...`",
                name = reference.name,
                key = reference.key
            )),
            Some(secret) => {
                let has_key = secret.data.as_ref().is_some_and(|d| d.contains_key(&reference.key))
                    || secret.string_data.as_ref().is_some_and(|d| d.contains_key(&reference.key));
                if !has_key {
                    problems.push(format!(
                        "Secret {ns}/{} (from {field}) has no key {:?}: add it or point {field}.key at an existing key",
                        reference.name, reference.key
                    ));
                }
            }
        }
    }
    Ok(problems)
}

/// Every Secret reference in the spec, with the field it came from.
pub fn secret_refs(cc: &ChatCluster) -> Vec<(&'static str, &SecretKeyRef)> {
    let spec = &cc.spec;
    let mut refs = Vec::new();
    if let Some(r) = &spec.auth.jwt_secret_ref {
        refs.push(("spec.auth.jwtSecretRef", r));
    }
    if let Some(r) = &spec.auth.jwt_public_key_ref {
        refs.push(("spec.auth.jwtPublicKeyRef", r));
    }
    refs.push(("spec.postgres.urlSecretRef", &spec.postgres.url_secret_ref));
    if let Some(e) = spec.redis.as_ref().and_then(|b| b.external.as_ref()) {
        refs.push(("spec.redis.external.urlSecretRef", &e.url_secret_ref));
    }
    if let Some(e) = spec.rabbitmq.as_ref().and_then(|b| b.external.as_ref()) {
        refs.push(("spec.rabbitmq.external.urlSecretRef", &e.url_secret_ref));
    }
    refs
}

/// A condition, keeping the previous transition time when its status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

async fn patch_status(ctx: &Context, cc: &ChatCluster, status: &ChatClusterStatus) -> Result<()> {
    let ns = cc.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<ChatCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": ChatCluster::api_version(&()),
        "kind": ChatCluster::kind(&()),
        "status": status,
    });
    api.patch_status(
        &cc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

fn previous_conditions(cc: &ChatCluster) -> &[Condition] {
    cc.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// Reports a problem the user must fix as `Degraded`, without touching the children.
async fn degrade(
    cc: &ChatCluster,
    ctx: &Context,
    reason: &str,
    problems: &[String],
) -> Result<Action> {
    let generation = cc.metadata.generation;
    let previous = previous_conditions(cc);
    let message = problems.join("; ");
    let mut status = cc.status.clone().unwrap_or_default();
    status.phase = Some(Phase::Degraded);
    status.observed_generation = generation;
    status.conditions = vec![
        condition(
            previous,
            "Ready",
            false,
            reason,
            message.clone(),
            generation,
        ),
        condition(
            previous,
            "Progressing",
            false,
            reason,
            "waiting for the spec or its Secrets to be fixed".to_owned(),
            generation,
        ),
        condition(
            previous,
            "Degraded",
            true,
            reason,
            message.clone(),
            generation,
        ),
    ];
    patch_status(ctx, cc, &status).await?;
    let was_degraded = cc.status.as_ref().and_then(|s| s.phase) == Some(Phase::Degraded);
    if !was_degraded || cc.status.as_ref().and_then(|s| s.observed_generation) != generation {
        publish(ctx, cc, EventType::Warning, reason, message).await;
    }
    // Secrets are not watched, so look again soon; a spec fix triggers a reconcile by itself.
    Ok(Action::requeue(RECHECK))
}

async fn apply(cc: &ChatCluster, ctx: &Context) -> Result<Action> {
    let problems = cc.spec.problems();
    if !problems.is_empty() {
        return degrade(cc, ctx, "InvalidSpec", &problems).await;
    }
    let ns = cc.namespace().ok_or(Error::MissingField("namespace"))?;
    let client = &ctx.client;
    let problems = secret_problems(client, &ns, cc).await?;
    if !problems.is_empty() {
        return degrade(cc, ctx, "SecretMissing", &problems).await;
    }

    apply_child(client, &ns, &configmap::configmap(cc)?).await?;
    apply_child(client, &ns, &service::gateway_service(cc)?).await?;
    apply_child(client, &ns, &service::headless_service(cc)?).await?;
    let mut backends_ready = true;
    for kind in [ManagedKind::Redis, ManagedKind::RabbitMq] {
        match statefulset::statefulset(cc, kind)? {
            Some(sts) => {
                apply_child(client, &ns, &service::backend_service(cc, kind)?).await?;
                let applied = apply_child(client, &ns, &sts).await?;
                let want = sts.spec.replicas.unwrap_or(1);
                let ready = applied
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                backends_ready &= ready >= want;
            }
            None => {
                let name = resources::backend_name(cc, kind);
                delete_child::<StatefulSet>(client, &ns, &name).await?;
                delete_child::<Service>(client, &ns, &name).await?;
            }
        }
    }
    let observation = fleet::observe(
        client,
        ctx.connections.as_ref(),
        &ctx.fleet,
        &ctx.metrics,
        cc,
    )
    .await;
    let plan = deployment::rollout_plan(cc, observation.connections_per_pod());
    let desired = deployment::deployment(cc, observation.connections_per_pod())?;
    let applied = apply_child(client, &ns, &desired).await?;
    apply_child(client, &ns, &pdb::pdb(cc)?).await?;
    match hpa::hpa(cc)? {
        Some(hpa) => {
            apply_child(client, &ns, &hpa).await?;
        }
        None => {
            delete_child::<HorizontalPodAutoscaler>(client, &ns, &resources::gateway_name(cc))
                .await?
        }
    }

    fleet::update_deletion_costs(client, &ctx.fleet, &ctx.metrics, cc, &observation).await;

    let status = gateway_status(cc, &applied, backends_ready, &observation, plan);
    let phase = status.phase;
    patch_status(ctx, cc, &status).await?;

    let old = cc.status.as_ref();
    if old.and_then(|s| s.observed_generation) != cc.metadata.generation {
        let note = format!(
            "applied gateway and backends for generation {}",
            cc.metadata.generation.unwrap_or(0)
        );
        publish(ctx, cc, EventType::Normal, "Applied", note).await;
    }
    if old.and_then(|s| s.phase) != phase && phase == Some(Phase::Ready) {
        publish(
            ctx,
            cc,
            EventType::Normal,
            "Ready",
            format!("{} gateway pods ready", status.ready_replicas),
        )
        .await;
    }
    info!(chatcluster = %object_key(cc), phase = ?phase, ready = status.ready_replicas,
        connections = ?status.connections, "reconciled");
    Ok(Action::requeue(if phase == Some(Phase::Ready) {
        RESYNC
    } else {
        RECHECK
    }))
}

/// The status a reconcile reports, from the Deployment as the API server returned it, the
/// gateway pods as observed and the rollout plan the Deployment was given.
pub fn gateway_status(
    cc: &ChatCluster,
    deployment: &Deployment,
    backends_ready: bool,
    observation: &Observation,
    plan: Plan,
) -> ChatClusterStatus {
    let generation = cc.metadata.generation;
    let previous = previous_conditions(cc);
    let dstatus = deployment.status.clone().unwrap_or_default();
    let want = deployment
        .spec
        .replicas
        .or_else(|| cc.spec.gateway.autoscaling.as_ref().map(|a| a.min_replicas))
        .unwrap_or(cc.spec.gateway.replicas);
    let ready = dstatus.ready_replicas.unwrap_or(0);
    let updated = dstatus.updated_replicas.unwrap_or(0);
    let total = dstatus.replicas.unwrap_or(0);
    let seen =
        dstatus.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    let rolled_out = seen && updated >= want && total <= want && ready >= want;
    let is_ready = rolled_out && backends_ready;
    let (ready_reason, ready_message) = if is_ready {
        (
            "AllReplicasReady",
            format!("{ready}/{want} gateway pods ready"),
        )
    } else if !backends_ready {
        (
            "BackendsNotReady",
            "waiting for the managed Redis/RabbitMQ to become ready".to_owned(),
        )
    } else {
        (
            "ReplicasNotReady",
            format!("{ready}/{want} gateway pods ready, {updated} updated"),
        )
    };
    let at_once = plan.pods_at_once;
    let draining = observation.draining_pods();
    let progressing_message = if rolled_out {
        format!("rollout complete: {updated} of {want} pods on the current revision")
    } else {
        format!(
            "rolling: {updated} of {want} pods on the current revision, {at_once} draining at once \
             ({draining} draining now, {ready} ready, {per_pod} connections per pod)",
            per_pod = plan.connections_per_pod
        )
    };
    let previous_connections = cc.status.as_ref().and_then(|s| s.connections);
    let template = serde_json::to_vec(&deployment.spec.template).unwrap_or_default();
    ChatClusterStatus {
        phase: Some(if is_ready {
            Phase::Ready
        } else {
            Phase::Progressing
        }),
        observed_generation: generation,
        replicas: total,
        ready_replicas: ready,
        // Unknown (pods not listed, none answered): keep the last known total.
        connections: observation.connections().or(previous_connections),
        selector: Some(resources::selector_string(cc)),
        current_revision: Some(resources::stable_hash(&template)),
        rollout: Some(RolloutStatus {
            updated_replicas: updated,
            pods_draining_at_once: at_once,
            connections_per_pod: plan.connections_per_pod,
            draining_pods: draining,
            pods_without_counts: observation.unknown_pods(),
        }),
        conditions: vec![
            condition(
                previous,
                "Ready",
                is_ready,
                ready_reason,
                ready_message,
                generation,
            ),
            condition(
                previous,
                "Progressing",
                !is_ready,
                if is_ready {
                    "RolloutComplete"
                } else {
                    "RollingOut"
                },
                progressing_message,
                generation,
            ),
            condition(
                previous,
                "Degraded",
                false,
                "AsExpected",
                "spec and Secrets are valid".to_owned(),
                generation,
            ),
        ],
    }
}

/// Runs before the ChatCluster goes away: children go with it through owner references, but
/// the StatefulSets' volume claims are not owned, so they are deleted here.
async fn cleanup(cc: &ChatCluster, ctx: &Context) -> Result<Action> {
    let ns = cc.namespace().ok_or(Error::MissingField("namespace"))?;
    ctx.fleet.forget(&fleet::cluster_key(cc));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/part-of=confab",
        cc.name_any()
    );
    claims
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(&selector),
        )
        .await?;
    publish(
        ctx,
        cc,
        EventType::Normal,
        "CleanedUp",
        format!("deleted volume claims matching {selector}"),
    )
    .await;
    Ok(Action::await_change())
}

/// Runs the controller until `shutdown` resolves, then lets in-flight reconciles finish.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let children = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        resources::MANAGED_BY
    ));
    Controller::new(
        Api::<ChatCluster>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<ConfigMap>::all(client.clone()), children.clone())
    .owns(Api::<Deployment>::all(client.clone()), children.clone())
    .owns(Api::<Service>::all(client.clone()), children.clone())
    .owns(Api::<StatefulSet>::all(client.clone()), children.clone())
    .owns(
        Api::<PodDisruptionBudget>::all(client.clone()),
        children.clone(),
    )
    .owns(Api::<HorizontalPodAutoscaler>::all(client), children)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(e) = result {
            warn!(error = %e, "controller event");
        }
    })
    .await;
}

#[cfg(test)]
#[path = "controller/tests.rs"]
mod tests;
