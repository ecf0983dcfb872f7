//! Payouts over HTTP: organization verification, external bank accounts (validated by
//! format and checksum, kept masked), test-deposit verification, payouts through a
//! payout rail, and payout schedules.
//!
//! A payout is journaled (the money in transit) before the rail is asked;
//! `drive_payout` then sends it under the payout's id as idempotency key (looking it up
//! first) and records the answer. The worker drives pending payouts and due schedules,
//! so a crash between the two steps still ends in exactly one payout.

use super::*;
use crate::payments::provider::ProviderError;
use futures::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use std::time::SystemTime;
use tally_ledger::payments::{PaymentStatus, ProviderOutcome};
use tally_ledger::payouts::*;
use utoipa::ToSchema;
use utoipa_axum::routes;

/// Most payouts one listing returns.
const LISTED_MAX: usize = 1_000;

// ---- the rail ----

/// Where a payout stands at the rail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RailState {
    Pending,
    Paid,
    Failed { code: String, message: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RailPayout {
    pub reference: String,
    pub state: RailState,
}

/// A payout rail (bank transfer network). Idempotent per key.
pub trait PayoutRail: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        key: &'a str,
        amount_minor: i64,
        currency: &'a str,
        account_token: &'a str,
        account_last4: &'a str,
    ) -> BoxFuture<'a, Result<RailPayout, ProviderError>>;
    fn lookup<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<RailPayout>, ProviderError>>;
}

/// The built-in rail: accounts ending in 0002 fail (`account_closed`), in 0003 are slow
/// (paid after the configured delay), all others are paid at once. It keeps its own
/// record of payouts in `tally.sandbox.db`.
pub struct SandboxRail {
    db: Mutex<Connection>,
    slow: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl SandboxRail {
    pub fn open(path: &std::path::Path, slow: Duration) -> rusqlite::Result<SandboxRail> {
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS rail_payouts (
                 reference TEXT PRIMARY KEY,
                 idempotency_key TEXT NOT NULL UNIQUE,
                 amount_minor INTEGER NOT NULL,
                 currency TEXT NOT NULL,
                 account_token TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 paid_at_ms INTEGER NOT NULL
             );",
        )?;
        Ok(SandboxRail { db: Mutex::new(db), slow })
    }

    /// Every payout the rail received: (idempotency key, amount in minor units).
    pub fn records(&self) -> Vec<(String, i64)> {
        let db = self.db.lock().expect("rail lock");
        let mut statement =
            db.prepare("SELECT idempotency_key, amount_minor FROM rail_payouts ORDER BY rowid").expect("rail query");
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).expect("rail query");
        rows.filter_map(Result::ok).collect()
    }

    fn load(db: &Connection, key: &str) -> rusqlite::Result<Option<RailPayout>> {
        db.query_row(
            "SELECT reference, outcome, paid_at_ms FROM rail_payouts WHERE idempotency_key = ?1",
            [key],
            |row| {
                let outcome: String = row.get(1)?;
                let at: i64 = row.get(2)?;
                let state = match outcome.as_str() {
                    "failed" => RailState::Failed {
                        code: "account_closed".into(),
                        message: "the receiving bank account is closed".into(),
                    },
                    _ if at > now_ms() => RailState::Pending,
                    _ => RailState::Paid,
                };
                Ok(RailPayout { reference: row.get(0)?, state })
            },
        )
        .optional()
    }
}

fn rail_storage(error: rusqlite::Error) -> ProviderError {
    ProviderError::Unavailable(format!("sandbox rail storage: {error}"))
}

impl PayoutRail for SandboxRail {
    fn send<'a>(
        &'a self,
        key: &'a str,
        amount_minor: i64,
        currency: &'a str,
        account_token: &'a str,
        account_last4: &'a str,
    ) -> BoxFuture<'a, Result<RailPayout, ProviderError>> {
        Box::pin(async move {
            let db = self.db.lock().expect("rail lock");
            if let Some(existing) = Self::load(&db, key).map_err(rail_storage)? {
                return Ok(existing);
            }
            let (outcome, at) = match account_last4 {
                "0002" => ("failed", now_ms()),
                "0003" => ("paid", now_ms() + self.slow.as_millis() as i64),
                _ => ("paid", now_ms()),
            };
            let count: i64 =
                db.query_row("SELECT COUNT(*) FROM rail_payouts", [], |r| r.get(0)).map_err(rail_storage)?;
            db.execute(
                "INSERT INTO rail_payouts (reference, idempotency_key, amount_minor, currency, account_token, outcome,
                                           paid_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![format!("sbx_po_{}", count + 1), key, amount_minor, currency, account_token, outcome, at],
            )
            .map_err(rail_storage)?;
            Ok(Self::load(&db, key).map_err(rail_storage)?.expect("just written"))
        })
    }

    fn lookup<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<RailPayout>, ProviderError>> {
        Box::pin(async move {
            let db = self.db.lock().expect("rail lock");
            Self::load(&db, key).map_err(rail_storage)
        })
    }
}

