//! The connection lifecycle, written once for `/ws` and Socket.IO: handshake auth and address
//! throttle, register, expiry, request dispatch with the in-flight cap, the bounded send queue,
//! drain and teardown. A transport is a codec and an IO adapter over it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::Notify;

use super::protocol::ErrorReply;
use super::{Gateway, Session, dispatch};
use crate::auth::AuthError;
use crate::chat::error::ChatError;
use crate::chat::event::Outgoing;
use crate::chat::hub::{CloseReason, ConnId, Outbound, SendFailure, TopicChange};
use crate::chat::model::Identity;
use crate::chat::{ChatService, Cursors};
use crate::limits::LimitClass;
use crate::telemetry::{ConnectionGuard, Metrics, Stamp, Transport, audit};

/// Requests read but not yet run, per connection. Past this, requests are refused with
/// `rate_limited` instead of buffered without bound.
pub const REQUESTS_IN_FLIGHT: usize = 32;

/// Why a connection ends. Each transport maps it to its own close code; nothing compares the
/// reason's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// The token expired on a live connection (no `refresh_token` in time).
    Expired,
    /// The send queue was full: the client does not read.
    QueueFull,
    /// Frames waited on the socket past the send deadline: the client does not read.
    SendDeadline,
    /// No pong within the ping timeout (this long).
    PongTimeout(std::time::Duration),
    /// The server is draining: reconnect elsewhere and `sync`.
    Draining,
    /// The server is shutting down.
    Shutdown,
    /// The connection could not be completed (a backend failed).
    Internal,
    /// The client sent something the protocol does not allow; the text names it.
    Protocol(Cow<'static, str>),
    /// The client closed the connection.
    ClientClosed,
}

impl Disconnect {
    /// What the client is told (a close reason, a log line).
    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            Self::Expired => "unauthorized: token expired".into(),
            Self::QueueFull => "send queue full".into(),
            Self::SendDeadline => "send deadline exceeded: the client does not read".into(),
            Self::PongTimeout(t) => format!("no pong within {} ms", t.as_millis()).into(),
            Self::Draining => "server restarting: reconnect and sync".into(),
            Self::Shutdown => "server shutting down".into(),
            Self::Internal => "unavailable: could not complete the connection".into(),
            Self::Protocol(why) => why.clone(),
            Self::ClientClosed => "client closed".into(),
        }
    }

    /// Whether the frames already queued go out before the close.
    pub fn flushes_queue(&self) -> bool {
        matches!(self, Self::Expired | Self::Protocol(_) | Self::Draining)
    }

    /// A drain: stop reading, answer the requests already read, flush, then close.
    pub fn settles(&self) -> bool {
        matches!(self, Self::Draining)
    }

    /// Whether the client caused it by not reading (counted as a send-queue close).
    pub fn is_slow_consumer(&self) -> bool {
        matches!(self, Self::QueueFull | Self::SendDeadline)
    }
}

impl From<CloseReason> for Disconnect {
    fn from(r: CloseReason) -> Self {
        match r {
            CloseReason::QueueFull => Self::QueueFull,
            CloseReason::Shutdown => Self::Shutdown,
        }
    }
}

// ---- handshake --------------------------------------------------------------------------

/// The token of `Authorization: Bearer <token>`, the one place it is parsed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The address's connect budget, checked before a handshake does any work.
pub async fn admit(gw: &Gateway, address: IpAddr) -> Result<(), ChatError> {
    gw.service
        .throttle(LimitClass::AddressConnects, &address.to_string())
        .await
}

/// A refused token, counted and audited once here; the text is safe to show the client (it
/// never contains the token).
pub fn refused(
    gw: &Gateway,
    transport: Transport,
    label: &'static str,
    detail: &dyn std::fmt::Display,
    address: Option<IpAddr>,
) {
    gw.service.metrics().auth_failed(transport, label);
    audit::auth_failed(transport, label, detail, address);
}

/// Verifies a handshake's token: no event is processed before a valid one.
pub fn authenticate(
    gw: &Gateway,
    transport: Transport,
    token: Option<&str>,
    address: Option<IpAddr>,
) -> Result<Identity, AuthError> {
    gw.auth.verify(token.unwrap_or_default()).inspect_err(|e| {
        refused(gw, transport, e.reason(), e, address);
    })
}

