//! A generator process: holds its share of the clients, sends open-loop, records latencies.
//!
//! The orchestrator starts several of these (each under the per-process descriptor limit, each
//! from its own 127.x source addresses) and drives them over stdin/stdout: a `ready` line once its
//! clients are connected and joined, `go` to start the timed phase, a `result` line at the end.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer as _, V2Serializer};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Client};
use crate::wire::{self, Incoming, Transport};

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
    pub rate_per_sender: f64,
    pub duration_ms: u64,
    /// Wait after the timed phase for deliveries still in flight.
    pub drain_ms: u64,
    /// S4: receivers drop their connections a third into the run and reconnect at once.
    pub storm: bool,
    pub connect_concurrency: usize,
}

impl WorkerSpec {
    fn room_of(&self, i: usize) -> Option<usize> {
        (!self.rooms.is_empty()).then(|| i % self.rooms.len())
    }

    fn is_sender(&self, i: usize) -> bool {
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

fn new_hist() -> Histogram<u64> {
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

/// What a worker reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub worker: usize,
    pub connected: u64,
    pub failed: u64,
    pub sent: u64,
    pub acked: u64,
    pub ack_errors: u64,
    pub received: u64,
    /// Time from `go` to the last delivery, so deliveries/s covers the whole delivery window.
    pub last_receive_ms: f64,
    pub ack_hist: String,
    pub recv_hist: String,
    pub disconnects: u64,
    // Reconnect storm.
    pub reconnected: u64,
    pub synced: u64,
    pub all_synced_ms: f64,
    /// Per room: highest seq acked to a sender here.
    pub room_max_acked: Vec<u64>,
    /// Per room: receivers here, sum of their join seqs, sum of distinct seqs they saw above it.
    pub room_receivers: Vec<u64>,
    pub room_join_sum: Vec<u64>,
    pub room_seen_sum: Vec<u64>,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    failed: AtomicU64,
    joined: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    ack_errors: AtomicU64,
    received: AtomicU64,
    last_receive_us: AtomicU64,
    disconnects: AtomicU64,
    reconnected: AtomicU64,
    synced: AtomicU64,
    all_synced_us: AtomicU64,
    reported: AtomicU64,
    /// When any client last got a frame (µs since the worker started): set-up is over only when
    /// the server has finished telling rooms about the joins (`user_joined` fan-out is O(n²)).
    last_frame_us: AtomicU64,
    hists: Mutex<Option<(Histogram<u64>, Histogram<u64>)>>,
    rooms: Mutex<Vec<[u64; 4]>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Setup,
    Go {
        start: Instant,
        wall: u128,
        rate: f64,
    },
    Report,
}

/// The process's reference instant, for timestamps kept in atomics.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn record(stats: &Stats, ack: Option<u64>, recv: Option<u64>) {
    let mut g = stats.hists.lock().unwrap_or_else(|p| p.into_inner());
    let (a, r) = g.get_or_insert_with(|| (new_hist(), new_hist()));
    if let Some(v) = ack {
        a.saturating_record(v);
    }
    if let Some(v) = recv {
        r.saturating_record(v);
    }
}

pub async fn run(spec: WorkerSpec) -> Result<()> {
    epoch();
    let spec = Arc::new(spec);
    let stats = Arc::new(Stats::default());
    if !spec.rooms.is_empty() {
        *stats.rooms.lock().unwrap_or_else(|p| p.into_inner()) = vec![[0; 4]; spec.rooms.len()];
    }
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let gate = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));
    let tag = format!("[w{}]", spec.worker);

    for i in spec.first..spec.first + spec.count {
        let spec = spec.clone();
        let stats = stats.clone();
        let gate = gate.clone();
        let phase = phase_rx.clone();
        tokio::spawn(async move {
            let source = spec.sources[i % spec.sources.len()];
            if let Err(e) = client_task(&spec, &stats, &gate, phase, i, source).await {
                // A client that fails is counted; the first few are shown for diagnosis.
                let n = stats.failed.fetch_add(1, Ordering::Relaxed);
                if n < 3 {
                    eprintln!("[w{}] client {i}: {e:#}", spec.worker);
                }
            }
        });
    }

    // Progress while connecting.
    let joined_target = spec.count as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let joined = stats.joined.load(Ordering::Relaxed);
        let failed = stats.failed.load(Ordering::Relaxed);
        eprintln!("{tag} connected {joined}/{joined_target} failed {failed}");
        if joined + failed >= joined_target {
            break;
        }
    }
    let born = Instant::now();
    let quiet_deadline = born + Duration::from_secs(180);
    while Instant::now() < quiet_deadline {
        let last = Duration::from_micros(stats.last_frame_us.load(Ordering::Relaxed));
        let quiet = (Instant::now() - epoch()).saturating_sub(last);
        if quiet >= Duration::from_secs(1) {
            break;
        }
        eprintln!(
            "{tag} waiting for set-up traffic to end (quiet for {} ms)",
            quiet.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{}",
        json!({"event": "ready", "connected": stats.joined.load(Ordering::Relaxed),
               "failed": stats.failed.load(Ordering::Relaxed)})
    );

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // Rounds: `go [RATE]` runs one timed phase at RATE per sender (default: the spec's), prints a
    // result and waits again, so a rate sweep reuses the connected and joined clients.
    loop {
        let rate = loop {
            match lines.next_line().await? {
                Some(l) if l.trim() == "stop" => return Ok(()),
                Some(l) if l.trim().starts_with("go") => {
                    break l.trim()[2..]
                        .trim()
                        .parse::<f64>()
                        .unwrap_or(spec.rate_per_sender);
                }
                Some(_) => {}
                // The orchestrator went away: nothing left to do.
                None => return Ok(()),
            }
        };
        let result = round(&spec, &stats, &phase_tx, rate, &tag).await?;
        println!(
            "{}",
            json!({"event": "result", "result": serde_json::to_value(&result)?})
        );
    }
}

