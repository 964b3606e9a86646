//! Server-to-client events and the envelopes that carry them between nodes and to local sockets.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use uuid::Uuid;

use super::model::{
    Change, Conversation, ConversationId, Deletion, Edit, Message, Reaction, UserId,
};
use super::state::MembershipChange;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationUser {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Typing {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub user_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Read {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub seq: i64,
}

/// `message_delivered_to`: every message of the recipient's conversation up to `seq` reached
/// one of `userId`'s devices (sent to the senders of those messages, once per recipient).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveredTo {
    pub conversation_id: ConversationId,
    pub seq: i64,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationRef {
    pub conversation: Conversation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationIdRef {
    pub conversation_id: ConversationId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRef {
    pub user_id: UserId,
}

/// Every event the server pushes to clients that arises from shared state (as opposed to
/// replies to one connection), so it can cross the bus between gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "a new message is the common event: boxing it would add an allocation to every send"
)]
pub enum Event {
    NewMessage(Message),
    UserJoined(ConversationUser),
    UserLeft(ConversationUser),
    UserTyping(Typing),
    UserStoppedTyping(ConversationUser),
    MessageRead(Read),
    ConversationAdded(ConversationRef),
    ConversationRemoved(ConversationIdRef),
    ConversationCreated(ConversationRef),
    UserOnline(UserRef),
    UserOffline(UserRef),
    MessageUpdated(Edit),
    MessageDeleted(Deletion),
    ReactionUpdated(Reaction),
    MessageDeliveredTo(DeliveredTo),
}

impl From<Change> for Event {
    fn from(change: Change) -> Self {
        match change {
            Change::MessageUpdated(e) => Self::MessageUpdated(e),
            Change::MessageDeleted(d) => Self::MessageDeleted(d),
            Change::ReactionUpdated(r) => Self::ReactionUpdated(r),
        }
    }
}

macro_rules! encode_event {
    ($self:ident, $($variant:ident => $name:literal),* $(,)?) => {
        match $self {
            $(Event::$variant(p) => ($name, serde_json::value::to_raw_value(p)),)*
        }
    };
}

impl Event {
    /// The wire event name and its payload, serialised once for every recipient.
    pub fn encode(&self) -> Outgoing {
        let (name, payload) = encode_event!(self,
            NewMessage => "new_message",
            UserJoined => "user_joined",
            UserLeft => "user_left",
            UserTyping => "user_typing",
            UserStoppedTyping => "user_stopped_typing",
            MessageRead => "message_read",
            ConversationAdded => "conversation_added",
            ConversationRemoved => "conversation_removed",
            ConversationCreated => "conversation_created",
            UserOnline => "user_online",
            UserOffline => "user_offline",
            MessageUpdated => "message_updated",
            MessageDeleted => "message_deleted",
            ReactionUpdated => "reaction_updated",
            MessageDeliveredTo => "message_delivered_to",
        );
        Outgoing {
            name,
            payload: payload.expect("event payloads are plain structs that always serialise"),
            wire: Default::default(),
            committed_at_us: None,
            message: self.log_position(),
        }
    }

    /// For an entry of a conversation's log (a message or a change to one): its conversation
    /// and seq. The resume gate and the node's last-seq cache go by it.
    pub fn log_position(&self) -> Option<(ConversationId, i64)> {
        match self {
            Event::NewMessage(m) => Some((m.conversation_id, m.seq)),
            Event::MessageUpdated(e) => Some((e.conversation_id, e.seq)),
            Event::MessageDeleted(d) => Some((d.conversation_id, d.seq)),
            Event::ReactionUpdated(r) => Some((r.conversation_id, r.seq)),
            _ => None,
        }
    }
}

/// How many wire encodings of one event are cached: the `/ws` JSON envelope and the Socket.IO
/// packets of its two namespaces.
pub const WIRE_ENCODINGS: usize = 3;
/// The slot of the `/ws` JSON envelope.
pub const JSON_ENVELOPE: usize = 0;

/// An event ready to be written to sockets: its name and its JSON payload, encoded once.
#[derive(Debug)]
pub struct Outgoing {
    pub name: &'static str,
    pub payload: Box<RawValue>,
    /// The event in each wire encoding a transport asked for (slot [`JSON_ENVELOPE`] is
    /// `{"type":name,"payload":…}`), built on first use and then shared by every recipient.
    wire: [OnceLock<Bytes>; WIRE_ENCODINGS],
    /// For a message's broadcast: when it was committed (Unix µs), to time its delivery.
    pub committed_at_us: Option<i64>,
    /// For an entry of the log (message or change): its conversation and seq, so a resume
    /// drops the live copy of an entry it has just replayed.
    pub message: Option<(ConversationId, i64)>,
}

impl Outgoing {
    /// An ad-hoc event for a single connection (acks' companions, errors, drain notices).
    pub fn new(name: &'static str, payload: &impl Serialize) -> Arc<Self> {
        Arc::new(Self {
            name,
            payload: serde_json::value::to_raw_value(payload)
                .expect("outgoing payloads are plain structs that always serialise"),
            wire: Default::default(),
            committed_at_us: None,
            message: None,
        })
    }

    /// The event as one JSON object `{"type":name,"payload":…}`, the shape plain-WebSocket
    /// clients read. Built from the already-encoded payload the first time it is asked for, so a
    /// broadcast to N connections costs one buffer, not N.
    pub fn envelope(&self) -> Bytes {
        self.encoded(JSON_ENVELOPE, Self::build_envelope)
    }

    /// Builds `{"type":name,"payload":…}` (uncached: the encoder of the envelope's slot).
    pub fn build_envelope(&self) -> Bytes {
        let payload = self.payload.get();
        let mut buf = Vec::with_capacity(self.name.len() + payload.len() + 24);
        buf.extend_from_slice(b"{\"type\":\"");
        // Event names are `snake_case` literals: nothing to escape.
        buf.extend_from_slice(self.name.as_bytes());
        buf.extend_from_slice(b"\",\"payload\":");
        buf.extend_from_slice(payload.as_bytes());
        buf.push(b'}');
        Bytes::from(buf)
    }

    /// The event in the wire encoding of `slot` (below [`WIRE_ENCODINGS`]), built by `encode` the
    /// first time any recipient asks for it and shared by the rest: one buffer per encoding.
    pub fn encoded(&self, slot: usize, encode: impl FnOnce(&Self) -> Bytes) -> Bytes {
        match self.wire.get(slot) {
            Some(cell) => cell.get_or_init(|| encode(self)).clone(),
            None => encode(self),
        }
    }
}

/// Who on which node should receive an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Route {
    /// Connections that joined the conversation, plus every connection of `also_users`.
    Conversation {
        id: ConversationId,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        also_users: Vec<UserId>,
    },
    /// Every connection of these users.
    Users { ids: Vec<UserId> },
    /// Agents' connections on the `/department` namespace for this department.
    Department { id: String },
}

/// What a Bus carries: an event, where it goes, and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub id: Uuid,
    pub origin: String,
    pub route: Route,
    pub event: Event,
    /// For a committed message: its commit time in Unix microseconds, so every node can time the
    /// delivery (commit → socket write). Absent from envelopes of older gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_at_us: Option<i64>,
    /// The membership change this event announces, for every node's conversation cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipChange>,
}

