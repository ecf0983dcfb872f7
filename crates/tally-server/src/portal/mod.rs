//! The admin portal (`/admin`) and the customer portal (`/portal`): server-rendered
//! HTML that works without JavaScript.
//!
//! The portals hold no rules of their own. Every page and every form calls the JSON
//! API in-process ([`Api`]), with the session's API key, through the same router,
//! authentication, ownership checks, idempotency and validation as any other client.
//! A session is a random cookie naming server-side state: the key it calls with and a
//! CSRF token that every form must carry.

// Handlers answer Result<Response, Response> (axum's way of early-returning a page);
// the error side is a response by design, not a large error value to shrink.
#![allow(clippy::result_large_err)]

mod admin;
mod customer;
mod html;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{caller, parse_id, ApiJson, ApiResult, App, AppState};
use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Router;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_ledger::billing::SubscriptionStatus;
use tally_ledger::OrganizationId;
use tower::ServiceExt;

/// How long a portal link can be used, once.
pub const LINK_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a customer session lasts after its link was used.
pub const CUSTOMER_SESSION_TTL: Duration = Duration::from_secs(60 * 60);
/// How long an admin session lasts after sign-in.
pub const ADMIN_SESSION_TTL: Duration = Duration::from_secs(8 * 60 * 60);
/// Most sessions and most unused links held at once; beyond, the oldest go first.
const SESSIONS_MAX: usize = 10_000;
/// Largest API answer a page reads (a page of movements is far smaller).
const API_BODY_MAX: usize = 16 * 1024 * 1024;

pub(crate) const ADMIN_COOKIE: &str = "tally_admin";
pub(crate) const PORTAL_COOKIE: &str = "tally_portal";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Admin,
    Customer(OrganizationId),
}

#[derive(Clone)]
pub(crate) struct Session {
    pub role: Role,
    /// The API key this session calls with.
    pub secret: String,
    /// The key's id, revoked when a customer signs out.
    pub key_id: u64,
    pub csrf: String,
    pub expires: Instant,
    /// One message for the next page: (success, text).
    pub flash: Option<(bool, String)>,
}

struct Link {
    organization: OrganizationId,
    expires: Instant,
}

/// Sessions and one-time links, in memory: a restart signs everyone out.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    /// Unused links by the BLAKE3 hash of their token.
    links: Mutex<HashMap<[u8; 32], Link>>,
}

pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn prune<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, expires: impl Fn(&V) -> Instant) {
    let now = Instant::now();
    map.retain(|_, value| expires(value) > now);
    while map.len() >= SESSIONS_MAX {
        let oldest = map.iter().min_by_key(|(_, value)| expires(value)).map(|(key, _)| key.clone());
        match oldest {
            Some(key) => map.remove(&key),
            None => break,
        };
    }
}

impl Sessions {
    fn create_link(&self, organization: OrganizationId) -> String {
        let token = random_token();
        let mut links = self.links.lock().expect("links lock");
        prune(&mut links, |link| link.expires);
        links.insert(
            *blake3::hash(token.as_bytes()).as_bytes(),
            Link { organization, expires: Instant::now() + LINK_TTL },
        );
        token
    }

    /// The organization a link was made for; the link is gone after this call.
    fn redeem_link(&self, token: &str) -> Option<OrganizationId> {
        let link = self.links.lock().expect("links lock").remove(blake3::hash(token.as_bytes()).as_bytes())?;
        (link.expires > Instant::now()).then_some(link.organization)
    }

    fn start(&self, role: Role, secret: String, key_id: u64, ttl: Duration) -> String {
        let id = random_token();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        prune(&mut sessions, |session| session.expires);
        sessions.insert(
            id.clone(),
            Session { role, secret, key_id, csrf: random_token(), expires: Instant::now() + ttl, flash: None },
        );
        id
    }

