//! Webhook endpoints and their deliveries, in a file of their own beside the ledger
//! (`tally.webhooks.db`): they are configuration and delivery state, not ledger state,
//! and delivery bookkeeping writes often, so it must not take the ledger's write lock.
//! Events are read from the history file, attached read-only.

use crate::sqlite::{history_path, migrate, open_connection};
use crate::StoreError;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use tally_ledger::{OrganizationId, Timestamp};

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE endpoints (
        id INTEGER PRIMARY KEY,
        organization INTEGER,
        url TEXT NOT NULL,
        event_types TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        secret TEXT NOT NULL,
        previous_secret TEXT,
        previous_until INTEGER,
        created_at INTEGER NOT NULL,
        disabled_reason TEXT
    );
    CREATE TABLE cursor (id INTEGER PRIMARY KEY CHECK (id = 1), event INTEGER NOT NULL);
    INSERT INTO cursor (id, event) VALUES (1, 0);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        endpoint INTEGER NOT NULL,
        event INTEGER NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at INTEGER NOT NULL,
        first_at INTEGER NOT NULL,
        delivered_at INTEGER,
        UNIQUE (endpoint, event)
    );
    CREATE INDEX deliveries_due ON deliveries (status, next_at);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery INTEGER NOT NULL,
        at INTEGER NOT NULL,
        status INTEGER,
        latency_ms INTEGER NOT NULL,
        error TEXT,
        response_excerpt TEXT
    );
    CREATE INDEX attempts_by_delivery ON attempts (delivery);",
    // Event sinks (NATS): the last event each one published.
    "CREATE TABLE sinks (name TEXT PRIMARY KEY, event INTEGER NOT NULL);",
];

/// The webhook file beside a ledger file: `tally.db` → `tally.webhooks.db`.
pub fn webhooks_path(path: &Path) -> PathBuf {
    path.with_extension("webhooks.db")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub id: u64,
    /// None: the platform's endpoint, which receives every organization's events.
    pub organization: Option<OrganizationId>,
    pub url: String,
    /// Event types, or `*` for all.
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub secret: String,
    /// The secret before the last rotation, still signing until `previous_until`.
    pub previous_secret: Option<String>,
    pub previous_until: Option<Timestamp>,
    pub created_at: Timestamp,
    pub disabled_reason: Option<String>,
}

impl Endpoint {
    pub fn wants(&self, kind: &str, organization: Option<OrganizationId>) -> bool {
        let owner_ok = self.organization.is_none() || self.organization == organization;
        owner_ok && self.enabled && self.event_types.iter().any(|t| t == "*" || t == kind)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: u64,
    pub endpoint: u64,
    pub event: u64,
    pub status: String,
    pub attempts: u32,
    pub next_at: Timestamp,
    pub first_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub at: Timestamp,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

/// A due delivery with what sending it needs.
#[derive(Clone, Debug)]
pub struct DueDelivery {
    pub delivery: Delivery,
    pub endpoint: Endpoint,
    /// The event's JSON body, as it is sent.
    pub body: String,
}

pub struct WebhookStore {
    connection: Connection,
}

const ENDPOINT_COLUMNS: &str = "id, organization, url, event_types, enabled, secret, previous_secret, previous_until,
    created_at, disabled_reason";

fn endpoint_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Endpoint> {
    Ok(Endpoint {
        id: row.get::<_, i64>(0)? as u64,
        organization: row.get::<_, Option<i64>>(1)?.map(|o| OrganizationId(o as u64)),
        url: row.get(2)?,
        event_types: row.get::<_, String>(3)?.split(',').filter(|t| !t.is_empty()).map(String::from).collect(),
        enabled: row.get::<_, i64>(4)? != 0,
        secret: row.get(5)?,
        previous_secret: row.get(6)?,
        previous_until: row.get(7)?,
        created_at: row.get(8)?,
        disabled_reason: row.get(9)?,
    })
}

const DELIVERY_COLUMNS: &str = "id, endpoint, event, status, attempts, next_at, first_at, delivered_at";

fn delivery_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: row.get::<_, i64>(0)? as u64,
        endpoint: row.get::<_, i64>(1)? as u64,
        event: row.get::<_, i64>(2)? as u64,
        status: row.get(3)?,
        attempts: row.get::<_, i64>(4)? as u32,
        next_at: row.get(5)?,
        first_at: row.get(6)?,
        delivered_at: row.get(7)?,
    })
}

