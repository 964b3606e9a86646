//! Typing: the rules of `typing_start`/`typing_stop`, and the in-memory typing state (who is
//! typing where, with a generation per start so a stale expiry is ignored).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::ChatError;
use super::event::{ConversationUser, Event, Route, Typing};
use super::model::{ConversationId, Identity, UserId};
use super::service::ChatService;
use super::unavailable;

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

impl ChatService {
    pub async fn typing_start(
        self: &Arc<Self>,
        who: &Identity,
        id: ConversationId,
    ) -> Result<(), ChatError> {
        self.participating_state(id, who).await?;
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
        self.participating_state(id, who).await?;
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
}
