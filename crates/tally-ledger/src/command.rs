//! What the ledger is asked to do (commands) and what it answers (receipts and
//! operations). Commands are plain data so the engine can journal and replay them.

use crate::billing::{Aggregation, PlanSpec, Quantity, SubscriptionStatus};
use crate::ids::*;
use crate::money::{Amount, Currency, Money, PartsPerMillion};
use crate::rejection::Rejection;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC. The core never reads a clock: time arrives
/// with every command.
pub type Timestamp = i64;

/// Longest idempotency key, organization name, reason or description, in bytes.
/// Long enough for UUIDs and sentences, short enough to bound memory per command.
pub const TEXT_LENGTH_MAX: usize = 255;
/// Most merchants or products a grant may be restricted to; keeps applicability checks cheap.
pub const APPLICABILITY_ITEMS_MAX: usize = 32;
/// Longest hold: seven days. A reservation that lasts longer is an unpaid debt.
pub const HOLD_TTL_MAX_MS: i64 = 7 * 24 * 3600 * 1000;
/// Shortest hold: one second, so a hold cannot expire before its answer arrives.
pub const HOLD_TTL_MIN_MS: i64 = 1000;

/// A client's idempotency key, kept as a 128-bit BLAKE3 digest of its scope (whose key
/// it is: an API key owner) and its text. The digest is computed where the request
/// enters, off the writer thread, and is all the ledger stores: fixed size, and keys of
/// different scopes can never meet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey(pub u128);

impl IdempotencyKey {
    /// Checks the key's length (1 to 255 bytes) and digests it with its scope.
    pub fn new(scope: &str, key: &str) -> Result<IdempotencyKey, crate::Rejection> {
        if key.is_empty() || key.len() > TEXT_LENGTH_MAX || scope.len() > TEXT_LENGTH_MAX {
            return Err(crate::Rejection::TextLengthOutOfRange);
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(scope.len() as u64).to_le_bytes());
        hasher.update(scope.as_bytes());
        hasher.update(key.as_bytes());
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest.as_bytes()[..16]);
        Ok(IdempotencyKey(u128::from_le_bytes(bytes)))
    }
}

impl std::fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key:{:032x}", self.0)
    }
}

/// What an organization does on the platform; it may be both.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Roles {
    pub merchant: bool,
    pub consumer: bool,
}

impl Default for Roles {
    fn default() -> Roles {
        Roles { merchant: false, consumer: true }
    }
}

/// Who pays, and where: needed before money comes in from a payment provider.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct BillingDetails {
    pub legal_name: String,
    pub email: String,
    pub address: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub region: String,
    pub tax_id: String,
}

impl BillingDetails {
    fn fields(&self) -> [&str; 6] {
        [&self.legal_name, &self.email, &self.address, &self.country, &self.region, &self.tax_id]
    }

