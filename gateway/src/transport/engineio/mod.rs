//! Engine.IO v4 on the connection core: the WebSocket and long-polling transports, the upgrade
//! from one to the other, heartbeats and the session table. What messages mean is up to a
//! [`Handler`]: Socket.IO ([`socket`]) or the conformance echo.

pub mod conformance;
pub mod packet;
pub mod socket;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::SinkExt;
use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};
use yawc::{Frame, OpCode, WebSocket};

use super::Gateway;
use super::connection::{Disconnect, Outbox, Queued};
use super::ws::{Flow, Reader, flush_queue, pump};
use crate::telemetry::{Metrics, Stamp, Transport};
use packet::{EnginePacket, decode_payload, decode_text, encode_payload};

/// Engine.IO settings, sent to the client in the open packet.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// The largest polling body and WebSocket message.
    pub max_payload: usize,
    pub send_queue: usize,
    pub send_deadline: Duration,
    /// How long an upgrading WebSocket has to send `2probe` and `5`.
    pub upgrade_timeout: Duration,
    /// How long a new session has to connect a namespace before it is closed (zero: no limit).
    pub connect_timeout: Duration,
}

/// What a session's messages mean.
pub trait Handler: Send + Sync + 'static {
    /// A text message (Engine.IO `4`).
    fn on_message(&self, session: &Arc<EngineSession>, text: String);
    /// A binary message.
    fn on_binary(&self, session: &Arc<EngineSession>, bytes: Bytes);
    /// Whether the session has connected a namespace (sessions that never do are closed).
    fn is_connected(&self) -> bool;
    /// Packets written before a close the server decides (Socket.IO: DISCONNECT per namespace).
    fn farewell(&self) -> Vec<Bytes> {
        Vec::new()
    }
    /// A drain: answer the requests already read (the read side has stopped).
    fn settle(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    /// The session ended: tear down what the handler registered.
    fn closed(&self) -> BoxFuture<'static, ()>;
}

/// Makes the handler of each new session.
pub trait Handlers: Send + Sync + 'static {
    fn open(&self, hs: Handshake) -> Arc<dyn Handler>;
}

/// What the handshake request told about the client.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub address: IpAddr,
    /// `Authorization: Bearer`, for clients that authenticate by header rather than `auth`.
    pub bearer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Polling,
    WebSocket,
}

struct State_ {
    kind: Kind,
    /// A GET is waiting for packets.
    polling: bool,
    /// A POST is being read.
    posting: bool,
    /// A WebSocket has sent `2probe`: pending and new polls answer `6`.
    upgrading: bool,
    /// When a GET last took the queue, for the send deadline of a polling client.
    drained_at: Instant,
}

/// One Engine.IO session.
pub struct EngineSession {
    pub sid: String,
    pub outbox: Arc<Outbox>,
    state: Mutex<State_>,
    handler: Arc<dyn Handler>,
    /// Wakes a waiting GET: an upgrade probe or the session's end.
    wake_poll: Notify,
    pong: AtomicBool,
    ended: AtomicBool,
    /// The connect-timeout timer, cancelled once a namespace connects: an idle session keeps no
    /// task for a deadline that has passed its purpose.
    connect_timer: Mutex<Option<tokio::task::AbortHandle>>,
}

impl EngineSession {
    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a text packet (an answer, a notice): a full queue closes the session.
    pub fn send_text(&self, bytes: Bytes) {
        self.outbox.answer(bytes, Stamp::None);
    }

    /// Queues a packet with its binary attachments, all or none.
    pub fn send_all(&self, frames: Vec<Queued>) {
        if self.outbox.push_all(frames).is_err() {
            self.outbox.close(Disconnect::QueueFull);
        }
    }

    pub fn close(&self, why: Disconnect) {
        self.outbox.close(why);
    }

    /// A namespace connected: the connect timeout no longer applies.
    pub fn namespace_connected(&self) {
        let timer = self
            .connect_timer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(timer) = timer {
            timer.abort();
        }
    }
}

/// The Engine.IO server: settings, the session table and the WebSocket options.
pub struct Engine {
    pub settings: EngineSettings,
    sessions: Mutex<HashMap<String, Arc<EngineSession>>>,
    handlers: Arc<dyn Handlers>,
    ws_options: yawc::Options,
    metrics: Arc<Metrics>,
    trusted_proxies: Vec<IpAddr>,
}

