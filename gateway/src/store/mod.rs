//! Persistence of conversations, members and messages behind one trait, with its contract tests.

mod postgres;
mod sqlite;

use async_trait::async_trait;
use thiserror::Error;

use crate::chat::model::{
    Attachment, Conversation, ConversationId, ConversationKind, ConversationSummary, Member,
    MemberRole, Message, MessageAttachment, MessageKind, UserId,
};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("conversation {0} does not exist")]
    NoSuchConversation(ConversationId),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    /// A group-committed write failed as a whole (the batch was rolled back).
    #[error("write batch failed: {0}")]
    Batch(String),
}

#[derive(Debug, Clone)]
pub struct NewConversation {
    pub kind: ConversationKind,
    pub title: Option<String>,
    pub department_id: Option<String>,
    pub members: Vec<(UserId, MemberRole)>,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conversation_id: ConversationId,
    pub sender_id: UserId,
    pub sender_name: String,
    pub client_msg_id: String,
    pub kind: MessageKind,
    pub content: String,
    /// The attachment a `file` or `image` message refers to, copied into the message (it never
    /// changes), so history and sync read it without a join.
    pub attachment: Option<MessageAttachment>,
}

/// The result of an idempotent insert.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// Committed now with the next `seq` of its conversation.
    New(Message),
    /// The same `(conversation_id, sender_id, client_msg_id)` was committed before; this is that
    /// message.
    Existing(Message),
}

impl Inserted {
    pub fn message(&self) -> &Message {
        match self {
            Self::New(m) | Self::Existing(m) => m,
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation, StoreError>;
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError>;
    /// The user's conversations, newest activity first, with their unread counts.
    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError>;
    /// Adds a member; `false` if they already were one (their role is kept).
    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<bool, StoreError>;
    /// Removes a member; `false` if they were not one.
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, StoreError>;
    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError>;
    async fn members(&self, conversation: ConversationId) -> Result<Vec<Member>, StoreError>;
    /// Commits a message with the conversation's next `seq` in one transaction, or returns the
    /// message already committed under the same `(conversation_id, sender_id, client_msg_id)`.
    async fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError>;
    /// Up to `limit` messages with `seq < before_seq` (all if `None`), oldest first.
    async fn messages_before(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
    /// Up to `limit` messages with `seq > after_seq`, oldest first.
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
    /// For each `(conversation, after_seq)`, up to `limit` of its messages with `seq >
    /// after_seq`, oldest first, conversation after conversation in the order asked. Resume
    /// reads all of a connection's cursors with this: one round trip where the store can.
    async fn messages_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let mut messages = Vec::new();
        for &(conversation, after_seq) in cursors {
            messages.extend(self.messages_after(conversation, after_seq, limit).await?);
        }
        Ok(messages)
    }
    /// Raises the member's read watermark to `seq` (never lowers it); returns the watermark, or
    /// `None` if the user is not a member.
    async fn mark_read(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError>;
    /// Every other user who shares at least one conversation with `user`.
    async fn co_members(&self, user: &str) -> Result<Vec<UserId>, StoreError>;
    /// Records an uploaded attachment. The same `(conversation, uploader, sha256, name)`
    /// recorded before (a retried upload) returns that record instead of a second one.
    async fn insert_attachment(&self, new: Attachment) -> Result<Attachment, StoreError>;
    async fn attachment(&self, id: uuid::Uuid) -> Result<Option<Attachment>, StoreError>;
}

/// A message's attachment as its row keeps it (JSON text; `None` on text messages).
fn attachment_json(a: Option<&MessageAttachment>) -> Result<Option<String>, StoreError> {
    a.map(|a| {
        serde_json::to_string(a)
            .map_err(|e| StoreError::Corrupt(format!("attachment does not encode: {e}")))
    })
    .transpose()
}

fn attachment_from_json(text: Option<String>) -> Result<Option<MessageAttachment>, StoreError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("attachment: {e}")))
    })
    .transpose()
}

#[cfg(test)]
pub(crate) mod contract;
