//! High availability on PostgreSQL, with real `tally serve` processes: a leader killed
//! with SIGKILL under load, a leader paused with SIGSTOP past its lease (fencing), and
//! PostgreSQL restarted under load. After each, every acknowledged credit is in the
//! ledger exactly once.
//!
//! Needs PostgreSQL at `TALLY_TEST_POSTGRES_URL` (and, for the restart test, root and
//! `pg_ctlcluster`); outside CI a missing one skips with a message, under CI=true it fails.

use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests share the machine's PostgreSQL, and one restarts it: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const LEASE_MS: u64 = 2_000;
/// What the tests allow from a leader's death to the standby answering: the lease,
/// the standby's next try, loading the ledger, and slack for a loaded machine.
const TAKEOVER_BUDGET: Duration = Duration::from_millis(LEASE_MS + 3_000);

fn postgres_url() -> Option<String> {
    match std::env::var("TALLY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "TALLY_TEST_POSTGRES_URL must be set under CI=true");
            eprintln!("SKIPPED: set TALLY_TEST_POSTGRES_URL to run the PostgreSQL cluster tests");
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Node {
    child: Child,
    base: String,
    key: Arc<Mutex<Option<String>>>,
}

impl Node {
    fn start(url: &str, schema: &str, dir: &Path) -> Node {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database-url",
                url,
                "--database-schema",
                schema,
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(["--lease-ms", &LEASE_MS.to_string(), "--lease-renew-ms", "400", "--takeover-poll-ms", "100"])
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::piped())
            // TALLY_TEST_NODE_LOGS=1 shows the nodes' logs.
            .stderr(if std::env::var_os("TALLY_TEST_NODE_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("start tally serve");
        let stdout = child.stdout.take().unwrap();
        let key = Arc::new(Mutex::new(None));
        let found = key.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(secret) = line.strip_prefix("Platform admin API key (shown once, keep it safe): ") {
                    *found.lock().unwrap() = Some(secret.trim().to_string());
                }
            }
        });
        let node = Node { child, base: format!("http://127.0.0.1:{port}"), key };
        let started = Instant::now();
        while Client::new().get(format!("{}/healthz", node.base)).send().is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "tally serve did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        node
    }

    fn ready(&self) -> bool {
        Client::new()
            .get(format!("{}/readyz", self.base))
            .timeout(Duration::from_secs(1))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }

    /// Waits until the node serves as leader; how long that took.
    fn wait_ready(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        while !self.ready() {
            assert!(started.elapsed() < limit, "{} did not become ready within {limit:?}", self.base);
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    }

    fn signal(&self, signal: i32) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn call(
    client: &Client,
    method: &str,
    url: &str,
    key: &str,
    idempotency: Option<&str>,
    body: Option<Value>,
) -> Option<(u16, Value, bool)> {
    let mut request = client.request(method.parse().unwrap(), url).bearer_auth(key).timeout(Duration::from_secs(3));
    if let Some(idempotency) = idempotency {
        request = request.header("Idempotency-Key", idempotency);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().ok()?;
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    Some((status, response.json().unwrap_or(Value::Null), replayed))
}

/// Sends the credit named `key` to whichever node answers until one acknowledges it.
fn credit_until_acknowledged(client: &Client, nodes: &[String], admin: &str, key: &str, deadline: Instant) -> bool {
    let body = json!({"direction": "credit", "amount": "1", "currency": "USD", "reason": "load"});
    let mut attempt = 0usize;
    while Instant::now() < deadline {
        let base = &nodes[attempt % nodes.len()];
        attempt += 1;
        if let Some((201, _, _)) =
            call(client, "POST", &format!("{base}/v1/wallets/wal_1/adjustments"), admin, Some(key), Some(body.clone()))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Clients crediting 1.00 each under their own keys until stopped; each retries its
/// current key (on any node) until acknowledged. Returns the acknowledged keys.
fn load(nodes: Vec<String>, admin: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (nodes, admin, stop) = (nodes.clone(), admin.clone(), stop.clone());
                std::thread::spawn(move || {
                    let client = Client::new();
                    let mut acknowledged = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let key = format!("load-{c}-{n}");
                        let deadline = Instant::now() + Duration::from_secs(60);
                        assert!(
                            credit_until_acknowledged(&client, &nodes, &admin, &key, deadline),
                            "{key} never acknowledged"
                        );
                        acknowledged.push(key);
                    }
                    acknowledged
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    })
}

/// Every acknowledged credit is there once: the balance is their count, and each
/// key replays its first answer instead of crediting again.
fn assert_exactly_once(base: &str, admin: &str, acknowledged: &[String], extra: u64) {
    let client = Client::new();
    let (status, wallet, _) = call(&client, "GET", &format!("{base}/v1/wallets/wal_1"), admin, None, None).unwrap();
    assert_eq!(status, 200, "{wallet}");
    let expected = acknowledged.len() as u64 + extra;
    assert_eq!(
        wallet["balance"].as_str(),
        Some(format!("{expected}.00").as_str()),
        "acknowledged {expected}: {wallet}"
    );
    let body = json!({"direction": "credit", "amount": "1", "currency": "USD", "reason": "load"});
    for key in acknowledged {
        let (status, answer, replayed) = call(
            &client,
            "POST",
            &format!("{base}/v1/wallets/wal_1/adjustments"),
            admin,
            Some(key),
            Some(body.clone()),
        )
        .unwrap_or_else(|| panic!("replaying {key}: no answer"));
        assert!(status == 201 && replayed, "{key} was not replayed: {status} {answer}");
    }
    let (_, wallet, _) = call(&client, "GET", &format!("{base}/v1/wallets/wal_1"), admin, None, None).unwrap();
    assert_eq!(wallet["balance"].as_str(), Some(format!("{expected}.00").as_str()), "replays changed nothing");
}

fn setup(node: &Node) -> String {
    node.wait_ready(Duration::from_secs(30));
    let started = Instant::now();
    let admin = loop {
        if let Some(key) = node.key.lock().unwrap().clone() {
            break key;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no admin key printed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let client = Client::new();
    let (status, body, _) =
        call(&client, "POST", &format!("{}/v1/organizations", node.base), &admin, None, Some(json!({"name": "Load"})))
            .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body, _) = call(
        &client,
        "POST",
        &format!("{}/v1/organizations/org_1/wallets", node.base),
        &admin,
        None,
        Some(json!({"currency": "USD"})),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    admin
}

struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new(url: &str, test: &str) -> Schema {
        let name = format!("tally_{test}_{}", std::process::id());
        tally_store::PostgresStore::drop_schema(url, &name).unwrap();
        Schema { url: url.to_string(), name }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = tally_store::PostgresStore::drop_schema(&self.url, &self.name);
    }
}

#[test]
fn a_standby_takes_over_from_a_killed_leader_with_every_acknowledged_credit() {
    let Some(url) = postgres_url() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let schema = Schema::new(&url, "failover");
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let leader = Node::start(&url, &schema.name, dirs.0.path());
    let admin = setup(&leader);
    let standby = Node::start(&url, &schema.name, dirs.1.path());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!standby.ready());
    // The standby serves reads from the journal it follows, history included ...
    let client = Client::new();
    let body = json!({"direction": "credit", "amount": "1", "currency": "USD", "reason": "load"});
    assert!(credit_until_acknowledged(
        &client,
        std::slice::from_ref(&leader.base),
        &admin,
        "first",
        Instant::now() + Duration::from_secs(10)
    ));
    let started = Instant::now();
    loop {
        let (status, wallet, _) =
            call(&client, "GET", &format!("{}/v1/wallets/wal_1", standby.base), &admin, None, None).unwrap();
        assert_eq!(status, 200, "{wallet}");
        if wallet["balance"] == "1.00" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the standby did not follow: {wallet}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, movements, _) =
        call(&client, "GET", &format!("{}/v1/wallets/wal_1/movements", standby.base), &admin, None, None).unwrap();
    assert_eq!((status, movements["data"].as_array().map(Vec::len)), (200, Some(1)), "{movements}");
    // ... and sends writes to the leader.
    let (status, refused, _) = call(
        &client,
        "POST",
        &format!("{}/v1/wallets/wal_1/adjustments", standby.base),
        &admin,
        Some("to-standby"),
        Some(body),
    )
    .unwrap();
    assert_eq!((status, refused["code"].as_str()), (503, Some("not_leader")), "{refused}");
    assert_eq!(refused["leader"].as_str(), Some(leader.base.as_str()));

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(vec![leader.base.clone(), standby.base.clone()], admin.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(1_500));
    leader.signal(libc::SIGKILL);
    let takeover = standby.wait_ready(TAKEOVER_BUDGET);
    println!("cluster: the standby served {takeover:?} after the leader was killed (lease {LEASE_MS} ms)");
    std::thread::sleep(Duration::from_millis(1_500));
    stop.store(true, Ordering::Release);
    let acknowledged = running.join().unwrap();
    println!("cluster: {} credits acknowledged across the failover", acknowledged.len());
    assert!(acknowledged.len() > 20, "the load ran: {}", acknowledged.len());
    assert_exactly_once(&standby.base, &admin, &acknowledged, 1);
}

#[test]
fn a_paused_leader_is_fenced_when_it_resumes_and_steps_down() {
    let Some(url) = postgres_url() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let schema = Schema::new(&url, "fencing");
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut leader = Node::start(&url, &schema.name, dirs.0.path());
    let admin = setup(&leader);
    let standby = Node::start(&url, &schema.name, dirs.1.path());
    let client = Client::new();
    let mut acknowledged = Vec::new();
    for n in 0..10 {
        let key = format!("before-{n}");
        assert!(credit_until_acknowledged(
            &client,
            std::slice::from_ref(&leader.base),
            &admin,
            &key,
            Instant::now() + Duration::from_secs(10)
        ));
        acknowledged.push(key);
    }

    leader.signal(libc::SIGSTOP);
    let takeover = standby.wait_ready(TAKEOVER_BUDGET);
    println!("cluster: the standby took over {takeover:?} after the leader was paused");
    for n in 0..10 {
        let key = format!("after-{n}");
        assert!(credit_until_acknowledged(
            &client,
            std::slice::from_ref(&standby.base),
            &admin,
            &key,
            Instant::now() + Duration::from_secs(10)
        ));
        acknowledged.push(key);
    }

    // The old leader wakes up believing it leads: its next commit is fenced, and it
    // steps down (exits) instead of serving stale state.
    leader.signal(libc::SIGCONT);
    let body = json!({"direction": "credit", "amount": "1", "currency": "USD", "reason": "stale leader"});
    let answer = call(
        &client,
        "POST",
        &format!("{}/v1/wallets/wal_1/adjustments", leader.base),
        &admin,
        Some("stale"),
        Some(body),
    );
    assert!(!matches!(answer, Some((201, _, _))), "the paused leader committed after losing its lease: {answer:?}");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = leader.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the old leader did not step down");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(75), "stepped down with EX_TEMPFAIL");
    println!("cluster: the resumed leader committed nothing and stepped down ({status})");
    assert_exactly_once(&standby.base, &admin, &acknowledged, 0);
    // The stale request was not applied anywhere: applying it now on the leader credits.
    let body = json!({"direction": "credit", "amount": "1", "currency": "USD", "reason": "stale leader"});
    let (status, _, replayed) = call(
        &client,
        "POST",
        &format!("{}/v1/wallets/wal_1/adjustments", standby.base),
        &admin,
        Some("stale"),
        Some(body),
    )
    .unwrap();
    assert!(status == 201 && !replayed, "the stale leader's request had been applied");
}

fn restart_postgres() -> Result<(), String> {
    let version = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("/etc/postgresql: {e}"))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .next()
        .ok_or("no PostgreSQL cluster in /etc/postgresql")?;
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    status.success().then_some(()).ok_or(format!("pg_ctlcluster restart: {status}"))
}

#[test]
fn postgres_restarting_under_load_loses_and_doubles_nothing() {
    let Some(url) = postgres_url() else { return };
    if Command::new("pg_ctlcluster").arg("--help").output().is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "pg_ctlcluster is needed under CI=true");
        eprintln!("SKIPPED: pg_ctlcluster is not available to restart PostgreSQL");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let schema = Schema::new(&url, "restart");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&url, &schema.name, dir.path());
    let admin = setup(&node);
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(vec![node.base.clone()], admin.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(1_000));
    // Watch readiness while the database is away.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (base, watching) = (node.base.clone(), watching.clone());
        std::thread::spawn(move || {
            let mut saw_not_ready = false;
            while watching.load(Ordering::Acquire) {
                let ready = Client::new()
                    .get(format!("{base}/readyz"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .is_ok_and(|r| r.status().is_success());
                saw_not_ready |= !ready;
                std::thread::sleep(Duration::from_millis(10));
            }
            saw_not_ready
        })
    };
    let restarted = Instant::now();
    restart_postgres().unwrap();
    println!("cluster: PostgreSQL restarted in {:?} under load", restarted.elapsed());
    let back = node.wait_ready(Duration::from_secs(30));
    println!("cluster: the node was ready again {back:?} after the restart finished");
    watching.store(false, Ordering::Release);
    assert!(watcher.join().unwrap(), "readiness never reported the database outage");
    std::thread::sleep(Duration::from_millis(1_000));
    stop.store(true, Ordering::Release);
    let acknowledged = running.join().unwrap();
    println!("cluster: {} credits acknowledged across the restart", acknowledged.len());
    assert!(acknowledged.len() > 20, "the load ran: {}", acknowledged.len());
    assert_exactly_once(&node.base, &admin, &acknowledged, 0);
    // The key table (in PostgreSQL too) reconnected: a new key is stored and works.
    let client = Client::new();
    let (status, key, _) = call(
        &client,
        "POST",
        &format!("{}/v1/api-keys", node.base),
        &admin,
        None,
        Some(json!({"organization": "org_1"})),
    )
    .unwrap();
    assert_eq!(status, 201, "{key}");
    let (status, wallet, _) =
        call(&client, "GET", &format!("{}/v1/wallets/wal_1", node.base), key["secret"].as_str().unwrap(), None, None)
            .unwrap();
    assert_eq!(status, 200, "{wallet}");
}
