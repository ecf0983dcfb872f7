//! Webhooks: endpoints per organization (and the platform's), signed at-least-once
//! delivery with retries on a growing schedule, attempts kept, redelivery, and the
//! safety checks on where Tally will send requests. Delivery runs on its own task and
//! reads the event log; it never touches the engine's path except to record that an
//! endpoint was disabled.

use super::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use tally_store::webhooks::{Attempt, DueDelivery, Endpoint, WebhookStore};
use utoipa::ToSchema;
use utoipa_axum::routes;

/// How often the dispatcher looks for new events and due deliveries when idle.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Events fanned out, and deliveries sent, per round.
const EVENTS_PER_ROUND: u32 = 1_000;
const DELIVERIES_PER_ROUND: u32 = 1_000;
/// Deliveries one endpoint is sent per round, one after another.
const DELIVERIES_PER_ENDPOINT: usize = 100;
/// First retry delay; each retry doubles it, up to `RETRY_DELAY_MAX_MS`.
const RETRY_DELAY_FIRST_MS: i64 = 10_000;
const RETRY_DELAY_MAX_MS: i64 = 6 * 3600 * 1000;
/// Bytes of a receiver's answer kept with an attempt.
const RESPONSE_EXCERPT_BYTES: usize = 256;
/// Most endpoints per organization, and event types per endpoint.
const ENDPOINTS_MAX: usize = 16;
const EVENT_TYPES_MAX: usize = 64;
/// How old a signature may be when a receiver checks it, by default.
pub const SIGNATURE_TOLERANCE_S: i64 = 300;

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Allow private, loopback and link-local destinations (tests, private networks).
    pub allow_private: bool,
    /// How long a delivery is retried before it fails, in ms (3 days by default).
    pub retry_window_ms: i64,
    /// Time limit of one attempt.
    pub timeout: Duration,
    /// The first retry's delay; each next one doubles, up to 6 hours.
    pub retry_first_ms: i64,
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig {
            allow_private: false,
            retry_window_ms: 3 * 24 * 3600 * 1000,
            timeout: Duration::from_secs(10),
            retry_first_ms: RETRY_DELAY_FIRST_MS,
        }
    }
}

pub struct Webhooks {
    pub store: Mutex<WebhookStore>,
    pub config: WebhookConfig,
    wake: tokio::sync::Notify,
}

impl Webhooks {
    pub fn new(store: WebhookStore, config: WebhookConfig) -> Webhooks {
        Webhooks { store: Mutex::new(store), config, wake: tokio::sync::Notify::new() }
    }
}

// ---- signatures ----

fn hmac_hex(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `Tally-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`,
/// one `v1` per secret (two while a rotated secret is still signing).
pub fn sign(secrets: &[&str], timestamp: i64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        header.push_str(",v1=");
        header.push_str(&hmac_hex(secret, timestamp, body));
    }
    header
}

#[derive(Debug, PartialEq, Eq)]
pub enum VerifyError {
    Malformed,
    Stale,
    Mismatch,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifyError::Malformed => "the header is not t=<seconds>,v1=<hex>",
            VerifyError::Stale => "the signature's timestamp is outside the tolerance",
            VerifyError::Mismatch => "no signature matches this secret and body",
        })
    }
}

