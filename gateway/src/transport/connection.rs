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
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::Notify;

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
            CloseReason::Expired => Self::Expired,
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
    counted: Option<ConnectionGuard>,
}

impl Connection {
    /// Registers the connection before anything is read, so no event for this user is missed,
    /// and watches its token's expiry. Returns the topics the node must now bind.
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
        let session = Session::new(conn, identity.clone(), out, transport);
        gw.expiries.watch(&session);
        Ok((
            Self {
                session,
                identity,
                role,
                counted,
            },
            change,
        ))
    }

    pub fn conn(&self) -> ConnId {
        self.session.conn
    }

    /// The asynchronous half of registering, as a future the worker runs first: bus topics
    /// and presence, then the replay of a resume (for an agent, its departments' topics).
    fn completion(
        &self,
        gw: &Arc<Gateway>,
        change: TopicChange,
        cursors: Option<Cursors>,
    ) -> BoxFuture<'static, Result<(), ChatError>> {
        let (gw, identity, conn) = (gw.clone(), self.identity.clone(), self.conn());
        match self.role {
            Role::Main => Box::pin(async move {
                gw.service
                    .connected_resuming(&identity, conn, change, cursors)
                    .await
            }),
            Role::Agent => Box::pin(async move {
                gw.service.subscribe(change).await;
                Ok(())
            }),
        }
    }

    /// Unregisters: expiry watch, presence, bus topics, metrics and audit.
    pub async fn close(mut self, gw: &Gateway) {
        gw.expiries.forget(&self.session);
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

/// Completes the connection before any request runs; `false` if it could not (the connection
/// is then closed, and nothing queued runs).
type Start = BoxFuture<'static, bool>;

/// Runs one request to its answer.
type RunOne<R> = Box<dyn Fn(Pending<R>) -> BoxFuture<'static, ()> + std::marker::Send + Sync>;

/// A connection's requests between its reader and the task that runs them, bounded by
/// [`REQUESTS_IN_FLIGHT`]. The task exists only while there is work: it is started for the
/// first request after a quiet spell and ends when the queue is empty, so an idle connection
/// keeps one task (its IO loop) and an unallocated queue. Requests run one after another, in
/// the order they were read, so a client sees its own requests take effect in order.
struct RequestQueue<R> {
    state: Mutex<QueueState<R>>,
    /// The worker ended with nothing left to run (for a drain, which waits for that).
    idle: Notify,
    run: RunOne<R>,
}

struct QueueState<R> {
    items: VecDeque<Pending<R>>,
    /// A worker task runs (or is being started); what is queued now is its to run.
    running: bool,
    /// Which worker `worker` belongs to: a worker that ended before its handle was stored
    /// must not have a later one's handle taken for its own.
    generation: u64,
    worker: Option<tokio::task::AbortHandle>,
    /// The reader is gone: no more requests.
    closed: bool,
    /// The connection is gone: nothing queued runs.
    stopped: bool,
}

impl<R: std::marker::Send + 'static> RequestQueue<R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<R>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts worker `generation`, with `first` (the connection's completion) ahead of the
    /// queue.
    fn start(self: &Arc<Self>, generation: u64, first: Option<Start>) {
        let handle = tokio::spawn(work(self.clone(), first));
        let mut st = self.lock();
        if st.stopped {
            handle.abort();
        } else if st.running && st.generation == generation {
            st.worker = Some(handle.abort_handle());
        }
    }

    /// The next request, or `None` with the worker marked ended (under the same lock as
    /// `offer`, so a request is either taken by this worker or starts the next one).
    fn next(&self) -> Option<Pending<R>> {
        let mut st = self.lock();
        if !st.stopped
            && let Some(request) = st.items.pop_front()
        {
            if st.items.is_empty() {
                st.items.shrink_to_fit();
            }
            return Some(request);
        }
        st.running = false;
        st.worker = None;
        drop(st);
        self.idle.notify_waiters();
        None
    }

    fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        st.running = false;
        st.items = VecDeque::new();
        let worker = st.worker.take();
        drop(st);
        if let Some(worker) = worker {
            worker.abort();
        }
        self.idle.notify_waiters();
    }
}

/// A worker task: the connection's completion first (when given), then requests until the queue
/// is empty.
async fn work<R: std::marker::Send + 'static>(queue: Arc<RequestQueue<R>>, first: Option<Start>) {
    if let Some(first) = first
        && !first.await
    {
        queue.stop();
        return;
    }
    while let Some(request) = queue.next() {
        (queue.run)(request).await;
    }
}

