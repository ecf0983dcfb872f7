//! The portals' page frame, stylesheet and small pieces of markup.

use super::Session;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

const STYLESHEET: &str = r#"
:root { --ink: #1b1f24; --muted: #4d5562; --line: #c9ced6; --accent: #0b57d0; --bad: #a4161a; --good: #1e6b34; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, sans-serif; color: var(--ink); background: var(--bg); }
header.top { background: #fff; border-bottom: 1px solid var(--line); padding: .6rem 1.5rem; display: flex; gap: 1.5rem; align-items: center; flex-wrap: wrap; }
header.top .brand { font-weight: 700; }
header.top nav a { margin-right: 1rem; }
main { max-width: 72rem; margin: 0 auto; padding: 1.5rem; }
a { color: var(--accent); }
a:focus, button:focus, input:focus, select:focus { outline: 3px solid #f2a900; outline-offset: 2px; }
h1 { font-size: 1.6rem; margin: .2rem 0 1rem; }
h2 { font-size: 1.25rem; margin: 1.5rem 0 .5rem; }
h3 { font-size: 1.05rem; margin: 1rem 0 .4rem; }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 1rem 1.25rem; margin-bottom: 1.25rem; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.figures { display: flex; gap: 2rem; flex-wrap: wrap; margin: .5rem 0; }
.figures div { min-width: 10rem; }
.figures dt { color: var(--muted); font-size: .9rem; }
.figures dd { margin: 0; font-size: 1.35rem; font-variant-numeric: tabular-nums; }
form.inline { display: inline; }
form.row { display: flex; gap: .75rem; flex-wrap: wrap; align-items: flex-end; margin: .5rem 0; }
form.row label { display: flex; flex-direction: column; font-size: .9rem; color: var(--muted); }
input, select, button { font: inherit; padding: .35rem .5rem; border: 1px solid #8a93a0; border-radius: 4px; }
button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
button.secondary { background: #fff; color: var(--accent); }
.flash { padding: .6rem 1rem; border-radius: 4px; margin-bottom: 1rem; }
.flash.ok { background: #e3f4e8; color: var(--good); border: 1px solid var(--good); }
.flash.bad { background: #fbe6e6; color: var(--bad); border: 1px solid var(--bad); }
.muted { color: var(--muted); }
.tabs { display: flex; gap: .25rem; border-bottom: 1px solid var(--line); margin-bottom: 1rem; flex-wrap: wrap; }
.tabs a { padding: .4rem .9rem; text-decoration: none; border: 1px solid transparent; border-bottom: none; border-radius: 4px 4px 0 0; }
.tabs a[aria-current=page] { background: #fff; border-color: var(--line); color: var(--ink); font-weight: 600; }
code { font-size: .9em; }
fieldset { border: 1px solid var(--line); border-radius: 4px; }
"#;

pub async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], STYLESHEET)
        .into_response()
}

/// A whole page: its frame, the navigation for `nav`, the flash message, then `body`.
pub fn page(title: &str, nav: Markup, session: Option<&Session>, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tally" }
                link rel="stylesheet" href="/portal.css";
            }
            body {
                header.top { span.brand { "Tally" } (nav) }
                main id="main" {
                    @if let Some((ok, text)) = session.and_then(|s| s.flash.as_ref()) {
                        div class={ "flash " (if *ok { "ok" } else { "bad" }) } role="status" { (text) }
                    }
                    (body)
                }
            }
        }
    };
    let mut response = Html(markup.into_string()).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        "content-security-policy",
        header::HeaderValue::from_static("default-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    );
    response.headers_mut().insert("x-frame-options", header::HeaderValue::from_static("DENY"));
    response
}

/// An error page with its status.
pub fn problem(status: StatusCode, text: &str) -> Response {
    let body = html! {
        h1 { (status.canonical_reason().unwrap_or("Error")) }
        p role="alert" { (text) }
    };
    let mut response = page("Error", html! {}, None, body);
    *response.status_mut() = status;
    response
}

/// The API's refusal, shown as a page with the API's status and message.
pub fn refused(reply: &super::Reply) -> Response {
    let status = if reply.status.is_success() { StatusCode::BAD_GATEWAY } else { reply.status };
    problem(status, &reply.message())
}

/// An amount with its currency, exactly as the API gave it.
pub fn money(amount: &Value, currency: &Value) -> Markup {
    html! { (text(amount)) " " (text(currency)) }
}

/// A JSON value as text ("" for null).
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The hidden fields every form carries: the CSRF token and a fresh nonce that makes
/// a double submit idempotent.
pub fn hidden(session: &Session) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(session.csrf);
        input type="hidden" name="nonce" value=(super::random_token());
    }
}

/// A table of movements.
pub fn movements(items: &[Value]) -> Markup {
    html! {
        @if items.is_empty() {
            p.muted { "No movements." }
        } @else {
            table {
                thead { tr { th { "When" } th { "Kind" } th { "Operation" } th.num { "Amount" } th.num { "Balance after" } th { "Grants" } } }
                tbody {
                    @for m in items {
                        tr {
                            td { (text(&m["created_at"])) }
                            td { (text(&m["kind"])) }
                            td { code { (text(&m["operation"])) } }
                            td.num { (money(&m["amount"], &m["currency"])) }
                            td.num { (money(&m["balance_after"], &m["currency"])) }
                            td {
                                @for g in m["grants"].as_array().into_iter().flatten() {
                                    code { (text(&g["grant"])) } " " (text(&g["amount"])) br;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A wallet's balance, held and available.
pub fn figures(wallet: &Value) -> Markup {
    let currency = &wallet["currency"];
    html! {
        dl.figures {
            div { dt { "Balance" } dd data-figure="balance" { (money(&wallet["balance"], currency)) } }
            div { dt { "Held" } dd data-figure="held" { (money(&wallet["held"], currency)) } }
            div { dt { "Available" } dd data-figure="available" { (money(&wallet["available"], currency)) } }
        }
    }
}

/// A wallet's grants.
pub fn grants(wallet: &Value) -> Markup {
    let currency = &wallet["currency"];
    let grants: Vec<&Value> = wallet["grants"].as_array().into_iter().flatten().collect();
    html! {
        @if grants.is_empty() {
            p.muted { "No credit grants." }
        } @else {
            table {
                thead { tr { th { "Grant" } th { "Category" } th.num { "Priority" } th.num { "Granted" } th.num { "Remaining" } th { "Expires" } th { "Status" } } }
                tbody {
                    @for g in grants {
                        tr {
                            td { code { (text(&g["id"])) } }
                            td { (text(&g["category"])) }
                            td.num { (text(&g["priority"])) }
                            td.num { (money(&g["amount"], currency)) }
                            td.num { (money(&g["remaining"], currency)) }
                            td { @if g["expires_at"].is_null() { "never" } @else { (text(&g["expires_at"])) } }
                            td { (text(&g["status"])) }
                        }
                    }
                }
            }
        }
    }
}
