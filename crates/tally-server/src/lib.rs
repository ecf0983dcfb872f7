//! Tally's HTTP API: the only crate that knows HTTP. It turns JSON requests into ledger
//! commands for the engine, checks API keys and ownership, enforces idempotency
//! headers, and answers with JSON or `application/problem+json`.

mod auth;
mod billing;
mod error;
pub mod metrics;
pub mod nats;
pub mod payments;
pub mod payouts;
mod portal;
mod schemas;
pub mod time;
mod views;
pub mod webhooks;

pub use auth::{generate as generate_key, Caller, KeyRing, NewKey, RateLimiter, Scope, Scopes};
pub use error::{status_of, ApiError};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_engine::{Answer, Clock, Handle, Request as EngineRequest};
use tally_ledger::*;
use tally_store::{HistoryReader, MovementFilter, Projector};

/// Requests per second per API key unless configured: far above what one machine
/// serves, so it stops a runaway client without shaping normal traffic.
pub const RATE_LIMIT_DEFAULT: u32 = 100_000;
/// Largest request body: every request here is a few hundred bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Most active holds one listing returns.
const HOLDS_LISTED_MAX: usize = 1_000;
/// Default and largest page of a list.
pub const PAGE_SIZE_DEFAULT: u32 = 50;
/// How long a replayed request waits for history to catch up with its first answer.
const HISTORY_WAIT_MAX: Duration = Duration::from_secs(5);

pub struct AppState {
    pub handle: Handle,
    pub projector: Arc<Projector>,
    pub history: Mutex<HistoryReader>,
    pub keys: KeyRing,
    pub clock: Arc<dyn Clock>,
    /// Idempotency keys whose first request is still executing.
    in_flight: Mutex<HashSet<u128>>,
    /// Webhook endpoints and delivery, when enabled.
    pub webhooks: Option<Arc<webhooks::Webhooks>>,
    pub metrics: metrics::Metrics,
    /// The NATS event stream, when configured (needs webhooks: it shares their file).
    pub nats: Option<nats::NatsConfig>,
    /// The payment provider and its driver, when enabled.
    pub payments: Option<Arc<payments::Payments>>,
    /// The payout rail and its driver, when enabled.
    pub payouts: Option<Arc<payouts::PayoutService>>,
    /// Portal sessions and one-time portal links.
    pub portal: portal::Sessions,
    /// Requests per second per API key.
    pub rate_limit: RateLimiter,
}

impl AppState {
    pub fn new(
        handle: Handle,
        projector: Arc<Projector>,
        history: HistoryReader,
        keys: KeyRing,
        clock: Arc<dyn Clock>,
    ) -> AppState {
        let metrics = metrics::Metrics::new(&handle);
        AppState {
            metrics,
            handle,
            projector,
            history: Mutex::new(history),
            keys,
            clock,
            in_flight: Mutex::new(HashSet::new()),
            webhooks: None,
            nats: None,
            payments: None,
            payouts: None,
            portal: portal::Sessions::default(),
            rate_limit: RateLimiter::new(RATE_LIMIT_DEFAULT),
        }
    }

    /// Publishes every event to NATS JetStream (`serve` starts the sink).
    pub fn with_nats(mut self, config: nats::NatsConfig) -> AppState {
        self.nats = Some(config);
        self
    }

    /// Enables payments through `provider` (`serve` starts the payment worker).
    pub fn with_payments(
        mut self,
        provider: Arc<dyn payments::provider::PaymentProvider>,
        config: payments::PaymentsConfig,
    ) -> AppState {
        self.payments = Some(Arc::new(payments::Payments::new(provider, config)));
        self
    }

    /// Enables payouts through `service`'s rail (`serve` starts the payout worker).
    pub fn with_payouts(mut self, service: payouts::PayoutService) -> AppState {
        self.payouts = Some(Arc::new(service));
        self
    }

    /// Limits each API key to `per_second` requests a second (0: no limit).
    pub fn with_rate_limit(mut self, per_second: u32) -> AppState {
        self.rate_limit = RateLimiter::new(per_second);
        self
    }

    /// Enables webhook endpoints and delivery (`serve` starts the delivery task).
    pub fn with_webhooks(mut self, webhooks: webhooks::Webhooks) -> AppState {
        let webhooks = Arc::new(webhooks);
        self.metrics.watch_webhooks(webhooks.clone());
        self.webhooks = Some(webhooks);
        self
    }

    async fn execute(&self, command: Command) -> Result<Receipt, ApiError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.handle.submit(EngineRequest::Command(command), Box::new(move |outcome| drop(sender.send(outcome))))?;
        match receiver.await.map_err(|_| ApiError::new("shutting_down", "the engine stopped"))?? {
            Answer::Receipt(receipt) => Ok(receipt),
            Answer::Read(_) => Err(ApiError::new("internal", "a command was answered with a read")),
        }
    }

    async fn read<T: Send + 'static>(&self, read: impl FnOnce(&State) -> T + Send + 'static) -> Result<T, ApiError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let request =
            EngineRequest::Read(Box::new(move |state| Box::new(read(state)) as Box<dyn std::any::Any + Send>));
        self.handle.submit(request, Box::new(move |outcome| drop(sender.send(outcome))))?;
        match receiver.await.map_err(|_| ApiError::new("shutting_down", "the engine stopped"))?? {
            Answer::Read(value) => Ok(*value.downcast::<T>().map_err(|_| ApiError::new("internal", "read type"))?),
            Answer::Receipt(_) => Err(ApiError::new("internal", "a read was answered with a receipt")),
        }
    }

    /// Runs a history query on a blocking thread once history includes every write
    /// durable so far.
    async fn history<T: Send + 'static>(
        self: &Arc<Self>,
        query: impl FnOnce(&HistoryReader) -> Result<T, tally_store::StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let durable = app.handle.stats().durable_seq.load(std::sync::atomic::Ordering::Acquire);
            if !app.projector.wait_for(durable, HISTORY_WAIT_MAX) {
                return Err(ApiError::new("not_ready", "history is catching up; retry shortly"));
            }
            let reader = app.history.lock().expect("history lock");
            query(&reader).map_err(|error| {
                tracing::error!(%error, "history query failed");
                ApiError::new("internal", "history is unavailable")
            })
        })
        .await
        .map_err(|_| ApiError::new("internal", "history task failed"))?
    }

    /// A wallet's owner and currency, as of every durable write before the request.
    async fn wallet_meta(&self, wallet: WalletId) -> Result<Option<(OrganizationId, Currency)>, ApiError> {
        self.read(move |state| state.wallet(wallet).map(|w| (w.organization, w.currency))).await
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

type App = AxumState<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// The router with every endpoint. Tests and `tally serve` both use it.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, document) = api_router().split_for_parts();
    let document = Arc::new(document);
    let api: Router = router
        .route("/openapi.json", get(move || async move { Json(document.as_ref().clone()) }))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .fallback(|| async { ApiError::not_found() })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state.clone());
    // The portals call the API router above in-process, so they hold it, not themselves.
    api.clone().merge(portal::routes(state, api))
}

