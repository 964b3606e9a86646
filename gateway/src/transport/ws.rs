//! Plain WebSocket transport `/ws` (yawc): JSON frames `{type, id?, payload}` carrying the same events as Socket.IO.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::{Instant, timeout};
use yawc::close::CloseCode;
use yawc::{CompressionLevel, DeflatePool, Frame, HttpStream, OpCode, Options, WebSocket};

use super::connection::{
    Codec, Connection, Disconnect, Endpoint, Outbox, Pending, Queued, Requests, Role, admit,
    authenticate, bearer, refused, spawn_worker, too_many_requests,
};
use super::protocol::{
    AuthRequest, ClientFrame, Connected, ErrorReply, RequestId, ServerFrame, parse, parse_cursors,
};
use super::{Gateway, client_address};
use crate::chat::Cursors;
use crate::chat::error::ChatError;
use crate::chat::event::{JSON_ENVELOPE, Outgoing};
use crate::config::WsCompression;
use crate::telemetry::metrics::unix_micros;
use crate::telemetry::{Metrics, Stamp, Transport};

/// Close codes this transport uses beyond RFC 6455's.
pub mod close_code {
    /// Bad, missing or expired token (the application range 4000–4999).
    pub const UNAUTHORIZED: u16 = 4001;
    pub const GOING_AWAY: u16 = 1001;
    /// Binary frames are not part of the protocol.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The client broke a rule: never read its socket, never answered pings.
    pub const POLICY: u16 = 1008;
    pub const INTERNAL: u16 = 1011;
    /// The server is restarting (a drain): reconnect, to another node, and `sync`.
    pub const SERVICE_RESTART: u16 = 1012;

    /// The close code of each reason the core gives.
    pub fn of(why: &super::Disconnect) -> u16 {
        use super::Disconnect as D;
        match why {
            D::Expired => UNAUTHORIZED,
            D::QueueFull | D::SendDeadline | D::PongTimeout(_) => POLICY,
            D::Draining => SERVICE_RESTART,
            D::Shutdown | D::ClientClosed => GOING_AWAY,
            D::Internal => INTERNAL,
            D::Protocol(_) => UNSUPPORTED_DATA,
        }
    }
}

/// Messages smaller than this go uncompressed: deflate costs more than it saves on them.
const COMPRESSION_THRESHOLD: usize = 1024;
/// Initial socket buffers: small so idle connections are cheap (512 B holds a typical request
/// or delivery); yawc grows them for a larger frame and shrinks them back afterwards.
const READ_BUFFER: usize = 512;
const WRITE_BUFFER: usize = 512;
/// Frames written to the socket before one flush: batching, without starving reads.
const WRITE_BATCH: usize = 64;
/// Deflate states kept for reuse between messages and connections.
const DEFLATE_POOL: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("not a WebSocket upgrade: {0}")]
    Upgrade(#[from] yawc::WebSocketError),
    #[error("too many connections from this address: {0}")]
    RateLimited(ChatError),
    #[error("{0}")]
    Invalid(ChatError),
}

impl IntoResponse for WsError {
    fn into_response(self) -> Response {
        let (status, e) = match &self {
            Self::Upgrade(_) => (
                StatusCode::BAD_REQUEST,
                ChatError::invalid(self.to_string()),
            ),
            Self::RateLimited(e) => (StatusCode::TOO_MANY_REQUESTS, e.clone()),
            Self::Invalid(e) => (StatusCode::BAD_REQUEST, e.clone()),
        };
        (status, axum::Json(ErrorReply::from(&e))).into_response()
    }
}

/// The WebSocket settings shared by `/ws` and the conformance echo route.
#[derive(Clone)]
struct WsState {
    gw: Arc<Gateway>,
    options: Options,
}

