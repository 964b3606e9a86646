//! Wire types shared by the transports: request payloads (schema-checked) and reply shapes.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::chat::error::ChatError;
use crate::chat::model::{
    Conversation, ConversationKind, ConversationSummary, Member, Message, MessageKind, UserId,
    UserStatus,
};

/// Decodes a request payload, refusing unknown fields and wrong types with a message that names
/// the problem.
pub fn parse<T: DeserializeOwned>(event: &str, payload: Value) -> Result<T, ChatError> {
    serde_json::from_value(payload)
        .map_err(|e| ChatError::invalid(format!("invalid {event} payload: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConversationRequest {
    pub conversation_id: Uuid,
}

/// `join_conversation`: the member list comes back only with `members: true`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    pub conversation_id: Uuid,
    #[serde(default)]
    pub members: bool,
}

/// Resume cursors as a handshake carries them: `{"<conversationId>": lastSeq, …}`.
pub fn parse_cursors(value: &serde_json::Value) -> Result<crate::chat::Cursors, ChatError> {
    let map: std::collections::HashMap<Uuid, i64> =
        serde_json::from_value(value.clone()).map_err(|e| {
            ChatError::invalid(format!(
                "cursors must be an object of conversationId to lastSeq: {e}"
            ))
        })?;
    let cursors: crate::chat::Cursors = map.into_iter().collect();
    crate::chat::resume_check(&cursors)?;
    Ok(cursors)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessageRequest {
    pub conversation_id: Uuid,
    pub content: String,
    #[serde(rename = "type", default = "text_kind")]
    pub kind: MessageKind,
    pub client_msg_id: String,
}

fn text_kind() -> MessageKind {
    MessageKind::Text
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarkReadRequest {
    pub conversation_id: Uuid,
    pub seq: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryRequest {
    pub conversation_id: Uuid,
    #[serde(default)]
    pub before_seq: Option<i64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncCursor {
    pub conversation_id: Uuid,
    pub after_seq: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncRequest {
    pub conversations: Vec<SyncCursor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PresenceRequest {
    pub user_ids: Vec<UserId>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefreshTokenRequest {
    pub token: String,
}

// ---- replies ------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinReply {
    pub conversation: Conversation,
    pub last_seq: i64,
    /// Present when the request asked for it (`members: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageReply {
    pub message: Message,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagesPage {
    pub messages: Vec<Message>,
    /// Pass as `beforeSeq` to get the previous page; absent at the beginning.
    pub next_before_seq: Option<i64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncReply {
    pub messages: Vec<Message>,
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceReply {
    pub statuses: HashMap<UserId, UserStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshReply {
    pub exp: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivered {
    pub message_id: Uuid,
    pub client_msg_id: String,
    pub conversation_id: Uuid,
    pub seq: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageError {
    pub client_msg_id: Option<String>,
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitExceeded {
    pub retry_after_ms: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenExpiring {
    pub exp: i64,
    pub seconds_left: i64,
}

/// `{code, message}`, the body of every error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable: unauthorized, forbidden, not_found, invalid, too_large, conflict, rate_limited, unavailable.
    pub code: String,
    pub message: String,
}

/// `{error: {code, message}}`: a failed ack or HTTP response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

impl From<&ChatError> for ErrorReply {
    fn from(e: &ChatError) -> Self {
        Self {
            error: ErrorBody {
                code: e.code().to_owned(),
                message: e.to_string(),
            },
        }
    }
}

// ---- plain WebSocket (`/ws`) frames ---------------------------------------------------------

/// A client's request id, echoed in the `ack` or `error` that answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Number(u64),
    Text(String),
}

/// What a `/ws` client sends: `{"type": event, "id"?: request id, "payload"?: {...}}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFrame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub id: Option<RequestId>,
    #[serde(default)]
    pub payload: Value,
}

/// Longest request id accepted, so an id cannot be used to amplify replies.
pub const MAX_REQUEST_ID_CHARS: usize = 64;

impl ClientFrame {
    /// Decodes one text frame. The error keeps whatever id could be read, so even a refused
    /// request can be matched to its answer.
    pub fn decode(text: &[u8]) -> Result<Self, (Option<RequestId>, ChatError)> {
        let frame: Self = serde_json::from_slice(text).map_err(|e| {
            let id = serde_json::from_slice::<Value>(text)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .and_then(|v| serde_json::from_value::<RequestId>(v).ok())
                .filter(RequestId::is_acceptable);
            (id, ChatError::invalid(format!("malformed frame: {e}")))
        })?;
        if let Some(id) = &frame.id
            && !id.is_acceptable()
        {
            return Err((
                None,
                ChatError::invalid(format!(
                    "a request id is a number or a string of at most {MAX_REQUEST_ID_CHARS} characters"
                )),
            ));
        }
        Ok(frame)
    }
}

impl RequestId {
    fn is_acceptable(&self) -> bool {
        match self {
            Self::Number(_) => true,
            Self::Text(t) => t.chars().count() <= MAX_REQUEST_ID_CHARS,
        }
    }
}

/// What the `/ws` transport sends: events, and `ack`/`error` answers carrying the request id.
#[derive(Debug, Serialize)]
pub struct ServerFrame<'a, T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a RequestId>,
    pub payload: T,
}

impl<'a, T: Serialize> ServerFrame<'a, T> {
    pub fn ack(id: Option<&'a RequestId>, payload: T) -> Self {
        Self {
            kind: "ack",
            id,
            payload,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("server frames are plain structs that always serialise")
    }
}

impl<'a> ServerFrame<'a, ErrorBody> {
    pub fn error(id: Option<&'a RequestId>, e: &ChatError) -> Self {
        Self {
            kind: "error",
            id,
            payload: ErrorBody {
                code: e.code().to_owned(),
                message: e.to_string(),
            },
        }
    }
}

/// The first frame on every `/ws` connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connected {
    pub connection_id: String,
    pub server_id: String,
}

/// `{"type":"auth","payload":{"token"}}`: the first frame of a client that could not put its
/// token in the URL or a header (browsers cannot set headers on a WebSocket).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    pub token: String,
    /// Resume cursors, as in [`parse_cursors`].
    #[serde(default)]
    pub cursors: Option<serde_json::Value>,
}

// ---- HTTP bodies --------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateConversationBody {
    pub kind: ConversationKind,
    #[serde(default)]
    pub title: Option<String>,
    /// Other members; the creator is always a member.
    #[serde(default)]
    pub members: Vec<UserId>,
    #[serde(default)]
    pub department_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationBody {
    pub conversation: Conversation,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationList {
    pub conversations: Vec<ConversationSummary>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddMemberBody {
    pub user_id: UserId,
}
