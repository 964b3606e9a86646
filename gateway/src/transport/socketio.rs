//! Socket.IO v4 transport (socketioxide): handshake auth, events with acks, `/department`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::ConnectInfo;
use serde_json::Value;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::Notify;

use super::protocol::{ErrorReply, parse_cursors};
use super::{EVENTS, Gateway, Session, client_address, dispatch};
use crate::chat::error::ChatError;
use crate::chat::event::Outgoing;
use crate::chat::hub::{CloseReason, ConnId, Outbound, SendFailure, TopicChange};
use crate::chat::model::Identity;
use crate::chat::{ChatService, Cursors};
use crate::limits::LimitClass;
use crate::telemetry::metrics::unix_micros;
use crate::telemetry::{Metrics, Transport, audit};

/// Requests a socket is running; a drain closes the socket only once they are answered.
#[derive(Default)]
struct InFlight {
    running: AtomicUsize,
    idle: Notify,
}

/// Counts one running request for as long as it lives.
struct Running(Arc<InFlight>);

impl InFlight {
    fn start(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::AcqRel);
        Running(self.clone())
    }

    /// Resolves once no request is running (checked before every wait: cancel-safe).
    async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A Socket.IO socket as the hub sees it.
struct SocketOut {
    socket: SocketRef,
    in_flight: Arc<InFlight>,
    metrics: Arc<Metrics>,
    /// Set once the socket is closed for a full queue, so the close is counted once.
    overflowed: AtomicBool,
}

impl SocketOut {
    fn new(socket: SocketRef, metrics: Arc<Metrics>) -> Self {
        Self {
            socket,
            in_flight: Arc::default(),
            metrics,
            overflowed: AtomicBool::new(false),
        }
    }
}

impl Outbound for SocketOut {
    fn send(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure> {
        match self.socket.emit(event.name, &*event.payload) {
            Ok(()) => {
                // socketioxide writes from its own task: the hand-over to the socket's buffer is
                // the last point this side sees.
                if let Some(committed) = event.committed_at_us {
                    self.metrics
                        .delivered(Transport::SocketIo, committed, unix_micros());
                }
                Ok(())
            }
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                self.metrics.send_queue_rejected(Transport::SocketIo);
                Err(SendFailure::QueueFull)
            }
            Err(_) => Err(SendFailure::Closed),
        }
    }

    fn close(&self, reason: CloseReason) {
        tracing::debug!(sid = %self.socket.id, ?reason, "closing socket");
        if reason == CloseReason::QueueFull && !self.overflowed.swap(true, Ordering::Relaxed) {
            self.metrics.send_queue_closed(Transport::SocketIo);
        }
        let _ = self.socket.clone().disconnect();
    }

    fn drain_close(&self) {
        let socket = self.socket.clone();
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + crate::drain::IN_FLIGHT_DEADLINE;
            // Answered, then a moment for the acks to be written (socketioxide's disconnect
            // can overtake queued packets); a request that slipped in meanwhile gets its turn.
            loop {
                let _ = tokio::time::timeout_at(deadline, in_flight.settled()).await;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                if in_flight.running.load(Ordering::Acquire) == 0
                    || tokio::time::Instant::now() >= deadline
                {
                    break;
                }
            }
            tracing::debug!(sid = %socket.id, "closing socket: drain");
            let _ = socket.disconnect();
        });
    }
}

/// The handshake was refused; the text reaches the client as `connect_error`'s message.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn token_of(s: &SocketRef, auth: &Result<Value, impl std::fmt::Debug>) -> Option<String> {
    if let Ok(auth) = auth
        && let Some(t) = auth.get("token").and_then(Value::as_str)
    {
        return Some(t.to_owned());
    }
    s.req_parts()
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// Resume cursors from the handshake's `auth: {token, cursors}`; malformed ones refuse the
/// connection (`connect_error` "invalid: …").
fn cursors_of(auth: &Result<Value, impl std::fmt::Debug>) -> Result<Option<Cursors>, Refused> {
    match auth.as_ref().ok().and_then(|a| a.get("cursors")) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_cursors(v)
            .map(Some)
            .map_err(|e| Refused(format!("{}: {e}", e.code()))),
    }
}

