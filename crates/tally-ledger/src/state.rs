//! The ledger's in-memory state and the deterministic state machine that changes it.
//! `State::apply` either applies a command whole or rejects it and leaves the state
//! exactly as it was: every check runs before the first write.

use crate::billing::{Meter, PricePlan, Product, Subscription};
use crate::command::*;
use crate::ids::*;
use crate::keys::KeyTable;
use crate::money::{Amount, Currency, Money, PartsPerMillion};
use crate::rejection::Rejection;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// How long an idempotency key is remembered unless configured otherwise: 24 hours.
pub const IDEMPOTENCY_RETENTION_DEFAULT_MS: i64 = 24 * 3600 * 1000;
/// Shortest allowed idempotency retention: the contract promises at least 24 hours.
pub const IDEMPOTENCY_RETENTION_MIN_MS: i64 = IDEMPOTENCY_RETENTION_DEFAULT_MS;
/// Most live grants in one wallet; each debit walks them, so they must stay few.
pub const WALLET_GRANTS_MAX: usize = 64;
/// Most active holds on one wallet; bounds the reservations a wallet can accumulate.
pub const WALLET_HOLDS_MAX: u32 = 10_000;

/// How long a usage event id is remembered: 7 days, the contract's minimum.
pub const USAGE_RETENTION_MIN_MS: i64 = 7 * 24 * 3600 * 1000;
/// How old a usage event may be by default: 24 hours.
pub const USAGE_WINDOW_DEFAULT_MS: i64 = 24 * 3600 * 1000;
/// How far ahead of the ledger's clock an event's time may be (clock skew).
pub const USAGE_FUTURE_MAX_MS: i64 = 5 * 60 * 1000;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Settings {
    pub idempotency_retention_ms: i64,
    /// How long usage event ids are remembered (duplicates refused).
    pub usage_retention_ms: i64,
    /// Events older than this are refused (`event_too_old`); never longer than the
    /// retention, so an event old enough to be forgotten cannot be charged twice.
    pub usage_window_ms: i64,
    /// The platform's fee on charges of plans that do not set their own.
    pub platform_fee: PartsPerMillion,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            idempotency_retention_ms: IDEMPOTENCY_RETENTION_DEFAULT_MS,
            usage_retention_ms: USAGE_RETENTION_MIN_MS,
            usage_window_ms: USAGE_WINDOW_DEFAULT_MS,
            platform_fee: PartsPerMillion(0),
        }
    }
}

/// The ledger knows only that an organization exists and which wallet is its first in
/// each currency; its details live with the server.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Organization {
    pub id: OrganizationId,
    pub name: Box<str>,
    pub roles: Roles,
    pub billing: Option<Box<BillingDetails>>,
    /// The organization's default wallet per currency; almost always one, so inline.
    pub wallets: SmallVec<[(Currency, WalletId); 1]>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Wallet {
    pub id: WalletId,
    pub organization: OrganizationId,
    pub currency: Currency,
    pub status: WalletStatus,
    /// The main balance: money not in any grant.
    pub main: i128,
    /// The part of `main` reserved by active holds.
    pub main_held: i128,
    /// The sum of the remaining amounts of this wallet's live grants.
    pub granted: i128,
    /// The sum of active holds.
    pub held: i128,
    pub low_balance_threshold: Option<Amount>,
    /// Grants with something remaining, in spending order.
    pub grants: Vec<GrantId>,
    /// The active exclusive hold's id, or 0 for none (kept as a bare u64 to keep
    /// wallets small: a million of them must fit in 300 MB).
    pub exclusive_hold: u64,
    pub active_holds: u32,
    /// Available is below the threshold and `balance.low` was reported for this crossing.
    pub low_balance_notified: bool,
}

impl Wallet {
    pub fn balance(&self) -> Amount {
        Amount::from_units(self.main + self.granted)
    }

    pub fn held(&self) -> Amount {
        Amount::from_units(self.held)
    }

    pub fn available(&self) -> Amount {
        Amount::from_units(self.main + self.granted - self.held)
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    Active,
    /// Past its expiry; what was reserved at that moment is swept when released.
    Expired,
    Voided,
    Spent,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub id: GrantId,
    pub wallet: WalletId,
    pub category: GrantCategory,
    pub priority: u32,
    pub expires_at: Option<Timestamp>,
    pub applicability: Option<Box<Applicability>>,
    pub source: SystemAccount,
    pub amount: i128,
    pub remaining: i128,
    pub reserved: i128,
    pub status: GrantStatus,
    pub created_at: Timestamp,
}

impl Grant {
    pub(crate) fn spending_order(&self) -> (u32, Timestamp, GrantId) {
        (self.priority, self.expires_at.unwrap_or(Timestamp::MAX), self.id)
    }

    pub(crate) fn usable(&self, now: Timestamp) -> bool {
        self.status == GrantStatus::Active && self.expires_at.is_none_or(|at| at > now)
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum Portion {
    Main,
    Grant(GrantId),
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    pub portion: Portion,
    pub amount: i128,
}

/// The portions one debit or hold takes; almost always one or two, so kept inline.
pub type Plan = SmallVec<[Reservation; 2]>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hold {
    pub id: HoldId,
    pub wallet: WalletId,
    pub amount: i128,
    pub reservations: Plan,
    pub expires_at: Timestamp,
    pub exclusive: bool,
    pub payee: Option<WalletId>,
    pub placed_at: Timestamp,
}

/// What is remembered of an accepted key: 32 bytes, so millions fit.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub fingerprint: u64,
    /// The operation posted, or 0.
    pub operation: u64,
    /// The hold or grant the request made or touched, or 0.
    pub object: u64,
    pub object_is_grant: bool,
}

impl IdempotencyRecord {
    fn new(fingerprint: u64, reference: ReceiptRef) -> IdempotencyRecord {
        let (object, object_is_grant) = match (reference.hold, reference.grant) {
            (Some(hold), _) => (hold.0, false),
            (None, Some(grant)) => (grant.0, true),
            (None, None) => (0, false),
        };
        IdempotencyRecord { fingerprint, operation: reference.operation.map_or(0, |o| o.0), object, object_is_grant }
    }

