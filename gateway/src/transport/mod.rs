//! Transports: wire frames in, domain calls, domain events out. Shared by Socket.IO and HTTP.

pub mod connection;
pub mod engineio;
pub mod expiry;
pub mod http;
pub mod origin;
pub mod protocol;
pub mod web;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::chat::attachments::{Attachments, Upload};
use crate::chat::error::ChatError;
use crate::chat::event::Outgoing;
use crate::chat::hub::{ConnId, Outbound};
use crate::chat::model::Identity;
use crate::chat::{ChangeRequest, ChatService, Send};
use crate::config::WsCompression;
use crate::limits::LimitClass;
use crate::telemetry::{Transport, audit};
use protocol::{
    AttachmentReply, ChangeReply, ConversationRequest, DeleteMessageRequest, Delivered,
    EditMessageRequest, HistoryRequest, JoinReply, JoinRequest, MarkReadRequest, MessageError,
    MessageReply, MessagesPage, PresenceReply, PresenceRequest, RateLimitExceeded, ReactRequest,
    RefreshReply, RefreshTokenRequest, SendMessageRequest, SyncReply, SyncRequest,
    UploadAttachmentRequest, parse,
};

/// Transport-level settings, from configuration.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// Exact `Origin` values allowed on upgrades and polling; requests without `Origin`
    /// (non-browser clients) pass.
    pub allowed_origins: Vec<String>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    pub max_frame_bytes: usize,
    /// Per-connection queue of outgoing packets; full past this → the connection is closed.
    pub send_queue: usize,
    /// `token_expiring` is sent this long before `exp`.
    pub token_warning: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// `/ws`: how long a client without a token in the URL or header has to send `auth`.
    pub auth_timeout: Duration,
    /// `/ws`: how long frames may wait on a socket the client does not read before the
    /// connection is closed.
    pub send_deadline: Duration,
    pub ws_compression: WsCompression,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            max_frame_bytes: 64 * 1024,
            send_queue: 256,
            token_warning: Duration::from_secs(60),
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            auth_timeout: Duration::from_secs(5),
            send_deadline: Duration::from_secs(10),
            ws_compression: WsCompression::Deflate,
        }
    }
}

/// Everything a transport needs, shared by all connections.
pub struct Gateway {
    pub service: Arc<ChatService>,
    pub auth: Arc<Authenticator>,
    pub settings: TransportSettings,
    pub drain: Arc<crate::drain::Drain>,
    /// Every live session's token expiry, on one timer.
    pub expiries: Arc<expiry::Expiries>,
    pub attachments: Arc<Attachments>,
}

/// The client's address. From a trusted proxy, the rightmost `X-Forwarded-For` hop that is not
/// itself a trusted proxy: proxies (nginx, ALB, Envoy) append the address they saw, so every
/// hop left of the last untrusted one is the client's own claim. Headers repeated are read in
/// order, as one list. A hop that is not an address ends the walk: the peer is used.
pub fn client_address(peer: Option<SocketAddr>, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    let peer_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
    if !trusted.contains(&peer_ip) {
        return peer_ip;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer_ip;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            return peer_ip;
        };
        client = ip;
        if !trusted.contains(&ip) {
            break;
        }
    }
    client
}

/// One authenticated connection: who it is (renewable by `refresh_token`) and how to reach it.
pub struct Session {
    pub conn: ConnId,
    pub transport: Transport,
    identity: RwLock<Arc<Identity>>,
    /// The token's expiry (Unix seconds), watched by the gateway's [`expiry::Expiries`]: its
    /// entry is due at `due` (Unix ms, 0 when not watched), and `token_expiring` was sent for
    /// the `exp` in `warned_for`. Atomics, so an idle connection keeps no timer of its own.
    exp: AtomicI64,
    due: AtomicI64,
    warned_for: AtomicI64,
    pub out: Arc<dyn Outbound>,
}

impl Session {
    pub fn new(
        conn: ConnId,
        identity: Arc<Identity>,
        out: Arc<dyn Outbound>,
        transport: Transport,
    ) -> Arc<Self> {
        Arc::new(Self {
            conn,
            transport,
            exp: AtomicI64::new(identity.exp),
            due: AtomicI64::new(0),
            warned_for: AtomicI64::new(0),
            identity: RwLock::new(identity),
            out,
        })
    }

