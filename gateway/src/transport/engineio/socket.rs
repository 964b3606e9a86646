//! Socket.IO v5 over Engine.IO, on the connection core: namespaces `/` and `/department` on one
//! session, CONNECT with `auth`, CONNECT_ERROR with the reason, EVENT/ACK, BINARY_EVENT with
//! attachments, DISCONNECT.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::packet::{
    MAX_ATTACHMENTS, SocketKind, SocketPacket, decode_socket, encode_event, encode_socket,
    fill_placeholders,
};
use super::{EngineSession, Handler, Handlers, Handshake};
use crate::chat::error::ChatError;
use crate::telemetry::{Stamp, Transport};
use crate::transport::connection::{
    Codec, Connection, Disconnect, Endpoint, Pending, Requests, Role, Worker, admit, authenticate,
    spawn_worker, too_many_requests,
};
use crate::transport::protocol::{ErrorReply, parse_cursors};
use crate::transport::{Gateway, Reply};

/// The main namespace.
pub const MAIN: &str = "/";
/// The agents' inbox.
pub const DEPARTMENT: &str = "/department";

/// Socket.IO events of the main namespace, cached in their own slot of each event.
const MAIN_CODEC: Codec = Codec {
    slot: 1,
    encode: |e| encode_event(MAIN, e.name, e.payload.get()),
};
const DEPARTMENT_CODEC: Codec = Codec {
    slot: 2,
    encode: |e| encode_event(DEPARTMENT, e.name, e.payload.get()),
};

/// Socket.IO for the chat gateway.
pub struct ChatSockets {
    pub gw: Arc<Gateway>,
}

impl Handlers for ChatSockets {
    fn open(&self, hs: Handshake) -> Arc<dyn Handler> {
        Arc::new(Arc::new(SocketSession {
            gw: self.gw.clone(),
            hs,
            namespaces: Mutex::new(Namespaces::default()),
            binary: Mutex::new(None),
        }))
    }
}

/// One namespace connected on a session.
struct Namespace {
    connection: Option<Connection>,
    requests: Option<Requests<Option<u64>>>,
    worker: Option<Worker<Option<u64>>>,
}

