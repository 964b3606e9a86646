//! Conformance mode: what the Socket.IO project's protocol test suites expect of a server, on
//! Confab's Engine.IO. `/engine.io/` is the Engine.IO echo server (socketio/engine.io-protocol);
//! `/socket.io/` runs that suite's Socket.IO handlers (socketio/socket.io-protocol): `auth` back
//! on connect, `message` → `message-back`, `message-with-ack` → an ack with the arguments, binary
//! attachments returned as they came. Never part of a chat gateway.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::packet::{SocketKind, SocketPacket, decode_socket, encode_socket};
use super::{Engine, EngineSession, EngineSettings, Handler, Handlers, Handshake};
use crate::telemetry::{Metrics, Stamp};
use crate::transport::connection::{Disconnect, Queued};

/// The suites' settings: pingInterval 300 ms, pingTimeout 200 ms, maxPayload 1,000,000.
pub fn settings() -> EngineSettings {
    EngineSettings {
        ping_interval: Duration::from_millis(300),
        ping_timeout: Duration::from_millis(200),
        max_payload: 1_000_000,
        send_queue: 1024,
        send_deadline: Duration::from_secs(10),
        upgrade_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_millis(1000),
    }
}

/// The conformance server's routes.
pub fn routes() -> axum::Router {
    let options = crate::transport::ws::options(&crate::transport::TransportSettings {
        max_frame_bytes: 1_000_000,
        ..Default::default()
    });
    let echo = Engine::new(
        EngineSettings {
            // The Engine.IO suite has no namespaces: no CONNECT is awaited.
            connect_timeout: Duration::ZERO,
            ..settings()
        },
        Arc::new(EchoHandlers),
        options.clone(),
        Metrics::disabled(),
        Vec::new(),
    );
    let sockets = Engine::new(
        settings(),
        Arc::new(SuiteHandlers),
        options,
        Metrics::disabled(),
        Vec::new(),
    );
    super::routes("/engine.io/", echo).merge(super::routes("/socket.io/", sockets))
}

/// Serves conformance mode until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        routes().into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

struct EchoHandlers;

impl Handlers for EchoHandlers {
    fn open(&self, _: Handshake) -> Arc<dyn Handler> {
        Arc::new(Echo)
    }
}

/// The Engine.IO echo: every message back as it came.
struct Echo;

impl Handler for Echo {
    fn on_message(&self, session: &Arc<EngineSession>, text: String) {
        session.send_text(Bytes::from(format!("4{text}")));
    }

    fn on_binary(&self, session: &Arc<EngineSession>, bytes: Bytes) {
        session.send_all(vec![Queued {
            bytes,
            binary: true,
            stamp: Stamp::None,
        }]);
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn closed(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

struct SuiteHandlers;

impl Handlers for SuiteHandlers {
    fn open(&self, _: Handshake) -> Arc<dyn Handler> {
        Arc::new(Suite::default())
    }
}

/// The Socket.IO suite's server: namespaces `/` and `/custom`.
#[derive(Default)]
struct Suite {
    connected: Mutex<HashSet<String>>,
    binary: Mutex<Option<(SocketPacket, Vec<Bytes>)>>,
}

impl Suite {
    fn on_packet(&self, session: &Arc<EngineSession>, p: SocketPacket, attachments: Vec<Bytes>) {
        let nsp = p.namespace.clone();
        let mut connected = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        match p.kind {
            SocketKind::Connect => {
                if nsp != "/" && nsp != "/custom" {
                    let err = json!({"message": "Invalid namespace"}).to_string();
                    return session.send_text(encode_socket(
                        SocketKind::ConnectError,
                        &nsp,
                        None,
                        &err,
                    ));
                }
                connected.insert(nsp.clone());
                let sid = json!({"sid": super::new_sid()}).to_string();
                session.send_text(encode_socket(SocketKind::Connect, &nsp, None, &sid));
                let auth = p.data.unwrap_or_else(|| json!({}));
                let event = json!(["auth", auth]).to_string();
                // The suite reads the CONNECT answer and `auth` with one listener at a time: in
                // one write batch the second would reach no listener. The reference server's
                // connection handler runs after the answer is written; so does this one.
                let session = session.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    session.send_text(encode_socket(SocketKind::Event, &nsp, None, &event));
                });
            }
            SocketKind::Disconnect => {
                connected.remove(&nsp);
            }
            SocketKind::Event | SocketKind::BinaryEvent if connected.contains(&nsp) => {
                let Some(Value::Array(mut args)) = p.data else {
                    return;
                };
                let name = args.remove(0);
                let binary = !attachments.is_empty();
                let (kind, id, body) = match (name.as_str(), p.id) {
                    (Some("message-with-ack"), Some(id)) => (
                        if binary {
                            SocketKind::BinaryAck
                        } else {
                            SocketKind::Ack
                        },
                        Some(id),
                        Value::Array(args),
                    ),
                    (Some("message"), _) => {
                        args.insert(0, json!("message-back"));
                        (
                            if binary {
                                SocketKind::BinaryEvent
                            } else {
                                SocketKind::Event
                            },
                            None,
                            Value::Array(args),
                        )
                    }
                    _ => return,
                };
                let mut head = encode_socket(kind, &nsp, id, &body.to_string()).to_vec();
                if binary {
                    // `<n>-` goes before the namespace and id.
                    let count = format!("{}-", attachments.len());
                    head.splice(2..2, count.bytes());
                }
                let mut frames = vec![Queued {
                    bytes: Bytes::from(head),
                    binary: false,
                    stamp: Stamp::None,
                }];
                frames.extend(attachments.into_iter().map(|bytes| Queued {
                    bytes,
                    binary: true,
                    stamp: Stamp::None,
                }));
                session.send_all(frames);
            }
            _ => {}
        }
    }
}

impl Handler for Suite {
    fn on_message(&self, session: &Arc<EngineSession>, text: String) {
        let packet = match decode_socket(&text) {
            Ok(p) => p,
            Err(e) => return session.close(Disconnect::Protocol(e.to_string().into())),
        };
        if packet.attachments > 0 {
            *self.binary.lock().unwrap_or_else(|e| e.into_inner()) = Some((packet, Vec::new()));
            return;
        }
        self.on_packet(session, packet, Vec::new());
    }

    fn on_binary(&self, session: &Arc<EngineSession>, bytes: Bytes) {
        let mut slot = self.binary.lock().unwrap_or_else(|e| e.into_inner());
        let Some((packet, atts)) = slot.as_mut() else {
            drop(slot);
            return session.close(Disconnect::Protocol("unexpected binary message".into()));
        };
        atts.push(bytes);
        if atts.len() < packet.attachments {
            return;
        }
        let Some((packet, atts)) = slot.take() else {
            return;
        };
        drop(slot);
        self.on_packet(session, packet, atts);
    }

    fn is_connected(&self) -> bool {
        !self
            .connected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn closed(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}
