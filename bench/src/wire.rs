//! Wire framing the generator speaks: Engine.IO v4 / Socket.IO v4 text packets and `/ws` JSON frames.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Socket.IO v4 over Engine.IO v4, WebSocket transport only.
    Sio,
    /// Plain WebSocket with `{"type","id","payload"}` frames.
    Ws,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sio => "socket.io",
            Transport::Ws => "/ws",
        }
    }

    /// The upgrade's path; `/ws` carries the token in the query because a browser-like client
    /// cannot set headers on an upgrade.
    /// The upgrade path, with the resume cursors in the query for `/ws` (Socket.IO carries them
    /// in its CONNECT's `auth`, [`sio_connect`]).
    pub fn path(self, token: &str, cursors: Option<&Value>) -> String {
        match (self, cursors) {
            (Transport::Sio, _) => "/socket.io/?EIO=4&transport=websocket".into(),
            (Transport::Ws, None) => format!("/ws?token={token}"),
            (Transport::Ws, Some(c)) => {
                format!("/ws?token={token}&cursors={}", query_escape(&c.to_string()))
            }
        }
    }
}

/// What a text frame from the server means to the generator.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    /// Engine.IO ping: answer with [`PONG`].
    Ping,
    /// Engine.IO open or Socket.IO/ws connect confirmation.
    Connected,
    /// The server refused the connection (Socket.IO `44`, `/ws` error without id).
    Refused(&'a str),
    /// The reply to request `id`; `body` is the JSON of the first ack argument.
    Ack { id: u64, body: &'a str },
    /// A server-pushed event; `frame` is the whole frame, scanned lazily (hot path).
    Event { frame: &'a str },
    /// Anything else (Engine.IO noop, upgrade probes, `pong`).
    Other,
}

pub const PONG: &str = "3";

/// Socket.IO CONNECT to the main namespace with `auth: {token}`.
/// CONNECT with `auth: {token, cursors}`: a resume in the handshake.
pub fn sio_connect(token: &str, cursors: Option<&Value>) -> String {
    match cursors {
        None => format!("40{}", serde_json::json!({ "token": token })),
        Some(c) => format!("40{}", serde_json::json!({ "token": token, "cursors": c })),
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a query value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A request that expects an ack: `42N["event",payload]` or `{"type","id","payload"}`.
pub fn request(t: Transport, id: u64, event: &str, payload: &Value) -> String {
    match t {
        Transport::Sio => format!("42{id}{}", serde_json::json!([event, payload])),
        Transport::Ws => {
            serde_json::json!({ "type": event, "id": id, "payload": payload }).to_string()
        }
    }
}

/// The error an ack carries: Socket.IO `{error: {code, message}}`, `/ws` an `error` frame.
pub fn ack_error(v: &Value) -> Option<&Value> {
    v.get("error")
        .or_else(|| (v.get("type").and_then(Value::as_str) == Some("error")).then(|| &v["payload"]))
}

/// The stable code of a refused request (`rate_limited`, `unavailable`, …) from an ack body.
pub fn error_code(body: &str) -> Option<&str> {
    if !body.contains("\"error\"") {
        return None;
    }
    Some(str_field(body, "code").unwrap_or("unknown"))
}

/// Classifies one server text frame.
pub fn classify(t: Transport, frame: &str) -> Incoming<'_> {
    match t {
        Transport::Sio => classify_sio(frame),
        Transport::Ws => classify_ws(frame),
    }
}

fn classify_sio(frame: &str) -> Incoming<'_> {
    let bytes = frame.as_bytes();
    match bytes.first() {
        Some(b'2') if frame.len() == 1 => return Incoming::Ping,
        Some(b'0') => return Incoming::Other, // Engine.IO open; the client then sends 40
        Some(b'4') => {}
        _ => return Incoming::Other,
    }
    match bytes.get(1) {
        Some(b'0') => Incoming::Connected,
        Some(b'4') => Incoming::Refused(&frame[2..]),
        Some(b'2') => Incoming::Event { frame },
        Some(b'3') => {
            let rest = &frame[2..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let Ok(id) = rest[..digits].parse() else {
                return Incoming::Other;
            };
            // `43N[arg]`: strip the array brackets around the single ack argument.
            let args = &rest[digits..];
            let body = args
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(args);
            Incoming::Ack { id, body }
        }
        _ => Incoming::Other,
    }
}

fn classify_ws(frame: &str) -> Incoming<'_> {
    // Events dominate the traffic, so a cheap look at the type decides before any parsing.
    let Some(ty) = str_field(frame, "type") else {
        return Incoming::Other;
    };
    match ty {
        "ack" | "error" => {
            let Some(id) = u64_field(frame, "id") else {
                return if ty == "error" {
                    Incoming::Refused(frame)
                } else {
                    Incoming::Other
                };
            };
            // Acks are rare next to events, so a full parse to find the payload is affordable.
            let body = payload_slice(frame).unwrap_or("null");
            if ty == "error" {
                // The generator treats an error reply as an ack whose body carries `error`.
                return Incoming::Ack { id, body: frame };
            }
            Incoming::Ack { id, body }
        }
        "connected" => Incoming::Connected,
        "ping" => Incoming::Ping,
        _ => Incoming::Event { frame },
    }
}

/// The raw JSON text of `"payload":` in a `/ws` frame whose payload is the last field.
fn payload_slice(frame: &str) -> Option<&str> {
    let at = frame.find("\"payload\":")? + "\"payload\":".len();
    let rest = frame[at..].trim_end();
    let rest = rest.strip_suffix('}')?;
    // Only trust the slice when it parses; field order is the server's choice.
    serde_json::from_str::<serde::de::IgnoredAny>(rest)
        .ok()
        .map(|_| rest)
}

/// The first string value of `"key":"..."` (no escapes expected in the keys the generator reads).
pub fn str_field<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let at = s.find(&pat)? + pat.len();
    let end = s[at..].find('"')?;
    Some(&s[at..at + end])
}

/// The first unsigned integer of `"key":N`.
pub fn u64_field(s: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = s.find(&pat)? + pat.len();
    let rest = s[at..].trim_start();
    let n = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..n].parse().ok()
}