/// yawc options from the transport settings: limits on every frame and on every reassembled
/// or inflated message, UTF-8 checked (invalid text closes with 1007), deflate above 1 KiB.
pub fn options(settings: &super::TransportSettings) -> Options {
    // yawc's limits are exclusive: a message of exactly `max_frame_bytes` passes, one byte more
    // is refused, also when it arrives in continuation frames or inflates from a small frame.
    let limit = settings.max_frame_bytes + 1;
    let options = Options::default()
        .with_limits(limit, limit)
        .with_utf8()
        .with_no_delay()
        .with_read_buffer_capacity(READ_BUFFER)
        .with_write_buffer_capacity(WRITE_BUFFER);
    match settings.ws_compression {
        WsCompression::Off => options.without_compression(),
        // No server context takeover: the deflate state goes back to the shared pool after each
        // message, so an idle connection holds none.
        WsCompression::Deflate => options
            .with_compression_level(CompressionLevel::fast())
            .with_compression_threshold(COMPRESSION_THRESHOLD)
            .server_no_context_takeover()
            .with_deflate_pool(DeflatePool::new(DEFLATE_POOL)),
    }
}

/// `/ws`, and `/ws/echo` when `echo` is set (conformance testing only).
pub fn routes(gw: Arc<Gateway>, echo: bool) -> Router {
    let state = WsState {
        options: options(&gw.settings),
        gw,
    };
    let mut router = Router::new().route("/ws", get(upgrade));
    if echo {
        tracing::warn!("the /ws/echo conformance route is enabled");
        router = router.route("/ws/echo", get(upgrade_echo));
    }
    router.with_state(state)
}

#[derive(Debug, Default, Deserialize)]
struct TokenQuery {
    token: Option<String>,
    /// Resume cursors as JSON, `{"<conversationId>": lastSeq, …}`.
    cursors: Option<String>,
}

/// What the upgrade request carried: a token (`None`: expect an `auth` frame) and resume
/// cursors (from `?cursors=`, or else from the `auth` frame).
struct Handshake {
    token: Option<String>,
    cursors: Option<Cursors>,
}

/// `?cursors=` parsed; a malformed value refuses the upgrade with 400.
fn cursors_of(req: &Request) -> Result<Option<Cursors>, ChatError> {
    let Some(raw) = Query::<TokenQuery>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.cursors)
    else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_str(&raw)
        .map_err(|e| ChatError::invalid(format!("cursors is not JSON: {e}")))?;
    parse_cursors(&value).map(Some)
}

/// The token from `?token=` or `Authorization: Bearer`; `None` means "expect an `auth` frame".
fn token_of(req: &Request) -> Option<String> {
    let from_query = Query::<TokenQuery>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.token);
    from_query.or_else(|| bearer(req.headers()).map(str::to_owned))
}

/// Keeps only the first permessage-deflate offer. RFC 7692 lets a client list several offers
/// in order of preference; yawc reads the header as one offer and would decline a list, so the
/// server picks the client's first choice here.
pub(super) fn first_deflate_offer(headers: &mut HeaderMap) {
    let offers: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|o| o.trim().to_owned())
        .collect();
    if offers.len() < 2 {
        return;
    }
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    let first = offers
        .iter()
        .find(|o| o.split(';').next().map(str::trim) == Some("permessage-deflate"));
    if let Some(v) = first.and_then(|o| header::HeaderValue::from_str(o).ok()) {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
}

async fn upgrade(State(state): State<WsState>, mut req: Request) -> Result<Response, WsError> {
    let gw = state.gw;
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let address = client_address(peer, req.headers(), &gw.settings.trusted_proxies);
    admit(&gw, address).await.map_err(WsError::RateLimited)?;
    let handshake = Handshake {
        token: token_of(&req),
        cursors: cursors_of(&req).map_err(WsError::Invalid)?,
    };
    first_deflate_offer(req.headers_mut());
    let (response, upgraded) = WebSocket::upgrade_with_options(&mut req, state.options)?;
    tokio::spawn(connection(gw, upgraded, handshake, address));
    Ok(response.map(Body::new))
}

/// The task of one `/ws` connection: the rest of the handshake, then the connection.
async fn connection(
    gw: Arc<Gateway>,
    upgraded: yawc::UpgradeFut,
    handshake: Handshake,
    address: IpAddr,
) {
    // Boxed once, and out of the match before `serve` starts: a socket held by value would
    // be stored in this task's future and again in `serve`'s, for the connection's lifetime.
    let ws = match upgraded.await {
        Ok(ws) => Box::new(ws),
        Err(e) => return tracing::debug!(error = %e, "/ws upgrade did not complete"),
    };
    serve(gw, ws, handshake, address).await;
}