    /// Every field within `TEXT_LENGTH_MAX`; legal name, email and country present.
    pub fn is_valid(&self) -> bool {
        self.fields().iter().all(|f| f.len() <= TEXT_LENGTH_MAX)
            && !self.legal_name.is_empty()
            && self.email.contains('@')
            && self.country.len() == 2
            && self.country.bytes().all(|b| b.is_ascii_uppercase())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalletStatus {
    Active,
    Frozen,
    Closed,
}

/// The platform's own accounts, one of each per currency. Only these may be negative.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum SystemAccount {
    /// Money arriving from, and leaving to, payment providers: the outside world.
    ExternalFunding,
    /// The source of promotional credit.
    Promotions,
    /// Platform fees earned.
    PlatformRevenue,
    /// Taxes collected and owed.
    TaxPayable,
    /// Payouts on their way to merchants' banks.
    PayoutsInTransit,
    /// Grant remainders that expired unspent.
    ExpiredCredits,
}

impl SystemAccount {
    pub const ALL: [SystemAccount; 6] = [
        SystemAccount::ExternalFunding,
        SystemAccount::Promotions,
        SystemAccount::PlatformRevenue,
        SystemAccount::TaxPayable,
        SystemAccount::PayoutsInTransit,
        SystemAccount::ExpiredCredits,
    ];
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub enum Account {
    Wallet(WalletId),
    System(SystemAccount, Currency),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantCategory {
    Paid,
    Promotional,
    Compensation,
}

/// Restricts a grant to debits towards some merchants and/or products. An empty list
/// means "any".
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Applicability {
    pub merchants: Vec<OrganizationId>,
    pub products: Vec<ProductId>,
}

impl Applicability {
    pub fn allows(&self, merchant: Option<OrganizationId>, product: Option<ProductId>) -> bool {
        let merchant_ok = self.merchants.is_empty() || merchant.is_some_and(|m| self.merchants.contains(&m));
        let product_ok = self.products.is_empty() || product.is_some_and(|p| self.products.contains(&p));
        merchant_ok && product_ok
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct GrantSpec {
    pub category: GrantCategory,
    /// Lower numbers are spent first.
    pub priority: u32,
    pub expires_at: Option<Timestamp>,
    pub applicability: Option<Applicability>,
}

/// Which system account an admin adjustment moves money against.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustmentSource {
    ExternalFunding,
    Promotions,
}

impl AdjustmentSource {
    pub fn account(self) -> SystemAccount {
        match self {
            AdjustmentSource::ExternalFunding => SystemAccount::ExternalFunding,
            AdjustmentSource::Promotions => SystemAccount::Promotions,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    /// Money paid in through a payment provider.
    TopUp,
    /// An admin's adjustment.
    Adjustment,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// A plain wallet-to-wallet transfer.
    Transfer,
    /// The rated cost of usage, from a consumer to a merchant.
    Charge,
}

/// How the platform's fee on a transfer is computed; it comes out of what the payee receives.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum Fee {
    #[default]
    None,
    Rate(PartsPerMillion),
    Fixed(Amount),
}

/// A money-moving request. Each one travels with an idempotency key.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum MoneyAction {
    /// Adds money to a wallet's main balance, or as a grant when `grant` is set.
    Credit {
        wallet: WalletId,
        amount: Money,
        kind: CreditKind,
        source: AdjustmentSource,
        grant: Option<GrantSpec>,
        reason: String,
    },
    /// Takes money out of a wallet (admin debit), never below available.
    Debit {
        wallet: WalletId,
        amount: Money,
        source: AdjustmentSource,
        reason: String,
    },
    /// Moves money between two wallets in one currency; the fee goes to platform revenue.
    Transfer {
        from: WalletId,
        to: WalletId,
        amount: Money,
        fee: Fee,
        kind: TransferKind,
        product: Option<ProductId>,
        description: String,
    },
    PlaceHold {
        wallet: WalletId,
        amount: Money,
        ttl_ms: i64,
        exclusive: bool,
        /// The wallet a capture must pay, when known at placement; grants are chosen
        /// by their applicability to its organization.
        payee: Option<WalletId>,
        product: Option<ProductId>,
        description: String,
    },
    /// Captures up to the held amount into `to` (less the fee); the rest is released.
    CaptureHold {
        hold: HoldId,
        amount: Option<Amount>,
        to: WalletId,
        fee: Fee,
    },
    ReleaseHold {
        hold: HoldId,
    },
    /// Expires what is left of a grant now, moving it back to its source.
    VoidGrant {
        grant: GrantId,
        reason: String,
    },
    /// A merchant's access check with a reservation: rates `quantity` (or takes
    /// `amount`) for the consumer's subscription and holds that much on the consumer's
    /// wallet for the merchant. Usage events naming the hold capture from it.
    Reserve {
        merchant: OrganizationId,
        consumer: OrganizationId,
        meter: String,
        quantity: Option<Quantity>,
        amount: Option<Amount>,
        properties: Vec<(String, String)>,
        ttl_ms: i64,
    },
}

/// A merchant's report that a consumer used a meter. `key` is the digest of the
/// merchant's event id: a second event with the same id is a duplicate.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct UsageEvent {
    pub key: IdempotencyKey,
    pub consumer: OrganizationId,
    pub meter: String,
    pub quantity: Quantity,
    pub at: Timestamp,
    pub properties: Vec<(String, String)>,
    /// A reservation (hold) from an access check to capture from first.
    pub reservation: Option<HoldId>,
    /// Releases what is left of the reservation after this event.
    pub finish: bool,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Command {
    CreateOrganization {
        roles: Roles,
        name: String,
    },
    CreateWallet {
        organization: OrganizationId,
        currency: Currency,
        low_balance_threshold: Option<Amount>,
        /// An organization has one wallet per currency unless it asks for more.
        additional: bool,
    },
    /// Replaces an organization's roles and billing details.
    UpdateOrganization {
        organization: OrganizationId,
        roles: Roles,
        billing: Option<BillingDetails>,
    },
    SetWalletStatus {
        wallet: WalletId,
        status: WalletStatus,
    },
    SetLowBalanceThreshold {
        wallet: WalletId,
        threshold: Option<Amount>,
    },
    /// A money-moving request made by an organization for itself: applied only if the
    /// wallet, hold or grant it takes money from is the organization's own. Checked by
    /// the writer, so no race between a check and the change can open another
    /// organization's wallet.
    MoveAs {
        actor: OrganizationId,
        key: IdempotencyKey,
        action: MoneyAction,
    },
    Move {
        key: IdempotencyKey,
        action: MoneyAction,
    },
    /// Changes the ledger's settings. Settings are journaled like everything else, so a
    /// replay decides exactly as the original run did.
    Configure {
        settings: crate::state::Settings,
    },
    /// Expires due holds, grants and idempotency keys, and renews subscriptions. The
    /// engine issues it when something is due, so it happens on time without any request.
    Tick,
    CreateProduct {
        merchant: OrganizationId,
        name: String,
    },
    CreateMeter {
        merchant: OrganizationId,
        code: String,
        unit: String,
        aggregation: Aggregation,
        product: Option<ProductId>,
    },
    /// Creates a plan, or a new version of one (`spec.replaces`); plans never change.
    CreatePlan {
        spec: PlanSpec,
    },
    /// Stops a plan taking new subscriptions; existing ones keep it.
    ArchivePlan {
        plan: PlanId,
    },
    /// Subscribes a consumer to a plan, creating its wallet in the plan's currency if
    /// needed, and charges the first period's recurring fee.
    Subscribe {
        consumer: OrganizationId,
        plan: PlanId,
    },
    CancelSubscription {
        subscription: SubscriptionId,
        at_period_end: bool,
    },
    /// Rates and charges usage events, each on its own: one event's rejection does not
    /// affect the others.
    Usage {
        merchant: OrganizationId,
        events: Vec<UsageEvent>,
    },
    /// Records a fact from outside the ledger (a webhook endpoint disabled) in the
    /// journal, so it takes its place in the one ordered event log. Moves nothing.
    Notice {
        kind: String,
        /// None: the platform's.
        organization: Option<OrganizationId>,
        object: String,
        /// The object's JSON.
        data: String,
    },
    /// Payment methods, taxes, top-ups and checkouts (see `payments.rs`).
    /// Boxed: payment commands are rare and large, and every command in the queue
    /// pays for the largest variant.
    Payment(Box<crate::payments::PaymentCommand>),
    /// Verification, bank accounts and payouts (see `payouts.rs`).
    Payout(Box<crate::payouts::PayoutCommand>),
}

impl Command {
    pub fn payment(command: crate::payments::PaymentCommand) -> Command {
        Command::Payment(Box::new(command))
    }

    pub fn payout(command: crate::payouts::PayoutCommand) -> Command {
        Command::Payout(Box::new(command))
    }

    /// The names of command kinds, indexed by [`Command::kind_index`] (for metrics).
    pub const KINDS: &'static [&'static str] = &[
        "create_organization",
        "create_wallet",
        "update_organization",
        "set_wallet_status",
        "set_low_balance_threshold",
        "move_as",
        "move",
        "configure",
        "tick",
        "create_product",
        "create_meter",
        "create_plan",
        "archive_plan",
        "subscribe",
        "cancel_subscription",
        "usage",
        "notice",
        "payment",
        "payout",
    ];

    pub fn kind_index(&self) -> usize {
        match self {
            Command::CreateOrganization { .. } => 0,
            Command::CreateWallet { .. } => 1,
            Command::UpdateOrganization { .. } => 2,
            Command::SetWalletStatus { .. } => 3,
            Command::SetLowBalanceThreshold { .. } => 4,
            Command::MoveAs { .. } => 5,
            Command::Move { .. } => 6,
            Command::Configure { .. } => 7,
            Command::Tick => 8,
            Command::CreateProduct { .. } => 9,
            Command::CreateMeter { .. } => 10,
            Command::CreatePlan { .. } => 11,
            Command::ArchivePlan { .. } => 12,
            Command::Subscribe { .. } => 13,
            Command::CancelSubscription { .. } => 14,
            Command::Usage { .. } => 15,
            Command::Notice { .. } => 16,
            Command::Payment(_) => 17,
            Command::Payout(_) => 18,
        }
    }
}

/// Longest notice payload, in bytes.
pub const NOTICE_DATA_MAX: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    TopUp,
    AdjustmentCredit,
    AdjustmentDebit,
    GrantCredit,
    Transfer,
    Charge,
    HoldCapture,
    GrantExpiry,
    GrantVoid,
    /// A subscription's recurring fee.
    RecurringFee,
    /// A checkout: the wallet part and the card part to the merchant, less the fee.
    Checkout,
    /// Money given back: a top-up to its payment method, or a payment to the consumer.
    Refund,
    /// A top-up refund the provider refused, put back.
    RefundReversal,
    /// A payout: from the wallet to payouts in transit.
    Payout,
    /// A payout the rail paid: from in transit to the outside world.
    PayoutPaid,
    /// A payout the rail refused: from in transit back to the wallet.
    PayoutReturn,
}

impl OperationKind {
    pub fn code(self) -> &'static str {
        match self {
            OperationKind::TopUp => "top_up",
            OperationKind::AdjustmentCredit => "adjustment_credit",
            OperationKind::AdjustmentDebit => "adjustment_debit",
            OperationKind::GrantCredit => "grant_credit",
            OperationKind::Transfer => "transfer",
            OperationKind::Charge => "charge",
            OperationKind::HoldCapture => "hold_capture",
            OperationKind::GrantExpiry => "grant_expiry",
            OperationKind::GrantVoid => "grant_void",
            OperationKind::RecurringFee => "recurring_fee",
            OperationKind::Checkout => "checkout",
            OperationKind::Refund => "refund",
            OperationKind::RefundReversal => "refund_reversal",
            OperationKind::Payout => "payout",
            OperationKind::PayoutPaid => "payout_paid",
            OperationKind::PayoutReturn => "payout_return",
        }
    }
}

/// How much a leg took from (negative) or gave to (positive) one grant.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GrantPortion {
    pub grant: GrantId,
    pub amount: Amount,
}

