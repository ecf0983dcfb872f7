//! The built-in sandbox provider: deterministic test tokens, and its own record of
//! payments in `tally.sandbox.db` so that tests (and a restart after a crash) can
//! compare what the "provider" took with what the ledger credited.
//!
//! | token                        | outcome                                        |
//! |------------------------------|------------------------------------------------|
//! | `pm_card_visa`               | succeeds                                       |
//! | `pm_card_mastercard`         | succeeds                                       |
//! | `pm_bank_account`            | succeeds (a bank account)                      |
//! | `pm_card_declined`           | fails: `card_declined`                         |
//! | `pm_card_insufficient_funds` | fails: `insufficient_funds`                    |
//! | `pm_card_expired`            | fails: `expired_card`                          |
//! | `pm_card_slow`               | pending, confirmed after the configured delay  |

use super::provider::*;
use futures::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tally_ledger::payments::{MethodDetails, MethodType};

pub struct Sandbox {
    db: Mutex<Connection>,
    /// How long a `pm_card_slow` payment stays pending.
    slow: Duration,
    /// Calls still to answer with `Unavailable` (to test retries).
    failures_left: AtomicU32,
}

const TOKENS: &[(&str, MethodType, &str, &str, u8, u16)] = &[
    ("pm_card_visa", MethodType::Card, "visa", "4242", 12, 2034),
    ("pm_card_mastercard", MethodType::Card, "mastercard", "4444", 12, 2034),
    ("pm_bank_account", MethodType::BankAccount, "bank", "6789", 12, 2099),
    ("pm_card_declined", MethodType::Card, "visa", "0002", 12, 2034),
    ("pm_card_insufficient_funds", MethodType::Card, "visa", "9995", 12, 2034),
    ("pm_card_expired", MethodType::Card, "visa", "0069", 1, 2020),
    ("pm_card_slow", MethodType::Card, "visa", "3184", 12, 2034),
];

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn state_text(state: &PaymentState) -> (&'static str, Option<&str>, Option<&str>) {
    match state {
        PaymentState::Pending => ("pending", None, None),
        PaymentState::Authorized => ("authorized", None, None),
        PaymentState::Captured => ("captured", None, None),
        PaymentState::Canceled => ("canceled", None, None),
        PaymentState::Failed { code, message } => ("failed", Some(code), Some(message)),
    }
}

/// One payment as the sandbox recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRecord {
    pub payment: ProviderPayment,
    pub token: String,
    pub currency: String,
    pub captured_minor: i64,
}