/// The OpenAPI 3.1 document of every endpoint, built from the same annotations that
/// register the routes, so an endpoint cannot exist without being documented.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Tally API", description = "Prepaid wallets and a double-entry ledger. Amounts are decimal strings with a currency; every request that moves money needs an Idempotency-Key header."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, document: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api_router() -> utoipa_axum::router::OpenApiRouter<Arc<AppState>> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(create_organization, list_organizations))
        .routes(routes!(get_organization))
        .routes(routes!(update_billing))
        .routes(routes!(get_or_create_wallet, list_wallets))
        .routes(routes!(get_wallet))
        .routes(routes!(freeze_wallet))
        .routes(routes!(unfreeze_wallet))
        .routes(routes!(close_wallet))
        .routes(routes!(wallet_settings))
        .routes(routes!(adjust))
        .routes(routes!(create_grant, list_grants))
        .routes(routes!(void_grant))
        .routes(routes!(place_hold, list_holds))
        .routes(routes!(get_hold))
        .routes(routes!(capture_hold))
        .routes(routes!(release_hold))
        .routes(routes!(transfer))
        .routes(routes!(movements))
        .routes(routes!(get_operation))
        .routes(routes!(create_api_key, list_api_keys))
        .routes(routes!(revoke_api_key))
        .routes(routes!(portal::create_portal_session))
        .merge(billing::routes())
        .merge(webhooks::routes())
        .merge(payments::routes())
        .merge(payouts::routes())
}

/// Starts the background work of a serving node: webhook delivery, the NATS sink, and
/// the payment and payout workers. Only the node that writes runs them.
pub fn spawn_workers(state: &Arc<AppState>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = webhooks::spawn_dispatcher(state.clone()).into_iter().collect();
    if let (Some(config), Some(webhooks)) = (state.nats.clone(), state.webhooks.clone()) {
        tasks.push(nats::spawn(webhooks, config));
    }
    tasks.extend(payments::spawn_worker(state.clone()));
    tasks.extend(payouts::spawn_worker(state.clone()));
    tasks
}

/// Serves until `shutdown` resolves, then stops taking connections and finishes the
/// requests in progress. The caller owns the listener (tests bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tasks = spawn_workers(&state);
    let served = axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await;
    for task in tasks {
        task.abort();
    }
    served
}

// ---- request plumbing ----

/// JSON bodies: malformed JSON, unknown fields, wrong types and oversized bodies all
/// become problem+json answers instead of axum's plain-text ones.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::new("unsupported_media_type", "send Content-Type: application/json"))
            }
            Err(JsonRejection::BytesRejection(_)) => {
                Err(ApiError::new("payload_too_large", format!("request bodies are limited to {BODY_BYTES_MAX} bytes")))
            }
            Err(rejection) => Err(ApiError::new("invalid_request", rejection.body_text())),
        }
    }
}

fn caller(app: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let secret = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::new("unauthorized", "a valid API key is required: Authorization: Bearer tly_..."))?;
    let caller = app.keys.authenticate(secret.trim(), app.now())?;
    app.rate_limit.check(caller.key_id())?;
    Ok(caller)
}

fn text(field: &str, value: &str, empty_allowed: bool) -> Result<String, ApiError> {
    if value.len() > command::TEXT_LENGTH_MAX || (!empty_allowed && value.is_empty()) {
        return Err(ApiError::field(
            "text_length_out_of_range",
            field,
            format!("{field} must be {} to {} bytes", u8::from(!empty_allowed), command::TEXT_LENGTH_MAX),
        ));
    }
    Ok(value.to_string())
}

fn currency(field: &str, code: &str) -> Result<Currency, ApiError> {
    Currency::parse(code).map_err(|error| ApiError::field("unknown_currency", field, error.to_string()))
}

fn money(amount_field: &str, amount: &str, currency_code: &str) -> Result<Money, ApiError> {
    let currency = currency("currency", currency_code)?;
    let amount =
        Amount::parse(amount).map_err(|error| ApiError::field("invalid_amount", amount_field, error.to_string()))?;
    Ok(Money::new(amount, currency))
}

fn positive_money(field: &str, amount: &str, currency_code: &str) -> Result<Money, ApiError> {
    let value = money(field, amount, currency_code)?;
    if !value.amount.is_positive() {
        return Err(ApiError::field("amount_must_be_positive", field, "amounts must be positive"));
    }
    Ok(value)
}

