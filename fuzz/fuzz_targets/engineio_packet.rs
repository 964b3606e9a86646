//! Engine.IO polling payloads and the Socket.IO packets inside them: arbitrary bytes through the
//! payload decoder (with the size cap), each text message through the Socket.IO decoder and its
//! placeholder filling; what decodes must encode back to the same packet.
#![no_main]

use bytes::Bytes;
use confab_gateway::transport::engineio::packet::{
    EnginePacket, PacketError, SocketKind, decode_payload, decode_socket, encode_payload,
    encode_socket, fill_placeholders,
};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let packets = match decode_payload(data, MAX) {
        Ok(p) => p,
        Err(PacketError::TooLarge(n)) => {
            assert!(data.len() > n);
            return;
        }
        Err(_) => return,
    };
    // Every record separator yields one packet.
    assert_eq!(
        packets.len(),
        data.iter().filter(|&&b| b == 0x1e).count() + 1
    );
    let mut binaries = Vec::new();
    for p in &packets {
        match p {
            EnginePacket::Binary(b) => binaries.push(b.clone()),
            EnginePacket::Message(text) => socket_round_trip(text, &binaries),
            _ => {}
        }
    }
    // Binary records re-encode to a payload that decodes to the same bytes.
    let encoded = encode_payload(binaries.iter().map(|b| (b.as_ref(), true)));
    if !binaries.is_empty() {
        let again = decode_payload(&encoded, usize::MAX).expect("our own payload decodes");
        assert_eq!(
            again,
            binaries
                .into_iter()
                .map(EnginePacket::Binary)
                .collect::<Vec<_>>()
        );
    }
});

fn socket_round_trip(text: &str, attachments: &[Bytes]) {
    let Ok(packet) = decode_socket(text) else {
        return;
    };
    let mut data = packet.data.clone();
    if let Some(d) = data.as_mut() {
        // Never panics, whatever numbers the placeholders carry.
        let _ = fill_placeholders(d, attachments, &|b| serde_json::json!(b.len()));
    }
    if matches!(packet.kind, SocketKind::BinaryEvent | SocketKind::BinaryAck) {
        return; // the server never encodes these with an attachment count
    }
    // A namespace that holds a comma or digits after it cannot survive the text form; the
    // decoder's own output for such names is what the server would never send.
    if packet.namespace.contains(',') {
        return;
    }
    let json = packet
        .data
        .as_ref()
        .map(|d| serde_json::to_string(d).expect("a decoded value serialises"))
        .unwrap_or_default();
    let bytes = encode_socket(packet.kind, &packet.namespace, packet.id, &json);
    let again = std::str::from_utf8(&bytes[1..]).expect("encoder writes UTF-8");
    let decoded = decode_socket(again).expect("our own encoding decodes");
    assert_eq!(
        (
            decoded.kind,
            &decoded.namespace,
            decoded.id,
            decoded.attachments
        ),
        (
            packet.kind,
            &packet.namespace,
            packet.id,
            packet.attachments
        )
    );
    assert!(
        same(decoded.data.as_ref(), packet.data.as_ref()),
        "{decoded:?} != {packet:?}"
    );
}

/// Equal JSON, floats within a relative 1e-9: serde_json's float parser is not correctly
/// rounded for long inputs, so a float need not survive text → f64 → text → f64 bit for bit.
fn same(a: Option<&serde_json::Value>, b: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    match (a, b) {
        (None, None) => true,
        (Some(Value::Number(x)), Some(Value::Number(y))) => match (x.as_f64(), y.as_f64()) {
            _ if x == y => true,
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
            _ => false,
        },
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(Some(x), Some(y)))
        }
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same(Some(v), Some(w))))
        }
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}