/// Checks a `Tally-Signature` header against a secret and the raw body, and that its
/// timestamp is within `tolerance_s` of `now_s`. Compares in constant time.
pub fn verify(secret: &str, header: &str, body: &[u8], now_s: i64, tolerance_s: i64) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(value.to_string()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::Malformed)?;
    if signatures.is_empty() {
        return Err(VerifyError::Malformed);
    }
    if (now_s - timestamp).abs() > tolerance_s {
        return Err(VerifyError::Stale);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    for signature in signatures {
        let Some(bytes) = decode_hex(&signature) else { continue };
        if mac.clone().verify_slice(&bytes).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::Mismatch)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    format!("whsec_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

// ---- where requests may go ----

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Checks a destination's form: http(s), a host, at most 2,048 bytes.
fn check_url(url: &str) -> Result<reqwest::Url, ApiError> {
    if url.len() > 2048 {
        return Err(ApiError::field("invalid_url", "url", "at most 2,048 bytes"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| ApiError::field("invalid_url", "url", e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ApiError::field("invalid_url", "url", "only http and https URLs"));
    }
    if parsed.host_str().is_none_or(str::is_empty) || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ApiError::field("invalid_url", "url", "a host and no credentials"));
    }
    Ok(parsed)
}

/// Resolves a destination and refuses private, loopback and link-local addresses
/// unless allowed. Returns the address to connect to, so the check and the connection
/// use the same address (no DNS rebinding in between).
async fn resolve(url: &reqwest::Url, allow_private: bool) -> Result<SocketAddr, String> {
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().ok_or("no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?.collect()
        }
    };
    let first = addresses.first().copied().ok_or_else(|| format!("{host} has no address"))?;
    if !allow_private && addresses.iter().any(|a| is_private(a.ip())) {
        return Err(format!("{host} resolves to a private, loopback or link-local address"));
    }
    Ok(first)
}

// ---- delivery ----

fn retry_delay(first_ms: i64, attempts: u32) -> i64 {
    first_ms.saturating_mul(1i64 << attempts.min(20)).min(RETRY_DELAY_MAX_MS)
}

/// A client for one endpoint: its URL checked, its host resolved and checked, and the
/// connection pinned to that address; no redirects; a time limit per attempt.
async fn client_for(endpoint: &Endpoint, config: &WebhookConfig) -> Result<(reqwest::Client, reqwest::Url), String> {
    let url = check_url(&endpoint.url).map_err(|error| error.detail)?;
    let address = resolve(&url, config.allow_private).await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.timeout)
        .resolve(url.host_str().unwrap_or_default(), address)
        .build()
        .map_err(|error| error.to_string())?;
    Ok((client, url))
}

async fn post(client: &reqwest::Client, url: &reqwest::Url, due: &DueDelivery, now: Timestamp) -> Attempt {
    let started = std::time::Instant::now();
    let mut secrets = vec![due.endpoint.secret.as_str()];
    if let (Some(previous), Some(until)) = (&due.endpoint.previous_secret, due.endpoint.previous_until) {
        if until > now {
            secrets.push(previous);
        }
    }
    let signature = sign(&secrets, now / 1000, due.body.as_bytes());
    let response = client
        .post(url.clone())
        .header("content-type", "application/json")
        .header("tally-signature", signature)
        .header("tally-event-id", format!("evt_{}", due.delivery.event))
        .header("tally-delivery-id", due.delivery.id.to_string())
        .body(due.body.clone())
        .send()
        .await;
    let (status, error, excerpt) = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let excerpt: String = text.chars().take(RESPONSE_EXCERPT_BYTES).collect();
            let error = (!(200..300).contains(&status)).then(|| format!("answered {status}"));
            (Some(status), error, Some(excerpt))
        }
        Err(error) => (None, Some(error.to_string()), None),
    };
    Attempt { at: now, status, latency_ms: started.elapsed().as_millis() as u64, error, response_excerpt: excerpt }
}

/// Sends one endpoint's due deliveries one after another, in event order, on one
/// client; stops at the first failure (the rest wait for the next round).
async fn send_in_order(batch: Vec<DueDelivery>, config: &WebhookConfig, now: Timestamp) -> Vec<(DueDelivery, Attempt)> {
    let mut out = Vec::with_capacity(batch.len());
    let Some(first) = batch.first() else { return out };
    match client_for(&first.endpoint, config).await {
        Err(error) => {
            let attempt = Attempt { at: now, status: None, latency_ms: 0, error: Some(error), response_excerpt: None };
            if let Some(due) = batch.into_iter().next() {
                out.push((due, attempt));
            }
        }
        Ok((client, url)) => {
            for due in batch {
                let attempt = post(&client, &url, &due, now).await;
                let failed = attempt.error.is_some();
                out.push((due, attempt));
                if failed {
                    break;
                }
            }
        }
    }
    out
}

