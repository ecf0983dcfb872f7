//! `tally bench`: drives the engine with generated load on a fresh temporary database
//! and reports throughput, submit-to-durable latency, batch sizes and memory.

use anyhow::{ensure, Context};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_engine::{Answer, Engine, EngineConfig, Handle, Request, SystemClock};
use tally_ledger::*;
use tally_store::{Projector, SqliteStore};

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// Debit a consumer (grants first) and credit a merchant less a platform fee.
    Charge,
    /// Place a hold, then capture it to a merchant.
    HoldCapture,
    /// Credit a consumer from external funding.
    TopUp,
    /// A usage event per request, rated against the consumer's subscription (per-unit
    /// token price) and charged to the merchant less the platform fee: the real rating path.
    Usage,
    /// Charge, hold-capture, top-up and usage, one after the other.
    All,
    /// Charges without a final snapshot, then the time to load the state again.
    Restart,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Storage {
    /// Through the engine, durable in SQLite.
    On,
    /// The state machine alone on one thread.
    Off,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "all")]
    workload: Workload,
    #[arg(long, value_enum, default_value = "on")]
    storage: Storage,
    /// Consumer wallets (each funded, every fourth with a promotional grant).
    #[arg(long, default_value_t = 100_000)]
    consumers: u64,
    /// Merchant wallets; the first receives half of all charges.
    #[arg(long, default_value_t = 1_000)]
    merchants: u64,
    /// Operations per workload.
    #[arg(long, default_value_t = 1_000_000)]
    operations: u64,
    /// Most requests the engine commits in one batch.
    #[arg(long, default_value_t = 8_192)]
    batch_size_max: usize,
    /// Offered load in operations per second (open loop); 0 runs as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Most operations in flight at once when running as fast as possible.
    #[arg(long, default_value_t = 32_768)]
    in_flight_max: u64,
    /// Run the history projector beside the engine, as `tally serve` does.
    #[arg(long, default_value_t = false)]
    history: bool,
    /// Journal to PostgreSQL instead of SQLite (`postgres://user@host/db`); the bench
    /// works in its own schema, `tally_bench`, dropped first.
    #[arg(long)]
    postgres_url: Option<String>,
    /// Print one JSON object per workload instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    workload: String,
    storage: String,
    operations: u64,
    errors: u64,
    ops_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_p999_ms: f64,
    batch_mean: f64,
    batch_size_max: usize,
    offered_rate: u64,
    peak_rss_bytes: u64,
    wallets: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_bytes_per_wallet: Option<f64>,
    /// Open loop: the 99th percentile of how late the load generator submitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    generator_late_p99_ms: Option<f64>,
    /// Open loop: the p99 latency of the operations due in each 5 s window, so a stall
    /// shows where it happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_p99_ms_by_window: Option<Vec<f64>>,
    /// The same after funding: every consumer's funding key, every fourth one's grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    state_bytes_per_wallet_funded: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_replayed_commands: Option<u64>,
}

impl Report {
    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("report encodes"));
            return;
        }
        println!(
            "{:<13} storage={:<3} ops={:<9} errors={:<5} {:>12.0} ops/s  p50={:.3}ms p99={:.3}ms p999={:.3}ms  batch_mean={:.1}  peak_rss={}MiB",
            self.workload,
            self.storage,
            self.operations,
            self.errors,
            self.ops_per_s,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_p999_ms,
            self.batch_mean,
            self.peak_rss_bytes >> 20
        );
        if let (Some(bytes), Some(funded)) = (self.state_bytes_per_wallet, self.state_bytes_per_wallet_funded) {
            println!(
                "  state memory: {bytes:.0} bytes per wallet, {funded:.0} with funding keys and grants ({} wallets)",
                self.wallets
            );
        }
        if let Some(late) = self.generator_late_p99_ms {
            println!("  load generator: p99 {late:.3}ms late submitting (counted in the latencies above)");
        }
        if let Some(windows) = &self.latency_p99_ms_by_window {
            let windows: Vec<String> = windows.iter().map(|p99| format!("{p99:.1}")).collect();
            println!("  p99 (ms) by {}s window: {}", WINDOW.as_secs(), windows.join(" "));
        }
        if let Some(seconds) = self.restart_s {
            println!(
                "  restart: ready in {seconds:.2}s ({} wallets, replayed {} commands after the last snapshot)",
                self.wallets,
                self.restart_replayed_commands.unwrap_or(0)
            );
        }
    }
}

