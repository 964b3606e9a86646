//! Scenarios S1–S5 against Confab and its peers, in one invocation, into one JSON and one table.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::client;
use crate::harness::{self, Fleet, Pinning, Server, Totals};
use crate::wire::Transport;
use crate::worker::{WorkerSpec, token};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Seconds and small numbers: proves the harness works (used by the test command).
    Smoke,
    /// A few minutes, the real shapes with fewer rate steps.
    Quick,
    /// The full table for BENCHMARKS.md.
    Full,
}

pub struct Opts {
    pub mode: Mode,
    pub scenarios: Vec<String>,
    /// confab, node, bare or all: the servers S1–S3 compare (S4 and S5 are Confab's alone).
    pub servers: Vec<String>,
    /// S3 shapes (rooms, members) instead of the mode's; empty: the mode's.
    pub shapes: Vec<(usize, usize)>,
    pub s3_start: Option<f64>,
    /// S1 connection counts instead of the mode's; empty: the mode's.
    pub s1_clients: Vec<usize>,
    pub out_dir: PathBuf,
    pub node_dir: PathBuf,
    pub postgres_url: String,
    pub amqp_url: String,
    pub pin: Pinning,
}

/// The servers measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Confab,
    ConfabPostgres,
    Node,
    Bare,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Confab => "Confab",
            Target::ConfabPostgres => "Confab (Postgres)",
            Target::Node => "Node socket.io",
            Target::Bare => "bare tokio-tungstenite",
        }
    }
}

const SECRET: &str = "confab-bench-secret-0123456789abcdef-0123456789";

pub struct Bench {
    opts: Opts,
    gateway_bin: String,
    json: serde_json::Map<String, Value>,
    /// Every table printed: `{title, note?, load, head, rows}` (rendered by `report`).
    tables: Vec<Value>,
    summary: Vec<Vec<String>>,
    failures: Vec<String>,
    /// Seconds each scenario took (the full run has a 25-minute budget).
    timings: Vec<(String, u64)>,
    tmp: tempdir::Dir,
    ws_available: Option<bool>,
}

/// A scratch directory removed at the end (kept small: no extra crate for it).
mod tempdir {
    use std::path::PathBuf;

    pub struct Dir(pub PathBuf);

