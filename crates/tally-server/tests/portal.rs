//! The admin and customer portals over HTTP, as a browser without JavaScript uses them:
//! cookies, CSRF tokens, forms that post and redirect. (The browser test drives the
//! same pages in Chromium.)

mod common;

use common::Server;
use reqwest::header::{CONTENT_DISPOSITION, LOCATION, SET_COOKIE};
use reqwest::{redirect, Client, StatusCode};
use serde_json::json;

/// A cookie-keeping browser of one portal.
struct Browser {
    client: Client,
    base: String,
    cookie: Option<String>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    body: String,
}

impl Page {
    /// The value of the first hidden input `name` on the page.
    fn hidden(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker).unwrap_or_else(|| panic!("no {name} in {}", self.body)) + marker.len();
        self.body[start..].split('"').next().unwrap().to_string()
    }
}

impl Browser {
    fn new(base: &str) -> Browser {
        let client = Client::builder().redirect(redirect::Policy::none()).build().unwrap();
        Browser { client, base: base.to_string(), cookie: None }
    }

    async fn answer(&mut self, response: reqwest::Response) -> Page {
        let status = response.status();
        if let Some(cookie) = response.headers().get(SET_COOKIE) {
            let text = cookie.to_str().unwrap().to_string();
            assert!(text.contains("HttpOnly") && text.contains("SameSite=Strict"), "{text}");
            self.cookie = Some(text.split(';').next().unwrap().to_string());
        }
        let location = response.headers().get(LOCATION).map(|l| l.to_str().unwrap().to_string());
        Page { status, location, body: response.text().await.unwrap() }
    }

    async fn get(&mut self, path: &str) -> Page {
        let url = if path.starts_with("http") { path.to_string() } else { format!("{}{path}", self.base) };
        let mut request = self.client.get(url);
        if let Some(cookie) = &self.cookie {
            request = request.header("Cookie", cookie);
        }
        let response = request.send().await.unwrap();
        self.answer(response).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let mut request = self.client.post(format!("{}{path}", self.base)).form(form);
        if let Some(cookie) = &self.cookie {
            request = request.header("Cookie", cookie);
        }
        let response = request.send().await.unwrap();
        self.answer(response).await
    }

    /// Posts, follows the redirect, and returns the page it lands on.
    async fn submit(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let page = self.post(path, form).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
        self.get(&page.location.unwrap()).await
    }
}

async fn admin(server: &Server) -> Browser {
    let mut browser = Browser::new(&server.base);
    let page = browser.get("/admin").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location.as_deref(), Some("/admin/login"));
    let refused = browser.post("/admin/login", &[("key", "tly_adm_wrong")]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(browser.cookie.is_none());
    let page = browser.submit("/admin/login", &[("key", &server.admin)]).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    browser
}

async fn wallet_json(server: &Server, wallet: &str) -> serde_json::Value {
    server.get(&format!("/v1/wallets/{wallet}"), &server.admin).await.1
}