pub struct PayoutService {
    pub rail: Arc<dyn PayoutRail>,
    /// Fault injection for the crash test: abort after the money is in transit and
    /// before the rail is asked.
    pub abort_before_rail: bool,
    /// Show the test deposits in answers (the sandbox rail sends none).
    pub show_test_deposits: bool,
    /// How often the worker looks for payouts in transit and due schedules.
    pub poll: Duration,
    driving: Mutex<HashSet<PayoutId>>,
}

impl PayoutService {
    pub fn new(
        rail: Arc<dyn PayoutRail>,
        abort_before_rail: bool,
        show_test_deposits: bool,
        poll: Duration,
    ) -> PayoutService {
        PayoutService { rail, abort_before_rail, show_test_deposits, poll, driving: Mutex::new(HashSet::new()) }
    }
}

fn service(app: &AppState) -> Result<&Arc<PayoutService>, ApiError> {
    app.payouts.as_ref().ok_or_else(|| ApiError::new("not_found", "payouts are not enabled on this server"))
}

// ---- bank account details ----

/// Validated details: (last four characters of the account, a token standing for the
/// full details). The full number goes no further than this function.
pub fn validate_bank_details(
    country: &str,
    iban: Option<&str>,
    routing_number: Option<&str>,
    account_number: Option<&str>,
) -> Result<(String, String), ApiError> {
    let last4 = |number: &str| number[number.len() - 4..].to_string();
    let token = |number: &str| {
        let salt: [u8; 16] = rand::random();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&salt);
        hasher.update(number.as_bytes());
        format!("btok_{}", &hasher.finalize().to_hex()[..32])
    };
    match (iban, routing_number, account_number) {
        (Some(iban), None, None) => {
            let compact: String = iban.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_uppercase();
            if !iban_valid(&compact) {
                return Err(ApiError::field(
                    "invalid_bank_account",
                    "iban",
                    "not a valid IBAN (format or check digits)",
                ));
            }
            if &compact[..2] != country {
                return Err(ApiError::field("invalid_bank_account", "iban", "the IBAN's country differs from country"));
            }
            Ok((last4(&compact), token(&compact)))
        }
        (None, Some(routing), Some(account)) if country == "US" => {
            if !aba_routing_valid(routing) {
                return Err(ApiError::field(
                    "invalid_bank_account",
                    "routing_number",
                    "not a valid ABA routing number (nine digits with a valid checksum)",
                ));
            }
            if !(4..=17).contains(&account.len()) || !account.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ApiError::field("invalid_bank_account", "account_number", "4 to 17 digits"));
            }
            Ok((last4(account), token(&format!("{routing}:{account}"))))
        }
        _ => Err(ApiError::new(
            "invalid_bank_account",
            "give an iban, or for US accounts a routing_number and an account_number",
        )),
    }
}

/// ISO 13616: two letters, two check digits, up to 30 alphanumerics; mod 97 == 1.
pub fn iban_valid(iban: &str) -> bool {
    let bytes = iban.as_bytes();
    if !(15..=34).contains(&bytes.len())
        || !bytes[..2].iter().all(u8::is_ascii_uppercase)
        || !bytes[2..4].iter().all(u8::is_ascii_digit)
        || !bytes.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    {
        return false;
    }
    let mut remainder: u32 = 0;
    for &b in bytes[4..].iter().chain(&bytes[..4]) {
        let value = if b.is_ascii_digit() { u32::from(b - b'0') } else { u32::from(b - b'A') + 10 };
        remainder = if value >= 10 { (remainder * 100 + value) % 97 } else { (remainder * 10 + value) % 97 };
    }
    remainder == 1
}

