//! The `tally` binary: run the service, benchmark the engine, check a database.

mod bench;
mod client;
mod cluster;
mod crash_worker;
mod load;
mod memory;

#[global_allocator]
static ALLOCATOR: memory::HugePageHinting = memory::HugePageHinting;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use tally_engine::{Engine, EngineConfig, SystemClock};
use tally_store::{ApiKeys, HistoryReader, Projector, SqliteStore};

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
    /// Offer HTTP requests at a fixed rate (open loop) and report latency from each
    /// request's due time.
    Load(load::LoadArgs),
    /// Check a database offline: invariants, every operation's legs, every wallet's history.
    Check {
        /// The SQLite database file.
        database: PathBuf,
    },
    /// Platform administration on a database, offline or beside a running server.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Call a running server's API (key in TALLY_API_KEY, URL in TALLY_URL).
    Api {
        #[command(flatten)]
        args: client::ClientArgs,
        #[command(subcommand)]
        command: client::ClientCommand,
    },
    /// Tools for webhook receivers.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// A load-generating worker for the crash test (not for operators).
    #[command(hide = true)]
    CrashWorker(crash_worker::CrashWorkerArgs),
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Check a delivery's Tally-Signature header against its body and your secret.
    Verify {
        /// The endpoint's signing secret (whsec_...).
        #[arg(long, env = "TALLY_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// The Tally-Signature header's value.
        #[arg(long)]
        header: String,
        /// A file with the request body exactly as received.
        #[arg(long)]
        body: PathBuf,
        /// How old the signature may be, in seconds.
        #[arg(long, default_value_t = tally_server::webhooks::SIGNATURE_TOLERANCE_S)]
        tolerance_seconds: i64,
    },
    /// A receiver for trying webhooks out: answers 200 to signed deliveries (400 to
    /// ones whose signature does not verify) and prints each event.
    Listen {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// The endpoint's signing secret; without it, signatures are not checked.
        #[arg(long, env = "TALLY_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Print nothing per event (for load tests).
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an API key and print its secret once.
    CreateKey {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The organization the key acts for (org_1); without it, a platform admin key.
        #[arg(long)]
        organization: Option<String>,
        /// A name to tell the key apart in listings.
        #[arg(long, default_value = "")]
        name: String,
        /// Read-only: the key cannot move money or change anything.
        #[arg(long)]
        read_only: bool,
    },
    /// With the server stopped: throw the history database away and project it again
    /// from the journal (the journal is the truth; history is derived from it). Prints
    /// how long the projection took.
    RebuildHistory {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Rebuild a history whose events began partway through the journal (made by a
        /// build from before events existed): its events get new ids, so webhook
        /// deliveries, the NATS sink and clients' event cursors no longer match.
        #[arg(long)]
        renumber_events: bool,
    },
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// Directory holding the database file (tally.db); created if missing.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The database: `sqlite:PATH` (overrides --data-dir) or `postgres://user@host/db`
    /// (the ledger in PostgreSQL, shared by every node; --data-dir then holds this node's
    /// local files).
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: Option<String>,
    /// On PostgreSQL, the schema Tally's tables live in (created if missing); one
    /// database can hold several independent ledgers this way.
    #[arg(long, env = "TALLY_DATABASE_SCHEMA")]
    database_schema: Option<String>,
}

impl DatabaseArgs {
    /// The PostgreSQL URL, when the database is PostgreSQL.
    fn postgres_url(&self) -> Option<&str> {
        self.database_url.as_deref().filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    }

    /// The node's own directory: the database on SQLite; on PostgreSQL, the node's local
    /// files (its copy of the journal for history, webhook deliveries, sandbox records).
    fn local_path(&self) -> anyhow::Result<PathBuf> {
        if self.postgres_url().is_some() {
            std::fs::create_dir_all(&self.data_dir).with_context(|| format!("creating {}", self.data_dir.display()))?;
            return Ok(self.data_dir.join("tally.db"));
        }
        self.path()
    }

    fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.database_url {
            Some(url) => match url.strip_prefix("sqlite:") {
                Some(path) => Ok(PathBuf::from(path.trim_start_matches("//"))),
                None => bail!("unsupported database URL {url:?}: use sqlite:PATH or postgres://..."),
            },
            None => {
                std::fs::create_dir_all(&self.data_dir)
                    .with_context(|| format!("creating {}", self.data_dir.display()))?;
                Ok(self.data_dir.join("tally.db"))
            }
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Address to listen on for HTTP.
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Requests waiting for the writer before new ones are refused as busy.
    #[arg(long, env = "TALLY_QUEUE_CAPACITY", default_value_t = 65_536)]
    queue_capacity: usize,
    /// Most requests committed together in one batch.
    #[arg(long, env = "TALLY_BATCH_SIZE_MAX", default_value_t = 8_192)]
    batch_size_max: usize,
    /// How long idempotency keys are remembered, in hours (at least 24).
    #[arg(long, env = "TALLY_IDEMPOTENCY_RETENTION_HOURS", default_value_t = 24)]
    idempotency_retention_hours: i64,
    /// How long usage event ids are remembered (duplicates refused), in hours (at least 168).
    #[arg(long, env = "TALLY_USAGE_RETENTION_HOURS", default_value_t = 168)]
    usage_retention_hours: i64,
    /// How old a usage event may be when it arrives, in hours (at most the retention).
    #[arg(long, env = "TALLY_USAGE_WINDOW_HOURS", default_value_t = 24)]
    usage_window_hours: i64,
    /// The platform's default fee on usage charges and recurring fees, in parts per
    /// million (20000 = 2%); a plan may set its own.
    #[arg(long, env = "TALLY_PLATFORM_FEE_PPM", default_value_t = 0)]
    platform_fee_ppm: u32,
    /// Allow webhook endpoints on private, loopback and link-local addresses (refused
    /// by default, so a key holder cannot make Tally call into its own network).
    #[arg(long, env = "TALLY_WEBHOOKS_ALLOW_PRIVATE")]
    webhooks_allow_private: bool,
    /// How long a webhook delivery is retried before it fails, in hours.
    #[arg(long, env = "TALLY_WEBHOOKS_RETRY_HOURS", default_value_t = 72)]
    webhooks_retry_hours: i64,
    /// Time limit of one webhook delivery attempt, in seconds.
    #[arg(long, env = "TALLY_WEBHOOKS_TIMEOUT_SECONDS", default_value_t = 10)]
    webhooks_timeout_seconds: u64,
    /// How long the sandbox payment provider keeps a `pm_card_slow` payment pending, in
    /// milliseconds.
    #[arg(long, env = "TALLY_SANDBOX_SLOW_MS", default_value_t = 3_000)]
    sandbox_slow_ms: u64,
    /// The payment provider: `sandbox` (built in, test tokens) or `stripe`.
    #[arg(long, env = "TALLY_PAYMENT_PROVIDER", default_value = "sandbox")]
    payment_provider: String,
    /// Stripe's secret API key (with --payment-provider stripe).
    #[arg(long, env = "TALLY_STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// Stripe's API base URL (a test double's, in tests).
    #[arg(long, env = "TALLY_STRIPE_API_BASE", default_value = tally_server::payments::stripe::API_BASE)]
    stripe_api_base: String,
    /// The secret that signs Stripe's webhooks to /v1/provider-webhooks/stripe.
    #[arg(long, env = "TALLY_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    stripe_webhook_secret: Option<String>,
    /// Fault injection for crash tests: `abort_after_capture` kills the process right
    /// after the provider captured a payment, before the ledger credits it;
    /// `abort_before_rail` right after a payout's money went in transit, before the
    /// payout rail is asked.
    #[arg(long, env = "TALLY_FAULT", hide = true)]
    fault: Option<String>,
    /// On PostgreSQL: how long the writer's lease lasts without renewal, in ms. A standby
    /// takes over this long after the leader stops renewing.
    #[arg(long, env = "TALLY_LEASE_MS", default_value_t = 3_000)]
    lease_ms: u64,
    /// On PostgreSQL: how often the leader renews its lease, in ms (well under the lease).
    #[arg(long, env = "TALLY_LEASE_RENEW_MS", default_value_t = 1_000)]
    lease_renew_ms: u64,
    /// On PostgreSQL: how often a standby tries to take the lease, in ms.
    #[arg(long, env = "TALLY_TAKEOVER_POLL_MS", default_value_t = 500)]
    takeover_poll_ms: u64,
    /// On PostgreSQL: the address other nodes and clients reach this node at, given to
    /// clients that ask a standby where the leader is (default http://<listen>).
    #[arg(long, env = "TALLY_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Requests per second each API key may make (a token bucket; 0 turns it off).
    /// Beyond it, requests get 429 `rate_limited`.
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_KEY", default_value_t = tally_server::RATE_LIMIT_DEFAULT)]
    rate_limit_per_key: u32,
    /// Publish every event to this NATS server's JetStream (nats://host:port); off when unset.
    #[arg(long, env = "TALLY_NATS_URL")]
    nats_url: Option<String>,
    /// The JetStream stream events go to (created if missing).
    #[arg(long, env = "TALLY_NATS_STREAM", default_value = "TALLY_EVENTS")]
    nats_stream: String,
    /// Events are published on `<prefix>.<event type>`.
    #[arg(long, env = "TALLY_NATS_SUBJECT_PREFIX", default_value = "tally.events")]
    nats_subject_prefix: String,
}

fn main() -> anyhow::Result<()> {
    // Logs go to stderr; TALLY_LOG sets the filter, TALLY_LOG_FORMAT=json makes one JSON
    // object per line (with the request span, so every line of a request has its id).
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("TALLY_LOG_FORMAT").is_ok_and(|format| format == "json") {
        logs.json().with_current_span(true).init();
    } else {
        logs.init();
    }
    match Cli::parse().command {
        Commands::Serve(args) => serve(args),
        Commands::Bench(args) => bench::run(args),
        Commands::Load(args) => load::run(args),
        Commands::Check { database } => check(database),
        Commands::Webhooks(WebhooksCommand::Listen { listen, secret, quiet }) => {
            webhook_listener(listen, secret, quiet)
        }
        Commands::Webhooks(WebhooksCommand::Verify { secret, header, body, tolerance_seconds }) => {
            let body = std::fs::read(&body).with_context(|| format!("reading {}", body.display()))?;
            let now = tally_engine::Clock::now(&SystemClock) / 1000;
            match tally_server::webhooks::verify(&secret, &header, &body, now, tolerance_seconds) {
                Ok(()) => {
                    println!("valid: the signature matches and is {}s old", now - signature_time(&header));
                    Ok(())
                }
                Err(error) => anyhow::bail!("invalid: {error}"),
            }
        }
        Commands::CrashWorker(args) => crash_worker::run(args),
        Commands::Api { args, command } => client::run(args, command),
        Commands::Admin(AdminCommand::CreateKey { database, organization, name, read_only }) => {
            create_key(database, organization, name, read_only)
        }
        Commands::Admin(AdminCommand::RebuildHistory { database, renumber_events }) => {
            rebuild_history(database, renumber_events)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.database.postgres_url().is_some() {
        return cluster::serve(args);
    }
    let path = args.database.path()?;
    let _lock = lock_files(&path)?;
    let store = SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let projector = Arc::new(Projector::spawn(&path)?);
    let notify = projector.clone();
    let clock = Arc::new(SystemClock);
    let engine = Engine::start(store, clock.clone(), engine_config(&args), Some(Box::new(move |_| notify.notify())))
        .context("starting the engine (the database failed its checks?)")?;
    crate::memory::serving();
    let keys = tally_server::KeyRing::new(ApiKeys::open(&path)?)?;
    bootstrap_key(&keys, &*clock)?;
    let state = app_state(&args, &path, engine.handle(), projector.clone(), keys, clock)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        tracing::info!(address = %listener.local_addr()?, database = %path.display(), "tally is serving");
        tally_server::serve(listener, state, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    tracing::info!("shutting down: draining the engine queue");
    engine.shutdown();
    projector.stop();
    Ok(())
}

fn engine_config(args: &ServeArgs) -> EngineConfig {
    EngineConfig {
        queue_capacity: args.queue_capacity,
        batch_size_max: args.batch_size_max,
        settings: tally_ledger::Settings {
            idempotency_retention_ms: args.idempotency_retention_hours.saturating_mul(3_600_000),
            usage_retention_ms: args.usage_retention_hours.saturating_mul(3_600_000),
            usage_window_ms: args.usage_window_hours.saturating_mul(3_600_000),
            platform_fee: tally_ledger::PartsPerMillion(args.platform_fee_ppm),
        },
        ..EngineConfig::default()
    }
}

/// On first start (no keys at all), makes a platform admin key and prints it once.
fn bootstrap_key(keys: &tally_server::KeyRing, clock: &dyn tally_engine::Clock) -> anyhow::Result<()> {
    if keys.is_empty() {
        let key = keys.insert(tally_server::generate_key(None, true, "bootstrap", clock.now(), None))?;
        println!("Platform admin API key (shown once, keep it safe): {}", key.secret);
    }
    Ok(())
}

/// The HTTP service's state: the engine, history at `path`, keys, webhooks, payments
/// and payouts as the settings say.
fn app_state(
    args: &ServeArgs,
    path: &std::path::Path,
    handle: tally_engine::Handle,
    projector: Arc<Projector>,
    keys: tally_server::KeyRing,
    clock: Arc<SystemClock>,
) -> anyhow::Result<Arc<tally_server::AppState>> {
    let webhooks = tally_server::webhooks::Webhooks::new(
        tally_store::webhooks::WebhookStore::open(path)?,
        tally_server::webhooks::WebhookConfig {
            allow_private: args.webhooks_allow_private,
            retry_window_ms: args.webhooks_retry_hours.saturating_mul(3_600_000),
            timeout: std::time::Duration::from_secs(args.webhooks_timeout_seconds.clamp(1, 60)),
            ..tally_server::webhooks::WebhookConfig::default()
        },
    );
    let provider: Arc<dyn tally_server::payments::provider::PaymentProvider> = match args.payment_provider.as_str() {
        "sandbox" => Arc::new(
            tally_server::payments::sandbox::Sandbox::open(
                &path.with_file_name("tally.sandbox.db"),
                std::time::Duration::from_millis(args.sandbox_slow_ms),
            )
            .context("opening the sandbox payment provider's records")?,
        ),
        "stripe" => {
            let Some(key) = args.stripe_secret_key.clone() else {
                bail!("--payment-provider stripe needs --stripe-secret-key (or TALLY_STRIPE_SECRET_KEY)");
            };
            Arc::new(tally_server::payments::stripe::Stripe::new(args.stripe_api_base.clone(), key))
        }
        other => bail!("unknown payment provider {other:?}: use sandbox or stripe"),
    };
    let payments_config = tally_server::payments::PaymentsConfig {
        abort_after_capture: args.fault.as_deref() == Some("abort_after_capture"),
        webhook_secret: args.stripe_webhook_secret.clone(),
        ..tally_server::payments::PaymentsConfig::default()
    };
    let state = Arc::new(
        tally_server::AppState::new(handle, projector, HistoryReader::open(path)?, keys, clock)
            .with_rate_limit(args.rate_limit_per_key)
            .with_webhooks(webhooks)
            .with_payments(provider, payments_config)
            .with_payouts(tally_server::payouts::PayoutService::new(
                Arc::new(
                    tally_server::payouts::SandboxRail::open(
                        &path.with_file_name("tally.sandbox.db"),
                        std::time::Duration::from_millis(args.sandbox_slow_ms),
                    )
                    .context("opening the sandbox payout rail's records")?,
                ),
                args.fault.as_deref() == Some("abort_before_rail"),
                true,
                std::time::Duration::from_millis(250),
            )),
    );
    let state = match args.nats_url.clone() {
        Some(url) => {
            let config = tally_server::nats::NatsConfig {
                url,
                stream: args.nats_stream.clone(),
                subject_prefix: args.nats_subject_prefix.clone(),
            };
            Arc::new(Arc::into_inner(state).expect("not shared yet").with_nats(config))
        }
        None => state,
    };
    Ok(state)
}

fn create_key(
    database: DatabaseArgs,
    organization: Option<String>,
    name: String,
    read_only: bool,
) -> anyhow::Result<()> {
    let path = database.path()?;
    let store = SqliteStore::open(&path)?;
    let organization = match organization {
        Some(text) => Some(
            tally_ledger::OrganizationId::parse(&text)
                .with_context(|| format!("{text:?} is not an organization id (org_1)"))?,
        ),
        None => None,
    };
    if let Some(id) = organization {
        let mut store = store;
        let loaded = tally_store::Store::load(&mut store)?;
        if loaded.state.organization(id).is_none() {
            bail!("no organization {id}");
        }
    }
    let keys = tally_server::KeyRing::new(ApiKeys::open(&path)?)?;
    let now = tally_engine::Clock::now(&SystemClock);
    let key = keys.insert(tally_server::generate_key(organization, !read_only, &name, now, None))?;
    println!("{}", key.secret);
    Ok(())
}

/// Takes the lock that says a Tally process is using the database files beside `path`
/// (held until the returned file is dropped, or the process ends). Two servers on one
/// journal would both append to it, and a history rebuild under a running server would
/// delete the file it writes to.
pub(crate) fn lock_files(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    if let Some(directory) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(directory).with_context(|| format!("creating {}", directory.display()))?;
    }
    let lock = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("opening {}", lock.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another Tally process is using {} (it holds {})", path.display(), lock.display())
        }
        Err(std::fs::TryLockError::Error(error)) => Err(error).with_context(|| format!("locking {}", lock.display())),
    }
}

/// How long a history rebuild may go without projecting anything before it gives up.
const REBUILD_STALL_MAX: std::time::Duration = std::time::Duration::from_secs(60);

fn rebuild_history(database: DatabaseArgs, renumber_events: bool) -> anyhow::Result<()> {
    let path = database.local_path()?;
    if !path.exists() {
        bail!("no database at {}", path.display());
    }
    let _lock = lock_files(&path)?;
    let last = SqliteStore::open(&path)?.last_seq()?;
    let history = tally_store::history_path(&path);
    if !renumber_events && tally_store::rebuild_renumbers_events(&path)? {
        bail!(
            "{}'s events began partway through the journal (an older build made it): a rebuild gives them new ids, \
             which webhook deliveries and event cursors would no longer match; pass --renumber-events to rebuild anyway",
            history.display()
        );
    }
    tally_store::remove_history(&path).with_context(|| format!("removing {}", history.display()))?;
    let started = std::time::Instant::now();
    let projector = Projector::spawn(&path)?;
    projector.notify();
    let (mut seen, mut progressed) = (projector.watermark(), std::time::Instant::now());
    while projector.watermark() < last {
        std::thread::sleep(std::time::Duration::from_millis(10));
        if projector.watermark() > seen {
            (seen, progressed) = (projector.watermark(), std::time::Instant::now());
        } else if progressed.elapsed() > REBUILD_STALL_MAX {
            bail!("history stopped at journal record {seen} of {last} (see the log); a start of the server goes on from there");
        }
    }
    let took = started.elapsed();
    drop(projector);
    println!("projected {last} journal records into {} in {:.2} s", history.display(), took.as_secs_f64());
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

/// The `t=` part of a signature header, for the verify report.
fn signature_time(header: &str) -> i64 {
    header.split(',').find_map(|part| part.trim().strip_prefix("t=")?.parse().ok()).unwrap_or(0)
}

/// `tally webhooks listen`: a small receiver that checks signatures and prints events.
fn webhook_listener(listen: String, secret: Option<String>, quiet: bool) -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    let secret = Arc::new(secret);
    let receive = move |headers: HeaderMap, body: axum::body::Bytes| {
        let secret = secret.clone();
        async move {
            let header = headers.get("tally-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if let Some(secret) = secret.as_deref() {
                let now = tally_engine::Clock::now(&SystemClock) / 1000;
                let tolerance = tally_server::webhooks::SIGNATURE_TOLERANCE_S;
                if let Err(error) = tally_server::webhooks::verify(secret, header, &body, now, tolerance) {
                    eprintln!("refused a delivery: {error}");
                    return StatusCode::BAD_REQUEST;
                }
            }
            if !quiet {
                println!("{}", String::from_utf8_lossy(&body));
            }
            StatusCode::OK
        }
    };
    let app = axum::Router::new().fallback(axum::routing::post(receive));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listening on {listen}"))?;
        eprintln!("receiving webhooks on http://{}", listener.local_addr()?);
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        anyhow::Ok(())
    })
}