/// One round: new events become deliveries; due deliveries are sent; outcomes are
/// recorded in one transaction. Returns whether there was anything to do.
async fn round(app: &Arc<AppState>, webhooks: &Arc<Webhooks>) -> Result<bool, String> {
    let now = app.now();
    let hooks = webhooks.clone();
    let (fanned, due) = tokio::task::spawn_blocking(move || {
        let mut store = hooks.store.lock().expect("webhook store lock");
        let fanned = store.fan_out(now, EVENTS_PER_ROUND)?;
        let due = store.due(now, DELIVERIES_PER_ENDPOINT, DELIVERIES_PER_ROUND)?;
        Ok::<_, tally_store::StoreError>((fanned, due))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if due.is_empty() {
        return Ok(fanned > 0);
    }
    let config = webhooks.config.clone();
    let mut by_endpoint: std::collections::BTreeMap<u64, Vec<DueDelivery>> = std::collections::BTreeMap::new();
    for delivery in due {
        by_endpoint.entry(delivery.endpoint.id).or_default().push(delivery);
    }
    let sends = by_endpoint.into_values().map(|batch| send_in_order(batch, &config, now));
    let results: Vec<(DueDelivery, Attempt)> = futures::future::join_all(sends).await.into_iter().flatten().collect();
    let mut records = Vec::with_capacity(results.len());
    let mut failed_endpoints = Vec::new();
    for (due, attempt) in &results {
        let attempts_after = due.delivery.attempts + 1;
        let (status, next_at) = if attempt.error.is_none() {
            ("delivered", now)
        } else if now.saturating_sub(due.delivery.first_at) >= config.retry_window_ms {
            ("failed", now)
        } else {
            ("pending", now.saturating_add(retry_delay(config.retry_first_ms, attempts_after - 1)))
        };
        let outcome = if status == "pending" { "retry" } else { status };
        app.metrics.webhook_deliveries.get_or_create(&crate::metrics::OutcomeLabels { outcome: outcome.into() }).inc();
        if status == "failed" && due.endpoint.enabled {
            failed_endpoints.push((due.endpoint.clone(), due.delivery.first_at));
        }
        records.push((due.delivery.id, attempt.clone(), status, next_at));
    }
    let mut disabled = Vec::new();
    {
        let mut store = webhooks.store.lock().expect("webhook store lock");
        store.record_attempts(&records).map_err(|e| e.to_string())?;
        for (endpoint, since) in failed_endpoints {
            if !store.delivered_since(endpoint.id, since).map_err(|e| e.to_string())? {
                let reason = format!("every delivery failed for {} s", config.retry_window_ms / 1000);
                store
                    .update_endpoint(endpoint.id, &endpoint.url, &endpoint.event_types, false, Some(&reason))
                    .map_err(|e| e.to_string())?;
                disabled.push((endpoint, reason));
            }
        }
    }
    for (endpoint, reason) in disabled {
        let data = json!({"id": format!("whe_{}", endpoint.id), "object": "webhook_endpoint", "url": endpoint.url,
                          "organization": endpoint.organization.map(|o| o.to_string()), "enabled": false, "disabled_reason": reason});
        let notice = Command::Notice {
            kind: "webhook_endpoint.disabled".into(),
            organization: None,
            object: format!("whe_{}", endpoint.id),
            data: data.to_string(),
        };
        if let Err(error) = app.execute(notice).await {
            tracing::error!(code = error.code, "could not record a disabled webhook endpoint");
        }
        tracing::warn!(endpoint = endpoint.id, "webhook endpoint disabled after failing for the whole retry window");
    }
    Ok(true)
}

/// Starts the delivery task, if webhooks are enabled; it runs until aborted.
/// Starts delivery on its own thread, with its own single-threaded runtime, at a
/// lower scheduling priority: deliveries are background work and must never take CPU
/// from requests and the engine when the machine is saturated (they catch up when it
/// is not). The returned task stands for the thread: aborting it stops delivery.
pub fn spawn_dispatcher(app: Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    let webhooks = app.webhooks.clone()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("tally-webhooks".into()).spawn(move || {
        lower_priority();
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(%error, "webhook delivery could not start its runtime");
                return;
            }
        };
        runtime.block_on(async move {
            tokio::select! {
                _ = deliver_forever(&app, &webhooks) => {}
                _ = stopped => {}
            }
        });
        let _ = done.send(());
    });
    if let Err(error) = thread {
        tracing::error!(%error, "webhook delivery thread could not start");
        return None;
    }
    Some(tokio::spawn(async move {
        // Holding `stop` keeps delivery running; dropping it (abort) stops the thread.
        let _stop = stop;
        let _ = finished.await;
    }))
}