/// ABA routing number: nine digits, 3·(d1+d4+d7) + 7·(d2+d5+d8) + (d3+d6+d9) ≡ 0 (mod 10).
pub fn aba_routing_valid(routing: &str) -> bool {
    if routing.len() != 9 || !routing.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let d: Vec<u32> = routing.bytes().map(|b| u32::from(b - b'0')).collect();
    (3 * (d[0] + d[3] + d[6]) + 7 * (d[1] + d[4] + d[7]) + (d[2] + d[5] + d[8])).is_multiple_of(10)
}

// ---- views ----

fn verification_view(organization: OrganizationId, verification: &Verification) -> Value {
    json!({
        "object": "verification",
        "organization": organization.to_string(),
        "status": verification.status,
        "reason": verification.reason.as_deref(),
        "updated_at": (verification.updated_at > 0).then(|| time::format(verification.updated_at)),
    })
}

fn bank_account_view(account: &BankAccount, show_deposits: bool) -> Value {
    let mut view = json!({
        "id": account.id.to_string(),
        "object": "bank_account",
        "organization": account.organization.to_string(),
        "country": account.country.as_ref(),
        "currency": account.currency.code(),
        "holder_name": account.holder_name.as_ref(),
        "last4": account.last4.as_ref(),
        "status": account.status,
        "failed_attempts": account.attempts,
        "created_at": time::format(account.created_at),
    });
    if let (true, Some((a, b))) = (show_deposits, account.deposits) {
        let minor = |m: i64| {
            views::amount(Amount::from_units(i128::from(m) * account.currency.units_per_minor()), account.currency)
        };
        view["sandbox_test_deposits"] = json!([minor(a), minor(b)]);
    }
    view
}

fn payout_view(payout: &Payout) -> Value {
    let status = match payout.status {
        PaymentStatus::Pending => "in_transit",
        PaymentStatus::Succeeded => "paid",
        PaymentStatus::Failed => "failed",
    };
    json!({
        "id": payout.id.to_string(),
        "object": "payout",
        "wallet": payout.wallet.to_string(),
        "organization": payout.organization.to_string(),
        "bank_account": payout.bank_account.to_string(),
        "currency": payout.currency.code(),
        "amount": views::amount(Amount::from_units(payout.amount), payout.currency),
        "status": status,
        "scheduled": payout.scheduled,
        "created_at": time::format(payout.created_at),
        "settled_at": payout.settled_at.map(time::format),
        "rail_reference": payout.rail_reference.as_deref(),
        "failure_code": payout.failure_code.as_deref(),
        "failure_message": payout.failure_message.as_deref(),
        "operation": payout.operation.to_string(),
        "return_operation": payout.return_operation.map(|o| o.to_string()),
    })
}

// ---- response shapes (OpenAPI only) ----
//
// The fields `verification_view`, `bank_account_view` and `payout_view` send, and the
// schedule and minimum answers. Amounts are decimal strings in the major unit, times
// RFC 3339.

/// An organization's verification, which payouts need.
#[derive(ToSchema)]
pub struct OrganizationVerification {
    /// Always `verification`.
    pub object: String,
    pub organization: String,
    /// `unverified`, `pending`, `verified` or `rejected`.
    pub status: String,
    /// Why it was rejected; null otherwise.
    pub reason: Option<String>,
    /// When the status last changed; null while never submitted.
    pub updated_at: Option<String>,
}

/// An external bank account payouts go to, masked: only its last four characters.
#[derive(ToSchema)]
#[schema(as = BankAccount)]
pub struct BankAccountShape {
    /// `ba_…`
    pub id: String,
    /// Always `bank_account`.
    pub object: String,
    pub organization: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub currency: String,
    pub holder_name: String,
    /// The last four characters of the IBAN or account number.
    pub last4: String,
    /// `new`, `pending_verification` (test deposits sent), `verified`, `failed` or `removed`.
    pub status: String,
    /// Wrong test deposit confirmations so far (three fail the account).
    pub failed_attempts: u32,
    pub created_at: String,
    /// Sandbox only (servers configured to show them), while test deposits are pending:
    /// the two amounts sent. Absent otherwise.
    pub sandbox_test_deposits: Option<Vec<String>>,
}
crate::schemas::list!(BankAccountList, BankAccountShape, "An organization's bank accounts (not removed).");

