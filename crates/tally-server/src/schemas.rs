//! The shapes of the API's answers, for the OpenAPI document only. Answers are built
//! as JSON by the view functions (`views.rs` and each module's own); these types name
//! their fields and types. The black-box tests check every answer they receive against
//! the published document (tests/common/contract.rs), so a view and its schema cannot
//! drift apart unnoticed: an undocumented field fails a test.
//!
//! Amounts are decimal strings in the major unit (`"12.50"`), ids are prefixed strings,
//! times are RFC 3339.

#![allow(dead_code)]

use utoipa::ToSchema;

/// A list page: `data` in order; `next_cursor` (on paged lists) is the last id of the
/// page when there are more, to pass as `after`, else null.
macro_rules! list {
    ($name:ident, $item:ty, $doc:literal) => {
        #[doc = $doc]
        #[allow(dead_code)]
        #[derive(ToSchema)]
        pub struct $name {
            /// Always `list`.
            pub object: String,
            pub data: Vec<$item>,
            /// On paged lists: the cursor of the next page, or null on the last one.
            #[schema(nullable)]
            pub next_cursor: Option<String>,
        }
    };
}
pub(crate) use list;

/// `{"status": "ok"}` or `{"status": "ready"}`.
#[derive(ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(ToSchema)]
pub struct Roles {
    pub merchant: bool,
    pub consumer: bool,
}

/// Who pays, and where.
#[derive(ToSchema)]
pub struct BillingDetails {
    pub legal_name: String,
    pub email: String,
    pub address: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub region: String,
    pub tax_id: String,
}

