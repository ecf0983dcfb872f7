//! The crash test's worker: runs the engine on a database and hammers it with transfers
//! from several client threads, printing "ack <key>" for every acknowledged transfer, so
//! the test can SIGKILL it at any moment and then check what survived.

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tally_engine::{Engine, EngineConfig, SystemClock};
use tally_ledger::*;
use tally_store::SqliteStore;

#[derive(clap::Args)]
pub struct CrashWorkerArgs {
    #[arg(long)]
    database: PathBuf,
    #[arg(long, default_value_t = 4)]
    clients: u64,
    #[arg(long, default_value_t = 20)]
    wallets: u64,
    /// Distinguishes this run's idempotency keys from earlier runs on the same database.
    #[arg(long)]
    run: String,
}

pub fn run(args: CrashWorkerArgs) -> anyhow::Result<()> {
    let store = SqliteStore::open(&args.database)?;
    let config = EngineConfig { snapshot_every_commands: 5_000, ..EngineConfig::default() };
    let engine = Engine::start(store, Arc::new(SystemClock), config, None).context("starting")?;
    let handle = engine.handle();
    let usd = Currency::parse("USD")?;
    let existing = handle.read(|state| state.wallets.len() as u64)?;
    for id in existing + 1..=args.wallets {
        handle.execute(Command::CreateOrganization { name: format!("org {id}"), roles: Roles::default() })?;
        handle.execute(Command::CreateWallet {
            organization: OrganizationId(id),
            currency: usd,
            low_balance_threshold: None,
            additional: false,
        })?;
        handle.execute(Command::Move {
            key: IdempotencyKey::new("crash", &format!("fund-{id}"))?,
            action: MoneyAction::Credit {
                wallet: WalletId(id),
                amount: Money::new(Amount::from_major(100), usd),
                kind: CreditKind::TopUp,
                source: AdjustmentSource::ExternalFunding,
                grant: None,
                reason: String::new(),
            },
        })?;
    }
    println!("ready");
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..args.clients)
        .map(|client| {
            let (handle, stdout, run, wallets) = (handle.clone(), stdout.clone(), args.run.clone(), args.wallets);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(client);
                for n in 0.. {
                    let from = rng.gen_range(1..=wallets);
                    let to = (from % wallets) + 1;
                    let key = format!("{run}-{client}-{n}");
                    let command = Command::Move {
                        key: IdempotencyKey::new("crash", &key).expect("short key"),
                        action: MoneyAction::Transfer {
                            from: WalletId(from),
                            to: WalletId(to),
                            amount: Money::new(Amount::from_units(rng.gen_range(1..=1_000_000_000_000)), usd),
                            fee: Fee::Rate(PartsPerMillion(10_000)),
                            kind: TransferKind::Charge,
                            product: None,
                            description: String::new(),
                        },
                    };
                    match handle.execute(command) {
                        Ok(Receipt::Posted { operation, .. }) => {
                            let mut out = stdout.lock().expect("stdout lock");
                            let _ = writeln!(out, "ack {key} {}", operation.id.0);
                            let _ = out.flush();
                        }
                        Ok(_) | Err(tally_engine::EngineError::Rejected(_)) | Err(tally_engine::EngineError::Busy) => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}