impl Sandbox {
    pub fn open(path: &Path, slow: Duration) -> rusqlite::Result<Sandbox> {
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS payments (
                 reference TEXT PRIMARY KEY,
                 idempotency_key TEXT NOT NULL UNIQUE,
                 token TEXT NOT NULL,
                 amount_minor INTEGER NOT NULL,
                 currency TEXT NOT NULL,
                 state TEXT NOT NULL,
                 failure_code TEXT,
                 failure_message TEXT,
                 captured_minor INTEGER NOT NULL DEFAULT 0,
                 refunded_minor INTEGER NOT NULL DEFAULT 0,
                 confirm_at_ms INTEGER
             );
             CREATE TABLE IF NOT EXISTS refunds (
                 idempotency_key TEXT PRIMARY KEY,
                 reference TEXT NOT NULL,
                 amount_minor INTEGER NOT NULL
             );",
        )?;
        Ok(Sandbox { db: Mutex::new(db), slow, failures_left: AtomicU32::new(0) })
    }

    /// Answers the next `calls` calls with `Unavailable`, as a provider outage would.
    pub fn fail_next(&self, calls: u32) {
        self.failures_left.store(calls, Ordering::SeqCst);
    }

    fn outage(&self) -> ProviderResult<()> {
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 && self.failures_left.compare_exchange(left, left - 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return Err(ProviderError::Unavailable("sandbox outage (simulated)".into()));
        }
        Ok(())
    }

    /// Every payment the sandbox holds, oldest first.
    pub fn records(&self) -> Vec<SandboxRecord> {
        let db = self.db.lock().expect("sandbox lock");
        let mut statement = db.prepare("SELECT reference FROM payments ORDER BY rowid").expect("sandbox query");
        let references: Vec<String> =
            statement.query_map([], |row| row.get(0)).expect("sandbox query").filter_map(Result::ok).collect();
        drop(statement);
        references.iter().filter_map(|r| Self::load(&db, "reference", r).ok().flatten()).collect()
    }

    fn load(db: &Connection, column: &str, value: &str) -> rusqlite::Result<Option<SandboxRecord>> {
        let sql = format!(
            "SELECT reference, idempotency_key, token, amount_minor, currency, state, failure_code, failure_message,
                    captured_minor, refunded_minor, confirm_at_ms FROM payments WHERE {column} = ?1"
        );
        let record = db
            .query_row(&sql, [value], |row| {
                let state: String = row.get(5)?;
                let confirm_at: Option<i64> = row.get(10)?;
                let state = match state.as_str() {
                    // A slow payment is confirmed once its time has come.
                    "pending" if confirm_at.is_some_and(|at| at <= now_ms()) => PaymentState::Authorized,
                    "pending" => PaymentState::Pending,
                    "authorized" => PaymentState::Authorized,
                    "captured" => PaymentState::Captured,
                    "canceled" => PaymentState::Canceled,
                    _ => PaymentState::Failed {
                        code: row.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        message: row.get::<_, Option<String>>(7)?.unwrap_or_default(),
                    },
                };
                Ok(SandboxRecord {
                    payment: ProviderPayment {
                        reference: row.get(0)?,
                        idempotency_key: row.get(1)?,
                        amount_minor: row.get(3)?,
                        state,
                        refunded_minor: row.get(9)?,
                    },
                    token: row.get(2)?,
                    currency: row.get(4)?,
                    captured_minor: row.get(8)?,
                })
            })
            .optional()?;
        Ok(record)
    }

    fn store_error(error: rusqlite::Error) -> ProviderError {
        ProviderError::Unavailable(format!("sandbox storage: {error}"))
    }

    fn set_state(db: &Connection, reference: &str, state: &PaymentState, captured: Option<i64>) -> ProviderResult<()> {
        let (text, code, message) = state_text(state);
        db.execute(
            "UPDATE payments SET state = ?2, failure_code = ?3, failure_message = ?4,
                    captured_minor = COALESCE(?5, captured_minor), confirm_at_ms = NULL WHERE reference = ?1",
            params![reference, text, code, message, captured],
        )
        .map_err(Self::store_error)?;
        Ok(())
    }

    fn authorize_now(&self, request: &PaymentRequest) -> ProviderResult<ProviderPayment> {
        self.outage()?;
        let db = self.db.lock().expect("sandbox lock");
        if let Some(existing) =
            Self::load(&db, "idempotency_key", &request.idempotency_key).map_err(Self::store_error)?
        {
            return Ok(existing.payment);
        }
        let Some(token) = TOKENS.iter().find(|t| t.0 == request.method_token) else {
            return Err(ProviderError::Invalid {
                code: "invalid_payment_method".into(),
                message: "unknown sandbox payment method token".into(),
            });
        };
        if request.amount_minor <= 0 {
            return Err(ProviderError::Invalid {
                code: "invalid_amount".into(),
                message: "amount must be positive".into(),
            });
        }
        let failed = |code: &str, message: &str| PaymentState::Failed { code: code.into(), message: message.into() };
        let (state, confirm_at) = match token.0 {
            "pm_card_declined" => (failed("card_declined", "the card was declined"), None),
            "pm_card_insufficient_funds" => (failed("insufficient_funds", "the card has insufficient funds"), None),
            "pm_card_expired" => (failed("expired_card", "the card has expired"), None),
            "pm_card_slow" => (PaymentState::Pending, Some(now_ms() + self.slow.as_millis() as i64)),
            _ => (PaymentState::Authorized, None),
        };
        let count: i64 = db.query_row("SELECT COUNT(*) FROM payments", [], |r| r.get(0)).map_err(Self::store_error)?;
        let reference = format!("sbx_pay_{}", count + 1);
        let (text, code, message) = state_text(&state);
        db.execute(
            "INSERT INTO payments (reference, idempotency_key, token, amount_minor, currency, state, failure_code,
                                   failure_message, confirm_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                reference,
                request.idempotency_key,
                request.method_token,
                request.amount_minor,
                request.currency,
                text,
                code,
                message,
                confirm_at
            ],
        )
        .map_err(Self::store_error)?;
        Ok(ProviderPayment {
            reference,
            idempotency_key: request.idempotency_key.clone(),
            amount_minor: request.amount_minor,
            state,
            refunded_minor: 0,
        })
    }

    fn change(
        &self,
        reference: &str,
        change: impl FnOnce(&Connection, SandboxRecord) -> ProviderResult<()>,
    ) -> ProviderResult<ProviderPayment> {
        self.outage()?;
        let db = self.db.lock().expect("sandbox lock");
        let record = Self::load(&db, "reference", reference).map_err(Self::store_error)?.ok_or_else(|| {
            ProviderError::Invalid { code: "payment_not_found".into(), message: format!("no payment {reference}") }
        })?;
        change(&db, record)?;
        Ok(Self::load(&db, "reference", reference).map_err(Self::store_error)?.expect("just read").payment)
    }
}