fn amount(field: &str, text: &str) -> Result<Amount, ApiError> {
    let value = Amount::parse(text).map_err(|error| ApiError::field("invalid_amount", field, error.to_string()))?;
    if !value.is_positive() {
        return Err(ApiError::field("amount_must_be_positive", field, "amounts must be positive"));
    }
    Ok(value)
}

/// The platform's fee on a transfer or capture: only the platform (an admin key) sets it.
fn platform_fee(caller: &Caller, fee_amount: Option<&str>) -> Result<Fee, ApiError> {
    match fee_amount {
        None => Ok(Fee::None),
        Some(_) if !caller.is_admin() => Err(ApiError::field("forbidden", "fee_amount", "only the platform sets fees")),
        Some(text) => {
            let fee = Amount::parse(text)
                .map_err(|error| ApiError::field("invalid_amount", "fee_amount", error.to_string()))?;
            Ok(Fee::Fixed(fee))
        }
    }
}

/// One page of a list already in cursor order: at most `limit` items (default
/// `PAGE_SIZE_DEFAULT`, at most `PAGE_SIZE_MAX`) and, when more follow, the cursor of
/// the next page: the id of the last item returned.
pub(crate) fn page<T>(
    items: impl Iterator<Item = T>,
    limit: Option<u32>,
    id: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let limit = limit.unwrap_or(PAGE_SIZE_DEFAULT).clamp(1, tally_store::PAGE_SIZE_MAX) as usize;
    let mut items: Vec<T> = items.take(limit + 1).collect();
    if items.len() <= limit {
        return (items, None);
    }
    items.truncate(limit);
    let next = items.last().map(id);
    (items, next)
}

/// The items of a list kept in id order (index = id - 1) that come before the cursor id
/// `before`, or all of them without one: the newest-first lists page through these.
pub(crate) fn before_cursor<T>(all: &[T], before: Option<u64>) -> &[T] {
    &all[..before.map_or(all.len(), |id| (id.saturating_sub(1) as usize).min(all.len()))]
}

fn parse_id<T>(field: &str, text: &str, parse: fn(&str) -> Option<T>) -> Result<T, ApiError> {
    parse(text).ok_or_else(|| ApiError::field("not_found", field, format!("no such {field}")))
}

