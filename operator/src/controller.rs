//! The ChatCluster reconciler: applies children (each on its own, so one refused child does not
//! hold the others back), keeps gateway pods' deletion costs, reports status (connections,
//! rollout progress, autoscaling, refused children) and conditions, cleans up.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
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
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::crd::{
    AutoscalingStatus, ChatCluster, ChatClusterStatus, PAUSED_ANNOTATION, Phase, RolloutStatus,
    SecretKeyRef,
};
use crate::error::{Error, Result};
use crate::fleet::{self, ConnectionSource, FleetMemory, Observation};
use crate::metrics::Metrics;
use crate::resources::{
    self, ManagedKind, configmap, deployment, hpa, ingress, pdb, service, statefulset,
};
use crate::rollout::Plan;

/// The finalizer that lets the operator delete what owner references do not cover.
pub const FINALIZER: &str = "confab.dev/cleanup";
/// The one field manager every server-side apply uses.
pub const FIELD_MANAGER: &str = "confab-operator";
/// The field manager that takes `spec.replicas` of the gateway Deployment over from
/// [`FIELD_MANAGER`] when autoscaling turns on (server-side apply's documented ownership
/// transfer), so that dropping the field from the operator's apply does not reset it to 1.
pub const HANDOVER_MANAGER: &str = "confab-operator-handover-to-hpa";
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
    /// Optional children known not to exist (`Kind/namespace/name`), so steady state sends no
    /// DELETE for them; forgotten when applied, and unknown again after a restart.
    absent: Mutex<HashSet<String>>,
    /// Clusters whose Deployment `spec.replicas` is known to be handed over to the HPA.
    handed_over: Mutex<HashSet<String>>,
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
            absent: Mutex::default(),
            handed_over: Mutex::default(),
        }
    }

    fn set_flag(set: &Mutex<HashSet<String>>, key: &str, on: bool) {
        let mut set = set.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if on {
            set.insert(key.to_owned());
        } else {
            set.remove(key);
        }
    }

    fn flag(set: &Mutex<HashSet<String>>, key: &str) -> bool {
        set.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(key)
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

/// A child kind the reconciler applies: namespaced, with a static kind.
pub trait Child:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Serialize
    + DeserializeOwned
    + Clone
    + Debug
{
}

impl<K> Child for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
{
}

/// A child the API server refused to apply (or delete), and what it said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildFailure {
    /// `Kind name`, e.g. `StatefulSet demo-redis`.
    pub child: String,
    pub message: String,
}

fn child_label<K: Child>(name: &str) -> String {
    format!("{} {name}", K::kind(&()))
}

fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// Applies the children of one reconcile, each on its own: a refusal is recorded and the
/// others still go ahead.
struct Applier<'a> {
    ctx: &'a Context,
    ns: &'a str,
    owner_uid: Option<String>,
    failures: Vec<ChildFailure>,
}

impl<'a> Applier<'a> {
    fn new(ctx: &'a Context, ns: &'a str, cc: &ChatCluster) -> Self {
        Self {
            ctx,
            ns,
            owner_uid: cc.metadata.uid.clone(),
            failures: Vec::new(),
        }
    }

    fn absent_key<K: Child>(&self, name: &str) -> String {
        format!("{}/{}/{name}", K::kind(&()), self.ns)
    }