/// Engine.IO's error answers: `{"code", "message"}` with status 400 (403 for a refused origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineError {
    UnknownTransport,
    UnknownSid,
    BadHandshakeMethod,
    BadRequest,
    Forbidden,
    UnsupportedProtocolVersion,
}

impl EngineError {
    pub fn code(self) -> u8 {
        match self {
            Self::UnknownTransport => 0,
            Self::UnknownSid => 1,
            Self::BadHandshakeMethod => 2,
            Self::BadRequest => 3,
            Self::Forbidden => 4,
            Self::UnsupportedProtocolVersion => 5,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::UnknownTransport => "Transport unknown",
            Self::UnknownSid => "Session ID unknown",
            Self::BadHandshakeMethod => "Bad handshake method",
            Self::BadRequest => "Bad request",
            Self::Forbidden => "Forbidden",
            Self::UnsupportedProtocolVersion => "Unsupported protocol version",
        }
    }
}

impl IntoResponse for EngineError {
    fn into_response(self) -> Response {
        let status = if self == Self::Forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        (
            status,
            axum::Json(json!({"code": self.code(), "message": self.message()})),
        )
            .into_response()
    }
}

/// The query of an Engine.IO request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EngineQuery {
    pub eio: Option<String>,
    pub transport: Option<String>,
    pub sid: Option<String>,
}

impl EngineQuery {
    pub fn parse(query: &str) -> Self {
        let mut q = Self::default();
        for (k, v) in url_pairs(query) {
            match k {
                "EIO" => q.eio = Some(v.to_owned()),
                "transport" => q.transport = Some(v.to_owned()),
                "sid" => q.sid = Some(v.to_owned()),
                _ => {}
            }
        }
        q
    }
}

fn url_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

impl Engine {
    pub fn new(
        settings: EngineSettings,
        handlers: Arc<dyn Handlers>,
        ws_options: yawc::Options,
        metrics: Arc<Metrics>,
        trusted_proxies: Vec<IpAddr>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            sessions: Mutex::new(HashMap::new()),
            handlers,
            ws_options,
            metrics,
            trusted_proxies,
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<EngineSession>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session(&self, sid: &str) -> Option<Arc<EngineSession>> {
        self.sessions().get(sid).cloned()
    }

    /// Closes every session (shutdown): namespaces get their DISCONNECT, polls their close.
    pub fn close_all(&self) {
        let sessions: Vec<_> = self.sessions().values().cloned().collect();
        for s in sessions {
            s.close(Disconnect::Shutdown);
            s.wake_poll.notify_waiters();
        }
    }

    /// Live sessions (for tests and shutdown).
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn create(&self, kind: Kind, hs: Handshake) -> Arc<EngineSession> {
        let sid = new_sid();
        let session = Arc::new(EngineSession {
            sid: sid.clone(),
            outbox: Outbox::new(
                self.settings.send_queue,
                self.metrics.clone(),
                Transport::SocketIo,
            ),
            state: Mutex::new(State_ {
                kind,
                polling: false,
                posting: false,
                upgrading: false,
                drained_at: Instant::now(),
            }),
            handler: self.handlers.open(hs),
            wake_poll: Notify::new(),
            pong: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            connect_timer: Mutex::new(None),
        });
        self.sessions().insert(sid, session.clone());
        let wait = self.settings.connect_timeout;
        if !wait.is_zero() {
            let weak = Arc::downgrade(&session);
            let timer = tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(session) = weak.upgrade()
                    && !session.handler.is_connected()
                {
                    session.close(Disconnect::Protocol(
                        format!("no namespace connected within {} ms", wait.as_millis()).into(),
                    ));
                    session.wake_poll.notify_waiters();
                }
            });
            *session
                .connect_timer
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(timer.abort_handle());
        }
        session
    }

    /// The open packet: `0{"sid","upgrades","pingInterval","pingTimeout","maxPayload"}`.
    fn open_packet(&self, sid: &str, kind: Kind) -> Bytes {
        let upgrades: &[&str] = if kind == Kind::Polling {
            &["websocket"]
        } else {
            &[]
        };
        let body = json!({
            "sid": sid,
            "upgrades": upgrades,
            "pingInterval": self.settings.ping_interval.as_millis() as u64,
            "pingTimeout": self.settings.ping_timeout.as_millis() as u64,
            "maxPayload": self.settings.max_payload,
        });
        Bytes::from(format!("0{body}"))
    }

    /// Ends a session once: out of the table, the handler's teardown, the queue freed.
    async fn end(&self, session: &Arc<EngineSession>) {
        if session.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.sessions().remove(&session.sid);
        session.outbox.close(Disconnect::ClientClosed);
        session.wake_poll.notify_waiters();
        session.handler.closed().await;
        session.outbox.shut();
    }
}