/// 201 with `value`; a repeat of the request that created it says so in a header.
fn created_or_replayed(value: Value, created: bool) -> Response {
    let mut response = (StatusCode::CREATED, Json(value)).into_response();
    if !created {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn created(value: Value) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn ok(value: Value) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

/// A wallet the caller may use, with its owner and currency, or 404.
async fn owned_wallet_meta(
    app: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(WalletId, OrganizationId, Currency), ApiError> {
    let wallet = parse_id("wallet", id, WalletId::parse)?;
    match app.wallet_meta(wallet).await? {
        Some((organization, currency)) if caller.owns(organization) => Ok((wallet, organization, currency)),
        _ => Err(ApiError::not_found()),
    }
}

/// Loads a wallet the caller may see, or answers 404.
async fn owned_wallet(
    app: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(WalletId, Value, OrganizationId, Currency), ApiError> {
    let wallet = parse_id("wallet", id, WalletId::parse)?;
    let found = app
        .read(move |state| state.wallet(wallet).map(|w| (views::wallet(state, w), w.organization, w.currency)))
        .await?;
    match found {
        Some((view, organization, currency)) if caller.owns(organization) => Ok((wallet, view, organization, currency)),
        _ => Err(ApiError::not_found()),
    }
}

/// Runs a money-moving request under its `Idempotency-Key`: a repeat with the same
/// body replays the first answer, a different body is refused, a concurrent repeat
/// gets 409.
async fn run_money(app: &Arc<AppState>, caller: &Caller, headers: &HeaderMap, action: MoneyAction) -> ApiResult {
    match action {
        // A reservation is part of metering: a usage key may make one.
        MoneyAction::Reserve { .. } => caller.require_scope(Scope::Usage)?,
        _ => caller.require_write()?,
    }
    let key_text = headers.get("idempotency-key").and_then(|value| value.to_str().ok()).ok_or_else(|| {
        ApiError::new("idempotency_key_required", "requests that move money need an Idempotency-Key header")
    })?;
    let key = IdempotencyKey::new(&caller.scope(), key_text)
        .map_err(|_| ApiError::field("invalid_request", "Idempotency-Key", "the key must be 1 to 255 bytes"))?;
    if !app.in_flight.lock().expect("in-flight lock").insert(key.0) {
        return Err(ApiError::new("idempotency_key_in_use", "a request with this key is still executing"));
    }
    struct Release<'a>(&'a AppState, u128);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.in_flight.lock().expect("in-flight lock").remove(&self.1);
        }
    }
    let _release = Release(app, key.0);
    // An organization's request names itself as the actor: the writer checks, in the
    // same step that applies it, that the money it takes is the organization's own.
    let command = match caller {
        Caller::Admin { .. } => Command::Move { key, action: action.clone() },
        Caller::Organization { organization, .. } => {
            Command::MoveAs { actor: *organization, key, action: action.clone() }
        }
    };
    // A release's receipt names only the hold: its currency is read first, while the
    // hold is still active (a replay finds it in history below).
    let mut released_currency = match action {
        MoneyAction::ReleaseHold { hold } => {
            app.read(move |state| state.hold(hold).and_then(|h| state.wallet(h.wallet)).map(|w| w.currency)).await?
        }
        _ => None,
    };
    let receipt = app.execute(command).await?;
    let (replayed, receipt) = match receipt {
        Receipt::Replayed(reference) => {
            let original = app.history(move |reader| reader.receipt_for_key(key, reference)).await?;
            (true, original.ok_or_else(|| ApiError::new("internal", "the first answer to this key is missing"))?)
        }
        receipt => (false, receipt),
    };
    if let (None, Receipt::HoldReleased { hold, .. }) = (released_currency, &receipt) {
        let hold = *hold;
        released_currency = app.history(move |reader| reader.hold_currency(hold)).await?;
    }
    let (status, body) = views::money_answer(&action, &receipt, released_currency);
    let mut response = (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), Json(body)).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

// ---- health ----

#[utoipa::path(get, path = "/healthz", tag = "health", summary = "Liveness", responses((status = 200, description = "success", body = crate::schemas::Health), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn healthz() -> Response {
    ok(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", summary = "Readiness: the ledger is loaded and storage works", responses((status = 200, description = "success", body = crate::schemas::Health), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn readyz(AxumState(app): App) -> Response {
    if app.handle.stats().ready.load(std::sync::atomic::Ordering::Acquire) {
        ok(json!({"status": "ready"}))
    } else {
        ApiError::new("not_ready", "the ledger is recovering or storage is unavailable").into_response()
    }
}

// ---- organizations ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RolesBody {
    #[serde(default)]
    merchant: bool,
    #[serde(default)]
    consumer: bool,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateOrganization {
    name: String,
    roles: Option<RolesBody>,
}

#[utoipa::path(post, path = "/v1/organizations", tag = "organizations", summary = "Create an organization (admin)", request_body = CreateOrganization, responses((status = 201, description = "success", body = crate::schemas::Organization), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_organization(
    AxumState(app): App,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrganization>,
) -> ApiResult {
    caller(&app, &headers)?.require_admin()?;
    let name = text("name", &body.name, false)?;
    let roles = body.roles.map_or(Roles::default(), |r| Roles { merchant: r.merchant, consumer: r.consumer });
    let Receipt::OrganizationCreated(id) = app.execute(Command::CreateOrganization { name, roles }).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let view = app.read(move |state| state.organization(id).map(views::organization)).await?;
    Ok(created(view.ok_or_else(ApiError::not_found)?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<u32>,
    after: Option<String>,
    /// Only organizations whose name contains this, ignoring case.
    q: Option<String>,
}

#[utoipa::path(get, path = "/v1/organizations", tag = "organizations", summary = "List organizations (admin), cursor `after`, `limit`", params(("limit" = Option<u32>, Query, description = "page size, at most 500"), ("after" = Option<String>, Query, description = "cursor: the last id seen"), ("q" = Option<String>, Query, description = "only names containing this, ignoring case")), responses((status = 200, description = "success", body = crate::schemas::OrganizationList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_organizations(AxumState(app): App, headers: HeaderMap, Query(query): Query<PageQuery>) -> ApiResult {
    caller(&app, &headers)?.require_admin()?;
    let limit = query.limit.unwrap_or(PAGE_SIZE_DEFAULT).clamp(1, tally_store::PAGE_SIZE_MAX) as usize;
    let after = match query.after.as_deref() {
        Some(cursor) => parse_id("after", cursor, OrganizationId::parse)?.0,
        None => 0,
    };
    let search = text("q", query.q.as_deref().unwrap_or(""), true)?.to_lowercase();
    let (items, more) = app
        .read(move |state| {
            let page: Vec<Value> = state
                .organizations
                .iter()
                .skip(after as usize)
                .filter(|o| search.is_empty() || o.name.to_lowercase().contains(&search))
                .take(limit + 1)
                .map(views::organization)
                .collect();
            let more = page.len() > limit;
            (page.into_iter().take(limit).collect::<Vec<_>>(), more)
        })
        .await?;
    let next = if more { items.last().map(|o| o["id"].clone()) } else { None };
    Ok(ok(json!({"object": "list", "data": items, "next_cursor": next})))
}

#[utoipa::path(get, path = "/v1/organizations/{id}", tag = "organizations", summary = "Get an organization", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::Organization), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_organization(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let id = parse_id("organization", &id, OrganizationId::parse)?;
    if !caller.owns(id) {
        return Err(ApiError::not_found());
    }
    let view = app.read(move |state| state.organization(id).map(views::organization)).await?;
    Ok(ok(view.ok_or_else(ApiError::not_found)?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BillingBody {
    legal_name: String,
    email: String,
    #[serde(default)]
    address: String,
    country: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    tax_id: String,
}

#[utoipa::path(put, path = "/v1/organizations/{id}/billing-details", tag = "organizations", summary = "Set billing details", params(("id" = String, Path, description = "the object's id")), request_body = BillingBody, responses((status = 200, description = "success", body = crate::schemas::Organization), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn update_billing(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<BillingBody>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let id = parse_id("organization", &id, OrganizationId::parse)?;
    if !caller.owns(id) {
        return Err(ApiError::not_found());
    }
    let billing = BillingDetails {
        legal_name: text("legal_name", &body.legal_name, false)?,
        email: text("email", &body.email, false)?,
        address: text("address", &body.address, true)?,
        country: text("country", &body.country, false)?,
        region: text("region", &body.region, true)?,
        tax_id: text("tax_id", &body.tax_id, true)?,
    };
    let roles =
        app.read(move |state| state.organization(id).map(|o| o.roles)).await?.ok_or_else(ApiError::not_found)?;
    app.execute(Command::UpdateOrganization { organization: id, roles, billing: Some(billing) }).await?;
    let view = app.read(move |state| state.organization(id).map(views::organization)).await?;
    Ok(ok(view.ok_or_else(ApiError::not_found)?))
}

// ---- wallets ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateWallet {
    currency: String,
    low_balance_threshold: Option<String>,
}

/// Get-or-create: safe to call on every page load; 201 when it created the wallet.
#[utoipa::path(post, path = "/v1/organizations/{id}/wallets", tag = "wallets", summary = "Get or create the wallet in a currency (201 when created)", params(("id" = String, Path, description = "the object's id")), request_body = CreateWallet, responses((status = 200, description = "success", body = crate::schemas::Wallet), (status = 201, description = "created", body = crate::schemas::Wallet), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_or_create_wallet(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateWallet>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let organization = parse_id("organization", &id, OrganizationId::parse)?;
    if !caller.owns(organization) {
        return Err(ApiError::not_found());
    }
    let currency = currency("currency", &body.currency)?;
    let threshold = match body.low_balance_threshold.as_deref() {
        Some(text) => Some(money("low_balance_threshold", text, currency.code())?.amount),
        None => None,
    };
    let existing = app.read(move |state| state.wallet_for(organization, currency)).await?;
    let (wallet, was_created) = match existing {
        Some(wallet) => (wallet, false),
        None => match app
            .execute(Command::CreateWallet {
                organization,
                currency,
                low_balance_threshold: threshold,
                additional: false,
            })
            .await
        {
            Ok(Receipt::WalletCreated(wallet)) => (wallet, true),
            // Two get-or-creates raced; the other one made it.
            Err(ApiError { code: "wallet_already_exists", .. }) => (
                app.read(move |state| state.wallet_for(organization, currency))
                    .await?
                    .ok_or_else(ApiError::not_found)?,
                false,
            ),
            Err(error) => return Err(error),
            Ok(_) => return Err(ApiError::new("internal", "unexpected receipt")),
        },
    };
    let view = app.read(move |state| state.wallet(wallet).map(|w| views::wallet(state, w))).await?;
    let view = view.ok_or_else(ApiError::not_found)?;
    Ok(if was_created { created(view) } else { ok(view) })
}

