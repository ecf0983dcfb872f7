//! Operator commands against a real `tally serve`: a second process cannot use a data
//! directory a server holds, and `tally admin rebuild-history` projects the journal
//! again into the same history (the same events with the same ids and data).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tally");

struct Serving {
    child: Child,
    url: String,
    key: Option<String>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `tally serve` on `dir` and waits until it is ready; the admin key is read from
/// its output on first start.
async fn serve(dir: &std::path::Path) -> Serving {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tally serve");
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find("tly_adm_") {
                let _ = sender.send(line[at..].trim().to_string());
            }
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = reqwest::get(format!("{url}/readyz")).await {
            if response.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = receiver.recv_timeout(Duration::from_millis(500)).ok();
    Serving { child, url, key }
}

async fn call(serving: &Serving, key: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let client = reqwest::Client::new();
    let mut request = client
        .request(method.parse().unwrap(), format!("{}{path}", serving.url))
        .bearer_auth(key)
        .header("Idempotency-Key", format!("{method}-{path}-{}", rand::random::<u64>()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {answer}");
    answer
}

fn run(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(BIN).args(args).arg("--data-dir").arg(dir).env("TALLY_LOG", "warn").output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_directory_is_refused_and_history_rebuilds_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path()).await;
    let admin = server.key.clone().expect("the first start prints an admin key");
    // A merchant with a metered plan, a funded consumer subscribed to it, some usage and
    // a transfer: operations, movements, usage records and events of several kinds.
    call(&server, &admin, "POST", "/v1/organizations", Some(json!({"name": "m", "roles": {"merchant": true}}))).await;
    let merchant_key = call(&server, &admin, "POST", "/v1/api-keys", Some(json!({"organization": "org_1"}))).await;
    let merchant_key = merchant_key["secret"].as_str().unwrap().to_string();
    let meter = json!({"code": "tokens", "unit": "token", "aggregation": "sum"});
    call(&server, &merchant_key, "POST", "/v1/meters", Some(meter)).await;
    let plan = json!({"merchant": "org_1", "name": "p", "currency": "USD", "billing_period": "month",
        "platform_fee_rate": "0.05", "prices": [{"meter": "tokens", "model": "per_unit", "unit_price": "0.00002"}]});
    call(&server, &admin, "POST", "/v1/plans", Some(plan)).await;
    call(&server, &admin, "POST", "/v1/organizations", Some(json!({"name": "c"}))).await;
    let wallet =
        call(&server, &admin, "POST", "/v1/organizations/org_2/wallets", Some(json!({"currency": "USD"}))).await;
    let wallet = wallet["id"].as_str().unwrap().to_string();
    let credit = json!({"direction": "credit", "amount": "10.00", "currency": "USD", "reason": "test"});
    call(&server, &admin, "POST", &format!("/v1/wallets/{wallet}/adjustments"), Some(credit)).await;
    call(&server, &admin, "POST", "/v1/subscriptions", Some(json!({"consumer": "org_2", "plan": "pln_1"}))).await;
    for n in 0..5 {
        let event = json!({"event_id": format!("e{n}"), "consumer": "org_2", "meter": "tokens", "quantity": "1200"});
        call(&server, &merchant_key, "POST", "/v1/usage", Some(event)).await;
    }
    let before = call(&server, &admin, "GET", "/v1/events?limit=500", None).await;
    let types: Vec<&str> = before["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"usage.charged") && types.contains(&"operation.created"), "{types:?}");

    // While it runs, neither a second server nor a rebuild may touch its files.
    let mut second = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A second server that starts would serve until killed: give it ten seconds to refuse.
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second server started on a directory in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = second.wait_with_output().unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another Tally process"), "{second:?}");
    let refused = run(&["admin", "rebuild-history"], dir.path());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another Tally process"), "{refused:?}");

    drop(server);
    let rebuilt = run(&["admin", "rebuild-history"], dir.path());
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    assert!(String::from_utf8_lossy(&rebuilt.stdout).contains("projected"), "{rebuilt:?}");
    let server = serve(dir.path()).await;
    assert_eq!(server.key, None, "the key made on first start is kept");
    let after = call(&server, &admin, "GET", "/v1/events?limit=500", None).await;
    assert_eq!(before["data"], after["data"]);
    let statement = call(&server, &admin, "GET", &format!("/v1/wallets/{wallet}/movements"), None).await;
    assert_eq!(statement["data"].as_array().unwrap().len(), 6, "{statement}");
}