    impl Dir {
        pub fn new() -> std::io::Result<Dir> {
            let p = std::env::temp_dir().join(format!("confab-bench-{}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn f1(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

impl Bench {
    pub fn new(opts: Opts) -> Result<Bench> {
        let gateway_bin = harness::sibling_bin("CONFAB_GATEWAY_BIN", "confab-gateway")?
            .to_string_lossy()
            .into_owned();
        std::fs::create_dir_all(&opts.out_dir)?;
        Ok(Bench {
            opts,
            gateway_bin,
            json: serde_json::Map::new(),
            tables: Vec::new(),
            summary: Vec::new(),
            failures: Vec::new(),
            timings: Vec::new(),
            tmp: tempdir::Dir::new()?,
            ws_available: None,
        })
    }

    fn wants(&self, s: &str) -> bool {
        self.opts.scenarios.iter().any(|x| x == s || x == "all")
    }

    async fn start(&self, target: Target, extra: &[(&str, String)]) -> Result<Server> {
        let pin = &self.opts.pin;
        let dir = self.tmp.0.join(format!(
            "{}-{}",
            target.name().replace([' ', '(', ')'], ""),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let dirs = dir.to_string_lossy().into_owned();
        let s = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        match target {
            Target::Confab | Target::ConfabPostgres => {
                let mut env = vec![
                    s("CONFAB_LISTEN", "127.0.0.1:0"),
                    s("CONFAB_DATA_DIR", &dirs),
                    s("CONFAB_JWT_SECRET", SECRET),
                    // Limits far above the offered load: the benchmark measures delivery, not policing.
                    s("CONFAB_MESSAGES_PER_SECOND", "1000000"),
                    s("CONFAB_MESSAGE_BURST", "1000000"),
                    s("CONFAB_EVENTS_PER_SECOND", "1000000"),
                    s("CONFAB_EVENT_BURST", "1000000"),
                    s("CONFAB_CONNECTS_PER_SECOND", "1000000"),
                    s("CONFAB_CONNECT_BURST", "1000000"),
                    s("CONFAB_API_REQUESTS_PER_SECOND", "1000000"),
                    s("CONFAB_API_REQUEST_BURST", "1000000"),
                    // Every benchmark client connects from 127.0.0.1.
                    s("CONFAB_MAX_CONNECTIONS_PER_ADDRESS", "1000000"),
                    // The same per-connection queue as the bare broadcaster's.
                    s("CONFAB_SEND_QUEUE", "1024"),
                    s("RUST_LOG", "warn"),
                ];
                if target == Target::ConfabPostgres {
                    env.push(s("CONFAB_DATABASE_URL", &self.opts.postgres_url));
                }
                for (k, v) in extra {
                    env.push(s(k, v));
                }
                Server::start(target.name(), pin, &self.gateway_bin, &[], &env).await
            }
            Target::Node => {
                let script = self.opts.node_dir.join("server.mjs");
                let script = script.to_string_lossy().into_owned();
                let env = vec![
                    s("PORT", "0"),
                    s("JWT_SECRET", SECRET),
                    s("DB", &format!("{dirs}/node.db")),
                ];
                Server::start(target.name(), pin, "node", &[&script], &env).await
            }
            Target::Bare => {
                let bin = harness::sibling_bin("CONFAB_BARE_BIN", "confab-bare")?;
                let env = vec![s("BARE_LISTEN", "127.0.0.1:0")];
                Server::start(target.name(), pin, &bin.to_string_lossy(), &[], &env).await
            }
        }
    }

    async fn rooms(&self, target: Target, server: &Server, n: usize) -> Result<Vec<String>> {
        if target == Target::Bare {
            return Ok((0..n).map(|i| format!("r{i}")).collect());
        }
        harness::create_rooms(&server.url, &token(SECRET, "bench-admin")?, n).await
    }

    /// Whether `--servers` lets `target` run (`confab` covers Confab with either store).
    fn serves(&self, target: Target) -> bool {
        let key = match target {
            Target::Confab | Target::ConfabPostgres => "confab",
            Target::Node => "node",
            Target::Bare => "bare",
        };
        self.opts.servers.iter().any(|s| s == key || s == "all")
    }

    /// The servers and transports a scenario compares, as `--servers` allows.
    async fn targets(&mut self) -> Result<Vec<(Target, Transport)>> {
        let mut out = Vec::new();
        if self.serves(Target::Confab) {
            out.push((Target::Confab, Transport::Sio));
            if self.confab_ws().await? {
                out.push((Target::Confab, Transport::Ws));
            }
        }
        if self.serves(Target::Node) {
            out.push((Target::Node, Transport::Sio));
        }
        if self.serves(Target::Bare) {
            out.push((Target::Bare, Transport::Ws));
        }
        Ok(out)
    }

    /// Whether the gateway serves `/ws` (another branch adds it): probed once with one client.
    async fn confab_ws(&mut self) -> Result<bool> {
        if let Some(v) = self.ws_available {
            return Ok(v);
        }
        let server = self.start(Target::Confab, &[]).await?;
        let ok = client::connect(
            &server.url,
            Transport::Ws,
            &token(SECRET, "probe")?,
            "127.0.0.1".parse()?,
        )
        .await;
        server.stop().await;
        if let Err(e) = &ok {
            eprintln!("   Confab /ws not available ({e:#}): /ws rows are not measured");
        }
        self.ws_available = Some(ok.is_ok());
        Ok(ok.is_ok())
    }

    #[allow(clippy::too_many_arguments)]
    fn spec(
        urls: Vec<String>,
        transport: Transport,
        rooms: Vec<String>,
        count: usize,
        senders_per_room: usize,
        duration_ms: u64,
        drain_ms: u64,
        quiet_ms: u64,
        storm: bool,
    ) -> WorkerSpec {
        WorkerSpec {
            worker: 0,
            urls,
            transport,
            sources: Vec::new(),
            secret: SECRET.into(),
            first: 0,
            count,
            rooms,
            senders_per_room,
            duration_ms,
            drain_ms,
            quiet_ms,
            storm,
            connect_concurrency: 256,
        }
    }

    /// Connects (and joins) the spec's clients once; each `round` is one timed phase at a rate.
    async fn fleet(&self, spec: &WorkerSpec) -> Result<Fleet> {
        let mut fleet = Fleet::spawn(&self.opts.pin, spec).await?;
        let (ok, failed) = fleet.ready().await?;
        eprintln!(
            "   {ok} clients ready, {failed} failed (load {})",
            loadavg()
        );
        Ok(fleet)
    }

    async fn round(
        &self,
        fleet: &mut Fleet,
        spec: &WorkerSpec,
        rate_per_sender: f64,
    ) -> Result<Totals> {
        eprintln!(
            "   go: {rate_per_sender:.2} msg/s per sender (load {})",
            loadavg()
        );
        let timeout = Duration::from_millis(spec.duration_ms + spec.drain_ms + 120_000);
        let window = Duration::from_millis(spec.duration_ms);
        let (results, busy) = fleet
            .go(&self.opts.pin, rate_per_sender, window, timeout)
            .await?;
        let mut t = harness::fold(&results, spec.duration_ms as f64 / 1000.0, spec.storm)?;
        t.server_core_busy = busy.server;
        t.generator_core_busy = busy.generator;
        Ok(t)
    }

    async fn measure(&self, spec: &WorkerSpec, rate_per_sender: f64) -> Result<Totals> {
        let mut fleet = self.fleet(spec).await?;
        let t = self.round(&mut fleet, spec, rate_per_sender).await;
        fleet.stop().await;
        t
    }

    fn section(&mut self, title: &str, head: &[&str]) {
        self.tables
            .push(json!({"title": title, "load": loadavg(), "head": head, "rows": []}));
    }

    fn note(&mut self, note: String) {
        if let Some(t) = self.tables.last_mut() {
            t["note"] = json!(note);
        }
    }

    fn row(&mut self, cells: &[String]) {
        if let Some(rows) = self
            .tables
            .last_mut()
            .and_then(|t| t["rows"].as_array_mut())
        {
            rows.push(json!(cells));
        }
    }

    fn goal(&mut self, goal: String, measured: String, vs_node: String, vs_bare: String) {
        self.summary.push(vec![goal, measured, vs_node, vs_bare]);
    }

    pub async fn run(mut self) -> Result<()> {
        let started = std::time::SystemTime::now();
        let started_at = utc_now();
        self.json
            .insert("mode".into(), json!(format!("{:?}", self.opts.mode)));
        self.json.insert("load_at_start".into(), json!(loadavg()));
        self.json.insert(
            "pinning".into(),
            json!({"server": self.opts.pin.server, "generator": self.opts.pin.generator}),
        );
        for s in ["s1", "s2", "s3", "s4", "s5"] {
            if !self.wants(s) {
                continue;
            }
            eprintln!("== {} (load {})", s.to_uppercase(), loadavg());
            let t0 = std::time::Instant::now();
            let r = match s {
                "s1" => self.s1().await,
                "s2" => self.s2().await,
                "s3" => self.s3().await,
                "s4" => self.s4().await,
                _ => self.s5().await,
            };
            let took = t0.elapsed().as_secs();
            eprintln!("== {} took {took} s", s.to_uppercase());
            self.timings.push((s.to_owned(), took));
            if let Err(e) = r {
                eprintln!("!! {s} failed: {e:#}");
                self.failures.push(format!("{s}: {e:#}"));
            }
        }
        self.json.insert("load_at_end".into(), json!(loadavg()));
        self.json.insert(
            "seconds".into(),
            json!(started.elapsed().map(|d| d.as_secs()).unwrap_or(0)),
        );
        self.json
            .insert("context".into(), context(&self.opts, started_at));
        self.json.insert("summary".into(), json!(self.summary));
        self.json.insert("tables".into(), json!(self.tables));
        self.json.insert("failures".into(), json!(self.failures));
        self.json.insert(
            "scenario_seconds".into(),
            Value::Object(
                self.timings
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect(),
            ),
        );
        let json = Value::Object(std::mem::take(&mut self.json));
        std::fs::write(
            self.opts.out_dir.join("results.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        let md = crate::report::render(&json)?;
        std::fs::write(self.opts.out_dir.join("results.md"), &md)?;
        println!("{md}");
        if !self.failures.is_empty() {
            bail!(
                "{} scenario(s) failed: {}",
                self.failures.len(),
                self.failures.join("; ")
            );
        }
        Ok(())
    }

    /// S1: idle connections; the server's RSS growth per connection.
    async fn s1(&mut self) -> Result<()> {
        let counts: Vec<usize> = match self.opts.mode {
            _ if !self.opts.s1_clients.is_empty() => self.opts.s1_clients.clone(),
            Mode::Smoke => vec![100],
            Mode::Quick => vec![1_000, 10_000],
            Mode::Full => vec![1_000, 10_000, 19_000],
        };
        let targets = self.targets().await?;
        self.section(
            "S1 — idle connections: server RSS per connection",
            &[
                "server",
                "transport",
                "clients",
                "connected",
                "RSS before (MiB)",
                "RSS after (MiB)",
                "per connection (KB)",
            ],
        );
        let mut rows = Vec::new();
        let mut at_10k = std::collections::HashMap::new();
        for &(target, transport) in &targets {
            for &n in &counts {
                let server = self.start(target, &[]).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let before = server.rss_kib()?;
                let spec = Self::spec(
                    vec![server.url.clone()],
                    transport,
                    vec![],
                    n,
                    0,
                    0,
                    0,
                    0,
                    false,
                );
                let mut fleet = Fleet::spawn(&self.opts.pin, &spec).await?;
                let ready = fleet.ready().await;
                // Let lazily grown buffers and allocator caches settle before reading RSS.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let after = server.rss_kib()?;
                fleet.stop().await;
                server.stop().await;
                let (ok, failed) = ready?;
                if ok == 0 {
                    bail!(
                        "{} {}: no client connected",
                        target.name(),
                        transport.name()
                    );
                }
                let per = (after.saturating_sub(before)) as f64 * 1024.0 / ok as f64 / 1000.0;
                eprintln!(
                    "   {} {} {n}: {per:.1} KB per connection ({failed} failed)",
                    target.name(),
                    transport.name()
                );
                self.row(&[
                    target.name().into(),
                    transport.name().into(),
                    n.to_string(),
                    ok.to_string(),
                    f1(before as f64 / 1024.0),
                    f1(after as f64 / 1024.0),
                    f1(per),
                ]);
                rows.push(json!({"server": target.name(), "transport": transport.name(), "clients": n,
                    "connected": ok, "failed": failed, "rss_before_kib": before, "rss_after_kib": after,
                    "kb_per_connection": per, "load": loadavg()}));
                at_10k.insert((target, transport), per);
                if ok + failed < n as u64 || failed > 0 {
                    bail!(
                        "{} {}: {failed} of {n} clients failed to connect",
                        target.name(),
                        transport.name()
                    );
                }
            }
        }
        let largest = counts.last().copied().unwrap_or(0);
        let node = at_10k
            .get(&(Target::Node, Transport::Sio))
            .copied()
            .unwrap_or(f64::NAN);
        let bare = at_10k
            .get(&(Target::Bare, Transport::Ws))
            .copied()
            .unwrap_or(f64::NAN);
        if let Some(&c) = at_10k.get(&(Target::Confab, Transport::Sio)) {
            self.goal(
                format!("S1 Socket.IO ≤ 10 KB per idle connection ({largest})"),
                format!("{} KB {}", f1(c), if c <= 10.0 { "✅" } else { "❌" }),
                ratio(c, node),
                ratio(c, bare),
            );
        }
        match at_10k.get(&(Target::Confab, Transport::Ws)) {
            Some(&c) => self.goal(
                format!("S1 /ws ≤ 6 KB per idle connection ({largest})"),
                format!("{} KB {}", f1(c), if c <= 6.0 { "✅" } else { "❌" }),
                ratio(c, node),
                ratio(c, bare),
            ),
            None => self.goal(
                "S1 /ws ≤ 6 KB per idle connection".into(),
                "not measured: the gateway has no /ws yet".into(),
                "–".into(),
                "–".into(),
            ),
        }
        self.json.insert("s1".into(), Value::Array(rows));
        Ok(())
    }

    /// S2: direct messages (two-member conversations), persisted: ack latency against offered rate.
    async fn s2(&mut self) -> Result<()> {
        let (pairs, rates, secs): (usize, &[f64], u64) = match self.opts.mode {
            Mode::Smoke => (10, &[20.0], 2),
            Mode::Quick => (200, &[250.0, 1000.0, 4000.0], 4),
            Mode::Full => (
                500,
                &[250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0],
                5,
            ),
        };
        let mut targets: Vec<_> = self
            .targets()
            .await?
            .into_iter()
            .filter(|t| t.0 != Target::Bare)
            .collect();
        if self.opts.mode != Mode::Smoke && self.serves(Target::ConfabPostgres) {
            targets.push((Target::ConfabPostgres, Transport::Sio));
        }
        self.section(
            &format!("S2 — direct messages, persisted: {pairs} two-member conversations, one sender each, open-loop"),
            &["server", "transport", "store", "offered msg/s", "acked", "errors", "ack p50 (ms)", "ack p99 (ms)", "ack max (ms)", "p99 < 10 ms"],
        );
        let mut rows = Vec::new();
        let mut best: std::collections::HashMap<(Target, Transport), f64> = Default::default();
        for &(target, transport) in &targets {
            let server = match self.start(target, &[]).await {
                Ok(s) => s,
                Err(e) if target == Target::ConfabPostgres => {
                    let why = format!("{e:#}");
                    eprintln!("   {}: not measured ({why})", target.name());
                    self.row(&[
                        target.name().into(),
                        transport.name().into(),
                        "postgres".into(),
                        format!("not measured: {why}"),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                    ]);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let rooms = self.rooms(target, &server, pairs).await?;
            let store = if target == Target::ConfabPostgres {
                "postgres"
            } else {
                "sqlite"
            };
            let spec = Self::spec(
                vec![server.url.clone()],
                transport,
                rooms.clone(),
                pairs * 2,
                1,
                secs * 1000,
                3000,
                500,
                false,
            );
            let mut fleet = match self.fleet(&spec).await {
                Ok(f) => f,
                Err(e) => {
                    server.stop().await;
                    return Err(e);
                }
            };
            for &rate in rates {
                let t = match self.round(&mut fleet, &spec, rate / pairs as f64).await {
                    Ok(t) => t,
                    Err(e) => {
                        fleet.stop().await;
                        server.stop().await;
                        return Err(e);
                    }
                };
                let ok = t.ack_p99_ms < 10.0 && t.errors + t.refused == 0 && t.accepted == t.sent;
                eprintln!(
                    "   {} {} {rate} msg/s: ack p50 {:.2} p99 {:.2} ms, {}/{} acked",
                    target.name(),
                    transport.name(),
                    t.ack_p50_ms,
                    t.ack_p99_ms,
                    t.accepted,
                    t.sent
                );
                self.row(&[
                    target.name().into(),
                    transport.name().into(),
                    store.into(),
                    format!("{rate:.0}"),
                    format!("{}/{}", t.accepted, t.sent),
                    (t.errors + t.refused).to_string(),
                    f1(t.ack_p50_ms),
                    f1(t.ack_p99_ms),
                    f1(t.ack_max_ms),
                    if ok { "yes" } else { "no" }.into(),
                ]);
                rows.push(json!({"server": target.name(), "transport": transport.name(), "store": store, "rate": rate, "totals": t, "load": loadavg()}));
                if self.opts.mode == Mode::Smoke
                    && (t.sent == 0 || t.accepted != t.sent || t.received == 0)
                {
                    fleet.stop().await;
                    server.stop().await;
                    bail!(
                        "{} {}: sent {} accepted {} received {}",
                        target.name(),
                        transport.name(),
                        t.sent,
                        t.accepted,
                        t.received
                    );
                }
                if ok {
                    best.insert((target, transport), rate);
                }
                // Far past saturation the next step only queues more: stop the sweep.
                if t.ack_p99_ms > 1000.0 || t.accepted * 10 < t.sent * 9 {
                    break;
                }
            }
            fleet.stop().await;
            server.stop().await;
        }
        let node = best
            .get(&(Target::Node, Transport::Sio))
            .copied()
            .unwrap_or(f64::NAN);
        for (label, key) in [
            ("Socket.IO, SQLite", (Target::Confab, Transport::Sio)),
            ("/ws, SQLite", (Target::Confab, Transport::Ws)),
            (
                "Socket.IO, Postgres",
                (Target::ConfabPostgres, Transport::Sio),
            ),
        ] {
            if let Some(&c) = best.get(&key) {
                let met = node.is_finite() && c >= 10.0 * node;
                self.goal(
                    format!("S2 ≥ 10× Node at p99 < 10 ms ({label})"),
                    format!(
                        "{c:.0} msg/s vs Node {} {}",
                        f1(node),
                        if met { "✅" } else { "❌" }
                    ),
                    ratio(c, node),
                    "–".into(),
                );
            }
        }
        self.json.insert("s2".into(), Value::Array(rows));
        Ok(())
    }

    /// S3: room fan-out. Per shape and server, the offered rate is searched for the knee (see
    /// [`next_rate`]); every step reports sends accepted and refused, deliveries against accepted
    /// × members, and publish → receive latency.
    async fn s3(&mut self) -> Result<()> {
        let (shapes, secs, within, max_steps): (&[(usize, usize)], u64, f64, usize) =
            match self.opts.mode {
                Mode::Smoke => (&[(1, 10), (2, 10)], 2, f64::INFINITY, 1),
                Mode::Quick => (&[(1, 1000), (10, 1000), (100, 100)], 3, 2.1, 6),
                Mode::Full => (&[(1, 1000), (10, 1000), (100, 100)], 3, KNEE_WITHIN, 9),
            };
        let custom = self.opts.shapes.clone();
        let shapes: &[(usize, usize)] = if custom.is_empty() { shapes } else { &custom };
        let targets = self.targets().await?;
        self.section(
            "S3 — room fan-out: one open-loop sender per room; sustained = 100 % of accepted × members delivered and p99 < 100 ms",
            &["rooms × members", "server", "transport", "offered deliveries/s", "sends accepted", "refused (rate_limited)", "deliveries", "delivered % of accepted × members", "delivered/s", "p50 (ms)", "p99 (ms)", "max (ms)", "sustained", "generator CPU per delivery (ns)", "server core busy %", "generator cores busy %"],
        );
        self.note(format!(
            "Each step sends for {secs} s from a common start; delivered/s = deliveries ÷ (start → last delivery). \
             Offered rates are searched per server: ×4 while p99 < 25 ms, ×2 otherwise, then halved \
             geometrically until the highest sustained and the lowest unsustained step are within {}×.",
            if within.is_finite() { format!("{within:.2}") } else { "–".into() }
        ));
        let mut rows = Vec::new();
        // Per shape: the highest sustained step of each server: (delivered/s, offered, p99, lowest failed).
        let mut knees: Vec<Knee> = Vec::new();
        let mut hint: std::collections::HashMap<(Target, Transport), f64> = Default::default();
        // The fastest step of the run, and how busy the receiving processes were in it.
        let mut peak = (0.0f64, 0.0f64, String::new());
        for &(n_rooms, members) in shapes {
            for &(target, transport) in &targets {
                let server = self.start(target, &[]).await?;
                let rooms = self.rooms(target, &server, n_rooms).await?;
                let spec = Self::spec(
                    vec![server.url.clone()],
                    transport,
                    rooms.clone(),
                    n_rooms * members,
                    1,
                    secs * 1000,
                    4000,
                    1000,
                    false,
                );
                let mut fleet = match self.fleet(&spec).await {
                    Ok(f) => f,
                    Err(e) => {
                        server.stop().await;
                        return Err(e);
                    }
                };
                let start = match self.opts.mode {
                    Mode::Smoke => 200.0,
                    _ => hint
                        .get(&(target, transport))
                        .copied()
                        .or(self.opts.s3_start)
                        .unwrap_or(S3_START),
                };
                let mut tried: Vec<Step> = Vec::new();
                while tried.len() < max_steps {
                    let Some(offered) = next_rate(&tried, start, within) else {
                        break;
                    };
                    let msgs = offered / members as f64;
                    let t = match self.round(&mut fleet, &spec, msgs / n_rooms as f64).await {
                        Ok(t) => t,
                        Err(e) => {
                            fleet.stop().await;
                            server.stop().await;
                            return Err(e);
                        }
                    };
                    let step = Step::of(offered, members, &t);
                    if step.delivered_per_s > peak.0 {
                        // CPU seconds per second of the round, over the generator's cores.
                        let busy = t.receiver_cpu_ms
                            / 1000.0
                            / t.window_s.max(t.duration_s)
                            / self.opts.pin.generator_cores() as f64;
                        peak = (
                            step.delivered_per_s,
                            busy,
                            format!("{n_rooms}×{members} {} {}", target.name(), transport.name()),
                        );
                    }
                    eprintln!(
                        "   {n_rooms}×{members} {} {} offered {offered:.0}/s: accepted {} refused {}, {:.0}/s ({:.2} % of accepted × members), p50 {:.1} p99 {:.1} ms{}",
                        target.name(),
                        transport.name(),
                        t.accepted,
                        t.refused,
                        step.delivered_per_s,
                        step.fraction * 100.0,
                        t.recv_p50_ms,
                        t.recv_p99_ms,
                        if step.sustained { ", sustained" } else { "" }
                    );
                    self.row(&[
                        format!("{n_rooms} × {members}"),
                        target.name().into(),
                        transport.name().into(),
                        format!("{offered:.0}"),
                        t.accepted.to_string(),
                        t.refused.to_string(),
                        t.received.to_string(),
                        pct(step.fraction),
                        format!("{:.0}", step.delivered_per_s),
                        f1(t.recv_p50_ms),
                        f1(t.recv_p99_ms),
                        f1(t.recv_max_ms),
                        match (step.sustained, t.disconnects) {
                            (true, 0) => "yes".into(),
                            (false, 0) => "no".into(),
                            (ok, n) => {
                                format!("{} ({n} disconnected)", if ok { "yes" } else { "no" })
                            }
                        },
                        cpu_per(&t),
                        busy_pct(t.server_core_busy),
                        busy_pct(t.generator_core_busy),
                    ]);
                    rows.push(
                        json!({"rooms": n_rooms, "members": members, "server": target.name(),
                        "transport": transport.name(), "offered": offered,
                        "expected": t.accepted * members as u64, "delivered": t.received,
                        "fraction": step.fraction, "delivered_per_s": step.delivered_per_s,
                        "sustained": step.sustained, "totals": t, "load": loadavg()}),
                    );
                    if self.opts.mode == Mode::Smoke && (t.sent == 0 || step.fraction < 1.0) {
                        fleet.stop().await;
                        server.stop().await;
                        bail!(
                            "{} {}: sent {} accepted {} delivered {} of {}",
                            target.name(),
                            transport.name(),
                            t.sent,
                            t.accepted,
                            t.received,
                            t.accepted * members as u64
                        );
                    }
                    let sustained = step.sustained;
                    tried.push(step);
                    if !sustained {
                        // An overloaded step's backlog must not run into the next step.
                        let _ = fleet.quiet(Duration::from_secs(10)).await;
                    }
                }
                fleet.stop().await;
                server.stop().await;
                let best = tried
                    .iter()
                    .filter(|s| s.sustained)
                    .max_by(|a, b| a.offered.total_cmp(&b.offered))
                    .cloned();
                let above = tried
                    .iter()
                    .filter(|s| !s.sustained && best.as_ref().is_none_or(|b| s.offered > b.offered))
                    .min_by(|a, b| a.offered.total_cmp(&b.offered))
                    .cloned();
                if let Some(b) = &best {
                    hint.insert((target, transport), b.offered);
                }
                knees.push(((n_rooms, members), target, transport, best, above));
            }
        }
        self.json.insert("s3".into(), Value::Array(rows));
        self.s3_knees(&knees);
        if peak.0 > 0.0 {
            self.goal(
                "S3 generator headroom: its receivers' CPU share at the run's fastest step".into(),
                format!(
                    "{:.0} deliveries/s ({}) at {:.0} % of the generator's cores{}",
                    peak.0,
                    peak.2,
                    peak.1 * 100.0,
                    if peak.1 > 0.8 {
                        " — the generator was the limit there"
                    } else {
                        ""
                    }
                ),
                "–".into(),
                "–".into(),
            );
            self.json.insert(
                "s3_generator_peak".into(),
                json!({"delivered_per_s": peak.0, "receiver_cpu_share": peak.1, "step": peak.2}),
            );
        }
        Ok(())
    }

    fn s3_knees(&mut self, knees: &[Knee]) {
        self.section(
            "S3 — highest sustained rate per server (the knee), and the ratios at it",
            &[
                "rooms × members",
                "server",
                "transport",
                "highest sustained deliveries/s",
                "its p99 (ms)",
                "lowest unsustained offered above it",
                "there: server core / generator cores busy %",
                "Confab ÷ bare",
                "Confab ÷ Node",
            ],
        );
        let rate = |shape, target, tr| {
            knees
                .iter()
                .find(|k| k.0 == shape && k.1 == target && k.2 == tr)
                .and_then(|k| k.3.as_ref())
                .map_or(f64::NAN, |s| s.delivered_per_s)
        };
        let mut js = Vec::new();
        for (shape, target, tr, best, above) in knees {
            let (r, p99) = best
                .as_ref()
                .map_or((f64::NAN, f64::NAN), |s| (s.delivered_per_s, s.p99_ms));
            let bare = rate(*shape, Target::Bare, Transport::Ws);
            let node = rate(*shape, Target::Node, Transport::Sio);
            let confab = *target == Target::Confab;
            self.row(&[
                format!("{} × {}", shape.0, shape.1),
                target.name().into(),
                tr.name().into(),
                if r.is_nan() {
                    "none".into()
                } else {
                    format!("{r:.0}")
                },
                f1(p99),
                above.as_ref().map_or("none (search ended)".into(), |a| {
                    format!("{:.0}", a.offered)
                }),
                above.as_ref().map_or("–".into(), |a| {
                    format!(
                        "{} / {}",
                        busy_pct(a.server_busy),
                        busy_pct(a.generator_busy)
                    )
                }),
                if confab { ratio(r, bare) } else { "–".into() },
                if confab { ratio(r, node) } else { "–".into() },
            ]);
            js.push(json!({"rooms": shape.0, "members": shape.1, "server": target.name(),
                "transport": tr.name(), "sustained_per_s": if r.is_nan() { Value::Null } else { json!(r) },
                "lowest_unsustained": above.as_ref().map(|a| a.offered),
                "there_server_core_busy": above.as_ref().map(|a| a.server_busy).filter(|b| b.is_finite()),
                "there_generator_cores_busy": above.as_ref().map(|a| a.generator_busy).filter(|b| b.is_finite())}));
            if confab {
                let met = r >= 20.0 * node && r >= 0.7 * bare;
                self.goal(
                    format!(
                        "S3 {}×{} ≥ 20× Node and ≥ 70 % of bare ({})",
                        shape.0,
                        shape.1,
                        tr.name()
                    ),
                    format!(
                        "{} deliveries/s sustained (p99 {} ms); Node {}, bare {} {}",
                        f1(r),
                        f1(p99),
                        f1(node),
                        f1(bare),
                        if met { "✅" } else { "❌" }
                    ),
                    ratio(r, node),
                    ratio(r, bare),
                );
            }
        }
        let headline = rate((1, 1000), Target::Bare, Transport::Ws);
        if knees.iter().any(|k| k.0 == (1, 1000)) {
            self.goal(
                "S3 generator not the limit: bare broadcaster sustains ≥ 1M deliveries/s (1×1000)"
                    .into(),
                format!(
                    "{} deliveries/s {}",
                    f1(headline),
                    if headline >= 1e6 { "✅" } else { "❌" }
                ),
                "–".into(),
                "–".into(),
            );
        }
        self.json.insert("s3_knees".into(), Value::Array(js));
    }

    /// S4: every receiver dropped at one instant; time until all are reconnected and until all
    /// have caught up (resumed in the handshake and synced), and messages lost.
    async fn s4(&mut self) -> Result<()> {
        // The drain bounds how long the storm may take to settle after the send window.
        let (clients, n_rooms, secs, drain) = match self.opts.mode {
            Mode::Smoke => (60, 3, 3, 15_000),
            Mode::Quick => (5_000, 50, 9, 60_000),
            Mode::Full => (19_000, 100, 12, 90_000),
        };
        let mut transports = vec![Transport::Sio];
        if self.confab_ws().await? {
            transports.push(Transport::Ws);
        }
        self.section(
            &format!("S4 — reconnect storm: {clients} clients in {n_rooms} rooms, all receivers dropped at once at t = {}s while one sender per room sends 2 msg/s", secs / 3),
            &["server", "transport", "clients", "dropped", "reconnected", "all reconnected (s)", "caught up", "all caught up (s)", "retries", "messages lost", "failed clients"],
        );
        self.note(format!(
            "Times are from the drop instant to the last client reconnected (transport connected) and to the \
             last caught up (resumed in the handshake, then synced to the room's seq); a count below \"dropped\" means some \
             did not get there within {} s of the send window's end.",
            drain / 1000
        ));
        let mut rows = Vec::new();
        for tr in transports {
            let server = self.start(Target::Confab, &[]).await?;
            let rooms = self.rooms(Target::Confab, &server, n_rooms).await?;
            let spec = Self::spec(
                vec![server.url.clone()],
                tr,
                rooms,
                clients,
                1,
                secs * 1000,
                drain,
                1000,
                true,
            );
            let t = self.measure(&spec, 2.0).await;
            server.stop().await;
            let t = t?;
            let all_back = t.caught_up == t.dropped && t.dropped > 0;
            let back_s = t.all_caught_up_ms / 1000.0;
            let met = all_back && back_s < 5.0 && t.lost == 0 && t.failed == 0;
            eprintln!(
                "   storm {}: {} dropped, {} reconnected (all in {:.2} s), {} caught up (all in {back_s:.2} s), {} lost, {} failed",
                tr.name(),
                t.dropped,
                t.reconnected,
                t.all_reconnected_ms / 1000.0,
                t.caught_up,
                t.lost,
                t.failed
            );
            let when = |n: u64, ms: f64| {
                if n == t.dropped && n > 0 {
                    f1(ms / 1000.0)
                } else {
                    format!("not all ({n} of {})", t.dropped)
                }
            };
            self.row(&[
                "Confab".into(),
                tr.name().into(),
                clients.to_string(),
                t.dropped.to_string(),
                t.reconnected.to_string(),
                when(t.reconnected, t.all_reconnected_ms),
                t.caught_up.to_string(),
                when(t.caught_up, t.all_caught_up_ms),
                t.retries.to_string(),
                t.lost.to_string(),
                t.failed.to_string(),
            ]);
            self.goal(
                format!(
                    "S4 all back < 5 s, 0 lost ({}, {clients} clients)",
                    tr.name()
                ),
                format!(
                    "reconnected {} s, caught up {} s, {} lost, {} failed {}",
                    when(t.reconnected, t.all_reconnected_ms),
                    when(t.caught_up, t.all_caught_up_ms),
                    t.lost,
                    t.failed,
                    if met { "✅" } else { "❌" }
                ),
                "–".into(),
                "–".into(),
            );
            rows.push(json!({"transport": tr.name(), "clients": clients, "rooms": n_rooms, "totals": t, "load": loadavg()}));
            if t.lost > 0 || t.sent == 0 || (self.opts.mode == Mode::Smoke && !all_back) {
                self.json.insert("s4".into(), Value::Array(rows));
                bail!(
                    "storm over {}: {} lost, {} failed, {} of {} dropped caught up",
                    tr.name(),
                    t.lost,
                    t.failed,
                    t.caught_up,
                    t.dropped
                );
            }
        }
        self.json.insert("s4".into(), Value::Array(rows));
        Ok(())
    }

    /// S5: three gateways sharing Postgres and RabbitMQ; senders on one, receivers on the others.
    async fn s5(&mut self) -> Result<()> {
        let (n_rooms, members, steps, secs): (usize, usize, &[f64], u64) = match self.opts.mode {
            Mode::Smoke => (2, 10, &[100.0], 2),
            Mode::Quick => (20, 150, &[15_000.0, 60_000.0], 4),
            Mode::Full => (
                20,
                150,
                &[7_500.0, 15_000.0, 30_000.0, 60_000.0, 120_000.0],
                6,
            ),
        };
        self.section(
            &format!("S5 — three gateways through RabbitMQ (Postgres store): {n_rooms} rooms × {members}, senders on gateway 1, receivers on gateways 2 and 3"),
            &["offered deliveries/s", "delivered/s", "delivered %", "cross-node p50 (ms)", "cross-node p99 (ms)", "max (ms)", "ack p99 (ms)"],
        );
        let mut servers = Vec::new();
        for i in 0..3 {
            let extra = [
                ("CONFAB_BUS", "rabbitmq".to_owned()),
                ("CONFAB_AMQP_URL", self.opts.amqp_url.clone()),
                // Its own fresh database (scripts/bench.sh recreates it): a database left over
                // from earlier runs stopped cross-node delivery in this session (cause not found).
                (
                    "CONFAB_DATABASE_URL",
                    format!("{}_s5", self.opts.postgres_url),
                ),
                (
                    "CONFAB_NODE_ID",
                    format!("bench-{}-{i}", std::process::id()),
                ),
                // A private exchange per run: other gateways on the machine, and earlier runs,
                // share the broker.
                (
                    "CONFAB_BACKEND_PREFIX",
                    format!("bench{}", std::process::id()),
                ),
            ];
            match self.start(Target::ConfabPostgres, &extra).await {
                Ok(s) => servers.push(s),
                Err(e) => {
                    for s in servers {
                        s.stop().await;
                    }
                    let why = format!("{e:#}");
                    eprintln!("   S5 not measured: {why}");
                    self.row(&[format!("not measured: the gateway could not start with CONFAB_BUS=rabbitmq and a postgres:// store ({why})"), String::new(), String::new(), String::new(), String::new(), String::new(), String::new()]);
                    self.goal(
                        "S5 p99 < 20 ms across three gateways".into(),
                        "not measured: the distributed backends are not in this build".into(),
                        "–".into(),
                        "–".into(),
                    );
                    return Ok(());
                }
            }
        }
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let result = async {
            let rooms =
                harness::create_rooms(&urls[0], &token(SECRET, "bench-admin")?, n_rooms).await?;
            let mut rows = Vec::new();
            let mut best = None;
            let spec = Self::spec(
                urls.clone(),
                Transport::Sio,
                rooms.clone(),
                n_rooms * members,
                1,
                secs * 1000,
                3000,
                1000,
                false,
            );
            let mut fleet = self.fleet(&spec).await?;
            for &offered in steps {
                let msgs = offered / members as f64;
                let t = match self.round(&mut fleet, &spec, msgs / n_rooms as f64).await {
                    Ok(t) => t,
                    Err(e) => {
                        fleet.stop().await;
                        return Err(e);
                    }
                };
                let step = Step::of(offered, members, &t);
                eprintln!(
                    "   S5 offered {offered:.0}/s: {:.0}/s ({:.1} %), p99 {:.1} ms",
                    step.delivered_per_s,
                    step.fraction * 100.0,
                    t.recv_p99_ms
                );
                rows.push((offered, step.delivered_per_s, step.fraction, t.clone()));
                if step.fraction >= 0.99 && t.recv_p99_ms < 1000.0 {
                    best = Some((step.delivered_per_s, t.recv_p99_ms));
                } else {
                    break;
                }
            }
            fleet.stop().await;
            anyhow::Ok((rows, best))
        }
        .await;
        for s in servers {
            s.stop().await;
        }
        let (rows, best) = result?;
        let mut js = Vec::new();
        let mut first_p99 = f64::NAN;
        for (offered, rate, frac, t) in &rows {
            if first_p99.is_nan() {
                first_p99 = t.recv_p99_ms;
            }
            self.row(&[
                format!("{offered:.0}"),
                format!("{rate:.0}"),
                format!("{:.1}", frac * 100.0),
                f1(t.recv_p50_ms),
                f1(t.recv_p99_ms),
                f1(t.recv_max_ms),
                f1(t.ack_p99_ms),
            ]);
            js.push(
                json!({"offered": offered, "expected": t.accepted * members as u64, "delivered": t.received,
                    "delivered_per_s": rate, "fraction": frac, "totals": t}),
            );
        }
        if self.opts.mode == Mode::Smoke && rows.iter().any(|r| r.2 < 0.99) {
            bail!("S5 smoke: not everything was delivered across gateways");
        }
        let (rate, _) = best.unwrap_or((f64::NAN, f64::NAN));
        self.goal(
            "S5 p99 < 20 ms across three gateways".into(),
            format!(
                "p99 {} ms at the lowest step; {} deliveries/s sustained {}",
                f1(first_p99),
                f1(rate),
                if first_p99 < 20.0 { "✅" } else { "❌" }
            ),
            "–".into(),
            "–".into(),
        );
        self.json.insert("s5".into(), Value::Array(js));
        Ok(())
    }
}

/// Used by the smoke run to fail loudly when a peer cannot be found.
pub fn node_dir_ok(dir: &std::path::Path) -> Result<()> {
    let p = dir.join("node_modules/socket.io");
    if !p.exists() {
        bail!(
            "{} is missing: run npm ci in {}",
            p.display(),
            dir.display()
        );
    }
    Ok(())
}

pub fn context_line(opts: &Opts) -> String {
    format!(
        "mode {:?}, scenarios {}, pinning server={:?} generator={:?}",
        opts.mode,
        opts.scenarios.join(","),
        opts.pin.server,
        opts.pin.generator
    )
}

/// `ROOMSxMEMBERS`, as `--shapes` takes it.
pub fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(['x', '×'])
        .and_then(|(r, m)| Some((r.trim().parse().ok()?, m.trim().parse().ok()?)));
    match parsed {
        Some((r, m)) if r > 0 && m > 1 => Ok((r, m)),
        _ => bail!("--shapes: {s:?} is not ROOMSxMEMBERS (e.g. 1x1000)"),
    }
}

/// Knees are placed to within this ratio (the highest sustained step ÷ the lowest unsustained).
pub const KNEE_WITHIN: f64 = 1.25;
/// The first S3 step for a server with no earlier shape's knee to start from.
pub const S3_START: f64 = 20_000.0;

/// Per S3 shape and server: the highest sustained step and the lowest unsustained rate above it.
type Knee = (
    (usize, usize),
    Target,
    Transport,
    Option<Step>,
    Option<Step>,
);

/// One S3 (or S5) step, judged.
#[derive(Debug, Clone)]
pub struct Step {
    pub offered: f64,
    pub sustained: bool,
    /// Far from the knee: worth a bigger jump.
    pub easy: bool,
    pub fraction: f64,
    pub delivered_per_s: f64,
    pub p99_ms: f64,
    /// Busy shares of the server's core and the generator's cores in the step's send window.
    pub server_busy: f64,
    pub generator_busy: f64,
}

impl Step {
    /// Sustained: every accepted send delivered to every member, and p99 < 100 ms.
    pub fn of(offered: f64, members: usize, t: &Totals) -> Step {
        let expected = t.accepted as f64 * members as f64;
        let fraction = if expected > 0.0 {
            t.received as f64 / expected
        } else {
            0.0
        };
        let delivered_per_s = t.received as f64 / t.window_s.max(t.duration_s).max(1e-9);
        let sustained = expected > 0.0 && t.received as f64 >= expected && t.recv_p99_ms < 100.0;
        Step {
            offered,
            sustained,
            easy: sustained && t.recv_p99_ms < 25.0,
            fraction,
            delivered_per_s,
            p99_ms: t.recv_p99_ms,
            server_busy: t.server_core_busy,
            generator_busy: t.generator_core_busy,
        }
    }
}

fn nice(x: f64) -> f64 {
    // Two significant digits keep the table readable.
    let mag = 10f64.powf(x.log10().floor() - 1.0);
    (x / mag).round() * mag
}

/// The next offered rate of a knee search, or `None` once the knee is placed to within
/// `within` (the highest sustained rate ÷ the lowest unsustained rate above it): from `start`,
/// ×4 while the highest sustained step was easy (p99 < 25 ms), ×2 when it was not, ÷2 while
/// nothing was sustained (down to 1,000/s), then the geometric middle of the bracket.
pub fn next_rate(tried: &[Step], start: f64, within: f64) -> Option<f64> {
    if tried.is_empty() {
        return Some(start);
    }
    let lo = tried
        .iter()
        .filter(|s| s.sustained)
        .max_by(|a, b| a.offered.total_cmp(&b.offered));
    let Some(lo) = lo else {
        let min = tried
            .iter()
            .map(|s| s.offered)
            .fold(f64::INFINITY, f64::min);
        return (min / 2.0 >= 1_000.0).then(|| nice(min / 2.0));
    };
    let hi = tried
        .iter()
        .filter(|s| !s.sustained && s.offered > lo.offered)
        .map(|s| s.offered)
        .min_by(f64::total_cmp);
    let next = match hi {
        None => nice(lo.offered * if lo.easy { 4.0 } else { 2.0 }),
        Some(hi) if hi / lo.offered <= within => return None,
        Some(hi) => nice((hi * lo.offered).sqrt()),
    };
    let fresh = !tried.iter().any(|s| (s.offered - next).abs() < 1e-6 * next);
    fresh.then_some(next)
}

/// The receiving processes' CPU time per delivery: what one generator core can read is 1 s ÷ it.
fn cpu_per(t: &Totals) -> String {
    if t.received == 0 || t.receiver_cpu_ms <= 0.0 {
        return "–".into();
    }
    format!("{:.0}", t.receiver_cpu_ms * 1e6 / t.received as f64)
}

/// A busy share as a percentage, or "–" when it is unknown (nothing pinned).
fn busy_pct(share: f64) -> String {
    if share.is_finite() {
        format!("{:.0}", share * 100.0)
    } else {
        "–".into()
    }
}

fn pct(f: f64) -> String {
    // 100.0 is printed only when every expected delivery arrived, never by rounding.
    if f >= 1.0 {
        format!("{:.1}", f * 100.0)
    } else {
        format!("{:.1}", (f * 1000.0).floor() / 10.0)
    }
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

/// Where and on what a run ran, for the generated BENCHMARKS.md.
fn context(opts: &Opts, started: String) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mode = match opts.mode {
        Mode::Smoke => " --smoke",
        Mode::Quick => " --quick",
        Mode::Full => "",
    };
    let scen = if opts.scenarios.iter().any(|s| s == "all") {
        String::new()
    } else {
        format!(" --scenarios {}", opts.scenarios.join(","))
    };
    let servers = if opts.servers.iter().any(|s| s == "all") {
        String::new()
    } else {
        format!(" --servers {}", opts.servers.join(","))
    };
    json!({
        "command": format!("bash scripts/bench.sh{mode}{scen}{servers}"),
        "started": started,
        "finished": utc_now(),
        "commit": first_line("git", &["rev-parse", "--short", "HEAD"]),
        "cores": cores.to_string(),
        "cpu": cpu,
        "kernel": kernel,
        "versions": format!("{}; Node {}", first_line("rustc", &["--version"]), first_line("node", &["--version"])),
        "server_cpus": opts.pin.server.clone().unwrap_or_else(|| "any".into()),
        "generator_cpus": opts.pin.generator.clone().unwrap_or_else(|| "any".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(offered: f64, sustained: bool, p99: f64) -> Step {
        Step {
            offered,
            sustained,
            easy: sustained && p99 < 25.0,
            fraction: if sustained { 1.0 } else { 0.9 },
            delivered_per_s: offered,
            p99_ms: p99,
            server_busy: f64::NAN,
            generator_busy: f64::NAN,
        }
    }

    /// Runs a search against a server whose knee is at `knee` (sustained below it).
    fn search(start: f64, knee: f64) -> Vec<Step> {
        let mut tried = Vec::new();
        while let Some(r) = next_rate(&tried, start, KNEE_WITHIN) {
            // Far below the knee the tail is short; near it, long.
            let p99 = if r < knee / 4.0 { 5.0 } else { 60.0 };
            tried.push(step(r, r < knee, p99));
            assert!(tried.len() < 20, "the search ends");
        }
        tried
    }

    #[test]
    fn the_knee_search_brackets_the_knee_within_a_quarter() {
        for knee in [3_000.0, 33_000.0, 140_000.0, 1_000_000.0, 2_600_000.0] {
            let tried = search(S3_START, knee);
            let lo = tried
                .iter()
                .filter(|s| s.sustained)
                .map(|s| s.offered)
                .fold(0.0, f64::max);
            let hi = tried
                .iter()
                .filter(|s| !s.sustained)
                .map(|s| s.offered)
                .fold(f64::INFINITY, f64::min);
            assert!(lo < knee && knee <= hi, "knee {knee}: {lo}..{hi}");
            assert!(
                hi / lo <= KNEE_WITHIN * 1.01,
                "knee {knee}: {lo}..{hi} ({} steps)",
                tried.len()
            );
            assert!(tried.len() <= 9, "knee {knee}: {} steps", tried.len());
        }
    }

    #[test]
    fn nothing_sustained_halves_down_to_a_floor() {
        let tried = search(S3_START, 10.0);
        assert!(tried.iter().all(|s| !s.sustained));
        assert!(tried.last().is_some_and(|s| s.offered < 2_000.0));
    }

    #[test]
    fn a_step_is_sustained_only_when_every_accepted_send_reached_every_member_in_time() {
        let t = |accepted: u64, received: u64, p99: f64| Totals {
            connected: 10,
            failed: 0,
            sent: accepted,
            accepted,
            refused: 0,
            errors: 0,
            unanswered: 0,
            received,
            stale: 0,
            duration_s: 4.0,
            window_s: 4.05,
            ack_p50_ms: 1.0,
            ack_p99_ms: 1.0,
            ack_max_ms: 1.0,
            recv_p50_ms: 1.0,
            recv_p99_ms: p99,
            recv_max_ms: p99,
            disconnects: 0,
            dropped: 0,
            reconnected: 0,
            caught_up: 0,
            not_caught_up: 0,
            all_reconnected_ms: 0.0,
            all_caught_up_ms: 0.0,
            retries: 0,
            lost: 0,
            generator_cpu_ms: 1.0,
            receiver_cpu_ms: 1.0,
            server_core_busy: 0.5,
            generator_core_busy: f64::NAN,
        };
        let s = Step::of(10_000.0, 10, &t(4000, 40_000, 20.0));
        assert!(s.sustained && s.easy);
        assert!((s.delivered_per_s - 40_000.0 / 4.05).abs() < 1e-6);
        assert!(!Step::of(10_000.0, 10, &t(4000, 39_999, 20.0)).sustained);
        assert!(!Step::of(10_000.0, 10, &t(4000, 40_000, 100.0)).sustained);
        assert!(!Step::of(10_000.0, 10, &t(0, 0, f64::NAN)).sustained);
        assert_eq!(pct(39_999.0 / 40_000.0), "99.9");
        assert_eq!(pct(1.0), "100.0");
        assert_eq!(busy_pct(s.server_busy), "50");
        assert_eq!(busy_pct(s.generator_busy), "–");
    }
}
