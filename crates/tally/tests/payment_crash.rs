//! Fault injection: `tally serve` is killed (abort) right after the payment provider
//! captured a top-up and before the ledger credited it, or right after a payout's money
//! went in transit and before the payout rail was asked. After a restart the recovery
//! task must find the pending record and finish it exactly once.

use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `tally serve` on `dir`; returns the child and, on first start, the admin key.
fn serve(dir: &Path, port: u16, fault: Option<&str>) -> (Child, Option<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .env("TALLY_LOG", "warn")
        .env_remove("TALLY_DATABASE_URL")
        .stdout(Stdio::piped());
    if let Some(fault) = fault {
        command.env("TALLY_FAULT", fault);
    } else {
        command.env_remove("TALLY_FAULT");
    }
    let mut child = command.spawn().expect("start tally serve");
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(key) = line.split(": ").nth(1).filter(|_| line.starts_with("Platform admin API key")) {
                let _ = sender.send(key.trim().to_string());
            }
        }
    });
    let client = Client::new();
    let started = Instant::now();
    while client.get(format!("http://127.0.0.1:{port}/healthz")).send().is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "tally serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, receiver.recv_timeout(Duration::from_millis(500)).ok())
}

fn call(
    client: &Client,
    method: &str,
    url: String,
    key: &str,
    idempotency: Option<&str>,
    body: Option<Value>,
) -> reqwest::Result<(u16, Value)> {
    let mut request = client.request(method.parse().unwrap(), url).bearer_auth(key);
    if let Some(idempotency) = idempotency {
        request = request.header("Idempotency-Key", idempotency);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    Ok((status, response.json().unwrap_or(Value::Null)))
}

#[test]
fn a_crash_between_capture_and_credit_credits_exactly_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let (mut child, admin) = serve(dir.path(), port, Some("abort_after_capture"));
    let admin = admin.expect("the first start prints the admin key");
    let (status, org) =
        call(&client, "POST", format!("{base}/v1/organizations"), &admin, None, Some(json!({"name": "Acme"}))).unwrap();
    assert_eq!(status, 201, "{org}");
    let org = org["id"].as_str().unwrap().to_string();
    let billing = json!({"legal_name": "Acme", "email": "a@example.com", "country": "US", "region": "CA"});
    call(&client, "PUT", format!("{base}/v1/organizations/{org}/billing-details"), &admin, None, Some(billing))
        .unwrap();
    let (_, wallet) = call(
        &client,
        "POST",
        format!("{base}/v1/organizations/{org}/wallets"),
        &admin,
        None,
        Some(json!({"currency": "USD"})),
    )
    .unwrap();
    let wallet = wallet["id"].as_str().unwrap().to_string();
    let (status, method) = call(
        &client,
        "POST",
        format!("{base}/v1/organizations/{org}/payment-methods"),
        &admin,
        None,
        Some(json!({"token": "pm_card_visa"})),
    )
    .unwrap();
    assert_eq!(status, 201, "{method}");
    let body = json!({"amount": "20.00", "payment_method": method["id"]});
    // The process dies mid-request: the provider has the money, the ledger does not.
    let answer = call(&client, "POST", format!("{base}/v1/wallets/{wallet}/top-ups"), &admin, Some("t1"), Some(body));
    assert!(answer.is_err(), "the request must die with the process, got {answer:?}");
    let exit = child.wait().unwrap();
    assert!(!exit.success(), "the fault aborts the process");

    let (mut child, _) = serve(dir.path(), port, None);
    let started = Instant::now();
    let top_up = loop {
        let (_, list) =
            call(&client, "GET", format!("{base}/v1/wallets/{wallet}/top-ups"), &admin, None, None).unwrap();
        let first = list["data"][0].clone();
        if first["status"] == "succeeded" {
            break first;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the pending top-up was never settled: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(top_up["amount"], "20.00");
    // Let the worker run a few more rounds: it must not credit again.
    std::thread::sleep(Duration::from_millis(1500));
    let (_, list) = call(&client, "GET", format!("{base}/v1/wallets/{wallet}/top-ups"), &admin, None, None).unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (_, balance) = call(&client, "GET", format!("{base}/v1/wallets/{wallet}"), &admin, None, None).unwrap();
    assert_eq!(balance["balance"], "20.00", "credited exactly once");
    child.kill().unwrap();
    child.wait().unwrap();
    // The provider's own records: one payment, captured once.
    let sandbox =
        tally_server::payments::sandbox::Sandbox::open(&dir.path().join("tally.sandbox.db"), Duration::ZERO).unwrap();
    let records = sandbox.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].captured_minor, 2000);
}

#[test]
fn a_crash_between_in_transit_and_the_rail_pays_out_exactly_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let (mut child, admin) = serve(dir.path(), port, Some("abort_before_rail"));
    let admin = admin.expect("the first start prints the admin key");
    let post = |path: &str, idempotency: Option<&str>, body: Value| {
        call(&client, "POST", format!("{base}{path}"), &admin, idempotency, Some(body))
    };
    let (_, org) = post("/v1/organizations", None, json!({"name": "Shop"})).unwrap();
    let org = org["id"].as_str().unwrap().to_string();
    let billing = json!({"legal_name": "Shop", "email": "s@example.com", "country": "US", "region": "NY"});
    call(&client, "PUT", format!("{base}/v1/organizations/{org}/billing-details"), &admin, None, Some(billing))
        .unwrap();
    let (_, wallet) = post(&format!("/v1/organizations/{org}/wallets"), None, json!({"currency": "USD"})).unwrap();
    let wallet = wallet["id"].as_str().unwrap().to_string();
    let credit = json!({"direction": "credit", "amount": "100.00", "currency": "USD", "reason": "sales"});
    post(&format!("/v1/wallets/{wallet}/adjustments"), Some("fund"), credit).unwrap();
    post(&format!("/v1/organizations/{org}/verification/submit"), None, json!({})).unwrap();
    post(&format!("/v1/organizations/{org}/verification/approve"), None, json!({})).unwrap();
    let account = json!({"country": "US", "currency": "USD", "holder_name": "Shop", "routing_number": "011000015",
                         "account_number": "000123456789"});
    let (status, account) = post(&format!("/v1/organizations/{org}/bank-accounts"), None, account).unwrap();
    assert_eq!(status, 201, "{account}");
    let account = account["id"].as_str().unwrap().to_string();
    post(&format!("/v1/bank-accounts/{account}/verify"), None, json!({})).unwrap();
    let body = json!({"wallet": wallet, "amount": "60.00", "bank_account": account});
    let answer = post("/v1/payouts", Some("po-1"), body);
    assert!(answer.is_err(), "the request must die with the process, got {answer:?}");
    assert!(!child.wait().unwrap().success());

    let (mut child, _) = serve(dir.path(), port, None);
    let started = Instant::now();
    loop {
        let (_, list) = call(&client, "GET", format!("{base}/v1/payouts"), &admin, None, None).unwrap();
        if list["data"][0]["status"] == "paid" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the payout was never finished: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (_, list) = call(&client, "GET", format!("{base}/v1/payouts"), &admin, None, None).unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (_, balance) = call(&client, "GET", format!("{base}/v1/wallets/{wallet}"), &admin, None, None).unwrap();
    assert_eq!(balance["balance"], "40.00", "paid out exactly once");
    child.kill().unwrap();
    child.wait().unwrap();
    let rail = tally_server::payouts::SandboxRail::open(&dir.path().join("tally.sandbox.db"), Duration::ZERO).unwrap();
    assert_eq!(rail.records(), vec![("po_1".to_string(), 6000)], "the rail received it once");
}