async fn deliver_forever(app: &Arc<AppState>, webhooks: &Arc<Webhooks>) {
    loop {
        match round(app, webhooks).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "webhook delivery round failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = webhooks.wake.notified() => {}
        }
    }
}

/// Lowers the calling thread's scheduling priority (Linux: nice 10 for this thread only).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments; on Linux, PRIO_PROCESS
        // with id 0 names the calling thread.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if result != 0 {
            tracing::warn!("could not lower the webhook delivery thread's priority");
        }
    }
}

// ---- API ----

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<Arc<AppState>> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(create_endpoint, list_endpoints))
        .routes(routes!(get_endpoint, update_endpoint, delete_endpoint))
        .routes(routes!(rotate_secret))
        .routes(routes!(list_deliveries))
        .routes(routes!(redeliver))
}

#[derive(Deserialize)]
struct EventQuery {
    after: Option<String>,
    limit: Option<u32>,
    /// Comma-separated event types.
    r#type: Option<String>,
    object: Option<String>,
    from: Option<String>,
    until: Option<String>,
}

fn event_id(field: &str, text: &str) -> Result<u64, ApiError> {
    text.strip_prefix("evt_")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| ApiError::invalid(field, "an event id (evt_...)"))
}

#[utoipa::path(get, path = "/v1/events", tag = "events", summary = "Events, oldest first after the cursor; an organization sees its own", params(("after" = Option<String>, Query, description = "cursor: the last event id seen"), ("limit" = Option<u32>, Query, description = "page size, at most 500"), ("type" = Option<String>, Query, description = "event types, comma-separated"), ("object" = Option<String>, Query, description = "the affected object's id"), ("from" = Option<String>, Query, description = "RFC 3339, inclusive"), ("until" = Option<String>, Query, description = "RFC 3339, exclusive")), responses((status = 200, description = "a page of events", body = EventList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_events(AxumState(app): App, headers: HeaderMap, Query(query): Query<EventQuery>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let parse_time = |field: &str, value: &Option<String>| -> Result<Option<Timestamp>, ApiError> {
        value
            .as_deref()
            .map(|text| time::parse(text).ok_or_else(|| ApiError::invalid(field, "an RFC 3339 time")))
            .transpose()
    };
    let types: Vec<String> = query.r#type.iter().flat_map(|t| t.split(',')).map(String::from).take(32).collect();
    if let Some(unknown) = types.iter().find(|t| !tally_store::events::EVENT_TYPES.contains(&t.as_str())) {
        return Err(ApiError::field("invalid_request", "type", format!("unknown event type {unknown}")));
    }
    let filter = tally_store::EventFilter {
        after: query.after.as_deref().map(|a| event_id("after", a)).transpose()?.unwrap_or(0),
        organization: match &caller {
            Caller::Admin { .. } => None,
            Caller::Organization { organization, .. } => Some(*organization),
        },
        types,
        object: query.object.clone(),
        from: parse_time("from", &query.from)?,
        until: parse_time("until", &query.until)?,
        limit: query.limit.unwrap_or(PAGE_SIZE_DEFAULT),
    };
    let limit = filter.limit.clamp(1, tally_store::PAGE_SIZE_MAX) as usize;
    let rows = app.history(move |reader| reader.events(&filter)).await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|row| {
            let body =
                tally_store::webhooks::event_json(row.id, &row.kind, row.organization, &row.object, row.at, &row.data);
            serde_json::from_str(&body).unwrap_or(Value::Null)
        })
        .collect();
    let next = if rows.len() == limit { rows.last().map(|r| format!("evt_{}", r.id)) } else { None };
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