    /// The live session `id` names, taking its flash message.
    fn take(&self, id: &str) -> Option<Session> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let session = sessions.get_mut(id)?;
        if session.expires <= Instant::now() {
            sessions.remove(id);
            return None;
        }
        let copy = session.clone();
        session.flash = None;
        Some(copy)
    }

    fn flash(&self, id: &str, ok: bool, text: String) {
        if let Some(session) = self.sessions.lock().expect("sessions lock").get_mut(id) {
            session.flash = Some((ok, text));
        }
    }

    fn end(&self, id: &str) -> Option<Session> {
        self.sessions.lock().expect("sessions lock").remove(id)
    }
}

/// A page, or the page that answers instead (sign in, an error).
pub(crate) type Page = Result<Response, Response>;
/// A posted HTML form's fields.
pub(crate) type FormData = axum::extract::Form<HashMap<String, String>>;

/// Marks a successful API answer as a download named `name`.
pub(crate) fn attachment(mut response: Response, name: &str) -> Response {
    if response.status().is_success() {
        if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
        }
    }
    response
}

/// What the portal handlers share: the app and the API router they call.
#[derive(Clone)]
pub(crate) struct Portal {
    pub app: Arc<AppState>,
    api: Router,
}

/// An API answer: its status and JSON body (or the text, when not JSON).
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The API's own sentence for a refusal.
    pub fn message(&self) -> String {
        match self.body["detail"].as_str() {
            Some(detail) => format!("{detail} ({})", self.body["code"].as_str().unwrap_or("error")),
            None => format!("the request failed with status {}", self.status.as_u16()),
        }
    }

    pub fn list(&self) -> Vec<Value> {
        self.body["data"].as_array().cloned().unwrap_or_default()
    }
}

impl Portal {
    /// Calls the JSON API as `session`'s key would over HTTP.
    pub async fn raw(
        &self,
        session: &Session,
        method: Method,
        uri: &str,
        idempotency: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", session.secret));
        if let Some(key) = idempotency {
            request = request.header("idempotency-key", key);
        }
        let request = match body {
            Some(body) => request.header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        match request {
            Ok(request) => self.api.clone().oneshot(request).await.unwrap_or_else(|never| match never {}),
            Err(_) => ApiError::new("invalid_request", "the portal built a bad request").into_response(),
        }
    }

    pub async fn call(
        &self,
        session: &Session,
        method: Method,
        uri: &str,
        idempotency: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let response = self.raw(session, method, uri, idempotency, body).await;
        let status = response.status();
        let body = match axum::body::to_bytes(response.into_body(), API_BODY_MAX).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
            Err(_) => Value::Null,
        };
        Reply { status, body }
    }

    pub async fn get(&self, session: &Session, uri: &str) -> Reply {
        self.call(session, Method::GET, uri, None, None).await
    }

