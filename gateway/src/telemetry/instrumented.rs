//! Backend decorators: each wraps a `Store`, `Bus`, `Presence` or `Limits` and records every
//! call's duration and failure in `confab_backend_*`. Wired in `app.rs` only when metrics are on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::metrics::BackendCalls;
use super::{Backend, Metrics};
use crate::bus::{Bus, BusError, Deliver};
use crate::chat::event::{Envelope, Topic};
use crate::chat::model::{
    Change, Conversation, ConversationId, ConversationSummary, Member, MemberRole, Message,
    ReactionCount, UserId, UserStatus,
};
use crate::limits::{LimitClass, Limits, Throttled};
use crate::presence::{Maintenance, Presence, PresenceError};
use crate::store::{
    Changed, Inserted, NewConversation, NewDeletion, NewEdit, NewMessage, NewReaction, Store,
    StoreError,
};

async fn timed<T, E>(
    calls: &BackendCalls,
    operation: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = Instant::now();
    let result = call.await;
    calls.record(operation, start.elapsed(), result.is_err());
    result
}

/// A [`Store`] whose calls are timed.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    calls: BackendCalls,
}

impl InstrumentedStore {
    pub fn wrap(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<dyn Store> {
        let calls = metrics.bind_backend(
            Backend::Store,
            &[
                "ping",
                "create_conversation",
                "conversation",
                "conversations_of",
                "add_member",
                "remove_member",
                "member",
                "members",
                "insert_message",
                "messages_before",
                "messages_after",
                "messages_after_each",
                "mark_read",
                "co_members",
                "conversation_ids_of",
                "conversation_ids_of_each",
                "conversations_of_each",
                "message_at",
                "edit_message",
                "delete_message",
                "react",
                "changes_after_each",
                "reactions_of",
                "mark_received",
            ],
        );
        Arc::new(Self { inner, calls })
    }
}

#[async_trait]
impl Store for InstrumentedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        timed(&self.calls, "ping", self.inner.ping()).await
    }
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation, StoreError> {
        let call = self.inner.create_conversation(new);
        timed(&self.calls, "create_conversation", call).await
    }
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        let call = self.inner.conversation(id);
        timed(&self.calls, "conversation", call).await
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError> {
        let call = self.inner.conversations_of(user);
        timed(&self.calls, "conversations_of", call).await
    }
    async fn conversations_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationSummary)>, StoreError> {
        let call = self.inner.conversations_of_each(users);
        timed(&self.calls, "conversations_of_each", call).await
    }
    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<Option<i64>, StoreError> {
        let call = self.inner.add_member(conversation, user, role);
        timed(&self.calls, "add_member", call).await
    }
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<i64>, StoreError> {
        let call = self.inner.remove_member(conversation, user);
        timed(&self.calls, "remove_member", call).await
    }
    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        let call = self.inner.member(conversation, user);
        timed(&self.calls, "member", call).await
    }
    async fn members(&self, conversation: ConversationId) -> Result<Vec<Member>, StoreError> {
        let call = self.inner.members(conversation);
        timed(&self.calls, "members", call).await
    }
    async fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        let call = self.inner.insert_message(new);
        timed(&self.calls, "insert_message", call).await
    }
    async fn messages_before(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let call = self.inner.messages_before(conversation, before_seq, limit);
        timed(&self.calls, "messages_before", call).await
    }
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let call = self.inner.messages_after(conversation, after_seq, limit);
        timed(&self.calls, "messages_after", call).await
    }
    async fn messages_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let call = self.inner.messages_after_each(cursors, limit);
        timed(&self.calls, "messages_after_each", call).await
    }
    async fn mark_read(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let call = self.inner.mark_read(conversation, user, seq);
        timed(&self.calls, "mark_read", call).await
    }
    async fn co_members(&self, user: &str) -> Result<Vec<UserId>, StoreError> {
        let call = self.inner.co_members(user);
        timed(&self.calls, "co_members", call).await
    }
    async fn insert_attachment(
        &self,
        new: crate::chat::model::Attachment,
    ) -> Result<crate::chat::model::Attachment, StoreError> {
        let call = self.inner.insert_attachment(new);
        timed(&self.calls, "insert_attachment", call).await
    }
    async fn attachment(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<crate::chat::model::Attachment>, StoreError> {
        let call = self.inner.attachment(id);
        timed(&self.calls, "attachment", call).await
    }
    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError> {
        let call = self.inner.conversation_ids_of(user);
        timed(&self.calls, "conversation_ids_of", call).await
    }
    async fn conversation_ids_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationId)>, StoreError> {
        let call = self.inner.conversation_ids_of_each(users);
        timed(&self.calls, "conversation_ids_of_each", call).await
    }
    async fn message_at(
        &self,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<Message>, StoreError> {
        let call = self.inner.message_at(conversation, seq);
        timed(&self.calls, "message_at", call).await
    }
    async fn edit_message(&self, edit: NewEdit) -> Result<Changed, StoreError> {
        let call = self.inner.edit_message(edit);
        timed(&self.calls, "edit_message", call).await
    }
    async fn delete_message(&self, deletion: NewDeletion) -> Result<Changed, StoreError> {
        let call = self.inner.delete_message(deletion);
        timed(&self.calls, "delete_message", call).await
    }
    async fn react(&self, reaction: NewReaction) -> Result<Changed, StoreError> {
        let call = self.inner.react(reaction);
        timed(&self.calls, "react", call).await
    }
    async fn changes_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        let call = self.inner.changes_after_each(cursors, limit);
        timed(&self.calls, "changes_after_each", call).await
    }
    async fn reactions_of(
        &self,
        conversation: ConversationId,
        seqs: &[i64],
        viewer: &str,
    ) -> Result<Vec<(i64, ReactionCount)>, StoreError> {
        let call = self.inner.reactions_of(conversation, seqs, viewer);
        timed(&self.calls, "reactions_of", call).await
    }
    async fn mark_received(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<Vec<(UserId, i64)>>, StoreError> {
        let call = self.inner.mark_received(conversation, user, seq);
        timed(&self.calls, "mark_received", call).await
    }
}

