//! Wire types shared by the transports: request payloads (schema-checked) and reply shapes.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::chat::error::ChatError;
use crate::chat::model::{
    Attachment, Change, Conversation, ConversationKind, ConversationSummary, Member, Message,
    MessageKind, UserId, UserStatus,
};

/// Decodes a request payload, refusing unknown fields and wrong types with a message that names
/// the problem.
pub fn parse<T: DeserializeOwned>(event: &str, payload: Value) -> Result<T, ChatError> {
    serde_json::from_value(payload)
        .map_err(|e| ChatError::invalid(format!("invalid {event} payload: {}", redact(&e))))
}

/// A client event's payload, parsed by its schema: what `dispatch` parses for each event, in one
/// call (the fuzz targets use it).
#[derive(Debug)]
pub enum Request {
    Conversation(ConversationRequest),
    SendMessage(SendMessageRequest),
    MarkRead(MarkReadRequest),
    History(HistoryRequest),
    Sync(SyncRequest),
    Presence(PresenceRequest),
    RefreshToken(RefreshTokenRequest),
    UploadAttachment(UploadAttachmentRequest),
    EditMessage(EditMessageRequest),
    DeleteMessage(DeleteMessageRequest),
    React(ReactRequest),
    MessagesReceived(MarkReadRequest),
}

pub fn parse_request(event: &str, payload: Value) -> Result<Request, ChatError> {
    Ok(match event {
        "join_conversation" | "leave_conversation" | "typing_start" | "typing_stop" => {
            Request::Conversation(parse(event, payload)?)
        }
        "send_message" => Request::SendMessage(parse(event, payload)?),
        "mark_read" => Request::MarkRead(parse(event, payload)?),
        "history" => Request::History(parse(event, payload)?),
        "sync" => Request::Sync(parse(event, payload)?),
        "presence" => Request::Presence(parse(event, payload)?),
        "refresh_token" => Request::RefreshToken(parse(event, payload)?),
        "upload_attachment" => Request::UploadAttachment(parse(event, payload)?),
        "edit_message" => Request::EditMessage(parse(event, payload)?),
        "delete_message" => Request::DeleteMessage(parse(event, payload)?),
        "react" => Request::React(parse(event, payload)?),
        "messages_received" => Request::MessagesReceived(parse(event, payload)?),
        _ => return Err(ChatError::invalid("unknown event")),
    })
}

/// Longest quoted client text a parse error may repeat: field names and enum variants fit,
/// a token (or any large fragment of one) does not.
const MAX_ECHOED_CHARS: usize = 24;
/// Longest redacted message: quotes nested in the client's own text (backticks in a field name)
/// can split it into short pieces that each pass; the whole is cut here.
const MAX_REDACTED_CHARS: usize = 240;

/// A serde error's message without the client's own long values: serde quotes what it could
/// not accept (`invalid type: string "eyJ…"`), and that may be a token sent in the wrong place.
/// Longer quoted text becomes `"…(N characters)"`, so the message still names the problem.
pub fn redact(e: &dyn std::fmt::Display) -> String {
    let out = redact_long_words(&redact_quotes(&e.to_string()));
    match out.char_indices().nth(MAX_REDACTED_CHARS) {
        Some((cut, _)) => format!("{}…", &out[..cut]),
        None => out,
    }
}

/// Longest run without a space a parse error may keep. serde's own words are short; a run
/// longer than this is the client's text (a field name with a backtick in it ends serde's
/// quoting early, so quote-based redaction alone is not enough: found by fuzzing).
const MAX_WORD_CHARS: usize = 32;

fn redact_long_words(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let n = word.chars().count();
        if n > MAX_WORD_CHARS {
            out.push_str(&format!("…({n} characters)"));
        } else {
            out.push_str(word);
        }
    }
    out
}

fn redact_quotes(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(256));
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '"' && c != '`' {
            continue;
        }
        // serde Debug-quotes strings (`"a\"b"`, escapes included) and backticks names as
        // they are: read to the matching close, honouring escapes inside double quotes.
        let mut quoted = String::new();
        let mut closed = false;
        while let Some(q) = chars.next() {
            if q == c {
                closed = true;
                break;
            }
            quoted.push(q);
            if q == '\\'
                && c == '"'
                && let Some(escaped) = chars.next()
            {
                quoted.push(escaped);
            }
        }
        let n = quoted.chars().count();
        if n > MAX_ECHOED_CHARS {
            out.push_str(&format!("…({n} characters)"));
        } else {
            out.push_str(&quoted);
        }
        if closed {
            out.push(c);
        }
    }
    out
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
    /// Optional beside an attachment (a caption).
    #[serde(default)]
    pub content: String,
    #[serde(rename = "type", default = "text_kind")]
    pub kind: MessageKind,
    pub client_msg_id: String,
    /// A `file` or `image` message's upload.
    #[serde(default)]
    pub attachment_id: Option<Uuid>,
    /// The seq of the message this one answers.
    #[serde(default)]
    pub reply_to: Option<i64>,
    /// Members mentioned.
    #[serde(default)]
    pub mentions: Vec<UserId>,
}

