//! The admin portal: the platform's operators, signed in with an admin API key.

use super::html::{self, money, text};
use super::{
    encode, see_other, session_cookie, Fields, FormData, Page, Portal, Role, Signed, ADMIN_COOKIE, ADMIN_SESSION_TTL,
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

pub(super) fn routes() -> Router<Portal> {
    Router::new()
        .route("/admin", get(organizations))
        .route("/admin/login", get(login_page).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/settings", get(settings))
        .route("/admin/settings/tax-profile", post(set_tax_profile))
        .route("/admin/settings/payout-minimum", post(set_payout_minimum))
        .route("/admin/organizations/{id}", get(organization))
        .route("/admin/organizations/{id}/verification/{decision}", post(decide_verification))
        .route("/admin/organizations/{id}/method-types", post(set_method_types))
        .route("/admin/wallets/{id}/movements", get(movements))
        .route("/admin/wallets/{id}/statement", get(statement))
        .route("/admin/wallets/{id}/statement.csv", get(statement_csv))
        .route("/admin/wallets/{id}/adjust", post(adjust))
        .route("/admin/wallets/{id}/grants", post(grant))
        .route("/admin/wallets/{id}/limits", post(set_limits))
        .route("/admin/holds/{id}/release", post(release_hold))
}

fn nav(signed: Option<&Signed>) -> Markup {
    html! {
        nav aria-label="Admin" {
            a href="/admin" { "Organizations" }
            a href="/admin/settings" { "Platform settings" }
        }
        @if let Some(signed) = signed {
            form.inline method="post" action="/admin/logout" {
                input type="hidden" name="csrf" value=(signed.session.csrf);
                button.secondary type="submit" { "Sign out" }
            }
        }
    }
}

fn signed_in(portal: &Portal, headers: &HeaderMap) -> Result<Signed, Response> {
    portal
        .signed(headers, ADMIN_COOKIE)
        .filter(|s| s.session.role == Role::Admin)
        .ok_or_else(|| see_other("/admin/login"))
}

/// A signed-in admin; anyone else is sent to sign in.
pub(super) struct Admin(Signed);

impl FromRequestParts<Portal> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, portal: &Portal) -> Result<Admin, Response> {
        signed_in(portal, &parts.headers).map(Admin)
    }
}

/// A signed-in admin's form, its CSRF token checked against the session's.
pub(super) struct AdminForm(Signed, Fields);

impl FromRequest<Portal> for AdminForm {
    type Rejection = Response;

    async fn from_request(request: Request, portal: &Portal) -> Result<AdminForm, Response> {
        let signed = signed_in(portal, request.headers())?;
        let Form(form) = FormData::from_request(request, portal).await.map_err(IntoResponse::into_response)?;
        let fields = Fields::checked(&signed.session, form)?;
        Ok(AdminForm(signed, fields))
    }
}

fn page(signed: &Signed, title: &str, body: Markup) -> Response {
    html::page(title, nav(Some(signed)), Some(&signed.session), body)
}

/// Where to go back to after a form: a path inside the admin portal only.
fn back(fields: &Fields, default: &str) -> String {
    let to = fields.get("back");
    if to.starts_with("/admin") && !to.starts_with("//") && !to.contains(['\r', '\n']) {
        to.to_string()
    } else {
        default.to_string()
    }
}

// ---- sign in and out ----

async fn login_page() -> Response {
    let body = html! {
        h1 { "Sign in to the admin portal" }
        form.row method="post" action="/admin/login" {
            label for="key" { "Admin API key"
                input id="key" name="key" type="password" autocomplete="off" required size="70" placeholder="tly_adm_...";
            }
            button type="submit" { "Sign in" }
        }
        p.muted { "The key is checked once and kept on the server for this session; the browser only gets a session cookie." }
    };
    html::page("Sign in", nav(None), None, body)
}

async fn login(State(portal): State<Portal>, headers: HeaderMap, Form(form): FormData) -> Response {
    let key = form.get("key").map(|k| k.trim()).unwrap_or("");
    let caller = portal.app.keys.authenticate(key, portal.app.now());
    let Ok(crate::Caller::Admin { key: key_id }) = caller else {
        return html::problem(StatusCode::UNAUTHORIZED, "That is not a live admin API key.");
    };
    let id = portal.app.portal.start(Role::Admin, key.to_string(), key_id, ADMIN_SESSION_TTL);
    let mut response = see_other("/admin");
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(ADMIN_COOKIE, "/admin", &id, Some(ADMIN_SESSION_TTL), super::is_https(&headers)),
    );
    response
}