    /// Server-side applies a child with the operator's field manager, taking over conflicting
    /// fields (`force`); returns the object as the API server now has it, or `None` after
    /// recording why it was refused.
    async fn apply<K: Child>(&mut self, child: &K) -> Option<K> {
        let name = child.meta().name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), self.ns);
        let result = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(child),
            )
            .await;
        match result {
            Ok(applied) => {
                Context::set_flag(&self.ctx.absent, &self.absent_key::<K>(&name), false);
                Some(applied)
            }
            Err(e) => {
                self.refused::<K>(&name, &e);
                None
            }
        }
    }

    fn refused<K: Child>(&mut self, name: &str, error: &kube::Error) {
        let failure = ChildFailure {
            child: child_label::<K>(name),
            message: api_message(error),
        };
        warn!(ns = self.ns, child = %failure.child, error = %failure.message, "child refused");
        self.ctx.metrics.record_error("apply");
        self.failures.push(failure);
    }

    /// Deletes a child the spec no longer asks for: looked up first (once after a start,
    /// then remembered as absent), and deleted only when this ChatCluster owns it.
    async fn remove<K: Child>(&mut self, name: &str) {
        let key = self.absent_key::<K>(name);
        if Context::flag(&self.ctx.absent, &key) {
            return;
        }
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), self.ns);
        let existing = match api.get_opt(name).await {
            Ok(existing) => existing,
            Err(e) => return self.refused::<K>(name, &e),
        };
        let ours = existing.as_ref().is_some_and(|obj| {
            obj.meta()
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(&o.uid) == self.owner_uid.as_ref())
        });
        if ours {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return self.refused::<K>(name, &e),
            }
        }
        // Absent now, or not ours to delete: either way nothing to do next time.
        Context::set_flag(&self.ctx.absent, &key, true);
    }
}

/// Whether `manager` owns the Deployment's `spec.replicas` through an apply.
pub fn applies_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| {
            entry.manager.as_deref() == Some(manager)
                && entry.operation.as_deref() == Some("Apply")
                && entry
                    .fields_v1
                    .as_ref()
                    .and_then(|f| f.0.get("f:spec"))
                    .and_then(|spec| spec.get("f:replicas"))
                    .is_some()
        })
}

/// What is wrong with the referenced Secrets, each as a sentence saying what to fix, and a hash
/// of the referenced values (it goes on the pod template, so a rotation rolls the fleet).
async fn check_secrets(
    client: &Client,
    ns: &str,
    cc: &ChatCluster,
) -> Result<(Vec<String>, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut problems = Vec::new();
    // SHA-256, salted with the ChatCluster's uid: pod templates are readable by more people
    // than Secrets, and a fast 64-bit hash of a short password could be searched offline.
    let mut hashed = Sha256::new();
    hashed.update(cc.metadata.uid.as_deref().unwrap_or_default().as_bytes());
    for (field, reference) in secret_refs(cc) {
        match secrets.get_opt(&reference.name).await? {
            None => problems.push(format!(
                "Secret {ns}/{name} (from {field}) does not exist: create it, e.g. `kubectl -n {ns} create secret generic {name} --from-literal={key}=...`",
                name = reference.name,
                key = reference.key
            )),
            Some(secret) => {
                let value = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&reference.key))
                    .map(|v| v.0.clone())
                    .or_else(|| {
                        secret
                            .string_data
                            .as_ref()
                            .and_then(|d| d.get(&reference.key))
                            .map(|v| v.clone().into_bytes())
                    });
                if let Some(value) = value {
                    for part in [field.as_bytes(), reference.name.as_bytes(), reference.key.as_bytes(), &value] {
                        hashed.update((part.len() as u64).to_le_bytes());
                        hashed.update(part);
                    }
                } else {
                    problems.push(format!(
                        "Secret {ns}/{} (from {field}) has no key {:?}: add it or point {field}.key at an existing key",
                        reference.name, reference.key
                    ));
                }
            }
        }
    }
    let digest = hashed.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    Ok((problems, hex))
}

