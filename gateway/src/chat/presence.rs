//! Presence rules: who is online, announced to the users who share a conversation with them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::error::ChatError;
use super::event::{Event, Route, UserRef};
use super::hub::ConnId;
use super::model::{ConversationId, Identity, Status, UserId, UserStatus};
use super::service::ChatService;
use super::{check_user_id, store_err, unavailable};

/// A presence change on its way to the user's co-members.
#[derive(Debug)]
pub(super) enum Announcement {
    /// The user's first connection anywhere opened; `conversations` are the user's (just
    /// subscribed), whose members hear it.
    Online {
        user: UserId,
        conversations: HashSet<ConversationId>,
    },
    /// The grace period of the user's last disconnect (the `generation`th) ran out; announced
    /// only if the user has not come back meanwhile.
    Offline { user: UserId, generation: u64 },
}

/// Presence changes, announced one at a time in the order they happened by one task that
/// exists only while there is work and yields after each announcement.
///
/// An announcement reaches every co-member of its user (hundreds, in a team), so a reconnect
/// storm of thousands of users is millions of deliveries if each runs at once. Run by the
/// connections themselves (as before), they held up each connection's first answers and,
/// competing with the reconnects for the core, made the storm last longer than the grace
/// period, so that more users went offline and came back online: S4 took 47 s, two thirds of
/// it presence. Queued here, they wait behind the connections' own work (one announcement per
/// turn of the scheduler), and an offline whose user came back while it waited is dropped
/// unannounced, as is the online it would have needed.
#[derive(Default)]
pub(super) struct Announcer {
    state: Mutex<AnnouncerState>,
    /// Woken when the queue runs empty.
    idle: Notify,
}

#[derive(Default)]
struct AnnouncerState {
    queue: VecDeque<Announcement>,
    /// A task is announcing what is queued.
    running: bool,
}

impl Announcer {
    fn lock(&self) -> std::sync::MutexGuard<'_, AnnouncerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `announcement`; `true` if no task runs the queue yet (the caller starts one).
    fn push(&self, announcement: Announcement) -> bool {
        let mut st = self.lock();
        st.queue.push_back(announcement);
        !std::mem::replace(&mut st.running, true)
    }

    /// The next announcement, or `None` with the task marked ended (under the same lock as
    /// `push`, so an announcement is either taken by this task or starts the next one).
    fn next(&self) -> Option<Announcement> {
        let mut st = self.lock();
        let next = st.queue.pop_front();
        if next.is_none() {
            st.running = false;
            st.queue = VecDeque::new();
            drop(st);
            self.idle.notify_waiters();
        }
        next
    }

    fn is_idle(&self) -> bool {
        let st = self.lock();
        !st.running && st.queue.is_empty()
    }
}

impl ChatService {
    /// Queues a presence change for the announcer (see [`Announcer`]).
    pub(super) fn announce(self: &Arc<Self>, announcement: Announcement) {
        if self.announcer.push(announcement) {
            let service = self.clone();
            tokio::spawn(async move { service.run_announcements().await });
        }
    }

    async fn run_announcements(&self) {
        while let Some(announcement) = self.announcer.next() {
            match announcement {
                Announcement::Online {
                    user,
                    conversations,
                } => self.announce_online_in(&user, &conversations).await,
                Announcement::Offline { user, generation } => {
                    if !self.take_offline_of(&user, generation) {
                        continue; // came back meanwhile (or left again since: a later one)
                    }
                    match self.presence.settle_offline(&user).await {
                        Ok(true) => self.announce_presence(&user, false).await,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "presence settle failed"),
                    }
                }
            }
            tokio::task::yield_now().await;
        }
    }

    /// Waits until every presence change queued so far has been announced.
    pub async fn presence_announced(&self) {
        loop {
            let idle = self.announcer.idle.notified();
            if self.announcer.is_idle() {
                return;
            }
            idle.await;
        }
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

    pub(super) fn presence_key(&self, conn: ConnId) -> String {
        format!("{}:{conn}", self.settings.node_id)
    }

    /// Takes the user's pending offline if it is still the `generation`th disconnect's.
    fn take_offline_of(&self, user: &str, generation: u64) -> bool {
        let mut pending = self
            .offline_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pending.get(user) == Some(&generation) {
            pending.remove(user);
            true
        } else {
            false
        }
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
