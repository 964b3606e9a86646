//! The domain's nouns: conversations, members, messages and the identity of a connected user.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub type ConversationId = Uuid;
pub type MessageId = Uuid;
pub type UserId = String;

/// What kind of conversation this is; decides who may join and who may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    /// Exactly two members, fixed at creation.
    Direct,
    /// Members only; members may add others.
    Group,
    /// Any authenticated user may join.
    Open,
    /// A visitor's conversation, joinable by agents of its department.
    Support,
}

impl ConversationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Group => "group",
            Self::Open => "open",
            Self::Support => "support",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => Self::Direct,
            "group" => Self::Group,
            "open" => Self::Open,
            "support" => Self::Support,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Owner,
    Member,
    Agent,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Member => "member",
            Self::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "owner" => Self::Owner,
            "member" => Self::Member,
            "agent" => Self::Agent,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    #[default]
    Text,
    File,
    Image,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::File => "file",
            Self::Image => "image",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "text" => Self::Text,
            "file" => Self::File,
            "image" => Self::Image,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    pub id: Uuid,
    pub kind: ConversationKind,
    pub title: Option<String>,
    pub department_id: Option<String>,
    pub last_seq: i64,
    pub created_at: DateTime<Utc>,
    /// Moves by one with every member added or removed (see the store). Internal: a node
    /// compares it with a send's commit to find out its cached members are behind.
    #[serde(skip)]
    #[schema(ignore)]
    pub members_version: i64,
}

/// A conversation as one member sees it in their list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationSummary {
    #[serde(flatten)]
    pub conversation: Conversation,
    pub last_read_seq: i64,
    /// Messages of others after the read watermark, deleted ones not counted.
    pub unread: i64,
    /// Of those, the ones that mention the member.
    pub mentions: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub conversation_id: Uuid,
    pub user_id: UserId,
    pub role: MemberRole,
    pub last_read_seq: i64,
    /// The member's delivery watermark (`messages_received`): every seq up to it reached one
    /// of their devices.
    #[serde(default)]
    pub last_received_seq: i64,
    pub joined_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub sender_id: UserId,
    pub sender_name: String,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    /// Absent when empty: once the message is deleted (its body is erased from the store), and on
    /// a file or image message sent without a caption.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    pub client_msg_id: String,
    pub created_at: DateTime<Utc>,
    // ---- lifecycle (edits, deletion, replies, mentions, reactions): each absent while unused,
    // so a message as first sent keeps the shape older clients know.
    /// When the last edit was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<DateTime<Utc>>,
    /// How many times the message was edited.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Box<ReplyQuote>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<UserId>,
    /// Counts per emoji, and whether the reader is among them (reads only: `history`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionCount>,
    // ---- attachments: what a `file` or `image` message carries (absent on text) ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<MessageAttachment>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The message a reply answers, quoted as it was when the reply was sent. The quote goes with
/// the quoted message's deletion (`deleted: true`, no quote).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplyQuote {
    pub seq: i64,
    pub sender_id: UserId,
    pub sender_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
}

/// How many reacted with one emoji, and whether the reader did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactionCount {
    pub emoji: String,
    pub count: i64,
    pub me: bool,
}

/// `message_updated`: an edit, an entry of the conversation's log with its own `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Edit {
    pub conversation_id: Uuid,
    pub seq: i64,
    /// The seq of the message edited.
    pub target: i64,
    pub user_id: UserId,
    /// Absent when the message was deleted since: the deletion erased it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    pub edited_at: DateTime<Utc>,
    /// The message's version after this edit (1 for the first).
    pub version: i64,
}

/// `message_deleted`: the tombstone entry; the message's body is gone from the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deletion {
    pub conversation_id: Uuid,
    pub seq: i64,
    pub target: i64,
    pub user_id: UserId,
    pub deleted_at: DateTime<Utc>,
}

/// `reaction_updated`: one user's emoji added (`on`) or removed, with the emoji's count after
/// it, so entries applied in seq order end at the current count whatever a device held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reaction {
    pub conversation_id: Uuid,
    pub seq: i64,
    pub target: i64,
    pub emoji: String,
    pub user_id: UserId,
    pub on: bool,
    pub count: i64,
    pub reacted_at: DateTime<Utc>,
}

/// A change entry of the log as `sync` returns it: the live event's payload with its name in
/// `type`, so a client applies both the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    MessageUpdated(Edit),
    MessageDeleted(Deletion),
    ReactionUpdated(Reaction),
}

impl Change {
    pub fn seq(&self) -> i64 {
        match self {
            Self::MessageUpdated(e) => e.seq,
            Self::MessageDeleted(d) => d.seq,
            Self::ReactionUpdated(r) => r.seq,
        }
    }

    pub fn conversation_id(&self) -> ConversationId {
        match self {
            Self::MessageUpdated(e) => e.conversation_id,
            Self::MessageDeleted(d) => d.conversation_id,
            Self::ReactionUpdated(r) => r.conversation_id,
        }
    }

    pub fn target(&self) -> i64 {
        match self {
            Self::MessageUpdated(e) => e.target,
            Self::MessageDeleted(d) => d.target,
            Self::ReactionUpdated(r) => r.target,
        }
    }
}

/// One entry of a conversation's log: a message, or a change to one.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "most entries of a log are messages: boxing them would allocate once more per entry"
)]
pub enum LogEntry {
    Message(Message),
    Change(Change),
}

impl LogEntry {
    pub fn seq(&self) -> i64 {
        match self {
            Self::Message(m) => m.seq,
            Self::Change(c) => c.seq(),
        }
    }

    pub fn conversation_id(&self) -> ConversationId {
        match self {
            Self::Message(m) => m.conversation_id,
            Self::Change(c) => c.conversation_id(),
        }
    }
}

/// An uploaded file as recorded in the store: its bytes are the object `sha256` of the
/// attachment store. Immutable once recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub uploader_id: UserId,
    pub name: String,
    /// As sniffed from the bytes, never as the client declared it.
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    pub created_at: DateTime<Utc>,
}

/// What a message carries of its attachment: enough to show a chip or fetch a thumbnail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageAttachment {
    pub id: Uuid,
    pub name: String,
    pub content_type: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

impl From<&Attachment> for MessageAttachment {
    fn from(a: &Attachment) -> Self {
        Self {
            id: a.id,
            name: a.name.clone(),
            content_type: a.content_type.clone(),
            size: a.size,
            width: a.width,
            height: a.height,
        }
    }
}

/// Who is on the other end of a connection or request, as proven by their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: UserId,
    pub name: String,
    pub roles: Vec<String>,
    pub departments: Vec<String>,
    /// Expiry of the credential, seconds since the Unix epoch.
    pub exp: i64,
}

impl Identity {
    pub fn is_agent(&self) -> bool {
        self.roles.iter().any(|r| r == "agent" || r == "admin")
    }

    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }

    pub fn in_department(&self, department: &str) -> bool {
        self.departments.iter().any(|d| d == department)
    }
}

/// Online state of a user as seen by `presence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Offline,
    /// Not told: the user shares no conversation with the asker.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    pub status: Status,
    pub last_seen: Option<DateTime<Utc>>,
}

/// Now, at the microsecond precision every store keeps, so a stored time reads back equal.
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_else(Utc::now)
}