pub(super) type Ws = WebSocket<HttpStream>;

/// Writes the frames yawc owes the peer and queued by itself: pongs, the answer to the client's
/// close, or the close that ends a protocol error.
async fn flush_owed(ws: &mut Ws) -> Result<(), yawc::WebSocketError> {
    futures::future::poll_fn(|cx| ws.poll_ready_unpin(cx)).await?;
    ws.flush().await
}

/// Ends a connection after a read error. yawc has already queued the close for errors it finds
/// in a frame; invalid UTF-8 is found after reassembly, where closing is left to us.
async fn fail(ws: &mut Ws, e: yawc::WebSocketError) {
    let wait = Duration::from_secs(1);
    match e {
        yawc::WebSocketError::ConnectionClosed => {
            let _ = timeout(wait, flush_owed(ws)).await;
        }
        yawc::WebSocketError::InvalidUTF8 => {
            let frame = Frame::close(CloseCode::Invalid, "invalid UTF-8 in a text message");
            let _ = timeout(wait, ws.send(frame)).await;
        }
        e => {
            tracing::debug!(error = %e, "closing a /ws connection after a protocol error");
            let _ = timeout(wait, flush_owed(ws)).await;
        }
    }
}

/// Sends a close frame and gives the client a moment to answer it.
pub(super) async fn close_socket(ws: &mut Ws, code: u16, reason: &str, deadline: Duration) {
    // Close reasons are limited to 123 bytes by RFC 6455.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = Frame::close(CloseCode::from(code), &reason[..end]);
    let _ = timeout(deadline, async {
        ws.send(frame).await?;
        // Read until the client's close (or anything ending the stream) so the close is clean.
        while ws.next().await.is_some() {}
        Ok::<_, yawc::WebSocketError>(())
    })
    .await;
}

