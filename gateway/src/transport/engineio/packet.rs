//! Engine.IO v4 and Socket.IO v5 packets: pure decoders (bytes in, a typed packet or an error
//! out) and the encoders the server needs.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::Value;

/// The Engine.IO record separator between packets of one polling payload.
pub const SEPARATOR: u8 = 0x1e;

/// Why a packet could not be read; the text names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("unknown Engine.IO packet type {0:?}")]
    EngineType(char),
    #[error("unknown Socket.IO packet type {0:?}")]
    SocketType(char),
    #[error("invalid base64 in a binary packet")]
    Base64,
    #[error("a text packet is not valid UTF-8")]
    Utf8,
    #[error("malformed Socket.IO packet: {0}")]
    Malformed(&'static str),
    #[error("invalid JSON in a Socket.IO packet: {0}")]
    Json(String),
    #[error("payload over the {0}-byte limit")]
    TooLarge(usize),
}

/// An Engine.IO packet from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnginePacket {
    /// `1`: the client closes the session.
    Close,
    /// `2` with optional data (`2probe` during an upgrade).
    Ping(String),
    /// `3` with optional data.
    Pong(String),
    /// `4`: a text message (for Socket.IO, one Socket.IO packet).
    Message(String),
    /// A binary message (a WebSocket binary frame or a polling `b<base64>` record).
    Binary(Bytes),
    /// `5`: the upgrade to WebSocket is complete.
    Upgrade,
    /// `6`.
    Noop,
}

/// Decodes one text packet.
pub fn decode_text(text: &str) -> Result<EnginePacket, PacketError> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or(PacketError::Empty)?;
    let rest = chars.as_str();
    Ok(match kind {
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping(rest.to_owned()),
        '3' => EnginePacket::Pong(rest.to_owned()),
        '4' => EnginePacket::Message(rest.to_owned()),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        other => return Err(PacketError::EngineType(other)),
    })
}

/// Decodes a polling POST body: packets separated by `\x1e`, binary ones as `b<base64>`. The
/// limit applies to the whole body and, after decoding, to their sum.
pub fn decode_payload(body: &[u8], max: usize) -> Result<Vec<EnginePacket>, PacketError> {
    if body.len() > max {
        return Err(PacketError::TooLarge(max));
    }
    let mut packets = Vec::new();
    for record in body.split(|&b| b == SEPARATOR) {
        if let Some(encoded) = record.strip_prefix(b"b") {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| PacketError::Base64)?;
            packets.push(EnginePacket::Binary(Bytes::from(bytes)));
        } else {
            let text = std::str::from_utf8(record).map_err(|_| PacketError::Utf8)?;
            packets.push(decode_text(text)?);
        }
    }
    Ok(packets)
}

/// Joins queued packets into one polling GET body.
pub fn encode_payload<'a>(packets: impl IntoIterator<Item = (&'a [u8], bool)>) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (bytes, binary)) in packets.into_iter().enumerate() {
        if i > 0 {
            body.push(SEPARATOR);
        }
        if binary {
            body.push(b'b');
            body.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .as_bytes(),
            );
        } else {
            body.extend_from_slice(bytes);
        }
    }
    body
}

/// The Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// A Socket.IO packet: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON data>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketPacket {
    pub kind: SocketKind,
    /// `/` unless the packet names another.
    pub namespace: String,
    pub id: Option<u64>,
    /// Binary attachments that follow (binary packets only).
    pub attachments: usize,
    pub data: Option<Value>,
}

/// Most binary attachments one packet may announce.
pub const MAX_ATTACHMENTS: usize = 16;

