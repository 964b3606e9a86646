//! Per-node conversation state: kind, department, members and last seq of the conversations
//! this node holds a bus binding for, so sends and joins by members make no store read.
//!
//! An entry is loaded on first use, and only while the conversation's bus topic is bound here:
//! from then on every membership change (create, add, remove, join of a new member) reaches this
//! node on that topic and is applied to the entry in publish order. An entry goes when the
//! topic is released, and every entry goes when the bus reconnects (its connection epoch
//! changes): events published meanwhile may never have arrived, so nothing cached is trusted.
//! Members' `last_read_seq` is not kept here (the watermark lives in the store).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::model::{
    Conversation, ConversationId, LogEntry, Member, MemberRole, Message, UserId, now,
};
use super::service::ChatService;

/// A membership change, carried on the envelope of the event that announces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipChange {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    /// The member's role; `None`: no longer a member.
    pub role: Option<MemberRole>,
    /// The conversation's `members_version` once this change committed (0 from a node that
    /// predates it: such a change is applied, and the next send finds the version ahead).
    #[serde(default)]
    pub version: i64,
}

/// What a node knows of one conversation.
#[derive(Debug)]
pub struct ConversationState {
    /// Kind, title and department never change; its `last_seq` is the one at load time.
    pub conversation: Conversation,
    members: RwLock<Members>,
    last_seq: AtomicI64,
    /// The log after a few cursors as the store last returned it (see [`Self::recent`]).
    recent: Mutex<Vec<Recent>>,
    /// Held by the one look-up that reads the store for this conversation's log, so that the
    /// others (a storm's resumes of one room, all from the same cursor) wait for its read and
    /// are served from it instead of each reading the store.
    pub(super) loading: tokio::sync::Mutex<()>,
}

/// Every entry of the log after `after` up to `after + entries.len()`, read in one go: no gap,
/// nothing left out.
#[derive(Debug)]
struct Recent {
    after: i64,
    entries: Vec<LogEntry>,
}

impl Recent {
    fn top(&self) -> i64 {
        self.after + self.entries.len() as i64
    }
}

/// How many cursors' reads a conversation's state keeps.
const RECENT_READS: usize = 4;

/// Past this many entries a read is no longer extended by new messages (it is dropped once a
/// later one makes it stale).
const RECENT_ENTRIES: usize = 1024;

#[derive(Debug)]
struct Members {
    map: HashMap<UserId, (MemberRole, DateTime<Utc>)>,
    /// The store's `members_version` that `map` reflects: every change up to it is applied.
    version: i64,
    /// Versions applied that arrived ahead of one still on its way (changes made on different
    /// nodes reach this one in any order); `version` moves past them once the gap fills.
    ahead: BTreeSet<i64>,
}

impl Members {
    fn applied(&mut self, version: i64) {
        if version <= self.version {
            return; // announced twice (to the user's topic and the conversation's), or from a node
            // that predates versions (0)
        }
        self.ahead.insert(version);
        while self.ahead.first() == Some(&(self.version + 1)) {
            self.ahead.pop_first();
            self.version += 1;
        }
    }
}