/// One side of an operation on one account: signed amount and the balance after it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Leg {
    pub account: Account,
    pub amount: Amount,
    pub balance_after: Amount,
    pub grants: Vec<GrantPortion>,
}

/// One atomic change of balances. Its legs sum to zero (one currency per operation).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Operation {
    pub id: OperationId,
    pub kind: OperationKind,
    pub currency: Currency,
    pub at: Timestamp,
    pub legs: Legs,
}

/// An operation's legs; a charge has three, so they are kept inline.
pub type Legs = smallvec::SmallVec<[Leg; 3]>;

/// The short form of an accepted money-moving result, kept with its idempotency key so
/// a repeat answers with the same operation and object.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReceiptRef {
    pub operation: Option<OperationId>,
    pub hold: Option<HoldId>,
    pub grant: Option<GrantId>,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Receipt {
    OrganizationCreated(OrganizationId),
    WalletCreated(WalletId),
    WalletUpdated(WalletId),
    OrganizationUpdated(OrganizationId),
    Configured,
    /// A credit, debit, transfer or charge; a grant credit also names the new grant.
    Posted {
        operation: Operation,
        grant: Option<GrantId>,
    },
    HoldPlaced {
        hold: HoldId,
        expires_at: Timestamp,
    },
    /// A capture posts an operation; the uncaptured rest is released.
    HoldCaptured {
        hold: HoldId,
        operation: Operation,
        released: Amount,
    },
    /// A release returns the reservation; parts of grants that expired or were voided
    /// meanwhile are swept by the next tick.
    HoldReleased {
        hold: HoldId,
        released: Amount,
    },
    GrantVoided {
        grant: GrantId,
        operation: Option<Operation>,
    },
    /// What a tick expired; `keys_pruned` counts the idempotency keys it forgot.
    Expired {
        holds: Vec<HoldId>,
        operations: Vec<Operation>,
        keys_pruned: u64,
        renewals: Vec<Renewal>,
    },
    ProductCreated(ProductId),
    MeterCreated(MeterId),
    PlanCreated {
        plan: PlanId,
        /// The merchant's wallet in the plan's currency, if the plan created it.
        wallet_created: Option<WalletId>,
    },
    PlanArchived(PlanId),
    /// A subscription created or changed; a new one may have created the consumer's
    /// wallet and charged the first fee.
    Subscription {
        subscription: SubscriptionId,
        status: SubscriptionStatus,
        wallet_created: Option<WalletId>,
        fee: Option<Operation>,
        low_balance: bool,
    },
    /// One outcome per event, in order.
    Usage {
        results: Vec<Result<UsageCharge, Rejection>>,
    },
    Noticed,
    Reserved {
        hold: HoldId,
        wallet: WalletId,
        expires_at: Timestamp,
        amount: Amount,
    },
    /// A repeat of an idempotency key: the original result, not applied again.
    Replayed(ReceiptRef),
    Payment(crate::payments::PaymentReceipt),
    Payout(crate::payouts::PayoutReceipt),
}