/// Why a connection ended before it was authenticated.
enum Unauthenticated {
    /// Refused with close 4001 and this reason; the first field is the metric's `reason` label.
    Refused(&'static str, String),
    /// The client went away or broke the protocol; nothing more to say to it.
    Gone,
}

impl From<String> for Unauthenticated {
    /// A client that never sent a usable `auth` frame has no token.
    fn from(reason: String) -> Self {
        Self::Refused("missing", reason)
    }
}

/// Waits for `{"type":"auth","payload":{"token","cursors"?}}` as the first data frame.
async fn auth_frame(ws: &mut Ws, deadline: Duration) -> Result<AuthRequest, Unauthenticated> {
    let until = Instant::now() + deadline;
    loop {
        let frame = match tokio::time::timeout_at(until, ws.next_frame()).await {
            Err(_) => {
                return Err(Unauthenticated::Refused(
                    "missing",
                    format!(
                        "unauthorized: missing token (no ?token=, Authorization header or auth frame within {} ms)",
                        deadline.as_millis()
                    ),
                ));
            }
            Ok(Err(e)) => {
                fail(ws, e).await;
                return Err(Unauthenticated::Gone);
            }
            Ok(Ok(frame)) => frame,
        };
        match frame.opcode() {
            OpCode::Text => {}
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Close => {
                let _ = timeout(Duration::from_secs(1), flush_owed(ws)).await;
                return Err(Unauthenticated::Gone);
            }
            _ => {
                return Err("unauthorized: the first frame must be auth"
                    .to_owned()
                    .into());
            }
        }
        // Nothing the client sent is repeated here: the reason is logged, and a client that
        // puts its token in the wrong place would find it in the audit log.
        const SHAPE: &str =
            r#"the first frame must be auth {"type":"auth","payload":{"token":"…"}}"#;
        let Ok(frame) = ClientFrame::decode(frame.payload()) else {
            return Err(format!("unauthorized: missing token; {SHAPE}: not a JSON frame").into());
        };
        if frame.kind != "auth" {
            return Err(format!("unauthorized: missing token; {SHAPE}").into());
        }
        let Ok(auth) = parse::<AuthRequest>("auth", frame.payload) else {
            return Err(format!("unauthorized: missing token; {SHAPE}: bad payload").into());
        };
        return Ok(auth);
    }
}

/// One `/ws` connection, from the upgrade to the end.
async fn serve(gw: Arc<Gateway>, mut ws: Box<Ws>, handshake: Handshake, address: IpAddr) {
    let st = &gw.settings;
    let mut cursors = Ok(handshake.cursors);
    let token = match handshake.token {
        Some(t) => Ok(t),
        None => Box::pin(auth_frame(&mut ws, st.auth_timeout))
            .await
            .map(|auth| {
                if let Some(v) = auth.cursors.filter(|v| !v.is_null()) {
                    cursors = parse_cursors(&v).map(Some);
                }
                auth.token
            }),
    };
    let identity = match token {
        Ok(t) => authenticate(&gw, Transport::Ws, Some(&t), Some(address))
            .map_err(|e| format!("unauthorized: {e}")),
        Err(Unauthenticated::Gone) => return,
        Err(Unauthenticated::Refused(label, reason)) => {
            refused(&gw, Transport::Ws, label, &reason, Some(address));
            Err(reason)
        }
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(reason) => {
            Box::pin(close_socket(
                &mut ws,
                close_code::UNAUTHORIZED,
                &reason,
                st.send_deadline,
            ))
            .await;
            return;
        }
    };

    let cursors = match cursors {
        Ok(c) => c,
        Err(e) => {
            Box::pin(close_socket(
                &mut ws,
                close_code::POLICY,
                &format!("{}: {e}", e.code()),
                st.send_deadline,
            ))
            .await;
            return;
        }
    };

    let metrics = gw.service.metrics().clone();
    let outbox = Outbox::new(st.send_queue, metrics, Transport::Ws);
    let endpoint = Arc::new(Endpoint {
        outbox: outbox.clone(),
        codec: CODEC,
    });
    // `connected` is written by the IO loop ahead of the queue, so it is always the first frame.
    let (connection, change) =
        match Connection::open(&gw, identity, endpoint, Role::Main, Some(address)) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(error = %e, "could not register a /ws connection");
                return;
            }
        };
    let connected = Connected {
        connection_id: format!("{}:{}", gw.service.settings().node_id, connection.conn()),
        server_id: gw.service.settings().node_id.clone(),
    };
    let hello = ServerFrame {
        kind: "connected",
        id: None,
        payload: connected,
    }
    .encode();

    let (requests, worker) = spawn_worker(
        gw.clone(),
        &connection,
        change,
        cursors,
        outbox.clone(),
        answer,
    );
    let mut reader = JsonReader {
        requests,
        outbox: &outbox,
    };
    let ending = pump(
        st,
        &mut ws,
        Some(Bytes::from(hello)),
        &outbox,
        &mut reader,
        Transport::Ws,
    )
    .await;
    drop(reader);
    if let Some(why) = ending {
        if why.settles() {
            // The request channel closed with the reader: the worker answers what was already
            // read and ends; its answers go out before the close.
            let _ = timeout(crate::drain::IN_FLIGHT_DEADLINE, worker.settled()).await;
            let _ = timeout(st.send_deadline, Box::pin(flush_queue(&mut ws, &outbox))).await;
        }
        Box::pin(close_socket(
            &mut ws,
            close_code::of(&why),
            &why.reason(),
            Duration::from_secs(1),
        ))
        .await;
    }
    worker.stop();
    outbox.shut();
    connection.close(&gw).await;
}

/// `/ws` frames: the `{"type":…,"payload":…}` envelope, cached in its slot of each event.
const CODEC: Codec = Codec {
    slot: JSON_ENVELOPE,
    encode: Outgoing::build_envelope,
};

/// The `ack` or `error` frame answering a request; nothing for a request without an id that
/// succeeded.
fn answer(id: &Option<RequestId>, result: &Result<super::Reply, ChatError>) -> Option<Bytes> {
    let frame = match result {
        Ok(v) if id.is_some() => ServerFrame::ack(id.as_ref(), v).encode(),
        Ok(_) => return None,
        Err(e) => ServerFrame::error(id.as_ref(), e).encode(),
    };
    Some(Bytes::from(frame))
}