async fn logout(State(portal): State<Portal>, headers: HeaderMap, Form(form): FormData) -> Page {
    let signed = signed_in(&portal, &headers)?;
    Fields::checked(&signed.session, form)?;
    portal.app.portal.end(&signed.id);
    let mut response = see_other("/admin/login");
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(ADMIN_COOKIE, "/admin", "", Some(std::time::Duration::ZERO), super::is_https(&headers)),
    );
    Ok(response)
}

// ---- organizations ----

async fn organizations(
    State(portal): State<Portal>,
    Admin(signed): Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    let search = query.get("q").map(|q| q.trim().chars().take(100).collect::<String>()).unwrap_or_default();
    let mut uri = format!("/v1/organizations?limit=50&q={}", encode(&search));
    if let Some(after) = query.get("after") {
        uri.push_str(&format!("&after={}", encode(after)));
    }
    let reply = portal.get(&signed.session, &uri).await;
    if !reply.ok() {
        return Err(html::refused(&reply));
    }
    let items = reply.list();
    let body = html! {
        h1 { "Organizations" }
        form.row method="get" action="/admin" role="search" {
            label for="q" { "Search by name" input id="q" name="q" type="search" value=(search) maxlength="100"; }
            button type="submit" { "Search" }
        }
        @if items.is_empty() {
            p.muted { "No organizations match." }
        } @else {
            table {
                thead { tr { th { "Name" } th { "Id" } th { "Roles" } th.num { "Wallets" } } }
                tbody {
                    @for org in &items {
                        tr {
                            td { a href={ "/admin/organizations/" (text(&org["id"])) } { (text(&org["name"])) } }
                            td { code { (text(&org["id"])) } }
                            td { (roles(org)) }
                            td.num { (org["wallets"].as_array().map_or(0, Vec::len)) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = reply.body["next_cursor"].as_str() {
            p { a href={ "/admin?q=" (encode(&search)) "&after=" (next) } { "Next page" } }
        }
    };
    Ok(page(&signed, "Organizations", body))
}

fn roles(org: &Value) -> String {
    let mut roles = Vec::new();
    if org["roles"]["merchant"].as_bool() == Some(true) {
        roles.push("merchant");
    }
    if org["roles"]["consumer"].as_bool() == Some(true) {
        roles.push("consumer");
    }
    roles.join(", ")
}

const TABS: [(&str, &str); 5] = [
    ("wallets", "Wallets"),
    ("billing", "Subscriptions and statements"),
    ("payouts", "Verification and payouts"),
    ("webhooks", "Webhooks"),
    ("settings", "Settings"),
];

async fn organization(
    State(portal): State<Portal>,
    Admin(signed): Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    let reply = portal.get(&signed.session, &format!("/v1/organizations/{}", encode(&id))).await;
    if !reply.ok() {
        return Err(html::refused(&reply));
    }
    let org = reply.body;
    let tab = query.get("tab").map(String::as_str).filter(|t| TABS.iter().any(|(k, _)| k == t)).unwrap_or("wallets");
    let here = format!("/admin/organizations/{}?tab={tab}", encode(&id));
    let content = match tab {
        "billing" => billing_tab(&portal, &signed, &id).await,
        "payouts" => payouts_tab(&portal, &signed, &id, &here).await,
        "webhooks" => webhooks_tab(&portal, &signed, &id).await,
        "settings" => settings_tab(&portal, &signed, &id, &here).await,
        _ => wallets_tab(&portal, &signed, &id, &here).await,
    };
    let body = html! {
        h1 { (text(&org["name"])) }
        p.muted { code { (text(&org["id"])) } " · " (roles(&org))
            @if let Some(billing) = org["billing_details"].as_object() {
                " · " (billing.get("country").map(text).unwrap_or_default())
            }
        }
        nav.tabs aria-label="Organization" {
            @for (key, label) in TABS {
                a href={ "/admin/organizations/" (encode(&id)) "?tab=" (key) } aria-current=[(key == tab).then_some("page")] { (label) }
            }
        }
        (content)
    };
    Ok(page(&signed, &text(&org["name"]), body))
}

async fn wallets_tab(portal: &Portal, signed: &Signed, org: &str, here: &str) -> Markup {
    let session = &signed.session;
    let wallets = portal.get(session, &format!("/v1/organizations/{}/wallets", encode(org))).await;
    if !wallets.ok() {
        return html! { p role="alert" { (wallets.message()) } };
    }
    let mut cards = Vec::new();
    for wallet in wallets.list() {
        let id = text(&wallet["id"]);
        let holds = portal.get(session, &format!("/v1/wallets/{id}/holds")).await.list();
        let settings = portal.get(session, &format!("/v1/wallets/{id}/payment-settings")).await.body;
        cards.push(wallet_card(session, &wallet, &holds, &settings, here));
    }
    html! {
        @if cards.is_empty() { p.muted { "This organization has no wallets." } }
        @for card in cards { (card) }
    }
}

fn wallet_card(session: &super::Session, wallet: &Value, holds: &[Value], settings: &Value, here: &str) -> Markup {
    let id = text(&wallet["id"]);
    let currency = text(&wallet["currency"]);
    let presets: Vec<String> = settings["presets"].as_array().into_iter().flatten().map(text).collect();
    html! {
        section.card aria-labelledby={ "w-" (id) } data-wallet=(id) {
            h2 id={ "w-" (id) } { (currency) " wallet " code { (id) } " " span.muted { "(" (text(&wallet["status"])) ")" } }
            (html::figures(wallet))
            p { a href={ "/admin/wallets/" (id) "/movements" } { "Movements" } " · "
                a href={ "/admin/wallets/" (id) "/statement" } { "Statement" } }
            h3 { "Adjust" }
            form.row method="post" action={ "/admin/wallets/" (id) "/adjust" } {
                (html::hidden(session))
                input type="hidden" name="back" value=(here);
                label { "Direction"
                    select name="direction" { option value="credit" { "Credit" } option value="debit" { "Debit" } }
                }
                label { "Amount (" (currency) ")" input name="amount" required inputmode="decimal" size="12"; }
                label { "Source (credits)"
                    select name="source" { option value="funding" { "Funding" } option value="promotions" { "Promotions" } }
                }
                label { "Reason" input name="reason" required maxlength="200" size="28"; }
                button type="submit" { "Apply adjustment" }
            }
            h3 { "Active holds" }
            @if holds.is_empty() {
                p.muted { "No active holds." }
            } @else {
                table {
                    thead { tr { th { "Hold" } th.num { "Amount" } th { "Exclusive" } th { "Expires" } th { span.muted { "Action" } } } }
                    tbody {
                        @for hold in holds {
                            tr {
                                td { code { (text(&hold["id"])) } }
                                td.num { (money(&hold["amount"], &hold["currency"])) }
                                td { (if hold["exclusive"].as_bool() == Some(true) { "yes" } else { "no" }) }
                                td { (text(&hold["expires_at"])) }
                                td {
                                    form.inline method="post" action={ "/admin/holds/" (text(&hold["id"])) "/release" } {
                                        (html::hidden(session))
                                        input type="hidden" name="back" value=(here);
                                        button.secondary type="submit" aria-label={ "Release hold " (text(&hold["id"])) } { "Release" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h3 { "Credit grants" }
            (html::grants(wallet))
            form.row method="post" action={ "/admin/wallets/" (id) "/grants" } {
                (html::hidden(session))
                input type="hidden" name="back" value=(here);
                label { "Amount (" (currency) ")" input name="amount" required inputmode="decimal" size="10"; }
                label { "Category"
                    select name="category" { option value="promotional" { "Promotional" } option value="paid" { "Paid" } }
                }
                label { "Priority" input name="priority" type="number" min="0" max="1000" value="0" size="4"; }
                label { "Expires (RFC 3339, optional)" input name="expires_at" placeholder="2027-01-31T00:00:00Z" size="22"; }
                label { "Reason" input name="reason" maxlength="200" size="20"; }
                button type="submit" { "Grant credit" }
            }
            h3 { "Top-up limits and presets" }
            form.row method="post" action={ "/admin/wallets/" (id) "/limits" } {
                (html::hidden(session))
                input type="hidden" name="back" value=(here);
                label { "Minimum" input name="min_amount" value=(text(&settings["min_top_up"])) size="8"; }
                label { "Maximum" input name="max_amount" value=(text(&settings["max_top_up"])) size="8"; }
                label { "Preset amounts (comma-separated)" input name="presets" value=(presets.join(", ")) size="24"; }
                button type="submit" { "Save limits" }
            }
        }
    }
}

async fn billing_tab(portal: &Portal, signed: &Signed, org: &str) -> Markup {
    let session = &signed.session;
    let mut subscriptions = portal.get(session, &format!("/v1/subscriptions?consumer={}", encode(org))).await.list();
    subscriptions.extend(portal.get(session, &format!("/v1/subscriptions?merchant={}", encode(org))).await.list());
    let mut usage = Vec::new();
    for subscription in &subscriptions {
        usage.push(portal.get(session, &format!("/v1/subscriptions/{}/usage", text(&subscription["id"]))).await.body);
    }
    let wallets = portal.get(session, &format!("/v1/organizations/{}/wallets", encode(org))).await.list();
    html! {
        h2 { "Subscriptions" }
        @if subscriptions.is_empty() { p.muted { "No subscriptions as consumer or merchant." } }
        @for (subscription, summary) in subscriptions.iter().zip(&usage) {
            section.card {
                h3 { "Subscription " code { (text(&subscription["id"])) } " · " (text(&subscription["status"])) }
                p { "Consumer " code { (text(&subscription["consumer"])) } ", merchant " code { (text(&subscription["merchant"])) }
                    ", plan " code { (text(&subscription["plan"])) } ". Period "
                    (text(&subscription["current_period_start"])) " to " (text(&subscription["current_period_end"])) "." }
                h4 { "Usage this period" }
                table {
                    thead { tr { th { "Meter" } th { "Dimension" } th.num { "Quantity" } th.num { "Events" } th.num { "Amount" } } }
                    tbody {
                        @for line in summary["lines"].as_array().into_iter().flatten() {
                            tr {
                                td { (text(&line["meter"])) } td { (text(&line["dimension"])) }
                                td.num { (text(&line["quantity"])) } td.num { (text(&line["events"])) }
                                td.num { (money(&line["amount"], &summary["currency"])) }
                            }
                        }
                        tr { th colspan="4" { "Total" } td.num { (money(&summary["total"], &summary["currency"])) } }
                    }
                }
            }
        }
        h2 { "Statements" }
        @for wallet in &wallets {
            p { a href={ "/admin/wallets/" (text(&wallet["id"])) "/statement" } { (text(&wallet["currency"])) " wallet statement" } }
        }
    }
}

async fn payouts_tab(portal: &Portal, signed: &Signed, org: &str, here: &str) -> Markup {
    let session = &signed.session;
    let verification = portal.get(session, &format!("/v1/organizations/{}/verification", encode(org))).await.body;
    let accounts = portal.get(session, &format!("/v1/organizations/{}/bank-accounts", encode(org))).await.list();
    let payouts = portal.get(session, &format!("/v1/payouts?organization={}", encode(org))).await.list();
    let status = text(&verification["status"]);
    html! {
        h2 { "Verification" }
        p { "Status: " strong data-verification=(status) { (status) }
            @if let Some(reason) = verification["reason"].as_str() { " — " (reason) } }
        @if status == "pending" {
            form.row method="post" action={ "/admin/organizations/" (encode(org)) "/verification/approve" } {
                (html::hidden(session))
                input type="hidden" name="back" value=(here);
                button type="submit" { "Approve verification" }
            }
            form.row method="post" action={ "/admin/organizations/" (encode(org)) "/verification/reject" } {
                (html::hidden(session))
                input type="hidden" name="back" value=(here);
                label { "Reason for rejecting" input name="reason" required maxlength="200" size="40"; }
                button.secondary type="submit" { "Reject verification" }
            }
        }
        h2 { "Bank accounts" }
        @if accounts.is_empty() { p.muted { "No bank accounts." } } @else {
            table {
                thead { tr { th { "Account" } th { "Holder" } th { "Country" } th { "Currency" } th { "Ending" } th { "Status" } } }
                tbody { @for a in &accounts { tr {
                    td { code { (text(&a["id"])) } } td { (text(&a["holder_name"])) } td { (text(&a["country"])) }
                    td { (text(&a["currency"])) } td { "…" (text(&a["last4"])) } td { (text(&a["status"])) }
                } } }
            }
        }
        h2 { "Payouts" }
        @if payouts.is_empty() { p.muted { "No payouts." } } @else {
            table {
                thead { tr { th { "Payout" } th.num { "Amount" } th { "Bank account" } th { "Status" } th { "Created" } } }
                tbody { @for p in &payouts { tr {
                    td { code { (text(&p["id"])) } } td.num { (money(&p["amount"], &p["currency"])) }
                    td { code { (text(&p["bank_account"])) } } td { (text(&p["status"])) } td { (text(&p["created_at"])) }
                } } }
            }
        }
    }
}

async fn webhooks_tab(portal: &Portal, signed: &Signed, org: &str) -> Markup {
    let session = &signed.session;
    let endpoints: Vec<Value> = portal
        .get(session, "/v1/webhook-endpoints")
        .await
        .list()
        .into_iter()
        .filter(|e| e["organization"].as_str() == Some(org))
        .collect();
    let mut deliveries = Vec::new();
    for endpoint in &endpoints {
        let reply = portal.get(session, &format!("/v1/webhook-endpoints/{}/deliveries", text(&endpoint["id"]))).await;
        deliveries.push(reply.list().into_iter().take(20).collect::<Vec<_>>());
    }
    html! {
        h2 { "Webhook endpoints" }
        @if endpoints.is_empty() { p.muted { "This organization has no webhook endpoints." } }
        @for (endpoint, recent) in endpoints.iter().zip(&deliveries) {
            section.card {
                h3 { code { (text(&endpoint["id"])) } " " (text(&endpoint["url"])) }
                p { (if endpoint["enabled"].as_bool() == Some(true) { "Enabled" } else { "Disabled" })
                    @if let Some(reason) = endpoint["disabled_reason"].as_str() { " (" (reason) ")" }
                    ". Events: " (endpoint["event_types"].as_array().map(|t| t.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default()) }
                h4 { "Recent deliveries" }
                @if recent.is_empty() { p.muted { "None yet." } } @else {
                    table {
                        thead { tr { th { "Delivery" } th { "Event" } th { "Status" } th.num { "Attempts" } th { "Delivered" } } }
                        tbody { @for d in recent { tr {
                            td { code { (text(&d["id"])) } } td { code { (text(&d["event"])) } } td { (text(&d["status"])) }
                            td.num { (d["attempts"].as_array().map_or(0, Vec::len)) } td { (text(&d["delivered_at"])) }
                        } } }
                    }
                }
            }
        }
    }
}

async fn settings_tab(portal: &Portal, signed: &Signed, org: &str, here: &str) -> Markup {
    let session = &signed.session;
    let methods = portal.get(session, &format!("/v1/organizations/{}/payment-methods", encode(org))).await;
    let allowed: Vec<String> = methods.body["allowed_types"].as_array().into_iter().flatten().map(text).collect();
    let checked = |kind: &str| allowed.iter().any(|t| t == kind);
    html! {
        h2 { "Payment method types" }
        p.muted { "Which kinds of payment method this organization may add and pay with." }
        form.row method="post" action={ "/admin/organizations/" (encode(org)) "/method-types" } {
            (html::hidden(session))
            input type="hidden" name="back" value=(here);
            fieldset {
                legend { "Allowed types" }
                label { input type="checkbox" name="card" value="1" checked[checked("card")]; " Cards" }
                label { input type="checkbox" name="bank_account" value="1" checked[checked("bank_account")]; " Bank accounts" }
            }
            button type="submit" { "Save payment method types" }
        }
        h2 { "Saved payment methods" }
        @if methods.list().is_empty() { p.muted { "None." } } @else {
            table {
                thead { tr { th { "Method" } th { "Type" } th { "Brand" } th { "Ending" } th { "Default" } } }
                tbody { @for m in methods.list() { tr {
                    td { code { (text(&m["id"])) } } td { (text(&m["type"])) } td { (text(&m["brand"])) }
                    td { "…" (text(&m["last4"])) } td { (if m["default"].as_bool() == Some(true) { "yes" } else { "" }) }
                } } }
            }
        }
    }
}

// ---- wallet pages ----

async fn movements(
    State(portal): State<Portal>,
    Admin(signed): Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    let wallet = portal.wallet(&signed.session, &id).await?;
    let (uri, filters) = movement_query(&id, &query);
    let reply = portal.get(&signed.session, &uri).await;
    let body = html! {
        @if !reply.ok() { p role="alert" { (reply.message()) } }
        h1 { (text(&wallet["currency"])) " wallet " code { (id) } }
        p { a href={ "/admin/organizations/" (text(&wallet["organization"])) } { "Back to the organization" } }
        (html::figures(&wallet))
        (movement_filters(&format!("/admin/wallets/{id}/movements"), &query))
        (html::movements(&reply.list()))
        @if let Some(next) = reply.body["next_cursor"].as_str() {
            p { a href={ "/admin/wallets/" (id) "/movements?before=" (next) (filters) } { "Older movements" } }
        }
    };
    Ok(page(&signed, "Movements", body))
}

/// The API query for a movements page and the filter part to carry into paging links.
pub(super) fn movement_query(wallet: &str, query: &HashMap<String, String>) -> (String, String) {
    let mut filters = String::new();
    for name in ["kind", "from", "until"] {
        if let Some(value) = query.get(name).filter(|v| !v.trim().is_empty()) {
            filters.push_str(&format!("&{name}={}", encode(value.trim())));
        }
    }
    let mut uri = format!("/v1/wallets/{}/movements?limit=25{filters}", encode(wallet));
    if let Some(before) = query.get("before") {
        uri.push_str(&format!("&before={}", encode(before)));
    }
    (uri, filters)
}

pub(super) fn movement_filters(action: &str, query: &HashMap<String, String>) -> Markup {
    let value = |name: &str| query.get(name).cloned().unwrap_or_default();
    html! {
        form.row method="get" action=(action) aria-label="Filter movements" {
            label { "Kinds (comma-separated)" input name="kind" value=(value("kind")) placeholder="charge,top_up" size="18"; }
            label { "From (RFC 3339)" input name="from" value=(value("from")) size="22"; }
            label { "Until (RFC 3339)" input name="until" value=(value("until")) size="22"; }
            button.secondary type="submit" { "Filter" }
        }
    }
}

async fn statement(
    State(portal): State<Portal>,
    Admin(signed): Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    let wallet = portal.wallet(&signed.session, &id).await?;
    let back = format!("/admin/organizations/{}", text(&wallet["organization"]));
    Ok(page(&signed, "Statement", statement_body(&portal, &signed, &wallet, &query, &back, "/admin").await))
}

async fn statement_csv(
    State(portal): State<Portal>,
    Admin(signed): Admin,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Page {
    Ok(statement_download(&portal, &signed, &id, &query).await)
}

/// The statement of `query`'s period as a CSV attachment, straight from the API.
pub(super) async fn statement_download(
    portal: &Portal,
    signed: &Signed,
    id: &str,
    query: &HashMap<String, String>,
) -> Response {
    let value = |name: &str| encode(query.get(name).map(String::as_str).unwrap_or(""));
    let uri =
        format!("/v1/wallets/{}/statement?from={}&until={}&format=csv", encode(id), value("from"), value("until"));
    let response = portal.raw(&signed.session, Method::GET, &uri, None, None).await;
    super::attachment(response, &format!("statement-{id}.csv"))
}

/// The statement form and, once a period is given, the statement with a CSV download.
pub(super) async fn statement_body(
    portal: &Portal,
    signed: &Signed,
    wallet: &Value,
    query: &HashMap<String, String>,
    back: &str,
    base: &str,
) -> Markup {
    let id = text(&wallet["id"]);
    let currency = &wallet["currency"];
    let from = query.get("from").cloned().unwrap_or_default();
    let until = query.get("until").cloned().unwrap_or_default();
    let statement = if from.is_empty() || until.is_empty() {
        None
    } else {
        let uri = format!("/v1/wallets/{id}/statement?from={}&until={}", encode(&from), encode(&until));
        Some(portal.get(&signed.session, &uri).await)
    };
    let csv = format!("{base}/wallets/{id}/statement.csv?from={}&until={}", encode(&from), encode(&until));
    html! {
        h1 { "Statement of " (text(currency)) " wallet " code { (id) } }
        p { a href=(back) { "Back" } }
        form.row method="get" action={ (base) "/wallets/" (id) "/statement" } {
            label { "From (RFC 3339)" input name="from" value=(from) required placeholder="2026-11-01T00:00:00Z" size="22"; }
            label { "Until (RFC 3339)" input name="until" value=(until) required placeholder="2026-12-01T00:00:00Z" size="22"; }
            button type="submit" { "Show statement" }
        }
        @if let Some(reply) = statement {
            @if !reply.ok() { p role="alert" { (reply.message()) } } @else {
                @let s = &reply.body;
                section.card {
                    dl.figures {
                        div { dt { "Opening balance" } dd { (money(&s["opening_balance"], currency)) } }
                        div { dt { "Closing balance" } dd { (money(&s["closing_balance"], currency)) } }
                        div { dt { "Movements" } dd { (text(&s["movements"])) } }
                    }
                    h3 { "Totals by kind" }
                    table { tbody { @for (kind, amount) in s["totals"].as_object().into_iter().flatten() {
                        tr { td { (kind) } td.num { (money(amount, currency)) } }
                    } } }
                    h3 { "Charges by merchant and product" }
                    table {
                        thead { tr { th { "Counterparty" } th { "Product" } th { "Category" } th.num { "Amount" } } }
                        tbody { @for line in s["charges_by_merchant_and_product"].as_array().into_iter().flatten() { tr {
                            td { (text(&line["counterparty"])) } td { (text(&line["product"])) } td { (text(&line["category"])) }
                            td.num { (money(&line["amount"], currency)) }
                        } } }
                    }
                    p { a href=(csv) download { "Download CSV" } }
                }
            }
        }
    }
}

// ---- actions ----

fn amount_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).take(20).map(str::to_string).collect()
}

async fn adjust(State(portal): State<Portal>, Path(id): Path<String>, AdminForm(signed, fields): AdminForm) -> Page {
    let wallet = portal.wallet(&signed.session, &id).await?;
    let direction = if fields.get("direction") == "debit" { "debit" } else { "credit" };
    let mut body = json!({"direction": direction, "amount": fields.get("amount"), "currency": wallet["currency"], "reason": fields.get("reason")});
    if direction == "credit" {
        body["source"] = json!(if fields.get("source") == "promotions" { "promotions" } else { "funding" });
    }
    let uri = format!("/v1/wallets/{}/adjustments", encode(&id));
    let reply = portal.call(&signed.session, Method::POST, &uri, fields.idempotency().as_deref(), Some(body)).await;
    let done = format!(
        "{} of {} {} applied.",
        if direction == "credit" { "Credit" } else { "Debit" },
        fields.get("amount"),
        text(&wallet["currency"])
    );
    Ok(portal.after(&signed, &reply, &done, &back(&fields, "/admin")))
}

async fn grant(State(portal): State<Portal>, Path(id): Path<String>, AdminForm(signed, fields): AdminForm) -> Page {
    let wallet = portal.wallet(&signed.session, &id).await?;
    let priority: u32 = fields.get("priority").parse().unwrap_or(0);
    let body = json!({
        "amount": fields.get("amount"),
        "currency": wallet["currency"],
        "category": if fields.get("category") == "paid" { "paid" } else { "promotional" },
        "priority": priority,
        "expires_at": fields.optional("expires_at"),
        "reason": fields.get("reason"),
    });
    let uri = format!("/v1/wallets/{}/grants", encode(&id));
    let reply = portal.call(&signed.session, Method::POST, &uri, fields.idempotency().as_deref(), Some(body)).await;
    Ok(portal.after(&signed, &reply, "Credit granted.", &back(&fields, "/admin")))
}

async fn set_limits(
    State(portal): State<Portal>,
    Path(id): Path<String>,
    AdminForm(signed, fields): AdminForm,
) -> Page {
    let body = json!({
        "min_amount": fields.optional("min_amount"),
        "max_amount": fields.optional("max_amount"),
        "presets": amount_list(fields.get("presets")),
    });
    let uri = format!("/v1/wallets/{}/top-up-limits", encode(&id));
    let reply = portal.call(&signed.session, Method::PUT, &uri, None, Some(body)).await;
    Ok(portal.after(&signed, &reply, "Top-up limits saved.", &back(&fields, "/admin")))
}

async fn release_hold(
    State(portal): State<Portal>,
    Path(id): Path<String>,
    AdminForm(signed, fields): AdminForm,
) -> Page {
    let uri = format!("/v1/holds/{}/release", encode(&id));
    let reply =
        portal.call(&signed.session, Method::POST, &uri, fields.idempotency().as_deref(), Some(json!({}))).await;
    Ok(portal.after(&signed, &reply, &format!("Hold {id} released."), &back(&fields, "/admin")))
}

async fn decide_verification(
    State(portal): State<Portal>,
    Path((id, decision)): Path<(String, String)>,
    AdminForm(signed, fields): AdminForm,
) -> Page {
    let (path, body, done) = match decision.as_str() {
        "approve" => ("approve", json!({}), "Verification approved."),
        "reject" => ("reject", json!({"reason": fields.get("reason")}), "Verification rejected."),
        _ => return Err(html::problem(StatusCode::NOT_FOUND, "No such action.")),
    };
    let uri = format!("/v1/organizations/{}/verification/{path}", encode(&id));
    let reply = portal.call(&signed.session, Method::POST, &uri, None, Some(body)).await;
    Ok(portal.after(&signed, &reply, done, &back(&fields, "/admin")))
}

async fn set_method_types(
    State(portal): State<Portal>,
    Path(id): Path<String>,
    AdminForm(signed, fields): AdminForm,
) -> Page {
    let types: Vec<&str> = ["card", "bank_account"].into_iter().filter(|t| fields.optional(t).is_some()).collect();
    let uri = format!("/v1/organizations/{}/payment-method-types", encode(&id));
    let reply = portal.call(&signed.session, Method::PUT, &uri, None, Some(json!({"types": types}))).await;
    Ok(portal.after(&signed, &reply, "Payment method types saved.", &back(&fields, "/admin")))
}

// ---- platform settings ----

async fn settings(State(portal): State<Portal>, Admin(signed): Admin) -> Page {
    let session = &signed.session;
    let profiles = portal.get(session, "/v1/tax-profiles").await.list();
    let body = html! {
        h1 { "Platform settings" }
        section.card {
            h2 { "Tax profiles" }
            p.muted { "Taxes added to top-ups by the payer's billing country and region." }
            @if profiles.is_empty() { p.muted { "No tax profiles." } } @else {
                table {
                    thead { tr { th { "Country" } th { "Region" } th { "Taxes" } } }
                    tbody { @for p in &profiles { tr {
                        td { (text(&p["country"])) } td { (text(&p["subdivision"])) }
                        td { @for t in p["taxes"].as_array().into_iter().flatten() {
                            (text(&t["name"])) " "
                            @if !t["rate"].is_null() { (text(&t["rate"])) " of the amount" }
                            @if !t["fixed_amount"].is_null() { (text(&t["fixed_amount"])) " " (text(&t["currency"])) " fixed" }
                            br;
                        } }
                    } } }
                }
            }
            h3 { "Set a tax profile" }
            form.row method="post" action="/admin/settings/tax-profile" {
                (html::hidden(session))
                label { "Country (ISO 3166-1)" input name="country" required maxlength="2" size="3"; }
                label { "Region (optional)" input name="subdivision" maxlength="10" size="6"; }
                label { "Tax name" input name="name" maxlength="60" size="10" placeholder="VAT"; }
                label { "Rate (fraction; empty removes the profile)" input name="rate" size="8" placeholder="0.20"; }
                button type="submit" { "Save tax profile" }
            }
        }
        section.card {
            h2 { "Minimum payout" }
            form.row method="post" action="/admin/settings/payout-minimum" {
                (html::hidden(session))
                label { "Amount" input name="amount" required size="10"; }
                label { "Currency" input name="currency" required maxlength="3" size="4" placeholder="USD"; }
                button type="submit" { "Save minimum" }
            }
        }
        section.card {
            h2 { "Top-up presets and payment method types" }
            p { "Top-up limits and preset amounts are set per wallet on the organization's Wallets tab; payment method types per organization on its Settings tab." }
        }
    };
    Ok(page(&signed, "Platform settings", body))
}

async fn set_tax_profile(State(portal): State<Portal>, AdminForm(signed, fields): AdminForm) -> Page {
    let taxes = match fields.optional("rate") {
        Some(rate) => json!([{"name": fields.optional("name").unwrap_or("Tax"), "rate": rate}]),
        None => json!([]),
    };
    let body = json!({"country": fields.get("country").to_ascii_uppercase(), "subdivision": fields.optional("subdivision"), "taxes": taxes});
    let reply = portal.call(&signed.session, Method::PUT, "/v1/tax-profiles", None, Some(body)).await;
    Ok(portal.after(&signed, &reply, "Tax profile saved.", "/admin/settings"))
}

async fn set_payout_minimum(State(portal): State<Portal>, AdminForm(signed, fields): AdminForm) -> Page {
    let body = json!({"amount": fields.get("amount"), "currency": fields.get("currency").to_ascii_uppercase()});
    let reply = portal.call(&signed.session, Method::PUT, "/v1/payout-minimums", None, Some(body)).await;
    Ok(portal.after(&signed, &reply, "Minimum payout saved.", "/admin/settings"))
}
