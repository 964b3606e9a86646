//! Who is online: connections per user across every device (and, with Redis, every node).

mod memory;
mod redis;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

use crate::chat::model::{ConversationId, UserId, UserStatus};

pub use memory::MemoryPresence;
pub use redis::{NodeEntry, RedisPresence, RedisPresenceSettings};

#[derive(Debug, Error)]
pub enum PresenceError {
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
    #[error("Redis: {0}")]
    Redis(#[from] fred::error::Error),
}

/// Shared, short-lived user state: who is online (announced once per user, not per device or
/// node) and who is typing where.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records connection `conn` (unique across nodes) of `user`; `true` if the user is to be
    /// announced online now: they were not online anywhere, nor inside a disconnect's grace.
    async fn connect(&self, user: &str, conn: &str) -> Result<bool, PresenceError>;
    /// Forgets a connection and stamps the user's last-seen time; returns how many remain
    /// anywhere. At zero the caller waits out the grace, then calls [`settle_offline`].
    ///
    /// [`settle_offline`]: Presence::settle_offline
    async fn disconnect(&self, user: &str, conn: &str) -> Result<usize, PresenceError>;
    /// After the grace period: `true` if the user still has no connection anywhere and was
    /// announced online, which this call ends — exactly one caller fleet-wide gets `true`.
    async fn settle_offline(&self, user: &str) -> Result<bool, PresenceError>;
    async fn is_online(&self, user: &str) -> Result<bool, PresenceError>;
    /// Status of each requested user; users never seen are offline with no last-seen time.
    async fn statuses(
        &self,
        users: &[UserId],
    ) -> Result<HashMap<UserId, UserStatus>, PresenceError>;
    /// How often [`maintain`](Presence::maintain) must run; `None` when it is not needed.
    fn maintenance_interval(&self) -> Option<Duration> {
        None
    }
    /// Periodic upkeep: refreshes this node's connections and returns what changed behind
    /// everyone's back — users whose every connection expired (their node died: announce
    /// them offline) and users back online after this node's own entries had expired.
    async fn maintain(&self) -> Result<Maintenance, PresenceError> {
        Ok(Maintenance::default())
    }
    /// Whether the backend answers, for readiness.
    async fn ready(&self) -> Result<(), PresenceError> {
        Ok(())
    }
    /// Starts or renews typing; returns whether it is a new start and the generation whose
    /// expiry should end it.
    async fn typing_start(
        &self,
        conversation: ConversationId,
        user: &str,
        ttl: Duration,
    ) -> Result<(bool, u64), PresenceError>;
    /// Stops typing; returns whether the user was typing.
    async fn typing_stop(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError>;
    /// Ends typing if no start came after `generation`; returns whether it ended now.
    async fn typing_expire(
        &self,
        conversation: ConversationId,
        user: &str,
        generation: u64,
    ) -> Result<bool, PresenceError>;
    async fn is_typing(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError>;
}

/// What [`Presence::maintain`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    pub expired: Vec<UserId>,
    pub revived: Vec<UserId>,
}

#[cfg(test)]
pub(crate) mod contract;
