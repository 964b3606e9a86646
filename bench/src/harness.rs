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

impl Fleet {
    /// Splits `template` over as many workers as `template.count` needs.
    pub async fn spawn(pin: &Pinning, template: &WorkerSpec) -> Result<Fleet> {
        let exe = std::env::current_exe()?;
        let exe = exe.to_str().context("exe path")?;
        let n = template.count.div_ceil(CLIENTS_PER_WORKER).max(1);
        let mut workers = Vec::new();
        let mut first = template.first;
        for w in 0..n {
            let count = template.count / n + usize::from(w < template.count % n);
            let spec = WorkerSpec {
                worker: w,
                first,
                count,
                sources: sources_for(w),
                ..template.clone()
            };
            first += count;
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

    /// Starts the timed phase everywhere at once and collects the results.
    pub async fn go(
        &mut self,
        rate_per_sender: f64,
        timeout: Duration,
    ) -> Result<Vec<WorkerResult>> {
        for (_, stdin, _) in &mut self.workers {
            stdin
                .write_all(format!("go {rate_per_sender}\n").as_bytes())
                .await?;
            stdin.flush().await?;
        }
        let mut out = Vec::new();
        for (_, _, lines) in &mut self.workers {
            let v = Self::next_event(lines, "result", timeout).await?;
            out.push(serde_json::from_value(v["result"].clone())?);
        }
        Ok(out)
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
    pub acked: u64,
    pub ack_errors: u64,
    pub received: u64,
    pub window_s: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub recv_p50_ms: f64,
    pub recv_p99_ms: f64,
    pub recv_max_ms: f64,
    pub disconnects: u64,
    pub reconnected: u64,
    pub synced: u64,
    pub all_synced_ms: f64,
    pub lost: u64,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn fold(results: &[WorkerResult], duration_s: f64, storm: bool) -> Result<Totals> {
    let mut ack = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
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
        acked: 0,
        ack_errors: 0,
        received: 0,
        window_s: duration_s,
        ack_p50_ms: 0.0,
        ack_p99_ms: 0.0,
        ack_max_ms: 0.0,
        recv_p50_ms: 0.0,
        recv_p99_ms: 0.0,
        recv_max_ms: 0.0,
        disconnects: 0,
        reconnected: 0,
        synced: 0,
        all_synced_ms: 0.0,
        lost: 0,
    };
    for r in results {
        ack.add(decode_hist(&r.ack_hist)?)?;
        recv.add(decode_hist(&r.recv_hist)?)?;
        t.connected += r.connected;
        t.failed += r.failed;
        t.sent += r.sent;
        t.acked += r.acked;
        t.ack_errors += r.ack_errors;
        t.received += r.received;
        t.window_s = t.window_s.max(r.last_receive_ms / 1000.0);
        t.disconnects += r.disconnects;
        t.reconnected += r.reconnected;
        t.synced += r.synced;
        t.all_synced_ms = t.all_synced_ms.max(r.all_synced_ms);
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