fn webhooks_of(app: &AppState) -> Result<Arc<Webhooks>, ApiError> {
    app.webhooks.clone().ok_or_else(|| ApiError::new("not_found", "webhooks are not enabled on this server"))
}

fn endpoint_view(endpoint: &Endpoint) -> Value {
    json!({
        "id": format!("whe_{}", endpoint.id),
        "object": "webhook_endpoint",
        "organization": endpoint.organization.map(|o| o.to_string()),
        "url": endpoint.url,
        "event_types": endpoint.event_types,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "created_at": time::format(endpoint.created_at),
    })
}

// ---- response shapes (OpenAPI only) ----
//
// The fields `list_events`, `endpoint_view` and the delivery answers send.

/// Something that happened, as webhooks deliver it.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = Event)]
pub struct EventShape {
    /// `evt_…`, increasing.
    pub id: String,
    /// Always `event`.
    pub object: String,
    /// The event type, for example `operation.created` or `balance.low`.
    pub r#type: String,
    /// The organization it concerns; null for platform-wide events.
    pub organization: Option<String>,
    /// The id of the object it is about.
    pub object_id: String,
    /// When it happened, in Unix milliseconds.
    pub created_at_ms: i64,
    /// The event's object as it was then; its shape depends on `type`.
    pub data: Value,
}
crate::schemas::list!(EventList, EventShape, "A page of events, oldest first; `next_cursor` goes in `after`.");

/// Where Tally sends webhooks.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = WebhookEndpoint)]
pub struct EndpointShape {
    /// `whe_…`
    pub id: String,
    /// Always `webhook_endpoint`.
    pub object: String,
    /// Null: a platform endpoint, which receives every organization's events.
    pub organization: Option<String>,
    pub url: String,
    /// Event types delivered, or `["*"]` for all.
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Why it is disabled (by its owner, or after failing for the whole retry window).
    pub disabled_reason: Option<String>,
    pub created_at: String,
    /// Only in the answers that create the endpoint or rotate its secret: the signing
    /// secret (`whsec_…`), shown once.
    #[schema(nullable = false)]
    pub secret: Option<String>,
    /// Only in the answer that rotates the secret: until when the previous secret
    /// still signs beside the new one.
    #[schema(nullable = false)]
    pub previous_secret_expires_at: Option<String>,
}
/// Webhook endpoints (not paged).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct WebhookEndpointList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<EndpointShape>,
}

/// The answer that deletes an endpoint.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct WebhookEndpointDeleted {
    pub id: String,
    /// Always `webhook_endpoint`.
    pub object: String,
    /// Always true.
    pub deleted: bool,
}

/// One attempt to deliver an event.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = WebhookAttempt)]
pub struct AttemptShape {
    pub at: String,
    /// The receiver's HTTP status; null when no answer came (connection failure, timeout).
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// Why it failed; null when the receiver answered 2xx.
    pub error: Option<String>,
    /// The start of the receiver's answer (up to 256 characters); null without an answer.
    pub response_excerpt: Option<String>,
}

/// One event's delivery to one endpoint, with every attempt.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = WebhookDelivery)]
pub struct DeliveryShape {
    /// `whd_…`
    pub id: String,
    /// Always `webhook_delivery`.
    pub object: String,
    /// The event's id (`evt_…`).
    pub event: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: Vec<AttemptShape>,
    /// When the next attempt is due; null unless pending.
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
}
/// An endpoint's latest deliveries, newest first (not paged).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct WebhookDeliveryList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<DeliveryShape>,
}

/// A delivery queued to be sent again.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct WebhookRedelivery {
    /// `whd_…`
    pub id: String,
    /// Always `webhook_delivery`.
    pub object: String,
    /// Always `pending`.
    pub status: String,
}

