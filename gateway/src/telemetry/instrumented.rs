//! Backend decorators: each wraps a `Store`, `Bus`, `Presence` or `Limits` and records every
//! call's duration and failure in `confab_backend_*`. Wired in `app.rs` only when metrics are on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Backend, Metrics};
use crate::bus::{Bus, BusError, Deliver};
use crate::chat::event::{Envelope, Topic};
use crate::chat::model::{
    Conversation, ConversationId, ConversationSummary, Member, MemberRole, Message, UserId,
    UserStatus,
};
use crate::limits::{LimitClass, Limits, Throttled};
use crate::presence::{Maintenance, Presence, PresenceError};
use crate::store::{Inserted, NewConversation, NewMessage, Store, StoreError};

async fn timed<T, E>(
    metrics: &Metrics,
    backend: Backend,
    operation: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = Instant::now();
    let result = call.await;
    metrics.backend_call(backend, operation, start.elapsed(), result.is_err());
    result
}

/// A [`Store`] whose calls are timed.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl InstrumentedStore {
    pub fn wrap(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<dyn Store> {
        Arc::new(Self { inner, metrics })
    }
}

#[async_trait]
impl Store for InstrumentedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        timed(&self.metrics, Backend::Store, "ping", self.inner.ping()).await
    }
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation, StoreError> {
        let call = self.inner.create_conversation(new);
        timed(&self.metrics, Backend::Store, "create_conversation", call).await
    }
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        let call = self.inner.conversation(id);
        timed(&self.metrics, Backend::Store, "conversation", call).await
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError> {
        let call = self.inner.conversations_of(user);
        timed(&self.metrics, Backend::Store, "conversations_of", call).await
    }
    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<bool, StoreError> {
        let call = self.inner.add_member(conversation, user, role);
        timed(&self.metrics, Backend::Store, "add_member", call).await
    }
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, StoreError> {
        let call = self.inner.remove_member(conversation, user);
        timed(&self.metrics, Backend::Store, "remove_member", call).await
    }
    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        let call = self.inner.member(conversation, user);
        timed(&self.metrics, Backend::Store, "member", call).await
    }
    async fn members(&self, conversation: ConversationId) -> Result<Vec<Member>, StoreError> {
        let call = self.inner.members(conversation);
        timed(&self.metrics, Backend::Store, "members", call).await
    }
    async fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        let call = self.inner.insert_message(new);
        timed(&self.metrics, Backend::Store, "insert_message", call).await
    }
    async fn messages_before(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let call = self.inner.messages_before(conversation, before_seq, limit);
        timed(&self.metrics, Backend::Store, "messages_before", call).await
    }
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let call = self.inner.messages_after(conversation, after_seq, limit);
        timed(&self.metrics, Backend::Store, "messages_after", call).await
    }
    async fn mark_read(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let call = self.inner.mark_read(conversation, user, seq);
        timed(&self.metrics, Backend::Store, "mark_read", call).await
    }
    async fn co_members(&self, user: &str) -> Result<Vec<UserId>, StoreError> {
        let call = self.inner.co_members(user);
        timed(&self.metrics, Backend::Store, "co_members", call).await
    }
}

/// A [`Bus`] whose calls are timed.
pub struct InstrumentedBus {
    inner: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
}

impl InstrumentedBus {
    pub fn wrap(inner: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Arc<dyn Bus> {
        Arc::new(Self { inner, metrics })
    }
}

#[async_trait]
impl Bus for InstrumentedBus {
    fn attach(&self, deliver: Deliver) {
        self.inner.attach(deliver);
    }
    async fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        let call = self.inner.publish(envelope);
        timed(&self.metrics, Backend::Bus, "publish", call).await
    }
    async fn subscribe(&self, topic: Topic) -> Result<(), BusError> {
        let call = self.inner.subscribe(topic);
        timed(&self.metrics, Backend::Bus, "subscribe", call).await
    }
    async fn unsubscribe(&self, topic: Topic) -> Result<(), BusError> {
        let call = self.inner.unsubscribe(topic);
        timed(&self.metrics, Backend::Bus, "unsubscribe", call).await
    }
    async fn ready(&self) -> bool {
        let start = Instant::now();
        let ready = self.inner.ready().await;
        self.metrics
            .backend_call(Backend::Bus, "ready", start.elapsed(), !ready);
        ready
    }
}

