//! The `tally` binary: run the service, benchmark the engine, check a database.

mod bench;
mod crash_worker;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use tally_engine::{Engine, EngineConfig, SystemClock};
use tally_store::{Projector, SqliteStore};

#[derive(Parser)]
#[command(name = "tally", version, about = "Tally: a real-time prepaid wallet and usage-billing ledger")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the service on the embedded SQLite database (created on first start).
    Serve(ServeArgs),
    /// Benchmark the engine on a fresh temporary database.
    Bench(bench::BenchArgs),
    /// Check a database offline: invariants, every operation's legs, every wallet's history.
    Check {
        /// The SQLite database file.
        database: PathBuf,
    },
    /// A load-generating worker for the crash test (not for operators).
    #[command(hide = true)]
    CrashWorker(crash_worker::CrashWorkerArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory holding the database file (tally.db); created if missing.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Requests waiting for the writer before new ones are refused as busy.
    #[arg(long, env = "TALLY_QUEUE_CAPACITY", default_value_t = 65_536)]
    queue_capacity: usize,
    /// Most requests committed together in one batch.
    #[arg(long, env = "TALLY_BATCH_SIZE_MAX", default_value_t = 8_192)]
    batch_size_max: usize,
    /// How long idempotency keys are remembered, in hours (at least 24).
    #[arg(long, env = "TALLY_IDEMPOTENCY_RETENTION_HOURS", default_value_t = 24)]
    idempotency_retention_hours: i64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Commands::Serve(args) => serve(args),
        Commands::Bench(args) => bench::run(args),
        Commands::Check { database } => check(database),
        Commands::CrashWorker(args) => crash_worker::run(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let path = args.data_dir.join("tally.db");
    let store = SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let projector = Arc::new(Projector::spawn(&path)?);
    let config = EngineConfig {
        queue_capacity: args.queue_capacity,
        batch_size_max: args.batch_size_max,
        settings: tally_ledger::Settings { idempotency_retention_ms: args.idempotency_retention_hours * 3_600_000 },
        ..EngineConfig::default()
    };
    let notify = projector.clone();
    let engine = Engine::start(store, Arc::new(SystemClock), config, Some(Box::new(move |_| notify.notify())))
        .context("starting the engine (the database failed its checks?)")?;
    tracing::info!(database = %path.display(), "tally is ready; press Ctrl-C to stop");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(shutdown_signal());
    tracing::info!("shutting down: draining the queue");
    engine.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn check(database: PathBuf) -> anyhow::Result<()> {
    if !database.exists() {
        bail!("{} does not exist", database.display());
    }
    let mut store = SqliteStore::open(&database)?;
    let total = store.last_seq()?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} journal batches {eta}")?);
    let report = tally_store::deep_check(&mut store, |done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    println!(
        "checked {} batches, {} commands, {} operations, {} wallets",
        report.batches, report.commands, report.operations, report.wallets
    );
    if report.problems.is_empty() {
        println!("ok: every invariant holds");
        Ok(())
    } else {
        for problem in &report.problems {
            println!("problem: {problem}");
        }
        bail!("{} problem(s) found", report.problems.len())
    }
}