// ---- the send queue ---------------------------------------------------------------------

/// One frame ready for the socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub bytes: Bytes,
    /// A binary frame (Socket.IO attachments); text otherwise.
    pub binary: bool,
    /// What the frame is timed for (a delivery, an ack), recorded once it is written.
    pub stamp: Stamp,
}

/// A bounded queue of ready-made frames for one connection. A `VecDeque` rather than a tokio
/// channel: a channel allocates its first block of slots up front, while an idle connection's
/// deque holds no allocation at all.
struct FrameQueue {
    items: Mutex<VecDeque<Queued>>,
    capacity: usize,
    ready: Notify,
    closed: AtomicBool,
}

impl FrameQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's outgoing side as the core sees it: the bounded frame queue, drained by the
/// transport's IO loop, and the first reason given to close (a `Mutex` and a `Notify` rather
/// than a watch channel, whose shared state costs every connection some 400 bytes).
pub struct Outbox {
    frames: FrameQueue,
    closing: Mutex<Option<Disconnect>>,
    close_given: Notify,
    pub metrics: Arc<Metrics>,
    pub transport: Transport,
}

impl Outbox {
    pub fn new(capacity: usize, metrics: Arc<Metrics>, transport: Transport) -> Arc<Self> {
        Arc::new(Self {
            frames: FrameQueue {
                items: Mutex::new(VecDeque::new()),
                capacity,
                ready: Notify::new(),
                closed: AtomicBool::new(false),
            },
            closing: Mutex::new(None),
            close_given: Notify::new(),
            metrics,
            transport,
        })
    }

    /// Queues a frame; a full queue is reported (and counted), never grown.
    pub fn push(&self, bytes: Bytes, binary: bool, stamp: Stamp) -> Result<(), SendFailure> {
        let mut items = self.frames.lock();
        if self.frames.closed.load(Ordering::Acquire) {
            return Err(SendFailure::Closed);
        }
        if items.len() >= self.frames.capacity {
            drop(items);
            self.metrics.send_queue_rejected(self.transport);
            return Err(SendFailure::QueueFull);
        }
        items.push_back(Queued {
            bytes,
            binary,
            stamp,
        });
        drop(items);
        self.frames.ready.notify_one();
        Ok(())
    }

    /// Queues several frames that belong together (a packet and its attachments): all or none.
    pub fn push_all(&self, frames: Vec<Queued>) -> Result<(), SendFailure> {
        let mut items = self.frames.lock();
        if self.frames.closed.load(Ordering::Acquire) {
            return Err(SendFailure::Closed);
        }
        if items.len() + frames.len() > self.frames.capacity {
            drop(items);
            self.metrics.send_queue_rejected(self.transport);
            return Err(SendFailure::QueueFull);
        }
        items.extend(frames);
        drop(items);
        self.frames.ready.notify_one();
        Ok(())
    }

    /// Queues an answer to the client's own request; a client whose queue is full is closed,
    /// never left without its answer.
    pub fn answer(&self, bytes: Bytes, stamp: Stamp) {
        if self.push(bytes, false, stamp) == Err(SendFailure::QueueFull) {
            self.close(Disconnect::QueueFull);
        }
    }