    pub fn identity(&self) -> Arc<Identity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A `refresh_token`: the new identity, and its expiry watched from now on.
    fn renew(self: &Arc<Self>, identity: Identity, expiries: &Arc<expiry::Expiries>) {
        let exp = identity.exp;
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
        self.exp.store(exp, Ordering::Release);
        expiries.watch(self);
    }
}

/// Events a client may send on the main namespace.
pub const EVENTS: &[&str] = &[
    "join_conversation",
    "leave_conversation",
    "send_message",
    "typing_start",
    "typing_stop",
    "mark_read",
    "history",
    "sync",
    "presence",
    "refresh_token",
    "upload_attachment",
    "edit_message",
    "delete_message",
    "react",
    "messages_received",
];

/// The static name of a client event, for metric labels and spans: `other` for unknown names,
/// which are the client's own text.
pub fn event_label(event: &str) -> &'static str {
    EVENTS
        .iter()
        .copied()
        .find(|&e| e == event)
        .unwrap_or("other")
}

/// A request's answer, serialised once: the transports put these bytes into their frames as
/// they are (a reply built as a `Value` tree first cost a fifth of the server's core in a
/// reconnect storm's sync answers: an allocation per field, then a second pass to text).
pub type Reply = Box<serde_json::value::RawValue>;

fn reply(v: impl serde::Serialize) -> Reply {
    serde_json::value::to_raw_value(&v).expect("replies are plain structs that always serialise")
}

/// The answer of a request that returns nothing: `{}`.
fn empty_reply() -> Reply {
    serde_json::value::RawValue::from_string("{}".to_owned()).expect("{} is JSON")
}

/// Runs one client request and returns its ack payload. Companion events (`message_delivered`,
/// `message_error`, `rate_limit_exceeded`) go straight to the session.
pub async fn dispatch(
    gw: &Gateway,
    session: &Arc<Session>,
    event: &str,
    payload: Value,
) -> Result<Reply, ChatError> {
    let label = event_label(event);
    if label == "send_message" {
        gw.service.metrics().message_received(session.transport);
    }
    // The root of a request's trace (for `send_message`: receive → persist → publish).
    let span = tracing::info_span!(
        "request",
        event = label,
        transport = session.transport.as_str(),
        conn = session.conn,
    );
    let result = run(gw, session, event, payload).instrument(span).await;
    if let Err(ChatError::RateLimited { retry_after_ms }) = &result {
        ChatService::direct(
            session.out.as_ref(),
            &Outgoing::new(
                "rate_limit_exceeded",
                &RateLimitExceeded {
                    retry_after_ms: *retry_after_ms,
                },
            ),
        );
    }
    result
}