/// A payout from a wallet to a bank account.
#[derive(ToSchema)]
#[schema(as = Payout)]
pub struct PayoutShape {
    /// `po_…`
    pub id: String,
    /// Always `payout`.
    pub object: String,
    pub wallet: String,
    pub organization: String,
    pub bank_account: String,
    pub currency: String,
    pub amount: String,
    /// `in_transit` (until the rail answers), `paid` or `failed` (the money is back in
    /// the wallet).
    pub status: String,
    /// Started by the wallet's payout schedule.
    pub scheduled: bool,
    pub created_at: String,
    /// When it was paid or failed; null while in transit.
    pub settled_at: Option<String>,
    /// The rail's id of the transfer, once paid.
    pub rail_reference: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// The operation that took the money out of the wallet (into transit).
    pub operation: String,
    /// The operation that put the money back when the payout failed.
    pub return_operation: Option<String>,
}
crate::schemas::list!(PayoutList, PayoutShape, "Payouts, newest first.");

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<Arc<AppState>> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(get_verification))
        .routes(routes!(submit_verification))
        .routes(routes!(approve_verification))
        .routes(routes!(reject_verification))
        .routes(routes!(add_bank_account, list_bank_accounts))
        .routes(routes!(send_test_deposits))
        .routes(routes!(confirm_test_deposits))
        .routes(routes!(verify_bank_account))
        .routes(routes!(remove_bank_account))
        .routes(routes!(create_payout, list_payouts))
        .routes(routes!(get_payout))
        .routes(routes!(set_schedule, delete_schedule))
        .routes(routes!(set_minimum))
}

async fn payout_command(app: &AppState, command: PayoutCommand) -> Result<PayoutReceipt, ApiError> {
    match app.execute(Command::payout(command)).await? {
        Receipt::Payout(receipt) => Ok(receipt),
        _ => Err(ApiError::new("internal", "unexpected receipt")),
    }
}

async fn own_organization(app: &AppState, caller: &Caller, id: &str) -> Result<OrganizationId, ApiError> {
    let organization = parse_id("organization", id, OrganizationId::parse)?;
    let exists = app.read(move |state| state.organization(organization).is_some()).await?;
    if !exists || !caller.owns(organization) {
        return Err(ApiError::not_found());
    }
    Ok(organization)
}

// ---- verification ----

#[utoipa::path(get, path = "/v1/organizations/{id}/verification", tag = "payouts", summary = "An organization's verification status (its changes are events: GET /v1/events?object=org_...)", params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the organization's verification", body = OrganizationVerification), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_verification(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let organization = own_organization(&app, &caller, &id).await?;
    let verification = app.read(move |state| state.payouts.verification(organization)).await?;
    Ok(ok(verification_view(organization, &verification)))
}

async fn verification_answer(app: &AppState, command: PayoutCommand) -> ApiResult {
    let PayoutReceipt::Verification { organization, verification } = payout_command(app, command).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    Ok(ok(verification_view(organization, &verification)))
}

#[utoipa::path(post, path = "/v1/organizations/{id}/verification/submit", tag = "payouts", summary = "Submit the organization's details for verification (needs billing details): pending", params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the verification, now pending", body = OrganizationVerification), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn submit_verification(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let organization = own_organization(&app, &caller, &id).await?;
    verification_answer(&app, PayoutCommand::SubmitVerification { organization }).await
}

#[utoipa::path(post, path = "/v1/organizations/{id}/verification/approve", tag = "payouts", summary = "Approve a pending verification (platform)", params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the verification, now verified", body = OrganizationVerification), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn approve_verification(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let organization = own_organization(&app, &caller, &id).await?;
    verification_answer(&app, PayoutCommand::DecideVerification { organization, approve: true, reason: String::new() })
        .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Reject {
    reason: String,
}

#[utoipa::path(post, path = "/v1/organizations/{id}/verification/reject", tag = "payouts", summary = "Reject a pending verification with a reason (platform)", request_body = Reject, params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the verification, now rejected", body = OrganizationVerification), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn reject_verification(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Reject>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let organization = own_organization(&app, &caller, &id).await?;
    text("reason", &body.reason, false)?;
    verification_answer(&app, PayoutCommand::DecideVerification { organization, approve: false, reason: body.reason })
        .await
}

