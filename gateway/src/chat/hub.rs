//! Local fan-out: which connections on this node are in which conversation, and delivery to them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::event::{Outgoing, Route, Topic};
use super::model::{ConversationId, UserId};

pub type ConnId = u64;

/// Why a connection could not take an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// Its bounded queue is full: the client is not reading fast enough.
    QueueFull,
    /// It is already closed.
    Closed,
}

/// Why the domain (or the server around it) ends a connection; each transport maps it to its
/// own close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The connection's send queue is full: the client does not read.
    QueueFull,
    /// The server is shutting down.
    Shutdown,
    /// The token expired (no `refresh_token` in time).
    Expired,
}

/// A connection's outgoing side, implemented by each transport. `send` never blocks: a full
/// queue is reported so the hub can close the connection instead of dropping the event silently.
pub trait Outbound: Send + Sync {
    fn send(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure>;
    /// Ends the connection; the client is expected to reconnect and `sync`.
    fn close(&self, reason: CloseReason);
    /// Ends the connection because the server is draining, once the requests it already sent
    /// are answered (1012 where the transport has close codes).
    fn drain_close(&self) {
        self.close(CloseReason::Shutdown);
    }
    /// Sends a notice about the connection itself (`server_draining`), which no replay orders:
    /// it never waits behind a resume.
    fn notice(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure> {
        self.send(event)
    }
}

/// Live events a connection may hold back while its resume replays what it missed.
const HELD_EVENTS: usize = 1024;

/// A connection's outbound behind a gate: while held (from registration until its resume has
/// replayed), live events wait in order; released, they go straight through. The replay itself
/// is written past the gate, so the client sees the missed messages first, then live ones.
struct Gate {
    inner: Arc<dyn Outbound>,
    held: Mutex<Option<Vec<Arc<Outgoing>>>>,
    /// After a replay: the last seq it wrote per conversation. A message's live copy can still
    /// be on the bus when the replay has read it from the store (committed, not yet published
    /// here), so copies at or below it are dropped after the gate opens too. Empty (no
    /// allocation) for a connection that replayed nothing.
    replayed: Mutex<HashMap<ConversationId, i64>>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Arc<Outgoing>>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the gate: what was held goes out in order, except messages the replay already
    /// wrote (seq at or below `replayed[conversation]`).
    fn release(&self, replayed: &HashMap<ConversationId, i64>) {
        let mut held = self.lock();
        if !replayed.is_empty() {
            *self.replayed.lock().unwrap_or_else(|p| p.into_inner()) = replayed.clone();
        }
        for event in held.take().unwrap_or_default() {
            if self.was_replayed(&event) {
                continue;
            }
            if self.inner.send(&event) == Err(SendFailure::QueueFull) {
                self.inner.close(CloseReason::QueueFull);
                return;
            }
        }
    }
}

impl Gate {
    /// A live copy of a message the replay already wrote.
    fn was_replayed(&self, event: &Outgoing) -> bool {
        let Some((conversation, seq)) = event.message else {
            return false;
        };
        let replayed = self.replayed.lock().unwrap_or_else(|p| p.into_inner());
        replayed.get(&conversation).is_some_and(|&last| seq <= last)
    }
}

impl Outbound for Gate {
    fn send(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure> {
        {
            let mut held = self.lock();
            if let Some(queue) = held.as_mut() {
                if queue.len() >= HELD_EVENTS {
                    return Err(SendFailure::QueueFull);
                }
                queue.push(event.clone());
                return Ok(());
            }
        }
        if self.was_replayed(event) {
            return Ok(());
        }
        self.inner.send(event)
    }

    fn close(&self, reason: CloseReason) {
        self.inner.close(reason);
    }

    fn drain_close(&self) {
        self.inner.drain_close();
    }

    fn notice(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure> {
        self.inner.send(event)
    }
}

struct Conn {
    user: UserId,
    out: Arc<Gate>,
    rooms: HashSet<ConversationId>,
    departments: Vec<String>,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<ConnId, Conn>,
    rooms: HashMap<ConversationId, HashSet<ConnId>>,
    users: HashMap<UserId, HashSet<ConnId>>,
    departments: HashMap<String, HashSet<ConnId>>,
}

/// What changed when a connection registered or left: topics this node now needs or no longer needs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TopicChange {
    pub acquired: Vec<Topic>,
    pub released: Vec<Topic>,
}

#[derive(Default)]
pub struct Hub {
    inner: RwLock<Inner>,
    next_id: AtomicU64,
}

/// Adds `id` to the set under `key`, reporting whether the set was empty before.
fn add_to<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, HashSet<ConnId>>,
    key: K,
    id: ConnId,
) -> bool {
    let set = map.entry(key).or_default();
    let first = set.is_empty();
    set.insert(id);
    first
}

/// Removes `id` from the set under `key`, reporting whether the set is now empty (and gone).
fn remove_from<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, HashSet<ConnId>>,
    key: &K,
    id: ConnId,
) -> bool {
    let Some(set) = map.get_mut(key) else {
        return false;
    };
    if !set.remove(&id) {
        return false;
    }
    if set.is_empty() {
        map.remove(key);
        true
    } else {
        false
    }
}

impl Hub {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection of `user`; `departments` is non-empty for the agents' namespace.
    /// A connection registered `held` receives no live event until [`release`](Self::release).
    pub fn register(
        &self,
        user: &str,
        departments: Vec<String>,
        out: Arc<dyn Outbound>,
    ) -> (ConnId, TopicChange) {
        self.register_gated(user, departments, out, false)
    }

