//! The black-box test server shared by the API test files.

#![allow(dead_code)]

pub mod contract;
pub mod fake_stripe;

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use tally_engine::{Clock, Engine, EngineConfig, SystemClock};
use tally_server::payments::provider::PaymentProvider;
use tally_server::payments::sandbox::Sandbox;
use tally_server::payments::PaymentsConfig;
pub use tally_server::webhooks::{WebhookConfig, Webhooks};
use tally_server::{generate_key, AppState, KeyRing};
use tally_store::webhooks::WebhookStore;
use tally_store::{ApiKeys, HistoryReader, Projector, SqliteStore};

pub struct Server {
    pub base: String,
    /// The sandbox payment provider, to compare its records with the ledger.
    pub sandbox: Arc<Sandbox>,
    /// The sandbox payout rail.
    pub rail: Arc<tally_server::payouts::SandboxRail>,
    pub admin: String,
    pub client: Client,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    engine: Option<Engine>,
    _directory: tempfile::TempDir,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(true).await
    }

    /// A server whose webhooks may (or may not) call private and loopback addresses;
    /// retries start after 200 ms.
    pub async fn start_with(allow_private: bool) -> Server {
        let directory = tempfile::tempdir().unwrap();
        Server::start_in(directory, allow_private).await
    }

    /// A server on the database in `directory` (kept: a restart reuses it).
    pub async fn start_in(directory: tempfile::TempDir, allow_private: bool) -> Server {
        let config = WebhookConfig { allow_private, retry_first_ms: 200, ..WebhookConfig::default() };
        Server::start_configured(directory, config, None).await
    }

    /// The same, publishing events to NATS when `nats` is given.
    pub async fn start_configured(
        directory: tempfile::TempDir,
        webhooks: WebhookConfig,
        nats: Option<tally_server::nats::NatsConfig>,
    ) -> Server {
        Server::start_full(directory, webhooks, nats, None).await
    }

    /// A server paying through `provider` (instead of the sandbox), taking provider
    /// webhooks signed with `webhook_secret`.
    pub async fn start_with_provider(provider: Arc<dyn PaymentProvider>, webhook_secret: &str) -> Server {
        let directory = tempfile::tempdir().unwrap();
        let webhooks = WebhookConfig { allow_private: true, retry_first_ms: 200, ..WebhookConfig::default() };
        Server::start_full(directory, webhooks, None, Some((provider, webhook_secret.to_string()))).await
    }

    async fn start_full(
        directory: tempfile::TempDir,
        webhooks: WebhookConfig,
        nats: Option<tally_server::nats::NatsConfig>,
        provider: Option<(Arc<dyn PaymentProvider>, String)>,
    ) -> Server {
        let path = directory.path().join("api.db");
        let store = SqliteStore::open(&path).unwrap();
        let projector = Arc::new(Projector::spawn(&path).unwrap());
        let notify = projector.clone();
        let clock = Arc::new(SystemClock);
        let engine =
            Engine::start(store, clock.clone(), EngineConfig::default(), Some(Box::new(move |_| notify.notify())))
                .unwrap();
        let keys = KeyRing::new(ApiKeys::open(&path).unwrap()).unwrap();
        let admin = keys.insert(generate_key(None, true, "test", clock.now(), None)).unwrap().secret;
        let webhooks = Webhooks::new(WebhookStore::open(&path).unwrap(), webhooks);
        // Slow sandbox payments confirm after 300 ms; the payment worker looks every 50 ms.
        let sandbox = Arc::new(
            Sandbox::open(&directory.path().join("tally.sandbox.db"), std::time::Duration::from_millis(300)).unwrap(),
        );
        let rail = Arc::new(
            tally_server::payouts::SandboxRail::open(
                &directory.path().join("tally.sandbox.db"),
                std::time::Duration::from_millis(300),
            )
            .unwrap(),
        );
        let mut payments = PaymentsConfig {
            poll: std::time::Duration::from_millis(50),
            retry_after: std::time::Duration::from_millis(200),
            abort_after_capture: false,
            webhook_secret: None,
        };
        let provider: Arc<dyn PaymentProvider> = match provider {
            Some((provider, secret)) => {
                // With webhooks, polling only backs them up: slow, so tests see webhooks work.
                payments.retry_after = std::time::Duration::from_secs(3600);
                payments.webhook_secret = Some(secret);
                provider
            }
            None => sandbox.clone(),
        };
        let state = Arc::new(
            AppState::new(engine.handle(), projector, HistoryReader::open(&path).unwrap(), keys, clock)
                .with_webhooks(webhooks)
                .with_payments(provider, payments)
                .with_payouts(tally_server::payouts::PayoutService::new(
                    rail.clone(),
                    false,
                    true,
                    std::time::Duration::from_millis(50),
                )),
        );
        let state = match nats {
            Some(config) => Arc::new(Arc::into_inner(state).unwrap().with_nats(config)),
            None => state,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tally_server::serve(listener, state.clone(), async move {
            let _ = signal.await;
        }));
        Server {
            base,
            sandbox,
            rail,
            admin,
            client: Client::new(),
            state,
            shutdown: Some(shutdown),
            engine: Some(engine),
            _directory: directory,
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        idempotency: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method.parse().unwrap(), format!("{}{}", self.base, path))
            .header("Authorization", format!("Bearer {key}"));
        if let Some(idempotency) = idempotency {
            request = request.header("Idempotency-Key", idempotency);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        contract::check(method, path, status.as_u16(), &content_type, &body);
        (status, body)
    }

    pub async fn post(&self, path: &str, key: &str, idempotency: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call("POST", path, key, idempotency, Some(body)).await
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call("GET", path, key, None, None).await
    }

    /// An organization with a USD wallet; returns (org id, wallet id, org key).
    pub async fn organization(&self, name: &str) -> (String, String, String) {
        let (status, org) = self.post("/v1/organizations", &self.admin, None, json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        let org = org["id"].as_str().unwrap().to_string();
        let (status, wallet) =
            self.post(&format!("/v1/organizations/{org}/wallets"), &self.admin, None, json!({"currency": "USD"})).await;
        assert_eq!(status, StatusCode::CREATED, "{wallet}");
        let (status, key) = self.post("/v1/api-keys", &self.admin, None, json!({"organization": org})).await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        (org, wallet["id"].as_str().unwrap().to_string(), key["secret"].as_str().unwrap().to_string())
    }

    pub async fn credit(&self, wallet: &str, amount: &str, key: &str) {
        let (status, body) = self
            .post(
                &format!("/v1/wallets/{wallet}/adjustments"),
                &self.admin,
                Some(key),
                json!({"direction": "credit", "amount": amount, "currency": "USD", "reason": "test"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn wallet(&self, wallet: &str) -> Value {
        self.get(&format!("/v1/wallets/{wallet}"), &self.admin).await.1
    }

    pub async fn stop(self) {
        drop(self.stop_keeping_data().await);
    }

    /// Stops the server and hands back its data directory, for a restart.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        let _ = self.shutdown.take().unwrap().send(());
        let engine = self.engine.take().unwrap();
        tokio::task::spawn_blocking(move || engine.shutdown()).await.unwrap();
        // Let the server task finish (it aborts webhook delivery) before the data goes.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(self.state);
        self._directory
    }
}