/// Messages carry their scheduled send time so any process can measure publish → receive.
pub fn stamp(unix_nanos: u128, seq: u64) -> String {
    format!("bench ~T{unix_nanos}~ #{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketio_frames_are_classified_by_their_packet_types() {
        let t = Transport::Sio;
        assert_eq!(classify(t, "2"), Incoming::Ping);
        assert_eq!(classify(t, "40{\"sid\":\"x\"}"), Incoming::Connected);
        assert_eq!(
            classify(t, "44{\"message\":\"no\"}"),
            Incoming::Refused("{\"message\":\"no\"}")
        );
        assert_eq!(
            classify(t, "4312[{\"message\":{\"seq\":3}}]"),
            Incoming::Ack {
                id: 12,
                body: "{\"message\":{\"seq\":3}}"
            }
        );
        let ev = "42[\"new_message\",{\"seq\":1}]";
        assert_eq!(classify(t, ev), Incoming::Event { frame: ev });
    }

    #[test]
    fn ws_frames_are_classified_and_ack_payloads_extracted() {
        let t = Transport::Ws;
        assert_eq!(
            classify(t, r#"{"type":"connected","payload":{"connectionId":"c"}}"#),
            Incoming::Connected
        );
        assert_eq!(
            classify(t, r#"{"type":"ack","id":7,"payload":{"lastSeq":4}}"#),
            Incoming::Ack {
                id: 7,
                body: r#"{"lastSeq":4}"#
            }
        );
        let err = r#"{"type":"error","id":8,"payload":{"code":"invalid","message":"m"}}"#;
        assert_eq!(classify(t, err), Incoming::Ack { id: 8, body: err });
        let ev = r#"{"type":"new_message","payload":{"seq":2}}"#;
        assert_eq!(classify(t, ev), Incoming::Event { frame: ev });
    }

    #[test]
    fn requests_carry_their_ack_id() {
        let p = serde_json::json!({"conversationId": "c"});
        assert_eq!(
            request(Transport::Sio, 5, "join_conversation", &p),
            r#"425["join_conversation",{"conversationId":"c"}]"#
        );
        let ws: Value = serde_json::from_str(&request(Transport::Ws, 5, "join_conversation", &p))
            .expect("valid json");
        assert_eq!(ws["id"], 5);
        assert_eq!(ws["type"], "join_conversation");
    }
}