/// The reader's half of a connection's request queue. Dropping it lets the worker answer what
/// was already read and end.
pub struct Requests<R: std::marker::Send + 'static>(Arc<RequestQueue<R>>);

impl<R: std::marker::Send + 'static> Requests<R> {
    /// Hands a request to the worker, starting one if none runs; past the in-flight cap (or once
    /// the connection is gone) it comes back, to be refused with `rate_limited`.
    pub fn offer(&self, request: Pending<R>, metrics: &Metrics) -> Result<(), Pending<R>> {
        let mut st = self.0.lock();
        if st.closed || st.stopped {
            return Err(request);
        }
        if st.items.len() >= REQUESTS_IN_FLIGHT {
            drop(st);
            metrics.rate_limited("requests_in_flight");
            return Err(request);
        }
        st.items.push_back(request);
        if st.running {
            return Ok(());
        }
        st.running = true;
        st.generation += 1;
        let generation = st.generation;
        drop(st);
        self.0.start(generation, None);
        Ok(())
    }
}

impl<R: std::marker::Send + 'static> Drop for Requests<R> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
    }
}

/// The connection's side of its request queue: wait for what was read to be answered (a
/// drain), or stop it (teardown; also on drop).
pub struct Worker<R: std::marker::Send + 'static>(Arc<RequestQueue<R>>);

impl<R: std::marker::Send + 'static> Worker<R> {
    /// Resolves once no worker runs: the completion and every request read are done.
    /// Cancel-safe.
    pub async fn settled(&self) {
        loop {
            let idle = self.0.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if !self.0.lock().running {
                return;
            }
            idle.await;
        }
    }

    /// The connection is gone: nothing queued runs, a running request is cancelled.
    pub fn stop(&self) {
        self.0.stop();
    }
}

impl<R: std::marker::Send + 'static> Drop for Worker<R> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A request queue whose requests `run` runs, with `first` run ahead of them.
fn request_queue<R: std::marker::Send + 'static>(
    run: RunOne<R>,
    first: Option<Start>,
) -> (Requests<R>, Worker<R>) {
    let queue = Arc::new(RequestQueue {
        state: Mutex::new(QueueState {
            items: VecDeque::new(),
            running: first.is_some(),
            generation: 1,
            worker: None,
            closed: false,
            stopped: false,
        }),
        idle: Notify::new(),
        run,
    });
    if first.is_some() {
        queue.start(1, first);
    }
    (Requests(queue.clone()), Worker(queue))
}

/// How a transport encodes the answer to one request, or `None` when nothing is owed (a request
/// without an id or ack).
pub type Answer<R> = fn(&R, &Result<super::Reply, ChatError>) -> Option<Bytes>;

/// The refusal of a request past the in-flight cap.
pub fn too_many_requests() -> ChatError {
    ChatError::RateLimited {
        retry_after_ms: 100,
    }
}

