//! The portals in a real browser: Playwright (playwright-core) drives Debian's Chromium
//! through `tests/browser/portal.mjs` against a server started here. Screenshots of the
//! main pages land in `tests/browser/screenshots/`.
//!
//! Needs node, `npm ci` in tests/browser and /usr/bin/chromium (`.ci/run` installs
//! them). Outside CI a missing piece skips the test with a message; under CI=true it
//! fails.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest the browser script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn missing_piece(dir: &Path, chromium: &str) -> Option<String> {
    if std::process::Command::new("node").arg("--version").output().is_err() {
        return Some("node is not installed".into());
    }
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Some(format!("playwright-core is not installed: run `npm ci` in {}", dir.display()));
    }
    if !Path::new(chromium).exists() {
        return Some(format!("{chromium} is missing: apt-get install chromium"));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_customer_use_the_portals_in_chromium() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("TALLY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if let Some(missing) = missing_piece(&dir, &chromium) {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "the browser test must run under CI=true: {missing}");
        eprintln!("SKIPPED admin_and_customer_use_the_portals_in_chromium: {missing}");
        return;
    }

    let server = Server::start().await;
    let (org, wallet, key) = server.organization("Browser Co").await;
    let (_, other_wallet, _) = server.organization("Someone Else").await;
    let billing = json!({"legal_name": "Browser Co Ltd", "email": "pay@browser.example", "address": "2 High St",
                         "country": "US", "region": "CA"});
    let (status, body) = server
        .call("PUT", &format!("/v1/organizations/{org}/billing-details"), &server.admin, None, Some(billing))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let taxes = json!({"country": "US", "subdivision": "CA", "taxes": [{"name": "Sales tax", "rate": "0.1"}]});
    let (status, body) = server.call("PUT", "/v1/tax-profiles", &server.admin, None, Some(taxes)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let presets = json!({"presets": ["20", "50"]});
    let (status, body) =
        server.call("PUT", &format!("/v1/wallets/{wallet}/top-up-limits"), &server.admin, None, Some(presets)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) =
        server.post(&format!("/v1/organizations/{org}/verification/submit"), &key, None, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, link) = server.post("/v1/portal-sessions", &server.admin, None, json!({"organization": org})).await;
    assert_eq!(status, StatusCode::CREATED, "{link}");

    let mut script = tokio::process::Command::new("node");
    script
        .arg("portal.mjs")
        .current_dir(&dir)
        .env("TALLY_BASE", &server.base)
        .env("TALLY_ADMIN_KEY", &server.admin)
        .env("TALLY_WALLET", &wallet)
        .env("TALLY_OTHER_WALLET", &other_wallet)
        .env("TALLY_PORTAL_URL", link["url"].as_str().unwrap())
        .env("TALLY_CHROMIUM", &chromium)
        .env("TALLY_SCREENSHOTS", dir.join("screenshots"))
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, script.output())
        .await
        .expect("the browser script finished in time")
        .expect("node ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "browser script failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("browser: all steps passed"));

    // What the browser did is in the ledger: 40 credited, 20 topped up, the hold gone.
    let (_, after) = server.get(&format!("/v1/wallets/{wallet}"), &server.admin).await;
    assert_eq!((after["balance"].as_str(), after["held"].as_str()), (Some("60.00"), Some("0.00")), "{after}");
    let (_, verification) = server.get(&format!("/v1/organizations/{org}/verification"), &server.admin).await;
    assert_eq!(verification["status"], "verified");
    for name in ["admin-organizations", "admin-wallets", "admin-verification", "portal-review-top-up", "portal-receipt"]
    {
        assert!(dir.join("screenshots").join(format!("{name}.png")).is_file(), "screenshot {name}");
    }
}
