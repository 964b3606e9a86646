//! `confab-bench`: runs the scenarios (orchestrator) or one generator process (`worker`).

mod client;
mod harness;
mod scenarios;
mod wire;
mod worker;

use std::path::PathBuf;

use anyhow::Result;
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
