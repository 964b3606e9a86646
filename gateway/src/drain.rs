//! Graceful drain: hand every connection to the rest of the fleet as a smooth ramp of
//! reconnects instead of a storm, then stop.
//!
//! Triggered by SIGTERM, `POST /admin/drain`, or the pod annotation `confab.dev/drain` read from
//! a downward-API file. While draining, `/readyz` answers 503 and new upgrades get 503 +
//! `Retry-After`; each client is told `server_draining {reconnectAfterMs}` with its own slot in
//! the window, and its connection is closed (1012 on `/ws`) shortly after that slot if it has not
//! left by itself, once its in-flight requests are answered. Whatever remains at the end of the
//! window (plus that grace) is closed the same way.
//!
//! Slots cover the whole window, so a pod of N connections sheds N ÷ window reconnects per
//! second: the rate the operator's surge arithmetic assumes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::chat::ChatService;
use crate::chat::event::Outgoing;

/// Where a gateway is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    Serving,
    Draining,
    /// Every connection has been handed over; the process waits for its signal to exit.
    Drained,
}

/// The drain switch, shared by the triggers, the HTTP layer and the drain task.
pub struct Drain {
    state: watch::Sender<DrainState>,
    window: Duration,
}

/// `server_draining`'s payload.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerDraining {
    pub reconnect_after_ms: u64,
}

/// How long after its announced slot a connection that has not left is closed by the server.
const SLOT_GRACE: Duration = Duration::from_millis(1500);
/// How long a closing connection may take to answer the requests it already sent.
pub const IN_FLIGHT_DEADLINE: Duration = Duration::from_secs(5);

impl DrainState {
    /// As `GET /admin/drain` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Drained => "drained",
        }
    }
}

impl Drain {
    pub fn new(window: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: watch::channel(DrainState::Serving).0,
            window,
        })
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn state(&self) -> DrainState {
        *self.state.borrow()
    }

    /// True from the moment a drain starts: readiness fails and new connections are refused.
    pub fn is_draining(&self) -> bool {
        self.state() != DrainState::Serving
    }

    /// Starts the drain; `false` when one was already under way (every trigger is idempotent).
    pub fn begin(&self, trigger: &str) -> bool {
        let started = self.state.send_if_modified(|s| {
            if *s == DrainState::Serving {
                *s = DrainState::Draining;
                true
            } else {
                false
            }
        });
        if started {
            tracing::info!(
                target: "audit",
                trigger,
                window_s = self.window.as_secs_f64(),
                "drain started"
            );
        }
        started
    }

    fn finish(&self) {
        self.state.send_replace(DrainState::Drained);
    }

    /// Resolves once the state is at least `wanted`.
    pub async fn reached(&self, wanted: DrainState) {
        let mut rx = self.state.subscribe();
        let rank = |s: DrainState| s as u8;
        let _ = rx.wait_for(|s| rank(*s) >= rank(wanted)).await;
    }
}

/// Reconnect delays for `n` connections over `span`, one per equal stratum with a random offset
/// inside it: any interval of the span receives its share ± 1, never a clump.
pub fn schedule(n: usize, span: Duration, rng: &mut impl Rng) -> Vec<Duration> {
    if n == 0 {
        return Vec::new();
    }
    let stratum = span.as_secs_f64() / n as f64;
    (0..n)
        .map(|i| Duration::from_secs_f64(stratum * (i as f64 + rng.random::<f64>())))
        .collect()
}

