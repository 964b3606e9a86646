//! `confab-bench`: runs the scenarios (orchestrator), one generator process (`worker`), checks a
//! run's results (`check`), writes them into BENCHMARKS.md (`report`), or measures the
//! generator's own receive path (`recv-bench`).

mod check;
mod client;
mod harness;
mod recv;
mod report;
mod scenarios;
mod wire;
mod worker;
mod ws;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Confab benchmarks: Confab, a Node Socket.IO peer and a bare broadcaster, side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs scenarios against every server and writes results.json and results.md.
    Run {
        #[arg(long, value_enum, default_value = "full")]
        mode: scenarios::Mode,
        /// s1..s5 or all (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "all")]
        scenarios: Vec<String>,
        /// confab, node, bare or all (comma-separated): the servers S1–S3 compare. For targeted
        /// checks; a table for BENCHMARKS.md needs all.
        #[arg(long, value_delimiter = ',', default_value = "all")]
        servers: Vec<String>,
        /// S3 shapes as ROOMSxMEMBERS (comma-separated), for targeted checks; default: the mode's.
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
        /// S3's first offered rate (deliveries/s), for targeted checks; default 20000.
        #[arg(long)]
        s3_start: Option<f64>,
        /// S1's connection counts (comma-separated), for targeted checks; default: the mode's.
        #[arg(long, value_delimiter = ',')]
        s1_clients: Vec<usize>,
        #[arg(long, default_value = "artifacts/bench")]
        out: PathBuf,
        /// The Node peer (with node_modules installed).
        #[arg(long, default_value = "bench/peers/node")]
        node_dir: PathBuf,
        #[arg(
            long,
            env = "BENCH_POSTGRES_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/confab_bench"
        )]
        postgres_url: String,
        #[arg(
            long,
            env = "BENCH_AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        /// Do not pin server and generator to separate cores.
        #[arg(long)]
        no_pin: bool,
    },
    /// Exits nonzero, naming the scenario and field, unless results.json shows every scenario
    /// working: rows present, clients connected, samples taken, numbers finite, nothing lost.
    Check {
        results: PathBuf,
        /// s1..s5 or all (comma-separated): the scenarios that must be present.
        #[arg(long, value_delimiter = ',', default_value = "all")]
        scenarios: Vec<String>,
    },
    /// Replaces the generated part of BENCHMARKS.md (between its markers) with the tables of
    /// a run's results.json.
    Report {
        results: PathBuf,
        #[arg(long, default_value = "BENCHMARKS.md")]
        into: PathBuf,
    },
    /// Measures the generator's receive path (WebSocket framing, scan for stamp and seq, tally,
    /// histogram) over frames recorded from each server, on this thread; prints frames/s.
    RecvBench {
        /// Frames per server.
        #[arg(long, default_value_t = 2_000_000)]
        frames: usize,
        /// Bytes handed to the parser per read (what one read from a busy socket returns).
        #[arg(long, default_value_t = 16_384)]
        read_bytes: usize,
    },
    /// One generator process (started by `run`; speaks JSON lines on stdin/stdout). One thread:
    /// the orchestrator starts one process per generator core or more.
    Worker {
        #[arg(long)]
        spec: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Check { results, scenarios } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", results.display()))?;
            let wanted: Vec<String> = scenarios.iter().map(|s| s.to_lowercase()).collect();
            let wanted: Vec<&str> = if wanted.iter().any(|s| s == "all") {
                check::ALL.to_vec()
            } else {
                wanted.iter().map(String::as_str).collect()
            };
            let problems = check::problems(&json, &wanted);
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("!! {p}");
                }
                eprintln!(
                    "{}: {} problem(s) in {}",
                    results.display(),
                    problems.len(),
                    wanted.join(",")
                );
                // A verdict, not a crash: no error chain or backtrace.
                std::process::exit(1);
            }
            println!("{}: {} ok", results.display(), wanted.join(","));
            Ok(())
        }
        Cmd::Worker { spec } => {
            let spec: worker::WorkerSpec = serde_json::from_str(&spec)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(worker::run(spec))
        }
        Cmd::Report { results, into } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", results.display()))?;
            let doc = std::fs::read_to_string(&into)
                .with_context(|| format!("reading {}", into.display()))?;
            let out = report::splice(&doc, &report::render(&json)?)
                .with_context(|| format!("updating {}", into.display()))?;
            std::fs::write(&into, out)?;
            println!(
                "{}: results of {} written",
                into.display(),
                results.display()
            );
            Ok(())
        }
        Cmd::RecvBench { frames, read_bytes } => {
            println!(
                "receive path on one thread: {frames} recorded frames per server, {read_bytes} bytes per read"
            );
            println!("| server | frame bytes (avg) | frames/s | ns/frame |");
            println!("| --- | --- | --- | --- |");
            for (name, rate, avg) in recv::bench(frames, read_bytes)? {
                println!("| {name} | {avg} | {rate:.0} | {:.1} |", 1e9 / rate);
            }
            Ok(())
        }
        Cmd::Run {
            mode,
            scenarios: which,
            servers,
            shapes,
            s3_start,
            s1_clients,
            out,
            node_dir,
            postgres_url,
            amqp_url,
            no_pin,
        } => {
            let opts = scenarios::Opts {
                mode,
                scenarios: which.iter().map(|s| s.to_lowercase()).collect(),
                servers: servers.iter().map(|s| s.to_lowercase()).collect(),
                shapes: shapes
                    .iter()
                    .map(|s| scenarios::parse_shape(s))
                    .collect::<Result<_>>()?,
                s3_start,
                s1_clients,
                out_dir: out,
                node_dir,
                postgres_url,
                amqp_url,
                pin: harness::Pinning::detect(no_pin),
            };
            scenarios::node_dir_ok(&opts.node_dir)?;
            eprintln!(
                "confab-bench: {} (load {})",
                scenarios::context_line(&opts),
                scenarios::loadavg()
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(scenarios::Bench::new(opts)?.run())
        }
    }
}
