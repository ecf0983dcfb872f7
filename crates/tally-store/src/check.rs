//! The deep offline check behind `tally check`: it reads the whole journal and verifies
//! what the loaded state alone cannot show.

use crate::codec;
use crate::sqlite::SqliteStore;
use crate::StoreError;
use std::collections::{BTreeMap, HashMap};
use tally_ledger::{Account, Command, Settings, WalletId};

#[derive(Debug, Default)]
pub struct CheckReport {
    pub batches: u64,
    pub commands: u64,
    pub operations: u64,
    pub wallets: u64,
    pub problems: Vec<String>,
}

/// Most problems reported before the check stops listing them.
const PROBLEMS_MAX: usize = 100;

impl CheckReport {
    fn problem(&mut self, text: String) {
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(text);
        }
    }
}

/// Checks: the state loads and its invariants hold (sums to zero per currency, nothing
/// negative, holds add up); every operation's legs sum to zero; every wallet's balance
/// equals the sum of its movements, and each movement's balance-after is that running
/// sum; a replay of the whole journal from nothing gives the same state as the snapshot
/// path. `progress` is called with (batches done, batches in all).
pub fn deep_check(store: &mut SqliteStore, mut progress: impl FnMut(u64, u64)) -> Result<CheckReport, StoreError> {
    let mut report = CheckReport::default();
    let total = store.last_seq()?;
    let loaded = match store.load_with(false) {
        Ok(loaded) => loaded,
        Err(StoreError::Invariants(problems)) => {
            report.problems = problems;
            return Ok(report);
        }
        Err(error) => return Err(error),
    };
    let mut sums: HashMap<WalletId, i128> = HashMap::new();
    let mut replay = tally_ledger::State::new(Settings::default());
    store.scan_journal(1, |seq, at, commands, receipts| {
        let receipts = codec::decode_receipts(receipts, seq)?;
        if receipts.len() != commands.len() {
            report.problem(format!("journal {seq}: {} commands but {} receipts", commands.len(), receipts.len()));
        }
        for (command, receipt) in commands.iter().zip(&receipts) {
            match replay.apply(command, at) {
                Ok(replayed) if replayed == *receipt => {}
                Ok(_) => {
                    report.problem(format!("journal {seq}: replay gives a different receipt for {}", describe(command)))
                }
                Err(rejection) => {
                    report.problem(format!("journal {seq}: replay rejects {}: {}", describe(command), rejection.code()))
                }
            }
            for operation in receipt.operations() {
                report.operations += 1;
                let sum: i128 = operation.legs.iter().map(|leg| leg.amount.units()).sum();
                if sum != 0 {
                    report.problem(format!("{:?}: legs sum to {sum}, not zero", operation.id));
                }
                for leg in &operation.legs {
                    if let Account::Wallet(wallet) = leg.account {
                        let running = sums.entry(wallet).or_default();
                        *running += leg.amount.units();
                        if *running != leg.balance_after.units() {
                            report.problem(format!(
                                "{:?} in {:?}: balance after is {} but movements sum to {}",
                                wallet,
                                operation.id,
                                leg.balance_after.units(),
                                running
                            ));
                        }
                    }
                }
            }
        }
        report.batches += 1;
        report.commands += commands.len() as u64;
        progress(seq, total);
        Ok(())
    })?;
    let mut by_wallet: BTreeMap<WalletId, i128> = BTreeMap::new();
    for wallet in &loaded.state.wallets {
        by_wallet.insert(wallet.id, wallet.balance().units());
    }
    report.wallets = by_wallet.len() as u64;
    for (wallet, balance) in by_wallet {
        let movements = sums.get(&wallet).copied().unwrap_or(0);
        if movements != balance {
            report.problem(format!("{wallet:?}: balance {balance} but movements sum to {movements}"));
        }
    }
    if loaded.state != replay {
        report.problem("the state from the snapshot differs from a full replay of the journal".to_string());
    }
    Ok(report)
}

fn describe(command: &Command) -> String {
    match command {
        Command::Move { key, .. } | Command::MoveAs { key, .. } => format!("the command with {key:?}"),
        other => format!("{:?}", std::mem::discriminant(other)),
    }
}
