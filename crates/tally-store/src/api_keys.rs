//! API keys, as the server stores them: only a hash of the secret, its visible prefix,
//! its owner and its limits. Keys are not ledger state; they live in their own table.

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

pub struct ApiKeys {
    connection: Connection,
}

impl ApiKeys {
    /// Opens the key table of a database that `SqliteStore::open` has migrated.
    pub fn open(path: impl AsRef<Path>) -> Result<ApiKeys, StoreError> {
        Ok(ApiKeys { connection: open_connection(path.as_ref())? })
    }

    pub fn insert(&self, record: &ApiKeyRecord) -> Result<u64, StoreError> {
        self.connection.execute(
            "INSERT INTO api_keys (prefix, hash, organization, scopes, name, created_at, expires_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
            params![
                record.prefix,
                &record.hash[..],
                record.organization.map(|o| o.0 as i64),
                record.scopes,
                record.name,
                record.created_at,
                record.expires_at
            ],
        )?;
        Ok(self.connection.last_insert_rowid() as u64)
    }

    pub fn revoke(&self, id: u64, at: Timestamp) -> Result<bool, StoreError> {
        let changed = self.connection.execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id as i64, at],
        )?;
        Ok(changed == 1)
    }

    pub fn all(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT id, prefix, hash, organization, scopes, name, created_at, expires_at, revoked_at FROM api_keys ORDER BY id",
        )?;
        let rows = statement.query_map([], |row| {
            let hash: Vec<u8> = row.get(2)?;
            let mut fixed = [0u8; 32];
            fixed.copy_from_slice(&hash[..32.min(hash.len())]);
            Ok(ApiKeyRecord {
                id: row.get::<_, i64>(0)? as u64,
                prefix: row.get(1)?,
                hash: fixed,
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
}