/// Runs the drain once it begins: announce, close by slots, close the rest, mark drained.
pub async fn run(drain: Arc<Drain>, service: Arc<ChatService>) {
    drain.reached(DrainState::Draining).await;
    let started = Instant::now();
    let window = drain.window;
    let hub = service.hub();
    let mut outs = hub.all();
    let delays = {
        // Who reconnects first is random, so no client is always last.
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        outs.shuffle(&mut rng);
        schedule(outs.len(), window, &mut rng)
    };
    tracing::info!(
        connections = outs.len(),
        window_s = window.as_secs_f64(),
        "draining: announcing reconnect slots"
    );
    let mut slots = Vec::with_capacity(outs.len());
    let mut unsent = 0usize;
    for (out, delay) in outs.into_iter().zip(delays) {
        // Past the resume gate: a connection still attaching (its bus topics or replay on the
        // way) learns of the drain now, not once it is attached.
        let told = out.notice(&Outgoing::new(
            "server_draining",
            &ServerDraining {
                reconnect_after_ms: delay.as_millis() as u64,
            },
        ));
        if told.is_err() {
            // Gone, or its queue is full: closing it is the best it can get.
            unsent += 1;
            out.drain_close();
            continue;
        }
        slots.push((started + delay + SLOT_GRACE, out));
    }
    if unsent > 0 {
        tracing::info!(
            unsent,
            "draining: connections that could not be told were closed"
        );
    }
    // Slots are in stratum order already; closes follow them.
    let closer = tokio::spawn(async move {
        for (at, out) in slots {
            tokio::time::sleep_until(at).await;
            out.drain_close();
        }
    });
    // The last slot's client gets its grace too; then the window is over.
    let end = started + window + SLOT_GRACE;
    let mut check = tokio::time::interval(Duration::from_millis(100));
    let mut logged = started;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = check.tick() => {
                let left = hub.connection_count();
                if left == 0 {
                    break;
                }
                if logged.elapsed() >= Duration::from_secs(1) {
                    logged = Instant::now();
                    tracing::info!(connections = left, elapsed_s = started.elapsed().as_secs(), "draining");
                }
            }
        }
    }
    closer.abort();
    let rest = hub.all();
    if !rest.is_empty() {
        tracing::info!(
            connections = rest.len(),
            "drain window over: closing the rest"
        );
        for out in &rest {
            out.drain_close();
        }
        // Each close waits for its requests in flight; give them that long.
        let deadline = Instant::now() + IN_FLIGHT_DEADLINE + Duration::from_secs(1);
        while hub.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tracing::info!(
        target: "audit",
        elapsed_ms = started.elapsed().as_millis() as u64,
        left = hub.connection_count(),
        "drain finished"
    );
    drain.finish();
}

/// Whether a downward-API annotations file asks for a drain: a line `confab.dev/drain="true"`.
pub fn annotation_requests_drain(contents: &str) -> bool {
    contents.lines().any(|line| {
        line.split_once('=').is_some_and(|(key, value)| {
            key.trim() == "confab.dev/drain" && value.trim().trim_matches('"') == "true"
        })
    })
}

/// Polls the downward-API annotations file every second; begins the drain when it asks.
/// A missing or unreadable file is not an error: the annotation is simply not there (yet).
pub async fn watch_annotation_file(path: PathBuf, drain: Arc<Drain>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if drain.is_draining() {
            return;
        }
        if let Ok(contents) = tokio::fs::read_to_string(&path).await
            && annotation_requests_drain(&contents)
        {
            drain.begin("annotation confab.dev/drain");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn schedule_spreads_evenly_over_the_span() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let span = Duration::from_secs(8);
        let delays = schedule(800, span, &mut rng);
        assert_eq!(delays.len(), 800);
        assert!(delays.iter().all(|d| *d < span));
        // Every 1 s bucket gets its 100, ± 1.
        let mut buckets = [0usize; 8];
        for d in &delays {
            buckets[d.as_secs() as usize] += 1;
        }
        for (i, b) in buckets.iter().enumerate() {
            assert!((99..=101).contains(b), "second {i} got {b}");
        }
        // Any 250 ms interval too: its share is 25.
        let mut quarter = [0usize; 32];
        for d in &delays {
            quarter[(d.as_millis() / 250) as usize] += 1;
        }
        assert!(quarter.iter().all(|q| (24..=26).contains(q)), "{quarter:?}");
    }

    #[test]
    fn schedule_handles_none_and_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!(schedule(0, Duration::from_secs(10), &mut rng).is_empty());
        let one = schedule(1, Duration::from_secs(10), &mut rng);
        assert_eq!(one.len(), 1);
        assert!(one[0] < Duration::from_secs(10));
        assert!(
            schedule(3, Duration::ZERO, &mut rng)
                .iter()
                .all(|d| d.is_zero())
        );
    }

    #[test]
    fn annotation_file_is_read_as_the_downward_api_writes_it() {
        let file =
            "kubernetes.io/config.seen=\"2026-11-23T10:00:00Z\"\nconfab.dev/drain=\"true\"\n";
        assert!(annotation_requests_drain(file));
        assert!(!annotation_requests_drain("confab.dev/drain=\"false\"\n"));
        assert!(!annotation_requests_drain(
            "other/confab.dev/drain=\"true\"\n"
        ));
        assert!(!annotation_requests_drain(""));
        assert!(!annotation_requests_drain("garbage without equals\n\u{0}"));
    }

    #[tokio::test]
    async fn begin_is_idempotent_and_reached_follows_the_state() {
        let drain = Drain::new(Duration::from_secs(1));
        assert_eq!(drain.state(), DrainState::Serving);
        assert!(drain.begin("test"));
        assert!(!drain.begin("again"));
        assert!(drain.is_draining());
        drain.reached(DrainState::Draining).await;
        drain.finish();
        drain.reached(DrainState::Drained).await;
        assert_eq!(drain.state(), DrainState::Drained);
    }
}
