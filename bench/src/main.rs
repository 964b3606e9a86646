//! `confab-bench`: runs the scenarios (orchestrator), one generator process (`worker`), or checks a run's results (`check`).

mod check;
mod client;
mod harness;
mod scenarios;
mod wire;
mod worker;

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
    /// One generator process (started by `run`; speaks JSON lines on stdin/stdout).
    Worker {
        #[arg(long)]
        spec: String,
        /// Runtime threads; one is right when the generator has one core.
        #[arg(long, default_value_t = 0)]
        threads: usize,
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
        Cmd::Worker { spec, threads } => {
            let spec: worker::WorkerSpec = serde_json::from_str(&spec)?;
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if threads > 0 {
                rt.worker_threads(threads);
            }
            rt.enable_all().build()?.block_on(worker::run(spec))
        }
        Cmd::Run {
            mode,
            scenarios: which,
            out,
            node_dir,
            postgres_url,
            amqp_url,
            no_pin,
        } => {
            let opts = scenarios::Opts {
                mode,
                scenarios: which.iter().map(|s| s.to_lowercase()).collect(),
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
