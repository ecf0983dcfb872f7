//! `/metrics` in the Prometheus (OpenMetrics) text format, and the request middleware
//! that counts requests, times them and gives each a request id on every log line.

use super::*;
use axum::extract::MatchedPath;
use axum::middleware::Next;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use tracing::Instrument;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PaymentLabels {
    /// top_up, checkout or refund.
    pub kind: String,
    /// succeeded, failed or pending (the provider has not answered finally yet).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Webhook delivery attempts by outcome (delivered, retry, failed).
    pub webhook_deliveries: Family<OutcomeLabels, Counter>,
    /// Provider conversations about payments by kind and outcome.
    pub payments: Family<PaymentLabels, Counter>,
}

impl Metrics {
    pub fn new(handle: &Handle) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let webhook_deliveries = Family::<OutcomeLabels, Counter>::default();
        let payments = Family::<PaymentLabels, Counter>::default();
        registry.register(
            "tally_payments",
            "Payments settled or left pending after asking the provider, by kind and outcome",
            payments.clone(),
        );
        registry.register("tally_http_requests", "HTTP requests by route and status", requests.clone());
        registry.register("tally_http_request_seconds", "HTTP request latency by route", latency.clone());
        registry.register(
            "tally_webhook_deliveries",
            "Webhook delivery attempts by outcome",
            webhook_deliveries.clone(),
        );
        registry.register("tally_engine_batch_size", "Requests per engine batch", handle.stats().batch_sizes.clone());
        registry.register(
            "tally_engine_commit_seconds",
            "Journal commit latency",
            handle.stats().commit_seconds.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { handle: handle.clone() }));
        Metrics { registry: Mutex::new(registry), requests, latency, webhook_deliveries, payments }
    }

    pub fn count_payment(&self, kind: &str, outcome: &str) {
        self.payments.get_or_create(&PaymentLabels { kind: kind.into(), outcome: outcome.into() }).inc();
    }

    /// Adds the webhook backlog gauge.
    pub fn watch_webhooks(&self, webhooks: Arc<webhooks::Webhooks>) {
        self.registry.lock().expect("metrics lock").register_collector(Box::new(BacklogCollector { webhooks }));
    }

    fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("metrics lock");
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::error!(%error, "metrics encoding failed");
        }
        text
    }
}

/// The engine's counters, read at each scrape.
struct EngineCollector {
    handle: Handle,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.handle.stats();
        let depth = ConstGauge::new(self.handle.queue_depth() as i64);
        depth.encode(encoder.encode_descriptor(
            "tally_engine_queue_depth",
            "Requests waiting for the writer",
            None,
            depth.metric_type(),
        )?)?;
        let durable = ConstGauge::new(stats.durable_seq.load(Ordering::Relaxed) as i64);
        durable.encode(encoder.encode_descriptor(
            "tally_engine_durable_seq",
            "The last durable journal sequence",
            None,
            durable.metric_type(),
        )?)?;
        let failures = ConstCounter::new(stats.storage_failures.load(Ordering::Relaxed));
        failures.encode(encoder.encode_descriptor(
            "tally_engine_storage_failures",
            "Failed journal commits",
            None,
            failures.metric_type(),
        )?)?;
        let commands = Family::<KindLabels, Counter>::default();
        for (index, kind) in Command::KINDS.iter().enumerate() {
            let count = stats.commands[index].load(Ordering::Relaxed);
            commands.get_or_create(&KindLabels { kind: kind.to_string() }).inc_by(count);
        }
        commands.encode(encoder.encode_descriptor(
            "tally_engine_commands",
            "Commands applied, by kind",
            None,
            commands.metric_type(),
        )?)?;
        let rejections = Family::<CodeLabels, Counter>::default();
        for rejection in Rejection::ALL {
            let count = stats.rejections[rejection.index()].load(Ordering::Relaxed);
            if count > 0 {
                rejections.get_or_create(&CodeLabels { code: rejection.code().to_string() }).inc_by(count);
            }
        }
        rejections.encode(encoder.encode_descriptor(
            "tally_engine_rejections",
            "Commands refused, by code",
            None,
            rejections.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Pending webhook deliveries, counted at each scrape.
struct BacklogCollector {
    webhooks: Arc<webhooks::Webhooks>,
}

impl std::fmt::Debug for BacklogCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BacklogCollector")
    }
}

impl Collector for BacklogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let backlog = self.webhooks.store.lock().map(|store| store.backlog().unwrap_or(0)).unwrap_or(0);
        let gauge = ConstGauge::new(backlog as i64);
        gauge.encode(encoder.encode_descriptor(
            "tally_webhook_backlog",
            "Webhook deliveries waiting to be sent or retried",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Counts and times every routed request, and runs it in a span carrying its request
/// id (the client's `X-Request-Id`, or a new one), which the answer also carries.
pub async fn track(AxumState(app): App, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(String::from)
        .unwrap_or_else(|| {
            let mut bytes = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        });
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);
    let started = std::time::Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    span.in_scope(|| tracing::debug!(status, seconds, "answered"));
    let labels = RequestLabels { method: method.clone(), route: route.clone(), status: status.to_string() };
    app.metrics.requests.get_or_create(&labels).inc();
    app.metrics.latency.get_or_create(&RouteLabels { method, route }).observe(seconds);
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[utoipa::path(get, path = "/metrics", tag = "health", summary = "Metrics in the Prometheus (OpenMetrics) text format", responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn metrics(AxumState(app): App) -> Response {
    let mut response = (StatusCode::OK, app.metrics.render()).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