/// Starts the connection's worker: it completes the connection (bus topics, presence; for an
/// agent its departments), then runs requests as they come. `cursors` (a resume in the
/// handshake) replay what the client missed before any live event. Answers go to `outbox`,
/// encoded by `answer`. A connection that fails to complete is closed with
/// [`Disconnect::Internal`].
pub fn spawn_worker<R: std::marker::Send + 'static>(
    gw: Arc<Gateway>,
    connection: &Connection,
    change: TopicChange,
    cursors: Option<Cursors>,
    outbox: Arc<Outbox>,
    answer: Answer<R>,
) -> (Requests<R>, Worker<R>) {
    let completion = connection.completion(&gw, change, cursors);
    let first: Start = {
        let outbox = outbox.clone();
        Box::pin(async move {
            let done = completion.await;
            if let Err(e) = &done {
                tracing::warn!(error = %e, "could not complete a connection");
                outbox.close(Disconnect::Internal);
            }
            done.is_ok()
        })
    };
    let session = connection.session.clone();
    let run: RunOne<R> = Box::new(move |request: Pending<R>| {
        let (gw, session, outbox) = (gw.clone(), session.clone(), outbox.clone());
        Box::pin(async move {
            let label = super::event_label(&request.event);
            let result = Box::pin(dispatch(&gw, &session, &request.event, request.payload)).await;
            if let Some(bytes) = answer(&request.reply_to, &result) {
                let stamp = request
                    .received
                    .map_or(Stamp::None, |at| Stamp::Ack(at, label));
                outbox.answer(bytes, stamp);
            }
        })
    });
    request_queue(run, Some(first))
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

    /// A queue whose worker records what it ran, each request waiting for `gate` to open.
    fn recording(
        first: Option<Start>,
        gate: Arc<tokio::sync::Semaphore>,
    ) -> (Requests<u64>, Worker<u64>, Arc<Mutex<Vec<u64>>>) {
        let ran = Arc::new(Mutex::new(Vec::new()));
        let run: RunOne<u64> = {
            let ran = ran.clone();
            Box::new(move |r: Pending<u64>| {
                let (ran, gate) = (ran.clone(), gate.clone());
                Box::pin(async move {
                    let _permit = gate.acquire().await.expect("open");
                    ran.lock().expect("lock").push(r.reply_to);
                })
            })
        };
        let (tx, worker) = request_queue(run, first);
        (tx, worker, ran)
    }

    fn open_gate() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(
            tokio::sync::Semaphore::MAX_PERMITS,
        ))
    }

    #[tokio::test]
    async fn requests_past_the_cap_come_back_and_what_was_read_runs_in_order_after_the_reader_goes()
    {
        let metrics = Metrics::disabled();
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel::<()>();
        let first: Start = Box::pin(async move { connected_rx.await.is_ok() });
        let (tx, worker, ran) = recording(Some(first), open_gate());
        for n in 0..REQUESTS_IN_FLIGHT as u64 {
            assert!(tx.offer(request(n), &metrics).is_ok());
        }
        let refused = tx
            .offer(request(99), &metrics)
            .expect_err("past the in-flight cap");
        assert_eq!(refused.reply_to, 99, "the refused request comes back whole");
        assert!(
            ran.lock().expect("lock").is_empty(),
            "nothing runs before the connection is complete"
        );
        connected_tx.send(()).expect("worker waits");
        drop(tx);
        tokio::time::timeout(std::time::Duration::from_secs(5), worker.settled())
            .await
            .expect("settles");
        let expected: Vec<u64> = (0..REQUESTS_IN_FLIGHT as u64).collect();
        assert_eq!(
            *ran.lock().expect("lock"),
            expected,
            "what was read is still run, in order"
        );
        let st = worker.0.lock();
        assert!(!st.running && st.worker.is_none(), "no task is left");
        assert_eq!(
            st.items.capacity(),
            0,
            "a drained queue holds no allocation"
        );
    }

    #[tokio::test]
    async fn a_worker_runs_only_while_there_is_work_and_starts_again_for_the_next_request() {
        let metrics = Metrics::disabled();
        let (tx, worker, ran) = recording(None, open_gate());
        assert!(
            !worker.0.lock().running,
            "an idle connection keeps no worker"
        );
        assert!(tx.offer(request(7), &metrics).is_ok());
        worker.settled().await;
        assert!(!worker.0.lock().running);
        assert!(tx.offer(request(8), &metrics).is_ok());
        assert!(tx.offer(request(9), &metrics).is_ok());
        worker.settled().await;
        assert_eq!(*ran.lock().expect("lock"), vec![7, 8, 9]);
        let st = worker.0.lock();
        assert!(
            st.worker.is_none(),
            "an ended worker's handle is given back"
        );
    }

    #[tokio::test]
    async fn a_stopped_queue_cancels_the_running_request_and_refuses_new_ones() {
        let metrics = Metrics::disabled();
        // A gate that never opens: the first request runs forever.
        let (tx, worker, ran) = recording(None, Arc::new(tokio::sync::Semaphore::new(0)));
        assert!(tx.offer(request(1), &metrics).is_ok());
        assert!(tx.offer(request(2), &metrics).is_ok());
        tokio::task::yield_now().await;
        worker.stop();
        tokio::time::timeout(std::time::Duration::from_secs(1), worker.settled())
            .await
            .expect("a stopped queue is settled");
        assert_eq!(
            tx.offer(request(3), &metrics).map_err(|r| r.reply_to),
            Err(3)
        );
        assert!(ran.lock().expect("lock").is_empty());
        assert_eq!(
            worker.0.lock().items.capacity(),
            0,
            "what was queued is freed"
        );
    }

    #[tokio::test]
    async fn a_connection_that_cannot_complete_runs_none_of_its_requests() {
        let metrics = Metrics::disabled();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
        let first: Start = Box::pin(async move {
            let _ = failed_rx.await;
            false
        });
        let (tx, worker, ran) = recording(Some(first), open_gate());
        assert!(tx.offer(request(1), &metrics).is_ok());
        failed_tx.send(()).expect("worker waits");
        tokio::time::timeout(std::time::Duration::from_secs(1), worker.settled())
            .await
            .expect("settles");
        assert!(ran.lock().expect("lock").is_empty());
        assert!(tx.offer(request(2), &metrics).is_err());
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
