//! API keys, as the server stores them: only a hash of the secret, its visible prefix,
//! its owner and its limits. Keys are not ledger state; they live in their own table,
//! in SQLite or (for a cluster of nodes) in PostgreSQL.

use crate::sqlite::open_connection;
use crate::StoreError;
use rusqlite::{params, Connection};
use std::path::Path;
use tally_ledger::{OrganizationId, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: u64,
    /// The first characters of the secret, shown in listings to tell keys apart.
    pub prefix: String,
    /// BLAKE3 of the whole secret.
    pub hash: [u8; 32],
    /// None for a platform admin key.
    pub organization: Option<OrganizationId>,
    /// Comma-separated scopes: read, write.
    pub scopes: String,
    pub name: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

/// Where the key table lives: the embedded database, or PostgreSQL (shared by every
/// node of a cluster, so a key works whichever node answers).
enum Backend {
    Sqlite(Connection),
    Postgres { client: Box<postgres::Client>, url: String, schema: Option<String> },
}

pub struct ApiKeys {
    backend: Backend,
}

fn pg(error: postgres::Error) -> StoreError {
    crate::postgres::database(error)
}

const COLUMNS: &str = "id, prefix, hash, organization, scopes, name, created_at, expires_at, revoked_at";

impl ApiKeys {
    /// Opens the key table of a database that `SqliteStore::open` has migrated.
    pub fn open(path: impl AsRef<Path>) -> Result<ApiKeys, StoreError> {
        Ok(ApiKeys { backend: Backend::Sqlite(open_connection(path.as_ref())?) })
    }

    /// Opens the key table of a PostgreSQL database that `PostgresStore::open` has migrated.
    pub fn open_postgres(url: &str, schema: Option<&str>) -> Result<ApiKeys, StoreError> {
        let client = Box::new(crate::postgres::connect(url, schema)?);
        Ok(ApiKeys { backend: Backend::Postgres { client, url: url.to_string(), schema: schema.map(str::to_string) } })
    }

    /// Connects again if the PostgreSQL connection was lost (a database restart).
    fn reconnect_if_closed(&mut self) -> Result<(), StoreError> {
        if let Backend::Postgres { client, url, schema } = &mut self.backend {
            if client.is_closed() {
                **client = crate::postgres::connect(url, schema.as_deref())?;
            }
        }
        Ok(())
    }

    pub fn insert(&mut self, record: &ApiKeyRecord) -> Result<u64, StoreError> {
        self.reconnect_if_closed()?;
        let organization = record.organization.map(|o| o.0 as i64);
        match &mut self.backend {
            Backend::Sqlite(connection) => {
                connection.execute(
                    "INSERT INTO api_keys (prefix, hash, organization, scopes, name, created_at, expires_at, revoked_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
                    params![
                        record.prefix,
                        &record.hash[..],
                        organization,
                        record.scopes,
                        record.name,
                        record.created_at,
                        record.expires_at
                    ],
                )?;
                Ok(connection.last_insert_rowid() as u64)
            }
            Backend::Postgres { client, .. } => {
                let row = client
                    .query_one(
                        "INSERT INTO api_keys (prefix, hash, organization, scopes, name, created_at, expires_at, revoked_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) RETURNING id",
                        &[
                            &record.prefix,
                            &&record.hash[..],
                            &organization,
                            &record.scopes,
                            &record.name,
                            &record.created_at,
                            &record.expires_at,
                        ],
                    )
                    .map_err(pg)?;
                Ok(row.get::<_, i64>(0) as u64)
            }
        }
    }

    pub fn revoke(&mut self, id: u64, at: Timestamp) -> Result<bool, StoreError> {
        self.reconnect_if_closed()?;
        let changed = match &mut self.backend {
            Backend::Sqlite(connection) => connection.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id as i64, at],
            )? as u64,
            Backend::Postgres { client, .. } => client
                .execute(
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    &[&(id as i64), &at],
                )
                .map_err(pg)?,
        };
        Ok(changed == 1)
    }

    pub fn all(&mut self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.reconnect_if_closed()?;
        let hash_of = |hash: &[u8]| {
            let mut fixed = [0u8; 32];
            fixed[..32.min(hash.len())].copy_from_slice(&hash[..32.min(hash.len())]);
            fixed
        };
        match &mut self.backend {
            Backend::Sqlite(connection) => {
                let mut statement = connection.prepare(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY id"))?;
                let rows = statement.query_map([], |row| {
                    Ok(ApiKeyRecord {
                        id: row.get::<_, i64>(0)? as u64,
                        prefix: row.get(1)?,
                        hash: hash_of(&row.get::<_, Vec<u8>>(2)?),
                        organization: row.get::<_, Option<i64>>(3)?.map(|o| OrganizationId(o as u64)),
                        scopes: row.get(4)?,
                        name: row.get(5)?,
                        created_at: row.get(6)?,
                        expires_at: row.get(7)?,
                        revoked_at: row.get(8)?,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            }
            Backend::Postgres { client, .. } => {
                let rows = client.query(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY id"), &[]).map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|row| ApiKeyRecord {
                        id: row.get::<_, i64>(0) as u64,
                        prefix: row.get(1),
                        hash: hash_of(row.get::<_, &[u8]>(2)),
                        organization: row.get::<_, Option<i64>>(3).map(|o| OrganizationId(o as u64)),
                        scopes: row.get(4),
                        name: row.get(5),
                        created_at: row.get(6),
                        expires_at: row.get(7),
                        revoked_at: row.get(8),
                    })
                    .collect())
            }
        }
    }
}
