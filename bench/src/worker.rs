//! A generator process: holds its share of the clients, sends open-loop, records latencies.
//!
//! The orchestrator starts several of these (each under the per-process descriptor limit, each
//! from its own 127.x source addresses; senders in a process of their own, so a receive backlog
//! never delays a scheduled send) and drives them over stdin/stdout: a `ready` line once its
//! clients are connected and joined; `go RATE START_NS` starts a timed round at a common instant
//! (every process counts a delivery in the round its stamp belongs to, so neither a late `go` nor
//! a previous round's backlog is miscounted); a `result` line at the end; `quiet MS` waits until
//! nothing has arrived for a while; `stop`.
//!
//! One thread per process (a current-thread runtime): the counters are plain cells, and each
//! connection's task reads whatever the kernel has, then scans every frame in it
//! ([`crate::recv`]); nothing per frame crosses a task or takes a lock.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer as _, V2Serializer};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, watch};

use crate::client::{self, Client};
use crate::recv::{Scanner, Tally};
use crate::wire::{self, Incoming, Transport};
use crate::ws::Msg;

/// What one worker does; serialised onto its command line by the orchestrator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: usize,
    /// Gateways; with more than one, senders use the first and receivers the others (cross-node).
    pub urls: Vec<String>,
    pub transport: Transport,
    pub sources: Vec<IpAddr>,
    /// HS256 secret for the clients' tokens (the peers verify with the same secret).
    pub secret: String,
    /// This worker's clients are the global indices `first..first + count`.
    pub first: usize,
    pub count: usize,
    /// Conversation ids; client `i` is a member of `rooms[i % rooms.len()]`. Empty: idle clients.
    pub rooms: Vec<String>,
    /// Members `0..senders_per_room` of each room send.
    pub senders_per_room: usize,
    /// The send window of a round.
    pub duration_ms: u64,
    /// After the window: the round ends once nothing of it has arrived for `quiet_ms` and every
    /// send is answered, or `drain_ms` after the window at the latest.
    pub drain_ms: u64,
    pub quiet_ms: u64,
    /// S4: receivers drop their connections a third into the window, reconnect, re-join and
    /// sync; the round waits (up to `drain_ms`) until every one has caught up or failed.
    pub storm: bool,
    pub connect_concurrency: usize,
}

impl WorkerSpec {
    fn room_of(&self, i: usize) -> Option<usize> {
        (!self.rooms.is_empty()).then(|| i % self.rooms.len())
    }

    pub fn is_sender(&self, i: usize) -> bool {
        !self.rooms.is_empty() && i / self.rooms.len() < self.senders_per_room
    }

    fn url_of(&self, i: usize) -> &str {
        match self.urls.len() {
            0 | 1 => self.urls.first().map_or("", String::as_str),
            _ if self.is_sender(i) => &self.urls[0],
            n => &self.urls[1 + i % (n - 1)],
        }
    }
}

/// The signed token a client of user `sub` presents.
pub fn token(secret: &str, sub: &str) -> Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        name: &'a str,
        exp: u64,
    }
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 6 * 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub,
            name: sub,
            exp,
        },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

pub fn user_of(i: usize) -> String {
    format!("u{i}")
}

pub fn new_hist() -> Histogram<u64> {
    // Microseconds from 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds are valid")
}