#[derive(ToSchema)]
pub struct Organization {
    /// `org_…`
    pub id: String,
    /// Always `organization`.
    pub object: String,
    pub name: String,
    pub roles: Roles,
    /// Null until set.
    pub billing_details: Option<BillingDetails>,
    /// The organization's wallet ids.
    pub wallets: Vec<String>,
}
list!(OrganizationList, Organization, "A page of organizations.");

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum WalletStatus {
    Active,
    Frozen,
    Closed,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum GrantCategory {
    Paid,
    Promotional,
    Compensation,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum GrantStatus {
    Active,
    Expired,
    Voided,
    Spent,
}

/// Which debits a grant may pay for; an empty list means any.
#[derive(ToSchema)]
pub struct Applicability {
    /// Merchant organization ids.
    pub merchants: Vec<String>,
    /// Product ids.
    pub products: Vec<String>,
}

/// Credit in a wallet, spent by priority, then earliest expiry, then oldest.
#[derive(ToSchema)]
pub struct Grant {
    /// `grt_…`
    pub id: String,
    /// Always `grant`.
    pub object: String,
    pub wallet: String,
    pub category: GrantCategory,
    /// Lower is spent first.
    pub priority: u32,
    /// Null: never expires.
    pub expires_at: Option<String>,
    pub amount: String,
    /// Unspent, including what holds reserve.
    pub remaining: String,
    /// Reserved by active holds.
    pub reserved: String,
    pub status: GrantStatus,
    /// Null: any merchant and product.
    pub applicability: Option<Applicability>,
}
list!(GrantList, Grant, "A wallet's grants.");

/// A wallet: balance, held and available (= balance − held), in one currency.
#[derive(ToSchema)]
pub struct Wallet {
    /// `wal_…`
    pub id: String,
    /// Always `wallet`.
    pub object: String,
    pub organization: String,
    /// ISO 4217.
    pub currency: String,
    pub status: WalletStatus,
    pub balance: String,
    pub held: String,
    pub available: String,
    /// A `balance.low` event is recorded when a debit takes available below this.
    pub low_balance_threshold: Option<String>,
    pub grants: Vec<Grant>,
}
list!(WalletList, Wallet, "An organization's wallets.");

/// What a hold reserves from one source.
#[derive(ToSchema)]
pub struct Reservation {
    /// `main` (the wallet's own balance) or a grant id.
    pub source: String,
    pub amount: String,
}

/// An active hold.
#[derive(ToSchema)]
pub struct Hold {
    /// `hld_…`
    pub id: String,
    /// Always `hold`.
    pub object: String,
    pub wallet: String,
    pub amount: String,
    pub currency: String,
    /// `active` (resolved holds are gone from the wallet).
    pub status: String,
    /// While active, nothing else may be debited from the wallet.
    pub exclusive: bool,
    /// The wallet a capture pays, if named.
    pub payee: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    pub reservations: Vec<Reservation>,
}
list!(HoldList, Hold, "A wallet's active holds.");

/// The hold just placed.
#[derive(ToSchema)]
pub struct HoldPlaced {
    pub id: String,
    /// Always `hold`.
    pub object: String,
    pub wallet: String,
    pub amount: String,
    pub currency: String,
    /// `active`.
    pub status: String,
    pub exclusive: bool,
    pub payee: Option<String>,
    pub description: Option<String>,
    pub expires_at: String,
}

/// The part of a leg one grant paid.
#[derive(ToSchema)]
pub struct LegGrant {
    pub grant: String,
    pub amount: String,
}

/// One account's change within an operation. An operation's legs sum to zero.
#[derive(ToSchema)]
pub struct Leg {
    /// A wallet id, or `system:<account>:<currency>` for the platform's own accounts.
    pub account: String,
    /// Signed: positive credits the account.
    pub amount: String,
    pub balance_after: String,
    /// On a wallet's debit: what came from which grant (the rest from the main balance).
    pub grants: Vec<LegGrant>,
}

/// A double-entry operation with all its legs.
#[derive(ToSchema)]
pub struct Operation {
    /// `op_…`
    pub id: String,
    /// Always `operation`.
    pub object: String,
    /// What moved the money: `transfer`, `admin_credit`, `charge`, `top_up` …
    pub kind: String,
    pub currency: String,
    pub legs: Vec<Leg>,
    pub created_at: String,
}

/// A grant created with its funding operation.
#[derive(ToSchema)]
pub struct GrantCreated {
    /// The new grant's id.
    pub grant: String,
    pub operation: Operation,
}

#[derive(ToSchema)]
pub struct HoldCaptured {
    pub hold: String,
    /// `captured`.
    pub status: String,
    /// What went back to the wallet.
    pub released: String,
    pub operation: Operation,
}

#[derive(ToSchema)]
pub struct HoldReleased {
    pub hold: String,
    /// `released`.
    pub status: String,
    pub released: String,
}

#[derive(ToSchema)]
pub struct GrantVoided {
    pub grant: String,
    /// `voided`.
    pub status: String,
    /// The operation that returned the remainder, or null when nothing was left.
    pub operation: Option<Operation>,
}

/// A hold that is no longer active: what was placed and how it ended.
#[derive(ToSchema)]
pub struct ResolvedHold {
    pub id: String,
    /// Always `hold`.
    pub object: String,
    pub wallet: String,
    pub amount: Option<String>,
    pub currency: String,
    /// `captured`, `released` or `expired`.
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    pub resolved_at: String,
    /// What went back to the wallet (captured or released holds).
    pub released: Option<String>,
    /// The capture's operation id (captured holds).
    pub operation: Option<String>,
}

/// An active hold, or how a resolved one ended.
#[derive(ToSchema)]
#[serde(untagged)]
pub enum AnyHold {
    Active(Hold),
    Resolved(ResolvedHold),
}

/// One change to a wallet's balance.
#[derive(ToSchema)]
pub struct Movement {
    /// Always `movement`.
    pub object: String,
    pub wallet: String,
    pub operation: String,
    pub kind: String,
    pub created_at: String,
    /// Signed: positive credits the wallet.
    pub amount: String,
    pub balance_after: String,
    pub currency: String,
    /// What came from which grant.
    pub grants: Vec<LegGrant>,
}
list!(MovementList, Movement, "A page of a wallet's movements, newest first; `next_cursor` goes in `before`.");

/// An API key's metadata (never its secret, except once at creation).
#[derive(ToSchema)]
pub struct ApiKey {
    /// `key_…`
    pub id: String,
    /// Always `api_key`.
    pub object: String,
    /// The first characters of the secret, to recognize it.
    pub prefix: String,
    pub name: String,
    /// Null: a platform admin key.
    pub organization: Option<String>,
    /// Any of read, write, usage, payouts, admin.
    pub scopes: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// Only in the answer that creates the key: the secret, shown once.
    pub secret: Option<String>,
}
list!(ApiKeyList, ApiKey, "Every API key.");
