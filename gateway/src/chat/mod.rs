//! The chat domain: conversations, membership, messages, delivery, typing and presence rules.
//! Transports call [`ChatService`]; it talks to backends only through their traits.

pub mod error;
pub mod event;
pub mod hub;
pub mod model;
pub mod rules;
pub mod typing;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracing::Instrument;
use uuid::Uuid;

use crate::bus::Bus;
use crate::limits::{LimitClass, Limits};
use crate::presence::Presence;
use crate::store::{Inserted, NewConversation, NewMessage, Store, StoreError};
use crate::telemetry::{Metrics, audit, metrics::limit_class_label, metrics::unix_micros};
use error::ChatError;
use event::{
    ConversationIdRef, ConversationRef, ConversationUser, Envelope, Event, Outgoing, Read, Route,
    Topic, Typing, UserRef,
};
use hub::{ConnId, Hub, Outbound, TopicChange};
use model::{
    Conversation, ConversationId, ConversationKind, ConversationSummary, Identity, Member,
    MemberRole, Message, MessageKind, UserId, UserStatus,
};

/// Domain limits and timings, from configuration.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// This gateway's id, unique in the fleet.
    pub node_id: String,
    /// A `typing_start` not renewed within this ends by itself.
    pub typing_ttl: Duration,
    /// How long a user with no connection stays online, so a reconnect does not flap.
    pub presence_grace: Duration,
    pub max_content_bytes: usize,
    pub max_history: u32,
    pub max_sync: u32,
    pub max_members: usize,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            node_id: format!("node-{}", Uuid::now_v7().simple()),
            typing_ttl: Duration::from_secs(5),
            presence_grace: Duration::from_secs(3),
            max_content_bytes: 16 * 1024,
            max_history: 100,
            max_sync: 500,
            max_members: 1000,
        }
    }
}

/// A message a user asks to send.
#[derive(Debug, Clone)]
pub struct Send {
    pub conversation_id: ConversationId,
    pub kind: MessageKind,
    pub content: String,
    pub client_msg_id: String,
}

#[derive(Debug, Clone)]
pub struct CreateConversation {
    pub kind: ConversationKind,
    pub title: Option<String>,
    pub members: Vec<UserId>,
    pub department_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Joined {
    pub conversation: Conversation,
    pub last_seq: i64,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone)]