/// What a reader makes of one frame from the client.
pub(super) enum Flow {
    Continue,
    /// The answer to the server's heartbeat.
    Pong,
    Close(Disconnect),
}

/// A transport's codec on the read side of [`pump`]: its heartbeat and what a frame means.
pub(super) trait Reader {
    /// The server's heartbeat frame.
    fn ping(&self) -> Frame;
    /// A text, binary or pong frame from the client.
    fn on_frame(&mut self, frame: Frame) -> Flow;
}

/// `/ws`: JSON requests for the worker; binary frames are not part of the protocol.
struct JsonReader<'a> {
    requests: Requests<Option<RequestId>>,
    outbox: &'a Outbox,
}

impl Reader for JsonReader<'_> {
    fn ping(&self) -> Frame {
        Frame::ping(Bytes::new())
    }

    fn on_frame(&mut self, frame: Frame) -> Flow {
        match frame.opcode() {
            OpCode::Text => {
                on_text(frame.payload(), &self.requests, self.outbox);
                Flow::Continue
            }
            OpCode::Binary => Flow::Close(Disconnect::Protocol(
                "binary frames are not part of the protocol; send JSON text".into(),
            )),
            OpCode::Pong => Flow::Pong,
            _ => Flow::Continue,
        }
    }
}

/// The connection's IO loop, shared by `/ws` and Socket.IO over WebSocket: writes `hello`, then
/// reads frames (through `reader`), writes queued frames in batches (feed, then flush), pings,
/// and closes a client that does not read within the send deadline or answer pings. Returns how
/// the connection should be closed, or `None` when it is already gone.
pub(super) async fn pump(
    st: &super::TransportSettings,
    ws: &mut Ws,
    hello: Option<Bytes>,
    outbox: &Outbox,
    reader: &mut impl Reader,
    transport: Transport,
) -> Option<Disconnect> {
    if let Some(hello) = hello
        && timeout(st.send_deadline, ws.send(Frame::text(hello)))
            .await
            .ok()?
            .is_err()
    {
        return None;
    }
    let mut ping = tokio::time::interval_at(Instant::now() + st.ping_interval, st.ping_interval);
    let mut pong_due: Option<Instant> = None;
    let mut depth_wakes: u32 = 0;
    loop {
        tokio::select! {
            biased;
            why = outbox.closed() => {
                if why.flushes_queue() && !why.settles() {
                    let _ = timeout(st.send_deadline, Box::pin(flush_queue(ws, outbox))).await;
                }
                return Some(why);
            }
            _ = async { tokio::time::sleep_until(pong_due.unwrap_or_else(Instant::now)).await }, if pong_due.is_some() => {
                return Some(Disconnect::PongTimeout(st.ping_timeout));
            }
            _ = ping.tick() => {
                if pong_due.is_none() {
                    pong_due = Some(Instant::now() + st.ping_timeout);
                }
                match timeout(st.send_deadline, ws.send(reader.ping())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return None,
                    Err(_) => return Some(Disconnect::SendDeadline),
                }
            }
            first = outbox.pop() => {
                let metrics = &outbox.metrics;
                depth_wakes = depth_wakes.wrapping_add(1);
                let written = timeout(st.send_deadline, Box::pin(async {
                    // Timed frames of this batch, recorded once the batch is flushed: the first
                    // few inline, any more in a Vec (stamps exist only when metrics are on).
                    let mut stamps = TimedFrames::default();
                    let mut batch = 1;
                    stamps.push(first.stamp);
                    ws.feed(frame_of(first)).await?;
                    for _ in 1..WRITE_BATCH {
                        let Some(next) = outbox.try_pop() else { break };
                        stamps.push(next.stamp);
                        ws.feed(frame_of(next)).await?;
                        batch += 1;
                    }
                    ws.flush().await?;
                    // What was waiting when the writer woke (this batch, plus what a full batch
                    // left behind), sampled: the first wake, then one in DEPTH_SAMPLE.
                    if metrics.enabled() && depth_wakes % DEPTH_SAMPLE == 1 {
                        let left = if batch == WRITE_BATCH { outbox.len() } else { 0 };
                        metrics.send_queue_depth(transport, batch + left);
                    }
                    stamps.record(metrics, transport);
                    Ok::<_, yawc::WebSocketError>(())
                })).await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return None,
                    Err(_) => return Some(Disconnect::SendDeadline),
                }
            }
            frame = ws.next_frame() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        Box::pin(fail(ws, e)).await;
                        return None;
                    }
                };
                match frame.opcode() {
                    // yawc answers pings and closes by itself.
                    OpCode::Ping | OpCode::Continuation => {}
                    OpCode::Close => {
                        let _ = timeout(Duration::from_secs(1), flush_owed(ws)).await;
                        return None;
                    }
                    _ => match reader.on_frame(frame) {
                        Flow::Continue => {}
                        Flow::Pong => pong_due = None,
                        Flow::Close(why) => {
                            if why.flushes_queue() {
                                let _ = timeout(st.send_deadline, Box::pin(flush_queue(ws, outbox))).await;
                            }
                            return Some(why);
                        }
                    },
                }
            }
        }
    }
}