#[tokio::test]
async fn admin_credits_releases_a_hold_and_approves_a_verification() {
    let server = Server::start().await;
    let (org, wallet, key) = server.organization("Acme Robotics").await;
    server.organization("Globex").await;
    let mut browser = admin(&server).await;

    // The list, and search by name.
    let list = browser.get("/admin").await;
    assert!(list.body.contains("Acme Robotics") && list.body.contains("Globex"));
    let found = browser.get("/admin?q=acme").await;
    assert!(found.body.contains("Acme Robotics") && !found.body.contains("Globex"), "{}", found.body);

    // Credit 25.50 through the form.
    let here = format!("/admin/organizations/{org}");
    let page = browser.get(&here).await;
    assert!(page.body.contains("0.00 USD"));
    let (csrf, nonce) = (page.hidden("csrf"), page.hidden("nonce"));
    let form = [
        ("csrf", csrf.as_str()),
        ("nonce", nonce.as_str()),
        ("back", here.as_str()),
        ("direction", "credit"),
        ("amount", "25.50"),
        ("source", "funding"),
        ("reason", "welcome"),
    ];
    let page = browser.submit(&format!("/admin/wallets/{wallet}/adjust"), &form).await;
    assert!(page.body.contains("Credit of 25.50 USD applied."), "{}", page.body);
    assert!(page.body.contains("25.50 USD"));
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "25.50");
    // The same form posted twice (a double click) credits once: its nonce is the
    // idempotency key.
    browser.submit(&format!("/admin/wallets/{wallet}/adjust"), &form).await;
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "25.50");

    // A debit beyond available is refused with the API's message, and changes nothing.
    let page = browser.get(&here).await;
    let (csrf, nonce) = (page.hidden("csrf"), page.hidden("nonce"));
    let form = [
        ("csrf", csrf.as_str()),
        ("nonce", nonce.as_str()),
        ("back", here.as_str()),
        ("direction", "debit"),
        ("amount", "100"),
        ("reason", "too much"),
    ];
    let page = browser.submit(&format!("/admin/wallets/{wallet}/adjust"), &form).await;
    assert!(page.body.contains("insufficient_funds"), "{}", page.body);
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "25.50");

    // Release a hold.
    let (status, hold) = server
        .post(
            &format!("/v1/wallets/{wallet}/holds"),
            &key,
            Some("h1"),
            json!({"amount": "5", "currency": "USD", "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    let hold = hold["id"].as_str().unwrap();
    let page = browser.get(&here).await;
    assert!(page.body.contains(hold));
    assert_eq!(wallet_json(&server, &wallet).await["available"], "20.50");
    let (csrf, nonce) = (page.hidden("csrf"), page.hidden("nonce"));
    let page = browser
        .submit(&format!("/admin/holds/{hold}/release"), &[("csrf", &csrf), ("nonce", &nonce), ("back", &here)])
        .await;
    assert!(page.body.contains(&format!("Hold {hold} released.")), "{}", page.body);
    assert_eq!(wallet_json(&server, &wallet).await["available"], "25.50");

    // Grant promotional credit.
    let form = [
        ("csrf", csrf.as_str()),
        ("nonce", "a1"),
        ("back", here.as_str()),
        ("amount", "3"),
        ("category", "promotional"),
        ("priority", "1"),
        ("expires_at", "2099-01-01T00:00:00Z"),
    ];
    let page = browser.submit(&format!("/admin/wallets/{wallet}/grants"), &form).await;
    assert!(page.body.contains("Credit granted."), "{}", page.body);
    assert!(page.body.contains("2099-01-01T00:00:00"), "{}", page.body);

    // Approve a verification the organization submitted.
    let billing =
        json!({"legal_name": "Acme Robotics LLC", "email": "ops@acme.example", "country": "US", "region": "NY"});
    let (status, _) = server
        .call("PUT", &format!("/v1/organizations/{org}/billing-details"), &server.admin, None, Some(billing))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.post(&format!("/v1/organizations/{org}/verification/submit"), &key, None, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let tab = format!("{here}?tab=payouts");
    let page = browser.get(&tab).await;
    assert!(page.body.contains("data-verification=\"pending\""), "{}", page.body);
    let page = browser
        .submit(&format!("/admin/organizations/{org}/verification/approve"), &[("csrf", &csrf), ("back", &tab)])
        .await;
    assert!(page.body.contains("data-verification=\"verified\""), "{}", page.body);
    let (_, verification) = server.get(&format!("/v1/organizations/{org}/verification"), &server.admin).await;
    assert_eq!(verification["status"], "verified");

    // Every tab renders.
    for tab in ["billing", "webhooks", "settings"] {
        let page = browser.get(&format!("{here}?tab={tab}")).await;
        assert_eq!(page.status, StatusCode::OK, "{tab}: {}", page.body);
    }
    for path in [format!("/admin/wallets/{wallet}/movements"), "/admin/settings".to_string()] {
        let page = browser.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
    }
    let page = browser.get(&format!("/admin/wallets/{wallet}/movements?kind=adjustment_credit")).await;
    assert!(page.body.contains("25.50 USD"), "{}", page.body);

    // Signing out ends the session.
    let out = browser.post("/admin/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    let page = browser.get("/admin").await;
    assert_eq!(page.location.as_deref(), Some("/admin/login"));
}

#[tokio::test]
async fn forms_without_the_session_csrf_token_are_refused_and_change_nothing() {
    let server = Server::start().await;
    let (_, wallet, _) = server.organization("Initech").await;
    let mut browser = admin(&server).await;
    for csrf in [None, Some("0000"), Some("")] {
        let mut form = vec![("direction", "credit"), ("amount", "5"), ("reason", "x"), ("nonce", "ab")];
        if let Some(csrf) = csrf {
            form.push(("csrf", csrf));
        }
        let page = browser.post(&format!("/admin/wallets/{wallet}/adjust"), &form).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
        assert!(page.body.contains("CSRF"));
    }
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "0.00");
    // Without a session at all, a form goes to sign-in and changes nothing.
    let mut stranger = Browser::new(&server.base);
    let page = stranger.post(&format!("/admin/wallets/{wallet}/adjust"), &[("amount", "5")]).await;
    assert_eq!(page.location.as_deref(), Some("/admin/login"));
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "0.00");
    // An organization's API key cannot sign in to the admin portal.
    let (_, _, key) = server.organization("Umbrella").await;
    let page = stranger.post("/admin/login", &[("key", &key)]).await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
}

async fn portal_link(server: &Server, key: &str, org: &str) -> (StatusCode, serde_json::Value) {
    server.post("/v1/portal-sessions", key, None, json!({"organization": org})).await
}

#[tokio::test]
async fn a_portal_link_works_once_and_a_customer_sees_only_its_own_wallets() {
    let server = Server::start().await;
    let (org, wallet, _) = server.organization("Consumer One").await;
    let (other, other_wallet, other_key) = server.organization("Consumer Two").await;
    server.credit(&wallet, "7", "c1").await;

    // Another organization's key cannot make a link for this one (it does not serve it).
    let (status, _) = portal_link(&server, &other_key, &org).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, link) = portal_link(&server, &server.admin, &org).await;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with(&server.base), "{url}");

    let mut customer = Browser::new(&server.base);
    // Fetching the link (as a mail scanner would) shows a button and uses nothing up.
    for _ in 0..2 {
        let page = customer.get(url).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        assert!(customer.cookie.is_none());
    }
    let token = customer.get(url).await.hidden("token");
    let home = customer.submit("/portal/enter", &[("token", &token)]).await;
    assert_eq!(home.status, StatusCode::OK);
    let home = customer.get("/portal").await;
    assert_eq!(home.status, StatusCode::OK);
    assert!(home.body.contains("7.00 USD") && home.body.contains(&wallet), "{}", home.body);

    // The link is single use, even for another browser.
    let mut second = Browser::new(&server.base);
    let again = second.post("/portal/enter", &[("token", &token)]).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN);
    assert!(second.cookie.is_none());
    let again = second.get("/portal").await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    // A made-up token is refused the same way.
    assert_eq!(second.post("/portal/enter", &[("token", "abc")]).await.status, StatusCode::FORBIDDEN);

    // The customer cannot see another organization's wallet, nor its movements.
    for path in [
        format!("/portal/wallets/{other_wallet}"),
        format!("/portal/wallets/{other_wallet}/movements"),
        format!("/portal/wallets/{other_wallet}/statement?from=2026-01-01T00:00:00Z&until=2030-01-01T00:00:00Z"),
    ] {
        let page = customer.get(&path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}: {}", page.body);
        assert!(!page.body.contains("Consumer Two"));
    }
    let page = customer.get(&format!("/portal/wallets/{wallet}")).await;
    assert_eq!(page.status, StatusCode::OK);
    // ... nor add a payment method for it: the organization comes from the session.
    let csrf = page.hidden("csrf");
    customer.submit("/portal/payment-methods", &[("csrf", &csrf), ("token", "pm_card_visa"), ("nonce", "cd")]).await;
    let (_, theirs) = server.get(&format!("/v1/organizations/{other}/payment-methods"), &server.admin).await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
    let (_, ours) = server.get(&format!("/v1/organizations/{org}/payment-methods"), &server.admin).await;
    assert_eq!(ours["data"].as_array().unwrap().len(), 1);

    // Signing out ends the session and its key, which was never stored.
    let (_, keys) = server.get("/v1/api-keys", &server.admin).await;
    assert!(keys["data"].as_array().unwrap().iter().all(|k| k["name"] != "customer portal session"), "{keys}");
    let out = customer.post("/portal/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(customer.get("/portal").await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_merchant_makes_links_only_for_its_subscribers() {
    let server = Server::start().await;
    let (status, merchant) = server
        .post(
            "/v1/organizations",
            &server.admin,
            None,
            json!({"name": "Merchant", "roles": {"merchant": true, "consumer": false}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{merchant}");
    let merchant = merchant["id"].as_str().unwrap().to_string();
    let (_, key) = server.post("/v1/api-keys", &server.admin, None, json!({"organization": merchant})).await;
    let merchant_key = key["secret"].as_str().unwrap().to_string();
    let (consumer, _, _) = server.organization("Subscriber").await;
    let (stranger, _, _) = server.organization("Stranger").await;
    let (status, meter) = server
        .post("/v1/meters", &merchant_key, None, json!({"code": "calls", "unit": "call", "aggregation": "count"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{meter}");
    let (status, plan) = server
        .post(
            "/v1/plans",
            &merchant_key,
            None,
            json!({"name": "Basic", "currency": "USD", "billing_period": "month",
                   "prices": [{"meter": "calls", "model": "per_unit", "unit_price": "0.01"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    let (status, subscription) =
        server.post("/v1/subscriptions", &server.admin, None, json!({"consumer": consumer, "plan": plan["id"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{subscription}");
    assert_eq!(portal_link(&server, &merchant_key, &consumer).await.0, StatusCode::CREATED);
    assert_eq!(portal_link(&server, &merchant_key, &stranger).await.0, StatusCode::NOT_FOUND);
    assert_eq!(portal_link(&server, &merchant_key, &merchant).await.0, StatusCode::CREATED);
    // Once the subscription is canceled, the merchant can no longer make links for it.
    let id = subscription["id"].as_str().unwrap();
    let (status, body) = server
        .post(&format!("/v1/subscriptions/{id}/cancel"), &server.admin, None, json!({"at_period_end": false}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(portal_link(&server, &merchant_key, &consumer).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_customer_tops_up_with_a_preset_sees_taxes_first_then_the_receipt() {
    let server = Server::start().await;
    let (org, wallet, _) = server.organization("Buyer").await;
    let billing = json!({"legal_name": "Buyer Inc", "email": "b@example.com", "address": "1 Main St", "country": "US", "region": "CA"});
    let (status, body) = server
        .call("PUT", &format!("/v1/organizations/{org}/billing-details"), &server.admin, None, Some(billing))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server
        .call(
            "PUT",
            "/v1/tax-profiles",
            &server.admin,
            None,
            Some(json!({"country": "US", "subdivision": "CA", "taxes": [{"name": "Sales tax", "rate": "0.1"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server
        .call(
            "PUT",
            &format!("/v1/wallets/{wallet}/top-up-limits"),
            &server.admin,
            None,
            Some(json!({"presets": ["20", "50"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, link) = portal_link(&server, &server.admin, &org).await;
    let mut customer = Browser::new(&server.base);
    let token = customer.get(link["url"].as_str().unwrap()).await.hidden("token");
    customer.submit("/portal/enter", &[("token", &token)]).await;

    let page = customer.get(&format!("/portal/wallets/{wallet}")).await;
    assert!(page.body.contains("Add a payment method below"), "{}", page.body);
    let csrf = page.hidden("csrf");
    let page = customer
        .submit(
            "/portal/payment-methods",
            &[
                ("csrf", &csrf),
                ("token", "pm_card_visa"),
                ("nonce", "0a"),
                ("back", &format!("/portal/wallets/{wallet}")),
            ],
        )
        .await;
    assert!(page.body.contains("Payment method added."), "{}", page.body);
    assert!(page.body.contains("value=\"20.00\"") && page.body.contains("value=\"50.00\""), "{}", page.body);
    let method = {
        let marker = "<option value=\"pm_";
        let start = page.body.find(marker).unwrap() + "<option value=\"".len();
        page.body[start..].split('"').next().unwrap().to_string()
    };

    // Review: the taxes and total are shown before paying, and nothing is charged yet.
    let review = customer
        .post(
            &format!("/portal/wallets/{wallet}/top-up/review"),
            &[("csrf", &csrf), ("preset", "20.00"), ("custom", ""), ("payment_method", &method)],
        )
        .await;
    assert_eq!(review.status, StatusCode::OK, "{}", review.body);
    assert!(
        review.body.contains("Sales tax") && review.body.contains("2.00 USD") && review.body.contains("22.00 USD"),
        "{}",
        review.body
    );
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "0.00");

    // Pay: the top-up page shows success and the receipt.
    let nonce = review.hidden("nonce");
    let pay =
        [("csrf", csrf.as_str()), ("nonce", nonce.as_str()), ("amount", "20.00"), ("payment_method", method.as_str())];
    let page = customer.submit(&format!("/portal/wallets/{wallet}/top-up"), &pay).await;
    assert!(page.body.contains("data-status=\"succeeded\""), "{}", page.body);
    assert!(page.body.contains("Receipt R-"), "{}", page.body);
    assert!(page.body.contains("22.00 USD"));
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "20.00");
    // Paying the same reviewed form again does not charge twice.
    customer.submit(&format!("/portal/wallets/{wallet}/top-up"), &pay).await;
    assert_eq!(wallet_json(&server, &wallet).await["balance"], "20.00");

    // The movement and the receipt download.
    let page = customer.get(&format!("/portal/wallets/{wallet}")).await;
    assert!(page.body.contains("top_up") && page.body.contains("20.00 USD"), "{}", page.body);
    let top_up = {
        let start = page.body.find("/portal/top-ups/").unwrap() + "/portal/top-ups/".len();
        page.body[start..].split('"').next().unwrap().to_string()
    };
    let response = customer
        .client
        .get(format!("{}/portal/top-ups/{top_up}/receipt", server.base))
        .header("Cookie", customer.cookie.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[CONTENT_DISPOSITION].to_str().unwrap().starts_with("attachment"));
    assert!(response.text().await.unwrap().contains("Receipt R-"));

    // A custom amount below the currency's minor unit is refused with the API's reason.
    let page = customer
        .submit(
            &format!("/portal/wallets/{wallet}/top-up/review"),
            &[("csrf", &csrf), ("preset", "custom"), ("custom", "1.234"), ("payment_method", &method)],
        )
        .await;
    assert!(page.body.contains("amount_not_in_minor_units"), "{}", page.body);

    // The statement and its CSV.
    let page = customer
        .get(&format!("/portal/wallets/{wallet}/statement?from=2020-01-01T00:00:00Z&until=2100-01-01T00:00:00Z"))
        .await;
    assert!(page.body.contains("Closing balance") && page.body.contains("20.00 USD"), "{}", page.body);
    let csv = customer
        .get(&format!("/portal/wallets/{wallet}/statement.csv?from=2020-01-01T00:00:00Z&until=2100-01-01T00:00:00Z"))
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.body.contains("20.00"), "{}", csv.body);

    // Automatic top-up on, then off.
    let page = customer
        .submit(
            &format!("/portal/wallets/{wallet}/auto-top-up"),
            &[
                ("csrf", &csrf),
                ("threshold", "5"),
                ("amount", "20"),
                ("max_amount_per_day", "100"),
                ("payment_method", &method),
            ],
        )
        .await;
    assert!(
        page.body.contains("Automatic top-up saved.") && page.body.contains("On: when available falls below"),
        "{}",
        page.body
    );
    let page =
        customer.submit(&format!("/portal/wallets/{wallet}/auto-top-up"), &[("csrf", &csrf), ("off", "1")]).await;
    assert!(page.body.contains("Off."), "{}", page.body);
}