// ---- bank accounts ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AddBankAccount {
    /// ISO 3166-1 alpha-2.
    country: String,
    currency: String,
    holder_name: String,
    #[serde(default)]
    iban: Option<String>,
    /// US accounts: the ABA routing number and the account number.
    #[serde(default)]
    routing_number: Option<String>,
    #[serde(default)]
    account_number: Option<String>,
}

#[utoipa::path(post, path = "/v1/organizations/{id}/bank-accounts", tag = "payouts", summary = "Add an external bank account (IBAN, or US routing and account number); stored masked", request_body = AddBankAccount, params(("id" = String, Path, description = "organization id")), responses((status = 201, description = "the bank account added", body = BankAccountShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn add_bank_account(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AddBankAccount>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let service = service(&app)?.clone();
    let organization = own_organization(&app, &caller, &id).await?;
    let currency = currency("currency", &body.currency)?;
    text("holder_name", &body.holder_name, false)?;
    let (last4, token) = validate_bank_details(
        &body.country,
        body.iban.as_deref(),
        body.routing_number.as_deref(),
        body.account_number.as_deref(),
    )?;
    let account =
        NewBankAccount { organization, country: body.country, currency, holder_name: body.holder_name, last4, token };
    let PayoutReceipt::BankAccount(account) = payout_command(&app, PayoutCommand::AddBankAccount { account }).await?
    else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    Ok(created(bank_account_view(&account, service.show_test_deposits)))
}

#[utoipa::path(get, path = "/v1/organizations/{id}/bank-accounts", tag = "payouts", summary = "An organization's bank accounts", params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the organization's bank accounts", body = BankAccountList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_bank_accounts(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let show = service(&app)?.show_test_deposits;
    let organization = own_organization(&app, &caller, &id).await?;
    let data = app
        .read(move |state| {
            let accounts = state.payouts.bank_accounts.iter();
            let owned = accounts.filter(|a| a.organization == organization && a.status != BankAccountStatus::Removed);
            owned.map(|a| bank_account_view(a, show)).collect::<Vec<_>>()
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data})))
}

async fn owned_account(app: &AppState, caller: &Caller, id: &str) -> Result<BankAccountId, ApiError> {
    let account = parse_id("bank_account", id, BankAccountId::parse)?;
    let owner = app
        .read(move |state| {
            state
                .payouts
                .bank_account(account)
                .filter(|a| a.status != BankAccountStatus::Removed)
                .map(|a| a.organization)
        })
        .await?;
    match owner {
        Some(owner) if caller.owns(owner) => Ok(account),
        _ => Err(ApiError::not_found()),
    }
}

async fn account_answer(app: &AppState, command: PayoutCommand) -> ApiResult {
    let show = service(app)?.show_test_deposits;
    let PayoutReceipt::BankAccount(account) = payout_command(app, command).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    Ok(ok(bank_account_view(&account, show)))
}

#[utoipa::path(post, path = "/v1/bank-accounts/{id}/test-deposits", tag = "payouts", summary = "Send two small test deposits to verify the account", params(("id" = String, Path, description = "bank account id")), responses((status = 200, description = "the bank account, pending verification", body = BankAccountShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn send_test_deposits(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let account = owned_account(&app, &caller, &id).await?;
    let deposits = (rand::random::<u8>() as i64 % 99 + 1, rand::random::<u8>() as i64 % 99 + 1);
    account_answer(&app, PayoutCommand::StartDepositVerification { account, deposits }).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ConfirmDeposits {
    /// The two amounts that arrived, as decimal strings ("0.32").
    amounts: Vec<String>,
}

#[utoipa::path(post, path = "/v1/bank-accounts/{id}/test-deposits/confirm", tag = "payouts", summary = "Confirm the two test deposits' amounts (three wrong answers fail the account)", request_body = ConfirmDeposits, params(("id" = String, Path, description = "bank account id")), responses((status = 200, description = "the bank account: verified, still pending after a wrong answer, or failed after three", body = BankAccountShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn confirm_test_deposits(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ConfirmDeposits>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let account = owned_account(&app, &caller, &id).await?;
    let currency = app.read(move |state| state.payouts.bank_account(account).map(|a| a.currency)).await?;
    let currency = currency.ok_or_else(ApiError::not_found)?;
    let [first, second] = body.amounts.as_slice() else {
        return Err(ApiError::invalid("amounts", "give the two amounts"));
    };
    let minor = |field: &str, text: &str| -> Result<i64, ApiError> {
        let amount = money(field, text, currency.code())?.amount;
        amount
            .to_minor_units(currency)
            .map(|m| m as i64)
            .ok_or_else(|| ApiError::field("amount_not_in_minor_units", field, "whole minor units"))
    };
    let deposits = (minor("amounts[0]", first)?, minor("amounts[1]", second)?);
    account_answer(&app, PayoutCommand::ConfirmDeposits { account, deposits }).await
}