fn endpoint_id(text: &str) -> Result<u64, ApiError> {
    text.strip_prefix("whe_").and_then(|n| n.parse().ok()).ok_or_else(ApiError::not_found)
}

fn check_types(types: &[String]) -> Result<Vec<String>, ApiError> {
    if types.is_empty() || types.len() > EVENT_TYPES_MAX {
        return Err(ApiError::field("invalid_request", "event_types", "1 to 64 event types, or [\"*\"]"));
    }
    for kind in types {
        if kind != "*" && !tally_store::events::EVENT_TYPES.contains(&kind.as_str()) {
            return Err(ApiError::field("invalid_request", "event_types", format!("unknown event type {kind}")));
        }
    }
    Ok(types.to_vec())
}

/// An endpoint the caller may manage: its organization's, or any for the platform.
async fn owned_endpoint(app: &AppState, caller: &Caller, id: &str) -> Result<(Arc<Webhooks>, Endpoint), ApiError> {
    let webhooks = webhooks_of(app)?;
    let id = endpoint_id(id)?;
    let endpoint = webhooks.store.lock().expect("webhook store lock").endpoint(id).map_err(store_error)?;
    match endpoint {
        Some(endpoint) if caller.is_admin() || endpoint.organization.is_some_and(|o| caller.owns(o)) => {
            Ok((webhooks, endpoint))
        }
        _ => Err(ApiError::not_found()),
    }
}

fn store_error(error: tally_store::StoreError) -> ApiError {
    tracing::error!(%error, "webhook store failed");
    ApiError::new("internal", "webhook storage is unavailable")
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateEndpoint {
    url: String,
    /// Event types, or ["*"] for all.
    event_types: Vec<String>,
    /// Admin keys: the organization, or none for a platform endpoint (every event).
    organization: Option<String>,
}

#[utoipa::path(post, path = "/v1/webhook-endpoints", tag = "webhooks", summary = "Create a webhook endpoint; its signing secret is shown once", request_body = CreateEndpoint, responses((status = 201, description = "the endpoint created, with its `secret` (shown once)", body = EndpointShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_endpoint(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreateEndpoint>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let webhooks = webhooks_of(&app)?;
    let organization = match (&caller, body.organization.as_deref()) {
        (Caller::Admin { .. }, None) => None,
        (_, Some(text)) => {
            let organization = parse_id("organization", text, OrganizationId::parse)?;
            if !caller.owns(organization) {
                return Err(ApiError::not_found());
            }
            Some(organization)
        }
        (Caller::Organization { organization, .. }, None) => Some(*organization),
    };
    let event_types = check_types(&body.event_types)?;
    let url = check_url(&body.url)?;
    if !webhooks.config.allow_private {
        resolve(&url, false).await.map_err(|detail| ApiError::field("invalid_url", "url", detail))?;
    }
    let secret = new_secret();
    let endpoint = Endpoint {
        id: 0,
        organization,
        url: url.to_string(),
        event_types,
        enabled: true,
        secret: secret.clone(),
        previous_secret: None,
        previous_until: None,
        created_at: app.now(),
        disabled_reason: None,
    };
    let store = webhooks.store.lock().expect("webhook store lock");
    if store.endpoints(organization).map_err(store_error)?.len() >= ENDPOINTS_MAX {
        return Err(ApiError::field("too_many_items", "url", format!("at most {ENDPOINTS_MAX} endpoints")));
    }
    let id = store.create_endpoint(&endpoint).map_err(store_error)?;
    let mut view = endpoint_view(&Endpoint { id, ..endpoint });
    view["secret"] = json!(secret);
    Ok(created(view))
}

#[utoipa::path(get, path = "/v1/webhook-endpoints", tag = "webhooks", summary = "The caller's webhook endpoints (all, for admin keys)", responses((status = 200, description = "the endpoints", body = WebhookEndpointList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_endpoints(AxumState(app): App, headers: HeaderMap) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let webhooks = webhooks_of(&app)?;
    let organization = match &caller {
        Caller::Admin { .. } => None,
        Caller::Organization { organization, .. } => Some(*organization),
    };
    let endpoints = webhooks.store.lock().expect("webhook store lock").endpoints(organization).map_err(store_error)?;
    Ok(ok(json!({"object": "list", "data": endpoints.iter().map(endpoint_view).collect::<Vec<_>>()})))
}