fn rss_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// How many commands ahead the writer prefetches, as the engine does.
const PREFETCH_DISTANCE: usize = tally_engine::PREFETCH_DISTANCE;

/// Keys the engine makes room for at start, as `tally serve` does.
const IDEMPOTENCY_KEYS_RESERVED: usize = tally_engine::IDEMPOTENCY_KEYS_RESERVED;

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new("bench", text).expect("bench keys are short")
}

fn usd() -> Currency {
    Currency::parse("USD").expect("USD is registered")
}

/// The fixed world every workload runs in: wallets 1..=consumers are consumers,
/// the next `merchants` are merchants; wallet ids equal their organization ids.
struct World {
    consumers: u64,
    merchants: u64,
}

impl World {
    fn consumer(&self, rng: &mut SmallRng) -> WalletId {
        WalletId(rng.gen_range(1..=self.consumers))
    }

    /// Half of all charges go to the first (hot) merchant.
    fn merchant(&self, rng: &mut SmallRng) -> WalletId {
        if rng.gen_bool(0.5) || self.merchants == 1 {
            WalletId(self.consumers + 1)
        } else {
            WalletId(self.consumers + rng.gen_range(2..=self.merchants))
        }
    }

    /// Every organization and its USD wallet.
    fn wallet_commands(&self) -> impl Iterator<Item = Command> + '_ {
        let usd = usd();
        (1..=self.consumers + self.merchants).flat_map(move |id| {
            [
                Command::CreateOrganization { name: format!("org {id}"), roles: Roles::default() },
                Command::CreateWallet {
                    organization: OrganizationId(id),
                    currency: usd,
                    low_balance_threshold: None,
                    additional: false,
                },
            ]
        })
    }

    /// 1,000.00 for every consumer, and a 1.00 promotional grant for every fourth.
    fn funding_commands(&self) -> impl Iterator<Item = Command> + '_ {
        let usd = usd();
        (1..=self.consumers).flat_map(move |id| {
            let mut commands = vec![Command::Move {
                key: key(&format!("fund-{id}")),
                action: MoneyAction::Credit {
                    wallet: WalletId(id),
                    amount: Money::new(Amount::from_major(1_000), usd),
                    kind: CreditKind::TopUp,
                    source: AdjustmentSource::ExternalFunding,
                    grant: None,
                    reason: String::new(),
                },
            }];
            if id % 4 == 0 {
                commands.push(Command::Move {
                    key: key(&format!("promo-{id}")),
                    action: MoneyAction::Credit {
                        wallet: WalletId(id),
                        amount: Money::new(Amount::from_major(1), usd),
                        kind: CreditKind::Adjustment,
                        source: AdjustmentSource::Promotions,
                        grant: Some(GrantSpec {
                            category: GrantCategory::Promotional,
                            priority: 10,
                            expires_at: Some(4_102_444_800_000),
                            applicability: None,
                        }),
                        reason: String::new(),
                    },
                });
            }
            commands
        })
    }

    fn setup_commands(&self) -> impl Iterator<Item = Command> + '_ {
        self.wallet_commands().chain(self.funding_commands())
    }

    /// Merchants get the merchant role, a `tokens` meter (meter id = merchant index)
    /// and a plan at 0.00002 per token with a 2.5% fee (plan id = merchant index);
    /// every consumer subscribes to the hot merchant and to one other.
    fn usage_setup_commands(&self) -> impl Iterator<Item = Command> + '_ {
        let merchants = (1..=self.merchants).flat_map(move |index| {
            let organization = OrganizationId(self.consumers + index);
            [
                Command::UpdateOrganization {
                    organization,
                    roles: Roles { merchant: true, consumer: false },
                    billing: None,
                },
                Command::CreateMeter {
                    merchant: organization,
                    code: "tokens".into(),
                    unit: "token".into(),
                    aggregation: billing::Aggregation::Sum,
                    product: None,
                },
                Command::CreatePlan {
                    spec: billing::PlanSpec {
                        merchant: organization,
                        name: "tokens".into(),
                        currency: usd(),
                        period: billing::BillingPeriod::Month,
                        recurring_fee: None,
                        prices: vec![billing::Price {
                            meter: MeterId(index),
                            model: billing::PriceModel::PerUnit { unit_price: Amount::from_units(20_000_000) },
                        }],
                        platform_fee: Some(PartsPerMillion(25_000)),
                        replaces: None,
                    },
                },
            ]
        });
        let subscriptions = (1..=self.consumers).flat_map(move |consumer| {
            let mut commands = vec![Command::Subscribe { consumer: OrganizationId(consumer), plan: PlanId(1) }];
            if self.merchants > 1 {
                commands.push(Command::Subscribe {
                    consumer: OrganizationId(consumer),
                    plan: PlanId(self.other_merchant(consumer)),
                });
            }
            commands
        });
        merchants.chain(subscriptions)
    }

    /// The merchant index (2..=merchants) a consumer subscribes to besides the hot one.
    fn other_merchant(&self, consumer: u64) -> u64 {
        2 + consumer % (self.merchants - 1)
    }

    /// One usage event of 1 to 5,000 tokens; half go to the hot merchant.
    fn usage(&self, rng: &mut SmallRng, index: u64, at: Timestamp) -> Command {
        let consumer = self.consumer(rng).0;
        let merchant = if self.merchants == 1 || rng.gen_bool(0.5) { 1 } else { self.other_merchant(consumer) };
        let organization = OrganizationId(self.consumers + merchant);
        Command::Usage {
            merchant: organization,
            events: vec![UsageEvent {
                key: IdempotencyKey::new(&organization.to_string(), &index.to_string()).expect("short key"),
                consumer: OrganizationId(consumer),
                meter: "tokens".into(),
                quantity: billing::Quantity(i128::from(rng.gen_range(1..=5_000u32)) * 1_000_000_000_000),
                at,
                properties: Vec::new(),
                reservation: None,
                finish: false,
            }],
        }
    }

    fn charge(&self, rng: &mut SmallRng, key: IdempotencyKey) -> Command {
        Command::Move {
            key,
            action: MoneyAction::Transfer {
                from: self.consumer(rng),
                to: self.merchant(rng),
                amount: Money::new(Amount::from_units(rng.gen_range(1..=100) * 1_000_000_000), usd()),
                fee: Fee::Rate(PartsPerMillion(25_000)),
                kind: TransferKind::Charge,
                product: None,
                description: String::new(),
            },
        }
    }

    fn hold(&self, rng: &mut SmallRng, key: IdempotencyKey) -> (Command, WalletId) {
        let payee = self.merchant(rng);
        let command = Command::Move {
            key,
            action: MoneyAction::PlaceHold {
                wallet: self.consumer(rng),
                amount: Money::new(Amount::from_units(rng.gen_range(1..=100) * 1_000_000_000), usd()),
                ttl_ms: 60_000,
                exclusive: false,
                payee: Some(payee),
                product: None,
                description: String::new(),
            },
        };
        (command, payee)
    }

    fn capture(hold: HoldId, payee: WalletId, key: IdempotencyKey) -> Command {
        Command::Move {
            key,
            action: MoneyAction::CaptureHold { hold, amount: None, to: payee, fee: Fee::Rate(PartsPerMillion(25_000)) },
        }
    }

    fn top_up(&self, rng: &mut SmallRng, key: IdempotencyKey) -> Command {
        Command::Move {
            key,
            action: MoneyAction::Credit {
                wallet: self.consumer(rng),
                amount: Money::new(Amount::from_major(10), usd()),
                kind: CreditKind::TopUp,
                source: AdjustmentSource::ExternalFunding,
                grant: None,
                reason: String::new(),
            },
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(args.consumers >= 1 && args.merchants >= 1, "need at least one consumer and one merchant");
    ensure!(args.batch_size_max >= 1, "--batch-size-max must be at least 1");
    let world = World { consumers: args.consumers, merchants: args.merchants };
    let workloads: Vec<Workload> = match args.workload {
        Workload::All => vec![Workload::Charge, Workload::HoldCapture, Workload::TopUp, Workload::Usage],
        other => vec![other],
    };
    match args.storage {
        Storage::Off => run_state_machine(&args, &world, &workloads),
        Storage::On => run_engine(&args, &world, &workloads),
    }
}

fn progress(args: &BenchArgs, length: u64, message: &str) -> indicatif::ProgressBar {
    if args.json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(length);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>14} {bar:40} {pos}/{len} {per_sec} {eta}")
            .expect("template is valid"),
    );
    bar.set_message(message.to_string());
    bar
}

