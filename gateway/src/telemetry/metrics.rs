//! The gateway's OpenTelemetry instruments, with pre-built attributes so the hot path allocates nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundHistogram, Counter, Histogram, Meter, MeterProvider, UpDownCounter,
};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::limits::LimitClass;

/// Latency buckets in seconds: 0.1 ms to 5 s, roughly ×2.5 apart.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Recipients of one broadcast on this node.
pub const FANOUT_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
/// Frames waiting in a connection's send queue.
pub const QUEUE_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A disconnect followed within this long by a connection of the same user on this node makes
/// that connection a reconnect.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// Which wire a connection or request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    SocketIo,
    Ws,
    Http,
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SocketIo => "socketio",
            Self::Ws => "ws",
            Self::Http => "http",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// A backend the chat service calls, as the `backend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Store,
    Bus,
    Presence,
    Limits,
}

impl Backend {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Bus => "bus",
            Self::Presence => "presence",
            Self::Limits => "limits",
        }
    }
}

/// Why a request was throttled, as the `class` label.
pub fn limit_class_label(class: LimitClass) -> &'static str {
    match class {
        LimitClass::UserMessages => "user_messages",
        LimitClass::ConnectionEvents => "connection_events",
        LimitClass::UserJoins => "user_joins",
        LimitClass::AddressConnects => "address_connects",
        LimitClass::UserRequests => "user_requests",
    }
}

/// Microseconds since the Unix epoch: the commit stamp carried with a message to its sockets,
/// comparable across nodes.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// What a queued frame is timed for, checked when it reaches the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stamp {
    #[default]
    None,
    /// A committed message: commit time in Unix microseconds.
    Delivery(i64),
    /// An ack: when its request was read, and the request's event.
    Ack(Instant, &'static str),
}

const TRANSPORTS: [Transport; 3] = [Transport::SocketIo, Transport::Ws, Transport::Http];

fn transport_attrs() -> [[KeyValue; 1]; 3] {
    TRANSPORTS.map(|t| [KeyValue::new("transport", t.as_str())])
}

/// The instruments touched once per delivered frame, bound to one transport's attributes so a
/// measurement is an atomic add or one histogram update, without the attribute-set lookup.
struct PerFrame {
    sent: BoundCounter<u64>,
    delivery: BoundHistogram<f64>,
    queue_depth: BoundHistogram<u64>,
}

/// Every instrument of the gateway. Cheap to call when built [`disabled`](Metrics::disabled):
/// the instruments are no-ops and the clock is not read.
pub struct Metrics {
    enabled: bool,
    /// Where `/metrics` reads from; `None` when metrics are off.
    registry: Option<prometheus::Registry>,
    /// Keeps the readers (Prometheus, OTLP) alive; flushed on shutdown.
    provider: Option<SdkMeterProvider>,
    draining: Arc<AtomicBool>,
    by_transport: [[KeyValue; 1]; 3],
    /// Socket.IO's and `/ws`'s (HTTP has no frames).
    per_frame: [PerFrame; 2],
    recent_disconnects: Mutex<RecentDisconnects>,

    connections: UpDownCounter<i64>,
    connects: Counter<u64>,
    disconnects: Counter<u64>,
    reconnects: Counter<u64>,
    messages_received: Counter<u64>,
    messages_persisted: Counter<u64>,
    ack_duration: Histogram<f64>,
    fanout_size: Histogram<u64>,
    send_queue_rejected: Counter<u64>,
    send_queue_closes: Counter<u64>,
    rate_limited: Counter<u64>,
    auth_failures: Counter<u64>,
    backend_duration: Histogram<f64>,
    backend_errors: Counter<u64>,
}

#[derive(Default)]
struct RecentDisconnects {
    at: HashMap<String, Instant>,
    next_prune: Option<Instant>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Instruments that record nothing: `CONFAB_METRICS=false`, and unit tests that do not look.
    pub fn disabled() -> Arc<Self> {
        let meter = opentelemetry::metrics::noop::NoopMeterProvider::new().meter("confab-gateway");
        Arc::new(Self::with_meter(&meter, false, None, None))
    }

