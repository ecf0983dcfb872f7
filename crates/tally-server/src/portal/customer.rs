//! The customer portal: a consumer organization manages its own wallets, reached by a
//! one-time link from `POST /v1/portal-sessions`.

use super::admin::{movement_filters, movement_query, statement_body, statement_download};
use super::html::{self, money, text};
use super::{
    encode, see_other, session_cookie, Fields, FormData, Page, Portal, Role, Signed, CUSTOMER_SESSION_TTL,
    PORTAL_COOKIE,
};
use axum::extract::{Form, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The sandbox provider's test payment methods, offered when adding one.
const SANDBOX_TOKENS: [(&str, &str); 4] = [
    ("pm_card_visa", "Visa test card"),
    ("pm_card_mastercard", "Mastercard test card"),
    ("pm_card_declined", "Test card that is declined"),
    ("pm_bank_account", "Test bank account"),
];

pub(super) fn routes() -> Router<Portal> {
    Router::new()
        .route("/portal", get(home))
        .route("/portal/enter", get(enter_page).post(enter))
        .route("/portal/logout", post(logout))
        .route("/portal/payment-methods", post(add_method))
        .route("/portal/wallets/{id}", get(wallet))
        .route("/portal/wallets/{id}/movements", get(movements))
        .route("/portal/wallets/{id}/statement", get(statement))
        .route("/portal/wallets/{id}/statement.csv", get(statement_csv))
        .route("/portal/wallets/{id}/top-up/review", post(review_top_up))
        .route("/portal/wallets/{id}/top-up", post(top_up))
        .route("/portal/wallets/{id}/auto-top-up", post(auto_top_up))
        .route("/portal/top-ups/{id}", get(show_top_up))
        .route("/portal/top-ups/{id}/receipt", get(download_receipt))
}

fn signed_in(portal: &Portal, headers: &HeaderMap) -> Result<(Signed, String), Response> {
    let signed = portal.signed(headers, PORTAL_COOKIE).ok_or_else(|| {
        html::problem(
            StatusCode::UNAUTHORIZED,
            "Your session has ended. Ask the service you use for a new link to your wallet portal.",
        )
    })?;
    match signed.session.role.clone() {
        Role::Customer(organization) => Ok((signed, organization.to_string())),
        Role::Admin => Err(html::problem(StatusCode::UNAUTHORIZED, "This is not a customer session.")),
    }
}

/// A signed-in customer and its organization's id; anyone else gets a page saying the
/// session has ended.
struct Customer(Signed, String);

impl FromRequestParts<Portal> for Customer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, portal: &Portal) -> Result<Customer, Response> {
        signed_in(portal, &parts.headers).map(|(signed, organization)| Customer(signed, organization))
    }
}

/// A signed-in customer's form, its CSRF token checked against the session's.
struct CustomerForm(Signed, String, Fields);

impl FromRequest<Portal> for CustomerForm {
    type Rejection = Response;

    async fn from_request(request: Request, portal: &Portal) -> Result<CustomerForm, Response> {
        let (signed, organization) = signed_in(portal, request.headers())?;
        let Form(form) = FormData::from_request(request, portal).await.map_err(IntoResponse::into_response)?;
        let fields = Fields::checked(&signed.session, form)?;
        Ok(CustomerForm(signed, organization, fields))
    }
}

fn nav(signed: &Signed) -> Markup {
    html! {
        nav aria-label="Portal" { a href="/portal" { "My wallets" } }
        form.inline method="post" action="/portal/logout" {
            input type="hidden" name="csrf" value=(signed.session.csrf);
            button.secondary type="submit" { "Sign out" }
        }
    }
}

fn page(signed: &Signed, title: &str, body: Markup) -> Response {
    html::page(title, nav(signed), Some(&signed.session), body)
}

/// The link opens a page with one button; only pressing it (a same-site POST) uses the
/// link. So link scanners and previews that fetch it do not use it up, and the session
/// cookie (SameSite=Strict) is set by a same-site request, which browsers then send.
async fn enter_page(Query(query): Query<HashMap<String, String>>) -> Response {
    let token = query.get("token").map(String::as_str).unwrap_or("");
    let body = html! {
        h1 { "Your wallet portal" }
        p { "This link opens your wallets. It works once and for 15 minutes." }
        form method="post" action="/portal/enter" {
            input type="hidden" name="token" value=(token);
            button type="submit" { "Open my wallets" }
        }
    };
    let mut response = html::page("Open the portal", html! {}, None, body);
    response.headers_mut().insert("referrer-policy", header::HeaderValue::from_static("no-referrer"));
    response
}