    pub fn reference(&self) -> ReceiptRef {
        let object = (self.object != 0).then_some(self.object);
        ReceiptRef {
            operation: (self.operation != 0).then_some(OperationId(self.operation)),
            hold: object.filter(|_| !self.object_is_grant).map(HoldId),
            grant: object.filter(|_| self.object_is_grant).map(GrantId),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SystemBalances {
    pub currency: Currency,
    /// Indexed by `SystemAccount as usize`.
    pub balances: [i128; SystemAccount::ALL.len()],
}

/// Everything a decision needs. Owned by exactly one thread (the engine's writer).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub settings: Settings,
    pub organizations: Vec<Organization>,
    pub wallets: Vec<Wallet>,
    pub grants: Vec<Grant>,
    pub holds: FxHashMap<HoldId, Hold>,
    pub next_hold_id: u64,
    pub next_operation_id: u64,
    /// The system accounts' balances, one row per currency seen (a handful, so a list).
    pub system: Vec<SystemBalances>,
    /// Idempotency keys in two generations: a key lives in `current` from its first use
    /// and moves, with its whole generation, to `previous` when the retention period
    /// has passed; `previous` is dropped at the next turn. So every key is kept for at
    /// least the retention period (and at most twice it), with no per-key expiry work.
    pub idempotency: KeyTable,
    pub idempotency_previous: KeyTable,
    pub idempotency_generation_started_at: Timestamp,
    pub hold_expiry: BTreeSet<(Timestamp, HoldId)>,
    /// Active holds by wallet, for listing one wallet's holds without a scan.
    pub holds_by_wallet: BTreeSet<(WalletId, HoldId)>,
    /// Grants to sweep at a time: active grants at their expiry, and expired or voided
    /// grants whose released reservations must be swept now.
    pub grant_sweeps: BTreeSet<(Timestamp, GrantId)>,
    pub products: Vec<Product>,
    pub meters: Vec<Meter>,
    pub plans: Vec<PricePlan>,
    pub subscriptions: Vec<Subscription>,
    /// The consumer's live (not canceled) subscription to a merchant.
    pub subscription_by_pair: FxHashMap<(OrganizationId, OrganizationId), SubscriptionId>,
    /// Period ends and fee retries, by time.
    pub renewals: BTreeSet<(Timestamp, SubscriptionId)>,
    /// Usage event ids, in two generations like idempotency keys, kept for the usage
    /// retention period.
    pub usage_keys: KeyTable,
    pub usage_keys_previous: KeyTable,
    pub usage_generation_started_at: Timestamp,
    pub payments: crate::payments::Payments,
    pub payouts: crate::payouts::Payouts,
    /// Wallets debited by the command being applied, for auto top-up (empty between
    /// commands; filled only while some wallet has payment settings).
    #[serde(skip)]
    pub(crate) debited: Vec<WalletId>,
}

/// A cache hint: start loading `value`'s memory now. A no-op where unsupported.
#[inline(always)]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: prefetch is a hint; it never faults, and the pointer comes from a reference.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>());
        }
    }
}

/// Prefetches every cache line of `value`.
#[inline(always)]
fn prefetch_lines<T>(value: &T) {
    let start = (value as *const T).cast::<u8>();
    for offset in (0..std::mem::size_of::<T>()).step_by(64) {
        // SAFETY: the offset stays inside `value`, so the pointer is in bounds.
        prefetch(unsafe { &*start.add(offset) });
    }
}

/// A deterministic word-at-a-time hasher for request fingerprints. Fingerprints are
/// stored and compared across restarts, so they must not depend on a random seed; they
/// only tell a repeat from a different request under the same (client-chosen) key.
struct Fingerprinter(u64);

const FINGERPRINT_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

impl Fingerprinter {
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FINGERPRINT_MULTIPLIER);
    }
}

impl Hasher for Fingerprinter {
    fn finish(&self) -> u64 {
        // A final avalanche so that nearby inputs give unrelated fingerprints.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.mix(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 59));
    }

    fn write_u8(&mut self, value: u8) {
        self.mix(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    fn write_i64(&mut self, value: i64) {
        self.mix(value as u64);
    }

    fn write_u128(&mut self, value: u128) {
        self.mix(value as u64);
        self.mix((value >> 64) as u64);
    }

    fn write_i128(&mut self, value: i128) {
        self.write_u128(value as u128);
    }

    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }

    fn write_isize(&mut self, value: isize) {
        self.mix(value as u64);
    }
}

pub fn fingerprint(action: &MoneyAction) -> u64 {
    let mut hasher = Fingerprinter(0x243f_6a88_85a3_08d3);
    action.hash(&mut hasher);
    hasher.finish()
}

pub(crate) fn text_ok(text: &str, empty_allowed: bool) -> Result<(), Rejection> {
    if text.len() > TEXT_LENGTH_MAX || (!empty_allowed && text.is_empty()) {
        return Err(Rejection::TextLengthOutOfRange);
    }
    Ok(())
}

pub(crate) fn positive(amount: Amount) -> Result<i128, Rejection> {
    if amount.is_positive() {
        Ok(amount.units())
    } else {
        Err(Rejection::AmountMustBePositive)
    }
}

pub(crate) fn add(a: i128, b: i128) -> Result<i128, Rejection> {
    a.checked_add(b).ok_or(Rejection::AmountOverflow)
}

impl State {
    pub fn new(settings: Settings) -> State {
        State { settings, next_hold_id: 1, next_operation_id: 1, ..State::default() }
    }

    pub fn wallet(&self, id: WalletId) -> Option<&Wallet> {
        let index = usize::try_from(id.0).ok()?.checked_sub(1)?;
        self.wallets.get(index)
    }

    pub(crate) fn wallet_mut(&mut self, id: WalletId) -> &mut Wallet {
        &mut self.wallets[(id.0 - 1) as usize]
    }

    pub fn grant(&self, id: GrantId) -> Option<&Grant> {
        let index = usize::try_from(id.0).ok()?.checked_sub(1)?;
        self.grants.get(index)
    }