impl ConversationState {
    pub fn new(conversation: Conversation, members: Vec<Member>) -> Self {
        Self {
            last_seq: AtomicI64::new(conversation.last_seq),
            members: RwLock::new(Members {
                map: members
                    .into_iter()
                    .map(|m| (m.user_id, (m.role, m.joined_at)))
                    .collect(),
                version: conversation.members_version,
                ahead: BTreeSet::new(),
            }),
            recent: Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
            conversation,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The member `user`, if they are one (its `last_read_seq` is not kept: 0).
    pub fn member(&self, user: &str) -> Option<Member> {
        self.read().map.get(user).map(|&(role, joined_at)| Member {
            conversation_id: self.conversation.id,
            user_id: user.to_owned(),
            role,
            last_read_seq: 0,
            last_received_seq: 0,
            joined_at,
        })
    }

    /// Every member's user id.
    pub fn member_ids(&self) -> Vec<UserId> {
        self.read().map.keys().cloned().collect()
    }

    /// The membership version these members are at. A commit that saw a later one was made
    /// after a change this node has not applied yet.
    pub fn members_version(&self) -> i64 {
        self.read().version
    }

    /// The highest seq committed that this node has seen.
    pub fn last_seq(&self) -> i64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// The conversation with its current last seq.
    pub fn conversation(&self) -> Conversation {
        Conversation {
            last_seq: self.last_seq(),
            ..self.conversation.clone()
        }
    }

    /// The log after `after`, fewer than `limit` entries, from an earlier read of the store,
    /// if that read still holds everything after it: nothing later has reached this node (its
    /// `last_seq` is no higher than the read's last entry). An entry committed since but not yet
    /// arrived reaches a connection attached to the conversation live, as it would after a
    /// fresh read. So a reconnect storm, every client of a room resuming from the same cursor,
    /// reads the store once per room instead of once per client.
    pub fn recent(&self, after: i64, limit: u32) -> Option<Vec<LogEntry>> {
        let last_seq = self.last_seq();
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let read = recent.iter().find(|r| {
            let top = r.top();
            r.after <= after && after <= top && last_seq <= top
        })?;
        let skip = usize::try_from(after - read.after).ok()?;
        let entries = &read.entries[skip..];
        (entries.len() < limit as usize).then(|| entries.to_vec())
    }

    /// Keeps a read of the log after `after` for [`Self::recent`]: `entries` must be every
    /// entry after it, gap-free, as the store returned them.
    pub fn remember(&self, after: i64, entries: &[LogEntry]) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let last_seq = self.last_seq();
        // Reads that no longer hold everything are of no more use.
        recent.retain(|r| last_seq <= r.top() && r.after != after);
        if recent.len() >= RECENT_READS {
            recent.remove(0);
        }
        recent.push(Recent {
            after,
            entries: entries.to_vec(),
        });
    }

    /// A new message reached this node (before its local delivery): every read that ends just
    /// below it grows by it, so reads keep serving resumes while the room goes on talking (a
    /// storm's resumes are spread over seconds, and each message would otherwise make every
    /// read of its room stale). Only messages: a change alters an earlier message, which a
    /// read holds as it was, so a change leaves the reads below it stale.
    fn extend_recent(&self, message: &Message) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for read in recent.iter_mut() {
            if read.top() + 1 == message.seq && read.entries.len() < RECENT_ENTRIES {
                read.entries.push(LogEntry::Message(message.clone()));
            }
        }
    }

    fn apply(&self, change: &MembershipChange) {
        let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
        match change.role {
            Some(role) => {
                members
                    .map
                    .entry(change.user_id.clone())
                    .or_insert((role, now()));
            }
            None => {
                members.map.remove(&change.user_id);
            }
        }
        members.applied(change.version);
    }
}

impl ChatService {
    /// When the bus may have lost events (its epoch moved), the rooms held here are checked
    /// against the store: a removal whose event was lost still takes the removed user's
    /// connections out of the room. The cache itself drops on its next look-up.
    pub(super) fn spawn_room_check(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let mut seen = self.bus.epoch();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(ROOM_CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = weak.upgrade() else { break };
                let epoch = service.bus.epoch();
                if epoch == seen {
                    continue;
                }
                seen = epoch;
                service.check_rooms().await;
            }
        });
    }

    async fn check_rooms(&self) {
        for (id, users) in self.hub.rooms_and_users() {
            if let Err(e) = self.evict_non_members(id, users).await {
                tracing::warn!(error = %e, "cannot check a room's members after a bus reconnect");
            }
        }
    }

    /// A commit saw a later membership version than this node's state of the conversation: a
    /// change made on another node has committed, and its bus event is still on the way. The
    /// room is checked against the store before anything of that commit is delivered here (a
    /// user removed there gets nothing sent after the removal's ack), and the entry goes, so the
    /// next look-up reads members as they are.
    pub(super) async fn catch_up_members(&self, id: ConversationId) {
        self.conversations.forget(id);
        if let Err(e) = self.evict_non_members(id, self.hub.users_in_room(id)).await {
            tracing::warn!(error = %e, conversation = %id, "cannot check a room's members");
        }
    }

    /// Takes the users of `users` who are no longer members out of the conversation's room.
    async fn evict_non_members(
        &self,
        id: ConversationId,
        users: Vec<UserId>,
    ) -> Result<(), crate::store::StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let members: HashSet<UserId> = self
            .store
            .members(id)
            .await?
            .into_iter()
            .map(|m| m.user_id)
            .collect();
        for user in users.iter().filter(|u| !members.contains(*u)) {
            tracing::info!(conversation = %id, "evicting a user no longer a member");
            let change = self.hub.evict(user, id);
            self.apply(change).await;
        }
        Ok(())
    }
}

