//! The chat domain: conversations, membership, messages, delivery, typing and presence rules.
//! Transports call [`ChatService`]; it talks to backends only through their traits.
//!
//! - `service`: the service itself, its backends, connections and common lookups;
//! - `membership`: conversations, members, join and leave;
//! - `messages`: send (with replies and mentions), read watermarks, history and sync;
//! - `lifecycle`: edits, deletions, reactions (entries of the log) and delivery receipts;
//! - `attachments`: uploads, downloads and thumbnails of the files messages refer to;
//! - `presence` and `typing`: who is online, who is typing;
//! - `resume`: server-side subscriptions at connect, and the replay of what a client missed;
//!   `batch`: the users' conversation lists those connects read, batched;
//! - `state`: the per-node conversation cache (kind, department, members, last seq);
//! - `fanout`: bus bindings, publishing and delivery of what arrives to local connections
//!   (`hub`).

pub mod attachments;
mod batch;
pub mod error;
pub mod event;
mod fanout;
pub mod hub;
mod lifecycle;
mod membership;
mod messages;
pub mod model;
mod presence;
mod resume;
pub mod rules;
mod service;
mod state;
pub mod typing;

use std::time::Duration;

use uuid::Uuid;

use crate::store::StoreError;
use error::ChatError;
use model::{
    Change, Conversation, ConversationId, ConversationKind, ConversationSummary, Member, Message,
    MessageKind, UserId,
};

pub use lifecycle::{ChangeRequest, check_emoji};

pub use resume::{Cursors, check_cursors as resume_check};
pub use service::ChatService;

/// Domain limits and timings, from configuration.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// This gateway's id, unique in the fleet.
    pub node_id: String,
    /// A `typing_start` not renewed within this ends by itself.
    pub typing_ttl: Duration,
    /// How long a user with no connection stays online, so a reconnect does not flap.
    pub presence_grace: Duration,
    pub max_content_bytes: usize,
    pub max_history: u32,
    pub max_sync: u32,
    /// Most messages a resume replays per conversation; past it `resume_truncated` says where
    /// `sync` takes over.
    pub max_resume: u32,
    pub max_members: usize,
    /// Most distinct emoji one message may carry.
    pub max_reactions: usize,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            node_id: format!("node-{}", Uuid::now_v7().simple()),
            typing_ttl: Duration::from_secs(5),
            presence_grace: Duration::from_secs(3),
            max_content_bytes: 16 * 1024,
            max_history: 100,
            max_sync: 500,
            max_resume: 200,
            max_members: 1000,
            max_reactions: 20,
        }
    }
}

/// A message a user asks to send.
#[derive(Debug, Clone)]
pub struct Send {
    pub conversation_id: ConversationId,
    pub kind: MessageKind,
    pub content: String,
    pub client_msg_id: String,
    /// A `file` or `image` message's upload (to the same conversation).
    pub attachment_id: Option<Uuid>,
    /// The seq of the message this one answers (same conversation).
    pub reply_to: Option<i64>,
    /// Members this message mentions.
    pub mentions: Vec<UserId>,
}

#[derive(Debug, Clone)]
pub struct CreateConversation {
    pub kind: ConversationKind,
    pub title: Option<String>,
    pub members: Vec<UserId>,
    pub department_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Joined {
    pub conversation: Conversation,
    pub last_seq: i64,
    /// Only when asked for.
    pub members: Option<Vec<Member>>,
}

#[derive(Debug, Clone)]
pub struct Sent {
    pub message: Message,
    /// `false` when this was a retry of a message committed before.
    pub fresh: bool,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub messages: Vec<Message>,
    pub next_before_seq: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Synced {
    /// Messages after the cursors, as they are now.
    pub messages: Vec<Message>,
    /// Change entries after the cursors; with `messages` they are the log's entries, each in
    /// seq order.
    pub changes: Vec<Change>,
    pub truncated: bool,
    /// Unread and mention counts of the conversations asked for.
    pub counts: Vec<ConversationSummary>,
}

pub(crate) fn unavailable(context: &str, err: impl std::fmt::Display) -> ChatError {
    tracing::error!(error = %err, "{context} failed");
    ChatError::Unavailable
}

pub(crate) fn store_err(err: StoreError) -> ChatError {
    match err {
        StoreError::NoSuchConversation(_) => ChatError::not_found("no such conversation"),
        other => unavailable("store", other),
    }
}

/// Rejects strings that are empty, too long, or carry control characters (which could forge log
/// lines or confuse clients).
pub(crate) fn check_text(
    field: &str,
    value: &str,
    max_chars: usize,
    allow_newlines: bool,
) -> Result<(), ChatError> {
    if value.trim().is_empty() {
        return Err(ChatError::invalid(format!("{field} must not be empty")));
    }
    if value.chars().count() > max_chars {
        return Err(ChatError::invalid(format!(
            "{field} is longer than {max_chars} characters"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\t' || c == '\r')))
    {
        return Err(ChatError::invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

pub fn check_user_id(field: &str, value: &str) -> Result<(), ChatError> {
    check_text(field, value, 200, false)
}

#[cfg(test)]
mod tests;