async fn run(
    gw: &Gateway,
    session: &Arc<Session>,
    event: &str,
    payload: Value,
) -> Result<Reply, ChatError> {
    let service = &gw.service;
    service
        .throttle(
            LimitClass::ConnectionEvents,
            &format!("conn:{}", session.conn),
        )
        .await?;
    let who = session.identity();
    match event {
        "join_conversation" => {
            let req: JoinRequest = parse(event, payload)?;
            let joined = service
                .join_with(session.conn, &who, req.conversation_id, req.members)
                .await?;
            Ok(reply(JoinReply {
                conversation: joined.conversation,
                last_seq: joined.last_seq,
                members: joined.members,
            }))
        }
        "leave_conversation" => {
            let req: ConversationRequest = parse(event, payload)?;
            service
                .leave(session.conn, &who, req.conversation_id)
                .await?;
            Ok(empty_reply())
        }
        "send_message" => send_message(gw, session, &who, payload).await,
        "typing_start" => {
            let req: ConversationRequest = parse(event, payload)?;
            service.typing_start(&who, req.conversation_id).await?;
            Ok(empty_reply())
        }
        "typing_stop" => {
            let req: ConversationRequest = parse(event, payload)?;
            service.typing_stop(&who, req.conversation_id).await?;
            Ok(empty_reply())
        }
        "mark_read" => {
            let req: MarkReadRequest = parse(event, payload)?;
            service
                .mark_read(&who, req.conversation_id, req.seq)
                .await?;
            Ok(empty_reply())
        }
        "history" => {
            let req: HistoryRequest = parse(event, payload)?;
            let page = service
                .history(&who, req.conversation_id, req.before_seq, req.limit)
                .await?;
            Ok(reply(MessagesPage {
                messages: page.messages,
                next_before_seq: page.next_before_seq,
            }))
        }
        "sync" => {
            let req: SyncRequest = parse(event, payload)?;
            let cursors = req
                .conversations
                .into_iter()
                .map(|c| (c.conversation_id, c.after_seq))
                .collect();
            let synced = service.sync(&who, cursors).await?;
            Ok(reply(SyncReply {
                messages: synced.messages,
                changes: synced.changes,
                truncated: synced.truncated,
                conversations: synced.counts,
            }))
        }
        "edit_message" => {
            let req: EditMessageRequest = parse(event, payload)?;
            let change = ChangeRequest::Edit {
                conversation_id: req.conversation_id,
                target: req.seq,
                content: req.content,
                client_msg_id: req.client_msg_id,
            };
            let change = service.change_detached(&who, change).await?;
            Ok(reply(ChangeReply { change }))
        }
        "delete_message" => {
            let req: DeleteMessageRequest = parse(event, payload)?;
            let change = ChangeRequest::Delete {
                conversation_id: req.conversation_id,
                target: req.seq,
            };
            let change = service.change_detached(&who, change).await?;
            Ok(reply(ChangeReply { change }))
        }
        "react" => {
            let req: ReactRequest = parse(event, payload)?;
            let change = ChangeRequest::React {
                conversation_id: req.conversation_id,
                target: req.target,
                emoji: req.emoji,
                on: req.on,
                client_msg_id: req.client_msg_id,
            };
            let change = service.change_detached(&who, change).await?;
            Ok(reply(ChangeReply { change }))
        }
        "messages_received" => {
            let req: MarkReadRequest = parse(event, payload)?;
            service
                .mark_received(&who, req.conversation_id, req.seq)
                .await?;
            Ok(empty_reply())
        }
        "presence" => {
            let req: PresenceRequest = parse(event, payload)?;
            let statuses = service.presence(&who, req.user_ids).await?;
            Ok(reply(PresenceReply { statuses }))
        }
        "refresh_token" => {
            let req: RefreshTokenRequest = parse(event, payload)?;
            let renewed = gw.auth.verify(&req.token).map_err(|e| {
                gw.service
                    .metrics()
                    .auth_failed(session.transport, e.reason());
                audit::auth_failed(session.transport, e.reason(), &e, None);
                ChatError::Unauthorized(format!("refresh_token refused: {e}"))
            })?;
            if renewed.user_id != who.user_id {
                return Err(ChatError::forbidden("the new token is for another user"));
            }
            let exp = renewed.exp;
            session.renew(renewed, &gw.expiries);
            Ok(reply(RefreshReply { exp }))
        }
        "upload_attachment" => upload_attachment(gw, session, &who, payload).await,
        other => Err(ChatError::invalid(format!(
            "unknown event {:?}; expected one of {}",
            other.chars().take(64).collect::<String>(),
            EVENTS.join(", ")
        ))),
    }
}

/// `upload_attachment` over Socket.IO, whose binary attachments carry the bytes. `/ws` has no
/// binary events (its binary frames are refused): there the answer names the HTTP upload.
async fn upload_attachment(
    gw: &Gateway,
    session: &Session,
    who: &Identity,
    payload: Value,
) -> Result<Reply, ChatError> {
    if session.transport != Transport::SocketIo {
        return Err(ChatError::invalid(
            "upload_attachment needs Socket.IO binary attachments; over /ws upload with HTTP: POST /api/conversations/{id}/attachments?name=… with the file as the body",
        ));
    }
    let req: UploadAttachmentRequest = parse("upload_attachment", payload)?;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(req.data.base64.as_bytes())
        .map_err(|_| ChatError::invalid("upload_attachment: data is not a binary attachment"))?;
    let len = bytes.len() as u64;
    let body: crate::attachments::ByteStream = Box::pin(futures::stream::once(async move {
        Ok(bytes::Bytes::from(bytes))
    }));
    let attachment = gw
        .attachments
        .upload(
            who,
            Upload {
                conversation_id: req.conversation_id,
                name: req.name,
                declared_type: req.content_type,
                declared_len: Some(len),
            },
            body,
        )
        .await?;
    Ok(reply(AttachmentReply { attachment }))
}