/// The namespaces connected on a session, by name: at most two, so a `Vec` (one small
/// allocation, on the first CONNECT) rather than a hash table (buckets for four, a hasher).
#[derive(Default)]
struct Namespaces(Vec<(&'static str, Namespace)>);

impl Namespaces {
    fn contains_key(&self, nsp: &str) -> bool {
        self.get(nsp).is_some()
    }

    fn get(&self, nsp: &str) -> Option<&Namespace> {
        self.0.iter().find(|(n, _)| *n == nsp).map(|(_, ns)| ns)
    }

    fn insert(&mut self, nsp: &'static str, ns: Namespace) {
        self.remove(nsp);
        self.0.push((nsp, ns));
    }

    fn remove(&mut self, nsp: &str) -> Option<Namespace> {
        let at = self.0.iter().position(|(n, _)| *n == nsp)?;
        Some(self.0.swap_remove(at).1)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|(n, _)| *n)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Namespace> {
        self.0.iter_mut().map(|(_, ns)| ns)
    }

    fn drain(&mut self) -> impl Iterator<Item = Namespace> + '_ {
        self.0.drain(..).map(|(_, ns)| ns)
    }
}

/// A binary event waiting for its attachments.
struct Assembling {
    packet: SocketPacket,
    attachments: Vec<Bytes>,
}

struct SocketSession {
    gw: Arc<Gateway>,
    hs: Handshake,
    namespaces: Mutex<Namespaces>,
    binary: Mutex<Option<Assembling>>,
}

impl SocketSession {
    fn namespaces(&self) -> std::sync::MutexGuard<'_, Namespaces> {
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_packet(self: &Arc<Self>, session: &Arc<EngineSession>, packet: SocketPacket) {
        let nsp = match packet.namespace.as_str() {
            MAIN => MAIN,
            DEPARTMENT => DEPARTMENT,
            _ => {
                if packet.kind == SocketKind::Connect {
                    connect_error(session, &packet.namespace, "Invalid namespace");
                }
                return;
            }
        };
        match packet.kind {
            SocketKind::Connect => {
                if self.namespaces().contains_key(nsp) {
                    return;
                }
                let this = self.clone();
                let session = session.clone();
                tokio::spawn(async move { this.connect(&session, nsp, packet.data).await });
            }
            SocketKind::Disconnect => {
                let gone = self.namespaces().remove(nsp);
                if let Some(ns) = gone {
                    let gw = self.gw.clone();
                    tokio::spawn(close_namespace(gw, ns));
                }
            }
            SocketKind::Event | SocketKind::BinaryEvent => self.on_event(session, nsp, packet),
            // The server asks for no acks; a client's CONNECT_ERROR makes no sense.
            SocketKind::Ack | SocketKind::BinaryAck => {}
            SocketKind::ConnectError => session.close(Disconnect::Protocol(
                "CONNECT_ERROR is a server packet".into(),
            )),
        }
    }

    fn on_event(&self, session: &Arc<EngineSession>, nsp: &'static str, packet: SocketPacket) {
        let received = session
            .outbox
            .metrics
            .enabled()
            .then(std::time::Instant::now);
        let id = packet.id;
        let refuse = |e: ChatError| {
            if let Some(id) = id {
                let stamp = received.map_or(Stamp::None, |at| Stamp::Ack(at, "other"));
                session.outbox.answer(ack(nsp, id, &Err(e)), stamp);
            }
        };
        let Some(Value::Array(mut args)) = packet.data else {
            return;
        };
        let namespaces = self.namespaces();
        let Some(ns) = namespaces.get(nsp) else {
            // Not connected to this namespace: the reference server ignores it.
            return;
        };
        let Some(requests) = &ns.requests else {
            return refuse(ChatError::invalid(format!(
                "the {nsp} namespace only receives; {:?} is not an event here",
                args.first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .chars()
                    .take(64)
                    .collect::<String>()
            )));
        };
        let event = match args.first() {
            Some(Value::String(s)) => s.clone(),
            _ => return refuse(ChatError::invalid("an event's first argument is its name")),
        };
        let payload = if args.len() > 1 {
            args.swap_remove(1)
        } else {
            Value::Null
        };
        let pending = Pending {
            event,
            payload,
            reply_to: id,
            received,
        };
        if let Err(refused) = requests.offer(pending, &session.outbox.metrics) {
            drop(namespaces);
            if let Some(id) = refused.reply_to {
                session
                    .outbox
                    .answer(ack(nsp, id, &Err(too_many_requests())), Stamp::None);
            }
        }
    }

    /// CONNECT: the address's budget, the token (`auth.token`, else `Authorization: Bearer`),
    /// the role; then the namespace is registered and answered, in that order under the lock,
    /// so an event the client sends on the answer finds it.
    async fn connect(&self, session: &Arc<EngineSession>, nsp: &'static str, auth: Option<Value>) {
        let gw = &self.gw;
        let address = Some(self.hs.address);
        if let Err(e) = admit(gw, self.hs.address).await {
            return connect_error(session, nsp, &format!("rate_limited: {e}"));
        }
        let cursors = match auth.as_ref().and_then(|a| a.get("cursors")) {
            None | Some(Value::Null) => None,
            Some(v) => match parse_cursors(v) {
                Ok(c) => Some(c),
                Err(e) => return connect_error(session, nsp, &format!("{}: {e}", e.code())),
            },
        };
        let token = auth
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| self.hs.bearer.clone());
        let identity = match authenticate(gw, Transport::SocketIo, token.as_deref(), address) {
            Ok(i) => i,
            Err(e) => return connect_error(session, nsp, &format!("unauthorized: {e}")),
        };
        let role = if nsp == DEPARTMENT {
            Role::Agent
        } else {
            Role::Main
        };
        if role == Role::Agent && !identity.is_agent() {
            let e = ChatError::forbidden("the /department namespace is for agents");
            return connect_error(session, nsp, &format!("{}: {e}", e.code()));
        }
        let codec = if role == Role::Agent {
            DEPARTMENT_CODEC
        } else {
            MAIN_CODEC
        };
        let endpoint = Arc::new(Endpoint {
            outbox: session.outbox.clone(),
            codec,
        });
        let mut namespaces = self.namespaces();
        if namespaces.contains_key(nsp) || session.outbox.is_shut() {
            return;
        }
        let sid = super::new_sid();
        session.send_text(encode_socket(
            SocketKind::Connect,
            nsp,
            None,
            &json!({ "sid": sid }).to_string(),
        ));
        let (connection, change) = match Connection::open(gw, identity, endpoint, role, address) {
            Ok(opened) => opened,
            Err(e) => {
                drop(namespaces);
                tracing::warn!(error = %e, "could not register a Socket.IO connection");
                return session.close(Disconnect::Internal);
            }
        };
        // An agent's namespace only receives: its worker binds the departments' topics and
        // ends; it is offered no requests.
        let (requests, worker) = spawn_worker(
            gw.clone(),
            &connection,
            change,
            cursors,
            session.outbox.clone(),
            answer,
        );
        let ns = Namespace {
            connection: Some(connection),
            requests: (role == Role::Main).then_some(requests),
            worker: Some(worker),
        };
        tracing::debug!(sid = %session.sid, nsp, conn = ns.connection.as_ref().map(Connection::conn), "socket.io connected");
        namespaces.insert(nsp, ns);
        session.namespace_connected();
    }
}