async fn round(
    spec: &WorkerSpec,
    stats: &Stats,
    phase_tx: &watch::Sender<Phase>,
    rate: f64,
    tag: &str,
) -> Result<WorkerResult> {
    for c in [
        &stats.sent,
        &stats.acked,
        &stats.ack_errors,
        &stats.received,
        &stats.last_receive_us,
        &stats.reported,
    ] {
        c.store(0, Ordering::Relaxed);
    }
    *stats.hists.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let start = Instant::now();
    phase_tx.send_replace(Phase::Go {
        start,
        wall: unix_nanos(),
        rate,
    });
    let total = Duration::from_millis(spec.duration_ms + spec.drain_ms);
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(1).min(total.saturating_sub(start.elapsed()))).await;
        eprintln!(
            "{tag} t={:.0}s sent {} acked {} recv {} reconnected {} synced {} failed {}",
            start.elapsed().as_secs_f64(),
            stats.sent.load(Ordering::Relaxed),
            stats.acked.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
            stats.reconnected.load(Ordering::Relaxed),
            stats.synced.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
        );
    }
    phase_tx.send_replace(Phase::Report);
    // Clients fold their per-room counts in; the ones that died are counted as failed instead.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.reported.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
        < spec.count as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ack_hist, recv_hist) = stats
        .hists
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_else(|| (new_hist(), new_hist()));
    let rooms = stats
        .rooms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let result = WorkerResult {
        worker: spec.worker,
        connected: stats.connected.load(Ordering::Relaxed),
        failed: stats.failed.load(Ordering::Relaxed),
        sent: stats.sent.load(Ordering::Relaxed),
        acked: stats.acked.load(Ordering::Relaxed),
        ack_errors: stats.ack_errors.load(Ordering::Relaxed),
        received: stats.received.load(Ordering::Relaxed),
        last_receive_ms: stats.last_receive_us.load(Ordering::Relaxed) as f64 / 1000.0,
        ack_hist: encode_hist(&ack_hist)?,
        recv_hist: encode_hist(&recv_hist)?,
        disconnects: stats.disconnects.load(Ordering::Relaxed),
        reconnected: stats.reconnected.load(Ordering::Relaxed),
        synced: stats.synced.load(Ordering::Relaxed),
        all_synced_ms: stats.all_synced_us.load(Ordering::Relaxed) as f64 / 1000.0,
        room_max_acked: rooms.iter().map(|r| r[0]).collect(),
        room_receivers: rooms.iter().map(|r| r[1]).collect(),
        room_join_sum: rooms.iter().map(|r| r[2]).collect(),
        room_seen_sum: rooms.iter().map(|r| r[3]).collect(),
    };
    Ok(result)
}