/// Subscription keys of a bus: a node receives envelopes whose route touches a key it holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Conversation(ConversationId),
    User(UserId),
    Department(String),
}

impl Topic {
    /// The key as a string, e.g. a RabbitMQ routing key or a Redis channel suffix.
    pub fn key(&self) -> String {
        match self {
            Self::Conversation(id) => format!("conv.{id}"),
            Self::User(id) => format!("user.{id}"),
            Self::Department(id) => format!("dept.{id}"),
        }
    }
}

impl Route {
    /// The topics a node must hold to receive this route.
    pub fn topics(&self) -> Vec<Topic> {
        match self {
            Self::Conversation { id, also_users } => std::iter::once(Topic::Conversation(*id))
                .chain(also_users.iter().cloned().map(Topic::User))
                .collect(),
            Self::Users { ids } => ids.iter().cloned().map(Topic::User).collect(),
            Self::Department { id } => vec![Topic::Department(id.clone())],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_wraps_the_encoded_payload_once_and_shares_the_buffer() {
        let out = Outgoing::new("user_left", &serde_json::json!({"userId": "a\"b"}));
        let first = out.envelope();
        let parsed: serde_json::Value = serde_json::from_slice(&first).expect("valid JSON");
        assert_eq!(
            parsed,
            serde_json::json!({"type": "user_left", "payload": {"userId": "a\"b"}})
        );
        let second = out.envelope();
        assert_eq!(
            first.as_ptr(),
            second.as_ptr(),
            "one buffer for every recipient"
        );
    }
}