fn run_state_machine(args: &BenchArgs, world: &World, workloads: &[Workload]) -> anyhow::Result<()> {
    let rss_before = rss_bytes("VmRSS:");
    let mut state = State::new(Settings::default());
    let mut now: Timestamp = 1_700_000_000_000;
    let setup = progress(args, world.consumers + world.merchants, "setup");
    for command in world.wallet_commands() {
        state.apply(&command, now).map_err(|r| anyhow::anyhow!("setup rejected: {}", r.code()))?;
        if let Command::CreateWallet { organization, .. } = command {
            setup.set_position(organization.0);
        }
    }
    let wallets = world.consumers + world.merchants;
    // The state of the wallets themselves (wallets, organizations, their index),
    // measured before any money or key exists.
    let per_wallet = rss_bytes("VmRSS:").saturating_sub(rss_before) as f64 / wallets as f64;
    for command in world.funding_commands() {
        state.apply(&command, now).map_err(|r| anyhow::anyhow!("setup rejected: {}", r.code()))?;
    }
    let per_wallet_funded = rss_bytes("VmRSS:").saturating_sub(rss_before) as f64 / wallets as f64;
    if workloads.contains(&Workload::Usage) {
        for command in world.usage_setup_commands() {
            state.apply(&command, now).map_err(|r| anyhow::anyhow!("usage setup rejected: {}", r.code()))?;
        }
    }
    setup.finish_and_clear();
    state.reserve_idempotency_keys(IDEMPOTENCY_KEYS_RESERVED);
    crate::memory::serving();
    let mut rng = SmallRng::seed_from_u64(7);
    for workload in workloads {
        ensure!(*workload != Workload::Restart, "the restart workload needs --storage on");
        // Commands are generated ahead in chunks so only the state machine is timed.
        const CHUNK: u64 = 100_000;
        let bar = progress(args, args.operations, &format!("{workload:?}"));
        let mut elapsed = Duration::ZERO;
        let mut errors = 0;
        let mut done = 0;
        let prefix = format!("{workload:?}");
        while done < args.operations {
            let count = CHUNK.min(args.operations - done);
            now += 1;
            match workload {
                Workload::HoldCapture => {
                    let holds: Vec<(Command, WalletId)> =
                        (0..count).map(|i| world.hold(&mut rng, key(&format!("{prefix}-h{}", done + i)))).collect();
                    let started = Instant::now();
                    let mut placed = Vec::with_capacity(holds.len());
                    for (index, (command, payee)) in holds.iter().enumerate() {
                        if let Some((ahead, _)) = holds.get(index + PREFETCH_DISTANCE) {
                            state.prefetch(ahead);
                        }
                        if let Some((ahead, _)) = holds.get(index + PREFETCH_DISTANCE / 2) {
                            state.prefetch_dependent(ahead);
                        }
                        match state.apply(command, now) {
                            Ok(Receipt::HoldPlaced { hold, .. }) => placed.push((hold, *payee)),
                            _ => errors += 1,
                        }
                    }
                    elapsed += started.elapsed();
                    let captures: Vec<Command> = placed
                        .iter()
                        .enumerate()
                        .map(|(i, (hold, payee))| {
                            World::capture(*hold, *payee, key(&format!("{prefix}-c{}", done + i as u64)))
                        })
                        .collect();
                    let started = Instant::now();
                    for command in &captures {
                        if state.apply(command, now).is_err() {
                            errors += 1;
                        }
                    }
                    elapsed += started.elapsed();
                }
                _ => {
                    let commands: Vec<Command> = (0..count)
                        .map(|i| {
                            let key = key(&format!("{prefix}-{}", done + i));
                            match workload {
                                Workload::TopUp => world.top_up(&mut rng, key),
                                Workload::Usage => world.usage(&mut rng, done + i, now),
                                _ => world.charge(&mut rng, key),
                            }
                        })
                        .collect();
                    let started = Instant::now();
                    for (index, command) in commands.iter().enumerate() {
                        if let Some(ahead) = commands.get(index + PREFETCH_DISTANCE) {
                            state.prefetch(ahead);
                        }
                        if let Some(ahead) = commands.get(index + PREFETCH_DISTANCE / 2) {
                            state.prefetch_dependent(ahead);
                        }
                        if !succeeded(state.apply(command, now)) {
                            errors += 1;
                        }
                    }
                    elapsed += started.elapsed();
                }
            }
            done += count;
            bar.set_position(done);
        }
        bar.finish_and_clear();
        let problems = state.check_invariants();
        ensure!(problems.is_empty(), "invariants broken after {workload:?}: {problems:?}");
        Report {
            workload: workload_name(*workload),
            storage: "off".into(),
            operations: args.operations,
            errors,
            ops_per_s: args.operations as f64 / elapsed.as_secs_f64(),
            latency_p50_ms: 0.0,
            latency_p99_ms: 0.0,
            latency_p999_ms: 0.0,
            batch_mean: 0.0,
            batch_size_max: 0,
            offered_rate: 0,
            peak_rss_bytes: rss_bytes("VmHWM:"),
            wallets,
            state_bytes_per_wallet: Some(per_wallet),
            state_bytes_per_wallet_funded: Some(per_wallet_funded),
            generator_late_p99_ms: None,
            latency_p99_ms_by_window: None,
            restart_s: None,
            restart_replayed_commands: None,
        }
        .print(args.json);
    }
    Ok(())
}