    pub fn len(&self) -> usize {
        self.frames.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn try_pop(&self) -> Option<Queued> {
        let mut items = self.frames.lock();
        let frame = items.pop_front();
        // Give back what a burst made the deque grow to.
        if items.is_empty() && items.capacity() > 16 {
            items.shrink_to_fit();
        }
        frame
    }

    /// The next frame. Cancel-safe: the queue is checked before every wait.
    pub async fn pop(&self) -> Queued {
        loop {
            if let Some(frame) = self.try_pop() {
                return frame;
            }
            self.frames.ready.notified().await;
        }
    }

    /// Resolves once a frame is queued (without taking it). Cancel-safe.
    pub async fn ready(&self) {
        loop {
            let notified = self.frames.ready.notified();
            if !self.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Asks the IO loop to close; `true` if this was the first reason given (the one the client
    /// sees). A slow consumer's close is counted here, once.
    pub fn close(&self, why: Disconnect) -> bool {
        let slow = why.is_slow_consumer();
        {
            let mut closing = self.closing_lock();
            if closing.is_some() {
                return false;
            }
            *closing = Some(why);
        }
        self.close_given.notify_waiters();
        if slow {
            self.metrics.send_queue_closed(self.transport);
        }
        true
    }

    fn closing_lock(&self) -> std::sync::MutexGuard<'_, Option<Disconnect>> {
        self.closing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves with the close reason once one is given (at once if it already is).
    /// Cancel-safe.
    pub async fn closed(&self) -> Disconnect {
        loop {
            let given = self.close_given.notified();
            let mut given = std::pin::pin!(given);
            // Registered before the reason is read, so a close in between is not missed.
            given.as_mut().enable();
            if let Some(why) = self.close_reason() {
                return why;
            }
            given.await;
        }
    }

    pub fn close_reason(&self) -> Option<Disconnect> {
        self.closing_lock().clone()
    }

    /// Refuses further frames and frees the queued ones: the connection is gone.
    pub fn shut(&self) {
        let mut items = self.frames.lock();
        self.frames.closed.store(true, Ordering::Release);
        items.clear();
        items.shrink_to_fit();
        drop(items);
        // Wake a poll waiting for frames, so it sees the end.
        self.frames.ready.notify_waiters();
    }

    pub fn is_shut(&self) -> bool {
        self.frames.closed.load(Ordering::Acquire)
    }
}

/// How a transport writes a domain event: the wire-encoding cache slot and its encoder.
#[derive(Clone, Copy)]
pub struct Codec {
    pub slot: usize,
    pub encode: fn(&Outgoing) -> Bytes,
}

/// A connection as the hub sees it: the events, encoded once per codec for every recipient,
/// go to the connection's outbox.
pub struct Endpoint {
    pub outbox: Arc<Outbox>,
    pub codec: Codec,
}

impl Outbound for Endpoint {
    fn send(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure> {
        let stamp = event.committed_at_us.map_or(Stamp::None, Stamp::Delivery);
        self.outbox.push(
            event.encoded(self.codec.slot, self.codec.encode),
            false,
            stamp,
        )
    }

    fn close(&self, reason: CloseReason) {
        self.outbox.close(reason.into());
    }

    fn drain_close(&self) {
        self.outbox.close(Disconnect::Draining);
    }
}

// ---- the connection ---------------------------------------------------------------------

/// Which hub registration a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The main namespace: conversations, requests, presence.
    Main,
    /// Socket.IO `/department`: an agent's inbox; receives only.
    Agent,
}

/// One registered connection (for Socket.IO: one namespace of a session), from register to
/// teardown.
pub struct Connection {
    pub session: Arc<Session>,
    pub identity: Arc<Identity>,
    pub role: Role,
    endpoint: Arc<Endpoint>,
    counted: Option<ConnectionGuard>,
}

impl Connection {
    /// Registers the connection before anything is read, so no event for this user is missed.
    /// Returns the topics the node must now bind. Its expiry watch ([`Connection::expiry`]) runs
    /// in the connection's worker.
    pub fn open(
        gw: &Gateway,
        identity: Identity,
        endpoint: Arc<Endpoint>,
        role: Role,
        address: Option<IpAddr>,
    ) -> Result<(Self, TopicChange), ChatError> {
        let transport = endpoint.outbox.transport;
        let identity = Arc::new(identity);
        let out: Arc<dyn Outbound> = endpoint.clone();
        let (conn, change, counted) = match role {
            Role::Main => {
                let (conn, change) = gw.service.register(&identity, out.clone());
                let counted = gw
                    .service
                    .metrics()
                    .connection_opened(transport, &identity.user_id);
                audit::connected(transport, &identity.user_id, conn, address);
                (conn, change, Some(counted))
            }
            Role::Agent => {
                let (conn, change) = gw.service.register_agent(&identity, out.clone())?;
                (conn, change, None)
            }
        };
        let session = Session::new(conn, (*identity).clone(), out, transport);
        Ok((
            Self {
                session,
                identity,
                role,
                endpoint,
                counted,
            },
            change,
        ))
    }

    /// The expiry watch: `token_expiring` ahead, `session_expired` and a close at `exp`. Run by
    /// the connection's worker task beside its requests, not by a task of its own.
    pub fn expiry(&self, gw: &Gateway) -> impl Future<Output = ()> + std::marker::Send + 'static {
        let expiring = self.endpoint.clone();
        self.session
            .clone()
            .expiry(gw.settings.token_warning, move || {
                let expired = Outgoing::new(
                    "session_expired",
                    &ErrorReply::from(&ChatError::Unauthorized("token expired".into())),
                );
                let _ = expiring.send(&expired);
                expiring.outbox.close(Disconnect::Expired);
            })
    }

    pub fn conn(&self) -> ConnId {
        self.session.conn
    }

    /// The asynchronous half of registering: bus topics and presence (for an agent, its
    /// departments' topics).
    pub async fn connected(&self, gw: &Gateway, change: TopicChange) -> Result<(), ChatError> {
        match self.role {
            Role::Main => Box::pin(gw.service.connected(&self.identity, self.conn(), change)).await,
            Role::Agent => {
                gw.service.subscribe(change).await;
                Ok(())
            }
        }
    }

    /// Unregisters: presence, bus topics, metrics and audit. Dropping the session ends its
    /// expiry watch.
    pub async fn close(mut self, gw: &Gateway) {
        let conn = self.conn();
        match self.role {
            Role::Main => {
                Box::pin(gw.service.disconnect(conn)).await;
                self.counted.take();
                audit::disconnected(self.session.transport, &self.identity.user_id, conn);
            }
            Role::Agent => gw.service.disconnect_agent(conn).await,
        }
    }
}

// ---- request dispatch -------------------------------------------------------------------

/// A request read from the socket: the event, its payload, what the transport needs to address
/// the answer, and when it was read (when metrics are on) to time its ack.
pub struct Pending<R> {
    pub event: String,
    pub payload: Value,
    pub reply_to: R,
    pub received: Option<std::time::Instant>,
}

/// A connection's requests between its reader and its worker, bounded by
/// [`REQUESTS_IN_FLIGHT`]. A `VecDeque` allocated on the first request and given back when
/// drained, rather than a tokio channel, which allocates a block of slots (and cache-padded
/// state) up front for every connection, idle or not.
struct RequestQueue<R> {
    items: Mutex<VecDeque<Pending<R>>>,
    ready: Notify,
    /// The other side is gone: the reader (no more requests) or the worker (no more answers).
    closed: AtomicBool,
}

impl<R> RequestQueue<R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending<R>>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reader's half of a connection's request queue. Dropping it lets the worker answer what
/// was already read and end.
pub struct Requests<R>(Arc<RequestQueue<R>>);

impl<R> Requests<R> {
    /// Hands a request to the worker; past the in-flight cap (or once the worker is gone) it
    /// comes back, to be refused with `rate_limited`.
    pub fn offer(&self, request: Pending<R>, metrics: &Metrics) -> Result<(), Pending<R>> {
        let mut items = self.0.lock();
        if self.0.closed.load(Ordering::Acquire) {
            return Err(request);
        }
        if items.len() >= REQUESTS_IN_FLIGHT {
            drop(items);
            metrics.rate_limited("requests_in_flight");
            return Err(request);
        }
        items.push_back(request);
        drop(items);
        self.0.ready.notify_one();
        Ok(())
    }
}

impl<R> Drop for Requests<R> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.ready.notify_one();
    }
}

/// The worker's half: the requests in the order they were read.
struct RequestsRx<R>(Arc<RequestQueue<R>>);

impl<R> RequestsRx<R> {
    /// The next request; `None` once the reader is gone and every request it left is taken.
    /// Cancel-safe.
    async fn recv(&mut self) -> Option<Pending<R>> {
        loop {
            let ready = self.0.ready.notified();
            let mut ready = std::pin::pin!(ready);
            ready.as_mut().enable();
            {
                let mut items = self.0.lock();
                if let Some(request) = items.pop_front() {
                    if items.is_empty() {
                        items.shrink_to_fit();
                    }
                    return Some(request);
                }
                if self.0.closed.load(Ordering::Acquire) {
                    return None;
                }
            }
            ready.await;
        }
    }
}

impl<R> Drop for RequestsRx<R> {
    fn drop(&mut self) {
        let mut items = self.0.lock();
        self.0.closed.store(true, Ordering::Release);
        // Requests no one will run are freed with the worker, not with the reader.
        *items = VecDeque::new();
    }
}

fn request_queue<R>() -> (Requests<R>, RequestsRx<R>) {
    let queue = Arc::new(RequestQueue {
        items: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
        closed: AtomicBool::new(false),
    });
    (Requests(queue.clone()), RequestsRx(queue))
}

/// How a transport encodes the answer to one request, or `None` when nothing is owed (a request
/// without an id or ack).
pub type Answer<R> = fn(&R, &Result<Value, ChatError>) -> Option<Bytes>;

/// The refusal of a request past the in-flight cap.
pub fn too_many_requests() -> ChatError {
    ChatError::RateLimited {
        retry_after_ms: 100,
    }
}

/// Starts the worker that completes the connection (bus topics, presence) and then runs its
/// requests one after another, in the order they arrived, so a client sees its own requests
/// take effect in order, and the connection's expiry watch between them: the one task of a
/// connection besides its IO loop. `cursors` (a resume in the handshake) replay what the client
/// missed before any live event. Answers go to `outbox`, encoded by `answer`.
pub fn spawn_worker<R: std::marker::Send + 'static>(
    gw: Arc<Gateway>,
    connection: &Connection,
    change: TopicChange,
    cursors: Option<Cursors>,
    outbox: Arc<Outbox>,
    answer: Answer<R>,
) -> (Requests<R>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = request_queue::<R>();
    let session = connection.session.clone();
    let identity = connection.identity.clone();
    let expiry = connection.expiry(&gw);
    let worker = tokio::spawn(async move {
        let mut expiry = std::pin::pin!(expiry);
        let mut expired = false;
        // The big futures are boxed, so the task an idle connection keeps is only as large as
        // its wait for the next request.
        let connected = gw
            .service
            .connected_resuming(&identity, session.conn, change, cursors);
        if let Err(e) = Box::pin(connected).await {
            tracing::warn!(error = %e, "could not complete a connection");
            outbox.close(Disconnect::Internal);
            return;
        }
        loop {
            let request = tokio::select! {
                biased;
                request = rx.recv() => match request {
                    Some(request) => request,
                    None => break,
                },
                () = &mut expiry, if !expired => {
                    expired = true;
                    continue;
                }
            };
            let Pending {
                event,
                payload,
                reply_to,
                received,
            } = request;
            let label = super::event_label(&event);
            let result = Box::pin(dispatch(&gw, &session, &event, payload)).await;
            if let Some(bytes) = answer(&reply_to, &result) {
                let stamp = received.map_or(Stamp::None, |at| Stamp::Ack(at, label));
                outbox.answer(bytes, stamp);
            }
        }
    });
    (tx, worker)
}