async fn send_message(
    gw: &Gateway,
    session: &Session,
    who: &Identity,
    payload: Value,
) -> Result<Reply, ChatError> {
    let client_msg_id = payload
        .get("clientMsgId")
        .and_then(Value::as_str)
        .map(|s| s.chars().take(100).collect::<String>());
    let result = async {
        let req: SendMessageRequest = parse("send_message", payload)?;
        gw.service
            .send_detached(
                who,
                Send {
                    conversation_id: req.conversation_id,
                    kind: req.kind,
                    content: req.content,
                    client_msg_id: req.client_msg_id,
                    attachment_id: req.attachment_id,
                    reply_to: req.reply_to,
                    mentions: req.mentions,
                },
            )
            .await
    }
    .await;
    match result {
        Ok(sent) => {
            let m = &sent.message;
            ChatService::direct(
                session.out.as_ref(),
                &Outgoing::new(
                    "message_delivered",
                    &Delivered {
                        message_id: m.id,
                        client_msg_id: m.client_msg_id.clone(),
                        conversation_id: m.conversation_id,
                        seq: m.seq,
                    },
                ),
            );
            Ok(reply(MessageReply {
                message: sent.message,
            }))
        }
        Err(e) => {
            ChatService::direct(
                session.out.as_ref(),
                &Outgoing::new(
                    "message_error",
                    &MessageError {
                        client_msg_id,
                        code: e.code(),
                        message: e.to_string(),
                    },
                ),
            );
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.7, 10.0.0.1".parse().expect("header"),
        );
        let proxy: SocketAddr = "10.1.1.1:5000".parse().expect("addr");
        let stranger: SocketAddr = "198.51.100.2:5000".parse().expect("addr");
        let trusted = [proxy.ip()];
        assert_eq!(
            client_address(Some(proxy), &headers, &trusted),
            "10.0.0.1".parse::<IpAddr>().expect("ip"),
            "the rightmost hop the trusted proxy appended"
        );
        assert_eq!(
            client_address(Some(stranger), &headers, &trusted),
            stranger.ip()
        );
        assert_eq!(
            client_address(Some(proxy), &HeaderMap::new(), &trusted),
            proxy.ip()
        );
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().expect("header"));
        }
        headers
    }

    #[test]
    fn x_forwarded_for_yields_the_rightmost_untrusted_hop_never_the_clients_own_claim() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let edge: SocketAddr = "10.0.0.2:443".parse().expect("addr");
        let inner = ip("10.0.0.3");
        let trusted = [edge.ip(), inner];
        // The client claims to be 1.2.3.4; nginx appended the address it really came from.
        let chain = xff(&["1.2.3.4, 198.51.100.9"]);
        assert_eq!(
            client_address(Some(edge), &chain, &trusted),
            ip("198.51.100.9")
        );
        // Two proxies: the inner one's hop is skipped because it is trusted.
        let chain = xff(&["1.2.3.4, 198.51.100.9, 10.0.0.3"]);
        assert_eq!(
            client_address(Some(edge), &chain, &trusted),
            ip("198.51.100.9")
        );
        // Repeated headers are one list, in order.
        let chain = xff(&["1.2.3.4", "198.51.100.9", "10.0.0.3"]);
        assert_eq!(
            client_address(Some(edge), &chain, &trusted),
            ip("198.51.100.9")
        );
        // IPv6 hops.
        let chain = xff(&["2001:db8::1"]);
        assert_eq!(
            client_address(Some(edge), &chain, &trusted),
            ip("2001:db8::1")
        );
        // Garbage where the proxy's hop should be: the peer, not a guess.
        let chain = xff(&["1.2.3.4, not-an-ip"]);
        assert_eq!(client_address(Some(edge), &chain, &trusted), edge.ip());
        // Garbage left of the real hop is never reached.
        let chain = xff(&["not-an-ip, 198.51.100.9"]);
        assert_eq!(
            client_address(Some(edge), &chain, &trusted),
            ip("198.51.100.9")
        );
        // Only trusted hops: the leftmost of them.
        let chain = xff(&["10.0.0.3"]);
        assert_eq!(client_address(Some(edge), &chain, &trusted), inner);
    }
}