#[utoipa::path(get, path = "/v1/organizations/{id}/wallets", tag = "wallets", summary = "List an organization's wallets", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::WalletList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_wallets(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let organization = parse_id("organization", &id, OrganizationId::parse)?;
    if !caller.owns(organization) {
        return Err(ApiError::not_found());
    }
    let wallets = app
        .read(move |state| {
            state.organization(organization).map(|o| {
                let mut all: Vec<Value> = Vec::new();
                for (_, id) in &o.wallets {
                    if let Some(w) = state.wallet(*id) {
                        all.push(views::wallet(state, w));
                    }
                }
                all
            })
        })
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(ok(json!({"object": "list", "data": wallets})))
}

#[utoipa::path(get, path = "/v1/wallets/{id}", tag = "wallets", summary = "Balance, held, available and grants", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::Wallet), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_wallet(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (_, view, _, _) = owned_wallet(&app, &caller, &id).await?;
    Ok(ok(view))
}

async fn set_status(
    app: Arc<AppState>,
    headers: HeaderMap,
    id: String,
    status: WalletStatus,
    admin_only: bool,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    if admin_only {
        caller.require_admin()?;
    }
    caller.require_write()?;
    let (wallet, _, _, _) = owned_wallet(&app, &caller, &id).await?;
    app.execute(Command::SetWalletStatus { wallet, status }).await?;
    let (_, view, _, _) = owned_wallet(&app, &caller, &id).await?;
    Ok(ok(view))
}

#[utoipa::path(post, path = "/v1/wallets/{id}/freeze", tag = "wallets", summary = "Freeze: no debits (admin)", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::Wallet), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn freeze_wallet(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    set_status(app, headers, id, WalletStatus::Frozen, true).await
}

#[utoipa::path(post, path = "/v1/wallets/{id}/unfreeze", tag = "wallets", summary = "Unfreeze (admin)", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::Wallet), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn unfreeze_wallet(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    set_status(app, headers, id, WalletStatus::Active, true).await
}

#[utoipa::path(post, path = "/v1/wallets/{id}/close", tag = "wallets", summary = "Close an empty wallet", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::Wallet), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn close_wallet(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    set_status(app, headers, id, WalletStatus::Closed, false).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct WalletSettings {
    low_balance_threshold: Option<String>,
}

#[utoipa::path(put, path = "/v1/wallets/{id}/settings", tag = "wallets", summary = "Set the low-balance threshold", params(("id" = String, Path, description = "the object's id")), request_body = WalletSettings, responses((status = 200, description = "success", body = crate::schemas::Wallet), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn wallet_settings(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<WalletSettings>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let (wallet, _, _, currency) = owned_wallet(&app, &caller, &id).await?;
    let threshold = match body.low_balance_threshold.as_deref() {
        Some(text) => Some(money("low_balance_threshold", text, currency.code())?.amount),
        None => None,
    };
    app.execute(Command::SetLowBalanceThreshold { wallet, threshold }).await?;
    let (_, view, _, _) = owned_wallet(&app, &caller, &id).await?;
    Ok(ok(view))
}

// ---- money ----

#[derive(Deserialize, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Direction {
    Credit,
    Debit,
}

#[derive(Deserialize, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Source {
    Funding,
    Promotions,
}