pub fn encode_hist(h: &Histogram<u64>) -> Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("histogram serialization: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

pub fn decode_hist(s: &str) -> Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram deserialization: {e:?}"))
}

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`); 0 where unknown.
pub fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// What a worker reports at the end of a round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub worker: usize,
    pub connected: u64,
    pub failed: u64,
    /// Sends made in the round, and how they were answered by the end of it.
    pub sent: u64,
    pub accepted: u64,
    /// Refused with `rate_limited` (the server's backpressure).
    pub refused: u64,
    /// Refused with any other code.
    pub errors: u64,
    pub unanswered: u64,
    /// Deliveries of this round's messages, and of earlier rounds' (not counted).
    pub received: u64,
    pub stale: u64,
    /// From the round's start to its last delivery.
    pub last_delivery_ms: f64,
    pub ack_hist: String,
    pub recv_hist: String,
    /// Connections the server closed (or that broke) during the round; each reconnects.
    pub disconnects: u64,
    // Reconnect storm (S4): the receivers dropped at one instant.
    pub dropped: u64,
    pub reconnected: u64,
    pub caught_up: u64,
    /// Dropped clients that gave up (a connect or join failed for good) or were still catching up
    /// when the round ended.
    pub not_caught_up: u64,
    /// From the drop instant until the last of them was reconnected / caught up.
    pub all_reconnected_ms: f64,
    pub all_caught_up_ms: f64,
    /// Join and sync requests retried after `unavailable` or `rate_limited`.
    pub retries: u64,
    /// CPU time this process's thread ran during the round (all its work: one thread), so the
    /// generator's cost per delivery can be read whatever else shares its core.
    pub cpu_ms: f64,
    /// Per room: highest seq acked to a sender here.
    pub room_max_acked: Vec<u64>,
    /// Per room: receivers here, sum of their join seqs, sum of distinct seqs they saw above it.
    pub room_receivers: Vec<u64>,
    pub room_join_sum: Vec<u64>,
    pub room_seen_sum: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Setup,
    Go {
        round: u64,
        start: Instant,
        start_ns: u64,
        rate: f64,
    },
    Report,
}

/// Per-round counters; all on the worker's one thread.
#[derive(Default)]
struct Counts {
    sent: Cell<u64>,
    accepted: Cell<u64>,
    refused: Cell<u64>,
    errors: Cell<u64>,
    outstanding: Cell<u64>,
    received: Cell<u64>,
    stale: Cell<u64>,
    last_delivery_ns: Cell<u64>,
    disconnects: Cell<u64>,
    dropped: Cell<u64>,
    reconnected: Cell<u64>,
    caught_up: Cell<u64>,
    gave_up: Cell<u64>,
    all_reconnected_us: Cell<u64>,
    all_caught_up_us: Cell<u64>,
    retries: Cell<u64>,
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

fn max_into(c: &Cell<u64>, n: u64) {
    c.set(c.get().max(n));
}

struct Shared {
    spec: WorkerSpec,
    phase: watch::Receiver<Phase>,
    gate: Semaphore,
    scanner: Scanner,
    connected: Cell<u64>,
    joined: Cell<u64>,
    failed: Cell<u64>,
    reported: Cell<u64>,
    round: Cell<u64>,
    /// The current round's start (Unix ns): deliveries stamped earlier are stale.
    round_ns: Cell<u64>,
    counts: Counts,
    /// When a frame (any) / a delivery of this round last arrived.
    last_frame: Cell<Instant>,
    last_delivery: Cell<Instant>,
    ack_hist: RefCell<Histogram<u64>>,
    recv_hist: RefCell<Histogram<u64>>,
    /// Per room: max acked seq, receivers, join sum, seen sum.
    rooms: RefCell<Vec<[u64; 4]>>,
}

pub async fn run(spec: WorkerSpec) -> Result<()> {
    tokio::task::LocalSet::new()
        .run_until(run_local(spec))
        .await
}

async fn run_local(spec: WorkerSpec) -> Result<()> {
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let tag = format!("[w{}]", spec.worker);
    let sh = Rc::new(Shared {
        gate: Semaphore::new(spec.connect_concurrency.max(1)),
        phase: phase_rx,
        scanner: Scanner::default(),
        connected: Cell::new(0),
        joined: Cell::new(0),
        failed: Cell::new(0),
        reported: Cell::new(0),
        round: Cell::new(0),
        round_ns: Cell::new(u64::MAX),
        counts: Counts::default(),
        last_frame: Cell::new(Instant::now()),
        last_delivery: Cell::new(Instant::now()),
        ack_hist: RefCell::new(new_hist()),
        recv_hist: RefCell::new(new_hist()),
        rooms: RefCell::new(vec![[0; 4]; spec.rooms.len()]),
        spec,
    });

    for i in sh.spec.first..sh.spec.first + sh.spec.count {
        let sh = sh.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = client_task(&sh, i).await {
                // A client that fails is counted; the first few are shown for diagnosis.
                let n = sh.failed.get();
                sh.failed.set(n + 1);
                if n < 3 {
                    eprintln!("[w{}] client {i}: {e:#}", sh.spec.worker);
                }
            }
        });
    }

    // Progress while connecting.
    let target = sh.spec.count as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (joined, failed) = (sh.joined.get(), sh.failed.get());
        eprintln!("{tag} connected {joined}/{target} failed {failed}");
        if joined + failed >= target {
            break;
        }
    }
    // Set-up is over only when the server has finished telling rooms about the joins
    // (`user_joined` fan-out is O(n²) in a room's size).
    let waited = quiet(&sh, Duration::from_secs(1), Duration::from_secs(180)).await;
    eprintln!("{tag} set-up traffic ended after {} ms", waited.as_millis());
    println!(
        "{}",
        json!({"event": "ready", "connected": sh.joined.get(), "failed": sh.failed.get()})
    );

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let Some(line) = lines.next_line().await? else {
            // The orchestrator went away: nothing left to do.
            return Ok(());
        };
        let mut words = line.split_whitespace();
        match words.next() {
            Some("stop") => return Ok(()),
            Some("go") => {
                let rate: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
                let start_ns: u64 = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .unwrap_or_else(unix_nanos);
                let result = round(&sh, &phase_tx, rate, start_ns, &tag).await?;
                println!(
                    "{}",
                    json!({"event": "result", "result": serde_json::to_value(&result)?})
                );
            }
            Some("quiet") => {
                let max: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(10_000);
                let waited =
                    quiet(&sh, Duration::from_millis(500), Duration::from_millis(max)).await;
                println!(
                    "{}",
                    json!({"event": "quiet", "waited_ms": waited.as_millis() as u64})
                );
            }
            _ => {}
        }
    }
}

/// Waits until no frame has arrived for `gap` (at most `max`); returns how long it waited.
async fn quiet(sh: &Shared, gap: Duration, max: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < max && sh.last_frame.get().elapsed() < gap {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

async fn round(
    sh: &Shared,
    phase_tx: &watch::Sender<Phase>,
    rate: f64,
    start_ns: u64,
    tag: &str,
) -> Result<WorkerResult> {
    let c = &sh.counts;
    for cell in [
        &c.sent,
        &c.accepted,
        &c.refused,
        &c.errors,
        &c.outstanding,
        &c.received,
        &c.stale,
        &c.last_delivery_ns,
        &c.disconnects,
        &c.dropped,
        &c.reconnected,
        &c.caught_up,
        &c.gave_up,
        &c.all_reconnected_us,
        &c.all_caught_up_us,
        &c.retries,
    ] {
        cell.set(0);
    }
    sh.reported.set(0);
    sh.ack_hist.borrow_mut().reset();
    sh.recv_hist.borrow_mut().reset();
    for r in sh.rooms.borrow_mut().iter_mut() {
        *r = [0; 4];
    }
    let now_ns = unix_nanos();
    if start_ns < now_ns {
        eprintln!(
            "{tag} go arrived {} ms after the round's start",
            (now_ns - start_ns) / 1_000_000
        );
    }
    let start = Instant::now() + Duration::from_nanos(start_ns.saturating_sub(now_ns));
    let cpu0 = thread_cpu_ns();
    let id = sh.round.get() + 1;
    sh.round.set(id);
    sh.round_ns.set(start_ns);
    phase_tx.send_replace(Phase::Go {
        round: id,
        start,
        start_ns,
        rate,
    });
    let window_end = start + Duration::from_millis(sh.spec.duration_ms);
    let deadline = window_end + Duration::from_millis(sh.spec.drain_ms);
    let quiet = Duration::from_millis(sh.spec.quiet_ms);
    let mut next_log = Instant::now() + Duration::from_secs(1);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        if now >= next_log {
            next_log = now + Duration::from_secs(1);
            eprintln!(
                "{tag} t={:.0}s sent {} accepted {} refused {} recv {} stale {} dropped {} reconnected {} caught up {} failed {}",
                now.saturating_duration_since(start).as_secs_f64(),
                c.sent.get(),
                c.accepted.get(),
                c.refused.get(),
                c.received.get(),
                c.stale.get(),
                c.dropped.get(),
                c.reconnected.get(),
                c.caught_up.get(),
                sh.failed.get(),
            );
        }
        if now < window_end {
            continue;
        }
        if now >= deadline {
            break;
        }
        let settled = c.outstanding.get() == 0
            && sh.last_delivery.get().max(window_end).elapsed() >= quiet
            && (!sh.spec.storm || c.caught_up.get() + c.gave_up.get() >= c.dropped.get());
        if settled {
            break;
        }
    }
    let cpu_ms = thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e6;
    phase_tx.send_replace(Phase::Report);
    // Every live client folds its per-room counts in; the ones that died are counted as failed.
    let until = Instant::now() + Duration::from_secs(10);
    while sh.reported.get() + sh.failed.get() < sh.spec.count as u64 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rooms = sh.rooms.borrow().clone();
    let answered = c.accepted.get() + c.refused.get() + c.errors.get();
    let since_start = |ns: u64| ns.saturating_sub(start_ns) as f64 / 1e6;
    Ok(WorkerResult {
        worker: sh.spec.worker,
        connected: sh.connected.get(),
        failed: sh.failed.get(),
        sent: c.sent.get(),
        accepted: c.accepted.get(),
        refused: c.refused.get(),
        errors: c.errors.get(),
        unanswered: c.sent.get().saturating_sub(answered),
        received: c.received.get(),
        stale: c.stale.get(),
        last_delivery_ms: if c.last_delivery_ns.get() == 0 {
            0.0
        } else {
            since_start(c.last_delivery_ns.get())
        },
        ack_hist: encode_hist(&sh.ack_hist.borrow())?,
        recv_hist: encode_hist(&sh.recv_hist.borrow())?,
        disconnects: c.disconnects.get(),
        dropped: c.dropped.get(),
        reconnected: c.reconnected.get(),
        caught_up: c.caught_up.get(),
        not_caught_up: c.dropped.get().saturating_sub(c.caught_up.get()),
        all_reconnected_ms: c.all_reconnected_us.get() as f64 / 1000.0,
        all_caught_up_ms: c.all_caught_up_us.get() as f64 / 1000.0,
        retries: c.retries.get(),
        cpu_ms,
        room_max_acked: rooms.iter().map(|r| r[0]).collect(),
        room_receivers: rooms.iter().map(|r| r[1]).collect(),
        room_join_sum: rooms.iter().map(|r| r[2]).collect(),
        room_seen_sum: rooms.iter().map(|r| r[3]).collect(),
    })
}

/// Connects with a few retries: a full listen backlog drops SYNs, which is load, not failure.
async fn connect_retrying(
    spec: &WorkerSpec,
    i: usize,
    token: &str,
    source: IpAddr,
    cursors: Option<Value>,
) -> Result<Client> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match client::connect_resuming(
            spec.url_of(i),
            spec.transport,
            token,
            source,
            cursors.as_ref(),
        )
        .await
        {
            Ok(c) => return Ok(c),
            Err(e) if attempt >= 8 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(jittered(delay)).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn jittered(d: Duration) -> Duration {
    d + Duration::from_millis(rand::rng().random_range(0..=d.as_millis() as u64))
}

/// Per-client receive bookkeeping for the storm's loss count.
#[derive(Default)]
struct Seen {
    join_seq: u64,
    seqs: HashSet<u64>,
}

impl Seen {
    fn contiguous(&self) -> u64 {
        let mut n = self.join_seq;
        while self.seqs.contains(&(n + 1)) {
            n += 1;
        }
        n
    }

    fn add_messages(&mut self, v: &Value) -> u64 {
        let mut top = 0;
        if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
            for m in msgs {
                if let Some(s) = m.get("seq").and_then(Value::as_u64) {
                    self.seqs.insert(s);
                    top = top.max(s);
                }
            }
        }
        top
    }
}

/// The first join, during set-up.
async fn join(client: &mut Client, room: &str, seen: &mut Seen, scanner: &Scanner) -> Result<u64> {
    let t = client.transport;
    let v = client
        .call("join_conversation", &json!({"conversationId": room}), |f| {
            if let Some(d) = scanner.delivery(t, f.as_bytes()) {
                seen.seqs.insert(d.seq);
            }
        })
        .await?;
    Ok(v.get("lastSeq").and_then(Value::as_u64).unwrap_or(0))
}

/// Where a client is in getting back after its connection was lost.
enum Recovery {
    Live,
    /// A join (or, after a retry delay, the next one) is awaited.
    Joining {
        id: u64,
    },
    Syncing {
        id: u64,
        after: u64,
    },
    /// Waiting to retry the request that was refused.
    RetryAt {
        at: Instant,
        sync: bool,
    },
}

type Connecting<'a> = Pin<Box<dyn Future<Output = Result<Client>> + 'a>>;

async fn tick(t: &mut Option<tokio::time::Interval>) -> tokio::time::Instant {
    match t {
        Some(t) => t.tick().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn connecting(c: &mut Option<Connecting<'_>>) -> Result<Client> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn read(c: &mut Option<Client>) -> Result<usize> {
    match c {
        Some(c) => c.conn.read().await,
        None => std::future::pending().await,
    }
}

/// A frame the hot path does not handle, copied out of the read buffer.
enum Cold {
    Text(Vec<u8>),
    Ping(Vec<u8>),
}

async fn client_task(sh: &Shared, i: usize) -> Result<()> {
    let spec = &sh.spec;
    let user = user_of(i);
    let token = token(&spec.secret, &user)?;
    let source = spec.sources[i % spec.sources.len().max(1)];
    let room_idx = spec.room_of(i);
    let room = room_idx.map(|r| spec.rooms[r].clone());
    let sender = spec.is_sender(i);
    let transport = spec.transport;
    // Seqs are only tracked where the loss count needs them (a set insert per delivery).
    let track = spec.storm && !sender;
    let mut seen = Seen::default();
    let mut client = {
        let _permit = sh.gate.acquire().await.context("connect gate closed")?;
        let mut c = connect_retrying(spec, i, &token, source, None).await?;
        add(&sh.connected, 1);
        if let Some(room) = &room {
            seen.join_seq = join(&mut c, room, &mut seen, &sh.scanner).await?;
            let j = seen.join_seq;
            seen.seqs.retain(|&s| s > j);
        }
        Some(c)
    };
    add(&sh.joined, 1);

    let mut phase = sh.phase.clone();
    let c = &sh.counts;
    let mut pending: HashMap<u64, (Instant, u64)> = HashMap::new();
    // The cursor a storm's reconnect resumes from (and the cursors it sent).
    let mut resumed_from: Option<(u64, Value)> = None;
    let mut ticker: Option<tokio::time::Interval> = None;
    let mut window_end = Instant::now();
    let mut round_id = 0u64;
    let mut wall = 0u64;
    let mut start = Instant::now();
    let mut drop_at: Option<Instant> = None;
    let mut storm_drop: Option<Instant> = None;
    let mut reconnect: Option<Connecting<'_>> = None;
    let mut recovery = Recovery::Live;
    let mut retry_delay = Duration::from_millis(100);
    let mut max_acked = 0u64;
    let mut n_sent = 0u64;
    let mut tally = Tally::default();
    let mut cold: Vec<Cold> = Vec::new();
    loop {
        let retry_at = match recovery {
            Recovery::RetryAt { at, .. } => Some(at),
            _ => None,
        };
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let p = *phase.borrow_and_update();
                match p {
                    Phase::Setup => {}
                    Phase::Go { round, start: s, start_ns, rate } => {
                        round_id = round;
                        start = s;
                        wall = start_ns;
                        window_end = s + Duration::from_millis(spec.duration_ms);
                        pending.retain(|_, (_, r)| *r == round);
                        if sender && rate > 0.0 {
                            let period = Duration::from_secs_f64(1.0 / rate);
                            // A random phase spreads the senders over the period.
                            let offset = period.mul_f64(rand::rng().random::<f64>());
                            let mut t = tokio::time::interval_at((s + offset).into(), period);
                            // Burst: late ticks fire at once and keep their scheduled times,
                            // so a stall shows up as latency (coordinated omission).
                            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                            ticker = Some(t);
                        }
                        if spec.storm && !sender {
                            drop_at = Some(s + Duration::from_millis(spec.duration_ms / 3));
                        }
                    }
                    Phase::Report => {
                        ticker = None;
                        drop_at = None;
                        if let Some(r) = room_idx {
                            let mut rooms = sh.rooms.borrow_mut();
                            let e = &mut rooms[r];
                            e[0] = e[0].max(max_acked);
                            if !sender {
                                e[1] += 1;
                                e[2] += seen.join_seq;
                                e[3] += seen.seqs.iter().filter(|&&s| s > seen.join_seq).count() as u64;
                            }
                        }
                        add(&sh.reported, 1);
                    }
                }
            }
            sched = tick(&mut ticker) => {
                let sched = sched.into_std();
                if sched >= window_end {
                    ticker = None;
                    continue;
                }
                let Some(cl) = client.as_mut() else { continue };
                let sched_wall = wall + u64::try_from(sched.saturating_duration_since(start).as_nanos()).unwrap_or(0);
                n_sent += 1;
                let payload = json!({
                    "conversationId": room.as_deref().unwrap_or_default(),
                    "content": wire::stamp(u128::from(sched_wall), n_sent),
                    "type": "text",
                    "clientMsgId": format!("{user}-{n_sent}"),
                });
                let id = cl.send_request("send_message", &payload).await?;
                pending.insert(id, (sched, round_id));
                add(&c.sent, 1);
                add(&c.outstanding, 1);
            }
            () = sleep_until(drop_at) => {
                // Times are from the scheduled instant every receiver drops at.
                storm_drop = drop_at.take();
                // Dropped without a close frame, as when a network path dies.
                client = None;
                add(&c.dropped, 1);
                // The storm resumes in the handshake: the cursor of what arrived in order.
                resumed_from = room.as_deref().map(|r| {
                    let after = seen.contiguous();
                    (after, json!({ r: after }))
                });
                let cursors = resumed_from.as_ref().map(|(_, c)| c.clone());
                reconnect = Some(Box::pin(connect_retrying(spec, i, &token, source, cursors)));
            }
            () = sleep_until(retry_at) => {
                let Some(cl) = client.as_mut() else { continue };
                let Recovery::RetryAt { sync, .. } = recovery else { continue };
                recovery = if sync {
                    let after = seen.contiguous();
                    Recovery::Syncing { id: send_sync(cl, room.as_deref(), after).await?, after }
                } else {
                    Recovery::Joining { id: cl.send_request("join_conversation", &json!({"conversationId": room})).await? }
                };
            }
            r = connecting(&mut reconnect) => {
                reconnect = None;
                let mut cl = match r {
                    Ok(cl) => cl,
                    Err(e) => {
                        if storm_drop.is_some() {
                            add(&c.gave_up, 1);
                        }
                        return Err(e.context("reconnecting"));
                    }
                };
                if let Some(at) = storm_drop {
                    add(&c.reconnected, 1);
                    max_into(&c.all_reconnected_us, at.elapsed().as_micros() as u64);
                }
                recovery = match (&room, resumed_from.take()) {
                    // Resumed: no join. The server answers requests only after its replay, so
                    // this sync's answer marks the catch-up: what the replay left (a truncated
                    // replay's rest), usually nothing.
                    (Some(_), Some((after, _))) => Recovery::Syncing { id: send_sync(&mut cl, room.as_deref(), after).await?, after },
                    (Some(_), None) => Recovery::Joining { id: cl.send_request("join_conversation", &json!({"conversationId": room})).await? },
                    (None, _) => Recovery::Live,
                };
                client = Some(cl);
            }
            n = read(&mut client) => {
                let closed = match n {
                    Ok(0) | Err(_) => true,
                    Ok(_) => {
                        let Some(cl) = client.as_mut() else { continue };
                        let now_ns = unix_nanos();
                        let round_ns = sh.round_ns.get();
                        let mut closed = false;
                        let scanner = &sh.scanner;
                        let parsed = cl.conn.frames(|m| match m {
                            Msg::Text(t) => match scanner.delivery(transport, t) {
                                Some(d) => {
                                    tally.delivery(d, now_ns, round_ns);
                                    if track {
                                        seen.seqs.insert(d.seq);
                                    }
                                }
                                None => cold.push(Cold::Text(t.to_vec())),
                            },
                            Msg::Ping(p) => cold.push(Cold::Ping(p.to_vec())),
                            Msg::Close => closed = true,
                        });
                        let now = Instant::now();
                        sh.last_frame.set(now);
                        let (got, stale) = tally.flush(&mut sh.recv_hist.borrow_mut());
                        if got > 0 {
                            add(&c.received, got);
                            max_into(&c.last_delivery_ns, now_ns);
                            sh.last_delivery.set(now);
                        }
                        add(&c.stale, stale);
                        closed || parsed.is_err()
                    }
                };
                if closed {
                    cold.clear();
                    client = None;
                    add(&c.disconnects, 1);
                    // The server closed it (a full send queue, a restart): reconnect and catch
                    // up, as a real client does; the row shows the disconnect.
                    if reconnect.is_none() {
                        storm_drop = None;
                        reconnect = Some(Box::pin(connect_retrying(spec, i, &token, source, None)));
                    }
                    continue;
                }
                let Some(cl) = client.as_mut() else { continue };
                for f in cold.drain(..) {
                    let text = match f {
                        Cold::Ping(p) => {
                            cl.conn.pong(&p).await?;
                            continue;
                        }
                        Cold::Text(t) => t,
                    };
                    let Ok(text) = std::str::from_utf8(&text) else { continue };
                    match wire::classify(transport, text) {
                        Incoming::Ping => cl.conn.send_text(wire::PONG).await?,
                        Incoming::Ack { id, body } => {
                            if let Some((sched, r)) = pending.remove(&id) {
                                if r != round_id {
                                    continue;
                                }
                                c.outstanding.set(c.outstanding.get().saturating_sub(1));
                                match wire::error_code(body) {
                                    None => {
                                        add(&c.accepted, 1);
                                        max_acked = max_acked.max(wire::u64_field(body, "seq").unwrap_or(0));
                                        let us = sched.elapsed().as_micros() as u64;
                                        sh.ack_hist.borrow_mut().saturating_record(us.max(1));
                                    }
                                    Some("rate_limited") => add(&c.refused, 1),
                                    Some(_) => add(&c.errors, 1),
                                }
                                continue;
                            }
                            let (req, after) = match recovery {
                                Recovery::Joining { id: want } if want == id => (false, 0),
                                Recovery::Syncing { id: want, after } if want == id => (true, after),
                                _ => continue,
                            };
                            if let Some(code) = wire::error_code(body) {
                                if matches!(code, "unavailable" | "rate_limited") {
                                    // What a real client does: try again after a jittered pause.
                                    add(&c.retries, 1);
                                    recovery = Recovery::RetryAt { at: Instant::now() + jittered(retry_delay), sync: req };
                                    retry_delay = (retry_delay * 2).min(Duration::from_secs(2));
                                    continue;
                                }
                                if storm_drop.is_some() {
                                    add(&c.gave_up, 1);
                                }
                                anyhow::bail!("{} failed after a reconnect: {code}", if req { "sync" } else { "join" });
                            }
                            let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                            let next_after = if req {
                                let top = seen.add_messages(&v);
                                let truncated = v.get("truncated").and_then(Value::as_bool).unwrap_or(false);
                                (truncated && top > after).then(|| seen.contiguous())
                            } else if spec.storm {
                                Some(seen.contiguous())
                            } else {
                                // Outside the storm the seqs are not tracked, and the deliveries
                                // missed already count as not delivered: re-joining is enough
                                // (a sync from the first join would page through the room's
                                // whole history while the step is measured).
                                None
                            };
                            recovery = match next_after {
                                Some(after) => Recovery::Syncing { id: send_sync(cl, room.as_deref(), after).await?, after },
                                None => {
                                    retry_delay = Duration::from_millis(100);
                                    if let Some(at) = storm_drop.take() {
                                        add(&c.caught_up, 1);
                                        max_into(&c.all_caught_up_us, at.elapsed().as_micros() as u64);
                                    }
                                    Recovery::Live
                                }
                            };
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

async fn send_sync(cl: &mut Client, room: Option<&str>, after: u64) -> Result<u64> {
    cl.send_request(
        "sync",
        &json!({"conversations": [{"conversationId": room, "afterSeq": after}]}),
    )
    .await
}
