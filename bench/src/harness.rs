//! Processes the orchestrator runs: servers under test (pinned to their core) and generator workers.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::worker::{WorkerResult, WorkerSpec, decode_hist};

/// Where things run: the server gets one core, the generator the other, when there are two.
#[derive(Debug, Clone)]
pub struct Pinning {
    pub server: Option<String>,
    pub generator: Option<String>,
}

impl Pinning {
    /// Cores the generator may use (one when it is not pinned: it then shares with the server).
    pub fn generator_cores(&self) -> usize {
        match &self.generator {
            Some(range) => range
                .split_once('-')
                .and_then(|(a, b)| Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?))
                .unwrap_or(1),
            None => 1,
        }
    }

    /// The cores of the server and of the generator, when pinned.
    pub fn cores(&self) -> (Vec<usize>, Vec<usize>) {
        let list = |c: &Option<String>| c.as_deref().map(cpu_list).unwrap_or_default();
        (list(&self.server), list(&self.generator))
    }

    pub fn detect(disabled: bool) -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let taskset = std::path::Path::new("/usr/bin/taskset").exists();
        if disabled || !taskset || cores < 2 {
            return Pinning {
                server: None,
                generator: None,
            };
        }
        Pinning {
            server: Some("0".into()),
            generator: Some(format!("1-{}", cores - 1)),
        }
    }
}

/// The cores a taskset list names: `0`, `1-3`, `0,2-3`.
pub fn cpu_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

/// Per core, `(busy, all)` jiffies from the `cpuN` lines of /proc/stat: busy is everything but
/// idle and iowait, over the first eight fields (guest time is already in user).
pub fn parse_core_ticks(stat: &str) -> std::collections::BTreeMap<usize, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(core) = fields
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let ticks: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        if ticks.len() < 5 {
            continue;
        }
        let all: u64 = ticks.iter().sum();
        out.insert(core, (all - ticks[3] - ticks[4], all));
    }
    out
}

fn core_ticks() -> std::collections::BTreeMap<usize, (u64, u64)> {
    std::fs::read_to_string("/proc/stat")
        .map(|s| parse_core_ticks(&s))
        .unwrap_or_default()
}

/// The busy share of `cores` between two readings of [`core_ticks`] (NaN when unknown).
pub fn busy_share(
    first: &std::collections::BTreeMap<usize, (u64, u64)>,
    last: &std::collections::BTreeMap<usize, (u64, u64)>,
    cores: &[usize],
) -> f64 {
    let (mut busy, mut all) = (0u64, 0u64);
    for core in cores {
        if let (Some(a), Some(b)) = (first.get(core), last.get(core)) {
            busy += b.0.saturating_sub(a.0);
            all += b.1.saturating_sub(a.1);
        }
    }
    if all == 0 {
        f64::NAN
    } else {
        busy as f64 / all as f64
    }
}

/// How busy the server's core and the generator's cores were in a round's send window (from a
/// fifth into it to its end, so connection setup and the drain after it are left out).
#[derive(Debug, Clone, Copy)]
pub struct CoreBusy {
    pub server: f64,
    pub generator: f64,
}

fn pinned(cpus: &Option<String>, program: &str) -> Command {
    match cpus {
        // taskset execs the program, so the child's pid is the server's pid (for /proc RSS).
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A server under test.
pub struct Server {
    pub name: String,
    pub url: String,
    child: Child,
}

impl Server {
    /// Starts `program` and waits for its `... listening on http://HOST:PORT` line.
    pub async fn start(
        name: &str,
        pin: &Pinning,
        program: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Server> {
        let mut cmd = pinned(&pin.server, program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(l) = lines.next_line().await? {
                if let Some(at) = l.find("listening on http://") {
                    let url = l[at + "listening on ".len()..].trim().to_owned();
                    return Ok(url);
                }
            }
            Err(anyhow!("{name} exited before listening"))
        })
        .await
        .map_err(|_| anyhow!("{name} did not start listening within 60 s"))??;
        // Keep draining stdout so a chatty server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            name: name.to_owned(),
            url,
            child,
        })
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("server already exited")
    }

    /// Resident set size from /proc, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("VmRSS missing")
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        eprintln!("   stopped {}", self.name);
    }
}