#[utoipa::path(get, path = "/v1/webhook-endpoints/{id}", tag = "webhooks", summary = "Get a webhook endpoint", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the endpoint", body = EndpointShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_endpoint(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    Ok(ok(endpoint_view(&owned_endpoint(&app, &caller, &id).await?.1)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateEndpoint {
    url: Option<String>,
    event_types: Option<Vec<String>>,
    enabled: Option<bool>,
}

#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}", tag = "webhooks", summary = "Change an endpoint's URL, event types or enabled flag", params(("id" = String, Path, description = "the object's id")), request_body = UpdateEndpoint, responses((status = 200, description = "the endpoint after the change", body = EndpointShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn update_endpoint(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateEndpoint>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let (webhooks, endpoint) = owned_endpoint(&app, &caller, &id).await?;
    let url = match body.url.as_deref() {
        Some(text) => {
            let url = check_url(text)?;
            if !webhooks.config.allow_private {
                resolve(&url, false).await.map_err(|detail| ApiError::field("invalid_url", "url", detail))?;
            }
            url.to_string()
        }
        None => endpoint.url.clone(),
    };
    let types = match &body.event_types {
        Some(types) => check_types(types)?,
        None => endpoint.event_types.clone(),
    };
    let enabled = body.enabled.unwrap_or(endpoint.enabled);
    let reason = if enabled { None } else { endpoint.disabled_reason.as_deref().or(Some("disabled by its owner")) };
    let store = webhooks.store.lock().expect("webhook store lock");
    store.update_endpoint(endpoint.id, &url, &types, enabled, reason).map_err(store_error)?;
    let updated = store.endpoint(endpoint.id).map_err(store_error)?.ok_or_else(ApiError::not_found)?;
    Ok(ok(endpoint_view(&updated)))
}

#[utoipa::path(delete, path = "/v1/webhook-endpoints/{id}", tag = "webhooks", summary = "Delete an endpoint (pending deliveries are dropped)", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the endpoint is deleted", body = WebhookEndpointDeleted), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn delete_endpoint(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let (webhooks, endpoint) = owned_endpoint(&app, &caller, &id).await?;
    webhooks.store.lock().expect("webhook store lock").delete_endpoint(endpoint.id).map_err(store_error)?;
    Ok(ok(json!({"id": format!("whe_{}", endpoint.id), "object": "webhook_endpoint", "deleted": true})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// How long the old secret keeps signing beside the new one (default 24 hours, at most 7 days).
    #[serde(default = "default_overlap")]
    overlap_seconds: i64,
}

fn default_overlap() -> i64 {
    24 * 3600
}

#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}/rotate-secret", tag = "webhooks", summary = "Rotate the signing secret; both sign during the overlap; the new one is shown once", params(("id" = String, Path, description = "the object's id")), request_body = Rotate, responses((status = 200, description = "the endpoint with its new `secret` (shown once) and `previous_secret_expires_at`", body = EndpointShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn rotate_secret(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Rotate>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    if !(0..=7 * 24 * 3600).contains(&body.overlap_seconds) {
        return Err(ApiError::invalid("overlap_seconds", "0 to 604800"));
    }
    let (webhooks, endpoint) = owned_endpoint(&app, &caller, &id).await?;
    let secret = new_secret();
    let until = app.now().saturating_add(body.overlap_seconds * 1000);
    webhooks
        .store
        .lock()
        .expect("webhook store lock")
        .rotate_secret(endpoint.id, &secret, until)
        .map_err(store_error)?;
    let mut view = endpoint_view(&endpoint);
    view["secret"] = json!(secret);
    view["previous_secret_expires_at"] = json!(time::format(until));
    Ok(ok(view))
}

