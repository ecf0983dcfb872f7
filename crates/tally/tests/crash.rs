//! Crash test: the engine runs in a child process under load from several client
//! threads and is killed with SIGKILL at random moments. After every kill the database
//! must load with its invariants intact and hold every acknowledged operation; at the
//! end a deep check of the whole journal must pass (no operation half-applied).

use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tally_ledger::{Command as LedgerCommand, IdempotencyKey};
use tally_store::{deep_check, SqliteStore, Store};

/// Kill cycles per run; CI runs the default, `TALLY_CRASH_CYCLES` asks for more.
const CYCLES_DEFAULT: u32 = 20;

#[test]
fn acknowledged_operations_survive_sigkill() {
    let cycles: u32 = std::env::var("TALLY_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(CYCLES_DEFAULT);
    let directory = tempfile::tempdir().unwrap();
    let database = directory.path().join("crash.db");
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(std::process::id()));
    let mut acknowledged_total = 0u64;
    for cycle in 0..cycles {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["crash-worker", "--database"])
            .arg(&database)
            .args(["--clients", "4", "--wallets", "20", "--run", &format!("r{cycle}")])
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the worker");
        let stdout = child.stdout.take().unwrap();
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "ready" {
                    let _ = ready_sender.send(());
                } else if let Some(rest) = line.strip_prefix("ack ") {
                    if let Some((key, _operation)) = rest.split_once(' ') {
                        acks.push(key.to_string());
                    }
                }
            }
            acks
        });
        ready.recv_timeout(Duration::from_secs(60)).expect("the worker became ready");
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        child.kill().expect("SIGKILL the worker");
        child.wait().unwrap();
        let acks = reader.join().unwrap();

        let started = Instant::now();
        let mut store = SqliteStore::open(&database).unwrap();
        let loaded = store.load().expect("the database loads and its invariants hold after a kill");
        let mut journaled = HashSet::new();
        store
            .scan_journal(1, |_, _, commands, _| {
                for command in commands {
                    if let LedgerCommand::Move { key, .. } = command {
                        journaled.insert(key);
                    }
                }
                Ok(())
            })
            .unwrap();
        for key in &acks {
            let digest = IdempotencyKey::new("crash", key).unwrap();
            assert!(journaled.contains(&digest), "cycle {cycle}: acknowledged {key} is missing after the kill");
        }
        acknowledged_total += acks.len() as u64;
        println!(
            "cycle {cycle}: {} acknowledged, all present; {} wallets loaded in {:?}",
            acks.len(),
            loaded.state.wallets.len(),
            started.elapsed()
        );
    }
    let mut store = SqliteStore::open(&database).unwrap();
    let report = deep_check(&mut store, |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "deep check after the kills: {:?}", report.problems);
    println!(
        "crash test: {cycles} SIGKILL cycles, {acknowledged_total} acknowledged operations verified; deep check of {} operations passed",
        report.operations
    );
    assert!(acknowledged_total > u64::from(cycles), "the workers acknowledged too little to prove anything");
}