#[utoipa::path(post, path = "/v1/bank-accounts/{id}/verify", tag = "payouts", summary = "Verify a bank account directly (platform)", params(("id" = String, Path, description = "bank account id")), responses((status = 200, description = "the bank account, now verified", body = BankAccountShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn verify_bank_account(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let account = owned_account(&app, &caller, &id).await?;
    account_answer(&app, PayoutCommand::VerifyBankAccount { account }).await
}

#[utoipa::path(delete, path = "/v1/bank-accounts/{id}", tag = "payouts", summary = "Remove a bank account", params(("id" = String, Path, description = "bank account id")), responses((status = 200, description = "the bank account, now removed", body = BankAccountShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn remove_bank_account(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let account = owned_account(&app, &caller, &id).await?;
    account_answer(&app, PayoutCommand::RemoveBankAccount { account }).await
}

// ---- payouts ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreatePayout {
    wallet: String,
    amount: String,
    bank_account: String,
}

#[utoipa::path(post, path = "/v1/payouts", tag = "payouts", summary = "Pay out from a wallet to a verified bank account (in transit at once; paid or failed when the rail answers)", request_body = CreatePayout, params(("Idempotency-Key" = String, Header, description = "required")), responses((status = 201, description = "the payout: in transit, or paid or failed when the rail answered at once (also for a replayed Idempotency-Key, with the `Idempotent-Replayed: true` header)", body = PayoutShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_payout(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreatePayout>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    service(&app)?;
    let key = crate::payments::idempotency_key(&caller, &headers)?;
    let (wallet, organization, currency) = owned_wallet_meta(&app, &caller, &body.wallet).await?;
    let amount = positive_money("amount", &body.amount, currency.code())?;
    let bank_account = parse_id("bank_account", &body.bank_account, BankAccountId::parse)?;
    let actor = (!caller.is_admin()).then_some(organization);
    let command = PayoutCommand::CreatePayout { key, actor, wallet, amount, bank_account };
    let PayoutReceipt::Payout { payout, created, .. } = payout_command(&app, command).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let id = payout.id;
    if payout.status == PaymentStatus::Pending {
        drive_payout(&app, id, true).await;
    }
    let view = app.read(move |state| state.payouts.payout(id).map(payout_view)).await?.unwrap_or(Value::Null);
    Ok(created_or_replayed(view, created))
}

#[derive(Deserialize)]
struct PayoutQuery {
    organization: Option<String>,
    limit: Option<u32>,
    before: Option<String>,
}

