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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
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
}

/// A conversation as one member sees it in their list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationSummary {
    #[serde(flatten)]
    pub conversation: Conversation,
    pub last_read_seq: i64,
    pub unread: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub conversation_id: Uuid,
    pub user_id: UserId,
    pub role: MemberRole,
    pub last_read_seq: i64,
    pub joined_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub sender_id: UserId,
    pub sender_name: String,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    pub content: String,
    pub client_msg_id: String,
    pub created_at: DateTime<Utc>,
    // ---- attachments: what a `file` or `image` message carries (absent on text) ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<MessageAttachment>,
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