/// The ACK of a main-namespace request: the reply, or `{error: {code, message}}`.
fn ack(nsp: &str, id: u64, result: &Result<Reply, ChatError>) -> Bytes {
    let body = match result {
        Ok(v) => format!("[{}]", v.get()),
        Err(e) => json!([ErrorReply::from(e)]).to_string(),
    };
    encode_socket(SocketKind::Ack, nsp, Some(id), &body)
}

fn answer(id: &Option<u64>, result: &Result<Reply, ChatError>) -> Option<Bytes> {
    id.map(|id| ack(MAIN, id, result))
}

fn connect_error(session: &EngineSession, nsp: &str, message: &str) {
    session.send_text(encode_socket(
        SocketKind::ConnectError,
        nsp,
        None,
        &json!({ "message": message }).to_string(),
    ));
}

async fn close_namespace(gw: Arc<Gateway>, mut ns: Namespace) {
    ns.requests.take();
    if let Some(worker) = ns.worker.take() {
        worker.stop();
    }
    if let Some(connection) = ns.connection.take() {
        connection.close(&gw).await;
    }
}

impl Handler for Arc<SocketSession> {
    fn on_message(&self, session: &Arc<EngineSession>, text: String) {
        if self
            .binary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return session.close(Disconnect::Protocol(
                "a text packet while binary attachments were due".into(),
            ));
        }
        let packet = match decode_socket(&text) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "closing a Socket.IO session after a bad packet");
                return session.close(Disconnect::Protocol(e.to_string().into()));
            }
        };
        if packet.attachments > 0 {
            *self.binary.lock().unwrap_or_else(|p| p.into_inner()) = Some(Assembling {
                attachments: Vec::with_capacity(packet.attachments.min(MAX_ATTACHMENTS)),
                packet,
            });
            return;
        }
        self.on_packet(session, packet);
    }

    fn on_binary(&self, session: &Arc<EngineSession>, bytes: Bytes) {
        let mut slot = self.binary.lock().unwrap_or_else(|p| p.into_inner());
        let Some(assembling) = slot.as_mut() else {
            drop(slot);
            return session.close(Disconnect::Protocol(
                "a binary message no packet announced".into(),
            ));
        };
        assembling.attachments.push(bytes);
        if assembling.attachments.len() < assembling.packet.attachments {
            return;
        }
        let Some(Assembling {
            mut packet,
            attachments,
        }) = slot.take()
        else {
            return;
        };
        drop(slot);
        // The domain takes JSON: an attachment reaches it as `{"base64": "..."}`.
        if let Some(data) = packet.data.as_mut()
            && let Err(e) = fill_placeholders(
                data,
                &attachments,
                &|b| json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
            )
        {
            return session.close(Disconnect::Protocol(e.to_string().into()));
        }
        packet.kind = SocketKind::Event;
        packet.attachments = 0;
        self.on_packet(session, packet);
    }

    fn is_connected(&self) -> bool {
        !self.namespaces().is_empty()
    }

    fn farewell(&self) -> Vec<Bytes> {
        self.namespaces()
            .keys()
            .map(|nsp| encode_socket(SocketKind::Disconnect, nsp, None, ""))
            .collect()
    }

    fn settle(&self) -> BoxFuture<'static, ()> {
        let workers: Vec<_> = self
            .namespaces()
            .values_mut()
            .filter_map(|ns| {
                ns.requests.take();
                ns.worker.take()
            })
            .collect();
        Box::pin(async move {
            for w in workers {
                w.settled().await;
            }
        })
    }

    fn closed(&self) -> BoxFuture<'static, ()> {
        let gone: Vec<Namespace> = self.namespaces().drain().collect();
        let gw = self.gw.clone();
        Box::pin(async move {
            for ns in gone {
                close_namespace(gw.clone(), ns).await;
            }
        })
    }
}
