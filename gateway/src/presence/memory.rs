//! `MemoryPresence`: presence and typing of a single gateway, in memory.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Presence, PresenceError};
use crate::chat::model::{ConversationId, Status, UserId, UserStatus};
use crate::chat::typing::TypingTracker;

#[derive(Default)]
struct Inner {
    connections: HashMap<UserId, HashSet<String>>,
    /// Users announced online and not yet announced offline.
    announced: HashSet<UserId>,
    last_seen: HashMap<UserId, DateTime<Utc>>,
}

#[derive(Default)]
pub struct MemoryPresence {
    inner: Mutex<Inner>,
    typing: TypingTracker,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn connect(&self, user: &str, conn: &str) -> Result<bool, PresenceError> {
        let mut inner = self.lock();
        inner
            .connections
            .entry(user.to_owned())
            .or_default()
            .insert(conn.to_owned());
        Ok(inner.announced.insert(user.to_owned()))
    }

    async fn disconnect(&self, user: &str, conn: &str) -> Result<usize, PresenceError> {
        let mut inner = self.lock();
        let remaining = match inner.connections.get_mut(user) {
            Some(set) => {
                set.remove(conn);
                set.len()
            }
            None => 0,
        };
        if remaining == 0 {
            inner.connections.remove(user);
        }
        inner.last_seen.insert(user.to_owned(), Utc::now());
        Ok(remaining)
    }

    async fn settle_offline(&self, user: &str) -> Result<bool, PresenceError> {
        let mut inner = self.lock();
        if inner.connections.contains_key(user) {
            return Ok(false);
        }
        Ok(inner.announced.remove(user))
    }

    async fn is_online(&self, user: &str) -> Result<bool, PresenceError> {
        Ok(self.lock().connections.contains_key(user))
    }

    async fn statuses(
        &self,
        users: &[UserId],
    ) -> Result<HashMap<UserId, UserStatus>, PresenceError> {
        let inner = self.lock();
        Ok(users
            .iter()
            .map(|u| {
                let online = inner.connections.contains_key(u);
                let status = UserStatus {
                    status: if online {
                        Status::Online
                    } else {
                        Status::Offline
                    },
                    last_seen: if online {
                        Some(Utc::now())
                    } else {
                        inner.last_seen.get(u).copied()
                    },
                };
                (u.clone(), status)
            })
            .collect())
    }

    async fn typing_start(
        &self,
        conversation: ConversationId,
        user: &str,
        _ttl: Duration,
    ) -> Result<(bool, u64), PresenceError> {
        Ok(self.typing.start(conversation, user))
    }

    async fn typing_stop(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        Ok(self.typing.stop(conversation, user))
    }

    async fn typing_expire(
        &self,
        conversation: ConversationId,
        user: &str,
        generation: u64,
    ) -> Result<bool, PresenceError> {
        Ok(self.typing.expire(conversation, user, generation))
    }

    async fn is_typing(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        Ok(self.typing.is_typing(conversation, user))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_presence_meets_the_presence_contract() {
        crate::presence::contract::run(&super::MemoryPresence::new()).await;
    }
}