/// Checks the token and the client address's connect budget before the socket joins a namespace:
/// no event is processed before a valid token.
async fn authenticate(
    gw: &Gateway,
    s: &SocketRef,
    auth: Result<Value, impl std::fmt::Debug>,
) -> Result<Identity, Refused> {
    let parts = s.req_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let address = client_address(peer, &parts.headers, &gw.settings.trusted_proxies);
    if let Err(e) = gw
        .service
        .throttle(LimitClass::AddressConnects, &address.to_string())
        .await
    {
        return Err(Refused(format!("rate_limited: {e}")));
    }
    let token = token_of(s, &auth).unwrap_or_default();
    gw.auth.verify(&token).map_err(|e| {
        gw.service
            .metrics()
            .auth_failed(Transport::SocketIo, e.reason());
        audit::auth_failed(Transport::SocketIo, e.reason(), &e, Some(address));
        Refused(format!("unauthorized: {e}"))
    })
}

fn reply(ack: AckSender, result: Result<Value, ChatError>) {
    let _ = match result {
        Ok(v) => ack.send(&v),
        Err(e) => ack.send(&ErrorReply::from(&e)),
    };
}

/// A session's token has expired: `session_expired`, then the close.
fn expire(socket: SocketRef, metrics: Arc<Metrics>) {
    ChatService::direct(
        &SocketOut::new(socket.clone(), metrics),
        &Outgoing::new(
            "session_expired",
            &ErrorReply::from(&ChatError::Unauthorized("token expired".into())),
        ),
    );
    // socketioxide's disconnect can overtake packets still queued for the socket: give
    // `session_expired` a moment to be written before the close.
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let _ = socket.disconnect();
    });
}

/// What the handshake middleware set up, for the connect handler to finish.
#[derive(Clone)]
struct Attached {
    identity: Arc<Identity>,
    conn: ConnId,
    change: TopicChange,
    cursors: Option<Cursors>,
}

/// Registers the connection and every event handler. Runs inside the handshake middleware,
/// because socketioxide sends the client its CONNECT before it spawns the connect handler: an
/// event the client emits at once would find no handler and be lost.
fn attach(
    gw: &Arc<Gateway>,
    s: &SocketRef,
    identity: Arc<Identity>,
    cursors: Option<Cursors>,
) -> Attached {
    let metrics = gw.service.metrics().clone();
    let socket_out = Arc::new(SocketOut::new(s.clone(), metrics.clone()));
    let in_flight = socket_out.in_flight.clone();
    let out: Arc<dyn Outbound> = socket_out;
    let (conn, change) = gw.service.register(&identity, out.clone());
    // Taken (and so counted closed) by the disconnect handler, which socketioxide may clone.
    let counted = Arc::new(std::sync::Mutex::new(Some(
        metrics.connection_opened(Transport::SocketIo, &identity.user_id),
    )));
    let session = Session::new(conn, (*identity).clone(), out, Transport::SocketIo);
    let expiring = s.clone();
    let expiring_metrics = metrics.clone();
    session.watch_expiry(gw.settings.token_warning, move || {
        expire(expiring, expiring_metrics)
    });
    for &name in EVENTS {
        let gw = gw.clone();
        let session = session.clone();
        let in_flight = in_flight.clone();
        s.on(
            name,
            move |TryData(data): TryData<Value>, ack: AckSender| async move {
                let _running = in_flight.start();
                let metrics = gw.service.metrics();
                let received = metrics.enabled().then(Instant::now);
                let result = match data {
                    Ok(payload) => dispatch(&gw, &session, name, payload).await,
                    Err(e) => Err(ChatError::invalid(format!(
                        "invalid {name} payload: {}",
                        super::protocol::redact(&e)
                    ))),
                };
                reply(ack, result);
                if let Some(received) = received {
                    metrics.acked(Transport::SocketIo, name, received);
                }
            },
        );
    }
    {
        let gw = gw.clone();
        let session = session.clone();
        s.on_fallback(move |Event(name): Event, ack: AckSender| async move {
            let metrics = gw.service.metrics();
            let received = metrics.enabled().then(Instant::now);
            reply(ack, dispatch(&gw, &session, &name, Value::Null).await);
            if let Some(received) = received {
                metrics.acked(Transport::SocketIo, "other", received);
            }
        });
    }
    let service = gw.service.clone();
    let user = identity.user_id.clone();
    s.on_disconnect(move |s: SocketRef, reason: DisconnectReason| async move {
        tracing::info!(sid = %s.id, ?reason, "disconnected");
        audit::disconnected(Transport::SocketIo, &user, conn);
        counted.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Dropping the session ends its expiry watch.
        drop(session);
        service.disconnect(conn).await;
    });
    Attached {
        identity,
        conn,
        change,
        cursors,
    }
}