fn workload_name(workload: Workload) -> String {
    match workload {
        Workload::Charge => "charge",
        Workload::HoldCapture => "hold_capture",
        Workload::TopUp => "top_up",
        Workload::Usage => "usage",
        Workload::All => "all",
        Workload::Restart => "restart",
    }
    .to_string()
}

/// The span of each latency window in open-loop runs.
const WINDOW: Duration = Duration::from_secs(5);

/// Shared counters of one workload run.
struct Tally {
    done: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
    /// When the run began, and the latencies of the operations due in each window.
    windows: Mutex<(Instant, Vec<Histogram<u64>>)>,
}

impl Tally {
    fn finish(&self, started: Instant, ok: bool) {
        let micros = started.elapsed().as_micros() as u64;
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latencies.lock().expect("histogram lock").saturating_record(micros.max(1));
        {
            let mut windows = self.windows.lock().expect("window lock");
            let index = (started.saturating_duration_since(windows.0).as_secs() / WINDOW.as_secs()) as usize;
            let windows = &mut windows.1;
            while windows.len() <= index {
                windows.push(Histogram::new_with_bounds(1, 60_000_000, 2).expect("histogram bounds"));
            }
            windows[index].saturating_record(micros.max(1));
        }
        self.in_flight.fetch_sub(1, Ordering::Release);
        self.done.fetch_add(1, Ordering::Release);
    }
}