/// How often the bus epoch is looked at for [`ChatService::spawn_room_check`].
const ROOM_CHECK_EVERY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Entries {
    /// The bus connection epoch the entries were loaded in.
    epoch: u64,
    /// Membership changes applied so far: a load that saw a change land meanwhile is not kept
    /// (it may have read the store just before that change committed).
    changes: u64,
    map: HashMap<ConversationId, Arc<ConversationState>>,
}

/// Where a load started: [`ConversationCache::insert`] keeps its result only if nothing moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket {
    epoch: u64,
    changes: u64,
}

#[derive(Default)]
pub(super) struct ConversationCache {
    entries: Mutex<Entries>,
}

/// Past this many entries the cache starts over (entries are per bound conversation, so only a
/// node holding that many conversations at once gets there).
const REMEMBERED: usize = 200_000;

impl ConversationCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry, if one was loaded in the bus's current `epoch` (an older epoch drops them
    /// all), or the ticket a load of it starts with.
    pub(super) fn get(
        &self,
        id: ConversationId,
        epoch: u64,
    ) -> Result<Arc<ConversationState>, Ticket> {
        let mut entries = self.lock();
        if entries.epoch != epoch {
            if !entries.map.is_empty() {
                tracing::info!(
                    entries = entries.map.len(),
                    "the bus reconnected: dropping the conversation cache"
                );
            }
            entries.epoch = epoch;
            entries.map.clear();
        }
        entries.map.get(&id).cloned().ok_or(Ticket {
            epoch,
            changes: entries.changes,
        })
    }

    /// Keeps a freshly loaded entry, unless the epoch moved on or a membership change landed
    /// while it loaded.
    pub(super) fn insert(&self, state: Arc<ConversationState>, ticket: Ticket) {
        let mut entries = self.lock();
        if entries.epoch != ticket.epoch || entries.changes != ticket.changes {
            return;
        }
        if entries.map.len() >= REMEMBERED {
            entries.map.clear();
        }
        entries.map.insert(state.conversation.id, state);
    }

    /// The conversation's topic was released here: its events no longer arrive.
    pub(super) fn forget(&self, id: ConversationId) {
        let mut entries = self.lock();
        entries.changes += 1;
        entries.map.remove(&id);
    }

    /// Applies a membership change to the entry, if there is one.
    pub(super) fn apply(&self, change: &MembershipChange) {
        let entry = {
            let mut entries = self.lock();
            entries.changes += 1;
            entries.map.get(&change.conversation_id).cloned()
        };
        if let Some(entry) = entry {
            entry.apply(change);
        }
    }

    /// A message or change was committed: the entry's last seq follows.
    pub(super) fn committed(&self, id: ConversationId, seq: i64) {
        let entry = self.lock().map.get(&id).cloned();
        if let Some(entry) = entry {
            entry.last_seq.fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// A new message reached this node: its entry's reads grow by it (see
    /// [`ConversationState::extend_recent`]), then its last seq follows.
    pub(super) fn appended(&self, message: &Message) {
        let state = self.lock().map.get(&message.conversation_id).cloned();
        if let Some(state) = state {
            state.extend_recent(message);
            state.last_seq.fetch_max(message.seq, Ordering::AcqRel);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(version: i64) -> Members {
        Members {
            map: HashMap::new(),
            version,
            ahead: BTreeSet::new(),
        }
    }

    #[test]
    fn the_version_moves_only_over_changes_applied_without_a_gap() {
        let mut m = members(3);
        m.applied(5); // made on another node after 4, arrived first
        assert_eq!(m.version, 3, "4 is still on its way");
        m.applied(4);
        assert_eq!(m.version, 5, "the gap filled");
        m.applied(5); // announced twice (the user's topic and the conversation's)
        m.applied(0); // from a node that predates versions
        assert_eq!(m.version, 5);
        assert!(m.ahead.is_empty());
        m.applied(6);
        assert_eq!(m.version, 6);
    }
}
