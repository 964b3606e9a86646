//! Persistence of conversations, members and messages behind one trait, with its contract tests.

mod postgres;
mod sqlite;

use async_trait::async_trait;
use thiserror::Error;

use crate::chat::model::{
    Attachment, Change, Conversation, ConversationId, ConversationKind, ConversationSummary,
    Member, MemberRole, Message, MessageAttachment, MessageKind, ReactionCount, ReplyQuote, UserId,
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

/// The conversations of the members `filter` selects (alias `m`), each with its member's read
/// watermark and unread and mention counts, newest activity first for each member; the same
/// SQL on SQLite and Postgres, `filter` in the store's placeholders.
pub(super) fn summaries_sql(filter: &str) -> String {
    format!(
        "SELECT m.user_id, c.id, c.kind, c.title, c.department_id, c.last_seq, c.created_at, c.members_version, m.last_read_seq, \
         (SELECT COUNT(*) FROM messages x WHERE x.conversation_id = m.conversation_id \
          AND x.seq > m.last_read_seq AND x.sender_id <> m.user_id AND x.deleted_at IS NULL) AS unread, \
         (SELECT COUNT(*) FROM message_mentions n WHERE n.conversation_id = m.conversation_id \
          AND n.user_id = m.user_id AND n.seq > m.last_read_seq) AS mentions \
         FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id \
         WHERE {filter} ORDER BY m.user_id, c.last_seq DESC, c.created_at DESC"
    )
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
    /// The quoted message, when this is a reply.
    pub reply_to: Option<ReplyQuote>,
    /// Members mentioned (checked by the domain); each but the sender counts it.
    pub mentions: Vec<UserId>,
}

/// An edit asked for: only the sender's own message, only while it is not deleted.
#[derive(Debug, Clone)]
pub struct NewEdit {
    pub conversation_id: ConversationId,
    pub target: i64,
    pub actor_id: UserId,
    pub client_msg_id: String,
    pub content: String,
}

/// A deletion asked for (the domain has checked that the actor may).
#[derive(Debug, Clone)]
pub struct NewDeletion {
    pub conversation_id: ConversationId,
    pub target: i64,
    pub actor_id: UserId,
}

/// A reaction added (`on`) or removed.
#[derive(Debug, Clone)]
pub struct NewReaction {
    pub conversation_id: ConversationId,
    pub target: i64,
    pub actor_id: UserId,
    pub emoji: String,
    pub on: bool,
    /// Idempotency key; without one a reaction is idempotent by its state alone.
    pub client_msg_id: Option<String>,
    /// Most distinct emoji one message may carry.
    pub max_distinct: usize,
}

/// What a change to a message came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Changed {
    /// Committed now, with the next `seq` of its conversation; beside it, the conversation's
    /// `members_version` that the commit saw.
    New(Change, i64),
    /// Committed before (same idempotency key, or the message was already deleted).
    Existing(Change),
    /// Nothing to change (a reaction already in the state asked for); no entry written.
    Unchanged,
    /// Refused; nothing written and no seq used.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No message has that seq in the conversation (it may be a change entry's seq).
    NoSuchMessage,
    /// The message was deleted.
    Deleted,
    /// Only the sender may do this.
    NotSender,
    /// The message carries as many distinct emoji as it may.
    TooManyReactions,
    /// The idempotency key was used by another kind of change or another target.
    KeyReused,
}
/// The result of an idempotent insert.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// Committed now with the next `seq` of its conversation; beside it, the conversation's
    /// `members_version` that the commit saw.
    New(Message, i64),
    /// The same `(conversation_id, sender_id, client_msg_id)` was committed before; this is that
    /// message.
    Existing(Message),
}

