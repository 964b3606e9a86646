//! Fan-out: bus bindings that follow local interest, publishing, and delivery of what arrives
//! to this node's connections (through the [`Hub`](super::hub::Hub)).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use super::event::{Envelope, Event, Outgoing, Route, Topic};
use super::hub::{Outbound, TopicChange};
use super::service::ChatService;
use super::state::MembershipChange;

/// Longest a join waits for another join's bus binding of its conversation.
const BINDING_WAIT: Duration = Duration::from_secs(5);

/// Shards of the per-topic lock: changes of different topics rarely wait on each other.
const BINDING_SHARDS: usize = 256;

/// Which bus topics this node has bound, changed one topic at a time.
///
/// A reconnect storm binds thousands of conversations at once. One lock for all of them made
/// every binding wait on every other one's round trip to the broker, and one wake-up for all
/// of them woke every waiting join on every change; here a change locks only its topic's
/// shard, and a join waiting for a topic is woken only by that topic.
pub(super) struct Bindings {
    shards: Box<[tokio::sync::Mutex<()>]>,
    /// Keys of the topics whose binding has been applied (bound, or refused by the bus and
    /// logged).
    bound: Mutex<HashSet<String>>,
    /// Joins waiting for a topic's binding, by key.
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Default for Bindings {
    fn default() -> Self {
        Self {
            shards: (0..BINDING_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            bound: Mutex::default(),
            waiting: Mutex::default(),
        }
    }
}

impl Bindings {
    /// Holds the changes of `key` (and of the few keys sharing its shard) to one at a time.
    async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let shard = (hasher.finish() as usize) % self.shards.len();
        self.shards[shard].lock().await
    }

    pub(super) fn contains(&self, key: &str) -> bool {
        lock(&self.bound).contains(key)
    }

    fn set(&self, key: &str, bound: bool) {
        let mut keys = lock(&self.bound);
        if bound {
            keys.insert(key.to_owned());
        } else {
            keys.remove(key);
        }
    }

    /// The wake-up of `key`'s next change.
    fn waiter(&self, key: &str) -> Arc<Notify> {
        lock(&self.waiting)
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    /// Wakes the joins waiting for `key`.
    fn settled(&self, key: &str) {
        if let Some(waiting) = lock(&self.waiting).remove(key) {
            waiting.notify_waiters();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChatService {
    /// Binds and unbinds bus topics as local interest changes. Failures are logged: the bus
    /// reports not-ready and clients recover with `sync`.
    ///
    /// Changes are computed under the hub's lock but applied later, so two of them can reach
    /// the bus out of order (a last member leaving and a new one joining the same
    /// conversation): one at a time per topic, each is bound or unbound after what the hub
    /// wants *now*, and only if the bus is not that way already, so the bus always ends up as
    /// the hub is, with one subscribe per binding however the changes overtook each other.
    pub(super) async fn apply(&self, change: TopicChange) {
        for topic in change.acquired.into_iter().chain(change.released) {
            let key = topic.key();
            let _one_at_a_time = self.bindings.lock(&key).await;
            let wanted = self.hub.wants(&topic);
            let result = match (wanted, self.bindings.contains(&key)) {
                (true, false) => {
                    let result = self.bus.subscribe(topic).await;
                    self.bindings.set(&key, true);
                    result
                }
                (false, true) => {
                    self.bindings.set(&key, false);
                    if let Topic::Conversation(id) = &topic {
                        // Its membership events no longer arrive here.
                        self.conversations.forget(*id);
                    }
                    self.bus.unsubscribe(topic).await
                }
                _ => Ok(()),
            };
            self.bindings.settled(&key);
            if let Err(e) = result {
                tracing::warn!(error = %e, "bus binding failed");
            }
        }
    }

    /// Waits until the bus binding of `topic` has been applied. A connection that joins a
    /// conversation another local connection has just joined finds nothing to bind itself, but
    /// the first one's binding may still be on its way to the broker: a message published
    /// meanwhile would reach neither the node nor, if the join's `sync` already ran, the client.
    /// Bounded: a bus that does not answer is reported by readiness, and `sync` recovers.
    pub(super) async fn bound(&self, topic: &Topic) {
        let key = topic.key();
        if self.bindings.contains(&key) || !self.hub.wants(topic) {
            return;
        }
        let deadline = tokio::time::Instant::now() + BINDING_WAIT;
        loop {
            let waiter = self.bindings.waiter(&key);
            // Registered from here on: a change settled before the check below still wakes it.
            let changed = waiter.notified();
            if self.bindings.contains(&key) || !self.hub.wants(topic) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(topic = %key, "bus binding still pending; joining without it");
                return;
            }
        }
    }

    pub(super) async fn publish(&self, route: Route, event: Event) -> bool {
        self.publish_envelope(route, event, None, None).await
    }

    /// Publishes an event that announces a membership change: every node holding the
    /// conversation applies it to its cached state.
    pub(super) async fn publish_membership(
        &self,
        route: Route,
        event: Event,
        change: MembershipChange,
    ) -> bool {
        self.publish_envelope(route, event, None, Some(change))
            .await
    }

    /// Publishes with the commit time of the message it carries, so deliveries can be timed.
    pub(super) async fn publish_stamped(
        &self,
        route: Route,
        event: Event,
        committed_at_us: Option<i64>,
    ) -> bool {
        self.publish_envelope(route, event, committed_at_us, None)
            .await
    }

    async fn publish_envelope(
        &self,
        route: Route,
        event: Event,
        committed_at_us: Option<i64>,
        membership: Option<MembershipChange>,
    ) -> bool {
        let envelope = Envelope {
            id: Uuid::now_v7(),
            origin: self.settings.node_id.clone(),
            route,
            event,
            committed_at_us,
            membership,
        };
        match self.bus.publish(Arc::new(envelope)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "bus publish failed; recipients will recover with sync");
                false
            }
        }
    }

    /// An envelope arrived from the bus: apply its side effects here, then fan it out locally.
    pub(super) fn receive(self: &Arc<Self>, envelope: &Envelope) {
        if let Some(change) = &envelope.membership {
            self.conversations.apply(change);
            if change.role.is_none() {
                // Removed: out of the room on every node holding the conversation, before
                // anything published after the removal is delivered.
                let change = self.hub.evict(&change.user_id, change.conversation_id);
                if !change.released.is_empty() {
                    let service = self.clone();
                    tokio::spawn(async move { service.apply(change).await });
                }
            }
        }
        match (&envelope.event, &envelope.route) {
            // Messages and change entries share the seq: both move the cached last seq.
            (Event::NewMessage(message), Route::Conversation { .. }) => {
                self.conversations.appended(message);
            }
            (event, Route::Conversation { .. }) if event.log_position().is_some() => {
                if let Some((conversation, seq)) = event.log_position() {
                    self.conversations.committed(conversation, seq);
                }
            }
            (Event::ConversationRemoved(removed), Route::Users { ids }) => {
                for user in ids {
                    let change = self.hub.evict(user, removed.conversation_id);
                    if !change.released.is_empty() {
                        let service = self.clone();
                        tokio::spawn(async move { service.apply(change).await });
                    }
                }
            }
            // New members' connections attach themselves, before they hear of it.
            (Event::ConversationAdded(added), Route::Users { ids }) => {
                for user in ids {
                    let change = self.hub.attach_user(user, added.conversation.id);
                    if !change.acquired.is_empty() {
                        let service = self.clone();
                        tokio::spawn(async move { service.apply(change).await });
                    }
                }
            }
            _ => {}
        }
        let mut outgoing = envelope.event.encode();
        outgoing.committed_at_us = envelope.committed_at_us;
        let outgoing = Arc::new(outgoing);
        let recipients = self.hub.deliver(&envelope.route, &outgoing);
        self.metrics.fanout(outgoing.name, recipients);
    }

    /// An event for one connection only (not shared state), e.g. `message_delivered`.
    pub fn direct(out: &dyn Outbound, event: &Arc<Outgoing>) {
        if out.send(event).is_err() {
            out.close(super::hub::CloseReason::QueueFull);
        }
    }
}
