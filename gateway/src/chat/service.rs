//! `ChatService`: the domain's entry point, its backends, connections and common lookups.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::batch::{self, Batched};
use super::error::ChatError;
use super::event::Topic;
use super::fanout::Bindings;
use super::hub::{ConnId, Hub, Outbound, TopicChange};
use super::model::{Conversation, ConversationId, ConversationSummary, Identity, Member, UserId};
use super::presence::{Announcement, Announcer};
use super::resume::Cursors;
use super::state::{ConversationCache, ConversationState};
use super::{ChatSettings, rules, store_err, unavailable};
use crate::bus::Bus;
use crate::limits::{LimitClass, Limits};
use crate::presence::Presence;
use crate::store::Store;
use crate::telemetry::{Metrics, metrics::limit_class_label};

pub struct ChatService {
    pub(super) store: Arc<dyn Store>,
    pub(super) bus: Arc<dyn Bus>,
    pub(super) presence: Arc<dyn Presence>,
    pub(super) limits: Arc<dyn Limits>,
    pub(super) hub: Hub,
    /// Users whose last connection closed and whose `user_offline` waits out the grace period.
    pub(super) offline_pending: Mutex<HashMap<UserId, u64>>,
    pub(super) pending_generation: Mutex<u64>,
    /// Presence changes on their way out: see [`Announcer`].
    pub(super) announcer: Announcer,
    /// Look-ups of users' conversations (at connect) and of their counts, batched: see
    /// [`super::batch`].
    pub(super) conversation_ids: Batched<ConversationId>,
    pub(super) summaries: Batched<ConversationSummary>,
    /// The bus topics bound here: see [`ChatService::apply`] and [`ChatService::bound`].
    pub(super) bindings: Bindings,
    /// Conversations this node holds, kept exact by membership events: see [`super::state`].
    pub(super) conversations: ConversationCache,
    pub(super) settings: ChatSettings,
    pub(super) metrics: Arc<Metrics>,
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
            conversations: ConversationCache::default(),
            bindings: Bindings::default(),
            pending_generation: Mutex::new(0),
            announcer: Announcer::default(),
            conversation_ids: batch::conversation_ids(),
            summaries: batch::summaries(),
            settings,
            metrics,
        });
        let weak: Weak<Self> = Arc::downgrade(&service);
        service.bus.attach(Arc::new(move |envelope| {
            if let Some(service) = weak.upgrade() {
                service.receive(&envelope);
            }
        }));
        service.spawn_room_check();
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

    // ---- connections -------------------------------------------------------------------

    /// A user's connection opened on the main namespace.
    pub async fn connect(
        self: &Arc<Self>,
        who: &Identity,
        out: Arc<dyn Outbound>,
    ) -> Result<ConnId, ChatError> {
        self.connect_resuming(who, out, None).await
    }

    /// [`connect`](Self::connect) with the client's resume cursors (see
    /// [`connected_resuming`](Self::connected_resuming)).
    pub async fn connect_resuming(
        self: &Arc<Self>,
        who: &Identity,
        out: Arc<dyn Outbound>,
        cursors: Option<Cursors>,
    ) -> Result<ConnId, ChatError> {
        let (conn, change) = self.register(who, out);
        self.connected_resuming(who, conn, change, cursors).await?;
        Ok(conn)
    }

    /// The synchronous half of [`connect`](Self::connect): the connection gets its id and can
    /// join rooms at once, before any await lets a client's first event slip past its handlers.
    /// It receives no live event until [`connected`](Self::connected) has attached it to its
    /// conversations and replayed what it missed: those wait in order, then follow.
    pub fn register(&self, who: &Identity, out: Arc<dyn Outbound>) -> (ConnId, TopicChange) {
        self.hub.register_gated(&who.user_id, Vec::new(), out, true)
    }

    /// The asynchronous half of [`connect`](Self::connect): subscriptions, bus topics and
    /// presence.
    pub async fn connected(
        self: &Arc<Self>,
        who: &Identity,
        conn: ConnId,
        change: TopicChange,
    ) -> Result<(), ChatError> {
        self.connected_resuming(who, conn, change, None).await
    }

    /// [`connected`](Self::connected), then the replay of what the client missed since its
    /// cursors, before any live event.
    pub async fn connected_resuming(
        self: &Arc<Self>,
        who: &Identity,
        conn: ConnId,
        change: TopicChange,
        cursors: Option<Cursors>,
    ) -> Result<(), ChatError> {
        self.apply(change).await;
        let subscribed = self.subscribe_all(who, conn).await;
        let replayed = match (&subscribed, cursors) {
            (Ok(ids), Some(cursors)) => self.replay(conn, ids, cursors).await,
            _ => Default::default(),
        };
        self.hub.release(conn, &replayed);
        let conversations = subscribed?;
        let first = self
            .presence
            .connect(&who.user_id, &self.presence_key(conn))
            .await
            .map_err(|e| unavailable("presence connect", e))?;
        // The grace state lives in the presence backend, so a reconnect to another node
        // inside the grace is no new "online" either.
        self.take_pending_offline(&who.user_id);
        if first {
            // Queued, not awaited: the connection's requests do not wait for its co-members.
            self.announce(Announcement::Online {
                user: who.user_id.clone(),
                conversations,
            });
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
            // The announcer drops it if the user came back meanwhile.
            if let Some(service) = service.upgrade() {
                service.announce(Announcement::Offline { user, generation });
            }
        });
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

    pub(super) async fn load(&self, id: ConversationId) -> Result<Conversation, ChatError> {
        self.store
            .conversation(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::not_found("no such conversation"))
    }

    pub(super) async fn member(
        &self,
        id: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, ChatError> {
        self.store.member(id, user).await.map_err(store_err)
    }

    /// What this node knows of a conversation: from the cache when it holds the conversation,
    /// else read from the store (and kept, when the conversation's bus topic is bound here, so
    /// its membership events keep the entry exact).
    pub(super) async fn state(
        &self,
        id: ConversationId,
    ) -> Result<Arc<ConversationState>, ChatError> {
        let ticket = match self.conversations.get(id, self.bus.epoch()) {
            Ok(state) => return Ok(state),
            Err(ticket) => ticket,
        };
        let bound = self.bindings.contains(&Topic::Conversation(id).key());
        let conversation = self.load(id).await?;
        let members = self.store.members(id).await.map_err(store_err)?;
        let state = Arc::new(ConversationState::new(conversation, members));
        if bound {
            self.conversations.insert(state.clone(), ticket);
        }
        Ok(state)
    }

    /// The state of a conversation the caller takes part in; strangers learn nothing of it
    /// (not even whether it exists).
    pub(super) async fn participating_state(
        &self,
        id: ConversationId,
        who: &Identity,
    ) -> Result<Arc<ConversationState>, ChatError> {
        let state = match self.state(id).await {
            Ok(state) => state,
            Err(ChatError::NotFound(_)) => {
                rules::can_participate(None)?;
                return Err(ChatError::not_found("no such conversation"));
            }
            Err(e) => return Err(e),
        };
        rules::can_participate(state.member(&who.user_id).as_ref())?;
        Ok(state)
    }

    /// Loads a conversation the caller takes part in; strangers learn nothing of it.
    pub(super) async fn participating(
        &self,
        id: ConversationId,
        who: &Identity,
    ) -> Result<Conversation, ChatError> {
        Ok(self.participating_state(id, who).await?.conversation())
    }
}
