//! The HTTP server: the accept loop, per-connection timeouts and the connection caps.
//!
//! hyper directly rather than `axum::serve`, which sets no timer (so hyper's header read timeout
//! never runs) and has no caps. HTTP/1.1 only: WebSocket upgrades and long-polling are HTTP/1.1,
//! and TLS (with any HTTP/2) ends at the ingress.
//!
//! - **Header read timeout** (hyper's): a request head must arrive whole within it, counted from
//!   the accept and, on a kept-alive connection, from the moment it goes idle.
//! - **Idle timeout**: a connection with no request in flight and nothing read for this long is
//!   closed.
//! - **Body deadline**: a request body must have arrived this long after its head; past it the
//!   request is answered 408 and the connection closed.
//! - **Caps** on open connections, per pod and per client address (the TCP peer; peers that are
//!   trusted proxies are not capped per address). A connection over a cap is still accepted and
//!   served one request, with a short timeout: `/healthz` and `/readyz` are answered, anything else
//!   gets 503 + `Retry-After`. At most [`OVERFLOW_SLOTS`] of those at once (and
//!   [`OVERFLOW_SLOTS_PER_ADDRESS`] per address); past that a connection gets a canned 503 and is
//!   closed at once. The default pod cap leaves [`RESERVED_DESCRIPTORS`] file descriptors free, so
//!   the process never runs out of them: accept keeps working and `/healthz` keeps answering.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::telemetry::Metrics;

/// Connections over a cap that are still read for one request (health probes), at once.
pub const OVERFLOW_SLOTS: usize = 64;
/// The same, per client address: one client cannot take every slot.
pub const OVERFLOW_SLOTS_PER_ADDRESS: usize = 8;
/// How long a connection over a cap has to send its request head.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// File descriptors the default pod cap leaves for everything that is not a client: the
/// overflow slots, the listener, database files and pools, Redis, RabbitMQ, telemetry.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// Timeouts and caps, from configuration.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// The body deadline of attachment uploads (`POST …/attachments`), which are megabytes
    /// where other bodies are kilobytes; the handler authenticates before it reads a byte, so
    /// only a member can hold one open this long.
    pub upload_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// Peers not capped per address: behind them are many clients.
    pub trusted_proxies: Vec<IpAddr>,
}

/// The soft file-descriptor limit, raised to the hard one first (as Go's runtime does): a
/// container's default soft limit of 1,024 would otherwise cap a gateway meant for thousands.
pub fn descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = match (limit.current, limit.maximum) {
        (Some(current), maximum) if maximum.is_none_or(|m| m > current) => {
            let target = maximum.unwrap_or(1 << 20).min(1 << 20).max(current);
            let mut wanted = limit;
            wanted.current = Some(target);
            setrlimit(Resource::Nofile, wanted).map_or(current, |()| target)
        }
        (current, _) => current?,
    };
    Some(raised)
}

/// The pod cap: `configured`, or what the descriptor limit allows. A configured cap the limit
/// cannot hold is an error naming both.
pub fn connection_cap(configured: Option<u64>, limit: Option<u64>) -> Result<usize, String> {
    let allowed = limit.map(|l| l.saturating_sub(RESERVED_DESCRIPTORS));
    match (configured, allowed) {
        (Some(n), Some(allowed)) if n > allowed => Err(format!(
            "invalid setting CONFAB_MAX_CONNECTIONS: {n} connections need more file descriptors than the limit ({}, ulimit -n) leaves after the {RESERVED_DESCRIPTORS} the gateway keeps for itself (at most {allowed}); raise the limit or lower the setting",
            limit.unwrap_or_default()
        )),
        (Some(n), _) => Ok(n as usize),
        (None, Some(0)) => Err(format!(
            "the file descriptor limit ({}, ulimit -n) leaves no room for connections after the {RESERVED_DESCRIPTORS} the gateway keeps for itself; raise it",
            limit.unwrap_or_default()
        )),
        (None, Some(allowed)) => Ok(allowed as usize),
        (None, None) => Ok(1 << 20),
    }
}

// ---- caps ----------------------------------------------------------------------------------

#[derive(Default)]
struct AddressCount {
    open: usize,
    overflow: usize,
    /// The per-address cap was logged since this address last had no connection.
    logged: bool,
}