pub struct Sent {
    pub message: Message,
    /// `false` when this was a retry of a message committed before.
    pub fresh: bool,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub messages: Vec<Message>,
    pub next_before_seq: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Synced {
    pub messages: Vec<Message>,
    pub truncated: bool,
}

pub struct ChatService {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    presence: Arc<dyn Presence>,
    limits: Arc<dyn Limits>,
    hub: Hub,
    /// Users whose last connection closed and whose `user_offline` waits out the grace period.
    offline_pending: Mutex<HashMap<UserId, u64>>,
    pending_generation: Mutex<u64>,
    /// Serialises bus (un)binding: see [`ChatService::apply`].
    topics: tokio::sync::Mutex<()>,
    /// Keys of the topics whose binding has been applied (bound, or refused by the bus and
    /// logged), and a wake-up for joins waiting on one: see [`ChatService::bound`].
    bindings: Mutex<HashSet<String>>,
    bindings_changed: tokio::sync::Notify,
    /// Each conversation's department inbox (`Some` for support conversations), read once: a
    /// conversation's kind and department never change, and every send needs them.
    departments: Mutex<HashMap<ConversationId, Option<String>>>,
    settings: ChatSettings,
    metrics: Arc<Metrics>,
}

/// Longest a join waits for another join's bus binding of its conversation.
const BINDING_WAIT: Duration = Duration::from_secs(5);

/// Conversations whose department [`ChatService::department_of`] keeps; past this it starts over.
const DEPARTMENTS_REMEMBERED: usize = 100_000;

fn unavailable(context: &str, err: impl std::fmt::Display) -> ChatError {
    tracing::error!(error = %err, "{context} failed");
    ChatError::Unavailable
}

fn store_err(err: StoreError) -> ChatError {
    match err {
        StoreError::NoSuchConversation(_) => ChatError::not_found("no such conversation"),
        other => unavailable("store", other),
    }
}

/// Rejects strings that are empty, too long, or carry control characters (which could forge log
/// lines or confuse clients).
fn check_text(
    field: &str,
    value: &str,
    max_chars: usize,
    allow_newlines: bool,
) -> Result<(), ChatError> {
    if value.trim().is_empty() {
        return Err(ChatError::invalid(format!("{field} must not be empty")));
    }
    if value.chars().count() > max_chars {
        return Err(ChatError::invalid(format!(
            "{field} is longer than {max_chars} characters"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\t' || c == '\r')))
    {
        return Err(ChatError::invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

pub fn check_user_id(field: &str, value: &str) -> Result<(), ChatError> {
    check_text(field, value, 200, false)
}

impl ChatService {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn Presence>,
        limits: Arc<dyn Limits>,
        settings: ChatSettings,
    ) -> Arc<Self> {
        Self::with_metrics(store, bus, presence, limits, settings, Metrics::disabled())
    }

    /// [`new`](Self::new), recording into `metrics`.
    pub fn with_metrics(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn Presence>,
        limits: Arc<dyn Limits>,
        settings: ChatSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let service = Arc::new(Self {
            store,
            bus,
            presence,
            limits,
            hub: Hub::default(),
            offline_pending: Mutex::default(),
            departments: Mutex::default(),
            bindings: Mutex::default(),
            bindings_changed: tokio::sync::Notify::new(),
            pending_generation: Mutex::new(0),
            topics: tokio::sync::Mutex::new(()),
            settings,
            metrics,
        });
        let weak: Weak<Self> = Arc::downgrade(&service);
        service.bus.attach(Arc::new(move |envelope| {
            if let Some(service) = weak.upgrade() {
                service.receive(&envelope);
            }
        }));
        service
    }

    pub fn settings(&self) -> &ChatSettings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The gateway's instruments, shared with the transports.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether every backend answers, for `/readyz`.
    pub async fn ready(&self) -> Result<(), String> {
        self.store.ping().await.map_err(|e| format!("store: {e}"))?;
        if !self.bus.ready().await {
            return Err("bus: not connected".into());
        }
        self.presence
            .ready()
            .await
            .map_err(|e| format!("presence: {e}"))?;
        Ok(())
    }

    /// Runs the presence backend's upkeep (heartbeats, sweeps) for as long as the service
    /// lives, announcing users whose node died as offline and re-announcing revived ones.
    pub fn spawn_presence_upkeep(self: &Arc<Self>) {
        let Some(every) = self.presence.maintenance_interval() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = weak.upgrade() else { break };
                match service.presence.maintain().await {
                    Ok(found) => {
                        for user in found.expired {
                            tracing::info!(user = %user.escape_debug(), "connections expired; announcing offline");
                            service.announce_presence(&user, false).await;
                        }
                        for user in found.revived {
                            service.announce_presence(&user, true).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "presence heartbeat failed"),
                }
            }
        });
    }

    // ---- connections -------------------------------------------------------------------

    fn presence_key(&self, conn: ConnId) -> String {
        format!("{}:{conn}", self.settings.node_id)
    }

    /// A user's connection opened on the main namespace.
    pub async fn connect(
        &self,
        who: &Identity,
        out: Arc<dyn Outbound>,
    ) -> Result<ConnId, ChatError> {
        let (conn, change) = self.register(who, out);
        self.connected(who, conn, change).await?;
        Ok(conn)
    }

    /// The synchronous half of [`connect`](Self::connect): the connection gets its id and can
    /// join rooms at once, before any await lets a client's first event slip past its handlers.
    pub fn register(&self, who: &Identity, out: Arc<dyn Outbound>) -> (ConnId, TopicChange) {
        self.hub.register(&who.user_id, Vec::new(), out)
    }

    /// The asynchronous half of [`connect`](Self::connect): bus topics and presence.
    pub async fn connected(
        &self,
        who: &Identity,
        conn: ConnId,
        change: TopicChange,
    ) -> Result<(), ChatError> {
        self.apply(change).await;
        let first = self
            .presence
            .connect(&who.user_id, &self.presence_key(conn))
            .await
            .map_err(|e| unavailable("presence connect", e))?;
        // The grace state lives in the presence backend, so a reconnect to another node
        // inside the grace is no new "online" either.
        self.take_pending_offline(&who.user_id);
        if first {
            self.announce_presence(&who.user_id, true).await;
        }
        Ok(())
    }

    /// An agent's connection on the `/department` namespace: receives its departments' inbox.
    pub async fn connect_agent(
        &self,
        who: &Identity,
        out: Arc<dyn Outbound>,
    ) -> Result<ConnId, ChatError> {
        let (conn, change) = self.register_agent(who, out)?;
        self.apply(change).await;
        Ok(conn)
    }

    /// The synchronous half of [`connect_agent`](Self::connect_agent); finish with
    /// [`subscribe`](Self::subscribe).
    pub fn register_agent(
        &self,
        who: &Identity,
        out: Arc<dyn Outbound>,
    ) -> Result<(ConnId, TopicChange), ChatError> {
        if !who.is_agent() {
            return Err(ChatError::forbidden(
                "the /department namespace is for agents",
            ));
        }
        Ok(self.hub.register(
            &format!("agent-inbox:{}", who.user_id),
            who.departments.clone(),
            out,
        ))
    }

    /// Takes up the bus topics a registration acquired.
    pub async fn subscribe(&self, change: TopicChange) {
        self.apply(change).await;
    }

    pub async fn disconnect_agent(&self, conn: ConnId) {
        if let Some((_, _, change)) = self.hub.unregister(conn) {
            self.apply(change).await;
        }
    }

    /// A main-namespace connection closed: presence goes offline after the grace period if it
    /// was the user's last connection anywhere.
    pub async fn disconnect(self: &Arc<Self>, conn: ConnId) {
        let Some((user, _, change)) = self.hub.unregister(conn) else {
            return;
        };
        self.apply(change).await;
        let remaining = match self
            .presence
            .disconnect(&user, &self.presence_key(conn))
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "presence disconnect failed");
                return;
            }
        };
        if remaining > 0 {
            return;
        }
        let generation = {
            let mut g = self
                .pending_generation
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        self.offline_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.clone(), generation);
        let service = Arc::downgrade(self);
        let grace = self.settings.presence_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(service) = service.upgrade() else {
                return;
            };
            let still_pending = {
                let mut pending = service
                    .offline_pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if pending.get(&user) == Some(&generation) {
                    pending.remove(&user);
                    true
                } else {
                    false
                }
            };
            if !still_pending {
                return;
            }
            match service.presence.settle_offline(&user).await {
                Ok(true) => service.announce_presence(&user, false).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "presence settle failed"),
            }
        });
    }

    fn take_pending_offline(&self, user: &str) -> bool {
        self.offline_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user)
            .is_some()
    }

    async fn announce_presence(&self, user: &str, online: bool) {
        let others = match self.store.co_members(user).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list co-members for presence");
                return;
            }
        };
        if others.is_empty() {
            return;
        }
        let payload = UserRef {
            user_id: user.to_owned(),
        };
        let event = if online {
            Event::UserOnline(payload)
        } else {
            Event::UserOffline(payload)
        };
        self.publish(Route::Users { ids: others }, event).await;
    }

    /// Binds and unbinds bus topics as local interest changes. Failures are logged: the bus
    /// reports not-ready and clients recover with `sync`.
    ///
    /// Changes are computed under the hub's lock but applied later, so two of them can reach
    /// the bus out of order (a last member leaving and a new one joining the same
    /// conversation): one at a time, each topic is bound or unbound after what the hub wants
    /// *now*, so the bus always ends up as the hub is.
    async fn apply(&self, change: TopicChange) {
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
                self.bus.unsubscribe(topic).await
            };
            self.bindings_changed.notify_waiters();
            if let Err(e) = result {
                tracing::warn!(error = %e, "bus binding failed");
            }
        }
    }

    fn lock_bindings(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.bindings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the bus binding of `topic` has been applied. A connection that joins a
    /// conversation another local connection has just joined finds nothing to bind itself, but
    /// the first one's binding may still be on its way to the broker: a message published
    /// meanwhile would reach neither the node nor, if the join's `sync` already ran, the client.
    /// Bounded: a bus that does not answer is reported by readiness, and `sync` recovers.
    async fn bound(&self, topic: &Topic) {
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

    async fn publish(&self, route: Route, event: Event) -> bool {
        self.publish_stamped(route, event, None).await
    }

    /// Publishes with the commit time of the message it carries, so deliveries can be timed.
    async fn publish_stamped(
        &self,
        route: Route,
        event: Event,
        committed_at_us: Option<i64>,
    ) -> bool {
        let envelope = Envelope {
            id: Uuid::now_v7(),
            origin: self.settings.node_id.clone(),
            route,
            event,
            committed_at_us,
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
    fn receive(self: &Arc<Self>, envelope: &Envelope) {
        if let (Event::ConversationRemoved(removed), Route::Users { ids }) =
            (&envelope.event, &envelope.route)
        {
            for user in ids {
                let change = self.hub.evict(user, removed.conversation_id);
                if !change.released.is_empty() {
                    let service = self.clone();
                    tokio::spawn(async move { service.apply(change).await });
                }
            }
        }
        let mut outgoing = envelope.event.encode();
        outgoing.committed_at_us = envelope.committed_at_us;
        let outgoing = Arc::new(outgoing);
        let recipients = self.hub.deliver(&envelope.route, &outgoing);
        self.metrics.fanout(outgoing.name, recipients);
    }

    // ---- limits ------------------------------------------------------------------------

    pub async fn throttle(&self, class: LimitClass, subject: &str) -> Result<(), ChatError> {
        self.limits.check(class, subject).await.map_err(|t| {
            self.metrics.rate_limited(limit_class_label(class));
            ChatError::RateLimited {
                retry_after_ms: t.retry_after_ms,
            }
        })
    }

    // ---- conversations -----------------------------------------------------------------

    async fn load(&self, id: ConversationId) -> Result<Conversation, ChatError> {
        self.store
            .conversation(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::not_found("no such conversation"))
    }

    async fn member(&self, id: ConversationId, user: &str) -> Result<Option<Member>, ChatError> {
        self.store.member(id, user).await.map_err(store_err)
    }

    /// Loads a conversation the caller takes part in; strangers learn nothing of it.
    async fn participating(
        &self,
        id: ConversationId,
        who: &Identity,
    ) -> Result<Conversation, ChatError> {
        let member = self.member(id, &who.user_id).await?;
        rules::can_participate(member.as_ref())?;
        self.load(id).await
    }

    pub async fn create_conversation(
        &self,
        who: &Identity,
        req: CreateConversation,
    ) -> Result<Conversation, ChatError> {
        if let Some(title) = &req.title {
            check_text("title", title, 200, false)?;
        }
        let mut others: Vec<UserId> = Vec::new();
        for m in &req.members {
            check_user_id("members[]", m)?;
            if *m != who.user_id && !others.contains(m) {
                others.push(m.clone());
            }
        }
        if others.len() + 1 > self.settings.max_members {
            return Err(ChatError::invalid(format!(
                "a conversation has at most {} members",
                self.settings.max_members
            )));
        }
        match req.kind {
            ConversationKind::Direct if others.len() != 1 => {
                return Err(ChatError::invalid(
                    "a direct conversation needs exactly one other member",
                ));
            }
            ConversationKind::Support if req.department_id.is_none() => {
                return Err(ChatError::invalid(
                    "a support conversation needs a departmentId",
                ));
            }
            _ => {}
        }
        if let Some(d) = &req.department_id {
            check_user_id("departmentId", d)?;
            if req.kind != ConversationKind::Support {
                return Err(ChatError::invalid(
                    "departmentId is only for support conversations",
                ));
            }
        }
        let mut members = vec![(who.user_id.clone(), MemberRole::Owner)];
        members.extend(others.iter().map(|u| (u.clone(), MemberRole::Member)));
        let conversation = self
            .store
            .create_conversation(NewConversation {
                kind: req.kind,
                title: req.title,
                department_id: req.department_id.clone(),
                members: members.clone(),
            })
            .await
            .map_err(store_err)?;
        tracing::info!(conversation = %conversation.id, kind = conversation.kind.as_str(), "conversation created");
        audit::membership(
            "conversation_created",
            &conversation.id,
            &who.user_id,
            &who.user_id,
        );
        if who.is_admin() {
            audit::admin("create_conversation", Some(&who.user_id), &conversation.id);
        }
        let ids = members.into_iter().map(|(u, _)| u).collect();
        self.publish(
            Route::Users { ids },
            Event::ConversationAdded(ConversationRef {
                conversation: conversation.clone(),
            }),
        )
        .await;
        if let Some(department) = req.department_id {
            self.publish(
                Route::Department { id: department },
                Event::ConversationCreated(ConversationRef {
                    conversation: conversation.clone(),
                }),
            )
            .await;
        }
        Ok(conversation)
    }

    pub async fn conversations(
        &self,
        who: &Identity,
    ) -> Result<Vec<ConversationSummary>, ChatError> {
        self.store
            .conversations_of(&who.user_id)
            .await
            .map_err(store_err)
    }

    pub async fn conversation(
        &self,
        who: &Identity,
        id: ConversationId,
    ) -> Result<Conversation, ChatError> {
        self.participating(id, who).await
    }

    pub async fn add_member(
        &self,
        who: &Identity,
        id: ConversationId,
        user: &str,
    ) -> Result<(), ChatError> {
        check_user_id("userId", user)?;
        let conversation = self.load(id).await?;
        let actor = self.member(id, &who.user_id).await?;
        if actor.is_none() && !(who.is_agent() || who.is_admin()) {
            // Strangers cannot probe which conversations exist.
            return Err(ChatError::not_found("no such conversation"));
        }
        rules::can_add_member(&conversation, actor.as_ref(), who)?;
        let count = self.store.members(id).await.map_err(store_err)?.len();
        if count >= self.settings.max_members {
            return Err(ChatError::Conflict(format!(
                "the conversation already has {} members",
                self.settings.max_members
            )));
        }
        let added = self
            .store
            .add_member(id, user, MemberRole::Member)
            .await
            .map_err(store_err)?;
        if added {
            audit::membership("member_added", &id, &who.user_id, user);
            if actor.is_none() && who.is_admin() {
                audit::admin("add_member", Some(&who.user_id), &(id, user));
            }
            self.publish(
                Route::Users {
                    ids: vec![user.to_owned()],
                },
                Event::ConversationAdded(ConversationRef { conversation }),
            )
            .await;
            self.announce_member(id, user).await;
        }
        Ok(())
    }

    /// `user_joined` to the room: `user` has just become a member of conversation `id`.
    async fn announce_member(&self, id: ConversationId, user: &str) {
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::UserJoined(ConversationUser {
                conversation_id: id,
                user_id: user.to_owned(),
            }),
        )
        .await;
    }

    pub async fn remove_member(
        &self,
        who: &Identity,
        id: ConversationId,
        user: &str,
    ) -> Result<(), ChatError> {
        let conversation = self.load(id).await?;
        let actor = self.member(id, &who.user_id).await?;
        if actor.is_none() && !who.is_admin() {
            return Err(ChatError::not_found("no such conversation"));
        }
        rules::can_remove_member(&conversation, actor.as_ref(), who, user)?;
        let removed = self
            .store
            .remove_member(id, user)
            .await
            .map_err(store_err)?;
        if !removed {
            return Err(ChatError::not_found(
                "that user is not a member of this conversation",
            ));
        }
        audit::membership("member_removed", &id, &who.user_id, user);
        if actor.is_none() && who.is_admin() {
            audit::admin("remove_member", Some(&who.user_id), &(id, user));
        }
        // The removed user's connections leave the room before anything else is delivered.
        self.publish(
            Route::Users {
                ids: vec![user.to_owned()],
            },
            Event::ConversationRemoved(ConversationIdRef {
                conversation_id: id,
            }),
        )
        .await;
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::UserLeft(ConversationUser {
                conversation_id: id,
                user_id: user.to_owned(),
            }),
        )
        .await;
        Ok(())
    }

    // ---- realtime requests ---------------------------------------------------------------

    pub async fn join(
        &self,
        conn: ConnId,
        who: &Identity,
        id: ConversationId,
    ) -> Result<Joined, ChatError> {
        self.throttle(LimitClass::UserJoins, &who.user_id).await?;
        let conversation = self.load(id).await?;
        let member = self.member(id, &who.user_id).await?;
        let newly = match rules::join_role(&conversation, member.as_ref(), who)? {
            Some(role) => self
                .store
                .add_member(id, &who.user_id, role)
                .await
                .map_err(store_err)?,
            None => false,
        };
        let change = self
            .hub
            .join(conn, id)
            .ok_or_else(|| ChatError::Unauthorized("the connection is closed".into()))?;
        self.apply(change).await;
        self.bound(&Topic::Conversation(id)).await;
        // `user_joined` announces a new member. A member's connection (re)joining the room is
        // not news: presence (`user_online`) covers it, and after a drain every reconnect would
        // otherwise reach every member of the room (clients × members events in one window).
        if newly {
            audit::membership("join", &id, &who.user_id, &who.user_id);
            self.announce_member(id, &who.user_id).await;
        }
        let members = self.store.members(id).await.map_err(store_err)?;
        // Reload so last_seq is read after the join: sync from it loses nothing.
        let conversation = self.load(id).await?;
        Ok(Joined {
            last_seq: conversation.last_seq,
            conversation,
            members,
        })
    }

    pub async fn leave(
        &self,
        conn: ConnId,
        who: &Identity,
        id: ConversationId,
    ) -> Result<(), ChatError> {
        if !self.hub.is_in_room(conn, id) {
            return Err(ChatError::invalid(
                "this connection has not joined that conversation",
            ));
        }
        let change = self.hub.leave(conn, id);
        self.apply(change).await;
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::UserLeft(ConversationUser {
                conversation_id: id,
                user_id: who.user_id.clone(),
            }),
        )
        .await;
        Ok(())
    }

    /// Persist, then broadcast, then return (the caller acks). A retry of a committed
    /// `clientMsgId` returns the original and broadcasts nothing.
    pub async fn send(&self, who: &Identity, req: Send) -> Result<Sent, ChatError> {
        // One span per message, with the persist and publish steps as its children; ids and seq
        // only: never the content or the sender's token.
        let span = tracing::info_span!(
            "chat.send",
            conversation_id = %req.conversation_id,
            seq = tracing::field::Empty,
            fresh = tracing::field::Empty,
        );
        self.send_in_span(who, req).instrument(span).await
    }

    async fn send_in_span(&self, who: &Identity, req: Send) -> Result<Sent, ChatError> {
        if req.content.len() > self.settings.max_content_bytes {
            return Err(ChatError::TooLarge(format!(
                "content is {} bytes; the limit is {}",
                req.content.len(),
                self.settings.max_content_bytes
            )));
        }
        if req.content.trim().is_empty() {
            return Err(ChatError::invalid("content must not be empty"));
        }
        check_text("clientMsgId", &req.client_msg_id, 100, false)?;
        self.throttle(LimitClass::UserMessages, &who.user_id)
            .await?;
        let member = self.member(req.conversation_id, &who.user_id).await?;
        rules::can_participate(member.as_ref())?;
        let persist = tracing::info_span!(
            "store.insert_message",
            conversation_id = %req.conversation_id,
            seq = tracing::field::Empty,
        );
        let inserted = self
            .store
            .insert_message(NewMessage {
                conversation_id: req.conversation_id,
                sender_id: who.user_id.clone(),
                sender_name: who.name.clone(),
                client_msg_id: req.client_msg_id,
                kind: req.kind,
                content: req.content,
            })
            .instrument(persist.clone())
            .await
            .map_err(store_err)?;
        let seq = inserted.message().seq;
        persist.record("seq", seq);
        let current = tracing::Span::current();
        current.record("seq", seq);
        let message = match inserted {
            Inserted::Existing(message) => {
                current.record("fresh", false);
                return Ok(Sent {
                    message,
                    fresh: false,
                });
            }
            Inserted::New(message) => message,
        };
        current.record("fresh", true);
        let committed_at_us = self.metrics.enabled().then(unix_micros);
        self.metrics.message_persisted();
        if self
            .presence
            .typing_stop(message.conversation_id, &who.user_id)
            .await
            .unwrap_or(false)
        {
            self.publish(
                Route::Conversation {
                    id: message.conversation_id,
                    also_users: vec![],
                },
                Event::UserStoppedTyping(ConversationUser {
                    conversation_id: message.conversation_id,
                    user_id: who.user_id.clone(),
                }),
            )
            .await;
        }
        let publish = tracing::info_span!(
            "bus.publish",
            conversation_id = %message.conversation_id,
            seq = message.seq,
            event = "new_message",
        );
        async {
            self.publish_stamped(
                Route::Conversation {
                    id: message.conversation_id,
                    also_users: vec![],
                },
                Event::NewMessage(message.clone()),
                committed_at_us,
            )
            .await;
            if let Some(department) = self.department_of(message.conversation_id).await {
                self.publish_stamped(
                    Route::Department { id: department },
                    Event::NewMessage(message.clone()),
                    committed_at_us,
                )
                .await;
            }
        }
        .instrument(publish)
        .await;
        Ok(Sent {
            message,
            fresh: true,
        })
    }

    async fn department_of(&self, id: ConversationId) -> Option<String> {
        let known = self
            .departments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(department) = known {
            return department;
        }
        let department = match self.store.conversation(id).await {
            Ok(Some(c)) if c.kind == ConversationKind::Support => c.department_id,
            Ok(Some(_)) => None,
            // Not remembered: a store error or a missing conversation says nothing lasting.
            _ => return None,
        };
        let mut departments = self.departments.lock().unwrap_or_else(|p| p.into_inner());
        if departments.len() >= DEPARTMENTS_REMEMBERED {
            departments.clear();
        }
        departments.insert(id, department.clone());
        department
    }

    pub async fn typing_start(
        self: &Arc<Self>,
        who: &Identity,
        id: ConversationId,
    ) -> Result<(), ChatError> {
        let member = self.member(id, &who.user_id).await?;
        rules::can_participate(member.as_ref())?;
        let (new, generation) = self
            .presence
            .typing_start(id, &who.user_id, self.settings.typing_ttl)
            .await
            .map_err(|e| unavailable("typing", e))?;
        if new {
            self.publish(
                Route::Conversation {
                    id,
                    also_users: vec![],
                },
                Event::UserTyping(Typing {
                    conversation_id: id,
                    user_id: who.user_id.clone(),
                    user_name: who.name.clone(),
                }),
            )
            .await;
        }
        let service = Arc::downgrade(self);
        let user = who.user_id.clone();
        let ttl = self.settings.typing_ttl;
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let Some(service) = service.upgrade() else {
                return;
            };
            if service
                .presence
                .typing_expire(id, &user, generation)
                .await
                .unwrap_or(false)
            {
                service
                    .publish(
                        Route::Conversation {
                            id,
                            also_users: vec![],
                        },
                        Event::UserStoppedTyping(ConversationUser {
                            conversation_id: id,
                            user_id: user,
                        }),
                    )
                    .await;
            }
        });
        Ok(())
    }

    pub async fn typing_stop(&self, who: &Identity, id: ConversationId) -> Result<(), ChatError> {
        let member = self.member(id, &who.user_id).await?;
        rules::can_participate(member.as_ref())?;
        if self
            .presence
            .typing_stop(id, &who.user_id)
            .await
            .map_err(|e| unavailable("typing", e))?
        {
            self.publish(
                Route::Conversation {
                    id,
                    also_users: vec![],
                },
                Event::UserStoppedTyping(ConversationUser {
                    conversation_id: id,
                    user_id: who.user_id.clone(),
                }),
            )
            .await;
        }
        Ok(())
    }

    pub async fn is_typing(&self, id: ConversationId, user: &str) -> bool {
        self.presence.is_typing(id, user).await.unwrap_or(false)
    }

    pub async fn mark_read(
        &self,
        who: &Identity,
        id: ConversationId,
        seq: i64,
    ) -> Result<i64, ChatError> {
        let conversation = self.participating(id, who).await?;
        if seq < 0 || seq > conversation.last_seq {
            return Err(ChatError::invalid(format!(
                "seq must be between 0 and the conversation's last seq ({})",
                conversation.last_seq
            )));
        }
        let watermark = self
            .store
            .mark_read(id, &who.user_id, seq)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::forbidden("you are not a member of this conversation"))?;
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![who.user_id.clone()],
            },
            Event::MessageRead(Read {
                conversation_id: id,
                user_id: who.user_id.clone(),
                seq: watermark,
            }),
        )
        .await;
        Ok(watermark)
    }

    pub async fn history(
        &self,
        who: &Identity,
        id: ConversationId,
        before_seq: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Page, ChatError> {
        let limit = limit.unwrap_or(50);
        if limit == 0 || limit > self.settings.max_history {
            return Err(ChatError::invalid(format!(
                "limit must be between 1 and {}",
                self.settings.max_history
            )));
        }
        if before_seq.is_some_and(|s| s < 1) {
            return Err(ChatError::invalid("beforeSeq must be at least 1"));
        }
        self.participating(id, who).await?;
        let messages = self
            .store
            .messages_before(id, before_seq, limit)
            .await
            .map_err(store_err)?;
        let next_before_seq = messages.first().map(|m| m.seq).filter(|&s| s > 1);
        Ok(Page {
            messages,
            next_before_seq,
        })
    }

    pub async fn sync(
        &self,
        who: &Identity,
        cursors: Vec<(ConversationId, i64)>,
    ) -> Result<Synced, ChatError> {
        if cursors.len() > 1000 {
            return Err(ChatError::invalid("sync takes at most 1000 conversations"));
        }
        let mut seen = HashSet::new();
        let mut messages = Vec::new();
        let mut truncated = false;
        for (id, after) in cursors {
            if !seen.insert(id) {
                return Err(ChatError::invalid(format!(
                    "conversation {id} is listed twice"
                )));
            }
            if after < 0 {
                return Err(ChatError::invalid("afterSeq must not be negative"));
            }
            self.participating(id, who).await?;
            let budget = self.settings.max_sync.saturating_sub(messages.len() as u32);
            if budget == 0 {
                truncated = true;
                break;
            }
            // One more than the budget tells whether anything was left behind.
            let mut batch = self
                .store
                .messages_after(id, after, budget + 1)
                .await
                .map_err(store_err)?;
            if batch.len() as u32 > budget {
                batch.truncate(budget as usize);
                truncated = true;
            }
            messages.extend(batch);
        }
        Ok(Synced {
            messages,
            truncated,
        })
    }

    pub async fn presence(
        &self,
        users: Vec<UserId>,
    ) -> Result<HashMap<UserId, UserStatus>, ChatError> {
        if users.len() > 100 {
            return Err(ChatError::invalid("presence takes at most 100 userIds"));
        }
        for u in &users {
            check_user_id("userIds[]", u)?;
        }
        self.presence
            .statuses(&users)
            .await
            .map_err(|e| unavailable("presence", e))
    }

    /// An event for one connection only (not shared state), e.g. `message_delivered`.
    pub fn direct(out: &dyn Outbound, event: &Arc<Outgoing>) {
        if out.send(event).is_err() {
            out.close(hub::CloseReason::QueueFull);
        }
    }
}

#[cfg(test)]
mod tests;
