//! Typing state: who is typing where, with a generation per start so a stale expiry is ignored.

use std::collections::HashMap;
use std::sync::Mutex;

use super::model::{ConversationId, UserId};

#[derive(Default)]
pub struct TypingTracker {
    active: Mutex<HashMap<(ConversationId, UserId), u64>>,
    generation: Mutex<u64>,
}

impl TypingTracker {
    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<(ConversationId, UserId), u64>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts or renews typing; returns whether it is a new start and the generation whose
    /// expiry should end it.
    pub fn start(&self, conversation: ConversationId, user: &str) -> (bool, u64) {
        let generation = {
            let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        let previous = self
            .active()
            .insert((conversation, user.to_owned()), generation);
        (previous.is_none(), generation)
    }

    /// Stops typing; returns whether the user was typing.
    pub fn stop(&self, conversation: ConversationId, user: &str) -> bool {
        self.active()
            .remove(&(conversation, user.to_owned()))
            .is_some()
    }

    /// Ends typing if no start came after `generation`; returns whether it ended now.
    pub fn expire(&self, conversation: ConversationId, user: &str, generation: u64) -> bool {
        let mut active = self.active();
        let key = (conversation, user.to_owned());
        if active.get(&key) == Some(&generation) {
            active.remove(&key);
            true
        } else {
            false
        }
    }

    pub fn is_typing(&self, conversation: ConversationId, user: &str) -> bool {
        self.active().contains_key(&(conversation, user.to_owned()))
    }
}