async fn enter(State(portal): State<Portal>, headers: HeaderMap, Form(form): FormData) -> Response {
    let token = form.get("token").map(String::as_str).unwrap_or("");
    let Some(organization) = (token.len() <= 128).then(|| portal.app.portal.redeem_link(token)).flatten() else {
        return html::problem(
            StatusCode::FORBIDDEN,
            "This portal link has already been used or has expired. Ask for a new one.",
        );
    };
    let now = portal.app.now();
    let expires_at = now + CUSTOMER_SESSION_TTL.as_millis() as i64;
    // The session's key lives in memory only, like the session, and ends with it.
    let key = crate::generate_key(Some(organization), true, "customer portal session", now, Some(expires_at));
    let key = portal.app.keys.insert_ephemeral(key, now);
    let id = portal.app.portal.start(Role::Customer(organization), key.secret, key.record.id, CUSTOMER_SESSION_TTL);
    let mut response = see_other("/portal");
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(PORTAL_COOKIE, "/portal", &id, Some(CUSTOMER_SESSION_TTL), super::is_https(&headers)),
    );
    response
}

async fn logout(State(portal): State<Portal>, headers: HeaderMap, Form(form): FormData) -> Page {
    let (signed, _) = signed_in(&portal, &headers)?;
    Fields::checked(&signed.session, form)?;
    if let Some(session) = portal.app.portal.end(&signed.id) {
        portal.app.keys.forget(session.key_id);
    }
    let mut response =
        html::problem(StatusCode::OK, "You are signed out. Use a new link from the service to come back.");
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(PORTAL_COOKIE, "/portal", "", Some(std::time::Duration::ZERO), super::is_https(&headers)),
    );
    Ok(response)
}

async fn home(State(portal): State<Portal>, Customer(signed, organization): Customer) -> Page {
    let org = portal.get(&signed.session, &format!("/v1/organizations/{organization}")).await;
    let wallets = portal.get(&signed.session, &format!("/v1/organizations/{organization}/wallets")).await;
    if !wallets.ok() {
        return Err(html::refused(&wallets));
    }
    let body = html! {
        h1 { "Wallets of " (text(&org.body["name"])) }
        @if wallets.list().is_empty() { p.muted { "You have no wallets yet." } }
        @for wallet in wallets.list() {
            section.card data-wallet=(text(&wallet["id"])) {
                h2 { a href={ "/portal/wallets/" (text(&wallet["id"])) } { (text(&wallet["currency"])) " wallet" } }
                (html::figures(&wallet))
                h3 { "Credit grants" }
                (html::grants(&wallet))
            }
        }
    };
    Ok(page(&signed, "My wallets", body))
}