    pub(crate) fn grant_mut(&mut self, id: GrantId) -> &mut Grant {
        &mut self.grants[(id.0 - 1) as usize]
    }

    pub fn organization(&self, id: OrganizationId) -> Option<&Organization> {
        let index = usize::try_from(id.0).ok()?.checked_sub(1)?;
        self.organizations.get(index)
    }

    pub fn hold(&self, id: HoldId) -> Option<&Hold> {
        self.holds.get(&id)
    }

    /// A wallet's active holds, oldest first, at most `limit`.
    pub fn holds_of(&self, wallet: WalletId, limit: usize) -> impl Iterator<Item = &Hold> {
        self.holds_by_wallet
            .range((wallet, HoldId(0))..=(wallet, HoldId(u64::MAX)))
            .take(limit)
            .filter_map(|(_, id)| self.holds.get(id))
    }

    /// What the ledger remembers of a charged usage event (its operation, if it posted
    /// one), while the event id is kept.
    pub fn usage_key(&self, key: IdempotencyKey) -> Option<IdempotencyRecord> {
        self.usage_keys.get(key.0).or_else(|| self.usage_keys_previous.get(key.0)).copied()
    }

    pub fn wallet_for(&self, organization: OrganizationId, currency: Currency) -> Option<WalletId> {
        let found = self.organization(organization)?.wallets.iter().find(|(c, _)| *c == currency);
        found.map(|(_, wallet)| *wallet)
    }

    pub fn system_balance(&self, currency: Currency, account: SystemAccount) -> Amount {
        Amount::from_units(self.system_units(currency, account))
    }

    fn system_units(&self, currency: Currency, account: SystemAccount) -> i128 {
        self.system.iter().find(|row| row.currency == currency).map_or(0, |row| row.balances[account as usize])
    }

    fn system_row(&mut self, currency: Currency) -> &mut SystemBalances {
        let index = match self.system.iter().position(|row| row.currency == currency) {
            Some(index) => index,
            None => {
                self.system.push(SystemBalances { currency, balances: [0; SystemAccount::ALL.len()] });
                self.system.len() - 1
            }
        };
        &mut self.system[index]
    }

