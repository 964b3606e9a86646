//! Messages that live: edits, deletions and reactions, each an entry of the conversation's log
//! with its own seq (persisted, then published through the same fan-out as a message), and
//! per-recipient delivery receipts.

use std::sync::Arc;

use tracing::Instrument;

use super::error::ChatError;
use super::event::{DeliveredTo, Event, Route};
use super::model::{Change, ConversationId, ConversationKind, Identity};
use super::service::ChatService;
use super::{check_text, rules, store_err, unavailable};
use crate::limits::LimitClass;
use crate::store::{Changed, NewDeletion, NewEdit, NewReaction, Refusal};

/// The emoji a reaction may be, besides a short name (`:thumbsup:`): one grapheme each, the
/// set the web page offers and the common ones of other team chats. A fixed set means no
/// unbounded Unicode (zero-width joiners, tag sequences, bidi controls) reaches other clients.
const ALLOWED_EMOJI: &[&str] = &[
    "👍", "👎", "❤️", "😂", "😮", "😢", "😡", "🎉", "🙏", "🔥", "👀", "✅", "❌", "💯", "🚀", "😄",
    "😊", "😍", "🤔", "🙌", "👏", "💪", "🤝", "👋", "😅", "😎", "🥳", "😬", "🙈", "⭐", "💡", "⚠️",
    "➕", "➖", "❓", "❗", "🐛", "🍕", "☕", "🎯",
];

/// Longest short name between the colons.
const MAX_SHORT_NAME: usize = 32;

/// The emoji as stored, or why it is refused: one of [`ALLOWED_EMOJI`] (with or without the
/// emoji presentation selector, stored as listed) or a short name `:[a-z0-9_+-]{1,32}:`.
pub fn check_emoji(emoji: &str) -> Result<String, ChatError> {
    let bare = |s: &str| s.replace('\u{fe0f}', "");
    if let Some(known) = ALLOWED_EMOJI.iter().find(|e| bare(e) == bare(emoji)) {
        return Ok((*known).to_owned());
    }
    if let Some(name) = emoji
        .strip_prefix(':')
        .and_then(|rest| rest.strip_suffix(':'))
        && !name.is_empty()
        && name.len() <= MAX_SHORT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_+-".contains(&b))
    {
        return Ok(emoji.to_owned());
    }
    Err(ChatError::invalid(
        "emoji must be one of the allowed emoji or a short name like :thumbsup:",
    ))
}

/// A change a user asks for.
#[derive(Debug, Clone)]
pub enum ChangeRequest {
    Edit {
        conversation_id: ConversationId,
        target: i64,
        content: String,
        client_msg_id: String,
    },
    Delete {
        conversation_id: ConversationId,
        target: i64,
    },
    React {
        conversation_id: ConversationId,
        target: i64,
        emoji: String,
        on: bool,
        client_msg_id: Option<String>,
    },
}

impl ChangeRequest {
    fn conversation_id(&self) -> ConversationId {
        match self {
            Self::Edit {
                conversation_id, ..
            }
            | Self::Delete {
                conversation_id, ..
            }
            | Self::React {
                conversation_id, ..
            } => *conversation_id,
        }
    }
}

fn refused(refusal: Refusal, target: i64) -> ChatError {
    match refusal {
        Refusal::NoSuchMessage => ChatError::not_found(format!(
            "seq {target} is not a message of this conversation"
        )),
        Refusal::Deleted => ChatError::Conflict(format!("message {target} was deleted")),
        Refusal::NotSender => ChatError::forbidden("only the sender may edit a message"),
        Refusal::TooManyReactions => ChatError::invalid(format!(
            "message {target} carries as many distinct reactions as it may"
        )),
        Refusal::KeyReused => {
            ChatError::Conflict("this clientMsgId was already used for another change".into())
        }
    }
}

impl ChatService {
    /// Commits a change and publishes it, on a task of its own (as
    /// [`send_detached`](Self::send_detached) does, for the same reason: a committed entry must
    /// be published whatever happens to the caller). `None`: nothing to change (a reaction
    /// already in the state asked for).
    pub async fn change_detached(
        self: &Arc<Self>,
        who: &Identity,
        req: ChangeRequest,
    ) -> Result<Option<Change>, ChatError> {
        let service = self.clone();
        let who = who.clone();
        let span = tracing::info_span!("chat.change", conversation_id = %req.conversation_id());
        let task = tokio::spawn(async move { service.change(&who, req).await }.instrument(span));
        task.await
            .unwrap_or_else(|e| Err(unavailable("change task", e)))
    }