impl Source {
    fn adjustment(self) -> AdjustmentSource {
        match self {
            Source::Funding => AdjustmentSource::ExternalFunding,
            Source::Promotions => AdjustmentSource::Promotions,
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    direction: Direction,
    amount: String,
    currency: String,
    source: Option<Source>,
    reason: String,
}

#[utoipa::path(post, path = "/v1/wallets/{id}/adjustments", tag = "money", summary = "Admin credit or debit (Idempotency-Key required)", params(("id" = String, Path, description = "the object's id"), ("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), request_body = Adjustment, responses((status = 201, description = "success", body = crate::schemas::Operation), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn adjust(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Adjustment>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let (wallet, _, _) = owned_wallet_meta(&app, &caller, &id).await?;
    let amount = positive_money("amount", &body.amount, &body.currency)?;
    let reason = text("reason", &body.reason, false)?;
    let source = body.source.unwrap_or(Source::Funding).adjustment();
    let action = match body.direction {
        Direction::Credit => {
            MoneyAction::Credit { wallet, amount, kind: CreditKind::Adjustment, source, grant: None, reason }
        }
        Direction::Debit => MoneyAction::Debit { wallet, amount, source, reason },
    };
    run_money(&app, &caller, &headers, action).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ApplicabilityBody {
    #[serde(default)]
    merchants: Vec<String>,
    #[serde(default)]
    products: Vec<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateGrant {
    amount: String,
    currency: String,
    #[schema(value_type = String, example = "promotional")]
    category: GrantCategory,
    #[serde(default)]
    priority: u32,
    expires_at: Option<String>,
    applicability: Option<ApplicabilityBody>,
    #[serde(default)]
    reason: String,
}

#[utoipa::path(post, path = "/v1/wallets/{id}/grants", tag = "grants", summary = "Grant credit (admin, Idempotency-Key required)", params(("id" = String, Path, description = "the object's id"), ("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), request_body = CreateGrant, responses((status = 201, description = "success", body = crate::schemas::GrantCreated), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_grant(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateGrant>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let (wallet, _, _, _) = owned_wallet(&app, &caller, &id).await?;
    let amount = positive_money("amount", &body.amount, &body.currency)?;
    let expires_at = match body.expires_at.as_deref() {
        Some(text) => {
            Some(time::parse(text).ok_or_else(|| ApiError::invalid("expires_at", "use an RFC 3339 UTC time"))?)
        }
        None => None,
    };
    let applicability = match body.applicability {
        Some(a) => Some(Applicability {
            merchants: a
                .merchants
                .iter()
                .map(|m| parse_id("merchants", m, OrganizationId::parse))
                .collect::<Result<_, _>>()?,
            products: a.products.iter().map(|p| parse_id("products", p, ProductId::parse)).collect::<Result<_, _>>()?,
        }),
        None => None,
    };
    let source = match body.category {
        GrantCategory::Paid => AdjustmentSource::ExternalFunding,
        _ => AdjustmentSource::Promotions,
    };
    let grant = GrantSpec { category: body.category, priority: body.priority, expires_at, applicability };
    let reason = text("reason", &body.reason, true)?;
    let action =
        MoneyAction::Credit { wallet, amount, kind: CreditKind::Adjustment, source, grant: Some(grant), reason };
    run_money(&app, &caller, &headers, action).await
}

#[utoipa::path(get, path = "/v1/wallets/{id}/grants", tag = "grants", summary = "A wallet's live grants", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::GrantList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_grants(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (_, view, _, _) = owned_wallet(&app, &caller, &id).await?;
    Ok(ok(json!({"object": "list", "data": view["grants"]})))
}

#[utoipa::path(post, path = "/v1/grants/{id}/void", tag = "grants", summary = "Void a grant's unspent remainder (admin, Idempotency-Key required)", params(("id" = String, Path, description = "the object's id"), ("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), responses((status = 200, description = "success", body = crate::schemas::GrantVoided), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn void_grant(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let grant = parse_id("grant", &id, GrantId::parse)?;
    run_money(&app, &caller, &headers, MoneyAction::VoidGrant { grant, reason: String::new() }).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PlaceHold {
    amount: String,
    currency: String,
    ttl_seconds: i64,
    #[serde(default)]
    exclusive: bool,
    payee_wallet: Option<String>,
    #[serde(default)]
    description: String,
}

#[utoipa::path(post, path = "/v1/wallets/{id}/holds", tag = "holds", summary = "Place a hold (Idempotency-Key required)", params(("id" = String, Path, description = "the object's id"), ("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), request_body = PlaceHold, responses((status = 201, description = "success", body = crate::schemas::HoldPlaced), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn place_hold(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PlaceHold>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let wallet = parse_id("wallet", &id, WalletId::parse)?;
    let amount = positive_money("amount", &body.amount, &body.currency)?;
    let payee = match body.payee_wallet.as_deref() {
        Some(text) => Some(parse_id("payee_wallet", text, WalletId::parse)?),
        None => None,
    };
    let ttl_ms = body.ttl_seconds.checked_mul(1000).ok_or_else(|| ApiError::invalid("ttl_seconds", "too large"))?;
    let description = text("description", &body.description, true)?;
    let action =
        MoneyAction::PlaceHold { wallet, amount, ttl_ms, exclusive: body.exclusive, payee, product: None, description };
    run_money(&app, &caller, &headers, action).await
}

#[utoipa::path(get, path = "/v1/wallets/{id}/holds", tag = "holds", summary = "A wallet's active holds", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::HoldList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_holds(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (wallet, _, _, currency) = owned_wallet(&app, &caller, &id).await?;
    let holds = app
        .read(move |state| {
            state.holds_of(wallet, HOLDS_LISTED_MAX).map(|h| views::hold(h, currency)).collect::<Vec<_>>()
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": holds})))
}

/// The active hold and its wallet's owner, or 404 (resolved holds show in history).
async fn owned_hold(app: &AppState, caller: &Caller, id: &str) -> Result<(HoldId, Value), ApiError> {
    let hold = parse_id("hold", id, HoldId::parse)?;
    let found = app
        .read(move |state| {
            let h = state.hold(hold)?;
            let wallet = state.wallet(h.wallet)?;
            Some((views::hold(h, wallet.currency), wallet.organization))
        })
        .await?;
    match found {
        Some((view, organization)) if caller.owns(organization) => Ok((hold, view)),
        _ => Err(ApiError::not_found()),
    }
}

#[utoipa::path(get, path = "/v1/holds/{id}", tag = "holds", summary = "Get a hold: an active one, or how a resolved one ended (captured, released, expired)", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::AnyHold), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_hold(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    match owned_hold(&app, &caller, &id).await {
        Ok((_, view)) => Ok(ok(view)),
        Err(error) if error.code == "not_found" => resolved_hold(&app, &caller, &id).await.map(ok),
        Err(error) => Err(error),
    }
}