async fn on_connect(gw: Arc<Gateway>, s: SocketRef) {
    let Some(attached) = s.extensions.get::<Attached>() else {
        let _ = s.disconnect();
        return;
    };
    let Attached {
        identity,
        conn,
        change,
        cursors,
    } = attached;
    let peer = s
        .req_parts()
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let address = client_address(peer, &s.req_parts().headers, &gw.settings.trusted_proxies);
    tracing::debug!(sid = %s.id, conn, "socket.io connected");
    audit::connected(Transport::SocketIo, &identity.user_id, conn, Some(address));
    if let Err(e) = gw
        .service
        .connected_resuming(&identity, conn, change, cursors)
        .await
    {
        tracing::warn!(error = %e, "could not complete a connection");
        let _ = s.disconnect();
    }
}

/// The agents' inbox: registered in the middleware for the same reason as [`attach`].
fn attach_agent(
    gw: &Arc<Gateway>,
    s: &SocketRef,
    identity: &Identity,
) -> Result<TopicChange, Refused> {
    let out: Arc<dyn Outbound> = Arc::new(SocketOut::new(s.clone(), gw.service.metrics().clone()));
    let (conn, change) = gw
        .service
        .register_agent(identity, out.clone())
        .map_err(|e| Refused(format!("{}: {e}", e.code())))?;
    // Expiry as on the main namespace: warned ahead, closed at `exp` (the inbox carries the
    // content of every support conversation of the departments).
    let session = Session::new(conn, identity.clone(), out, Transport::SocketIo);
    let expiring = s.clone();
    let expiring_metrics = gw.service.metrics().clone();
    session.watch_expiry(gw.settings.token_warning, move || {
        expire(expiring, expiring_metrics)
    });
    s.on_fallback(|Event(name): Event, ack: AckSender| async move {
        let e = ChatError::invalid(format!(
            "the /department namespace only receives; {:?} is not an event here",
            name.chars().take(64).collect::<String>()
        ));
        let _ = ack.send(&ErrorReply::from(&e));
    });
    let service = gw.service.clone();
    s.on_disconnect(move || async move {
        // Dropping the session ends its expiry watch.
        drop(session);
        service.disconnect_agent(conn).await
    });
    Ok(change)
}

/// Builds the Socket.IO layer with the frame, payload and queue limits of `gw.settings`.
pub fn layer(gw: Arc<Gateway>) -> (SocketIoLayer, SocketIo) {
    let st = &gw.settings;
    let (layer, io) = SocketIo::builder()
        .ping_interval(st.ping_interval)
        .ping_timeout(st.ping_timeout)
        // Polling bodies and WebSocket messages/frames share one cap: limit+1 bytes is refused.
        .max_payload(st.max_frame_bytes as u64)
        .ws_max_message_size(st.max_frame_bytes)
        .ws_max_frame_size(st.max_frame_bytes)
        // Small read buffers keep idle connections cheap; they grow on demand.
        .ws_read_buffer_size(4096)
        .max_buffer_size(st.send_queue)
        // A connection that never sends CONNECT for a namespace is closed as soon as a `/ws`
        // client that never authenticates.
        .connect_timeout(st.auth_timeout)
        .build_layer();

    let main_gw = gw.clone();
    let auth_gw = gw.clone();
    io.ns(
        "/",
        (move |s: SocketRef| on_connect(main_gw.clone(), s)).with(
            move |s: SocketRef, TryData(auth): TryData<Value>| {
                let gw = auth_gw.clone();
                async move {
                    let cursors = cursors_of(&auth)?;
                    let who = authenticate(&gw, &s, auth).await?;
                    let attached = attach(&gw, &s, Arc::new(who), cursors);
                    s.extensions.insert(attached);
                    Ok::<(), Refused>(())
                }
            },
        ),
    );

    let dept_gw = gw.clone();
    let dept_auth_gw = gw;
    io.ns(
        "/department",
        (move |s: SocketRef| {
            let gw = dept_gw.clone();
            async move {
                if let Some(change) = s.extensions.get::<TopicChange>() {
                    gw.service.subscribe(change).await;
                }
            }
        })
        .with(move |s: SocketRef, TryData(auth): TryData<Value>| {
            let gw = dept_auth_gw.clone();
            async move {
                let who = authenticate(&gw, &s, auth).await?;
                let change = attach_agent(&gw, &s, &who)?;
                s.extensions.insert(change);
                Ok::<(), Refused>(())
            }
        }),
    );
    (layer, io)
}