impl Receipt {
    /// The reference a repeat of the same key must answer with.
    pub fn reference(&self) -> ReceiptRef {
        let mut reference = ReceiptRef { operation: None, hold: None, grant: None };
        match self {
            Receipt::Posted { operation, grant } => {
                reference.operation = Some(operation.id);
                reference.grant = *grant;
            }
            Receipt::HoldPlaced { hold, .. } => reference.hold = Some(*hold),
            Receipt::HoldCaptured { hold, operation, .. } => {
                reference.hold = Some(*hold);
                reference.operation = Some(operation.id);
            }
            Receipt::HoldReleased { hold, .. } | Receipt::Reserved { hold, .. } => reference.hold = Some(*hold),
            Receipt::GrantVoided { grant, operation } => {
                reference.grant = Some(*grant);
                reference.operation = operation.as_ref().map(|o| o.id);
            }
            Receipt::Replayed(original) => return *original,
            _ => {}
        }
        reference
    }

    /// Every operation this receipt posted, for history.
    pub fn operations(&self) -> Vec<&Operation> {
        match self {
            Receipt::Posted { operation, .. } | Receipt::HoldCaptured { operation, .. } => vec![operation],
            Receipt::GrantVoided { operation, .. } => operation.iter().collect(),
            Receipt::Expired { operations, renewals, .. } => {
                operations.iter().chain(renewals.iter().filter_map(|r| r.fee.as_ref())).collect()
            }
            Receipt::Subscription { fee, .. } => fee.iter().collect(),
            Receipt::Payment(
                crate::payments::PaymentReceipt::TopUp { operation, .. }
                | crate::payments::PaymentReceipt::Checkout { operation, .. }
                | crate::payments::PaymentReceipt::Refund { operation, .. },
            ) => operation.iter().collect(),
            Receipt::Payout(crate::payouts::PayoutReceipt::Payout { operation, .. }) => operation.iter().collect(),
            Receipt::Usage { results } => {
                results.iter().filter_map(|r| r.as_ref().ok().and_then(|c| c.operation.as_ref())).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// What one usage event cost and how it was paid.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct UsageCharge {
    pub subscription: SubscriptionId,
    /// The start of the subscription period the event was rated in.
    pub period_start: Timestamp,
    pub currency: Currency,
    pub meter: MeterId,
    pub product: Option<ProductId>,
    /// The quantity the event added to the period (1 for a counting meter).
    pub quantity: Quantity,
    /// Index of the dimension value that priced it, for dimensional prices.
    pub dimension: Option<u16>,
    pub amount: Amount,
    pub fee: Amount,
    /// The charge; None when the event cost less than one ledger unit so far (the
    /// fraction is carried to the next event).
    pub operation: Option<Operation>,
    /// The reservation captured from, and what was released if this event finished it.
    pub reservation: Option<HoldId>,
    pub released: Option<Amount>,
    /// The wallet's available balance fell below its threshold with this charge.
    pub low_balance: bool,
}

/// What a period boundary or a fee retry did to a subscription.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Renewal {
    pub subscription: SubscriptionId,
    pub status: SubscriptionStatus,
    pub period_start: Timestamp,
    pub fee: Option<Operation>,
    pub low_balance: bool,
}
