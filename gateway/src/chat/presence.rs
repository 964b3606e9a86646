//! Presence rules: who is online, announced to the users who share a conversation with them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::error::ChatError;
use super::event::{Event, Route, UserRef};
use super::hub::ConnId;
use super::model::{ConversationId, Identity, Status, UserId, UserStatus};
use super::service::ChatService;
use super::{check_user_id, store_err, unavailable};

impl ChatService {
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

    pub(super) fn presence_key(&self, conn: ConnId) -> String {
        format!("{}:{conn}", self.settings.node_id)
    }

    pub(super) fn take_pending_offline(&self, user: &str) -> bool {
        self.offline_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user)
            .is_some()
    }

    pub(super) async fn announce_presence(&self, user: &str, online: bool) {
        let others = match self.store.co_members(user).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list co-members for presence");
                return;
            }
        };
        self.announce_to(user, others, online).await;
    }

    /// `user_online` for a user who just connected, to the members of `conversations` (the
    /// user's, just subscribed), from the node's conversation state: a reconnect storm would
    /// otherwise run one co-member query per client, which starved the store's readers (and
    /// the resumes and syncs behind them) in S4. A conversation not in the cache is loaded as
    /// a send would load it.
    pub(super) async fn announce_online_in(
        &self,
        user: &str,
        conversations: &HashSet<ConversationId>,
    ) {
        let mut others = HashSet::new();
        for id in conversations {
            match self.state(*id).await {
                Ok(state) => others.extend(state.member_ids()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list co-members for presence");
                    return;
                }
            }
        }
        others.remove(user);
        let mut others: Vec<UserId> = others.into_iter().collect();
        others.sort_unstable();
        self.announce_to(user, others, true).await;
    }

    async fn announce_to(&self, user: &str, others: Vec<UserId>, online: bool) {
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

    /// Status and last-seen of the users who share a conversation with `who` (and of `who`);
    /// everyone else is `unknown`, so presence cannot be used to watch strangers.
    pub async fn presence(
        &self,
        who: &Identity,
        users: Vec<UserId>,
    ) -> Result<HashMap<UserId, UserStatus>, ChatError> {
        if users.len() > 100 {
            return Err(ChatError::invalid("presence takes at most 100 userIds"));
        }
        for u in &users {
            check_user_id("userIds[]", u)?;
        }
        let known: std::collections::HashSet<UserId> = self
            .store
            .co_members(&who.user_id)
            .await
            .map_err(store_err)?
            .into_iter()
            .chain([who.user_id.clone()])
            .collect();
        let (visible, hidden): (Vec<UserId>, Vec<UserId>) =
            users.into_iter().partition(|u| known.contains(u));
        let mut statuses = self
            .presence
            .statuses(&visible)
            .await
            .map_err(|e| unavailable("presence", e))?;
        for u in hidden {
            statuses.insert(
                u,
                UserStatus {
                    status: Status::Unknown,
                    last_seen: None,
                },
            );
        }
        Ok(statuses)
    }
}