async fn wallet(
    State(portal): State<Portal>,
    Customer(signed, organization): Customer,
    Path(id): Path<String>,
) -> Page {
    let session = &signed.session;
    let wallet = portal.wallet(&signed.session, &id).await?;
    let currency = text(&wallet["currency"]);
    let settings = portal.get(session, &format!("/v1/wallets/{}/payment-settings", encode(&id))).await.body;
    let methods = portal.get(session, &format!("/v1/organizations/{organization}/payment-methods")).await.list();
    let top_ups = portal.get(session, &format!("/v1/wallets/{}/top-ups", encode(&id))).await.list();
    let recent = portal.get(session, &format!("/v1/wallets/{}/movements?limit=10", encode(&id))).await.list();
    let presets: Vec<String> = settings["presets"].as_array().into_iter().flatten().map(text).collect();
    let auto = &settings["auto_top_up"];
    let body = html! {
        h1 { (currency) " wallet" }
        p.muted { code { (id) } }
        (html::figures(&wallet))
        section.card {
            h2 { "Top up" }
            @if methods.is_empty() {
                p { "Add a payment method below to top up." }
            } @else {
                form method="post" action={ "/portal/wallets/" (id) "/top-up/review" } {
                    (html::hidden(session))
                    fieldset {
                        legend { "Amount (" (currency) ")" }
                        @for (i, preset) in presets.iter().enumerate() {
                            label { input type="radio" name="preset" value=(preset) checked[i == 0]; " " (preset) " " (currency) } " "
                        }
                        label { input type="radio" name="preset" value="custom" checked[presets.is_empty()]; " Other amount: " }
                        label for="custom-amount" class="muted" { "custom amount" }
                        input id="custom-amount" name="custom" inputmode="decimal" size="10";
                    }
                    p { label for="top-up-method" { "Pay with " }
                        select id="top-up-method" name="payment_method" {
                            @for m in &methods {
                                option value=(text(&m["id"])) selected[m["default"].as_bool() == Some(true)] { (method_label(m)) }
                            }
                        }
                    }
                    @if let Some(min) = settings["min_top_up"].as_str() { p.muted { "At least " (min) " " (currency) "." } }
                    button type="submit" { "Review top-up" }
                }
            }
            h3 { "Payment methods" }
            @if methods.is_empty() { p.muted { "None yet." } } @else {
                ul { @for m in &methods { li { (method_label(m)) @if m["default"].as_bool() == Some(true) { " (default)" } } } }
            }
            form.row method="post" action="/portal/payment-methods" {
                (html::hidden(session))
                input type="hidden" name="back" value={ "/portal/wallets/" (id) };
                label { "Add a payment method"
                    select name="token" { @for (token, label) in SANDBOX_TOKENS { option value=(token) { (label) } } }
                }
                button.secondary type="submit" { "Add" }
            }
        }
        section.card {
            h2 { "Automatic top-up" }
            @if auto.is_object() {
                p { "On: when available falls below " strong { (text(&auto["threshold"])) " " (currency) } ", top up "
                    @if let Some(amount) = auto["amount"].as_str() { "by " (amount) " " (currency) }
                    @if let Some(target) = auto["target_balance"].as_str() { "to " (target) " " (currency) }
                    ", at most " (text(&auto["max_per_day"])) " times and " (text(&auto["max_amount_per_day"])) " " (currency) " a day."
                    @if auto["enabled"].as_bool() == Some(false) { " It is paused after failed payments." } }
            } @else {
                p.muted { "Off." }
            }
            @if !methods.is_empty() {
                form.row method="post" action={ "/portal/wallets/" (id) "/auto-top-up" } {
                    (html::hidden(session))
                    label { "When available is below" input name="threshold" required size="8" value=(text(&auto["threshold"])); }
                    label { "Top up by" input name="amount" required size="8" value=(text(&auto["amount"])); }
                    label { "At most per day (" (currency) ")" input name="max_amount_per_day" required size="8" value=(text(&auto["max_amount_per_day"])); }
                    label { "Pay with" select name="payment_method" { @for m in &methods { option value=(text(&m["id"])) { (method_label(m)) } } } }
                    button type="submit" { "Save automatic top-up" }
                }
                @if auto.is_object() {
                    form.row method="post" action={ "/portal/wallets/" (id) "/auto-top-up" } {
                        (html::hidden(session))
                        input type="hidden" name="off" value="1";
                        button.secondary type="submit" { "Turn automatic top-up off" }
                    }
                }
            }
        }
        section.card {
            h2 { "Credit grants" }
            (html::grants(&wallet))
        }
        section.card {
            h2 { "Recent movements" }
            (html::movements(&recent))
            p { a href={ "/portal/wallets/" (id) "/movements" } { "All movements" } " · "
                a href={ "/portal/wallets/" (id) "/statement" } { "Statements" } }
        }
        section.card {
            h2 { "Top-ups and receipts" }
            @if top_ups.is_empty() { p.muted { "No top-ups yet." } } @else {
                table {
                    thead { tr { th { "Top-up" } th { "Date" } th.num { "Amount" } th.num { "Total paid" } th { "Status" } th { "Receipt" } } }
                    tbody { @for t in &top_ups { tr {
                        td { a href={ "/portal/top-ups/" (text(&t["id"])) } { code { (text(&t["id"])) } } }
                        td { (text(&t["created_at"])) }
                        td.num { (money(&t["amount"], &t["currency"])) }
                        td.num { (money(&t["total"], &t["currency"])) }
                        td { (text(&t["status"])) }
                        td { @if let Some(number) = t["receipt_number"].as_str() {
                            a href={ "/portal/top-ups/" (text(&t["id"])) } { "Receipt " (number) }
                        } }
                    } } }
                }
            }
        }
    };
    Ok(page(&signed, &format!("{currency} wallet"), body))
}