/// Sends a ready-made event to one connection through its endpoint (companions, notices).
pub fn notify(endpoint: &Endpoint, event: &Arc<Outgoing>) {
    ChatService::direct(endpoint, event);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(capacity: usize) -> Endpoint {
        Endpoint {
            outbox: Outbox::new(capacity, Metrics::disabled(), Transport::Ws),
            codec: Codec {
                slot: crate::chat::event::JSON_ENVELOPE,
                encode: Outgoing::build_envelope,
            },
        }
    }

    #[test]
    fn a_full_queue_is_reported_so_the_hub_closes_instead_of_dropping() {
        let ws = endpoint(1);
        let event = Outgoing::new("user_online", &serde_json::json!({"userId": "u"}));
        assert_eq!(ws.send(&event), Ok(()));
        assert_eq!(ws.send(&event), Err(SendFailure::QueueFull));
        assert_eq!(
            ws.outbox.try_pop().expect("queued").bytes.as_ref(),
            br#"{"type":"user_online","payload":{"userId":"u"}}"#
        );
        ws.close(CloseReason::QueueFull);
        ws.close(CloseReason::Shutdown);
        assert_eq!(
            ws.outbox.close_reason(),
            Some(Disconnect::QueueFull),
            "the first reason is the one the client sees"
        );
        assert_eq!(
            ws.send(&event),
            Ok(()),
            "room again once the client has read"
        );
        ws.outbox.shut();
        assert_eq!(ws.send(&event), Err(SendFailure::Closed));
        assert_eq!(
            ws.outbox.try_pop(),
            None,
            "nothing kept for a closed connection"
        );
    }

    #[test]
    fn frames_that_belong_together_are_queued_all_or_none() {
        let outbox = Outbox::new(2, Metrics::disabled(), Transport::SocketIo);
        let frame = |b: &'static [u8]| Queued {
            bytes: Bytes::from_static(b),
            binary: false,
            stamp: Stamp::None,
        };
        assert_eq!(
            outbox.push_all(vec![frame(b"a"), frame(b"b"), frame(b"c")]),
            Err(SendFailure::QueueFull)
        );
        assert!(outbox.is_empty());
        assert_eq!(outbox.push_all(vec![frame(b"a"), frame(b"b")]), Ok(()));
        assert_eq!(outbox.len(), 2);
    }

    #[tokio::test]
    async fn a_close_given_before_the_io_loop_waits_is_still_seen() {
        let outbox = Outbox::new(4, Metrics::disabled(), Transport::Ws);
        assert!(outbox.close(Disconnect::Internal));
        assert!(
            !outbox.close(Disconnect::Shutdown),
            "only the first reason counts"
        );
        let why = tokio::time::timeout(std::time::Duration::from_secs(1), outbox.closed())
            .await
            .expect("resolves at once");
        assert_eq!(why, Disconnect::Internal);
    }

    #[tokio::test]
    async fn a_close_wakes_a_waiting_io_loop() {
        let outbox = Outbox::new(4, Metrics::disabled(), Transport::SocketIo);
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.closed().await }
        });
        tokio::task::yield_now().await;
        outbox.close(Disconnect::SendDeadline);
        let why = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(why, Disconnect::SendDeadline);
    }

    fn request(n: u64) -> Pending<u64> {
        Pending {
            event: "sync".into(),
            payload: serde_json::json!({ "n": n }),
            reply_to: n,
            received: None,
        }
    }

    #[tokio::test]
    async fn requests_past_the_cap_come_back_and_the_worker_drains_after_the_reader_goes() {
        let metrics = Metrics::disabled();
        let (tx, mut rx) = request_queue::<u64>();
        for n in 0..REQUESTS_IN_FLIGHT as u64 {
            assert!(tx.offer(request(n), &metrics).is_ok());
        }
        let refused = tx
            .offer(request(99), &metrics)
            .expect_err("past the in-flight cap");
        assert_eq!(refused.reply_to, 99, "the refused request comes back whole");
        assert_eq!(rx.recv().await.map(|r| r.reply_to), Some(0));
        assert!(tx.offer(request(100), &metrics).is_ok(), "room again");
        drop(tx);
        let mut left = Vec::new();
        while let Some(r) = rx.recv().await {
            left.push(r.reply_to);
        }
        let expected: Vec<u64> = (1..REQUESTS_IN_FLIGHT as u64).chain([100]).collect();
        assert_eq!(left, expected, "what was read is still run, in order");
        assert_eq!(
            rx.0.lock().capacity(),
            0,
            "a drained queue holds no allocation"
        );
    }

    #[tokio::test]
    async fn a_request_wakes_a_waiting_worker_and_a_gone_worker_refuses_requests() {
        let metrics = Metrics::disabled();
        let (tx, mut rx) = request_queue::<u64>();
        let worker = tokio::spawn(async move {
            let first = rx.recv().await.map(|r| r.reply_to);
            (first, rx)
        });
        tokio::task::yield_now().await;
        assert!(tx.offer(request(7), &metrics).is_ok());
        let (first, rx) = tokio::time::timeout(std::time::Duration::from_secs(1), worker)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(first, Some(7));
        drop(rx);
        assert_eq!(
            tx.offer(request(8), &metrics).map_err(|r| r.reply_to),
            Err(8)
        );
    }

    #[test]
    fn only_a_bearer_authorization_yields_a_token() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            "Bearer t.k.n".parse().expect("header"),
        );
        assert_eq!(bearer(&h), Some("t.k.n"));
    }

    #[test]
    fn only_a_drain_settles_and_only_slow_consumers_count_as_queue_closes() {
        assert!(Disconnect::Draining.settles() && Disconnect::Draining.flushes_queue());
        assert!(!Disconnect::QueueFull.flushes_queue());
        assert!(Disconnect::SendDeadline.is_slow_consumer());
        assert!(!Disconnect::Expired.is_slow_consumer());
        assert_eq!(
            Disconnect::from(CloseReason::QueueFull),
            Disconnect::QueueFull
        );
    }
}