#[utoipa::path(get, path = "/v1/webhook-endpoints/{id}/deliveries", tag = "webhooks", summary = "An endpoint's deliveries, newest first, with every attempt", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the endpoint's deliveries with their attempts", body = WebhookDeliveryList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_deliveries(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (webhooks, endpoint) = owned_endpoint(&app, &caller, &id).await?;
    let deliveries = webhooks
        .store
        .lock()
        .expect("webhook store lock")
        .deliveries(endpoint.id, tally_store::PAGE_SIZE_MAX)
        .map_err(store_error)?;
    let data: Vec<Value> = deliveries
        .iter()
        .map(|(delivery, attempts)| {
            json!({
                "id": format!("whd_{}", delivery.id),
                "object": "webhook_delivery",
                "event": format!("evt_{}", delivery.event),
                "status": delivery.status,
                "attempts": attempts.iter().map(|a| json!({
                    "at": time::format(a.at), "status": a.status, "latency_ms": a.latency_ms,
                    "error": a.error, "response_excerpt": a.response_excerpt,
                })).collect::<Vec<_>>(),
                "next_attempt_at": (delivery.status == "pending").then(|| time::format(delivery.next_at)),
                "delivered_at": delivery.delivered_at.map(time::format),
            })
        })
        .collect();
    Ok(ok(json!({"object": "list", "data": data})))
}

#[utoipa::path(post, path = "/v1/webhook-deliveries/{id}/redeliver", tag = "webhooks", summary = "Send a delivery again now", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the delivery, queued to be sent again now", body = WebhookRedelivery), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn redeliver(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let webhooks = webhooks_of(&app)?;
    let delivery_id: u64 = id.strip_prefix("whd_").and_then(|n| n.parse().ok()).ok_or_else(ApiError::not_found)?;
    let delivery = webhooks.store.lock().expect("webhook store lock").delivery(delivery_id).map_err(store_error)?;
    let delivery = delivery.ok_or_else(ApiError::not_found)?;
    owned_endpoint(&app, &caller, &format!("whe_{}", delivery.endpoint)).await?;
    webhooks.store.lock().expect("webhook store lock").redeliver(delivery_id, app.now()).map_err(store_error)?;
    webhooks.wake.notify_one();
    Ok(ok(json!({"id": format!("whd_{delivery_id}"), "object": "webhook_delivery", "status": "pending"})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_tampering_wrong_secrets_and_age() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign(&["whsec_a"], 1_000, body);
        assert_eq!(verify("whsec_a", &header, body, 1_000, 300), Ok(()));
        assert_eq!(verify("whsec_a", &header, body, 1_299, 300), Ok(()));
        assert_eq!(verify("whsec_a", &header, br#"{"id":"evt_2"}"#, 1_000, 300), Err(VerifyError::Mismatch));
        assert_eq!(verify("whsec_b", &header, body, 1_000, 300), Err(VerifyError::Mismatch));
        assert_eq!(verify("whsec_a", &header, body, 1_301, 300), Err(VerifyError::Stale));
        assert_eq!(verify("whsec_a", "v1=00", body, 1_000, 300), Err(VerifyError::Malformed));
        // During a rotation both secrets sign, and either verifies.
        let both = sign(&["whsec_new", "whsec_old"], 1_000, body);
        assert_eq!(verify("whsec_old", &both, body, 1_000, 300), Ok(()));
        assert_eq!(verify("whsec_new", &both, body, 1_000, 300), Ok(()));
    }

    #[test]
    fn private_destinations_are_recognized() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "100.64.0.1",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
        assert!(check_url("ftp://example.com/").is_err());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("https://user:pw@example.com/").is_err());
        assert!(check_url("https://example.com/hook").is_ok());
    }

    #[test]
    fn retries_grow_and_stop_growing() {
        assert_eq!(retry_delay(RETRY_DELAY_FIRST_MS, 0), 10_000);
        assert_eq!(retry_delay(RETRY_DELAY_FIRST_MS, 1), 20_000);
        assert_eq!(retry_delay(RETRY_DELAY_FIRST_MS, 30), RETRY_DELAY_MAX_MS);
    }
}