impl Inserted {
    pub fn message(&self) -> &Message {
        match self {
            Self::New(m, _) | Self::Existing(m) => m,
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
    /// Adds a member: the conversation's `members_version` after it, or `None` if they already
    /// were one (their role is kept, the version does not move).
    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<Option<i64>, StoreError>;
    /// Removes a member: the conversation's `members_version` after it, or `None` if they were
    /// not one.
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<i64>, StoreError>;
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

    // ---- the message lifecycle: change entries share the conversation's gap-free seq -------

    /// The ids of the user's conversations (cheaper than [`conversations_of`](Self::conversations_of),
    /// which counts).
    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError>;
    /// [`conversations_of`](Self::conversations_of) of several users at once, as `(user,
    /// summary)` pairs, each user's in the order `conversations_of` gives them: one round trip
    /// where the store can.
    async fn conversations_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationSummary)>, StoreError> {
        let mut pairs = Vec::new();
        for user in users {
            let of = self.conversations_of(user).await?;
            pairs.extend(of.into_iter().map(|s| (user.clone(), s)));
        }
        Ok(pairs)
    }
    /// [`conversation_ids_of`](Self::conversation_ids_of) of several users at once, as
    /// `(user, conversation)` pairs in no particular order: one round trip where the store can.
    async fn conversation_ids_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationId)>, StoreError> {
        let mut pairs = Vec::new();
        for user in users {
            let of = self.conversation_ids_of(user).await?;
            pairs.extend(of.into_iter().map(|id| (user.clone(), id)));
        }
        Ok(pairs)
    }
    /// The message with this seq (as it is now), if that seq is a message's.
    async fn message_at(
        &self,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<Message>, StoreError>;
    /// Replaces the content of the actor's own message and logs an `edit` entry, in one
    /// transaction; a retry of the same `client_msg_id` returns the entry committed before.
    async fn edit_message(&self, edit: NewEdit) -> Result<Changed, StoreError>;
    /// Erases the message's body (and the content of its earlier edits, and quotes of it in
    /// replies) and logs a `delete` entry, in one transaction. Deleting a deleted message
    /// returns its tombstone.
    async fn delete_message(&self, deletion: NewDeletion) -> Result<Changed, StoreError>;
    /// Adds or removes the actor's reaction and logs a `reaction` entry with the emoji's count
    /// after it, in one transaction.
    async fn react(&self, reaction: NewReaction) -> Result<Changed, StoreError>;
    /// For each `(conversation, after_seq)`, up to `limit` of its change entries with `seq >
    /// after_seq`, oldest first, conversation after conversation in the order asked. Entries
    /// of a deleted message come without content.
    async fn changes_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Change>, StoreError>;
    /// Reaction counts of these messages as `viewer` sees them: `(seq, count)`, by seq then
    /// emoji.
    async fn reactions_of(
        &self,
        conversation: ConversationId,
        seqs: &[i64],
        viewer: &str,
    ) -> Result<Vec<(i64, ReactionCount)>, StoreError>;
    /// Raises the member's delivery watermark to `seq`. `None` if not a member; else, for each
    /// other sender with messages in the range the watermark rose over, that sender and their
    /// last seq in it (empty when it did not rise): the receipts to send, each once.
    async fn mark_received(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<Vec<(UserId, i64)>>, StoreError>;
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

/// A reply's quote from its stored columns: `deleted` once the quoted message's deletion
/// erased the quote.
pub(crate) fn reply_from(
    seq: Option<i64>,
    sender_id: Option<String>,
    sender_name: Option<String>,
    quote: Option<String>,
) -> Option<ReplyQuote> {
    let seq = seq?;
    Some(ReplyQuote {
        seq,
        sender_id: sender_id.unwrap_or_default(),
        sender_name: sender_name.unwrap_or_default(),
        deleted: quote.is_none(),
        quote,
    })
}

/// Mentions as stored: a JSON array of user ids, NULL for none.
pub(crate) fn mentions_from(stored: Option<String>) -> Result<Vec<UserId>, StoreError> {
    match stored {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(&text)
            .map_err(|_| StoreError::Corrupt(format!("mentions: {text:?}"))),
    }
}

/// Mentions to store (NULL for none).
pub(crate) fn mentions_to(mentions: &[UserId]) -> Option<String> {
    (!mentions.is_empty())
        .then(|| serde_json::to_string(mentions).expect("a list of strings always serialises"))
}

#[cfg(test)]
pub(crate) mod contract;