#[utoipa::path(get, path = "/v1/payouts", tag = "payouts", summary = "Payouts, newest first (an organization's own; admins may filter by organization)", params(("organization" = Option<String>, Query, description = "filter by organization"), ("limit" = Option<u32>, Query, description = "page size, default 50, at most 500"), ("before" = Option<String>, Query, description = "cursor: the last payout id seen (`next_cursor`)")), responses((status = 200, description = "a page of payouts, newest first", body = PayoutList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_payouts(AxumState(app): App, headers: HeaderMap, Query(query): Query<PayoutQuery>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let filter = match (&caller, query.organization.as_deref()) {
        (Caller::Organization { organization, .. }, _) => Some(*organization),
        (Caller::Admin { .. }, Some(text)) => Some(parse_id("organization", text, OrganizationId::parse)?),
        (Caller::Admin { .. }, None) => None,
    };
    let before = match query.before.as_deref() {
        Some(cursor) => Some(parse_id("before", cursor, PayoutId::parse)?.0),
        None => None,
    };
    let (data, next) = app
        .read(move |state| {
            let older = before_cursor(&state.payouts.payouts, before);
            let mine = older.iter().rev().filter(|p| filter.is_none_or(|o| p.organization == o));
            let (items, next) = page(mine, query.limit, |p| p.id.to_string());
            (items.into_iter().map(payout_view).collect::<Vec<_>>(), next)
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

#[utoipa::path(get, path = "/v1/payouts/{id}", tag = "payouts", summary = "A payout", params(("id" = String, Path, description = "payout id")), responses((status = 200, description = "the payout", body = PayoutShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_payout(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let payout = parse_id("payout", &id, PayoutId::parse)?;
    let found = app.read(move |state| state.payouts.payout(payout).cloned()).await?;
    match found {
        Some(p) if caller.owns(p.organization) => Ok(ok(payout_view(&p))),
        _ => Err(ApiError::not_found()),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScheduleInput {
    /// `daily` or `weekly`.
    interval: String,
    /// Available balance kept back.
    reserve: String,
    bank_account: String,
}

// ---- response shapes (OpenAPI only) ----

/// A wallet's payout schedule.
#[derive(ToSchema)]
#[schema(as = PayoutSchedule)]
pub struct PayoutScheduleShape {
    /// Always `payout_schedule`.
    pub object: String,
    pub wallet: String,
    /// `daily` or `weekly`.
    pub interval: String,
    /// Available balance kept back.
    pub reserve: String,
    pub bank_account: String,
    /// When the next scheduled payout runs.
    pub next_at: String,
}

/// The wallet's payout schedule was removed.
#[derive(ToSchema)]
pub struct PayoutScheduleDeleted {
    /// Always `payout_schedule`.
    pub object: String,
    pub wallet: String,
    /// Always true.
    pub deleted: bool,
}

/// The smallest payout in a currency.
#[derive(ToSchema)]
pub struct PayoutMinimum {
    /// Always `payout_minimum`.
    pub object: String,
    pub amount: String,
    pub currency: String,
}

#[utoipa::path(put, path = "/v1/wallets/{id}/payout-schedule", tag = "payouts", summary = "Pay out available above a reserve daily or weekly", request_body = ScheduleInput, params(("id" = String, Path, description = "wallet id")), responses((status = 200, description = "the wallet's payout schedule", body = PayoutScheduleShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn set_schedule(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ScheduleInput>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let (wallet, _, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let interval = match body.interval.as_str() {
        "daily" => PayoutInterval::Daily,
        "weekly" => PayoutInterval::Weekly,
        _ => return Err(ApiError::invalid("interval", "daily or weekly")),
    };
    let reserve = money("reserve", &body.reserve, currency.code())?.amount;
    let bank_account = parse_id("bank_account", &body.bank_account, BankAccountId::parse)?;
    let next_at = app.now();
    let schedule = PayoutSchedule { interval, reserve, bank_account, next_at };
    payout_command(&app, PayoutCommand::SetSchedule { wallet, schedule: Some(schedule) }).await?;
    let view = app
        .read(move |state| {
            state.payouts.schedules.get(&wallet).map(|s| {
                json!({"object": "payout_schedule", "wallet": wallet.to_string(), "interval": s.interval,
                       "reserve": views::amount(s.reserve, currency), "bank_account": s.bank_account.to_string(),
                       "next_at": time::format(s.next_at)})
            })
        })
        .await?;
    Ok(ok(view.unwrap_or(Value::Null)))
}

#[utoipa::path(delete, path = "/v1/wallets/{id}/payout-schedule", tag = "payouts", summary = "Stop scheduled payouts", params(("id" = String, Path, description = "wallet id")), responses((status = 200, description = "the schedule was removed", body = PayoutScheduleDeleted), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn delete_schedule(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Payouts)?;
    let (wallet, _, _) = owned_wallet_meta(&app, &caller, &id).await?;
    payout_command(&app, PayoutCommand::SetSchedule { wallet, schedule: None }).await?;
    Ok(ok(json!({"object": "payout_schedule", "wallet": wallet.to_string(), "deleted": true})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MinimumInput {
    amount: String,
    currency: String,
}

#[utoipa::path(put, path = "/v1/payout-minimums", tag = "payouts", summary = "The smallest payout in a currency (platform)", request_body = MinimumInput, responses((status = 200, description = "the minimum as set", body = PayoutMinimum), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn set_minimum(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<MinimumInput>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let minimum = positive_money("amount", &body.amount, &body.currency)?;
    payout_command(&app, PayoutCommand::SetMinimum { minimum }).await?;
    Ok(ok(json!({"object": "payout_minimum", "amount": minimum.format_amount(), "currency": minimum.currency.code()})))
}

// ---- the driver ----

/// Sends a pending payout to the rail (or finds it there) and records the answer.
pub(crate) async fn drive_payout(app: &Arc<AppState>, id: PayoutId, wait: bool) {
    let Some(service) = app.payouts.clone() else { return };
    // When the worker is already driving it (a fresh payout), a request waits for it,
    // so that it answers with the outcome.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !service.driving.lock().expect("driving lock").insert(id) {
        if !wait || std::time::Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    struct Done<'a>(&'a PayoutService, PayoutId);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.driving.lock().expect("driving lock").remove(&self.1);
        }
    }
    let _done = Done(&service, id);
    let found = app
        .read(move |state| {
            let payout = state.payouts.payout(id)?.clone();
            let account = state.payouts.bank_account(payout.bank_account)?.clone();
            Some((payout, account))
        })
        .await;
    let Ok(Some((payout, account))) = found else { return };
    if payout.status != PaymentStatus::Pending {
        return;
    }
    if service.abort_before_rail {
        tracing::error!(payout = %id, "fault injection: aborting with the payout in transit, before the rail");
        std::process::abort();
    }
    let key = id.to_string();
    let minor = (payout.amount / payout.currency.units_per_minor()) as i64;
    let sent = match service.rail.lookup(&key).await {
        Ok(Some(found)) => Ok(found),
        Ok(None) => service.rail.send(&key, minor, payout.currency.code(), &account.token, &account.last4).await,
        Err(error) => Err(error),
    };
    let outcome = match sent {
        Ok(RailPayout { reference, state: RailState::Paid }) => ProviderOutcome::Succeeded { reference },
        Ok(RailPayout { state: RailState::Failed { code, message }, .. }) => ProviderOutcome::Failed { code, message },
        Ok(RailPayout { state: RailState::Pending, .. }) => return,
        Err(error) => {
            tracing::warn!(payout = %id, %error, "payout left in transit; will retry");
            return;
        }
    };
    app.metrics.count_payment(
        "payout",
        if matches!(outcome, ProviderOutcome::Succeeded { .. }) { "succeeded" } else { "failed" },
    );
    if let Err(error) = app.execute(Command::payout(PayoutCommand::SettlePayout { payout: id, outcome })).await {
        tracing::warn!(payout = %id, code = error.code, "settling a payout failed; will retry");
    }
}