    pub fn register_gated(
        &self,
        user: &str,
        departments: Vec<String>,
        out: Arc<dyn Outbound>,
        held: bool,
    ) -> (ConnId, TopicChange) {
        let out = Arc::new(Gate {
            inner: out,
            held: Mutex::new(held.then(Vec::new)),
            replayed: Mutex::new(HashMap::new()),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut inner = self.write();
        let mut change = TopicChange::default();
        if add_to(&mut inner.users, user.to_owned(), id) {
            change.acquired.push(Topic::User(user.to_owned()));
        }
        for d in &departments {
            if add_to(&mut inner.departments, d.clone(), id) {
                change.acquired.push(Topic::Department(d.clone()));
            }
        }
        inner.conns.insert(
            id,
            Conn {
                user: user.to_owned(),
                out,
                rooms: HashSet::new(),
                departments,
            },
        );
        (id, change)
    }

    /// Forgets a connection; returns its user, whether it was that user's last local
    /// connection, and the topics no longer needed.
    pub fn unregister(&self, id: ConnId) -> Option<(UserId, bool, TopicChange)> {
        let mut inner = self.write();
        let conn = inner.conns.remove(&id)?;
        let mut change = TopicChange::default();
        for room in &conn.rooms {
            if remove_from(&mut inner.rooms, room, id) {
                change.released.push(Topic::Conversation(*room));
            }
        }
        for d in &conn.departments {
            if remove_from(&mut inner.departments, d, id) {
                change.released.push(Topic::Department(d.clone()));
            }
        }
        let last = remove_from(&mut inner.users, &conn.user, id);
        if last {
            change.released.push(Topic::User(conn.user.clone()));
        }
        Some((conn.user, last, change))
    }

    /// Puts a connection in a conversation's room; `None` if the connection is gone.
    pub fn join(&self, id: ConnId, conversation: ConversationId) -> Option<TopicChange> {
        let mut inner = self.write();
        let conn = inner.conns.get_mut(&id)?;
        conn.rooms.insert(conversation);
        let mut change = TopicChange::default();
        if add_to(&mut inner.rooms, conversation, id) {
            change.acquired.push(Topic::Conversation(conversation));
        }
        Some(change)
    }

    pub fn leave(&self, id: ConnId, conversation: ConversationId) -> TopicChange {
        let mut inner = self.write();
        let mut change = TopicChange::default();
        if let Some(conn) = inner.conns.get_mut(&id) {
            conn.rooms.remove(&conversation);
        }
        if remove_from(&mut inner.rooms, &conversation, id) {
            change.released.push(Topic::Conversation(conversation));
        }
        change
    }

    /// Puts every local connection of `user` in a conversation's room (they were made a member).
    pub fn attach_user(&self, user: &str, conversation: ConversationId) -> TopicChange {
        let mut inner = self.write();
        let ids: Vec<ConnId> = inner
            .users
            .get(user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut change = TopicChange::default();
        for id in ids {
            if let Some(conn) = inner.conns.get_mut(&id) {
                conn.rooms.insert(conversation);
            }
            if add_to(&mut inner.rooms, conversation, id) {
                change.acquired.push(Topic::Conversation(conversation));
            }
        }
        change
    }

    /// The connection's own outbound, past its gate: for a resume's replay.
    pub fn outbound_of(&self, id: ConnId) -> Option<Arc<dyn Outbound>> {
        self.read().conns.get(&id).map(|c| c.out.inner.clone())
    }

    /// Opens a held connection's gate (see [`register_gated`](Self::register_gated)).
    pub fn release(&self, id: ConnId, replayed: &HashMap<ConversationId, i64>) {
        let gate = self.read().conns.get(&id).map(|c| c.out.clone());
        if let Some(gate) = gate {
            gate.release(replayed);
        }
    }

    /// Takes every local connection of `user` out of a conversation's room (after removal).
    pub fn evict(&self, user: &str, conversation: ConversationId) -> TopicChange {
        let mut inner = self.write();
        let ids: Vec<ConnId> = inner
            .users
            .get(user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut change = TopicChange::default();
        for id in ids {
            if let Some(conn) = inner.conns.get_mut(&id) {
                conn.rooms.remove(&conversation);
            }
            if remove_from(&mut inner.rooms, &conversation, id) {
                change.released.push(Topic::Conversation(conversation));
            }
        }
        change
    }

    /// Every room held here with the distinct users of its connections.
    pub fn rooms_and_users(&self) -> Vec<(ConversationId, Vec<UserId>)> {
        let inner = self.read();
        inner
            .rooms
            .iter()
            .map(|(room, conns)| {
                let users: HashSet<&UserId> = conns
                    .iter()
                    .filter_map(|c| inner.conns.get(c).map(|c| &c.user))
                    .collect();
                (*room, users.into_iter().cloned().collect())
            })
            .collect()
    }

    /// The distinct users of the connections in one conversation's room.
    pub fn users_in_room(&self, conversation: ConversationId) -> Vec<UserId> {
        let inner = self.read();
        let Some(conns) = inner.rooms.get(&conversation) else {
            return Vec::new();
        };
        let users: HashSet<&UserId> = conns
            .iter()
            .filter_map(|c| inner.conns.get(c).map(|c| &c.user))
            .collect();
        users.into_iter().cloned().collect()
    }

    pub fn is_in_room(&self, id: ConnId, conversation: ConversationId) -> bool {
        self.read()
            .conns
            .get(&id)
            .is_some_and(|c| c.rooms.contains(&conversation))
    }

    pub fn connection_count(&self) -> usize {
        self.read().conns.len()
    }

    pub fn local_connections_of(&self, user: &str) -> usize {
        self.read().users.get(user).map_or(0, HashSet::len)
    }

    /// Every distinct local recipient of a route, each once.
    fn recipients(&self, route: &Route) -> Vec<Arc<dyn Outbound>> {
        let inner = self.read();
        let mut ids: HashSet<ConnId> = HashSet::new();
        match route {
            Route::Conversation { id, also_users } => {
                if let Some(set) = inner.rooms.get(id) {
                    ids.extend(set);
                }
                for u in also_users {
                    if let Some(set) = inner.users.get(u) {
                        ids.extend(set);
                    }
                }
            }
            Route::Users { ids: users } => {
                for u in users {
                    if let Some(set) = inner.users.get(u) {
                        ids.extend(set);
                    }
                }
            }
            Route::Department { id } => {
                if let Some(set) = inner.departments.get(id) {
                    ids.extend(set);
                }
            }
        }
        ids.iter()
            .filter_map(|id| {
                inner
                    .conns
                    .get(id)
                    .map(|c| c.out.clone() as Arc<dyn Outbound>)
            })
            .collect()
    }

    /// Writes an event to every local recipient of `route`. A recipient whose queue is full is
    /// closed rather than skipped, so it reconnects and recovers with `sync`. Returns how many
    /// connections took the event.
    pub fn deliver(&self, route: &Route, event: &Arc<Outgoing>) -> usize {
        let mut delivered = 0;
        for out in self.recipients(route) {
            match out.send(event) {
                Ok(()) => delivered += 1,
                Err(SendFailure::QueueFull) => {
                    tracing::warn!(
                        event = event.name,
                        "closing a connection whose send queue is full"
                    );
                    out.close(CloseReason::QueueFull);
                }
                Err(SendFailure::Closed) => {}
            }
        }
        delivered
    }

    /// Whether a local connection still needs `topic` from the bus.
    pub fn wants(&self, topic: &Topic) -> bool {
        let inner = self.read();
        match topic {
            Topic::Conversation(id) => inner.rooms.contains_key(id),
            Topic::User(id) => inner.users.contains_key(id),
            Topic::Department(id) => inner.departments.contains_key(id),
        }
    }

    /// Every local connection, for drain and shutdown.
    pub fn all(&self) -> Vec<Arc<dyn Outbound>> {
        self.read()
            .conns
            .values()
            .map(|c| c.out.clone() as Arc<dyn Outbound>)
            .collect()
    }
}