fn method_label(method: &Value) -> String {
    let brand = text(&method["brand"]);
    let kind = if brand.is_empty() { text(&method["type"]) } else { brand };
    format!("{kind} ending in {}", text(&method["last4"]))
}

/// The amount a top-up form asks for: the chosen preset or the custom amount.
fn chosen_amount(fields: &Fields) -> String {
    match fields.get("preset") {
        "" | "custom" => fields.get("custom").to_string(),
        preset => preset.to_string(),
    }
}

async fn review_top_up(
    State(portal): State<Portal>,
    Path(id): Path<String>,
    CustomerForm(signed, _, fields): CustomerForm,
) -> Page {
    let amount = chosen_amount(&fields);
    let uri = format!("/v1/wallets/{}/top-up-quote?amount={}", encode(&id), encode(&amount));
    let quote = portal.get(&signed.session, &uri).await;
    if !quote.ok() {
        portal.flash(&signed, false, quote.message());
        return Ok(see_other(&format!("/portal/wallets/{}", encode(&id))));
    }
    let q = &quote.body;
    let body = html! {
        h1 { "Review your top-up" }
        section.card {
            table {
                tbody {
                    tr { td { "Added to your wallet" } td.num { (money(&q["amount"], &q["currency"])) } }
                    @for tax in q["taxes"].as_array().into_iter().flatten() {
                        tr { td { (text(&tax["name"])) } td.num { (money(&tax["amount"], &q["currency"])) } }
                    }
                    tr { th { "Total charged" } th.num data-figure="total" { (money(&q["total"], &q["currency"])) } }
                }
            }
            form.row method="post" action={ "/portal/wallets/" (id) "/top-up" } {
                (html::hidden(&signed.session))
                input type="hidden" name="amount" value=(text(&q["amount"]));
                input type="hidden" name="payment_method" value=(fields.get("payment_method"));
                button type="submit" { "Pay " (text(&q["total"])) " " (text(&q["currency"])) }
                a href={ "/portal/wallets/" (id) } { "Cancel" }
            }
        }
    };
    Ok(page(&signed, "Review top-up", body))
}

async fn top_up(
    State(portal): State<Portal>,
    Path(id): Path<String>,
    CustomerForm(signed, _, fields): CustomerForm,
) -> Page {
    let body = json!({"amount": fields.get("amount"), "payment_method": fields.optional("payment_method")});
    let uri = format!("/v1/wallets/{}/top-ups", encode(&id));
    let reply = portal.call(&signed.session, Method::POST, &uri, fields.idempotency().as_deref(), Some(body)).await;
    if !reply.ok() {
        portal.flash(&signed, false, reply.message());
        return Ok(see_other(&format!("/portal/wallets/{}", encode(&id))));
    }
    let top_up = text(&reply.body["id"]);
    match reply.body["status"].as_str() {
        Some("succeeded") => portal.flash(&signed, true, "Payment received: your wallet is topped up."),
        Some("failed") => {
            portal.flash(&signed, false, format!("The payment failed: {}", text(&reply.body["failure_message"])))
        }
        _ => portal.flash(&signed, true, "Payment is being processed; this page shows when it completes."),
    }
    Ok(see_other(&format!("/portal/top-ups/{}", encode(&top_up))))
}