/// Connects with a few retries: a full listen backlog drops SYNs, which is load, not failure.
async fn connect_retrying(
    spec: &WorkerSpec,
    i: usize,
    token: &str,
    source: IpAddr,
) -> Result<Client> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match client::connect(spec.url_of(i), spec.transport, token, source).await {
            Ok(c) => return Ok(c),
            Err(e) if attempt >= 8 => return Err(e),
            Err(_) => {
                attempt += 1;
                let jitter = rand::rng().random_range(0..=delay.as_millis() as u64);
                tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Per-client receive bookkeeping for the storm's loss count.
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
}

async fn join(client: &mut Client, room: &str, seen: &mut Seen) -> Result<u64> {
    let v = client
        .call("join_conversation", &json!({"conversationId": room}), |f| {
            if wire::stamp_of(f).is_some()
                && let Some(s) = wire::u64_field(f, "seq")
            {
                seen.seqs.insert(s);
            }
        })
        .await?;
    Ok(v.get("lastSeq").and_then(Value::as_u64).unwrap_or(0))
}

/// After a reconnect: `sync` from the last contiguous seq until the server says nothing is left.
async fn sync(client: &mut Client, room: &str, seen: &mut Seen) -> Result<()> {
    loop {
        let after = seen.contiguous();
        let mut live = Vec::new();
        let v = client
            .call(
                "sync",
                &json!({"conversations": [{"conversationId": room, "afterSeq": after}]}),
                |f| {
                    if wire::stamp_of(f).is_some() {
                        live.extend(wire::u64_field(f, "seq"));
                    }
                },
            )
            .await?;
        seen.seqs.extend(live);
        let mut top = after;
        if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
            for m in msgs {
                if let Some(s) = m.get("seq").and_then(Value::as_u64) {
                    seen.seqs.insert(s);
                    top = top.max(s);
                }
            }
        }
        let truncated = v.get("truncated").and_then(Value::as_bool).unwrap_or(false);
        if !truncated || top == after {
            return Ok(());
        }
    }
}

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