fn frame_of(q: Queued) -> Frame {
    if q.binary {
        Frame::binary(q.bytes)
    } else {
        Frame::text(q.bytes)
    }
}

/// Writes every queued frame.
pub(super) async fn flush_queue(ws: &mut Ws, outbox: &Outbox) -> Result<(), yawc::WebSocketError> {
    while let Some(q) = outbox.try_pop() {
        ws.feed(frame_of(q)).await?;
    }
    ws.flush().await
}

/// The writer samples its queue depth on one wake in this many (and on the first).
const DEPTH_SAMPLE: u32 = 16;

/// The timed frames of one write batch: up to 8 inline (no allocation for the usual batch), the
/// rest in a Vec.
#[derive(Default)]
struct TimedFrames {
    inline: [Stamp; 8],
    len: usize,
    more: Vec<Stamp>,
}

impl TimedFrames {
    fn push(&mut self, stamp: Stamp) {
        if stamp == Stamp::None {
            return;
        }
        if let Some(slot) = self.inline.get_mut(self.len) {
            *slot = stamp;
            self.len += 1;
        } else {
            self.more.push(stamp);
        }
    }

    /// Records every stamp as written now.
    fn record(self, metrics: &Metrics, transport: Transport) {
        if self.len == 0 {
            return;
        }
        let now = unix_micros();
        for &stamp in self.inline[..self.len].iter().chain(&self.more) {
            metrics.written(transport, stamp, now);
        }
    }
}

/// A text frame: a request for the worker, or an `error` frame right away when it cannot be one.
fn on_text(text: &[u8], requests: &Requests<Option<RequestId>>, outbox: &Outbox) {
    let received = outbox.metrics.enabled().then(std::time::Instant::now);
    let refuse = |id, e: ChatError| {
        let stamp = received.map_or(Stamp::None, |at| Stamp::Ack(at, "other"));
        outbox.answer(Bytes::from(ServerFrame::error(id, &e).encode()), stamp)
    };
    let frame = match ClientFrame::decode(text) {
        Ok(f) => f,
        Err((id, e)) => return refuse(id.as_ref(), e),
    };
    if frame.kind == "auth" {
        let e = ChatError::invalid("already authenticated; use refresh_token to renew the token");
        return refuse(frame.id.as_ref(), e);
    }
    let pending = Pending {
        event: frame.kind,
        payload: frame.payload,
        reply_to: frame.id,
        received,
    };
    if let Err(refused) = requests.offer(pending, &outbox.metrics) {
        refuse(refused.reply_to.as_ref(), too_many_requests());
    }
}

/// `/ws/echo`: every text or binary message back as it came, over the same WebSocket settings
/// as `/ws`. For the Autobahn|Testsuite; enabled only by `--ws-echo-route`.
async fn upgrade_echo(State(state): State<WsState>, req: Request) -> Result<Response, WsError> {
    echo(req, state.options)
}