async fn show_top_up(State(portal): State<Portal>, Customer(signed, _): Customer, Path(id): Path<String>) -> Page {
    let reply = portal.get(&signed.session, &format!("/v1/top-ups/{}", encode(&id))).await;
    if !reply.ok() {
        return Err(html::refused(&reply));
    }
    let t = &reply.body;
    let receipt = if t["receipt_number"].is_string() {
        Some(portal.get(&signed.session, &format!("/v1/top-ups/{}/receipt", encode(&id))).await.body)
    } else {
        None
    };
    let body = html! {
        h1 { "Top-up " code { (id) } }
        p { "Status: " strong data-status=(text(&t["status"])) { (text(&t["status"])) }
            @if let Some(message) = t["failure_message"].as_str() { " — " (message) } }
        p { a href={ "/portal/wallets/" (text(&t["wallet"])) } { "Back to the wallet" } }
        @if let Some(r) = receipt {
            section.card aria-labelledby="receipt" {
                h2 id="receipt" { "Receipt " (text(&r["number"])) }
                p { "Date: " (text(&r["date"])) }
                p { "Billed to: " (text(&r["billed_to"]["legal_name"])) " " (text(&r["billed_to"]["email"])) }
                table { tbody {
                    @for line in r["lines"].as_array().into_iter().flatten() {
                        tr { td { (text(&line["description"])) } td.num { (money(&line["amount"], &r["currency"])) } }
                    }
                    @for tax in r["taxes"].as_array().into_iter().flatten() {
                        tr { td { (text(&tax["name"])) } td.num { (money(&tax["amount"], &r["currency"])) } }
                    }
                    tr { th { "Total" } th.num { (money(&r["total"], &r["currency"])) } }
                } }
                p { "Paid with " (text(&r["payment_method"]["brand"])) " ending in " (text(&r["payment_method"]["last4"])) "." }
                p { a href={ "/portal/top-ups/" (id) "/receipt" } download { "Download receipt" } }
            }
        }
    };
    Ok(page(&signed, "Top-up", body))
}

async fn download_receipt(State(portal): State<Portal>, Customer(signed, _): Customer, Path(id): Path<String>) -> Page {
    let uri = format!("/v1/top-ups/{}/receipt?format=html", encode(&id));
    let response = portal.raw(&signed.session, Method::GET, &uri, None, None).await;
    Ok(super::attachment(response, &format!("receipt-{id}.html")))
}

async fn add_method(State(portal): State<Portal>, CustomerForm(signed, organization, fields): CustomerForm) -> Page {
    let uri = format!("/v1/organizations/{organization}/payment-methods");
    let body = json!({"token": fields.get("token"), "default": true});
    let reply = portal.call(&signed.session, Method::POST, &uri, fields.idempotency().as_deref(), Some(body)).await;
    let back = fields.get("back");
    let back = if back.starts_with("/portal/") && !back.contains(['\r', '\n']) { back } else { "/portal" };
    Ok(portal.after(&signed, &reply, "Payment method added.", back))
}

async fn auto_top_up(
    State(portal): State<Portal>,
    Path(id): Path<String>,
    CustomerForm(signed, _, fields): CustomerForm,
) -> Page {
    let uri = format!("/v1/wallets/{}/auto-top-up", encode(&id));
    let reply = if fields.optional("off").is_some() {
        portal.call(&signed.session, Method::DELETE, &uri, None, None).await
    } else {
        let body = json!({
            "threshold": fields.get("threshold"),
            "amount": fields.get("amount"),
            "payment_method": fields.get("payment_method"),
            "max_amount_per_day": fields.get("max_amount_per_day"),
        });
        portal.call(&signed.session, Method::PUT, &uri, None, Some(body)).await
    };
    Ok(portal.after(&signed, &reply, "Automatic top-up saved.", &format!("/portal/wallets/{}", encode(&id))))
}

async fn movements(
    State(portal): State<Portal>,
    Customer(signed, _): Customer,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    let wallet = portal.wallet(&signed.session, &id).await?;
    let (uri, filters) = movement_query(&id, &query);
    let reply = portal.get(&signed.session, &uri).await;
    let body = html! {
        h1 { "Movements of your " (text(&wallet["currency"])) " wallet" }
        p { a href={ "/portal/wallets/" (id) } { "Back to the wallet" } }
        @if !reply.ok() { p role="alert" { (reply.message()) } }
        (movement_filters(&format!("/portal/wallets/{id}/movements"), &query))
        (html::movements(&reply.list()))
        @if let Some(next) = reply.body["next_cursor"].as_str() {
            p { a href={ "/portal/wallets/" (id) "/movements?before=" (next) (filters) } { "Older movements" } }
        }
    };
    Ok(page(&signed, "Movements", body))
}

async fn statement(
    State(portal): State<Portal>,
    Customer(signed, _): Customer,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    let wallet = portal.wallet(&signed.session, &id).await?;
    let back = format!("/portal/wallets/{}", encode(&id));
    Ok(page(&signed, "Statement", statement_body(&portal, &signed, &wallet, &query, &back, "/portal").await))
}

async fn statement_csv(
    State(portal): State<Portal>,
    Customer(signed, _): Customer,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    Ok(statement_download(&portal, &signed, &id, &query).await)
}