async fn client_task(
    spec: &WorkerSpec,
    stats: &Stats,
    gate: &Semaphore,
    mut phase: watch::Receiver<Phase>,
    i: usize,
    source: IpAddr,
) -> Result<()> {
    let user = user_of(i);
    let token = token(&spec.secret, &user)?;
    let room_idx = spec.room_of(i);
    let room = room_idx.map(|r| spec.rooms[r].clone());
    let sender = spec.is_sender(i);
    let mut seen = Seen {
        join_seq: 0,
        seqs: HashSet::new(),
    };
    let mut client = {
        let _permit = gate.acquire().await.context("connect gate closed")?;
        let mut c = connect_retrying(spec, i, &token, source).await?;
        stats.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(room) = &room {
            seen.join_seq = join(&mut c, room, &mut seen).await?;
            seen.seqs.retain(|&s| s > seen.join_seq);
        }
        c
    };
    stats.joined.fetch_add(1, Ordering::Relaxed);

    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut ticker: Option<tokio::time::Interval> = None;
    let mut go: Option<(Instant, u128)> = None;
    let mut drop_at: Option<Instant> = None;
    let mut max_acked = 0u64;
    let mut n_sent = 0u64;
    loop {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                match *phase.borrow_and_update() {
                    Phase::Setup => {}
                    Phase::Go { start, wall, rate } => {
                        go = Some((start, wall));
                        pending.clear();
                        if sender && rate > 0.0 {
                            let period = Duration::from_secs_f64(1.0 / rate);
                            // A random phase spreads the senders over the period.
                            let offset = period.mul_f64(rand::rng().random::<f64>());
                            let mut t = tokio::time::interval_at((start + offset).into(), period);
                            // Burst: late ticks fire at once and keep their scheduled times,
                            // so a stall shows up as latency (coordinated omission).
                            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                            ticker = Some(t);
                        }
                        if spec.storm && !sender {
                            drop_at = Some(start + Duration::from_millis(spec.duration_ms / 3));
                        }
                    }
                    Phase::Report => {
                        ticker = None;
                        if let Some(r) = room_idx {
                            let mut rooms = stats.rooms.lock().unwrap_or_else(|p| p.into_inner());
                            let e = &mut rooms[r];
                            e[0] = e[0].max(max_acked);
                            if !sender {
                                e[1] += 1;
                                e[2] += seen.join_seq;
                                e[3] += seen.seqs.iter().filter(|&&s| s > seen.join_seq).count() as u64;
                            }
                        }
                        stats.reported.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            sched = tick(&mut ticker) => {
                let Some((start, wall)) = go else { continue };
                if sched.into_std() >= start + Duration::from_millis(spec.duration_ms) {
                    ticker = None;
                    continue;
                }
                let sched = sched.into_std();
                let sched_wall = wall + sched.saturating_duration_since(start).as_nanos();
                n_sent += 1;
                let payload = json!({
                    "conversationId": room.as_deref().unwrap_or_default(),
                    "content": wire::stamp(sched_wall, n_sent),
                    "type": "text",
                    "clientMsgId": format!("{user}-{n_sent}"),
                });
                let id = client.send_request("send_message", &payload).await?;
                pending.insert(id, sched);
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            () = sleep_until(drop_at) => {
                drop_at = None;
                // Dropped without a close frame, as when a network path dies.
                drop(client);
                let dropped = Instant::now();
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                let mut c = connect_retrying(spec, i, &token, source).await?;
                stats.reconnected.fetch_add(1, Ordering::Relaxed);
                if let Some(room) = &room {
                    join(&mut c, room, &mut seen).await?;
                    sync(&mut c, room, &mut seen).await?;
                }
                stats.synced.fetch_add(1, Ordering::Relaxed);
                stats.all_synced_us.fetch_max(micros(dropped.elapsed()), Ordering::Relaxed);
                client = c;
            }
            frame = client.ws.next() => {
                stats.last_frame_us.fetch_max(micros(Instant::now() - epoch()), Ordering::Relaxed);
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => {
                        stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        anyhow::bail!("server closed the connection");
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        return Err(e.into());
                    }
                };
                match wire::classify(spec.transport, text.as_str()) {
                    Incoming::Ping => client.ws.send(Message::text(wire::PONG)).await?,
                    Incoming::Ack { id, body } => {
                        if let Some(sched) = pending.remove(&id) {
                            if body.contains("\"error\"") {
                                stats.ack_errors.fetch_add(1, Ordering::Relaxed);
                            } else {
                                stats.acked.fetch_add(1, Ordering::Relaxed);
                                max_acked = max_acked.max(wire::u64_field(body, "seq").unwrap_or(0));
                                record(stats, Some(micros(sched.elapsed())), None);
                            }
                        }
                    }
                    Incoming::Event { frame } if wire::is_new_message(spec.transport, frame) => {
                        let Some((start, _)) = go else { continue };
                        if let Some(stamp) = wire::stamp_of(frame) {
                            let now = unix_nanos();
                            let lat = u64::try_from(now.saturating_sub(stamp) / 1000).unwrap_or(u64::MAX);
                            stats.received.fetch_add(1, Ordering::Relaxed);
                            stats.last_receive_us.fetch_max(micros(start.elapsed()), Ordering::Relaxed);
                            record(stats, None, Some(lat.max(1)));
                        }
                        if spec.storm && let Some(s) = wire::u64_field(frame, "seq") {
                            seen.seqs.insert(s);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