    /// The earliest time at which a tick has something to do.
    pub fn next_due(&self) -> Option<Timestamp> {
        [
            self.hold_expiry.first().map(|(at, _)| *at),
            self.grant_sweeps.first().map(|(at, _)| *at),
            (!self.idempotency.is_empty() || !self.idempotency_previous.is_empty())
                .then(|| self.idempotency_generation_started_at.saturating_add(self.settings.idempotency_retention_ms)),
            self.renewals.first().map(|(at, _)| *at),
            (!self.usage_keys.is_empty() || !self.usage_keys_previous.is_empty())
                .then(|| self.usage_generation_started_at.saturating_add(self.settings.usage_retention_ms)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Applies one command at time `now`. On rejection nothing has changed.
    pub fn apply(&mut self, command: &Command, now: Timestamp) -> Result<Receipt, Rejection> {
        let result = self.apply_command(command, now);
        if !self.debited.is_empty() {
            for wallet in std::mem::take(&mut self.debited) {
                self.note_auto_top_up(wallet, now);
            }
        }
        result
    }

    fn apply_command(&mut self, command: &Command, now: Timestamp) -> Result<Receipt, Rejection> {
        match command {
            Command::CreateOrganization { name, roles } => {
                text_ok(name, false)?;
                let id = OrganizationId(self.organizations.len() as u64 + 1);
                self.organizations.push(Organization {
                    id,
                    name: name.as_str().into(),
                    roles: *roles,
                    billing: None,
                    wallets: SmallVec::new(),
                });
                Ok(Receipt::OrganizationCreated(id))
            }
            Command::UpdateOrganization { organization, roles, billing } => {
                self.organization(*organization).ok_or(Rejection::OrganizationNotFound)?;
                if billing.as_ref().is_some_and(|b| !b.is_valid()) {
                    return Err(Rejection::InvalidBillingDetails);
                }
                let entry = &mut self.organizations[(organization.0 - 1) as usize];
                entry.roles = *roles;
                entry.billing = billing.clone().map(Box::new);
                Ok(Receipt::OrganizationUpdated(*organization))
            }
            Command::CreateWallet { organization, currency, low_balance_threshold, additional } => {
                self.organization(*organization).ok_or(Rejection::OrganizationNotFound)?;
                if low_balance_threshold.is_some_and(|t| t.units() < 0) {
                    return Err(Rejection::AmountMustBePositive);
                }
                let exists = self.wallet_for(*organization, *currency).is_some();
                if exists && !additional {
                    return Err(Rejection::WalletAlreadyExists);
                }
                let id = WalletId(self.wallets.len() as u64 + 1);
                self.wallets.push(Wallet {
                    id,
                    organization: *organization,
                    currency: *currency,
                    status: WalletStatus::Active,
                    main: 0,
                    main_held: 0,
                    granted: 0,
                    held: 0,
                    low_balance_threshold: *low_balance_threshold,
                    grants: Vec::new(),
                    exclusive_hold: 0,
                    active_holds: 0,
                    low_balance_notified: false,
                });
                if !exists {
                    self.organizations[(organization.0 - 1) as usize].wallets.push((*currency, id));
                }
                Ok(Receipt::WalletCreated(id))
            }
            Command::SetWalletStatus { wallet, status } => {
                let current = self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                let empty = current.main == 0 && current.granted == 0 && current.active_holds == 0;
                match (current.status, status) {
                    (WalletStatus::Closed, _) => return Err(Rejection::InvalidStatusChange),
                    (_, WalletStatus::Closed) if !empty => return Err(Rejection::WalletNotEmpty),
                    _ => {}
                }
                self.wallet_mut(*wallet).status = *status;
                Ok(Receipt::WalletUpdated(*wallet))
            }
            Command::SetLowBalanceThreshold { wallet, threshold } => {
                self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                if threshold.is_some_and(|t| t.units() < 0) {
                    return Err(Rejection::AmountMustBePositive);
                }
                self.wallet_mut(*wallet).low_balance_threshold = *threshold;
                Ok(Receipt::WalletUpdated(*wallet))
            }
            Command::Move { key, action } => self.apply_move(*key, action, None, now),
            Command::MoveAs { actor, key, action } => self.apply_move(*key, action, Some(*actor), now),
            Command::Configure { settings } => {
                if settings.idempotency_retention_ms < IDEMPOTENCY_RETENTION_MIN_MS
                    || settings.usage_retention_ms < USAGE_RETENTION_MIN_MS
                    || settings.usage_window_ms <= 0
                    || settings.usage_window_ms > settings.usage_retention_ms
                    || settings.platform_fee.0 > PartsPerMillion::MAX
                {
                    return Err(Rejection::InvalidSetting);
                }
                self.settings = *settings;
                Ok(Receipt::Configured)
            }
            Command::Tick => Ok(self.tick(now)),
            Command::Notice { kind, organization, object, data } => {
                text_ok(kind, false)?;
                text_ok(object, false)?;
                if data.len() > NOTICE_DATA_MAX {
                    return Err(Rejection::TextLengthOutOfRange);
                }
                if organization.is_some_and(|o| self.organization(o).is_none()) {
                    return Err(Rejection::OrganizationNotFound);
                }
                Ok(Receipt::Noticed)
            }
            Command::CreateProduct { .. }
            | Command::CreateMeter { .. }
            | Command::CreatePlan { .. }
            | Command::ArchivePlan { .. }
            | Command::Subscribe { .. }
            | Command::CancelSubscription { .. }
            | Command::Usage { .. } => self.apply_billing(command, now),
            Command::Payment(payment) => self.apply_payment(payment, now),
            Command::Payout(payout) => self.apply_payout(payout, now),
        }
    }

    fn apply_move(
        &mut self,
        key: IdempotencyKey,
        action: &MoneyAction,
        actor: Option<OrganizationId>,
        now: Timestamp,
    ) -> Result<Receipt, Rejection> {
        let fingerprint = fingerprint(action);
        let known = self.idempotency.get(key.0).or_else(|| self.idempotency_previous.get(key.0));
        if let Some(record) = known {
            return if record.fingerprint == fingerprint {
                Ok(Receipt::Replayed(record.reference()))
            } else {
                Err(Rejection::IdempotencyKeyMismatch)
            };
        }
        if let Some(actor) = actor {
            self.check_actor(actor, action)?;
        }
        let receipt = self.apply_action(action, now)?;
        self.idempotency.insert_new(key.0, IdempotencyRecord::new(fingerprint, receipt.reference()));
        Ok(receipt)
    }

    /// An organization acting for itself may only take money from its own wallets and
    /// holds; anything else looks, to it, as if it did not exist.
    fn check_actor(&self, actor: OrganizationId, action: &MoneyAction) -> Result<(), Rejection> {
        let owns_wallet = |wallet: WalletId| self.wallet(wallet).is_some_and(|w| w.organization == actor);
        let owns_hold = |hold: HoldId| self.hold(hold).is_some_and(|h| owns_wallet(h.wallet));
        let allowed = match action {
            MoneyAction::Transfer { from, .. } => owns_wallet(*from),
            MoneyAction::PlaceHold { wallet, .. } => owns_wallet(*wallet),
            MoneyAction::CaptureHold { hold, .. } | MoneyAction::ReleaseHold { hold } => {
                if !owns_hold(*hold) {
                    return Err(Rejection::HoldNotFound);
                }
                true
            }
            MoneyAction::Credit { wallet, .. } | MoneyAction::Debit { wallet, .. } => owns_wallet(*wallet),
            MoneyAction::VoidGrant { grant, .. } => {
                if !self.grant(*grant).is_some_and(|g| owns_wallet(g.wallet)) {
                    return Err(Rejection::GrantNotFound);
                }
                true
            }
            // A merchant reserves on its consumers' wallets, through their subscriptions.
            MoneyAction::Reserve { merchant, .. } => {
                if *merchant != actor {
                    return Err(Rejection::OrganizationNotFound);
                }
                true
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(Rejection::WalletNotFound)
        }
    }

    pub(crate) fn next_operation(
        &mut self,
        kind: OperationKind,
        currency: Currency,
        now: Timestamp,
        legs: Legs,
    ) -> Operation {
        let id = OperationId(self.next_operation_id);
        self.next_operation_id += 1;
        debug_assert_eq!(legs.iter().map(|l| l.amount.units()).sum::<i128>(), 0, "legs must sum to zero");
        Operation { id, kind, currency, at: now, legs }
    }

    /// Adds `amount` to a system account and returns its leg.
    pub(crate) fn post_system(&mut self, account: SystemAccount, currency: Currency, amount: i128) -> Leg {
        let balance = &mut self.system_row(currency).balances[account as usize];
        *balance += amount;
        Leg {
            account: Account::System(account, currency),
            amount: Amount::from_units(amount),
            balance_after: Amount::from_units(*balance),
            grants: Vec::new(),
        }
    }

    pub(crate) fn system_fits(
        &self,
        account: SystemAccount,
        currency: Currency,
        amount: i128,
    ) -> Result<(), Rejection> {
        add(self.system_units(currency, account), amount).map(|_| ())
    }

    pub(crate) fn wallet_leg(&self, wallet: WalletId, amount: i128, grants: Vec<GrantPortion>) -> Leg {
        Leg {
            account: Account::Wallet(wallet),
            amount: Amount::from_units(amount),
            balance_after: self.wallets[(wallet.0 - 1) as usize].balance(),
            grants,
        }
    }

    /// A wallet that exists, holds `currency` and is not closed.
    pub(crate) fn open_wallet(&self, id: WalletId, currency: Currency) -> Result<&Wallet, Rejection> {
        let wallet = self.wallet(id).ok_or(Rejection::WalletNotFound)?;
        if wallet.currency != currency {
            return Err(Rejection::CurrencyMismatch);
        }
        if wallet.status == WalletStatus::Closed {
            return Err(Rejection::WalletClosed);
        }
        Ok(wallet)
    }

    /// An open wallet that may be debited.
    pub(crate) fn debitable_wallet(&self, id: WalletId, currency: Currency) -> Result<&Wallet, Rejection> {
        let wallet = self.open_wallet(id, currency)?;
        if wallet.status == WalletStatus::Frozen {
            return Err(Rejection::WalletFrozen);
        }
        Ok(wallet)
    }

    /// Decides which portions of a wallet pay `amount`: usable, applicable grants in
    /// spending order, then the main balance; only what no hold has reserved.
    /// `merchant` None with `any_grant` takes from every grant (admin debits).
    pub(crate) fn plan_spend(
        &self,
        wallet: &Wallet,
        amount: i128,
        merchant: Option<OrganizationId>,
        product: Option<ProductId>,
        any_grant: bool,
        now: Timestamp,
    ) -> Result<Plan, Rejection> {
        if amount > wallet.main + wallet.granted - wallet.held {
            return Err(Rejection::InsufficientFunds);
        }
        let mut left = amount;
        let mut plan = Plan::new();
        for grant_id in &wallet.grants {
            if left == 0 {
                break;
            }
            let grant = &self.grants[(grant_id.0 - 1) as usize];
            if !grant.usable(now) {
                continue;
            }
            if !any_grant && grant.applicability.as_ref().is_some_and(|a| !a.allows(merchant, product)) {
                continue;
            }
            let take = (grant.remaining - grant.reserved).min(left);
            if take > 0 {
                plan.push(Reservation { portion: Portion::Grant(*grant_id), amount: take });
                left -= take;
            }
        }
        if left > 0 {
            let take = (wallet.main - wallet.main_held).min(left);
            if take > 0 {
                plan.push(Reservation { portion: Portion::Main, amount: take });
                left -= take;
            }
        }
        if left > 0 {
            return Err(Rejection::InsufficientFunds);
        }
        Ok(plan)
    }

    /// Takes planned portions out of a wallet (they must not be reserved) and returns the
    /// grant portions for the leg.
    pub(crate) fn spend(&mut self, wallet: WalletId, plan: &[Reservation], from_reserved: bool) -> Vec<GrantPortion> {
        let mut portions = Vec::new();
        if !self.payments.wallets.is_empty() {
            self.debited.push(wallet);
        }
        for reservation in plan {
            match reservation.portion {
                Portion::Main => {
                    let w = self.wallet_mut(wallet);
                    w.main -= reservation.amount;
                    if from_reserved {
                        w.main_held -= reservation.amount;
                    }
                }
                Portion::Grant(grant_id) => {
                    let grant = self.grant_mut(grant_id);
                    grant.remaining -= reservation.amount;
                    if from_reserved {
                        grant.reserved -= reservation.amount;
                    }
                    let emptied = grant.remaining == 0;
                    if emptied && grant.status == GrantStatus::Active {
                        grant.status = GrantStatus::Spent;
                    }
                    let w = self.wallet_mut(wallet);
                    w.granted -= reservation.amount;
                    if emptied {
                        w.grants.retain(|g| *g != grant_id);
                    }
                    portions.push(GrantPortion { grant: grant_id, amount: Amount::from_units(-reservation.amount) });
                }
            }
        }
        portions
    }

    pub(crate) fn fee_of(amount: Amount, fee: Fee) -> Result<i128, Rejection> {
        let fee = match fee {
            Fee::None => 0,
            Fee::Rate(rate) => {
                if rate.0 > crate::money::PartsPerMillion::MAX {
                    return Err(Rejection::FeeExceedsAmount);
                }
                amount.times_parts_per_million_round_down(rate)?.units()
            }
            Fee::Fixed(fixed) => {
                if fixed.units() < 0 {
                    return Err(Rejection::AmountMustBePositive);
                }
                fixed.units()
            }
        };
        if fee > amount.units() {
            return Err(Rejection::FeeExceedsAmount);
        }
        Ok(fee)
    }

    pub(crate) fn apply_action(&mut self, action: &MoneyAction, now: Timestamp) -> Result<Receipt, Rejection> {
        match action {
            MoneyAction::Credit { wallet, amount, kind, source, grant, reason } => {
                self.credit(*wallet, *amount, *kind, *source, grant.as_ref(), reason, now)
            }
            MoneyAction::Debit { wallet, amount, source, reason } => {
                text_ok(reason, true)?;
                let units = positive(amount.amount)?;
                let w = self.debitable_wallet(*wallet, amount.currency)?;
                let plan = self.plan_spend(w, units, None, None, true, now)?;
                self.system_fits(source.account(), amount.currency, units)?;
                let portions = self.spend(*wallet, &plan, false);
                let legs = smallvec::smallvec![
                    self.wallet_leg(*wallet, -units, portions),
                    self.post_system(source.account(), amount.currency, units),
                ];
                let operation = self.next_operation(OperationKind::AdjustmentDebit, amount.currency, now, legs);
                Ok(Receipt::Posted { operation, grant: None })
            }
            MoneyAction::Transfer { from, to, amount, fee, kind, product, description } => {
                text_ok(description, true)?;
                let units = positive(amount.amount)?;
                if from == to {
                    return Err(Rejection::SameWallet);
                }
                let payer = self.debitable_wallet(*from, amount.currency)?;
                let payee = self.open_wallet(*to, amount.currency)?;
                let fee_units = Self::fee_of(amount.amount, *fee)?;
                let net = units - fee_units;
                add(add(payee.main, payee.granted)?, net)?;
                self.system_fits(SystemAccount::PlatformRevenue, amount.currency, fee_units)?;
                let plan = self.plan_spend(payer, units, Some(payee.organization), *product, false, now)?;
                let portions = self.spend(*from, &plan, false);
                self.wallet_mut(*to).main += net;
                let mut legs = Legs::new();
                legs.push(self.wallet_leg(*from, -units, portions));
                legs.push(self.wallet_leg(*to, net, Vec::new()));
                if fee_units > 0 {
                    legs.push(self.post_system(SystemAccount::PlatformRevenue, amount.currency, fee_units));
                }
                let operation_kind = match kind {
                    TransferKind::Transfer => OperationKind::Transfer,
                    TransferKind::Charge => OperationKind::Charge,
                };
                let operation = self.next_operation(operation_kind, amount.currency, now, legs);
                Ok(Receipt::Posted { operation, grant: None })
            }
            MoneyAction::Reserve { merchant, consumer, meter, quantity, amount, properties, ttl_ms } => {
                self.reserve(*merchant, *consumer, meter, *quantity, *amount, properties, *ttl_ms, now)
            }
            MoneyAction::PlaceHold { wallet, amount, ttl_ms, exclusive, payee, product, description } => {
                text_ok(description, true)?;
                let units = positive(amount.amount)?;
                if !(HOLD_TTL_MIN_MS..=HOLD_TTL_MAX_MS).contains(ttl_ms) {
                    return Err(Rejection::HoldTtlOutOfRange);
                }
                let w = self.debitable_wallet(*wallet, amount.currency)?;
                if w.exclusive_hold != 0 {
                    return Err(Rejection::WalletOnHold);
                }
                if w.active_holds >= WALLET_HOLDS_MAX {
                    return Err(Rejection::TooManyItems);
                }
                let merchant = match payee {
                    Some(payee) if payee == wallet => return Err(Rejection::SameWallet),
                    Some(payee) => Some(self.open_wallet(*payee, amount.currency)?.organization),
                    None => None,
                };
                let plan = self.plan_spend(w, units, merchant, *product, false, now)?;
                let id = HoldId(self.next_hold_id);
                self.next_hold_id += 1;
                for reservation in &plan {
                    match reservation.portion {
                        Portion::Main => self.wallet_mut(*wallet).main_held += reservation.amount,
                        Portion::Grant(grant) => self.grant_mut(grant).reserved += reservation.amount,
                    }
                }
                if !self.payments.wallets.is_empty() {
                    self.debited.push(*wallet);
                }
                let w = self.wallet_mut(*wallet);
                w.held += units;
                w.active_holds += 1;
                if *exclusive {
                    w.exclusive_hold = id.0;
                }
                let expires_at = now.saturating_add(*ttl_ms);
                self.holds.insert(
                    id,
                    Hold {
                        id,
                        wallet: *wallet,
                        amount: units,
                        reservations: plan,
                        expires_at,
                        exclusive: *exclusive,
                        payee: *payee,
                        placed_at: now,
                    },
                );
                self.hold_expiry.insert((expires_at, id));
                self.holds_by_wallet.insert((*wallet, id));
                Ok(Receipt::HoldPlaced { hold: id, expires_at })
            }
            MoneyAction::CaptureHold { hold, amount, to, fee } => {
                let held = self.active_hold(*hold)?;
                let capture = match amount {
                    Some(amount) => positive(*amount)?,
                    None => held.amount,
                };
                if capture > held.amount {
                    return Err(Rejection::CaptureExceedsHold);
                }
                if held.payee.is_some_and(|payee| payee != *to) {
                    return Err(Rejection::CapturePayeeMismatch);
                }
                if held.wallet == *to {
                    return Err(Rejection::SameWallet);
                }
                let payer = self.wallet(held.wallet).ok_or(Rejection::WalletNotFound)?;
                let currency = payer.currency;
                self.debitable_wallet(held.wallet, currency)?;
                let payee = self.open_wallet(*to, currency)?;
                let fee_units = Self::fee_of(Amount::from_units(capture), *fee)?;
                add(add(payee.main, payee.granted)?, capture - fee_units)?;
                self.system_fits(SystemAccount::PlatformRevenue, currency, fee_units)?;
                // Checks are done; from here on nothing fails.
                let held = self.holds.remove(hold).expect("hold checked above");
                let mut left = capture;
                let mut taken = Plan::new();
                let mut returned = Plan::new();
                for reservation in &held.reservations {
                    let take = reservation.amount.min(left);
                    left -= take;
                    if take > 0 {
                        taken.push(Reservation { portion: reservation.portion, amount: take });
                    }
                    if reservation.amount > take {
                        returned.push(Reservation { portion: reservation.portion, amount: reservation.amount - take });
                    }
                }
                let portions = self.spend(held.wallet, &taken, true);
                self.unreserve(&held, &returned, now);
                self.close_hold(&held);
                self.wallet_mut(*to).main += capture - fee_units;
                let mut legs = Legs::new();
                legs.push(self.wallet_leg(held.wallet, -capture, portions));
                legs.push(self.wallet_leg(*to, capture - fee_units, Vec::new()));
                if fee_units > 0 {
                    legs.push(self.post_system(SystemAccount::PlatformRevenue, currency, fee_units));
                }
                let operation = self.next_operation(OperationKind::HoldCapture, currency, now, legs);
                Ok(Receipt::HoldCaptured {
                    hold: *hold,
                    operation,
                    released: Amount::from_units(held.amount - capture),
                })
            }
            MoneyAction::ReleaseHold { hold } => {
                self.active_hold(*hold)?;
                let held = self.holds.remove(hold).expect("hold checked above");
                self.unreserve(&held, &held.reservations, now);
                self.close_hold(&held);
                Ok(Receipt::HoldReleased { hold: *hold, released: Amount::from_units(held.amount) })
            }
            MoneyAction::VoidGrant { grant, reason } => {
                text_ok(reason, true)?;
                let g = self.grant(*grant).ok_or(Rejection::GrantNotFound)?;
                if g.status != GrantStatus::Active || g.remaining == g.reserved {
                    return Err(Rejection::GrantNotActive);
                }
                if let Some(at) = g.expires_at {
                    self.grant_sweeps.remove(&(at, *grant));
                }
                self.grant_mut(*grant).status = GrantStatus::Voided;
                let operation = self.sweep_grant(*grant, now);
                Ok(Receipt::GrantVoided { grant: *grant, operation })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn credit(
        &mut self,
        wallet: WalletId,
        amount: Money,
        kind: CreditKind,
        source: AdjustmentSource,
        grant: Option<&GrantSpec>,
        reason: &str,
        now: Timestamp,
    ) -> Result<Receipt, Rejection> {
        text_ok(reason, true)?;
        let units = positive(amount.amount)?;
        let w = self.open_wallet(wallet, amount.currency)?;
        add(add(w.main, w.granted)?, units)?;
        self.system_fits(source.account(), amount.currency, -units)?;
        if let Some(spec) = grant {
            if spec.expires_at.is_some_and(|at| at <= now) {
                return Err(Rejection::GrantExpiryInPast);
            }
            if let Some(applicability) = &spec.applicability {
                if applicability.merchants.len() > APPLICABILITY_ITEMS_MAX
                    || applicability.products.len() > APPLICABILITY_ITEMS_MAX
                {
                    return Err(Rejection::TooManyItems);
                }
            }
            if w.grants.len() >= WALLET_GRANTS_MAX {
                return Err(Rejection::TooManyItems);
            }
        }
        let source_leg = self.post_system(source.account(), amount.currency, -units);
        let (grant_id, portions) = match grant {
            None => {
                self.wallet_mut(wallet).main += units;
                (None, Vec::new())
            }
            Some(spec) => {
                let id = GrantId(self.grants.len() as u64 + 1);
                let grant = Grant {
                    id,
                    wallet,
                    category: spec.category,
                    priority: spec.priority,
                    expires_at: spec.expires_at,
                    applicability: spec.applicability.clone().map(Box::new),
                    source: source.account(),
                    amount: units,
                    remaining: units,
                    reserved: 0,
                    status: GrantStatus::Active,
                    created_at: now,
                };
                let order = grant.spending_order();
                self.grants.push(grant);
                if let Some(at) = spec.expires_at {
                    self.grant_sweeps.insert((at, id));
                }
                let grants = &self.grants;
                let w = &mut self.wallets[(wallet.0 - 1) as usize];
                let position = w.grants.partition_point(|g| grants[(g.0 - 1) as usize].spending_order() < order);
                w.grants.insert(position, id);
                w.granted += units;
                (Some(id), vec![GrantPortion { grant: id, amount: Amount::from_units(units) }])
            }
        };
        let legs = smallvec::smallvec![self.wallet_leg(wallet, units, portions), source_leg];
        let operation_kind = match (kind, grant_id) {
            (_, Some(_)) => OperationKind::GrantCredit,
            (CreditKind::TopUp, None) => OperationKind::TopUp,
            (CreditKind::Adjustment, None) => OperationKind::AdjustmentCredit,
        };
        let operation = self.next_operation(operation_kind, amount.currency, now, legs);
        Ok(Receipt::Posted { operation, grant: grant_id })
    }

    pub(crate) fn active_hold(&self, id: HoldId) -> Result<&Hold, Rejection> {
        match self.holds.get(&id) {
            Some(hold) => Ok(hold),
            None if id.0 >= 1 && id.0 < self.next_hold_id => Err(Rejection::HoldAlreadyResolved),
            None => Err(Rejection::HoldNotFound),
        }
    }

    /// Returns reserved portions to their wallet. A portion of a grant that expired or
    /// was voided meanwhile is queued to be swept at once.
    pub(crate) fn unreserve(&mut self, hold: &Hold, returned: &[Reservation], now: Timestamp) {
        for reservation in returned {
            match reservation.portion {
                Portion::Main => self.wallet_mut(hold.wallet).main_held -= reservation.amount,
                Portion::Grant(grant_id) => {
                    let grant = self.grant_mut(grant_id);
                    grant.reserved -= reservation.amount;
                    if matches!(grant.status, GrantStatus::Expired | GrantStatus::Voided) {
                        self.grant_sweeps.insert((now, grant_id));
                    }
                }
            }
        }
    }

    pub(crate) fn close_hold(&mut self, hold: &Hold) {
        self.hold_expiry.remove(&(hold.expires_at, hold.id));
        self.holds_by_wallet.remove(&(hold.wallet, hold.id));
        let w = self.wallet_mut(hold.wallet);
        w.held -= hold.amount;
        w.active_holds -= 1;
        if w.exclusive_hold == hold.id.0 {
            w.exclusive_hold = 0;
        }
    }

    /// Moves a grant's unreserved remainder out of the wallet: to expired credits for an
    /// expired grant, back to its source for a voided one.
    fn sweep_grant(&mut self, grant_id: GrantId, now: Timestamp) -> Option<Operation> {
        let grant = self.grant_mut(grant_id);
        let amount = grant.remaining - grant.reserved;
        if amount <= 0 {
            return None;
        }
        grant.remaining -= amount;
        let emptied = grant.remaining == 0;
        let wallet = grant.wallet;
        let (account, kind) = match grant.status {
            GrantStatus::Voided => (grant.source, OperationKind::GrantVoid),
            _ => (SystemAccount::ExpiredCredits, OperationKind::GrantExpiry),
        };
        let w = self.wallet_mut(wallet);
        w.granted -= amount;
        if emptied {
            w.grants.retain(|g| *g != grant_id);
        }
        let currency = w.currency;
        let legs = smallvec::smallvec![
            self.wallet_leg(
                wallet,
                -amount,
                vec![GrantPortion { grant: grant_id, amount: Amount::from_units(-amount) }]
            ),
            self.post_system(account, currency, amount),
        ];
        Some(self.next_operation(kind, currency, now, legs))
    }

    /// Hints the processor to load what `command` will touch, so that when the writer
    /// applies a batch it can fetch the next commands' wallets and keys while it works
    /// on the current one. Changes nothing.
    pub fn prefetch(&self, command: &Command) {
        let (Command::Move { key, action } | Command::MoveAs { key, action, .. }) = command else { return };
        self.idempotency.prefetch(key.0);
        // Only addresses are computed here: reading the wallet itself would wait for
        // the very memory the prefetch is meant to hide.
        for wallet in self.wallets_touched(action).into_iter().flatten() {
            prefetch_lines(wallet);
        }
    }

    /// The second prefetch stage, a few commands later than [`State::prefetch`]: the
    /// wallets are in cache by then, so their first grant can be looked up and fetched.
    pub fn prefetch_dependent(&self, command: &Command) {
        let (Command::Move { action, .. } | Command::MoveAs { action, .. }) = command else { return };
        for wallet in self.wallets_touched(action).into_iter().flatten() {
            if let Some(grant) = wallet.grants.first() {
                if let Some(grant) = self.grants.get((grant.0 as usize).wrapping_sub(1)) {
                    prefetch_lines(grant);
                }
            }
        }
    }

    fn wallets_touched(&self, action: &MoneyAction) -> [Option<&Wallet>; 2] {
        let wallet_slot = |id: WalletId| self.wallets.get((id.0 as usize).wrapping_sub(1));
        let (first, second) = match action {
            MoneyAction::Transfer { from, to, .. } => (wallet_slot(*from), wallet_slot(*to)),
            MoneyAction::Credit { wallet, .. } | MoneyAction::Debit { wallet, .. } => (wallet_slot(*wallet), None),
            MoneyAction::PlaceHold { wallet, .. } => (wallet_slot(*wallet), None),
            _ => (None, None),
        };
        [first, second]
    }

    /// Makes room for `additional` idempotency keys and usage event ids ahead of time; capacity only, so
    /// it changes no decision.
    pub fn reserve_idempotency_keys(&mut self, additional: usize) {
        self.idempotency.reserve(additional);
        self.usage_keys.reserve(additional);
    }

    /// Starts a new generation of idempotency keys once the current one is as old as the
    /// retention period, forgetting the generation before it. Returns the keys forgotten.
    fn turn_idempotency_generation(&mut self, now: Timestamp) -> u64 {
        let due = self.idempotency_generation_started_at.saturating_add(self.settings.idempotency_retention_ms);
        if now < due {
            return 0;
        }
        let forgotten = self.idempotency_previous.len() as u64;
        // The next generation will likely be as large as this one; it gets the same room
        // (zeroed memory, which costs nothing until keys arrive), so it rarely grows.
        let expected = self.idempotency.len().max(self.idempotency.capacity());
        let next = KeyTable::with_capacity(expected);
        self.idempotency_previous = std::mem::replace(&mut self.idempotency, next);
        self.idempotency_generation_started_at = now;
        forgotten
    }

    /// Expires everything due at `now`, in time order.
    fn tick(&mut self, now: Timestamp) -> Receipt {
        let mut holds = Vec::new();
        while let Some(&(at, id)) = self.hold_expiry.first() {
            if at > now {
                break;
            }
            let hold = self.holds.remove(&id).expect("expiry index names an active hold");
            self.unreserve(&hold, &hold.reservations, now);
            self.close_hold(&hold);
            holds.push(id);
        }
        let mut operations = Vec::new();
        while let Some(&(at, id)) = self.grant_sweeps.first() {
            if at > now {
                break;
            }
            self.grant_sweeps.pop_first();
            let grant = self.grant_mut(id);
            if grant.status == GrantStatus::Active {
                grant.status = GrantStatus::Expired;
            }
            operations.extend(self.sweep_grant(id, now));
        }
        let keys_pruned = self.turn_idempotency_generation(now) + self.turn_usage_generation(now);
        let renewals = self.renew_due(now);
        Receipt::Expired { holds, operations, keys_pruned, renewals }
    }

    /// Checks every invariant the state can show and returns what is broken.
    pub fn check_invariants(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut sums: BTreeMap<Currency, i128> = BTreeMap::new();
        for row in &self.system {
            *sums.entry(row.currency).or_default() += row.balances.iter().sum::<i128>();
        }
        let mut grant_remaining: HashMap<WalletId, i128> = HashMap::new();
        let mut grant_reserved: HashMap<GrantId, i128> = HashMap::new();
        for grant in &self.grants {
            if grant.reserved < 0 || grant.reserved > grant.remaining || grant.remaining > grant.amount {
                problems.push(format!(
                    "{:?}: reserved {} remaining {} of {}",
                    grant.id, grant.reserved, grant.remaining, grant.amount
                ));
            }
            *grant_remaining.entry(grant.wallet).or_default() += grant.remaining;
        }
        let mut held: HashMap<WalletId, (i128, i128, u32)> = HashMap::new();
        for hold in self.holds.values() {
            let sum: i128 = hold.reservations.iter().map(|r| r.amount).sum();
            if sum != hold.amount {
                problems.push(format!("{:?}: reservations sum {} but hold is {}", hold.id, sum, hold.amount));
            }
            let entry = held.entry(hold.wallet).or_default();
            entry.0 += hold.amount;
            entry.2 += 1;
            for reservation in &hold.reservations {
                match reservation.portion {
                    Portion::Main => entry.1 += reservation.amount,
                    Portion::Grant(g) => *grant_reserved.entry(g).or_default() += reservation.amount,
                }
            }
        }
        for grant in &self.grants {
            let reserved = grant_reserved.get(&grant.id).copied().unwrap_or(0);
            if reserved != grant.reserved {
                problems.push(format!("{:?}: holds reserve {} but grant says {}", grant.id, reserved, grant.reserved));
            }
        }
        for wallet in &self.wallets {
            *sums.entry(wallet.currency).or_default() += wallet.main + wallet.granted;
            let (hold_sum, main_held, count) = held.get(&wallet.id).copied().unwrap_or_default();
            let granted = grant_remaining.get(&wallet.id).copied().unwrap_or(0);
            if wallet.main < 0 || wallet.main_held < 0 || wallet.main_held > wallet.main {
                problems.push(format!("{:?}: main {} with {} held", wallet.id, wallet.main, wallet.main_held));
            }
            if wallet.granted != granted {
                problems.push(format!("{:?}: granted {} but grants hold {}", wallet.id, wallet.granted, granted));
            }
            if wallet.held != hold_sum || wallet.main_held != main_held || wallet.active_holds != count {
                problems.push(format!("{:?}: held {} but active holds add to {}", wallet.id, wallet.held, hold_sum));
            }
            if wallet.available().units() < 0 {
                problems.push(format!("{:?}: available is negative", wallet.id));
            }
        }
        problems.extend(self.check_billing_invariants());
        for (currency, sum) in sums {
            if sum != 0 {
                problems.push(format!("{currency}: accounts sum to {sum} ledger units, not zero"));
            }
        }
        problems
    }
}