/// Decodes one Socket.IO packet (the text of an Engine.IO message).
pub fn decode_socket(text: &str) -> Result<SocketPacket, PacketError> {
    let mut rest = text;
    let kind = match rest.chars().next().ok_or(PacketError::Empty)? {
        '0' => SocketKind::Connect,
        '1' => SocketKind::Disconnect,
        '2' => SocketKind::Event,
        '3' => SocketKind::Ack,
        '4' => SocketKind::ConnectError,
        '5' => SocketKind::BinaryEvent,
        '6' => SocketKind::BinaryAck,
        other => return Err(PacketError::SocketType(other)),
    };
    rest = &rest[1..];
    let mut attachments = 0;
    if matches!(kind, SocketKind::BinaryEvent | SocketKind::BinaryAck) {
        let dash = rest.find('-').ok_or(PacketError::Malformed(
            "a binary packet without its attachment count",
        ))?;
        attachments = rest[..dash]
            .parse::<usize>()
            .map_err(|_| PacketError::Malformed("an attachment count that is not a number"))?;
        if attachments > MAX_ATTACHMENTS {
            return Err(PacketError::Malformed("too many attachments"));
        }
        rest = &rest[dash + 1..];
    }
    let mut namespace = "/".to_owned();
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        namespace = rest[..end].to_owned();
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        let id = rest[..digits]
            .parse::<u64>()
            .map_err(|_| PacketError::Malformed("an ack id out of range"))?;
        rest = &rest[digits..];
        Some(id)
    } else {
        None
    };
    let data = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<Value>(rest).map_err(|e| PacketError::Json(e.to_string()))?)
    };
    let packet = SocketPacket {
        kind,
        namespace,
        id,
        attachments,
        data,
    };
    validate(&packet)?;
    Ok(packet)
}