fn start_engine(
    path: &std::path::Path,
    args: &BenchArgs,
    snapshot_on_shutdown: bool,
) -> anyhow::Result<(Engine, Option<Arc<Projector>>)> {
    // The ledger's schema exists before the projector, which reads its journal, starts.
    let sqlite = if args.postgres_url.is_none() { Some(SqliteStore::open(path)?) } else { None };
    let projector = if args.history { Some(Arc::new(Projector::spawn(path)?)) } else { None };
    let notify = projector.clone();
    let config = EngineConfig {
        batch_size_max: args.batch_size_max,
        queue_capacity: (args.in_flight_max as usize * 2).max(65_536),
        snapshot_on_shutdown,
        ..EngineConfig::default()
    };
    let on_commit: Option<tally_engine::OnCommit> =
        notify.map(|p| Box::new(move |_| p.notify()) as tally_engine::OnCommit);
    let engine = match &args.postgres_url {
        Some(url) => {
            ensure!(!args.history, "--history projects from the SQLite journal; it does not run with --postgres-url");
            tally_store::PostgresStore::drop_schema(url, "tally_bench")?;
            let store = tally_store::PostgresStore::open_in_schema(url, Some("tally_bench"))?;
            Engine::start(store, Arc::new(SystemClock), config, on_commit)?
        }
        None => Engine::start(sqlite.expect("opened above"), Arc::new(SystemClock), config, on_commit)?,
    };
    Ok((engine, projector))
}

