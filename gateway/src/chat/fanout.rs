//! Fan-out: bus bindings that follow local interest, publishing, and delivery of what arrives
//! to this node's connections (through the [`Hub`](super::hub::Hub)).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::event::{Envelope, Event, Outgoing, Route, Topic};
use super::hub::{Outbound, TopicChange};
use super::service::ChatService;
use super::state::MembershipChange;

/// Longest a join waits for another join's bus binding of its conversation.
const BINDING_WAIT: Duration = Duration::from_secs(5);

impl ChatService {
    /// Binds and unbinds bus topics as local interest changes. Failures are logged: the bus
    /// reports not-ready and clients recover with `sync`.
    ///
    /// Changes are computed under the hub's lock but applied later, so two of them can reach
    /// the bus out of order (a last member leaving and a new one joining the same
    /// conversation): one at a time, each topic is bound or unbound after what the hub wants
    /// *now*, so the bus always ends up as the hub is.
    pub(super) async fn apply(&self, change: TopicChange) {
        if change.acquired.is_empty() && change.released.is_empty() {
            return;
        }
        let _one_at_a_time = self.topics.lock().await;
        for topic in change.acquired.into_iter().chain(change.released) {
            let key = topic.key();
            let result = if self.hub.wants(&topic) {
                let result = self.bus.subscribe(topic).await;
                self.lock_bindings().insert(key);
                result
            } else {
                self.lock_bindings().remove(&key);
                if let Topic::Conversation(id) = &topic {
                    // Its membership events no longer arrive here.
                    self.conversations.forget(*id);
                }
                self.bus.unsubscribe(topic).await
            };
            self.bindings_changed.notify_waiters();
            if let Err(e) = result {
                tracing::warn!(error = %e, "bus binding failed");
            }
        }
    }

    pub(super) fn lock_bindings(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.bindings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the bus binding of `topic` has been applied. A connection that joins a
    /// conversation another local connection has just joined finds nothing to bind itself, but
    /// the first one's binding may still be on its way to the broker: a message published
    /// meanwhile would reach neither the node nor, if the join's `sync` already ran, the client.
    /// Bounded: a bus that does not answer is reported by readiness, and `sync` recovers.
    pub(super) async fn bound(&self, topic: &Topic) {
        let key = topic.key();
        let deadline = tokio::time::Instant::now() + BINDING_WAIT;
        loop {
            let changed = self.bindings_changed.notified();
            if self.lock_bindings().contains(&key) || !self.hub.wants(topic) {
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