/// A [`Bus`] whose calls are timed.
pub struct InstrumentedBus {
    inner: Arc<dyn Bus>,
    calls: BackendCalls,
}

impl InstrumentedBus {
    pub fn wrap(inner: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Arc<dyn Bus> {
        let calls = metrics.bind_backend(
            Backend::Bus,
            &["publish", "subscribe", "unsubscribe", "ready"],
        );
        Arc::new(Self { inner, calls })
    }
}

#[async_trait]
impl Bus for InstrumentedBus {
    fn attach(&self, deliver: Deliver) {
        self.inner.attach(deliver);
    }
    async fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        let call = self.inner.publish(envelope);
        timed(&self.calls, "publish", call).await
    }
    async fn subscribe(&self, topic: Topic) -> Result<(), BusError> {
        let call = self.inner.subscribe(topic);
        timed(&self.calls, "subscribe", call).await
    }
    async fn unsubscribe(&self, topic: Topic) -> Result<(), BusError> {
        let call = self.inner.unsubscribe(topic);
        timed(&self.calls, "unsubscribe", call).await
    }
    async fn ready(&self) -> bool {
        let start = Instant::now();
        let ready = self.inner.ready().await;
        self.calls.record("ready", start.elapsed(), !ready);
        ready
    }
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
}

/// A [`Presence`] whose calls are timed.
pub struct InstrumentedPresence {
    inner: Arc<dyn Presence>,
    calls: BackendCalls,
}

impl InstrumentedPresence {
    pub fn wrap(inner: Arc<dyn Presence>, metrics: Arc<Metrics>) -> Arc<dyn Presence> {
        let calls = metrics.bind_backend(
            Backend::Presence,
            &[
                "connect",
                "disconnect",
                "settle_offline",
                "is_online",
                "statuses",
                "maintain",
                "ready",
                "typing_start",
                "typing_stop",
                "typing_expire",
                "is_typing",
            ],
        );
        Arc::new(Self { inner, calls })
    }
}

#[async_trait]
impl Presence for InstrumentedPresence {
    async fn connect(&self, user: &str, conn: &str) -> Result<bool, PresenceError> {
        let call = self.inner.connect(user, conn);
        timed(&self.calls, "connect", call).await
    }
    async fn disconnect(&self, user: &str, conn: &str) -> Result<usize, PresenceError> {
        let call = self.inner.disconnect(user, conn);
        timed(&self.calls, "disconnect", call).await
    }
    async fn settle_offline(&self, user: &str) -> Result<bool, PresenceError> {
        let call = self.inner.settle_offline(user);
        timed(&self.calls, "settle_offline", call).await
    }
    async fn is_online(&self, user: &str) -> Result<bool, PresenceError> {
        let call = self.inner.is_online(user);
        timed(&self.calls, "is_online", call).await
    }
    async fn statuses(
        &self,
        users: &[UserId],
    ) -> Result<HashMap<UserId, UserStatus>, PresenceError> {
        let call = self.inner.statuses(users);
        timed(&self.calls, "statuses", call).await
    }
    fn maintenance_interval(&self) -> Option<Duration> {
        self.inner.maintenance_interval()
    }
    async fn maintain(&self) -> Result<Maintenance, PresenceError> {
        let call = self.inner.maintain();
        timed(&self.calls, "maintain", call).await
    }
    async fn ready(&self) -> Result<(), PresenceError> {
        timed(&self.calls, "ready", self.inner.ready()).await
    }
    async fn typing_start(
        &self,
        conversation: ConversationId,
        user: &str,
        ttl: Duration,
    ) -> Result<(bool, u64), PresenceError> {
        let call = self.inner.typing_start(conversation, user, ttl);
        timed(&self.calls, "typing_start", call).await
    }
    async fn typing_stop(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        let call = self.inner.typing_stop(conversation, user);
        timed(&self.calls, "typing_stop", call).await
    }
    async fn typing_expire(
        &self,
        conversation: ConversationId,
        user: &str,
        generation: u64,
    ) -> Result<bool, PresenceError> {
        let call = self.inner.typing_expire(conversation, user, generation);
        timed(&self.calls, "typing_expire", call).await
    }
    async fn is_typing(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        let call = self.inner.is_typing(conversation, user);
        timed(&self.calls, "is_typing", call).await
    }
}

/// A [`Limits`] whose checks are timed. A refusal is an answer, not a failure: it is counted in
/// `confab_rate_limited_total` by the chat service. Failures of the shared (Redis) limits fail
/// open inside the backend and are counted there through [`Metrics::backend_error`].
pub struct InstrumentedLimits {
    inner: Arc<dyn Limits>,
    calls: BackendCalls,
}

impl InstrumentedLimits {
    pub fn wrap(inner: Arc<dyn Limits>, metrics: Arc<Metrics>) -> Arc<dyn Limits> {
        let calls = metrics.bind_backend(Backend::Limits, &["check"]);
        Arc::new(Self { inner, calls })
    }
}

#[async_trait]
impl Limits for InstrumentedLimits {
    async fn check(&self, class: LimitClass, subject: &str) -> Result<(), Throttled> {
        let start = Instant::now();
        let result = self.inner.check(class, subject).await;
        self.calls.record("check", start.elapsed(), false);
        result
    }
}