/// A hold that is no longer active, from its events: what was placed, and how it ended
/// (captured, released or expired).
async fn resolved_hold(app: &Arc<AppState>, caller: &Caller, id: &str) -> Result<Value, ApiError> {
    let hold = parse_id("hold", id, HoldId::parse)?;
    let filter = tally_store::EventFilter {
        object: Some(hold.to_string()),
        types: ["hold.placed", "hold.captured", "hold.released", "hold.expired"].map(String::from).to_vec(),
        limit: 10,
        ..Default::default()
    };
    let events = app.history(move |reader| reader.events(&filter)).await?;
    let placed = events.iter().find(|e| e.kind == "hold.placed").ok_or_else(ApiError::not_found)?;
    let ended = events.iter().rev().find(|e| e.kind != "hold.placed").ok_or_else(ApiError::not_found)?;
    if !placed.organization.is_some_and(|owner| caller.owns(owner)) {
        return Err(ApiError::not_found());
    }
    let mut view: Value = serde_json::from_str(&placed.data).map_err(|_| ApiError::new("internal", "event data"))?;
    let outcome: Value = serde_json::from_str(&ended.data).map_err(|_| ApiError::new("internal", "event data"))?;
    if let Some(object) = view.as_object_mut() {
        if let Some(expires) = object.remove("expires_at_ms").and_then(|v| v.as_i64()) {
            object.insert("expires_at".into(), json!(time::format(expires)));
        }
        object.insert("created_at".into(), json!(time::format(placed.at)));
        object.insert("status".into(), outcome["status"].clone());
        object.insert("resolved_at".into(), json!(time::format(ended.at)));
        for field in ["released", "operation"] {
            if !outcome[field].is_null() {
                object.insert(field.into(), outcome[field].clone());
            }
        }
    }
    Ok(view)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CaptureHold {
    amount: Option<String>,
    to_wallet: String,
    fee_amount: Option<String>,
}

#[utoipa::path(post, path = "/v1/holds/{id}/capture", tag = "holds", summary = "Capture all or part of a hold (Idempotency-Key required)", params(("id" = String, Path, description = "the object's id"), ("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), request_body = CaptureHold, responses((status = 200, description = "success", body = crate::schemas::HoldCaptured), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn capture_hold(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CaptureHold>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    // No lookup first: the writer checks ownership, and a retry of a capture that
    // already happened must reach the idempotent replay, not a 404.
    let hold = parse_id("hold", &id, HoldId::parse)?;
    let amount = match body.amount.as_deref() {
        Some(text) => Some(amount("amount", text)?),
        None => None,
    };
    let fee = platform_fee(&caller, body.fee_amount.as_deref())?;
    let to = parse_id("to_wallet", &body.to_wallet, WalletId::parse)?;
    run_money(&app, &caller, &headers, MoneyAction::CaptureHold { hold, amount, to, fee }).await
}

#[utoipa::path(post, path = "/v1/holds/{id}/release", tag = "holds", summary = "Release a hold (Idempotency-Key required)", params(("id" = String, Path, description = "the object's id"), ("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), responses((status = 200, description = "success", body = crate::schemas::HoldReleased), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn release_hold(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let hold = parse_id("hold", &id, HoldId::parse)?;
    run_money(&app, &caller, &headers, MoneyAction::ReleaseHold { hold }).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Transfer {
    from_wallet: String,
    to_wallet: String,
    amount: String,
    currency: String,
    fee_amount: Option<String>,
    #[serde(default)]
    description: String,
}

#[utoipa::path(post, path = "/v1/transfers", tag = "money", summary = "Transfer between wallets (Idempotency-Key required)", params(("Idempotency-Key" = String, Header, description = "the client's name for this operation; required")), request_body = Transfer, responses((status = 201, description = "success", body = crate::schemas::Operation), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn transfer(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<Transfer>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    // The paying wallet must be the caller's (the writer checks it); the receiving one
    // may be anyone's, a merchant's.
    let from = parse_id("from_wallet", &body.from_wallet, WalletId::parse)?;
    let to = parse_id("to_wallet", &body.to_wallet, WalletId::parse)?;
    let amount = positive_money("amount", &body.amount, &body.currency)?;
    let fee = platform_fee(&caller, body.fee_amount.as_deref())?;
    let description = text("description", &body.description, true)?;
    let action =
        MoneyAction::Transfer { from, to, amount, fee, kind: TransferKind::Transfer, product: None, description };
    run_money(&app, &caller, &headers, action).await
}

// ---- history ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MovementQuery {
    limit: Option<u32>,
    before: Option<String>,
    kind: Option<String>,
    from: Option<String>,
    until: Option<String>,
}