/// A [`Presence`] whose calls are timed.
pub struct InstrumentedPresence {
    inner: Arc<dyn Presence>,
    metrics: Arc<Metrics>,
}

impl InstrumentedPresence {
    pub fn wrap(inner: Arc<dyn Presence>, metrics: Arc<Metrics>) -> Arc<dyn Presence> {
        Arc::new(Self { inner, metrics })
    }
}

#[async_trait]
impl Presence for InstrumentedPresence {
    async fn connect(&self, user: &str, conn: &str) -> Result<bool, PresenceError> {
        let call = self.inner.connect(user, conn);
        timed(&self.metrics, Backend::Presence, "connect", call).await
    }
    async fn disconnect(&self, user: &str, conn: &str) -> Result<usize, PresenceError> {
        let call = self.inner.disconnect(user, conn);
        timed(&self.metrics, Backend::Presence, "disconnect", call).await
    }
    async fn settle_offline(&self, user: &str) -> Result<bool, PresenceError> {
        let call = self.inner.settle_offline(user);
        timed(&self.metrics, Backend::Presence, "settle_offline", call).await
    }
    async fn is_online(&self, user: &str) -> Result<bool, PresenceError> {
        let call = self.inner.is_online(user);
        timed(&self.metrics, Backend::Presence, "is_online", call).await
    }
    async fn statuses(
        &self,
        users: &[UserId],
    ) -> Result<HashMap<UserId, UserStatus>, PresenceError> {
        let call = self.inner.statuses(users);
        timed(&self.metrics, Backend::Presence, "statuses", call).await
    }
    fn maintenance_interval(&self) -> Option<Duration> {
        self.inner.maintenance_interval()
    }
    async fn maintain(&self) -> Result<Maintenance, PresenceError> {
        let call = self.inner.maintain();
        timed(&self.metrics, Backend::Presence, "maintain", call).await
    }
    async fn ready(&self) -> Result<(), PresenceError> {
        timed(
            &self.metrics,
            Backend::Presence,
            "ready",
            self.inner.ready(),
        )
        .await
    }
    async fn typing_start(
        &self,
        conversation: ConversationId,
        user: &str,
        ttl: Duration,
    ) -> Result<(bool, u64), PresenceError> {
        let call = self.inner.typing_start(conversation, user, ttl);
        timed(&self.metrics, Backend::Presence, "typing_start", call).await
    }
    async fn typing_stop(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        let call = self.inner.typing_stop(conversation, user);
        timed(&self.metrics, Backend::Presence, "typing_stop", call).await
    }
    async fn typing_expire(
        &self,
        conversation: ConversationId,
        user: &str,
        generation: u64,
    ) -> Result<bool, PresenceError> {
        let call = self.inner.typing_expire(conversation, user, generation);
        timed(&self.metrics, Backend::Presence, "typing_expire", call).await
    }
    async fn is_typing(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        let call = self.inner.is_typing(conversation, user);
        timed(&self.metrics, Backend::Presence, "is_typing", call).await
    }
}

/// A [`Limits`] whose checks are timed. A refusal is an answer, not a failure: it is counted in
/// `confab_rate_limited_total` by the chat service. Failures of the shared (Redis) limits fail
/// open inside the backend and are counted there through [`Metrics::backend_error`].
pub struct InstrumentedLimits {
    inner: Arc<dyn Limits>,
    metrics: Arc<Metrics>,
}

impl InstrumentedLimits {
    pub fn wrap(inner: Arc<dyn Limits>, metrics: Arc<Metrics>) -> Arc<dyn Limits> {
        Arc::new(Self { inner, metrics })
    }
}

#[async_trait]
impl Limits for InstrumentedLimits {
    async fn check(&self, class: LimitClass, subject: &str) -> Result<(), Throttled> {
        let start = Instant::now();
        let result = self.inner.check(class, subject).await;
        self.metrics
            .backend_call(Backend::Limits, "check", start.elapsed(), false);
        result
    }
}