/// Open connections, per pod and per address.
pub struct Caps {
    max_total: usize,
    max_per_address: usize,
    exempt: Vec<IpAddr>,
    total: AtomicUsize,
    overflow: AtomicUsize,
    addresses: Mutex<HashMap<IpAddr, AddressCount>>,
    /// The pod cap was logged; re-armed once the count is back under 90 % of it.
    pod_logged: AtomicBool,
    metrics: Arc<Metrics>,
}

/// What a new connection may do.
enum Admission {
    /// Served normally; counted until dropped.
    Open(Counted),
    /// Over a cap: one request, health probes only.
    Overflow(Counted),
    /// Over a cap and no overflow slot: a canned 503.
    Refused,
}

/// One counted connection; uncounted on drop (which, for an upgraded connection, is when the
/// WebSocket closes: the counter travels inside the socket's IO).
pub struct Counted {
    caps: Arc<Caps>,
    address: IpAddr,
    overflow: bool,
}

impl Caps {
    pub fn new(settings: &ServerSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            max_total: settings.max_connections,
            max_per_address: settings.max_connections_per_address,
            exempt: settings.trusted_proxies.clone(),
            total: AtomicUsize::new(0),
            overflow: AtomicUsize::new(0),
            addresses: Mutex::new(HashMap::new()),
            pod_logged: AtomicBool::new(false),
            metrics,
        })
    }

    /// Open connections (overflow ones excluded).
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, AddressCount>> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(self: &Arc<Self>, address: IpAddr) -> Admission {
        let per_address = !self.exempt.contains(&address);
        let mut addresses = self.lock();
        let entry = addresses.entry(address).or_default();
        let pod_full = self.total.load(Ordering::Acquire) >= self.max_total;
        let address_full = per_address && entry.open >= self.max_per_address;
        if !pod_full && !address_full {
            entry.open += 1;
            self.total.fetch_add(1, Ordering::AcqRel);
            return Admission::Open(Counted {
                caps: self.clone(),
                address,
                overflow: false,
            });
        }
        // One line per cap reached, not per refusal.
        if pod_full {
            self.metrics.rate_limited("pod_connections");
            if !self.pod_logged.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    cap = self.max_total,
                    "connection cap reached (CONFAB_MAX_CONNECTIONS): new connections get 503 until some close"
                );
            }
        } else {
            self.metrics.rate_limited("address_connections");
            if !entry.logged {
                entry.logged = true;
                tracing::warn!(
                    %address,
                    cap = self.max_per_address,
                    "per-address connection cap reached (CONFAB_MAX_CONNECTIONS_PER_ADDRESS): its new connections get 503 until some close"
                );
            }
        }
        let slots = self.overflow.load(Ordering::Acquire);
        if slots >= OVERFLOW_SLOTS || entry.overflow >= OVERFLOW_SLOTS_PER_ADDRESS {
            if entry.open == 0 && entry.overflow == 0 && !entry.logged {
                addresses.remove(&address);
            }
            return Admission::Refused;
        }
        entry.overflow += 1;
        self.overflow.fetch_add(1, Ordering::AcqRel);
        Admission::Overflow(Counted {
            caps: self.clone(),
            address,
            overflow: true,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let caps = &self.caps;
        let mut addresses = caps.lock();
        if let Some(entry) = addresses.get_mut(&self.address) {
            if self.overflow {
                entry.overflow = entry.overflow.saturating_sub(1);
            } else {
                entry.open = entry.open.saturating_sub(1);
            }
            if entry.open == 0 && entry.overflow == 0 {
                addresses.remove(&self.address);
            }
        }
        drop(addresses);
        if self.overflow {
            caps.overflow.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let left = caps.total.fetch_sub(1, Ordering::AcqRel) - 1;
        if left < caps.max_total - caps.max_total / 10
            && caps.pod_logged.swap(false, Ordering::AcqRel)
        {
            tracing::info!(
                open = left,
                cap = caps.max_total,
                "back under the connection cap"
            );
        }
    }
}

// ---- activity: the idle timeout --------------------------------------------------------------

/// What the idle timeout watches: requests in flight and the last moment anything happened.
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last read, request start or request end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Release);
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Acquire))
    }

    /// Resolves once the connection has been idle for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.last() + idle;
            tokio::time::sleep_until(due).await;
            if self.in_flight.load(Ordering::Acquire) == 0 && self.last() + idle <= Instant::now() {
                return;
            }
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // Busy: look again one period from now.
                self.touch();
            }
        }
    }
}