/// Creates `n` open conversations over HTTP (the gateway's and the Node peer's API).
pub async fn create_rooms(base: &str, token: &str, n: usize) -> Result<Vec<String>> {
    let http = reqwest::Client::new();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let resp = http
            .post(format!("{base}/api/conversations"))
            .bearer_auth(token)
            .json(&serde_json::json!({"kind": "open", "title": format!("bench room {i}")}))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        let id = body["conversation"]["id"]
            .as_str()
            .ok_or_else(|| anyhow!("creating a conversation: {status} {body}"))?;
        ids.push(id.to_owned());
    }
    Ok(ids)
}

/// The generator's processes for one measurement.
pub struct Fleet {
    workers: Vec<(Child, ChildStdin, Lines<BufReader<ChildStdout>>)>,
}

/// Clients per generator process: well under the 20k descriptors each process may hold.
pub const CLIENTS_PER_WORKER: usize = 10_000;

/// Distinct source addresses per worker: 127.1.W.1..=4, each with its own ephemeral ports.
pub fn sources_for(worker: usize) -> Vec<IpAddr> {
    (1..=4)
        .map(|h| IpAddr::V4(Ipv4Addr::new(127, 1, worker as u8, h)))
        .collect()
}

/// How the clients `0..count` are split over processes: the senders (the first
/// `rooms × senders_per_room` indices) alone in the first, so a receive backlog never delays a
/// scheduled send; the receivers over at least one process per generator core and at most
/// [`CLIENTS_PER_WORKER`] each. Returns `(first, count)` per process.
pub fn split(count: usize, senders: usize, cores: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let senders = senders.min(count);
    if senders > 0 && senders < count {
        out.push((0, senders));
    }
    let first = if out.is_empty() { 0 } else { senders };
    let rest = count - first;
    let n = rest
        .div_ceil(CLIENTS_PER_WORKER)
        .max(cores.max(1))
        .min(rest.max(1));
    let mut at = first;
    for w in 0..n {
        let c = rest / n + usize::from(w < rest % n);
        out.push((at, c));
        at += c;
    }
    out
}

impl Fleet {
    /// Splits `template.count` clients over processes as [`split`] says.
    pub async fn spawn(pin: &Pinning, template: &WorkerSpec) -> Result<Fleet> {
        let exe = std::env::current_exe()?;
        let exe = exe.to_str().context("exe path")?;
        let senders = template.rooms.len() * template.senders_per_room;
        let mut workers = Vec::new();
        for (w, (first, count)) in split(template.count, senders, pin.generator_cores())
            .into_iter()
            .enumerate()
        {
            let spec = WorkerSpec {
                worker: w,
                first,
                count,
                sources: sources_for(w),
                ..template.clone()
            };
            let mut cmd = pinned(&pin.generator, exe);
            cmd.arg("worker")
                .arg("--spec")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting a generator worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
            workers.push((child, stdin, stdout));
        }
        Ok(Fleet { workers })
    }

    async fn next_event(
        lines: &mut Lines<BufReader<ChildStdout>>,
        want: &str,
        timeout: Duration,
    ) -> Result<Value> {
        tokio::time::timeout(timeout, async {
            while let Some(l) = lines.next_line().await? {
                if let Ok(v) = serde_json::from_str::<Value>(&l)
                    && v["event"] == want
                {
                    return Ok(v);
                }
            }
            bail!("a worker exited before {want}")
        })
        .await
        .map_err(|_| anyhow!("no {want} from a worker within {timeout:?}"))?
    }

    /// Waits until every worker's clients are connected (and joined); returns (connected, failed).
    pub async fn ready(&mut self) -> Result<(u64, u64)> {
        let (mut ok, mut failed) = (0, 0);
        for (_, _, lines) in &mut self.workers {
            let v = Self::next_event(lines, "ready", Duration::from_secs(600)).await?;
            ok += v["connected"].as_u64().unwrap_or(0);
            failed += v["failed"].as_u64().unwrap_or(0);
        }
        Ok((ok, failed))
    }