fn invalid(code: &str, message: &str) -> ProviderError {
    ProviderError::Invalid { code: code.into(), message: message.into() }
}

impl PaymentProvider for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn describe_method<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ProviderResult<MethodDetails>> {
        Box::pin(async move {
            let (_, kind, brand, last4, exp_month, exp_year) = TOKENS
                .iter()
                .find(|t| t.0 == token)
                .ok_or_else(|| invalid("invalid_payment_method", "unknown sandbox payment method token"))?;
            Ok(MethodDetails {
                kind: *kind,
                brand: brand.to_string(),
                last4: last4.to_string(),
                exp_month: *exp_month,
                exp_year: *exp_year,
            })
        })
    }

    fn authorize<'a>(&'a self, request: &'a PaymentRequest) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move { self.authorize_now(request) })
    }

    fn capture<'a>(&'a self, reference: &'a str, amount_minor: i64) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            self.change(reference, |db, record| match record.payment.state {
                PaymentState::Captured => Ok(()),
                PaymentState::Authorized => {
                    if amount_minor <= 0 || amount_minor > record.payment.amount_minor {
                        return Err(invalid("invalid_amount", "capture beyond the authorized amount"));
                    }
                    Sandbox::set_state(db, reference, &PaymentState::Captured, Some(amount_minor))
                }
                _ => Err(invalid("payment_not_capturable", "the payment is not authorized")),
            })
        })
    }

    fn cancel<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            self.change(reference, |db, record| match record.payment.state {
                PaymentState::Canceled => Ok(()),
                PaymentState::Authorized | PaymentState::Pending => {
                    Sandbox::set_state(db, reference, &PaymentState::Canceled, None)
                }
                _ => Err(invalid("payment_not_cancelable", "only an uncaptured payment can be canceled")),
            })
        })
    }

    fn refund<'a>(
        &'a self,
        reference: &'a str,
        amount_minor: i64,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            self.change(reference, |db, record| {
                let done: Option<i64> = db
                    .query_row("SELECT amount_minor FROM refunds WHERE idempotency_key = ?1", [idempotency_key], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(Sandbox::store_error)?;
                if done.is_some() {
                    return Ok(());
                }
                if record.payment.state != PaymentState::Captured
                    || amount_minor <= 0
                    || record.payment.refunded_minor + amount_minor > record.captured_minor
                {
                    return Err(invalid(
                        "refund_not_possible",
                        "refunds are of captured money, at most what was captured",
                    ));
                }
                db.execute(
                    "INSERT INTO refunds (idempotency_key, reference, amount_minor) VALUES (?1, ?2, ?3)",
                    params![idempotency_key, reference, amount_minor],
                )
                .map_err(Sandbox::store_error)?;
                db.execute(
                    "UPDATE payments SET refunded_minor = refunded_minor + ?2 WHERE reference = ?1",
                    params![reference, amount_minor],
                )
                .map_err(Sandbox::store_error)?;
                Ok(())
            })
        })
    }

    fn lookup<'a>(&'a self, idempotency_key: &'a str) -> BoxFuture<'a, ProviderResult<Option<ProviderPayment>>> {
        Box::pin(async move {
            self.outage()?;
            let db = self.db.lock().expect("sandbox lock");
            Ok(Self::load(&db, "idempotency_key", idempotency_key).map_err(Self::store_error)?.map(|r| r.payment))
        })
    }
}