/// Every Secret reference in the spec, with the field it came from.
pub fn secret_refs(cc: &ChatCluster) -> Vec<(&'static str, SecretKeyRef)> {
    let spec = &cc.spec;
    let mut refs = Vec::new();
    if let Some(r) = &spec.auth.jwt_secret_ref {
        refs.push(("spec.auth.jwtSecretRef", r.clone()));
    }
    if let Some(r) = &spec.auth.jwt_public_key_ref {
        refs.push(("spec.auth.jwtPublicKeyRef", r.clone()));
    }
    refs.push((
        "spec.postgres.urlSecretRef",
        spec.postgres.url_secret_ref.clone(),
    ));
    if let Some(e) = spec.redis.as_ref().and_then(|b| b.external.as_ref()) {
        refs.push(("spec.redis.external.urlSecretRef", e.url_secret_ref.clone()));
    }
    if let Some(e) = spec.rabbitmq.as_ref().and_then(|b| b.external.as_ref()) {
        refs.push((
            "spec.rabbitmq.external.urlSecretRef",
            e.url_secret_ref.clone(),
        ));
    }
    // Both keys of the S3 credentials: a rotated key rolls the pods like any other Secret.
    if let Some(s3) = spec.attachments.as_ref().and_then(|a| a.s3.as_ref()) {
        let creds = &s3.credentials_secret_ref;
        for key in [&creds.access_key_id_key, &creds.secret_access_key_key] {
            refs.push((
                "spec.attachments.s3.credentialsSecretRef",
                SecretKeyRef {
                    name: creds.name.clone(),
                    key: key.clone(),
                },
            ));
        }
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
    // Nothing of this generation was applied: observedGeneration stays where it was (the
    // conditions carry this generation).
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
    let reported = previous.iter().any(|c| {
        c.type_ == "Degraded"
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation
    });
    if !reported {
        publish(ctx, cc, EventType::Warning, reason, message).await;
    }
    // Secrets are not watched, so look again soon; a spec fix triggers a reconcile by itself.
    Ok(Action::requeue(RECHECK))
}

/// Whether the ChatCluster carries `confab.dev/paused: "true"`.
pub fn is_paused(cc: &ChatCluster) -> bool {
    cc.annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// A paused ChatCluster: nothing of it is changed, only its status says so (once).
async fn pause(cc: &ChatCluster, ctx: &Context) -> Result<Action> {
    let previous = cc.status.clone().unwrap_or_default();
    if previous.phase != Some(Phase::Paused) {
        let mut status = previous.clone();
        status.phase = Some(Phase::Paused);
        let mut conditions: Vec<Condition> = previous
            .conditions
            .iter()
            .filter(|c| c.type_ != "Progressing")
            .cloned()
            .collect();
        conditions.push(condition(
            &previous.conditions,
            "Progressing",
            false,
            "Paused",
            format!("reconciling is paused by the {PAUSED_ANNOTATION} annotation: children are left as they are"),
            cc.metadata.generation,
        ));
        status.conditions = conditions;
        patch_status(ctx, cc, &status).await?;
        publish(
            ctx,
            cc,
            EventType::Normal,
            "Paused",
            format!("{PAUSED_ANNOTATION}=true: the operator changes nothing until it is removed"),
        )
        .await;
    }
    info!(chatcluster = %object_key(cc), "paused");
    // Removing the annotation is a change of the object, which triggers a reconcile.
    Ok(Action::await_change())
}

async fn apply(cc: &ChatCluster, ctx: &Context) -> Result<Action> {
    if is_paused(cc) {
        return pause(cc, ctx).await;
    }
    let problems = cc.spec.problems();
    if !problems.is_empty() {
        return degrade(cc, ctx, "InvalidSpec", &problems).await;
    }
    let ns = cc.namespace().ok_or(Error::MissingField("namespace"))?;
    let client = &ctx.client;
    let (problems, secret_hash) = check_secrets(client, &ns, cc).await?;
    if !problems.is_empty() {
        return degrade(cc, ctx, "SecretMissing", &problems).await;
    }
    let mut children = Applier::new(ctx, &ns, cc);
    let gateway = resources::gateway_name(cc);

    children.apply(&configmap::configmap(cc)?).await;
    children.apply(&service::gateway_service(cc)?).await;
    children.apply(&service::headless_service(cc)?).await;
    let mut backends_ready = true;
    for kind in [ManagedKind::Redis, ManagedKind::RabbitMq] {
        match statefulset::statefulset(cc, kind)? {
            Some(sts) => {
                children.apply(&service::backend_service(cc, kind)?).await;
                let want = sts.spec.replicas.unwrap_or(1);
                let ready = match children.apply(&sts).await {
                    Some(applied) => applied.status.and_then(|s| s.ready_replicas).unwrap_or(0),
                    None => 0,
                };
                backends_ready &= ready >= want;
            }
            None => {
                let name = resources::backend_name(cc, kind);
                children.remove::<StatefulSet>(&name).await;
                children.remove::<Service>(&name).await;
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
    let inputs = deployment::Inputs {
        connections_per_pod: observation.connections_per_pod(),
        secret_hash: Some(secret_hash),
        replicas_override: None,
    };
    let applied = apply_deployment(cc, ctx, &mut children, inputs).await?;
    children.apply(&pdb::pdb(cc)?).await;
    let autoscaling = match hpa::hpa(cc)? {
        Some(hpa) => children.apply(&hpa).await.map(|h| autoscaling_status(&h)),
        None => {
            children.remove::<HorizontalPodAutoscaler>(&gateway).await;
            None
        }
    };
    match ingress::ingress(cc)? {
        Some(ingress) => {
            children.apply(&ingress).await;
        }
        None => children.remove::<Ingress>(&gateway).await,
    }

    fleet::update_deletion_costs(client, &ctx.fleet, &ctx.metrics, cc, &observation).await;

    let deployment = match applied {
        Some(applied) => applied,
        // Refused: report from what the API server has, or from the desired object.
        None => Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt(&gateway)
            .await
            .ok()
            .flatten()
            .unwrap_or(deployment::deployment(cc, &deployment::Inputs::default())?),
    };
    let mut status = gateway_status(cc, &deployment, backends_ready, &observation, plan);
    status.autoscaling = autoscaling;
    let failures = std::mem::take(&mut children.failures);
    if !failures.is_empty() {
        refused(cc, &mut status, &failures);
    }
    let phase = status.phase;
    patch_status(ctx, cc, &status).await?;

    let old = cc.status.as_ref();
    if !failures.is_empty() {
        let degraded = |s: Option<&ChatClusterStatus>| {
            s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
                .map(|c| (c.status.clone(), c.message.clone()))
        };
        if degraded(old) != degraded(Some(&status)) {
            let message = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Degraded")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            publish(ctx, cc, EventType::Warning, "ApplyFailed", message).await;
        }
        // The user must change the spec (or the cluster); look again soon meanwhile.
        return Ok(Action::requeue(RECHECK));
    }
    if let Some(a) = &status.autoscaling
        && !a.scaling_active
        && old
            .and_then(|s| s.autoscaling.as_ref())
            .map(|o| o.scaling_active)
            != Some(false)
    {
        publish(
            ctx,
            cc,
            EventType::Warning,
            "AutoscalingInactive",
            format!(
                "the HPA cannot scale on {}: {} (is a custom-metrics adapter serving it?)",
                hpa::CONNECTIONS_METRIC,
                a.message.clone().unwrap_or_default()
            ),
        )
        .await;
    }
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

/// Applies the gateway Deployment. With autoscaling, `spec.replicas` is first handed to
/// [`HANDOVER_MANAGER`] at its live value (a new Deployment starts at `minReplicas`), so the
/// operator's apply without the field never resets it; the HPA takes it from there.
async fn apply_deployment(
    cc: &ChatCluster,
    ctx: &Context,
    children: &mut Applier<'_>,
    mut inputs: deployment::Inputs,
) -> Result<Option<Deployment>> {
    let key = object_key(cc);
    let Some(autoscaling) = &cc.spec.gateway.autoscaling else {
        Context::set_flag(&ctx.handed_over, &key, false);
        return Ok(children.apply(&deployment::deployment(cc, &inputs)?).await);
    };
    if Context::flag(&ctx.handed_over, &key) {
        return Ok(children.apply(&deployment::deployment(cc, &inputs)?).await);
    }
    let name = resources::gateway_name(cc);
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), children.ns);
    let live = match api.get_opt(&name).await {
        Ok(live) => live,
        Err(e) => {
            children.refused::<Deployment>(&name, &e);
            return Ok(None);
        }
    };
    let handover_replicas = match &live {
        None => {
            // Created at minReplicas by the operator, then handed over at once.
            inputs.replicas_override = Some(autoscaling.min_replicas);
            let created = children.apply(&deployment::deployment(cc, &inputs)?).await;
            if created.is_some() {
                hand_over(ctx, children, &name, autoscaling.min_replicas).await;
            }
            return Ok(created);
        }
        Some(live) if applies_replicas(live, FIELD_MANAGER) => live.spec.replicas,
        Some(_) => None,
    };
    if let Some(replicas) = handover_replicas {
        if !hand_over(ctx, children, &name, replicas).await {
            return Ok(None);
        }
    } else {
        Context::set_flag(&ctx.handed_over, &key, true);
    }
    Ok(children.apply(&deployment::deployment(cc, &inputs)?).await)
}

/// The documented server-side-apply transfer: a second manager applies only `spec.replicas`
/// at the live value. A conflict means another manager (the HPA) already holds it, which is
/// what the hand-over is for. Returns false when it was refused otherwise.
async fn hand_over(ctx: &Context, children: &mut Applier<'_>, name: &str, replicas: i32) -> bool {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), children.ns);
    let body = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": children.ns},
        "spec": {"replicas": replicas},
    });
    match api
        .patch(
            name,
            &PatchParams::apply(HANDOVER_MANAGER),
            &Patch::Apply(body),
        )
        .await
    {
        Ok(_) => {
            info!(
                ns = children.ns,
                deployment = name,
                replicas,
                "handed spec.replicas over to the HPA"
            );
            true
        }
        Err(kube::Error::Api(status)) if status.code == 409 => true,
        Err(e) => {
            children.refused::<Deployment>(name, &e);
            false
        }
    }
}

/// The HPA's ScalingActive condition and replica counts, as the API server returned them.
pub fn autoscaling_status(hpa: &HorizontalPodAutoscaler) -> AutoscalingStatus {
    let status = hpa.status.clone().unwrap_or_default();
    let active = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "ScalingActive");
    AutoscalingStatus {
        // No condition yet: the HPA has not run; nothing says it is failing.
        scaling_active: active.is_none_or(|c| c.status == "True"),
        reason: active.and_then(|c| c.reason.clone()),
        message: active.and_then(|c| c.message.clone()),
        current_replicas: status.current_replicas.unwrap_or(0),
        desired_replicas: status.desired_replicas,
    }
}

/// Reports refused children: `Degraded` with reason `ApplyFailed` naming each child and the API
/// server's message, phase Degraded, and `observedGeneration` left where it was (this
/// generation is not fully applied).
pub fn refused(cc: &ChatCluster, status: &mut ChatClusterStatus, failures: &[ChildFailure]) {
    let message = failures
        .iter()
        .map(|f| format!("{}: {}", f.child, f.message))
        .collect::<Vec<_>>()
        .join("; ");
    status.phase = Some(Phase::Degraded);
    status.observed_generation = cc.status.as_ref().and_then(|s| s.observed_generation);
    let previous = previous_conditions(cc);
    let degraded = condition(
        previous,
        "Degraded",
        true,
        "ApplyFailed",
        format!("the API server refused {message}"),
        cc.metadata.generation,
    );
    status.conditions.retain(|c| c.type_ != "Degraded");
    status.conditions.push(degraded);
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
        autoscaling: None,
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
                "spec and Secrets are valid; every child applied".to_owned(),
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
/// `namespaces` empty: every namespace (cluster-wide RBAC); otherwise one controller per
/// namespace, each watching only there (Role/RoleBindings in those namespaces suffice).
pub async fn run(
    ctx: Arc<Context>,
    namespaces: &[String],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let shutdown = shutdown.boxed().shared();
    if namespaces.is_empty() {
        run_scope(ctx, None, shutdown).await;
        return;
    }
    futures::future::join_all(
        namespaces
            .iter()
            .map(|ns| run_scope(ctx.clone(), Some(ns.as_str()), shutdown.clone())),
    )
    .await;
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn run_scope(
    ctx: Arc<Context>,
    ns: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let children = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        resources::MANAGED_BY
    ));
    Controller::new(
        scoped::<ChatCluster>(&client, ns),
        watcher::Config::default(),
    )
    .owns(scoped::<ConfigMap>(&client, ns), children.clone())
    .owns(scoped::<Deployment>(&client, ns), children.clone())
    .owns(scoped::<Service>(&client, ns), children.clone())
    .owns(scoped::<StatefulSet>(&client, ns), children.clone())
    .owns(scoped::<PodDisruptionBudget>(&client, ns), children.clone())
    .owns(
        scoped::<HorizontalPodAutoscaler>(&client, ns),
        children.clone(),
    )
    .owns(scoped::<Ingress>(&client, ns), children)
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