/// Drives payouts left in transit and runs due schedules, every `poll`.
pub fn spawn_worker(app: Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    let poll = app.payouts.as_ref()?.poll;
    Some(tokio::spawn(async move {
        let mut interval = tokio::time::interval(poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = app.now();
            let Ok((pending, due)) = app
                .read(move |state| {
                    let pending: Vec<PayoutId> = state.payouts.pending.iter().copied().take(LISTED_MAX).collect();
                    let due: Vec<WalletId> = state
                        .payouts
                        .schedule_due
                        .iter()
                        .take_while(|(at, _)| *at <= now)
                        .map(|(_, w)| *w)
                        .take(LISTED_MAX)
                        .collect();
                    (pending, due)
                })
                .await
            else {
                continue;
            };
            for wallet in due {
                if let Err(error) = app.execute(Command::payout(PayoutCommand::RunSchedule { wallet })).await {
                    tracing::warn!(%wallet, code = error.code, "running a payout schedule failed");
                }
            }
            for id in pending {
                drive_payout(&app, id, false).await;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iban_and_routing_checksums() {
        for iban in ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606"] {
            assert!(iban_valid(iban), "{iban}");
        }
        for iban in
            ["DE89370400440532013001", "GB82WEST1234569876543", "de89370400440532013000", "DE8937040044053201300!"]
        {
            assert!(!iban_valid(iban), "{iban}");
        }
        for routing in ["011000015", "021000021", "111000025"] {
            assert!(aba_routing_valid(routing), "{routing}");
        }
        for routing in ["011000016", "12345678", "0110000a5"] {
            assert!(!aba_routing_valid(routing), "{routing}");
        }
    }
}