    async fn tell(&mut self, line: &str) -> Result<()> {
        for (_, stdin, _) in &mut self.workers {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Runs one round everywhere from one common instant (a little ahead, so every process has
    /// the line before it) and collects the results, with how busy the server's and the
    /// generator's cores were while it sent for `window`.
    pub async fn go(
        &mut self,
        pin: &Pinning,
        rate_per_sender: f64,
        window: Duration,
        timeout: Duration,
    ) -> Result<(Vec<WorkerResult>, CoreBusy)> {
        const LEAD: Duration = Duration::from_millis(300);
        let start = crate::worker::unix_nanos() + LEAD.as_nanos() as u64;
        let begun = tokio::time::Instant::now() + LEAD;
        let reading = tokio::spawn(async move {
            tokio::time::sleep_until(begun + window / 5).await;
            let first = core_ticks();
            tokio::time::sleep_until(begun + window).await;
            (first, core_ticks())
        });
        self.tell(&format!("go {rate_per_sender} {start}\n"))
            .await?;
        let mut out = Vec::new();
        for (_, _, lines) in &mut self.workers {
            let v = Self::next_event(lines, "result", timeout).await?;
            out.push(serde_json::from_value(v["result"].clone())?);
        }
        let (first, last) = reading.await.unwrap_or_default();
        let (server, generator) = pin.cores();
        let busy = CoreBusy {
            server: busy_share(&first, &last, &server),
            generator: busy_share(&first, &last, &generator),
        };
        Ok((out, busy))
    }

    /// Waits until no worker has received anything for 0.5 s (at most `max`): an overloaded
    /// step's backlog must not run into the next step. Returns the longest wait.
    pub async fn quiet(&mut self, max: Duration) -> Result<Duration> {
        self.tell(&format!("quiet {}\n", max.as_millis())).await?;
        let mut longest = Duration::ZERO;
        for (_, _, lines) in &mut self.workers {
            let v = Self::next_event(lines, "quiet", max + Duration::from_secs(30)).await?;
            longest = longest.max(Duration::from_millis(v["waited_ms"].as_u64().unwrap_or(0)));
        }
        Ok(longest)
    }

    pub async fn stop(mut self) {
        for (child, stdin, _) in &mut self.workers {
            let _ = stdin.write_all(b"stop\n").await;
            let _ = stdin.flush().await;
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// The workers' results folded together.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub connected: u64,
    pub failed: u64,
    pub sent: u64,
    pub accepted: u64,
    pub refused: u64,
    pub errors: u64,
    pub unanswered: u64,
    pub received: u64,
    pub stale: u64,
    /// The send window, and the time from the round's start to its last delivery.
    pub duration_s: f64,
    pub window_s: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub recv_p50_ms: f64,
    pub recv_p99_ms: f64,
    pub recv_max_ms: f64,
    pub disconnects: u64,
    pub dropped: u64,
    pub reconnected: u64,
    pub caught_up: u64,
    pub not_caught_up: u64,
    pub all_reconnected_ms: f64,
    pub all_caught_up_ms: f64,
    pub retries: u64,
    pub lost: u64,
    /// The generator's CPU time in the round, all processes: senders and receivers.
    pub generator_cpu_ms: f64,
    pub receiver_cpu_ms: f64,
    /// Busy shares of the server's core and of the generator's cores in the send window
    /// (NaN, serialised as null, when not pinned).
    pub server_core_busy: f64,
    pub generator_core_busy: f64,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn fold(results: &[WorkerResult], duration_s: f64, storm: bool) -> Result<Totals> {
    let mut ack = crate::worker::new_hist();
    let mut recv = ack.clone();
    let rooms = results
        .iter()
        .map(|r| r.room_max_acked.len())
        .max()
        .unwrap_or(0);
    let mut room_final = vec![0u64; rooms];
    let mut t = Totals {
        connected: 0,
        failed: 0,
        sent: 0,
        accepted: 0,
        refused: 0,
        errors: 0,
        unanswered: 0,
        received: 0,
        stale: 0,
        duration_s,
        window_s: duration_s,
        ack_p50_ms: 0.0,
        ack_p99_ms: 0.0,
        ack_max_ms: 0.0,
        recv_p50_ms: 0.0,
        recv_p99_ms: 0.0,
        recv_max_ms: 0.0,
        disconnects: 0,
        dropped: 0,
        reconnected: 0,
        caught_up: 0,
        not_caught_up: 0,
        all_reconnected_ms: 0.0,
        all_caught_up_ms: 0.0,
        retries: 0,
        lost: 0,
        generator_cpu_ms: 0.0,
        receiver_cpu_ms: 0.0,
        server_core_busy: f64::NAN,
        generator_core_busy: f64::NAN,
    };
    for r in results {
        ack.add(decode_hist(&r.ack_hist)?)?;
        recv.add(decode_hist(&r.recv_hist)?)?;
        t.connected += r.connected;
        t.failed += r.failed;
        t.sent += r.sent;
        t.accepted += r.accepted;
        t.refused += r.refused;
        t.errors += r.errors;
        t.unanswered += r.unanswered;
        t.received += r.received;
        t.stale += r.stale;
        t.window_s = t.window_s.max(r.last_delivery_ms / 1000.0);
        t.disconnects += r.disconnects;
        t.dropped += r.dropped;
        t.reconnected += r.reconnected;
        t.caught_up += r.caught_up;
        t.not_caught_up += r.not_caught_up;
        t.all_reconnected_ms = t.all_reconnected_ms.max(r.all_reconnected_ms);
        t.all_caught_up_ms = t.all_caught_up_ms.max(r.all_caught_up_ms);
        t.retries += r.retries;
        t.generator_cpu_ms += r.cpu_ms;
        if r.sent == 0 {
            t.receiver_cpu_ms += r.cpu_ms;
        }
        for (f, m) in room_final.iter_mut().zip(&r.room_max_acked) {
            *f = (*f).max(*m);
        }
    }
    // Lost: for every receiver, seqs in (its join seq, the room's last acked seq] it never saw.
    for r in results.iter().filter(|_| storm) {
        for (i, f) in room_final.iter().enumerate() {
            let expected = r.room_receivers[i] * f;
            let have = r.room_join_sum[i] + r.room_seen_sum[i];
            t.lost += expected.saturating_sub(have);
        }
    }
    t.ack_p50_ms = ms(&ack, 0.5);
    t.ack_p99_ms = ms(&ack, 0.99);
    t.ack_max_ms = ms(&ack, 1.0);
    t.recv_p50_ms = ms(&recv, 0.5);
    t.recv_p99_ms = ms(&recv, 0.99);
    t.recv_max_ms = ms(&recv, 1.0);
    Ok(t)
}

/// The gateway binary: `CONFAB_GATEWAY_BIN`, else next to this executable.
pub fn sibling_bin(env: &str, name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found; build it (cargo build --release -p confab-gateway -p confab-bench) or set {env}",
            p.display()
        );
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_busy_shares_come_from_the_per_core_lines_of_proc_stat() {
        let first = parse_core_ticks(
            "cpu  300 0 100 1000 0 0 0 0 0 0\n\
             cpu0 100 0 50 500 0 0 0 0 0 0\n\
             cpu1 200 0 50 500 0 0 0 0 0 0\n\
             intr 1 2 3\n",
        );
        // Core 0: 90 busy of 100; core 1: 10 busy (plus 10 iowait, idle) of 100.
        let last = parse_core_ticks(
            "cpu  400 0 200 1080 10 0 0 0 0 0\n\
             cpu0 180 0 60 510 0 0 0 0 0 0\n\
             cpu1 205 0 55 580 10 0 0 0 0 0\n",
        );
        assert_eq!(first.len(), 2, "the aggregate line is not a core");
        assert!((busy_share(&first, &last, &[0]) - 0.9).abs() < 1e-9);
        assert!((busy_share(&first, &last, &[1]) - 0.1).abs() < 1e-9);
        assert!((busy_share(&first, &last, &[0, 1]) - 0.5).abs() < 1e-9);
        assert!(busy_share(&first, &last, &[7]).is_nan());
        assert_eq!(cpu_list("1-3"), vec![1, 2, 3]);
        assert_eq!(cpu_list("0,2-3"), vec![0, 2, 3]);
        assert_eq!(cpu_list("0"), vec![0]);
    }

    #[test]
    fn senders_get_a_process_of_their_own_and_receivers_are_spread() {
        assert_eq!(split(1000, 1, 1), vec![(0, 1), (1, 999)]);
        assert_eq!(split(10_000, 10, 1), vec![(0, 10), (10, 9990)]);
        assert_eq!(
            split(19_000, 100, 1),
            vec![(0, 100), (100, 9450), (9550, 9450)]
        );
        assert_eq!(
            split(1000, 1, 3),
            vec![(0, 1), (1, 333), (334, 333), (667, 333)]
        );
        // Idle clients (no rooms) and a fleet of senders only stay whole.
        assert_eq!(split(100, 0, 1), vec![(0, 100)]);
        assert_eq!(split(20, 20, 1), vec![(0, 20)]);
    }
}