/// `upload_attachment {conversationId, name, contentType, data}`: `data` is the file as a
/// Socket.IO binary attachment (`socket.emit('upload_attachment', {…, data: buffer})`), which
/// reaches the domain as `{"base64": …}`; the whole packet is capped by the frame limit.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadAttachmentRequest {
    pub conversation_id: Uuid,
    pub name: String,
    #[serde(default)]
    pub content_type: Option<String>,
    pub data: BinaryData,
}

/// A binary attachment as the Socket.IO codec hands it over.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryData {
    pub base64: String,
}

/// `edit_message`: new content for the sender's own message `seq`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EditMessageRequest {
    pub conversation_id: Uuid,
    pub seq: i64,
    pub content: String,
    pub client_msg_id: String,
}

/// `delete_message`: the message `seq`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteMessageRequest {
    pub conversation_id: Uuid,
    pub seq: i64,
}

/// `react`: the caller's `emoji` on message `target` added (`on`) or removed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReactRequest {
    pub conversation_id: Uuid,
    pub target: i64,
    pub emoji: String,
    pub on: bool,
    #[serde(default)]
    pub client_msg_id: Option<String>,
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

/// `{attachment}`: an upload's answer, over HTTP and in the socket's ack.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentReply {
    pub attachment: Attachment,
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
    /// Change entries (`{type: message_updated|message_deleted|reaction_updated, …}`) after
    /// the cursors; with `messages`, every entry of the log, each list in seq order.
    pub changes: Vec<Change>,
    pub truncated: bool,
    /// The conversations asked for, with their `unread` and `mentions` counts.
    pub conversations: Vec<ConversationSummary>,
}

/// The ack of `edit_message`, `delete_message` and `react`: the entry committed (or committed
/// before, for a retry); `null` when a reaction was already as asked.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeReply {
    pub change: Option<Change>,
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
            (
                id,
                ChatError::invalid(format!("malformed frame: {}", redact(&e))),
            )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_problem_without_repeating_a_long_value() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        let e = parse::<RefreshTokenRequest>("refresh_token", Value::String(token.into()))
            .expect_err("a string is not the payload");
        let text = e.to_string();
        assert!(text.contains("invalid type: string"), "{text}");
        assert!(
            text.contains(&format!("({} characters)", token.len())),
            "{text}"
        );
        for part in token.split('.') {
            assert!(!text.contains(part), "{text} repeats {part}");
        }
        // A token used as a field name is not repeated either; a short unknown field is.
        let e = parse::<RefreshTokenRequest>("refresh_token", serde_json::json!({ token: 1 }))
            .expect_err("unknown field");
        assert!(!e.to_string().contains(&token[..30]), "{e}");
        let e = parse::<RefreshTokenRequest>("refresh_token", serde_json::json!({"extra": 1}))
            .expect_err("unknown field");
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
        let (_, e) = ClientFrame::decode(format!(r#"{{"type":{{"{token}":1}}}}"#).as_bytes())
            .expect_err("bad frame");
        assert!(!e.to_string().contains(&token[..30]), "{e}");
    }

    #[test]
    fn every_client_event_has_a_payload_schema() {
        for &event in crate::transport::EVENTS {
            let e = parse_request(event, Value::Null).expect_err("null is no payload");
            assert!(e.to_string().contains(event), "{event}: {e}");
        }
        assert!(matches!(
            parse_request(
                "typing_start",
                serde_json::json!({"conversationId": Uuid::nil()})
            ),
            Ok(Request::Conversation(_))
        ));
    }

    #[test]
    fn an_escaped_quote_inside_a_value_does_not_end_its_redaction() {
        // Found by the event_payload fuzz target: `"\"abc…"` once ended the quote at `\"`.
        let value = format!("\"{}", "b".repeat(40));
        let e = parse::<ConversationRequest>("typing_start", Value::String(value))
            .expect_err("a string is not the payload");
        assert!(!e.to_string().contains("bbbbbbbbbbbbbbbbbbbbbbbbb"), "{e}");
        assert!(e.to_string().contains(" characters)"), "{e}");
    }

    #[test]
    fn a_field_name_with_a_backtick_in_it_is_not_repeated() {
        // Found by the event_payload fuzz target: the backtick ended serde's quote early.
        let key = format!("conversa`tion{}", "x".repeat(40));
        let e = parse::<MarkReadRequest>("mark_read", serde_json::json!({ key.clone(): 1 }))
            .expect_err("unknown field");
        assert!(!e.to_string().contains(&"x".repeat(33)), "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn a_message_of_many_short_quotes_is_cut_as_a_whole() {
        // Found by the ws_frame fuzz target: backticks in a field name split it into pieces.
        let text = "unknown field `".to_owned() + &"ab`` ".repeat(500) + "`";
        let redacted = redact(&text);
        assert!(
            redacted.chars().count() <= MAX_REDACTED_CHARS + 1,
            "{redacted}"
        );
        assert!(redacted.ends_with('…'));
    }

    #[test]
    fn redaction_keeps_short_quotes_and_cuts_unterminated_ones() {
        assert_eq!(
            redact(&"unknown variant `video`"),
            "unknown variant `video`"
        );
        let long = "x".repeat(40);
        assert_eq!(
            redact(&format!("a \"{long}")),
            "a \"…(40 characters)".to_owned()
        );
        assert_eq!(
            redact(&format!("a `{long}` b \"ok\"")),
            "a `…(40 characters)` b \"ok\"".to_owned()
        );
    }
}
