//! `tally serve` on PostgreSQL: any number of nodes share one database; one holds the
//! writer's lease and runs the engine; the others are standbys that follow the journal,
//! serve reads from it, answer writes with 503 and the leader's address, and take over
//! when the lease lapses.
//!
//! The lease is a row (holder, epoch, expiry by the database's clock). The leader renews
//! it on its own connection; every journal commit checks holder and epoch in the same
//! transaction (fencing), so a leader that lost the lease (paused, partitioned) can
//! never commit. A leader that finds its lease taken steps down by exiting: whatever it
//! had in memory is stale, and its supervisor restarts it as a standby.

use crate::{app_state, bootstrap_key, engine_config, shutdown_signal, ServeArgs};
use anyhow::{bail, Context};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tally_engine::{Engine, Follower, SystemClock};
use tally_store::{ApiKeys, JournalMirror, PostgresStore, Projector, SqliteStore};
use tower::ServiceExt;

/// How often a standby reads new journal records.
const FOLLOW_POLL_MS: u64 = 100;

/// The exit status of a leader that lost its lease (EX_TEMPFAIL: start again).
pub const STEPPED_DOWN: i32 = 75;

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let url = args.database.postgres_url().context("a postgres:// database URL")?.to_string();
    let schema = args.database.database_schema.clone();
    if args.lease_renew_ms == 0 || args.lease_renew_ms * 2 > args.lease_ms {
        bail!("--lease-renew-ms must be positive and at most half of --lease-ms");
    }
    let lease_ms = args.lease_ms as i64;
    let local = args.database.local_path()?;
    let _lock = crate::lock_files(&local)?;
    // The node's local file: its copy of the journal, history, webhook deliveries.
    drop(SqliteStore::open(&local).with_context(|| format!("opening {}", local.display()))?);
    // The store first: it creates the schema and brings the tables up to date.
    let mut store = PostgresStore::open_in_schema(&url, schema.as_deref()).context("connecting to PostgreSQL")?;
    let mut lease = PostgresStore::open_in_schema(&url, schema.as_deref())?;
    let projector = Arc::new(Projector::spawn(&local)?);
    let copied = projector.clone();
    let mirror =
        Arc::new(JournalMirror::spawn(&url, schema.as_deref(), &local, Duration::from_millis(200), move || {
            copied.notify()
        })?);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&args.listen))
        .with_context(|| format!("listening on {}", args.listen))?;
    let address = match &args.advertise_url {
        Some(url) => url.clone(),
        None => format!("http://{}", listener.local_addr()?),
    };
    // Unique per process, so two processes can never share an epoch.
    let holder = format!("{address}#{:016x}", rand::random::<u64>());
    let leader: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let current = Arc::new(RwLock::new(standby_router(leader.clone())));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let server = {
        let current = current.clone();
        let service = Router::new().fallback(move |request: Request| {
            let router = current.read().expect("router lock").clone();
            async move { router.oneshot(request).await.unwrap_or_else(|never| match never {}) }
        });
        let mut stopped = stopped.clone();
        runtime.spawn(async move {
            axum::serve(listener, service)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await
        })
    };
    tracing::info!(%address, node = %holder, "tally node started on PostgreSQL; standby until it holds the lease");

    // Standby: follow the journal and serve reads from it, trying for the lease until
    // it is ours.
    let clock = Arc::new(SystemClock);
    let follower = Follower::start(
        PostgresStore::open_in_schema(&url, schema.as_deref())?,
        Duration::from_millis(FOLLOW_POLL_MS),
        leader.clone(),
    )
    .context("loading the ledger from PostgreSQL to follow it")?;
    {
        crate::memory::serving();
        let keys = tally_server::KeyRing::new(ApiKeys::open_postgres(&url, schema.as_deref())?)?;
        let standby = app_state(&args, &local, follower.handle(), projector.clone(), keys, clock.clone())?;
        *current.write().expect("router lock") = tally_server::router(standby);
    }
    let epoch = loop {
        if *stopped.borrow() {
            runtime.block_on(server)??;
            projector.stop();
            return Ok(());
        }
        match lease.acquire_lease(&holder, lease_ms) {
            Ok(Some(epoch)) => break epoch,
            Ok(None) => {
                if let Ok(Some(held)) = lease.lease() {
                    let address = held.holder.split('#').next().unwrap_or_default().to_string();
                    *leader.lock().expect("leader lock") = Some(address);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot reach PostgreSQL for the lease; retrying"),
        }
        std::thread::sleep(Duration::from_millis(args.takeover_poll_ms.max(10)));
    };
    let took_over = Instant::now();
    store.adopt_lease(&holder, epoch);
    spawn_renewal(lease, Duration::from_millis(args.lease_renew_ms), lease_ms);
    follower.stop();

    // Leader: load the ledger from the database and serve.
    let notify = mirror.clone();
    let engine = Engine::start(store, clock.clone(), engine_config(&args), Some(Box::new(move |_| notify.notify())))
        .context("loading the ledger from PostgreSQL")?;
    let keys = tally_server::KeyRing::new(ApiKeys::open_postgres(&url, schema.as_deref())?)?;
    bootstrap_key(&keys, &*clock)?;
    let state = app_state(&args, &local, engine.handle(), projector.clone(), keys, clock)?;
    let workers = {
        let _guard = runtime.enter();
        tally_server::spawn_workers(&state)
    };
    *current.write().expect("router lock") = tally_server::router(state);
    tracing::info!(epoch, load_ms = took_over.elapsed().as_millis() as u64, "this node is the leader");

    runtime.block_on(server)??;
    for worker in workers {
        worker.abort();
    }
    tracing::info!("shutting down: draining the engine queue");
    engine.shutdown();
    drop(mirror);
    projector.stop();
    Ok(())
}

/// Renews the lease every `every` on its own connection; exits the process the moment
/// the lease turns out to be another node's.
fn spawn_renewal(mut lease: PostgresStore, every: Duration, lease_ms: i64) {
    std::thread::Builder::new()
        .name("tally-lease".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            match lease.renew_lease(lease_ms) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!("another node holds the writer's lease now; stepping down");
                    std::process::exit(STEPPED_DOWN);
                }
                Err(error) => tracing::warn!(%error, "renewing the lease failed; retrying"),
            }
        })
        .expect("spawn lease thread");
}

/// What a node answers while it loads the ledger to follow it: healthy, not ready,
/// and 503 `not_leader` with the leader's address for everything else.
fn standby_router(leader: Arc<Mutex<Option<String>>>) -> Router {
    Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok", "role": "standby"})) }),
        )
        .fallback(move || {
            let leader = leader.lock().expect("leader lock").clone();
            async move { not_leader(leader) }
        })
}

fn not_leader(leader: Option<String>) -> Response {
    let body = serde_json::json!({
        "type": "https://docs.tally.dev/errors#not_leader",
        "title": "not_leader",
        "status": 503,
        "code": "not_leader",
        "detail": "this node is a standby; send requests to the leader",
        "leader": leader,
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "application/problem+json"), (header::RETRY_AFTER, "1")],
        body.to_string(),
    )
        .into_response()
}