/// Upgrades with `options` and echoes every text or binary message back as it came.
pub(super) fn echo(mut req: Request, options: Options) -> Result<Response, WsError> {
    first_deflate_offer(req.headers_mut());
    let (response, upgraded) = WebSocket::upgrade_with_options(&mut req, options)?;
    tokio::spawn(async move {
        let Ok(mut ws) = upgraded.await else { return };
        loop {
            let frame = match ws.next_frame().await {
                Ok(frame) => frame,
                Err(e) => return fail(&mut ws, e).await,
            };
            let reply = match frame.opcode() {
                OpCode::Text => Frame::text(frame.into_payload()),
                OpCode::Binary => Frame::binary(frame.into_payload()),
                OpCode::Close => {
                    let _ = timeout(Duration::from_secs(1), flush_owed(&mut ws)).await;
                    return;
                }
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    });
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_with_their_id_even_when_refused() {
        let ok = ClientFrame::decode(br#"{"type":"sync","id":3,"payload":{"conversations":[]}}"#)
            .expect("valid");
        assert_eq!(ok.kind, "sync");
        assert_eq!(ok.id, Some(super::super::protocol::RequestId::Number(3)));
        let (id, e) = ClientFrame::decode(br#"{"type":"sync","id":"r1","payload":{},"x":1}"#)
            .expect_err("unknown field");
        assert_eq!(
            id,
            Some(super::super::protocol::RequestId::Text("r1".into()))
        );
        assert_eq!(e.code(), "invalid");
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
        let (id, e) = ClientFrame::decode(b"{not json").expect_err("malformed");
        assert_eq!(id, None);
        assert!(e.to_string().starts_with("malformed frame"), "{e}");
    }

    #[test]
    fn of_several_deflate_offers_the_first_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            "permessage-deflate; server_max_window_bits=9, permessage-deflate; client_max_window_bits"
                .parse()
                .expect("header"),
        );
        h.append(
            header::SEC_WEBSOCKET_EXTENSIONS,
            "x-other".parse().expect("header"),
        );
        first_deflate_offer(&mut h);
        let kept: Vec<_> = h.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().collect();
        assert_eq!(kept, ["permessage-deflate; server_max_window_bits=9"]);
        let mut single = HeaderMap::new();
        single.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            "permessage-deflate; client_max_window_bits"
                .parse()
                .expect("header"),
        );
        first_deflate_offer(&mut single);
        assert_eq!(
            single
                .get(header::SEC_WEBSOCKET_EXTENSIONS)
                .map(|v| v.as_bytes()),
            Some(&b"permessage-deflate; client_max_window_bits"[..])
        );
    }

    #[test]
    fn limits_are_inclusive_of_the_configured_size_and_deflate_is_optional() {
        let mut settings = super::super::TransportSettings::default();
        let on = options(&settings);
        assert_eq!(on.max_payload_read, Some(64 * 1024 + 1));
        assert_eq!(on.max_read_buffer, Some(64 * 1024 + 1));
        assert!(on.check_utf8);
        let deflate = on.compression.expect("deflate on by default");
        assert_eq!(deflate.compression_threshold, COMPRESSION_THRESHOLD);
        assert!(deflate.server_no_context_takeover);
        settings.ws_compression = WsCompression::Off;
        assert!(options(&settings).compression.is_none());
    }

    /// The size of the future an async fn taking these four arguments returns.
    fn future_size<A, B, C, D, Fut>(_: impl FnOnce(A, B, C, D) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn an_idle_connection_task_holds_the_socket_once_and_boxed() {
        // Held by value, the socket (nearly 1 KB) was stored in the task's future and in
        // `serve`'s: part of every idle connection's memory.
        let socket = std::mem::size_of::<Ws>();
        let serve = future_size(serve);
        assert!(serve < 2 * socket, "serve's future is {serve} bytes");
        let task = future_size(connection);
        assert!(
            task < serve + socket,
            "the task's future is {task} bytes, serve's {serve}, the socket {socket}"
        );
    }
}