    /// Instruments read by `registry` (Prometheus text at `/metrics`) and by any other reader
    /// of `provider` (OTLP).
    pub fn new(provider: SdkMeterProvider, registry: prometheus::Registry) -> Arc<Self> {
        let meter = provider.meter("confab-gateway");
        Arc::new(Self::with_meter(
            &meter,
            true,
            Some(registry),
            Some(provider),
        ))
    }

    fn with_meter(
        meter: &Meter,
        enabled: bool,
        registry: Option<prometheus::Registry>,
        provider: Option<SdkMeterProvider>,
    ) -> Self {
        let draining = Arc::new(AtomicBool::new(false));
        {
            let draining = draining.clone();
            // Registered with the meter, which keeps it alive.
            let _ = meter
                .u64_observable_gauge("confab.draining")
                .with_description("1 while this gateway drains its connections, else 0")
                .with_callback(move |o| o.observe(u64::from(draining.load(Ordering::Relaxed)), &[]))
                .build();
        }
        let latency = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        let counter = |name: &'static str, unit: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(description)
                .build()
        };
        let messages_sent = counter(
            "confab.messages.sent",
            "{message}",
            "new_message frames written to client connections (Socket.IO: handed to the socket's buffer)",
        );
        let delivery_duration = latency(
            "confab.delivery.duration",
            "From a message's commit to its frame's socket write (Socket.IO: hand-over to the socket's buffer)",
        );
        let send_queue_depth = meter
            .u64_histogram("confab.send_queue.depth")
            .with_unit("{frame}")
            .with_description(
                "Frames waiting in a /ws connection's send queue when its writer wakes",
            )
            .with_boundaries(QUEUE_BUCKETS.to_vec())
            .build();
        let by_transport = transport_attrs();
        let per_frame = [Transport::SocketIo, Transport::Ws].map(|t| {
            let attrs = [KeyValue::new("transport", t.as_str())];
            PerFrame {
                sent: messages_sent.bind(&attrs),
                delivery: delivery_duration.bind(&attrs),
                queue_depth: send_queue_depth.bind(&attrs),
            }
        });
        Self {
            enabled,
            registry,
            provider,
            draining,
            by_transport,
            per_frame,
            recent_disconnects: Mutex::default(),
            connections: meter
                .i64_up_down_counter("confab.connections")
                .with_unit("{connection}")
                .with_description("Open client connections on this gateway")
                .build(),
            connects: counter(
                "confab.connects",
                "{connection}",
                "Client connections opened (authenticated)",
            ),
            disconnects: counter(
                "confab.disconnects",
                "{connection}",
                "Client connections closed",
            ),
            reconnects: counter(
                "confab.reconnects",
                "{connection}",
                "Connections of a user whose connection on this gateway closed within the last 30 s",
            ),
            messages_received: counter(
                "confab.messages.received",
                "{message}",
                "send_message requests received",
            ),
            messages_persisted: counter(
                "confab.messages.persisted",
                "{message}",
                "Messages committed to the store (retries of a clientMsgId excluded)",
            ),
            ack_duration: latency(
                "confab.ack.duration",
                "From a request's receipt to its ack's socket write (Socket.IO: hand-over to the socket's buffer)",
            ),
            fanout_size: meter
                .u64_histogram("confab.fanout.size")
                .with_unit("{connection}")
                .with_description("Local connections an event was delivered to")
                .with_boundaries(FANOUT_BUCKETS.to_vec())
                .build(),
            send_queue_rejected: counter(
                "confab.send_queue.rejected",
                "{frame}",
                "Frames refused by a full per-connection send queue",
            ),
            send_queue_closes: counter(
                "confab.send_queue.closes",
                "{connection}",
                "Connections closed because their send queue was full",
            ),
            rate_limited: counter(
                "confab.rate_limited",
                "{event}",
                "Requests and connections refused by a rate limit",
            ),
            auth_failures: counter(
                "confab.auth.failures",
                "{attempt}",
                "Refused tokens, by reason",
            ),
            backend_duration: latency(
                "confab.backend.duration",
                "Duration of calls to a backend (store, bus, presence, limits)",
            ),
            backend_errors: counter(
                "confab.backend.errors",
                "{call}",
                "Failed calls to a backend",
            ),
        }
    }

    /// Whether measurements are recorded (clock reads on the hot path are skipped otherwise).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The Prometheus registry behind `/metrics`.
    pub fn registry(&self) -> Option<&prometheus::Registry> {
        self.registry.as_ref()
    }

    /// Flushes and stops the readers (the last OTLP export).
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::debug!(error = %e, "meter provider shutdown");
        }
    }

    fn t(&self, transport: Transport) -> &[KeyValue] {
        &self.by_transport[transport.index()]
    }

    // ---- draining ------------------------------------------------------------------------

    /// The flag behind `confab_draining`, for the drain feature to share.
    pub fn draining_flag(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    // ---- connections ---------------------------------------------------------------------

    /// An authenticated connection opened; the guard counts it closed when dropped. A user whose
    /// connection here closed within [`RECONNECT_WINDOW`] counts as a reconnect (each close
    /// matches at most one reconnect).
    pub fn connection_opened(
        self: &Arc<Self>,
        transport: Transport,
        user: &str,
    ) -> ConnectionGuard {
        if self.enabled {
            let attrs = self.t(transport);
            self.connects.add(1, attrs);
            self.connections.add(1, attrs);
            let now = Instant::now();
            let recent = self
                .recent_disconnects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .at
                .remove(user);
            if recent.is_some_and(|at| now.duration_since(at) <= RECONNECT_WINDOW) {
                self.reconnects.add(1, attrs);
            }
        }
        ConnectionGuard {
            metrics: self.clone(),
            transport,
            user: self.enabled.then(|| user.to_owned()),
        }
    }

    fn connection_closed(&self, transport: Transport, user: String) {
        let attrs = self.t(transport);
        self.disconnects.add(1, attrs);
        self.connections.add(-1, attrs);
        let now = Instant::now();
        let mut recent = self
            .recent_disconnects
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        recent.at.insert(user, now);
        // Forget old closes at most twice per window, so the map stays as small as the churn.
        if recent.next_prune.is_none_or(|t| now >= t) {
            recent
                .at
                .retain(|_, at| now.duration_since(*at) <= RECONNECT_WINDOW);
            recent.next_prune = Some(now + RECONNECT_WINDOW / 2);
        }
    }

    pub fn auth_failed(&self, transport: Transport, reason: &'static str) {
        self.auth_failures.add(
            1,
            &[
                KeyValue::new("reason", reason),
                KeyValue::new("transport", transport.as_str()),
            ],
        );
    }

    // ---- messages ------------------------------------------------------------------------

    pub fn message_received(&self, transport: Transport) {
        self.messages_received.add(1, self.t(transport));
    }

    pub fn message_persisted(&self) {
        self.messages_persisted.add(1, &[]);
    }

    /// A committed message's `new_message` frame reached the socket at `now_us` (Unix
    /// microseconds): counted as sent, and its delivery timed.
    pub fn delivered(&self, transport: Transport, committed_at_us: i64, now_us: i64) {
        let Some(hot) = self.per_frame.get(transport.index()) else {
            return;
        };
        hot.sent.add(1);
        let seconds = (now_us - committed_at_us).max(0) as f64 / 1e6;
        hot.delivery.record(seconds);
    }

    /// An ack for `event`, received at `received`, was written.
    pub fn acked(&self, transport: Transport, event: &'static str, received: Instant) {
        self.ack_duration.record(
            received.elapsed().as_secs_f64(),
            &[
                KeyValue::new("event", event),
                KeyValue::new("transport", transport.as_str()),
            ],
        );
    }

    /// Records a frame's stamp once it has been written to the socket at `now_us`.
    pub fn written(&self, transport: Transport, stamp: Stamp, now_us: i64) {
        match stamp {
            Stamp::None => {}
            Stamp::Delivery(committed) => self.delivered(transport, committed, now_us),
            Stamp::Ack(received, event) => self.acked(transport, event, received),
        }
    }

    pub fn fanout(&self, event: &'static str, recipients: usize) {
        self.fanout_size
            .record(recipients as u64, &[KeyValue::new("event", event)]);
    }

    pub fn send_queue_depth(&self, transport: Transport, depth: usize) {
        if let Some(hot) = self.per_frame.get(transport.index()) {
            hot.queue_depth.record(depth as u64);
        }
    }

    pub fn send_queue_rejected(&self, transport: Transport) {
        self.send_queue_rejected.add(1, self.t(transport));
    }

    pub fn send_queue_closed(&self, transport: Transport) {
        self.send_queue_closes.add(1, self.t(transport));
    }

    pub fn rate_limited(&self, class: &'static str) {
        self.rate_limited.add(1, &[KeyValue::new("class", class)]);
    }

    // ---- backends ------------------------------------------------------------------------

    pub fn backend_call(
        &self,
        backend: Backend,
        operation: &'static str,
        elapsed: Duration,
        failed: bool,
    ) {
        let attrs = [
            KeyValue::new("backend", backend.as_str()),
            KeyValue::new("operation", operation),
        ];
        self.backend_duration.record(elapsed.as_secs_f64(), &attrs);
        if failed {
            self.backend_errors.add(1, &attrs);
        }
    }

    /// Instruments bound to each of `operations` of `backend`, for a decorator's every call.
    pub fn bind_backend(
        self: &Arc<Self>,
        backend: Backend,
        operations: &[&'static str],
    ) -> BackendCalls {
        let calls = operations
            .iter()
            .map(|&operation| {
                let attrs = [
                    KeyValue::new("backend", backend.as_str()),
                    KeyValue::new("operation", operation),
                ];
                (
                    operation,
                    BoundCall {
                        duration: self.backend_duration.bind(&attrs),
                        errors: self.backend_errors.bind(&attrs),
                    },
                )
            })
            .collect();
        BackendCalls {
            backend,
            calls,
            metrics: self.clone(),
        }
    }

    /// A backend failure seen where no call is timed (e.g. a fail-open rate limit).
    pub fn backend_error(&self, backend: Backend, operation: &'static str) {
        self.backend_errors.add(
            1,
            &[
                KeyValue::new("backend", backend.as_str()),
                KeyValue::new("operation", operation),
            ],
        );
    }
}

struct BoundCall {
    duration: BoundHistogram<f64>,
    errors: BoundCounter<u64>,
}

/// One backend's calls, each operation's instruments bound to its labels (so timing a call does
/// not hash its attributes), from [`Metrics::bind_backend`].
pub struct BackendCalls {
    backend: Backend,
    calls: Vec<(&'static str, BoundCall)>,
    metrics: Arc<Metrics>,
}

impl BackendCalls {
    pub fn record(&self, operation: &'static str, elapsed: Duration, failed: bool) {
        match self.calls.iter().find(|(op, _)| *op == operation) {
            Some((_, call)) => {
                call.duration.record(elapsed.as_secs_f64());
                if failed {
                    call.errors.add(1);
                }
            }
            None => self
                .metrics
                .backend_call(self.backend, operation, elapsed, failed),
        }
    }
}

/// One open connection in `confab_connections`; dropping it counts the disconnect.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
    /// `None` when metrics are off: nothing to count.
    user: Option<String>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(user) = self.user.take() {
            self.metrics.connection_closed(self.transport, user);
        }
    }
}