    pub async fn change(
        &self,
        who: &Identity,
        req: ChangeRequest,
    ) -> Result<Option<Change>, ChatError> {
        let id = req.conversation_id();
        let target = match &req {
            ChangeRequest::Edit { target, .. }
            | ChangeRequest::Delete { target, .. }
            | ChangeRequest::React { target, .. } => *target,
        };
        if target < 1 {
            return Err(ChatError::invalid("seq must be at least 1"));
        }
        self.throttle(LimitClass::UserMessages, &who.user_id)
            .await?;
        let state = self.participating_state(id, who).await?;
        let department = match state.conversation.kind {
            ConversationKind::Support => state.conversation.department_id.clone(),
            _ => None,
        };
        let members_version = state.members_version();
        let changed = match req {
            ChangeRequest::Edit {
                content,
                client_msg_id,
                ..
            } => {
                self.check_content(&content)?;
                check_text("clientMsgId", &client_msg_id, 100, false)?;
                self.store
                    .edit_message(NewEdit {
                        conversation_id: id,
                        target,
                        actor_id: who.user_id.clone(),
                        client_msg_id,
                        content,
                    })
                    .await
            }
            ChangeRequest::Delete { .. } => {
                let message = self
                    .store
                    .message_at(id, target)
                    .await
                    .map_err(store_err)?
                    .ok_or_else(|| refused(Refusal::NoSuchMessage, target))?;
                rules::can_delete(
                    &state.conversation,
                    state.member(&who.user_id).as_ref(),
                    who,
                    &message.sender_id,
                )?;
                self.store
                    .delete_message(NewDeletion {
                        conversation_id: id,
                        target,
                        actor_id: who.user_id.clone(),
                    })
                    .await
            }
            ChangeRequest::React {
                emoji,
                on,
                client_msg_id,
                ..
            } => {
                let emoji = check_emoji(&emoji)?;
                if let Some(key) = &client_msg_id {
                    check_text("clientMsgId", key, 100, false)?;
                }
                self.store
                    .react(NewReaction {
                        conversation_id: id,
                        target,
                        actor_id: who.user_id.clone(),
                        emoji,
                        on,
                        client_msg_id,
                        max_distinct: self.settings.max_reactions,
                    })
                    .await
            }
        };
        drop(state);
        let change = match changed.map_err(store_err)? {
            Changed::New(change, committed_under) => {
                if committed_under > members_version {
                    self.catch_up_members(id).await;
                }
                change
            }
            Changed::Existing(change) => return Ok(Some(change)),
            Changed::Unchanged => return Ok(None),
            Changed::Refused(refusal) => return Err(refused(refusal, target)),
        };
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::from(change.clone()),
        )
        .await;
        if let Some(department) = department {
            self.publish(
                Route::Department { id: department },
                Event::from(change.clone()),
            )
            .await;
        }
        Ok(Some(change))
    }

    /// `messages_received`: raises the user's delivery watermark; the senders of the messages
    /// it rose over each hear `message_delivered_to` once (the watermark never falls, so a
    /// device repeating it after a reconnect announces nothing again).
    pub async fn mark_received(
        &self,
        who: &Identity,
        id: ConversationId,
        seq: i64,
    ) -> Result<(), ChatError> {
        let conversation = self.participating(id, who).await?;
        if seq < 0 || seq > conversation.last_seq {
            return Err(ChatError::invalid(format!(
                "seq must be between 0 and the conversation's last seq ({})",
                conversation.last_seq
            )));
        }
        let senders = self
            .store
            .mark_received(id, &who.user_id, seq)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::forbidden("you are not a member of this conversation"))?;
        for (sender, last) in senders {
            self.publish(
                Route::Users { ids: vec![sender] },
                Event::MessageDeliveredTo(DeliveredTo {
                    conversation_id: id,
                    seq: last,
                    user_id: who.user_id.clone(),
                }),
            )
            .await;
        }
        Ok(())
    }

    /// The content rules of a message, for sends and edits alike.
    pub(super) fn check_content(&self, content: &str) -> Result<(), ChatError> {
        if content.len() > self.settings.max_content_bytes {
            return Err(ChatError::TooLarge(format!(
                "content is {} bytes; the limit is {}",
                content.len(),
                self.settings.max_content_bytes
            )));
        }
        if content.trim().is_empty() {
            return Err(ChatError::invalid("content must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_emoji_pass_with_or_without_the_presentation_selector_and_are_stored_as_listed() {
        assert_eq!(check_emoji("👍").expect("allowed"), "👍");
        assert_eq!(check_emoji("❤").expect("bare heart"), "❤️");
        assert_eq!(check_emoji("❤️").expect("heart"), "❤️");
        assert_eq!(check_emoji(":thumbsup:").expect("short name"), ":thumbsup:");
        assert_eq!(check_emoji(":+1:").expect("short name"), ":+1:");
    }

    #[test]
    fn other_text_sequences_and_long_names_are_refused_as_emoji() {
        for bad in [
            "",
            "a",
            "👍👍",
            "👍\u{200d}",
            "🏴\u{e0067}\u{e0062}",
            "::",
            ":Thumbs:",
            ":a b:",
            ":thumbsup",
            &format!(":{}:", "a".repeat(33)),
        ] {
            let e = check_emoji(bad).expect_err(bad);
            assert_eq!(e.code(), "invalid", "{bad:?}");
        }
    }
}