/// The shape rules of each packet type (as the reference parser checks them).
fn validate(p: &SocketPacket) -> Result<(), PacketError> {
    let ok = match p.kind {
        SocketKind::Connect => matches!(p.data, None | Some(Value::Object(_))),
        SocketKind::Disconnect => p.data.is_none(),
        SocketKind::ConnectError => matches!(p.data, Some(Value::Object(_) | Value::String(_))),
        SocketKind::Event | SocketKind::BinaryEvent => match &p.data {
            Some(Value::Array(a)) => a.first().is_some_and(Value::is_string),
            _ => false,
        },
        SocketKind::Ack | SocketKind::BinaryAck => {
            p.id.is_some() && matches!(p.data, Some(Value::Array(_)))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(PacketError::Malformed(
            "data of the wrong shape for its packet type",
        ))
    }
}

/// Replaces `{"_placeholder":true,"num":n}` in `data` by what `fill` makes of attachment `n`.
pub fn fill_placeholders(
    data: &mut Value,
    attachments: &[Bytes],
    fill: &impl Fn(&Bytes) -> Value,
) -> Result<(), PacketError> {
    match data {
        Value::Object(map)
            if map.get("_placeholder") == Some(&Value::Bool(true)) && map.len() == 2 =>
        {
            let n = map
                .get("num")
                .and_then(Value::as_u64)
                .ok_or(PacketError::Malformed("a placeholder without its number"))?;
            let bytes = attachments.get(n as usize).ok_or(PacketError::Malformed(
                "a placeholder for a missing attachment",
            ))?;
            *data = fill(bytes);
        }
        Value::Object(map) => {
            for v in map.values_mut() {
                fill_placeholders(v, attachments, fill)?;
            }
        }
        Value::Array(items) => {
            for v in items {
                fill_placeholders(v, attachments, fill)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `<type>[<namespace>,][<id>]<json>` for the server's packets, prefixed with Engine.IO's `4`.
pub fn encode_socket(kind: SocketKind, namespace: &str, id: Option<u64>, data: &str) -> Bytes {
    let mut buf = Vec::with_capacity(data.len() + namespace.len() + 8);
    buf.push(b'4');
    buf.push(match kind {
        SocketKind::Connect => b'0',
        SocketKind::Disconnect => b'1',
        SocketKind::Event => b'2',
        SocketKind::Ack => b'3',
        SocketKind::ConnectError => b'4',
        SocketKind::BinaryEvent => b'5',
        SocketKind::BinaryAck => b'6',
    });
    if namespace != "/" {
        buf.extend_from_slice(namespace.as_bytes());
        buf.push(b',');
    }
    if let Some(id) = id {
        buf.extend_from_slice(id.to_string().as_bytes());
    }
    buf.extend_from_slice(data.as_bytes());
    Bytes::from(buf)
}

/// An event `["name",payload]` as the server emits it.
pub fn encode_event(namespace: &str, name: &str, payload: &str) -> Bytes {
    let mut data = String::with_capacity(name.len() + payload.len() + 6);
    data.push_str("[\"");
    // Event names are `snake_case` literals: nothing to escape.
    data.push_str(name);
    data.push_str("\",");
    data.push_str(payload);
    data.push(']');
    encode_socket(SocketKind::Event, namespace, None, &data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn engine_packets_decode_by_their_type_digit() {
        assert_eq!(
            decode_text("2probe"),
            Ok(EnginePacket::Ping("probe".into()))
        );
        assert_eq!(decode_text("3"), Ok(EnginePacket::Pong(String::new())));
        assert_eq!(
            decode_text("4hello"),
            Ok(EnginePacket::Message("hello".into()))
        );
        assert_eq!(decode_text("5"), Ok(EnginePacket::Upgrade));
        assert_eq!(decode_text(""), Err(PacketError::Empty));
        assert_eq!(decode_text("abc"), Err(PacketError::EngineType('a')));
        assert_eq!(decode_text("0"), Err(PacketError::EngineType('0')));
    }

    #[test]
    fn a_polling_payload_splits_on_the_separator_and_decodes_base64_records() {
        let got = decode_payload(b"4hello\x1ebAQIDBA==\x1e3", 100).expect("valid");
        assert_eq!(
            got,
            vec![
                EnginePacket::Message("hello".into()),
                EnginePacket::Binary(Bytes::from_static(&[1, 2, 3, 4])),
                EnginePacket::Pong(String::new()),
            ]
        );
        assert_eq!(decode_payload(b"4hi", 2), Err(PacketError::TooLarge(2)));
        assert_eq!(decode_payload(b"b!!", 10), Err(PacketError::Base64));
        assert_eq!(decode_payload(b"4a\x1e", 10), Err(PacketError::Empty));
        assert_eq!(decode_payload(b"4\xff", 10), Err(PacketError::Utf8));
        let body = encode_payload([(&b"4hello"[..], false), (&[1u8, 2, 3, 4][..], true)]);
        assert_eq!(body, b"4hello\x1ebAQIDBA==");
    }

    #[test]
    fn socket_packets_carry_namespace_ack_id_attachments_and_data() {
        let p = decode_socket(r#"2/department,12["send",{"a":1}]"#).expect("valid");
        assert_eq!(p.kind, SocketKind::Event);
        assert_eq!(p.namespace, "/department");
        assert_eq!(p.id, Some(12));
        assert_eq!(p.data, Some(json!(["send", {"a": 1}])));
        let c = decode_socket(r#"0{"token":"t"}"#).expect("valid");
        assert_eq!((c.kind, c.namespace.as_str()), (SocketKind::Connect, "/"));
        assert_eq!(c.data, Some(json!({"token": "t"})));
        let d = decode_socket("1/department,").expect("valid");
        assert_eq!((d.kind, d.data), (SocketKind::Disconnect, None));
        let b = decode_socket(
            r#"52-3["up",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#,
        )
        .expect("valid");
        assert_eq!(
            (b.kind, b.attachments, b.id),
            (SocketKind::BinaryEvent, 2, Some(3))
        );
    }

    #[test]
    fn malformed_socket_packets_are_refused_with_the_problem_named() {
        assert_eq!(decode_socket("9"), Err(PacketError::SocketType('9')));
        assert!(matches!(
            decode_socket("2[1]"),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            decode_socket(r#"2"x""#),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            decode_socket("2[\"a\""),
            Err(PacketError::Json(_))
        ));
        assert!(matches!(
            decode_socket("3[]"),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            decode_socket("5x-[\"a\"]"),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            decode_socket("599-[\"a\"]"),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            decode_socket("99999999999999999999999[\"a\"]"),
            Err(PacketError::SocketType('9'))
        ));
        assert!(matches!(
            decode_socket("299999999999999999999999[\"a\"]"),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn placeholders_are_filled_from_the_attachments() {
        let mut data = json!(["up", {"file": {"_placeholder": true, "num": 0}}]);
        let atts = [Bytes::from_static(b"\x01\x02")];
        fill_placeholders(&mut data, &atts, &|b| json!(b.len())).expect("filled");
        assert_eq!(data, json!(["up", {"file": 2}]));
        let mut missing = json!([{"_placeholder": true, "num": 1}]);
        assert!(fill_placeholders(&mut missing, &atts, &|_| Value::Null).is_err());
    }

    #[test]
    fn server_packets_encode_with_the_engine_prefix_and_namespace() {
        assert_eq!(
            encode_event("/", "new_message", r#"{"a":1}"#).as_ref(),
            br#"42["new_message",{"a":1}]"#
        );
        assert_eq!(
            encode_socket(SocketKind::Ack, "/department", Some(7), "[{}]").as_ref(),
            b"43/department,7[{}]"
        );
        assert_eq!(
            encode_socket(SocketKind::Connect, "/", None, r#"{"sid":"x"}"#).as_ref(),
            br#"40{"sid":"x"}"#
        );
    }
}