impl WebhookStore {
    /// Opens (creating) the webhook file of the ledger at `path`, with history attached.
    pub fn open(path: impl AsRef<Path>) -> Result<WebhookStore, StoreError> {
        let path = path.as_ref();
        let mut connection = open_connection(&webhooks_path(path))?;
        // Losing the last moments of delivery bookkeeping to a power cut only repeats
        // deliveries (which are at least once anyway), so a sync per commit is not
        // worth its disk time next to the ledger's.
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut connection, MIGRATIONS)?;
        connection.execute("ATTACH DATABASE ?1 AS history", params![history_path(path).to_string_lossy()])?;
        Ok(WebhookStore { connection })
    }

    pub fn create_endpoint(&self, endpoint: &Endpoint) -> Result<u64, StoreError> {
        self.connection.execute(
            "INSERT INTO endpoints (organization, url, event_types, enabled, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                endpoint.organization.map(|o| o.0 as i64),
                endpoint.url,
                endpoint.event_types.join(","),
                endpoint.enabled,
                endpoint.secret,
                endpoint.created_at
            ],
        )?;
        Ok(self.connection.last_insert_rowid() as u64)
    }

    pub fn endpoint(&self, id: u64) -> Result<Option<Endpoint>, StoreError> {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ?1");
        Ok(self.connection.query_row(&sql, params![id as i64], endpoint_row).optional()?)
    }

    /// Endpoints of an organization, or every endpoint for `None` (the platform).
    pub fn endpoints(&self, organization: Option<OrganizationId>) -> Result<Vec<Endpoint>, StoreError> {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE ?1 IS NULL OR organization = ?1 ORDER BY id");
        let mut statement = self.connection.prepare_cached(&sql)?;
        let rows = statement.query_map(params![organization.map(|o| o.0 as i64)], endpoint_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn update_endpoint(
        &self,
        id: u64,
        url: &str,
        event_types: &[String],
        enabled: bool,
        disabled_reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.connection.execute(
            "UPDATE endpoints SET url = ?2, event_types = ?3, enabled = ?4, disabled_reason = ?5 WHERE id = ?1",
            params![id as i64, url, event_types.join(","), enabled, disabled_reason],
        )?;
        Ok(())
    }

    pub fn delete_endpoint(&self, id: u64) -> Result<(), StoreError> {
        self.connection.execute("DELETE FROM endpoints WHERE id = ?1", params![id as i64])?;
        self.connection
            .execute("DELETE FROM deliveries WHERE endpoint = ?1 AND status = 'pending'", params![id as i64])?;
        Ok(())
    }

    /// Replaces the secret; the old one keeps signing until `previous_until`.
    pub fn rotate_secret(&self, id: u64, secret: &str, previous_until: Timestamp) -> Result<(), StoreError> {
        self.connection.execute(
            "UPDATE endpoints SET previous_secret = secret, previous_until = ?3, secret = ?2 WHERE id = ?1",
            params![id as i64, secret, previous_until],
        )?;
        Ok(())
    }

    /// Creates a pending delivery for every endpoint that wants each new event, up to
    /// `limit` events after the cursor; returns how many events it looked at.
    pub fn fan_out(&mut self, now: Timestamp, limit: u32) -> Result<usize, StoreError> {
        let transaction = self.connection.transaction()?;
        let cursor: i64 = transaction.query_row("SELECT event FROM cursor WHERE id = 1", [], |row| row.get(0))?;
        let endpoints: Vec<Endpoint> = {
            let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE enabled = 1");
            let mut statement = transaction.prepare(&sql)?;
            let rows = statement.query_map([], endpoint_row)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let events: Vec<(i64, String, Option<i64>)> = {
            let mut statement = transaction
                .prepare("SELECT id, type, organization FROM history.events WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let rows = statement
                .query_map(params![cursor, i64::from(limit)], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        {
            let mut insert = transaction.prepare(
                "INSERT OR IGNORE INTO deliveries (endpoint, event, status, attempts, next_at, first_at)
                 VALUES (?1, ?2, 'pending', 0, ?3, ?3)",
            )?;
            for (id, kind, organization) in &events {
                let organization = organization.map(|o| OrganizationId(o as u64));
                for endpoint in endpoints.iter().filter(|e| e.wants(kind, organization)) {
                    insert.execute(params![endpoint.id as i64, id, now])?;
                }
            }
        }
        if let Some((last, _, _)) = events.last() {
            transaction.execute("UPDATE cursor SET event = ?1 WHERE id = 1", params![last])?;
        }
        transaction.commit()?;
        Ok(events.len())
    }

    /// Pending deliveries due at `now`, with their endpoint and body: up to
    /// `per_endpoint` of each endpoint, oldest event first, to be sent one at a time in
    /// that order (a delivery waiting for a retry does not hold back the ones after it).
    pub fn due(&self, now: Timestamp, per_endpoint: usize, limit: u32) -> Result<Vec<DueDelivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE status = 'pending' AND next_at <= ?1 ORDER BY event, id LIMIT ?2"
        );
        let deliveries: Vec<Delivery> = {
            let mut statement = self.connection.prepare_cached(&sql)?;
            let rows = statement.query_map(params![now, i64::from(limit)], delivery_row)?;
            let mut taken: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
            let mut oldest = Vec::new();
            for delivery in rows {
                let delivery = delivery?;
                let count = taken.entry(delivery.endpoint).or_default();
                if *count < per_endpoint {
                    *count += 1;
                    oldest.push(delivery);
                }
            }
            oldest
        };
        let mut endpoints: std::collections::HashMap<u64, Option<Endpoint>> = std::collections::HashMap::new();
        let mut due = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let endpoint = match endpoints.entry(delivery.endpoint) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.get().clone(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(self.endpoint(delivery.endpoint)?).clone()
                }
            };
            let Some(endpoint) = endpoint else { continue };
            let event: Option<(String, Option<i64>, String, i64, String)> = self
                .connection
                .query_row(
                    "SELECT type, organization, object, at, data FROM history.events WHERE id = ?1",
                    params![delivery.event as i64],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
                )
                .optional()?;
            let Some((kind, organization, object, at, data)) = event else { continue };
            let data = crate::events::event_data(&self.connection, "history", &kind, &object, data)?;
            let body =
                event_json(delivery.event, &kind, organization.map(|o| OrganizationId(o as u64)), &object, at, &data);
            due.push(DueDelivery { delivery, endpoint, body });
        }
        Ok(due)
    }

    /// Records attempts and their deliveries' new states (status, next attempt), in one
    /// transaction.
    pub fn record_attempts(&mut self, records: &[(u64, Attempt, &str, Timestamp)]) -> Result<(), StoreError> {
        let transaction = self.connection.transaction()?;
        for (delivery, attempt, status, next_at) in records {
            transaction.execute(
                "INSERT INTO attempts (delivery, at, status, latency_ms, error, response_excerpt) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    *delivery as i64,
                    attempt.at,
                    attempt.status.map(i64::from),
                    attempt.latency_ms as i64,
                    attempt.error,
                    attempt.response_excerpt
                ],
            )?;
            transaction.execute(
                "UPDATE deliveries SET attempts = attempts + 1, status = ?2, next_at = ?3,
                    delivered_at = CASE WHEN ?2 = 'delivered' THEN ?4 ELSE delivered_at END WHERE id = ?1",
                params![*delivery as i64, status, next_at, attempt.at],
            )?;
        }
        transaction.commit()?;
        Ok(())
    }

    /// Whether an endpoint delivered anything since `since`.
    pub fn delivered_since(&self, endpoint: u64, since: Timestamp) -> Result<bool, StoreError> {
        let found: Option<i64> = self
            .connection
            .query_row(
                "SELECT 1 FROM deliveries WHERE endpoint = ?1 AND status = 'delivered' AND delivered_at >= ?2 LIMIT 1",
                params![endpoint as i64, since],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    pub fn delivery(&self, id: u64) -> Result<Option<Delivery>, StoreError> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?1");
        Ok(self.connection.query_row(&sql, params![id as i64], delivery_row).optional()?)
    }

    /// An endpoint's deliveries, newest first, each with its attempts.
    pub fn deliveries(&self, endpoint: u64, limit: u32) -> Result<Vec<(Delivery, Vec<Attempt>)>, StoreError> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE endpoint = ?1 ORDER BY id DESC LIMIT ?2");
        let deliveries: Vec<Delivery> = {
            let mut statement = self.connection.prepare_cached(&sql)?;
            let rows = statement.query_map(params![endpoint as i64, i64::from(limit)], delivery_row)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let mut out = Vec::with_capacity(deliveries.len());
        let mut statement = self.connection.prepare_cached(
            "SELECT at, status, latency_ms, error, response_excerpt FROM attempts WHERE delivery = ?1 ORDER BY id",
        )?;
        for delivery in deliveries {
            let attempts = statement
                .query_map(params![delivery.id as i64], |row| {
                    Ok(Attempt {
                        at: row.get(0)?,
                        status: row.get::<_, Option<i64>>(1)?.map(|s| s as u16),
                        latency_ms: row.get::<_, i64>(2)? as u64,
                        error: row.get(3)?,
                        response_excerpt: row.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            out.push((delivery, attempts));
        }
        Ok(out)
    }

    /// The last event a sink published (0 for none).
    pub fn sink_cursor(&self, name: &str) -> Result<u64, StoreError> {
        let found: Option<i64> = self
            .connection
            .query_row("SELECT event FROM sinks WHERE name = ?1", params![name], |row| row.get(0))
            .optional()?;
        Ok(found.unwrap_or(0) as u64)
    }

    pub fn set_sink_cursor(&self, name: &str, event: u64) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO sinks (name, event) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET event = ?2",
            params![name, event as i64],
        )?;
        Ok(())
    }

    /// Events after `after`, oldest first: (id, type, body as delivered).
    pub fn events_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, String, String)>, StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT id, type, organization, object, at, data FROM history.events WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = statement.query_map(params![after as i64, i64::from(limit)], |row| {
            let id = row.get::<_, i64>(0)? as u64;
            let kind: String = row.get(1)?;
            let organization = row.get::<_, Option<i64>>(2)?.map(|o| OrganizationId(o as u64));
            let object: String = row.get(3)?;
            Ok((id, kind, organization, object, row.get::<_, i64>(4)?, row.get::<_, String>(5)?))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (id, kind, organization, object, at, data) = row?;
            let data = crate::events::event_data(&self.connection, "history", &kind, &object, data)?;
            let body = event_json(id, &kind, organization, &object, at, &data);
            events.push((id, kind, body));
        }
        Ok(events)
    }

    /// Deliveries waiting to be sent or retried.
    pub fn backlog(&self) -> Result<u64, StoreError> {
        let count: i64 =
            self.connection
                .query_row("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'", [], |row| row.get(0))?;
        Ok(count as u64)
    }

    /// Sends a delivery again now, whatever its state.
    pub fn redeliver(&self, id: u64, now: Timestamp) -> Result<(), StoreError> {
        self.connection.execute(
            "UPDATE deliveries SET status = 'pending', next_at = ?2, first_at = ?2 WHERE id = ?1",
            params![id as i64, now],
        )?;
        Ok(())
    }
}

/// The JSON body of an event, as the API lists it and webhooks deliver it.
pub fn event_json(
    id: u64,
    kind: &str,
    organization: Option<OrganizationId>,
    object: &str,
    at: Timestamp,
    data: &str,
) -> String {
    let data: serde_json::Value = serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "id": format!("evt_{id}"),
        "object": "event",
        "type": kind,
        "organization": organization.map(|o| o.to_string()),
        "object_id": object,
        "created_at_ms": at,
        "data": data,
    })
    .to_string()
}