/// A request in flight, for the idle timeout.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The accepted socket, carrying its cap counter (so an upgraded WebSocket stays counted for
/// its whole life) and noting reads for the idle timeout.
struct Tracked {
    stream: TcpStream,
    activity: Option<Arc<Activity>>,
    _counted: Counted,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && let Some(activity) = &self.activity
        {
            activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

// ---- the body deadline ---------------------------------------------------------------------

/// `POST /api/conversations/{id}/attachments`: the one route whose body is a file.
fn is_upload<B>(req: &Request<B>) -> bool {
    req.method() == axum::http::Method::POST
        && req
            .uri()
            .path()
            .strip_prefix("/api/conversations/")
            .is_some_and(|rest| rest.ends_with("/attachments") && rest.matches('/').count() == 1)
}

/// A request body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} ms")]
pub struct BodyTimeout(u128);

/// A request body that fails once its deadline has passed. The timer is only set if the body
/// ever has to be waited for.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => return Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {}
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyTimeout(this.timeout.as_millis()).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---- responses of our own ------------------------------------------------------------------

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

const OVER_CAP: &str = "too many connections to this gateway; retry shortly";

/// Written straight to a socket for which no slot is left, without reading it.
const CANNED_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 96\r\n\r\n{\"error\":{\"code\":\"unavailable\",\"message\":\"too many connections to this gateway; retry shortly\"}}";

// ---- the accept loop -----------------------------------------------------------------------

/// Serves `router` on `listener` until `shutdown` resolves, then asks every connection to finish
/// its request and close, and returns once they have (upgraded connections live on in their
/// own tasks).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ServerSettings,
    caps: Arc<Caps>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let settings = Arc::new(settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each connection task holds a receiver; all dropped = all done.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    let mut accept_failing = false;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    if accept_failing {
                        accept_failing = false;
                        tracing::info!("accepting connections again");
                    }
                    accepted
                }
                Err(e) => {
                    // Out of descriptors (or a transient network error): the connection waits
                    // in the backlog; try again shortly instead of spinning.
                    if !accept_failing {
                        accept_failing = true;
                        tracing::warn!(error = %e, "accept failed; retrying every 50 ms");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (counted, overflow) = match caps.admit(peer.ip()) {
            Admission::Refused => {
                // Best effort, never waiting: the socket is closed right after.
                let _ = stream.try_write(CANNED_503);
                continue;
            }
            Admission::Open(counted) => (counted, false),
            Admission::Overflow(counted) => (counted, true),
        };
        let conn = connection(
            stream,
            peer,
            counted,
            router.clone(),
            settings.clone(),
            overflow,
            stop_rx.clone(),
        );
        let done = done_tx.clone();
        tokio::spawn(async move {
            conn.await;
            drop(done);
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
    Ok(())
}

/// One connection's future: hyper's HTTP/1.1 with upgrades, the idle timeout, the shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    counted: Counted,
    router: Router,
    settings: Arc<ServerSettings>,
    overflow: bool,
    mut stop: watch::Receiver<bool>,
) {
    {
        {
            let activity = (!overflow).then(Activity::new);
            let io = TokioIo::new(Tracked {
                stream,
                activity: activity.clone(),
                _counted: counted,
            });
            let body_timeout = settings.body_timeout;
            let upload_timeout = settings.upload_timeout;
            let service_activity = activity.clone();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let router = router.clone();
                let busy = service_activity.as_ref().map(Busy::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                async move {
                    let _busy = busy;
                    if overflow {
                        let path = req.uri().path();
                        if path != "/healthz" && path != "/readyz" {
                            return Ok::<_, std::convert::Infallible>(error_response(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "unavailable",
                                OVER_CAP,
                            ));
                        }
                    }
                    let expired = Arc::new(AtomicBool::new(false));
                    let body_timeout = if is_upload(&req) {
                        upload_timeout
                    } else {
                        body_timeout
                    };
                    let req = req.map(|inner| {
                        Body::new(DeadlineBody {
                            inner,
                            deadline: Instant::now() + body_timeout,
                            timeout: body_timeout,
                            sleep: None,
                            expired: expired.clone(),
                        })
                    });
                    let response = match router.oneshot(req).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    if expired.load(Ordering::Acquire) {
                        // Whatever the handler made of the failed body: the client was too slow.
                        return Ok(error_response(
                            StatusCode::REQUEST_TIMEOUT,
                            "invalid",
                            &BodyTimeout(body_timeout.as_millis()).to_string(),
                        ));
                    }
                    Ok(response)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(if overflow {
                    OVERFLOW_HEADER_TIMEOUT.min(settings.header_timeout)
                } else {
                    settings.header_timeout
                })
                .keep_alive(!overflow);
            let conn = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            let idle = async {
                match &activity {
                    Some(activity) => activity.idle_for(settings.idle_timeout).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(idle);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    () = &mut idle, if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    changed = stop.wait_for(|s| *s), if !closing => {
                        let _ = changed;
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_attachment_uploads_get_the_upload_deadline() {
        let req = |method: &str, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .expect("request")
        };
        assert!(is_upload(&req(
            "POST",
            "/api/conversations/0193/attachments?name=a.png"
        )));
        assert!(!is_upload(&req(
            "GET",
            "/api/conversations/0193/attachments"
        )));
        assert!(!is_upload(&req("POST", "/api/conversations/0193/members")));
        assert!(!is_upload(&req(
            "POST",
            "/api/conversations/a/b/attachments"
        )));
        assert!(!is_upload(&req("POST", "/api/attachments")));
    }

    fn caps(total: usize, per_address: usize, exempt: Vec<IpAddr>) -> Arc<Caps> {
        let settings = ServerSettings {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            upload_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(5),
            max_connections: total,
            max_connections_per_address: per_address,
            trusted_proxies: exempt,
        };
        Caps::new(&settings, Metrics::disabled())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_address_over_its_cap_gets_overflow_slots_then_refusals_and_others_still_connect() {
        let caps = caps(100, 2, vec![]);
        let a = ip("198.51.100.1");
        let held: Vec<_> = (0..2).map(|_| caps.admit(a)).collect();
        assert!(held.iter().all(|h| matches!(h, Admission::Open(_))));
        let overflow: Vec<_> = (0..OVERFLOW_SLOTS_PER_ADDRESS)
            .map(|_| caps.admit(a))
            .collect();
        assert!(overflow.iter().all(|h| matches!(h, Admission::Overflow(_))));
        assert!(matches!(caps.admit(a), Admission::Refused));
        assert!(matches!(caps.admit(ip("198.51.100.2")), Admission::Open(_)));
        assert_eq!(caps.open(), 2, "the second address's admission was dropped");
        drop(held);
        assert_eq!(caps.open(), 0);
        assert!(matches!(caps.admit(a), Admission::Open(_)));
    }

    #[test]
    fn the_pod_cap_counts_every_address_and_a_trusted_proxy_is_not_capped_per_address() {
        let proxy = ip("10.0.0.2");
        let caps = caps(3, 1, vec![proxy]);
        let held: Vec<_> = (0..3).map(|_| caps.admit(proxy)).collect();
        assert!(held.iter().all(|h| matches!(h, Admission::Open(_))));
        assert!(matches!(
            caps.admit(ip("198.51.100.7")),
            Admission::Overflow(_)
        ));
        assert_eq!(caps.open(), 3);
    }

    #[test]
    fn overflow_slots_are_bounded_for_the_whole_pod() {
        let caps = caps(0, 0, vec![]);
        let mut held = Vec::new();
        for i in 0..OVERFLOW_SLOTS {
            let a = IpAddr::from([198, 51, (i / 200) as u8, (i % 200) as u8]);
            held.push(caps.admit(a));
        }
        assert!(held.iter().all(|h| matches!(h, Admission::Overflow(_))));
        assert!(matches!(caps.admit(ip("203.0.113.1")), Admission::Refused));
        drop(held);
        assert!(matches!(
            caps.admit(ip("203.0.113.1")),
            Admission::Overflow(_)
        ));
    }

    #[test]
    fn the_default_cap_leaves_descriptors_for_the_gateway_and_a_cap_beyond_the_limit_is_named() {
        assert_eq!(connection_cap(None, Some(1024)), Ok(1024 - 128));
        assert_eq!(connection_cap(Some(500), Some(1024)), Ok(500));
        let e = connection_cap(Some(5000), Some(1024)).expect_err("beyond the limit");
        assert!(
            e.contains("CONFAB_MAX_CONNECTIONS") && e.contains("1024"),
            "{e}"
        );
        assert!(connection_cap(None, Some(100)).is_err());
        assert_eq!(
            CANNED_503.len()
                - CANNED_503
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("head")
                - 4,
            96
        );
    }
}