#[utoipa::path(get, path = "/v1/wallets/{id}/movements", tag = "history", summary = "A wallet's movements, newest first", params(("id" = String, Path, description = "the wallet's id"), ("limit" = Option<u32>, Query, description = "page size, at most 500"), ("before" = Option<String>, Query, description = "cursor: an operation id"), ("kind" = Option<String>, Query, description = "operation kinds, comma-separated"), ("from" = Option<String>, Query, description = "RFC 3339, inclusive"), ("until" = Option<String>, Query, description = "RFC 3339, exclusive")), responses((status = 200, description = "success", body = crate::schemas::MovementList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn movements(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<MovementQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (wallet, _, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let parse_time = |field: &str, value: &Option<String>| -> Result<Option<Timestamp>, ApiError> {
        match value.as_deref() {
            Some(text) => {
                time::parse(text).map(Some).ok_or_else(|| ApiError::invalid(field, "use an RFC 3339 UTC time"))
            }
            None => Ok(None),
        }
    };
    let filter = MovementFilter {
        before: match query.before.as_deref() {
            Some(cursor) => Some(parse_id("before", cursor, OperationId::parse)?),
            None => None,
        },
        kinds: query.kind.iter().flat_map(|k| k.split(',')).map(|k| k.chars().take(32).collect()).take(16).collect(),
        from: parse_time("from", &query.from)?,
        until: parse_time("until", &query.until)?,
        limit: query.limit.unwrap_or(PAGE_SIZE_DEFAULT),
    };
    let limit = filter.limit.clamp(1, tally_store::PAGE_SIZE_MAX) as usize;
    let page = app.history(move |reader| reader.movements(wallet, &filter)).await?;
    let data: Vec<Value> = page
        .iter()
        .map(|m| {
            json!({
                "object": "movement",
                "wallet": m.wallet.to_string(),
                "operation": m.operation.to_string(),
                "kind": m.kind,
                "created_at": time::format(m.at),
                "amount": views::amount(m.amount, currency),
                "balance_after": views::amount(m.balance_after, currency),
                "currency": currency.code(),
                "grants": m.grants.iter().map(|g| json!({"grant": g.grant.to_string(), "amount": views::amount(g.amount, currency)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let next = if data.len() == limit { page.last().map(|m| m.operation.to_string()) } else { None };
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "history", summary = "One operation with all its legs", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "success", body = crate::schemas::Operation), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_operation(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let id = parse_id("operation", &id, OperationId::parse)?;
    let operation = app.history(move |reader| reader.operation(id)).await?.ok_or_else(ApiError::not_found)?;
    if !caller.is_admin() {
        let wallets: Vec<WalletId> = operation
            .legs
            .iter()
            .filter_map(|leg| match leg.account {
                Account::Wallet(wallet) => Some(wallet),
                _ => None,
            })
            .collect();
        let owners = app
            .read(move |state| {
                wallets.iter().filter_map(|w| state.wallet(*w).map(|w| w.organization)).collect::<Vec<_>>()
            })
            .await?;
        if !owners.iter().any(|owner| caller.owns(*owner)) {
            return Err(ApiError::not_found());
        }
    }
    Ok(ok(views::operation(&operation)))
}

// ---- API keys ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    organization: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    read_only: bool,
    /// Instead of `read_only`: any of read, write, usage, payouts (every key reads).
    scopes: Option<Vec<String>>,
    expires_at: Option<String>,
}

fn key_view(record: &tally_store::ApiKeyRecord) -> Value {
    json!({
        "id": format!("key_{}", record.id),
        "object": "api_key",
        "prefix": record.prefix,
        "name": record.name,
        "organization": record.organization.map(|o| o.to_string()),
        "scopes": record.scopes.split(',').collect::<Vec<_>>(),
        "created_at": time::format(record.created_at),
        "expires_at": record.expires_at.map(time::format),
        "revoked_at": record.revoked_at.map(time::format),
    })
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api_keys", summary = "Create an API key; its secret is shown once (admin)", request_body = CreateKey, responses((status = 201, description = "success", body = crate::schemas::ApiKey), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_api_key(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreateKey>) -> ApiResult {
    caller(&app, &headers)?.require_admin()?;
    let organization = match body.organization.as_deref() {
        Some(text) => {
            let id = parse_id("organization", text, OrganizationId::parse)?;
            app.read(move |state| state.organization(id).is_some())
                .await?
                .then_some(id)
                .ok_or_else(ApiError::not_found)?;
            Some(id)
        }
        None => None,
    };
    let expires_at = match body.expires_at.as_deref() {
        Some(text) => {
            Some(time::parse(text).ok_or_else(|| ApiError::invalid("expires_at", "use an RFC 3339 UTC time"))?)
        }
        None => None,
    };
    let name = text("name", &body.name, true)?;
    let mut key = auth::generate(organization, !body.read_only, &name, app.now(), expires_at);
    if let Some(scopes) = &body.scopes {
        if body.read_only || organization.is_none() {
            return Err(ApiError::invalid("scopes", "scopes are for organization keys, instead of read_only"));
        }
        if scopes.len() > auth::SCOPES.len() || scopes.iter().any(|s| !auth::SCOPES.contains(&s.as_str())) {
            return Err(ApiError::invalid("scopes", "scopes are read, write, usage and payouts"));
        }
        let mut chosen: Vec<&str> =
            auth::SCOPES.iter().copied().filter(|s| *s == "read" || scopes.iter().any(|c| c == s)).collect();
        chosen.dedup();
        key.record.scopes = chosen.join(",");
    }
    let key = app.keys.insert(key).map_err(|_| ApiError::new("internal", "could not store the key"))?;
    let mut view = key_view(&key.record);
    view["secret"] = key.secret.into();
    Ok(created(view))
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api_keys", summary = "List API keys, prefix and metadata only (admin)", responses((status = 200, description = "success", body = crate::schemas::ApiKeyList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_api_keys(AxumState(app): App, headers: HeaderMap) -> ApiResult {
    caller(&app, &headers)?.require_admin()?;
    Ok(ok(json!({"object": "list", "data": app.keys.list().iter().map(key_view).collect::<Vec<_>>()})))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api_keys", summary = "Revoke an API key (admin)", params(("id" = String, Path, description = "the object's id")), responses((status = 204, description = "revoked; no body"), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn revoke_api_key(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    caller(&app, &headers)?.require_admin()?;
    let id: u64 = id.strip_prefix("key_").and_then(|n| n.parse().ok()).ok_or_else(ApiError::not_found)?;
    if !app.keys.revoke(id, app.now()).map_err(|_| ApiError::new("internal", "could not revoke"))? {
        return Err(ApiError::not_found());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