fn run_engine(args: &BenchArgs, world: &World, workloads: &[Workload]) -> anyhow::Result<()> {
    let directory = tempfile::Builder::new().prefix("tally-bench").tempdir()?;
    let path = directory.path().join("bench.db");
    let restart = workloads.contains(&Workload::Restart);
    let (engine, projector) = start_engine(&path, args, !restart)?;
    let handle = engine.handle();
    // Setup goes through the engine in large pipelined batches.
    let mut setup_commands: Vec<Command> = world.setup_commands().collect();
    if workloads.contains(&Workload::Usage) {
        setup_commands.extend(world.usage_setup_commands());
    }
    let bar = progress(args, setup_commands.len() as u64, "setup");
    let tally = new_tally();
    for command in setup_commands {
        wait_for_room(&tally, args.in_flight_max);
        submit(&handle, &tally, command, Instant::now())?;
        bar.inc(1);
    }
    wait_for_all(&tally);
    bar.finish_and_clear();
    ensure!(tally.errors.load(Ordering::Relaxed) == 0, "setup had errors");
    crate::memory::serving();
    let wallets = world.consumers + world.merchants;
    for workload in workloads {
        let report = drive(args, world, &handle, *workload, wallets)?;
        report.print(args.json);
        if let Some(projector) = &projector {
            // How far history lags when the load stops, and how long it takes to catch up.
            let durable = handle.stats().durable_seq.load(Ordering::Acquire);
            let started = Instant::now();
            let behind = durable.saturating_sub(projector.watermark());
            ensure!(projector.wait_for(durable, Duration::from_secs(600)), "history did not catch up");
            if !args.json {
                println!(
                    "  history: {behind} journal records behind when the load stopped; caught up in {:.2}s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let problems = handle.read(|state| state.check_invariants())?;
    ensure!(problems.is_empty(), "invariants broken: {problems:?}");
    drop(handle);
    engine.shutdown();
    drop(projector);
    if restart {
        ensure!(args.postgres_url.is_none(), "the restart workload measures the SQLite store");
        let started = Instant::now();
        let mut store = SqliteStore::open(&path)?;
        let loaded = tally_store::Store::load(&mut store)?;
        let seconds = started.elapsed().as_secs_f64();
        ensure!(loaded.state.wallets.len() as u64 == wallets, "restart lost wallets");
        Report {
            workload: "restart".into(),
            storage: "on".into(),
            operations: args.operations,
            errors: 0,
            ops_per_s: 0.0,
            latency_p50_ms: 0.0,
            latency_p99_ms: 0.0,
            latency_p999_ms: 0.0,
            batch_mean: 0.0,
            batch_size_max: args.batch_size_max,
            offered_rate: 0,
            peak_rss_bytes: rss_bytes("VmHWM:"),
            wallets,
            state_bytes_per_wallet: None,
            state_bytes_per_wallet_funded: None,
            generator_late_p99_ms: None,
            latency_p99_ms_by_window: None,
            restart_s: Some(seconds),
            restart_replayed_commands: Some(loaded.replayed_commands),
        }
        .print(args.json);
    }
    Ok(())
}

fn new_tally() -> Arc<Tally> {
    Arc::new(Tally {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        latencies: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
        windows: Mutex::new((Instant::now(), Vec::new())),
    })
}

fn wait_for_room(tally: &Tally, in_flight_max: u64) {
    while tally.in_flight.load(Ordering::Acquire) >= in_flight_max {
        std::thread::yield_now();
    }
}

fn wait_for_all(tally: &Tally) {
    while tally.in_flight.load(Ordering::Acquire) > 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn submit(handle: &Handle, tally: &Arc<Tally>, command: Command, started: Instant) -> anyhow::Result<()> {
    tally.in_flight.fetch_add(1, Ordering::AcqRel);
    let counter = tally.clone();
    let reply = Box::new(move |outcome: tally_engine::Outcome| {
        counter.finish(
            started,
            succeeded(outcome.map(|answer| match answer {
                Answer::Receipt(receipt) => receipt,
                Answer::Read(_) => Receipt::Configured,
            })),
        )
    });
    if let Err(error) = handle.submit(Request::Command(command), reply) {
        tally.in_flight.fetch_sub(1, Ordering::AcqRel);
        tally.errors.fetch_add(1, Ordering::Relaxed);
        tally.done.fetch_add(1, Ordering::Relaxed);
        if error != tally_engine::EngineError::Busy {
            return Err(error).context("submitting");
        }
    }
    Ok(())
}

/// Places a hold; its reply submits the capture, and the capture's reply ends the operation.
fn submit_hold_capture(
    handle: &Handle,
    tally: &Arc<Tally>,
    world: &World,
    rng: &mut SmallRng,
    index: u64,
    started: Instant,
) {
    let (command, payee) = world.hold(rng, key(&format!("hc-h{index}")));
    tally.in_flight.fetch_add(1, Ordering::AcqRel);
    let (counter, capture_handle) = (tally.clone(), handle.clone());
    let reply = Box::new(move |outcome: tally_engine::Outcome| {
        let Ok(Answer::Receipt(Receipt::HoldPlaced { hold, .. })) = outcome else {
            counter.finish(started, false);
            return;
        };
        let capture = World::capture(hold, payee, key(&format!("hc-c{index}")));
        let done = counter.clone();
        let reply = Box::new(move |outcome: tally_engine::Outcome| done.finish(started, outcome.is_ok()));
        if capture_handle.submit(Request::Command(capture), reply).is_err() {
            counter.finish(started, false);
        }
    });
    if handle.submit(Request::Command(command), reply).is_err() {
        tally.finish(started, false);
    }
}

fn drive(args: &BenchArgs, world: &World, handle: &Handle, workload: Workload, wallets: u64) -> anyhow::Result<Report> {
    let workload = if workload == Workload::Restart { Workload::Charge } else { workload };
    let tally = new_tally();
    let mut rng = SmallRng::seed_from_u64(match workload {
        Workload::Charge => 1,
        Workload::HoldCapture => 2,
        Workload::Usage => 4,
        _ => 3,
    });
    let bar = progress(args, args.operations, &workload_name(workload));
    let batches_before = handle.stats().batches.load(Ordering::Relaxed);
    let requests_before = handle.stats().requests.load(Ordering::Relaxed);
    let prefix = workload_name(workload);
    // How late the generator itself submits each request (open loop only): when it is
    // descheduled, requests go out late and their latency counts from their due time.
    let mut lateness = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    if args.rate > 0 {
        // Sleeps end within 10 µs of their time rather than the default 50 µs slack.
        // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 10_000u64);
        }
    }
    let begin = Instant::now();
    tally.windows.lock().expect("window lock").0 = begin;
    for index in 0..args.operations {
        let started = if let Some(interval) = 1_000_000_000u64.checked_div(args.rate) {
            // Open loop: each operation has its due time, and latency counts from it, so
            // a stall cannot hide the requests that would have queued behind it. The
            // generator sleeps until the next due time rather than spinning or yielding
            // in a loop, which took most of a core from the engine on a two-core
            // machine; a wake-up submits every request due by then, and its lateness
            // (tens of microseconds) counts in their latency.
            let due = begin + Duration::from_nanos(index * interval);
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            }
            lateness.saturating_record((Instant::now() - due).as_micros() as u64);
            due
        } else {
            wait_for_room(&tally, args.in_flight_max);
            Instant::now()
        };
        match workload {
            Workload::HoldCapture => submit_hold_capture(handle, &tally, world, &mut rng, index, started),
            Workload::TopUp => {
                submit(handle, &tally, world.top_up(&mut rng, key(&format!("{prefix}-{index}"))), started)?
            }
            Workload::Usage => {
                let at = tally_engine::Clock::now(&SystemClock);
                submit(handle, &tally, world.usage(&mut rng, index, at), started)?
            }
            _ => submit(handle, &tally, world.charge(&mut rng, key(&format!("{prefix}-{index}"))), started)?,
        }
        if index % 4096 == 0 {
            bar.set_position(tally.done.load(Ordering::Relaxed));
        }
    }
    wait_for_all(&tally);
    let elapsed = begin.elapsed();
    bar.finish_and_clear();
    let batches = handle.stats().batches.load(Ordering::Relaxed) - batches_before;
    let requests = handle.stats().requests.load(Ordering::Relaxed) - requests_before;
    let latencies = tally.latencies.lock().expect("histogram lock");
    let quantile = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    let by_window = (args.rate > 0).then(|| {
        let windows = tally.windows.lock().expect("window lock");
        windows.1.iter().map(|window| window.value_at_quantile(0.99) as f64 / 1000.0).collect()
    });
    Ok(Report {
        workload: workload_name(workload),
        storage: if args.postgres_url.is_some() { "pg".into() } else { "on".into() },
        operations: args.operations,
        errors: tally.errors.load(Ordering::Relaxed),
        ops_per_s: args.operations as f64 / elapsed.as_secs_f64(),
        latency_p50_ms: quantile(0.5),
        latency_p99_ms: quantile(0.99),
        latency_p999_ms: quantile(0.999),
        generator_late_p99_ms: (args.rate > 0).then(|| lateness.value_at_quantile(0.99) as f64 / 1000.0),
        latency_p99_ms_by_window: by_window,
        batch_mean: requests as f64 / batches.max(1) as f64,
        batch_size_max: args.batch_size_max,
        offered_rate: args.rate,
        peak_rss_bytes: rss_bytes("VmHWM:"),
        wallets,
        state_bytes_per_wallet: None,
        state_bytes_per_wallet_funded: None,
        restart_s: None,
        restart_replayed_commands: None,
    })
}

/// Whether a command succeeded; a usage command succeeds only if its events were charged.
fn succeeded<E>(outcome: Result<Receipt, E>) -> bool {
    match outcome {
        Ok(Receipt::Usage { results }) => results.iter().all(|r| r.is_ok()),
        Ok(_) => true,
        Err(_) => false,
    }
}