    /// A wallet the session's key may see, or the API's refusal as a page.
    pub async fn wallet(&self, session: &Session, id: &str) -> Result<Value, Response> {
        let reply = self.get(session, &format!("/v1/wallets/{}", encode(id))).await;
        if reply.ok() {
            Ok(reply.body)
        } else {
            Err(html::refused(&reply))
        }
    }
}

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Whether the client reached us over https (directly or through a proxy that says so).
fn is_https(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A session cookie: HttpOnly, SameSite=Strict, Secure on https, scoped to its portal.
fn session_cookie(name: &str, path: &str, value: &str, max_age: Option<Duration>, https: bool) -> HeaderValue {
    let mut text = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if https {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).expect("cookie text is ASCII")
}

/// A signed-in page's context: the session and its cookie id.
pub(crate) struct Signed {
    pub id: String,
    pub session: Session,
}

impl Portal {
    fn signed(&self, headers: &HeaderMap, cookie_name: &str) -> Option<Signed> {
        let id = cookie(headers, cookie_name)?;
        let session = self.app.portal.take(id)?;
        Some(Signed { id: id.to_string(), session })
    }

    pub fn flash(&self, signed: &Signed, ok: bool, text: impl Into<String>) {
        self.app.portal.flash(&signed.id, ok, text.into());
    }

    /// Flashes the API's answer and goes back to `to`.
    pub fn after(&self, signed: &Signed, reply: &Reply, success: &str, to: &str) -> Response {
        if reply.ok() {
            self.flash(signed, true, success);
        } else {
            self.flash(signed, false, reply.message());
        }
        see_other(to)
    }
}

pub(crate) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// A form's fields, with the CSRF token checked against the session's.
pub(crate) struct Fields(HashMap<String, String>);

impl Fields {
    pub fn checked(session: &Session, form: HashMap<String, String>) -> Result<Fields, Response> {
        let given = form.get("csrf").map(String::as_bytes).unwrap_or_default();
        if !constant_time_eq(given, session.csrf.as_bytes()) {
            return Err(html::problem(
                StatusCode::FORBIDDEN,
                "This form has expired or did not come from this site (CSRF token missing or wrong). Go back, reload the page and try again.",
            ));
        }
        Ok(Fields(form))
    }

    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map(|s| s.trim()).unwrap_or("")
    }

    pub fn optional(&self, name: &str) -> Option<&str> {
        Some(self.get(name)).filter(|s| !s.is_empty())
    }

    /// The idempotency key of this form's submission: the nonce rendered into it, so a
    /// double submit of the same form does the thing once.
    pub fn idempotency(&self) -> Option<String> {
        self.optional("nonce")
            .filter(|n| n.len() <= 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|n| format!("portal_{n}"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Query strings in links the portal builds.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Both portals and their stylesheet. `api` is the JSON API router they call.
pub(crate) fn routes(app: Arc<AppState>, api: Router) -> Router {
    let portal = Portal { app, api };
    Router::new()
        .route("/portal.css", axum::routing::get(html::stylesheet))
        .merge(admin::routes())
        .merge(customer::routes())
        .with_state(portal)
}

// ---- the API endpoint that makes portal links ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreatePortalSession {
    /// The consumer organization the link signs in as.
    organization: String,
}

// ---- response shapes (OpenAPI only) ----

/// A one-time customer portal link.
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
pub(crate) struct PortalSession {
    /// Always `portal_session`.
    object: String,
    /// The consumer organization the link signs in as.
    organization: String,
    /// The link to hand to the customer: `<scheme>://<host>/portal/enter?token=…`, built
    /// from the request's Host header (https when `X-Forwarded-Proto` says so). It works once.
    url: String,
    /// When the link stops working (15 minutes after it was made).
    expires_at: String,
}

#[utoipa::path(post, path = "/v1/portal-sessions", tag = "portal", summary = "A one-time customer portal link for a consumer organization (the platform, or a merchant the consumer subscribes to); it lasts 15 minutes and the session it opens one hour", request_body = CreatePortalSession, responses((status = 201, description = "the one-time link: `url` to hand to the customer", body = PortalSession), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
pub(crate) async fn create_portal_session(
    AxumState(app): App,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreatePortalSession>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let organization = parse_id("organization", &body.organization, OrganizationId::parse)?;
    let allowed = app
        .read(move |state| {
            let Some(consumer) = state.organization(organization) else { return false };
            match caller {
                Caller::Admin { .. } => true,
                // A merchant only for a consumer with a live subscription to it.
                Caller::Organization { organization: own, .. } => {
                    own == organization
                        || (consumer.roles.consumer
                            && state
                                .subscription_by_pair
                                .get(&(organization, own))
                                .and_then(|id| state.subscription(*id))
                                .is_some_and(|s| s.status != SubscriptionStatus::Canceled))
                }
            }
        })
        .await?;
    if !allowed {
        return Err(ApiError::field("not_found", "organization", "no such organization, or not one you serve"));
    }
    let token = app.portal.create_link(organization);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1:8080");
    let scheme = if is_https(&headers) { "https" } else { "http" };
    let expires_at = crate::time::format(app.now() + LINK_TTL.as_millis() as i64);
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "object": "portal_session",
            "organization": organization.to_string(),
            "url": format!("{scheme}://{host}/portal/enter?token={token}"),
            "expires_at": expires_at,
        })),
    )
        .into_response())
}