fn new_sid() -> String {
    use base64::Engine as _;
    let bytes: [u8; 15] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Every Engine.IO request: the handshake, polls, posts and WebSocket upgrades.
pub async fn handle(State(engine): State<Arc<Engine>>, mut req: Request) -> Response {
    let q = EngineQuery::parse(req.uri().query().unwrap_or_default());
    let kind = match q.transport.as_deref() {
        Some("polling") => Kind::Polling,
        Some("websocket") => Kind::WebSocket,
        _ => return EngineError::UnknownTransport.into_response(),
    };
    if q.eio.as_deref() != Some("4") {
        return EngineError::UnsupportedProtocolVersion.into_response();
    }
    let websocket = req.headers().contains_key(header::SEC_WEBSOCKET_KEY);
    if kind == Kind::WebSocket && !websocket {
        return EngineError::BadRequest.into_response();
    }
    if let Some(sid) = &q.sid {
        let Some(session) = engine.session(sid) else {
            return EngineError::UnknownSid.into_response();
        };
        return match kind {
            Kind::Polling if req.method() == Method::GET => poll(&engine, &session).await,
            Kind::Polling if req.method() == Method::POST => {
                post(&engine, &session, req.into_body()).await
            }
            Kind::Polling => EngineError::BadRequest.into_response(),
            Kind::WebSocket => upgrade_session(&engine, session, &mut req),
        };
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let hs = Handshake {
        address: super::client_address(peer, req.headers(), &engine.trusted_proxies),
        bearer: super::connection::bearer(req.headers()).map(str::to_owned),
    };
    match kind {
        Kind::Polling => {
            if req.method() != Method::GET {
                return EngineError::BadHandshakeMethod.into_response();
            }
            let session = engine.create(Kind::Polling, hs);
            tokio::spawn(drive_polling(engine.clone(), session.clone()));
            text_response(engine.open_packet(&session.sid, Kind::Polling))
        }
        Kind::WebSocket => {
            super::ws::first_deflate_offer(req.headers_mut());
            let (response, upgraded) =
                match WebSocket::upgrade_with_options(&mut req, engine.ws_options.clone()) {
                    Ok(u) => u,
                    Err(_) => return EngineError::BadRequest.into_response(),
                };
            let engine = engine.clone();
            tokio::spawn(async move {
                let ws = match upgraded.await {
                    Ok(ws) => Box::new(ws),
                    Err(e) => {
                        return tracing::debug!(error = %e, "Engine.IO upgrade did not complete");
                    }
                };
                let session = engine.create(Kind::WebSocket, hs);
                let hello = engine.open_packet(&session.sid, Kind::WebSocket);
                run_websocket(&engine, &session, ws, Some(hello)).await;
            });
            response.map(Body::new)
        }
    }
}

fn text_response(body: impl Into<Body>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
        body.into(),
    )
        .into_response()
}

/// A GET on a polling session: waits for packets and answers with them, `\x1e`-separated.
async fn poll(engine: &Arc<Engine>, session: &Arc<EngineSession>) -> Response {
    let upgrading = {
        let mut st = session.lock();
        if st.kind == Kind::WebSocket {
            return EngineError::BadRequest.into_response();
        }
        if st.polling {
            // Overlapping polls: the client is broken; the session ends.
            drop(st);
            session.close(Disconnect::Protocol("overlapping polls".into()));
            session.wake_poll.notify_waiters();
            return EngineError::BadRequest.into_response();
        }
        if !st.upgrading {
            st.polling = true;
        }
        st.upgrading
    };
    if upgrading {
        // Answered once the upgrade settles (at most 100 ms, as the reference server's upgrade
        // check): a noop while it goes on, refused once the WebSocket took over.
        let _ = timeout(Duration::from_millis(100), async {
            while session.lock().upgrading {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if session.lock().kind == Kind::WebSocket {
            return EngineError::BadRequest.into_response();
        }
        return text_response("6");
    }
    tokio::select! {
        _ = session.outbox.ready() => {}
        _ = session.outbox.closed() => {}
        _ = session.wake_poll.notified() => {}
    }
    let why = session.outbox.close_reason();
    let upgrading = session.lock().upgrading;
    let mut body = Vec::new();
    let max = engine.settings.max_payload;
    let mut packets: Vec<(Bytes, bool)> = Vec::new();
    if why.as_ref().is_none_or(Disconnect::flushes_queue) {
        let mut size = 0;
        while size < max {
            let Some(q) = session.outbox.try_pop() else {
                break;
            };
            size += q.bytes.len() + 1;
            packets.push((q.bytes, q.binary));
        }
    }
    match &why {
        None if packets.is_empty() && upgrading => packets.push((Bytes::from_static(b"6"), false)),
        None => {}
        Some(Disconnect::ClientClosed) => packets.push((Bytes::from_static(b"6"), false)),
        Some(_) => {
            packets.extend(session.handler.farewell().into_iter().map(|b| (b, false)));
            packets.push((Bytes::from_static(b"1"), false));
        }
    }
    body.extend(encode_payload(
        packets.iter().map(|(b, bin)| (b.as_ref(), *bin)),
    ));
    {
        let mut st = session.lock();
        st.polling = false;
        st.drained_at = Instant::now();
    }
    if why.is_some() {
        // The close went out: the session is over.
        engine.end(session).await;
    }
    text_response(body)
}

/// A POST on a polling session: the client's packets.
async fn post(engine: &Arc<Engine>, session: &Arc<EngineSession>, body: Body) -> Response {
    {
        let mut st = session.lock();
        if st.posting || st.kind == Kind::WebSocket {
            drop(st);
            session.close(Disconnect::Protocol("overlapping posts".into()));
            return EngineError::BadRequest.into_response();
        }
        st.posting = true;
    }
    let max = engine.settings.max_payload;
    let read = axum::body::to_bytes(body, max + 1).await;
    session.lock().posting = false;
    let packets = match read
        .map_err(|_| packet::PacketError::TooLarge(max))
        .and_then(|b| decode_payload(&b, max))
    {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "closing an Engine.IO session after a bad payload");
            session.close(Disconnect::Protocol(e.to_string().into()));
            engine.end(session).await;
            let status = if matches!(e, packet::PacketError::TooLarge(_)) {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return (
                status,
                axum::Json(json!({"code": 3, "message": e.to_string()})),
            )
                .into_response();
        }
    };
    for p in packets {
        match p {
            EnginePacket::Close => {
                session.close(Disconnect::ClientClosed);
                if session.lock().polling {
                    // The waiting poll answers `6` and ends the session.
                    session.wake_poll.notify_waiters();
                } else {
                    engine.end(session).await;
                }
                break;
            }
            EnginePacket::Pong(_) => session.pong.store(true, Ordering::Release),
            EnginePacket::Ping(data) => session.send_text(Bytes::from(format!("3{data}"))),
            EnginePacket::Message(text) => session.handler.on_message(session, text),
            EnginePacket::Binary(bytes) => session.handler.on_binary(session, bytes),
            EnginePacket::Upgrade | EnginePacket::Noop => {}
        }
    }
    text_response("ok")
}

/// The life of a polling session: heartbeats, the send deadline, and the end.
async fn drive_polling(engine: Arc<Engine>, session: Arc<EngineSession>) {
    let st = &engine.settings;
    let mut next_ping = Instant::now() + st.ping_interval;
    let mut pong_due: Option<Instant> = None;
    loop {
        let (kind, polling, drained_at) = {
            let s = session.lock();
            (s.kind, s.polling, s.drained_at)
        };
        if kind == Kind::WebSocket {
            // The WebSocket owns the session from here on.
            return;
        }
        let now = Instant::now();
        if let Some(due) = pong_due {
            if session.pong.swap(false, Ordering::AcqRel) {
                pong_due = None;
            } else if now >= due {
                // The client is gone: no poll will collect a close.
                session.close(Disconnect::PongTimeout(st.ping_timeout));
                return engine.end(&session).await;
            }
        }
        let stalled_at =
            (!polling && !session.outbox.is_empty()).then(|| drained_at + st.send_deadline);
        if stalled_at.is_some_and(|at| now >= at) {
            session.close(Disconnect::SendDeadline);
            break;
        }
        if now >= next_ping && pong_due.is_none() {
            session.pong.store(false, Ordering::Release);
            session.send_text(Bytes::from_static(b"2"));
            pong_due = Some(now + st.ping_timeout);
            next_ping = now + st.ping_interval;
        }
        // Wake for the next due time; a pong or a queued frame is seen on the next check.
        let mut wake = next_ping;
        if let Some(due) = pong_due {
            wake = wake.min(due);
        }
        if let Some(at) = stalled_at {
            wake = wake.min(at);
        }
        let pong_check = Instant::now() + st.ping_timeout.min(st.send_deadline) / 4;
        let wake = if pong_due.is_some() || !session.outbox.is_empty() {
            wake.min(pong_check)
        } else {
            wake
        };
        tokio::select! {
            _ = session.outbox.closed() => break,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    if session.lock().kind == Kind::WebSocket {
        return;
    }
    session.wake_poll.notify_waiters();
    // A moment for the client's next poll to collect the close; then the session is gone.
    let _ = timeout(st.ping_timeout, async {
        while !session.ended.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    engine.end(&session).await;
}

/// A WebSocket for an existing polling session: the probe, then the session moves over.
fn upgrade_session(
    engine: &Arc<Engine>,
    session: Arc<EngineSession>,
    req: &mut Request,
) -> Response {
    // A second WebSocket for a session that has (or is getting) one is accepted, then closed.
    let duplicate = {
        let mut st = session.lock();
        let duplicate = st.kind == Kind::WebSocket || st.upgrading;
        st.upgrading = true;
        duplicate
    };
    super::ws::first_deflate_offer(req.headers_mut());
    let (response, upgraded) = match WebSocket::upgrade_with_options(req, engine.ws_options.clone())
    {
        Ok(u) => u,
        Err(_) => return EngineError::BadRequest.into_response(),
    };
    let engine = engine.clone();
    tokio::spawn(async move {
        let Ok(ws) = upgraded.await else {
            if !duplicate {
                session.lock().upgrading = false;
            }
            return;
        };
        let mut ws = Box::new(ws);
        if duplicate {
            return super::ws::close_socket(
                &mut ws,
                1008,
                "this session already has a WebSocket",
                Duration::from_secs(1),
            )
            .await;
        }
        let probed = timeout(engine.settings.upgrade_timeout, async {
            let mut probed = false;
            loop {
                let frame = ws.next_frame().await.ok()?;
                if frame.opcode() != OpCode::Text {
                    continue;
                }
                let text = std::str::from_utf8(frame.payload()).ok()?;
                match decode_text(text).ok()? {
                    EnginePacket::Ping(p) if p == "probe" && !probed => {
                        ws.send(Frame::text(Bytes::from_static(b"3probe")))
                            .await
                            .ok()?;
                        session.wake_poll.notify_waiters();
                        probed = true;
                    }
                    EnginePacket::Upgrade if probed => return Some(()),
                    _ => {}
                }
            }
        })
        .await;
        if probed.ok().flatten().is_none() {
            session.lock().upgrading = false;
            return;
        }
        {
            let mut st = session.lock();
            st.kind = Kind::WebSocket;
            st.upgrading = false;
        }
        session.wake_poll.notify_waiters();
        run_websocket(&engine, &session, ws, None).await;
    });
    response.map(Body::new)
}

/// Engine.IO packets on a WebSocket: text packets, binary messages, `3` answering the ping.
struct EngineReader<'a> {
    session: &'a Arc<EngineSession>,
}

impl Reader for EngineReader<'_> {
    fn ping(&self) -> Frame {
        Frame::text(Bytes::from_static(b"2"))
    }

    fn on_frame(&mut self, frame: Frame) -> Flow {
        match frame.opcode() {
            OpCode::Text => {
                let Ok(text) = std::str::from_utf8(frame.payload()) else {
                    return Flow::Close(Disconnect::Protocol("invalid UTF-8".into()));
                };
                match decode_text(text) {
                    Ok(EnginePacket::Pong(_)) => Flow::Pong,
                    Ok(EnginePacket::Close) => Flow::Close(Disconnect::ClientClosed),
                    Ok(EnginePacket::Ping(data)) => {
                        self.session.send_text(Bytes::from(format!("3{data}")));
                        Flow::Continue
                    }
                    Ok(EnginePacket::Message(text)) => {
                        self.session.handler.on_message(self.session, text);
                        Flow::Continue
                    }
                    Ok(EnginePacket::Binary(b)) => {
                        self.session.handler.on_binary(self.session, b);
                        Flow::Continue
                    }
                    Ok(EnginePacket::Upgrade | EnginePacket::Noop) => Flow::Continue,
                    Err(e) => Flow::Close(Disconnect::Protocol(e.to_string().into())),
                }
            }
            OpCode::Binary => {
                self.session
                    .handler
                    .on_binary(self.session, frame.into_payload());
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }
}

/// A session on its WebSocket until the end.
async fn run_websocket(
    engine: &Arc<Engine>,
    session: &Arc<EngineSession>,
    mut ws: Box<super::ws::Ws>,
    hello: Option<Bytes>,
) {
    let st = super::TransportSettings {
        ping_interval: engine.settings.ping_interval,
        ping_timeout: engine.settings.ping_timeout,
        send_deadline: engine.settings.send_deadline,
        ..super::TransportSettings::default()
    };
    let mut reader = EngineReader { session };
    let ending = pump(
        &st,
        &mut ws,
        hello,
        &session.outbox,
        &mut reader,
        Transport::SocketIo,
    )
    .await;
    if let Some(why) = ending
        && why != Disconnect::ClientClosed
    {
        if why.settles() {
            let _ = timeout(crate::drain::IN_FLIGHT_DEADLINE, session.handler.settle()).await;
            let _ = timeout(
                st.send_deadline,
                Box::pin(flush_queue(&mut ws, &session.outbox)),
            )
            .await;
        }
        let _ = timeout(Duration::from_secs(1), async {
            for packet in session.handler.farewell() {
                ws.feed(Frame::text(packet)).await?;
            }
            ws.flush().await
        })
        .await;
        super::ws::close_socket(&mut ws, 1000, &why.reason(), Duration::from_secs(1)).await;
    }
    engine.end(session).await;
}

/// Engine.IO at `path` (`/socket.io/` in production), with and without the trailing slash.
pub fn routes(path: &str, engine: Arc<Engine>) -> axum::Router {
    let bare = path.trim_end_matches('/');
    axum::Router::new()
        .route(path, axum::routing::any(handle))
        .route(bare, axum::routing::any(handle))
        .with_state(engine)
}

/// `/socket.io/echo`: an echo over the WebSocket settings of this engine, for the
/// Autobahn|Testsuite (enabled with `/ws/echo` by `--ws-echo-route`).
pub fn echo_route(engine: Arc<Engine>) -> axum::Router {
    async fn echo(
        State(engine): State<Arc<Engine>>,
        req: Request,
    ) -> Result<Response, super::ws::WsError> {
        super::ws::echo(req, engine.ws_options.clone())
    }
    axum::Router::new()
        .route("/socket.io/echo", axum::routing::get(echo))
        .with_state(engine)
}

/// Engine.IO settings from the gateway's transport settings.
pub fn settings_of(gw: &Gateway) -> EngineSettings {
    let st = &gw.settings;
    EngineSettings {
        ping_interval: st.ping_interval,
        ping_timeout: st.ping_timeout,
        max_payload: st.max_frame_bytes,
        send_queue: st.send_queue,
        send_deadline: st.send_deadline,
        upgrade_timeout: Duration::from_secs(10),
        // A session that never connects a namespace is closed as soon as a `/ws` client that
        // never authenticates.
        connect_timeout: st.auth_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_protocol_transport_and_session() {
        let q = EngineQuery::parse("EIO=4&transport=polling&t=abc&sid=xyz");
        assert_eq!(q.eio.as_deref(), Some("4"));
        assert_eq!(q.transport.as_deref(), Some("polling"));
        assert_eq!(q.sid.as_deref(), Some("xyz"));
        assert_eq!(EngineQuery::parse(""), EngineQuery::default());
    }

    #[test]
    fn engine_errors_carry_the_reference_codes() {
        assert_eq!(EngineError::UnknownTransport.code(), 0);
        assert_eq!(EngineError::UnknownSid.message(), "Session ID unknown");
        assert_eq!(EngineError::UnsupportedProtocolVersion.code(), 5);
        let r = EngineError::Forbidden.into_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}
