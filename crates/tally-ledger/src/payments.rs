//! Payments in the state machine: saved payment methods, tax profiles, top-ups,
//! auto top-up rules and wallet-first checkouts.
//!
//! The ledger never talks to a payment provider. It records the intent (a pending
//! top-up or checkout, journaled before the provider is asked) and, later, the
//! provider's answer (`Settle*`), which moves the money exactly once: a settled record
//! ignores every later answer. The server does the asking, and after a crash finds the
//! pending records here and asks the provider what became of them.

use crate::billing::SubscriptionStatus;
use crate::command::*;
use crate::ids::*;
use crate::money::{Amount, Currency, Money, PartsPerMillion};
use crate::rejection::Rejection;
use crate::state::*;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Most taxes in one tax profile.
pub const TAXES_PER_PROFILE_MAX: usize = 8;
/// Most tax profiles.
pub const TAX_PROFILES_MAX: usize = 10_000;
/// Most preset top-up amounts on a wallet.
pub const PRESETS_MAX: usize = 8;
/// Most saved payment methods per organization.
pub const METHODS_PER_ORGANIZATION_MAX: usize = 32;
/// Most auto top-ups a rule may start per day, whatever it asks.
pub const AUTO_TOP_UPS_PER_DAY_MAX: u32 = 100;
/// Failures in a row after which an auto top-up rule disables itself.
pub const AUTO_TOP_UP_FAILURES_MAX: u32 = 3;
/// The first back-off after a failed auto top-up; it doubles with each failure in a row.
pub const AUTO_TOP_UP_BACKOFF_FIRST_MS: i64 = 60 * 1000;
/// How long the wallet part of a checkout stays held while the card is asked.
pub const CHECKOUT_HOLD_TTL_MS: i64 = 3600 * 1000;
const DAY_MS: i64 = 24 * 3600 * 1000;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodType {
    Card,
    BankAccount,
}

impl MethodType {
    pub const ALL: [MethodType; 2] = [MethodType::Card, MethodType::BankAccount];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A saved, tokenized means of payment: the provider's token and what may be shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMethod {
    pub id: PaymentMethodId,
    pub organization: OrganizationId,
    pub kind: MethodType,
    pub token: Box<str>,
    pub brand: Box<str>,
    pub last4: Box<str>,
    pub exp_month: u8,
    pub exp_year: u16,
    pub removed: bool,
}

/// What a provider says about a payment method token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodDetails {
    pub kind: MethodType,
    pub brand: String,
    pub last4: String,
    pub exp_month: u8,
    pub exp_year: u16,
}

/// One tax: a percentage of the amount, a fixed amount, or both. A fixed amount
/// applies only to top-ups in its currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tax {
    pub name: String,
    pub rate: PartsPerMillion,
    pub fixed: Option<Money>,
}

/// The taxes of a region: a country (ISO 3166-1 alpha-2) and optionally a subdivision.
/// When several profiles match, the most specific applies: country and subdivision
/// before country alone; only one profile ever applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaxProfile {
    pub country: String,
    pub subdivision: Option<String>,
    pub taxes: Vec<Tax>,
}

/// One computed tax on a top-up, in ledger units (whole minor units).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaxLine {
    pub name: Box<str>,
    pub amount: i128,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoAmount {
    /// Top up by this amount.
    Fixed(Amount),
    /// Top up by what brings available to this target, in one charge.
    UpTo(Amount),
}

/// A wallet's auto top-up rule as the user sets it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoTopUpSpec {
    pub threshold: Amount,
    pub amount: AutoAmount,
    pub method: PaymentMethodId,
    pub max_per_day: u32,
    pub max_amount_per_day: Amount,
}

/// An auto top-up rule and its running state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoTopUp {
    pub spec: AutoTopUpSpec,
    pub enabled: bool,
    /// Failures in a row; the rule disables itself at `AUTO_TOP_UP_FAILURES_MAX`.
    pub failures: u32,
    /// No auto top-up starts before this time (back-off after a failure).
    pub retry_at: Timestamp,
    pub in_flight: Option<TopUpId>,
    /// The UTC day (days since the epoch) the counters below are for.
    pub day: i64,
    pub day_count: u32,
    pub day_amount: i128,
}

/// What a wallet's owner and the platform have set for paying into it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletPayments {
    pub min_top_up: Option<Amount>,
    pub max_top_up: Option<Amount>,
    /// Amounts clients offer as buttons; any amount within the limits is accepted.
    pub presets: Vec<Amount>,
    pub auto: Option<AutoTopUp>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Pending,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUp {
    pub id: TopUpId,
    pub wallet: WalletId,
    pub organization: OrganizationId,
    pub currency: Currency,
    /// What the wallet gets.
    pub amount: i128,
    pub taxes: Vec<TaxLine>,
    /// What the payer is charged: amount plus taxes.
    pub total: i128,
    pub method: PaymentMethodId,
    pub status: PaymentStatus,
    /// Started by the wallet's auto top-up rule.
    pub auto: bool,
    pub created_at: Timestamp,
    pub settled_at: Option<Timestamp>,
    pub provider_reference: Option<Box<str>>,
    pub failure_code: Option<Box<str>>,
    pub failure_message: Option<Box<str>>,
    /// The receipt number of a succeeded top-up (1, 2, ... across the platform).
    pub receipt_number: Option<u64>,
    pub operation: Option<OperationId>,
    /// What refunds have taken back (pending or succeeded), and of each tax line.
    pub refunded: i128,
    pub refunded_taxes: Vec<i128>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    pub id: CheckoutId,
    pub consumer: OrganizationId,
    pub merchant: OrganizationId,
    pub consumer_wallet: WalletId,
    pub merchant_wallet: WalletId,
    pub currency: Currency,
    pub amount: i128,
    /// Paid from the wallet (held until the card part is settled).
    pub wallet_part: i128,
    /// Paid by the payment method.
    pub card_part: i128,
    pub fee: i128,
    pub hold: Option<HoldId>,
    pub method: Option<PaymentMethodId>,
    pub description: Box<str>,
    /// The subscription whose recurring fee this collects (a renewal), if any.
    pub subscription: Option<SubscriptionId>,
    pub status: PaymentStatus,
    pub created_at: Timestamp,
    pub settled_at: Option<Timestamp>,
    pub provider_reference: Option<Box<str>>,
    pub failure_code: Option<Box<str>>,
    pub failure_message: Option<Box<str>>,
    pub operation: Option<OperationId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundOf {
    /// A top-up, back to its payment method.
    TopUp(TopUpId),
    /// A charge or checkout operation, back to the consumer's wallet.
    Payment(OperationId),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub id: RefundId,
    pub of: RefundOf,
    /// The consumer's wallet the money leaves (top-up) or returns to (payment).
    pub wallet: WalletId,
    pub organization: OrganizationId,
    pub currency: Currency,
    pub amount: i128,
    /// Taxes refunded with a top-up refund.
    pub taxes: Vec<TaxLine>,
    /// What goes back to the payment method (amount plus taxes); zero for payments.
    pub total: i128,
    /// For a payment refund: the merchant's wallet and share, and the platform's fee share.
    pub merchant_wallet: Option<WalletId>,
    pub merchant_part: i128,
    pub fee_part: i128,
    pub reason: Box<str>,
    pub status: PaymentStatus,
    pub created_at: Timestamp,
    pub settled_at: Option<Timestamp>,
    pub operation: Option<OperationId>,
    /// The operation that put the money back when the provider refused the refund.
    pub reversal: Option<OperationId>,
    pub failure_code: Option<Box<str>>,
}

/// A payment provider's final answer about a payment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProviderOutcome {
    Succeeded { reference: String },
    Failed { code: String, message: String },
}

/// Everything payments keeps in the state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payments {
    pub methods: Vec<PaymentMethod>,
    pub default_method: FxHashMap<OrganizationId, PaymentMethodId>,
    /// Method types an organization may use, as bits of `MethodType`; absent: all.
    pub method_types: FxHashMap<OrganizationId, u8>,
    pub tax_profiles: Vec<TaxProfile>,
    pub wallets: FxHashMap<WalletId, WalletPayments>,
    pub top_ups: Vec<TopUp>,
    pub top_up_keys: FxHashMap<u128, TopUpId>,
    pub checkouts: Vec<Checkout>,
    pub checkout_keys: FxHashMap<u128, CheckoutId>,
    /// Top-ups and checkouts waiting for the provider's answer.
    pub pending_top_ups: BTreeSet<TopUpId>,
    pub pending_checkouts: BTreeSet<CheckoutId>,
    /// Wallets whose auto top-up is due, from when.
    pub auto_due: BTreeSet<(Timestamp, WalletId)>,
    pub refunds: Vec<Refund>,
    pub refund_keys: FxHashMap<u128, RefundId>,
    pub pending_refunds: BTreeSet<RefundId>,
    /// What has been refunded of each charge or checkout operation.
    pub refunded_payments: FxHashMap<OperationId, i128>,
    pub receipts_issued: u64,
}

/// Commands of payments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentCommand {
    AddMethod {
        organization: OrganizationId,
        token: String,
        details: MethodDetails,
        make_default: bool,
    },
    RemoveMethod {
        method: PaymentMethodId,
    },
    SetDefaultMethod {
        method: PaymentMethodId,
    },
    /// The platform's choice of method types an organization may use (empty: none).
    SetMethodTypes {
        organization: OrganizationId,
        types: Vec<MethodType>,
    },
    /// Sets a region's taxes; an empty list removes the profile.
    SetTaxProfile {
        profile: TaxProfile,
    },
    SetWalletLimits {
        wallet: WalletId,
        min_top_up: Option<Amount>,
        max_top_up: Option<Amount>,
        presets: Vec<Amount>,
    },
    SetAutoTopUp {
        wallet: WalletId,
        rule: Option<AutoTopUpSpec>,
    },
    /// Records a top-up to send to the provider. `actor`: the organization asking for
    /// itself (None: the platform).
    CreateTopUp {
        key: IdempotencyKey,
        actor: Option<OrganizationId>,
        wallet: WalletId,
        amount: Money,
        method: PaymentMethodId,
    },
    /// Starts the auto top-up of a wallet whose rule is due, if it still applies.
    StartAutoTopUp {
        wallet: WalletId,
    },
    SettleTopUp {
        top_up: TopUpId,
        outcome: ProviderOutcome,
    },
    StartCheckout {
        key: IdempotencyKey,
        actor: Option<OrganizationId>,
        consumer: OrganizationId,
        merchant: OrganizationId,
        amount: Money,
        use_wallet: bool,
        method: Option<PaymentMethodId>,
        description: String,
    },
    SettleCheckout {
        checkout: CheckoutId,
        outcome: ProviderOutcome,
    },
    /// Refunds (part of) a top-up's unspent money to its payment method: the money and
    /// its taxes in proportion leave at once; the provider is asked after.
    RefundTopUp {
        key: IdempotencyKey,
        top_up: TopUpId,
        amount: Option<Amount>,
        reason: String,
    },
    SettleRefund {
        refund: RefundId,
        outcome: ProviderOutcome,
    },
    /// Refunds (part of) a charge or checkout to the consumer: to the grants it came
    /// from while they are usable, else the main balance; taken from the merchant and
    /// the platform fee in proportion. `operation` is the operation as recorded
    /// (history reads it); what was already refunded of it is kept here.
    RefundPayment {
        key: IdempotencyKey,
        operation: Box<Operation>,
        amount: Option<Amount>,
        reason: String,
    },
    /// `AddMethod`, except that a token the organization saved before gives that method
    /// (`PaymentReceipt::MethodSavedBefore`) rather than a second one: what the API sends.
    AddMethodOnce {
        organization: OrganizationId,
        token: String,
        details: MethodDetails,
        make_default: bool,
    },
    /// `CreateTopUp` with the total (amount plus taxes) the payer reviewed: refused with
    /// `total_changed` when the taxes now give another total, so a card is never
    /// charged more (or less) than was shown. (A variant of its own, last, so journals
    /// written before it still decode.)
    CreateReviewedTopUp {
        key: IdempotencyKey,
        actor: Option<OrganizationId>,
        wallet: WalletId,
        amount: Money,
        method: PaymentMethodId,
        total: Amount,
    },
}

/// What a payments command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentReceipt {
    Method(Box<PaymentMethod>),
    MethodTypesSet,
    TaxProfileSet,
    WalletSettingsSet(WalletId),
    /// A top-up as it is now. `created`: this command created it (not a replay);
    /// `settled`: this command recorded the provider's final answer;
    /// `operation`: the credit this command posted; `rule_disabled`: this failure
    /// disabled the wallet's auto top-up rule.
    TopUp {
        top_up: Box<TopUp>,
        created: bool,
        settled: bool,
        operation: Option<Operation>,
        rule_disabled: bool,
    },
    /// The auto top-up was due but no longer applies (available is back above the
    /// threshold, a daily limit is reached, or the rule was changed): nothing started.
    AutoTopUpSkipped {
        wallet: WalletId,
        reason: Rejection,
    },
    Checkout {
        checkout: Box<Checkout>,
        created: bool,
        settled: bool,
        operation: Option<Operation>,
    },
    Refund {
        refund: Box<Refund>,
        created: bool,
        settled: bool,
        operation: Option<Operation>,
    },
    /// `AddMethod` of a token the organization had saved already: that method, not a
    /// second one. (Last, so journals written before it still decode.)
    MethodSavedBefore(Box<PaymentMethod>),
}

impl PaymentReceipt {
    /// A top-up just created, pending until the provider answers.
    fn created_top_up(top_up: TopUp) -> PaymentReceipt {
        PaymentReceipt::TopUp {
            top_up: Box::new(top_up),
            created: true,
            settled: false,
            operation: None,
            rule_disabled: false,
        }
    }

    /// A top-up as it stands, when a command (a repeat, a late answer) changes nothing.
    fn unchanged_top_up(top_up: &TopUp) -> PaymentReceipt {
        PaymentReceipt::TopUp {
            top_up: Box::new(top_up.clone()),
            created: false,
            settled: false,
            operation: None,
            rule_disabled: false,
        }
    }
}

fn index(id: u64) -> usize {
    (id as usize).wrapping_sub(1)
}

fn day_of(at: Timestamp) -> i64 {
    at.div_euclid(DAY_MS)
}

impl Payments {
    pub fn method(&self, id: PaymentMethodId) -> Option<&PaymentMethod> {
        self.methods.get(index(id.0))
    }

    pub fn top_up(&self, id: TopUpId) -> Option<&TopUp> {
        self.top_ups.get(index(id.0))
    }

    pub fn checkout(&self, id: CheckoutId) -> Option<&Checkout> {
        self.checkouts.get(index(id.0))
    }

    pub fn allows(&self, organization: OrganizationId, kind: MethodType) -> bool {
        self.method_types.get(&organization).is_none_or(|bits| bits & kind.bit() != 0)
    }

    /// The tax profile for a region: the one for its subdivision, else the country's.
    pub fn tax_profile(&self, country: &str, subdivision: &str) -> Option<&TaxProfile> {
        let of_country = |p: &&TaxProfile| p.country == country;
        self.tax_profiles
            .iter()
            .filter(of_country)
            .find(|p| p.subdivision.as_deref().is_some_and(|s| !s.is_empty() && s == subdivision))
            .or_else(|| self.tax_profiles.iter().filter(of_country).find(|p| p.subdivision.is_none()))
    }

    /// The wallet's auto top-up rule, when one is set and enabled.
    pub fn auto_rule(&self, wallet: WalletId) -> Option<&AutoTopUp> {
        self.wallets.get(&wallet).and_then(|w| w.auto.as_ref()).filter(|rule| rule.enabled)
    }
}

/// The taxes on `amount` under `profile`: each line's percentage rounded half to even
/// to the currency's minor unit, plus its fixed amount when in the same currency.
pub fn compute_taxes(
    profile: Option<&TaxProfile>,
    amount: Amount,
    currency: Currency,
) -> Result<Vec<TaxLine>, Rejection> {
    let Some(profile) = profile else { return Ok(Vec::new()) };
    let mut lines = Vec::with_capacity(profile.taxes.len());
    for tax in &profile.taxes {
        let mut units = 0i128;
        if tax.rate.0 > 0 {
            // Exact: amount × rate / 10⁶, then rounded once, half to even, to minor units.
            let exact = amount.units().checked_mul(tax.rate.0 as i128).ok_or(Rejection::AmountOverflow)?;
            let per_minor = currency.units_per_minor() * 1_000_000;
            units = crate::money::divide_round_half_even(exact, per_minor) * currency.units_per_minor();
        }
        if let Some(fixed) = tax.fixed.filter(|f| f.currency == currency) {
            units = add(units, fixed.amount.units())?;
        }
        if units > 0 {
            lines.push(TaxLine { name: tax.name.as_str().into(), amount: units });
        }
    }
    Ok(lines)
}

impl State {
    pub(crate) fn apply_payment(&mut self, command: &PaymentCommand, now: Timestamp) -> Result<Receipt, Rejection> {
        let receipt = match command {
            PaymentCommand::AddMethod { organization, token, details, make_default }
            | PaymentCommand::AddMethodOnce { organization, token, details, make_default } => {
                let once = matches!(command, PaymentCommand::AddMethodOnce { .. });
                self.organization(*organization).ok_or(Rejection::OrganizationNotFound)?;
                text_ok(token, false)?;
                text_ok(&details.brand, false)?;
                if details.last4.len() != 4 || !details.last4.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Rejection::InvalidPaymentMethod);
                }
                if !(1..=12).contains(&details.exp_month) || details.exp_year < 2000 {
                    return Err(Rejection::InvalidPaymentMethod);
                }
                if !self.payments.allows(*organization, details.kind) {
                    return Err(Rejection::PaymentMethodTypeNotAllowed);
                }
                // `AddMethodOnce`: a token is saved once per organization, and adding it
                // again (a retry) gives the method saved the first time. (`AddMethod`
                // keeps its first behaviour, a new method each time, so journals written
                // before replay as they ran.)
                let saved = self
                    .payments
                    .methods
                    .iter()
                    .find(|m| once && m.organization == *organization && !m.removed && *m.token == **token)
                    .cloned();
                if let Some(method) = saved {
                    if *make_default || !self.payments.default_method.contains_key(organization) {
                        self.payments.default_method.insert(*organization, method.id);
                    }
                    return Ok(Receipt::Payment(PaymentReceipt::MethodSavedBefore(Box::new(method))));
                }
                let owned =
                    self.payments.methods.iter().filter(|m| m.organization == *organization && !m.removed).count();
                if owned >= METHODS_PER_ORGANIZATION_MAX {
                    return Err(Rejection::TooManyItems);
                }
                let id = PaymentMethodId(self.payments.methods.len() as u64 + 1);
                let method = PaymentMethod {
                    id,
                    organization: *organization,
                    kind: details.kind,
                    token: token.as_str().into(),
                    brand: details.brand.as_str().into(),
                    last4: details.last4.as_str().into(),
                    exp_month: details.exp_month,
                    exp_year: details.exp_year,
                    removed: false,
                };
                self.payments.methods.push(method.clone());
                if *make_default || !self.payments.default_method.contains_key(organization) {
                    self.payments.default_method.insert(*organization, id);
                }
                PaymentReceipt::Method(Box::new(method))
            }
            PaymentCommand::RemoveMethod { method } => {
                let m = self.live_method(*method)?;
                let organization = m.organization;
                let in_use = self
                    .payments
                    .wallets
                    .values()
                    .any(|w| w.auto.as_ref().is_some_and(|a| a.spec.method == *method && a.enabled));
                if in_use {
                    return Err(Rejection::PaymentMethodInUse);
                }
                self.payments.methods[index(method.0)].removed = true;
                if self.payments.default_method.get(&organization) == Some(method) {
                    self.payments.default_method.remove(&organization);
                }
                PaymentReceipt::Method(Box::new(self.payments.methods[index(method.0)].clone()))
            }
            PaymentCommand::SetDefaultMethod { method } => {
                let m = self.live_method(*method)?;
                let organization = m.organization;
                self.payments.default_method.insert(organization, *method);
                PaymentReceipt::Method(Box::new(self.payments.methods[index(method.0)].clone()))
            }
            PaymentCommand::SetMethodTypes { organization, types } => {
                self.organization(*organization).ok_or(Rejection::OrganizationNotFound)?;
                let bits = types.iter().fold(0u8, |bits, t| bits | t.bit());
                self.payments.method_types.insert(*organization, bits);
                PaymentReceipt::MethodTypesSet
            }
            PaymentCommand::SetTaxProfile { profile } => {
                valid_profile(profile)?;
                let position = self
                    .payments
                    .tax_profiles
                    .iter()
                    .position(|p| p.country == profile.country && p.subdivision == profile.subdivision);
                match (position, profile.taxes.is_empty()) {
                    (Some(at), true) => {
                        self.payments.tax_profiles.remove(at);
                    }
                    (Some(at), false) => self.payments.tax_profiles[at] = profile.clone(),
                    (None, true) => {}
                    (None, false) => {
                        if self.payments.tax_profiles.len() >= TAX_PROFILES_MAX {
                            return Err(Rejection::TooManyItems);
                        }
                        self.payments.tax_profiles.push(profile.clone());
                    }
                }
                PaymentReceipt::TaxProfileSet
            }
            PaymentCommand::SetWalletLimits { wallet, min_top_up, max_top_up, presets } => {
                let w = self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                let currency = w.currency;
                let whole = |a: &Amount| a.units() > 0 && a.is_whole_minor_units(currency);
                if min_top_up.iter().chain(max_top_up.iter()).chain(presets.iter()).any(|a| !whole(a)) {
                    return Err(Rejection::InvalidSetting);
                }
                if let (Some(min), Some(max)) = (min_top_up, max_top_up) {
                    if min > max {
                        return Err(Rejection::InvalidSetting);
                    }
                }
                if presets.len() > PRESETS_MAX {
                    return Err(Rejection::TooManyItems);
                }
                let settings = self.payments.wallets.entry(*wallet).or_default();
                settings.min_top_up = *min_top_up;
                settings.max_top_up = *max_top_up;
                settings.presets = presets.clone();
                PaymentReceipt::WalletSettingsSet(*wallet)
            }
            PaymentCommand::SetAutoTopUp { wallet, rule } => {
                let w = self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                let (organization, currency) = (w.organization, w.currency);
                if let Some(spec) = rule {
                    let method = self.live_method(spec.method)?;
                    if method.organization != organization {
                        return Err(Rejection::PaymentMethodNotFound);
                    }
                    let target = match spec.amount {
                        AutoAmount::Fixed(amount) => amount,
                        AutoAmount::UpTo(target) => {
                            if target <= spec.threshold {
                                return Err(Rejection::InvalidSetting);
                            }
                            target
                        }
                    };
                    let whole = |a: Amount| a.units() > 0 && a.is_whole_minor_units(currency);
                    if spec.threshold.units() < 0
                        || !whole(target)
                        || !whole(spec.max_amount_per_day)
                        || !(1..=AUTO_TOP_UPS_PER_DAY_MAX).contains(&spec.max_per_day)
                    {
                        return Err(Rejection::InvalidSetting);
                    }
                }
                let settings = self.payments.wallets.entry(*wallet).or_default();
                let in_flight = settings.auto.as_ref().and_then(|a| a.in_flight);
                let (day, day_count, day_amount) =
                    settings.auto.as_ref().map_or((day_of(now), 0, 0), |a| (a.day, a.day_count, a.day_amount));
                settings.auto = rule.clone().map(|spec| AutoTopUp {
                    spec,
                    enabled: true,
                    failures: 0,
                    retry_at: 0,
                    in_flight,
                    day,
                    day_count,
                    day_amount,
                });
                self.payments.auto_due.retain(|(_, w)| w != wallet);
                PaymentReceipt::WalletSettingsSet(*wallet)
            }
            PaymentCommand::CreateTopUp { key, actor, wallet, amount, method } => {
                self.create_top_up(key, *actor, *wallet, *amount, *method, None, now)?
            }
            PaymentCommand::CreateReviewedTopUp { key, actor, wallet, amount, method, total } => {
                self.create_top_up(key, *actor, *wallet, *amount, *method, Some(*total), now)?
            }
            PaymentCommand::StartAutoTopUp { wallet } => self.start_auto_top_up(*wallet, now)?,
            PaymentCommand::SettleTopUp { top_up, outcome } => self.settle_top_up(*top_up, outcome, now)?,
            PaymentCommand::StartCheckout {
                key,
                actor,
                consumer,
                merchant,
                amount,
                use_wallet,
                method,
                description,
            } => {
                if let Some(existing) = self.payments.checkout_keys.get(&key.0) {
                    let checkout = &self.payments.checkouts[index(existing.0)];
                    if checkout.consumer != *consumer
                        || checkout.merchant != *merchant
                        || checkout.amount != amount.amount.units()
                    {
                        return Err(Rejection::IdempotencyKeyMismatch);
                    }
                    return Ok(Receipt::Payment(PaymentReceipt::Checkout {
                        checkout: Box::new(checkout.clone()),
                        created: false,
                        settled: false,
                        operation: None,
                    }));
                }
                if actor.is_some_and(|a| a != *consumer) {
                    return Err(Rejection::OrganizationNotFound);
                }
                let receipt =
                    self.start_checkout(*consumer, *merchant, *amount, *use_wallet, *method, description, now)?;
                if let PaymentReceipt::Checkout { checkout, .. } = &receipt {
                    self.payments.checkout_keys.insert(key.0, checkout.id);
                }
                receipt
            }
            PaymentCommand::SettleCheckout { checkout, outcome } => self.settle_checkout(*checkout, outcome, now)?,
            PaymentCommand::RefundTopUp { key, top_up, amount, reason } => {
                if let Some(existing) = self.payments.refund_keys.get(&key.0) {
                    let refund = &self.payments.refunds[index(existing.0)];
                    if refund.of != RefundOf::TopUp(*top_up) {
                        return Err(Rejection::IdempotencyKeyMismatch);
                    }
                    return Ok(Receipt::Payment(replayed_refund(refund)));
                }
                let receipt = self.refund_top_up(*top_up, *amount, reason, now)?;
                self.note_refund_key(*key, &receipt);
                receipt
            }
            PaymentCommand::SettleRefund { refund, outcome } => self.settle_refund(*refund, outcome, now)?,
            PaymentCommand::RefundPayment { key, operation, amount, reason } => {
                if let Some(existing) = self.payments.refund_keys.get(&key.0) {
                    let refund = &self.payments.refunds[index(existing.0)];
                    if refund.of != RefundOf::Payment(operation.id) {
                        return Err(Rejection::IdempotencyKeyMismatch);
                    }
                    return Ok(Receipt::Payment(replayed_refund(refund)));
                }
                let receipt = self.refund_payment(operation, *amount, reason, now)?;
                self.note_refund_key(*key, &receipt);
                receipt
            }
        };

        Ok(Receipt::Payment(receipt))
    }

    fn live_method(&self, id: PaymentMethodId) -> Result<&PaymentMethod, Rejection> {
        self.payments.method(id).filter(|m| !m.removed).ok_or(Rejection::PaymentMethodNotFound)
    }

    /// A usable method of `organization`'s: saved, not removed, of an allowed type.
    fn usable_method(&self, id: PaymentMethodId, organization: OrganizationId) -> Result<&PaymentMethod, Rejection> {
        let method = self.live_method(id)?;
        if method.organization != organization {
            return Err(Rejection::PaymentMethodNotFound);
        }
        if !self.payments.allows(organization, method.kind) {
            return Err(Rejection::PaymentMethodTypeNotAllowed);
        }
        Ok(method)
    }

    /// Checks and records a pending top-up (nothing moves until it is settled).
    #[allow(clippy::too_many_arguments)]
    fn create_top_up(
        &mut self,
        key: &IdempotencyKey,
        actor: Option<OrganizationId>,
        wallet: WalletId,
        amount: Money,
        method: PaymentMethodId,
        reviewed_total: Option<Amount>,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        if let Some(existing) = self.payments.top_up_keys.get(&key.0) {
            let top_up = &self.payments.top_ups[index(existing.0)];
            if top_up.wallet != wallet
                || top_up.amount != amount.amount.units()
                || top_up.method != method
                || reviewed_total.is_some_and(|total| total.units() != top_up.total)
            {
                return Err(Rejection::IdempotencyKeyMismatch);
            }
            return Ok(PaymentReceipt::unchanged_top_up(top_up));
        }
        let w = self.wallet(wallet).ok_or(Rejection::WalletNotFound)?;
        if actor.is_some_and(|a| a != w.organization) {
            return Err(Rejection::WalletNotFound);
        }
        let top_up = self.new_top_up(wallet, amount, method, false, reviewed_total, now)?;
        self.payments.top_up_keys.insert(key.0, top_up.id);
        Ok(PaymentReceipt::created_top_up(top_up))
    }

    fn new_top_up(
        &mut self,
        wallet: WalletId,
        amount: Money,
        method: PaymentMethodId,
        auto: bool,
        reviewed_total: Option<Amount>,
        now: Timestamp,
    ) -> Result<TopUp, Rejection> {
        let units = positive(amount.amount)?;
        let w = self.open_wallet(wallet, amount.currency)?;
        if w.status != WalletStatus::Active {
            return Err(Rejection::WalletFrozen);
        }
        let organization = w.organization;
        if !amount.amount.is_whole_minor_units(amount.currency) {
            return Err(Rejection::AmountNotInMinorUnits);
        }
        let settings = self.payments.wallets.get(&wallet);
        if settings.and_then(|s| s.min_top_up).is_some_and(|min| amount.amount < min) {
            return Err(Rejection::AmountBelowMinimum);
        }
        if settings.and_then(|s| s.max_top_up).is_some_and(|max| amount.amount > max) {
            return Err(Rejection::AmountAboveMaximum);
        }
        let billing = self.organization(organization).and_then(|o| o.billing.as_deref());
        let billing = billing.ok_or(Rejection::BillingDetailsRequired)?;
        self.usable_method(method, organization)?;
        let taxes = compute_taxes(
            self.payments.tax_profile(&billing.country, &billing.region),
            amount.amount,
            amount.currency,
        )?;
        let mut total = units;
        for line in &taxes {
            total = add(total, line.amount)?;
        }
        if reviewed_total.is_some_and(|reviewed| reviewed.units() != total) {
            return Err(Rejection::TotalChanged);
        }
        // The credit must fit later: the wallet, tax payable and funding stay in range.
        add(add(w.main, w.granted)?, units)?;
        self.system_fits(SystemAccount::ExternalFunding, amount.currency, -total)?;
        let id = TopUpId(self.payments.top_ups.len() as u64 + 1);
        let top_up = TopUp {
            id,
            wallet,
            organization,
            currency: amount.currency,
            amount: units,
            taxes,
            total,
            method,
            status: PaymentStatus::Pending,
            auto,
            created_at: now,
            settled_at: None,
            provider_reference: None,
            failure_code: None,
            failure_message: None,
            receipt_number: None,
            operation: None,
            refunded: 0,
            refunded_taxes: Vec::new(),
        };
        self.payments.top_ups.push(top_up.clone());
        self.payments.pending_top_ups.insert(id);
        Ok(top_up)
    }

    fn start_auto_top_up(&mut self, wallet: WalletId, now: Timestamp) -> Result<PaymentReceipt, Rejection> {
        self.payments.auto_due.retain(|(_, w)| *w != wallet);
        let skipped = |reason| Ok(PaymentReceipt::AutoTopUpSkipped { wallet, reason });
        let Some(rule) = self.payments.auto_rule(wallet).cloned() else {
            return skipped(Rejection::AutoTopUpNotActive);
        };
        if rule.in_flight.is_some() {
            return skipped(Rejection::AutoTopUpInFlight);
        }
        if now < rule.retry_at {
            self.payments.auto_due.insert((rule.retry_at, wallet));
            return skipped(Rejection::AutoTopUpBackingOff);
        }
        let w = self.wallet(wallet).ok_or(Rejection::WalletNotFound)?;
        let available = w.main + w.granted - w.held;
        if available >= rule.spec.threshold.units() {
            return skipped(Rejection::AutoTopUpNotNeeded);
        }
        let currency = w.currency;
        let amount = match rule.spec.amount {
            AutoAmount::Fixed(amount) => amount,
            AutoAmount::UpTo(target) => Amount::from_units(target.units() - available).round_to_minor_unit_up(currency),
        };
        let (day_count, day_amount) = if rule.day == day_of(now) { (rule.day_count, rule.day_amount) } else { (0, 0) };
        if day_count >= rule.spec.max_per_day || day_amount + amount.units() > rule.spec.max_amount_per_day.units() {
            return skipped(Rejection::AutoTopUpLimitReached);
        }
        let top_up = match self.new_top_up(wallet, Money::new(amount, currency), rule.spec.method, true, None, now) {
            Ok(top_up) => top_up,
            Err(reason) => return skipped(reason),
        };
        let state = self.payments.wallets.get_mut(&wallet).and_then(|w| w.auto.as_mut()).expect("rule checked above");
        state.in_flight = Some(top_up.id);
        state.day = day_of(now);
        state.day_count = day_count + 1;
        state.day_amount = day_amount + amount.units();
        Ok(PaymentReceipt::created_top_up(top_up))
    }

    /// Notes, after a debit or hold on `wallet`, that its auto top-up is due.
    #[inline]
    pub(crate) fn note_auto_top_up(&mut self, wallet: WalletId, now: Timestamp) {
        if self.payments.wallets.is_empty() {
            return;
        }
        let Some(rule) = self.payments.auto_rule(wallet) else { return };
        if rule.in_flight.is_some() {
            return;
        }
        let w = &self.wallets[index(wallet.0)];
        if w.main + w.granted - w.held < rule.spec.threshold.units() {
            let at = rule.retry_at.max(now);
            if !self.payments.auto_due.iter().any(|(_, due)| *due == wallet) {
                self.payments.auto_due.insert((at, wallet));
            }
        }
    }

    fn settle_top_up(
        &mut self,
        id: TopUpId,
        outcome: &ProviderOutcome,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        let top_up = self.payments.top_up(id).ok_or(Rejection::TopUpNotFound)?;
        if top_up.status != PaymentStatus::Pending {
            // A late or repeated answer: the first one stands.
            return Ok(PaymentReceipt::unchanged_top_up(top_up));
        }
        let (wallet, currency, amount, total, auto) =
            (top_up.wallet, top_up.currency, top_up.amount, top_up.total, top_up.auto);
        let mut operation = None;
        let mut rule_disabled = false;
        match outcome {
            ProviderOutcome::Succeeded { reference } => {
                // The money is captured: it goes in whatever the wallet's status now.
                let tax: i128 = top_up.taxes.iter().map(|t| t.amount).sum();
                let mut legs = Legs::new();
                legs.push(self.post_system(SystemAccount::ExternalFunding, currency, -total));
                self.wallet_mut(wallet).main += amount;
                legs.push(self.wallet_leg(wallet, amount, Vec::new()));
                if tax > 0 {
                    legs.push(self.post_system(SystemAccount::TaxPayable, currency, tax));
                }
                let posted = self.next_operation(OperationKind::TopUp, currency, now, legs);
                self.payments.receipts_issued += 1;
                let receipt_number = self.payments.receipts_issued;
                let record = &mut self.payments.top_ups[index(id.0)];
                record.status = PaymentStatus::Succeeded;
                record.provider_reference = Some(reference.as_str().into());
                record.receipt_number = Some(receipt_number);
                record.operation = Some(posted.id);
                operation = Some(posted);
                if auto {
                    if let Some(rule) = self.payments.wallets.get_mut(&wallet).and_then(|w| w.auto.as_mut()) {
                        rule.failures = 0;
                        rule.retry_at = 0;
                    }
                }
                let w = self.wallet_mut(wallet);
                let threshold = w.low_balance_threshold;
                if threshold.is_none_or(|t| w.main + w.granted - w.held >= t.units()) {
                    w.low_balance_notified = false;
                }
            }
            ProviderOutcome::Failed { code, message } => {
                let record = &mut self.payments.top_ups[index(id.0)];
                record.status = PaymentStatus::Failed;
                record.failure_code = Some(truncate(code).into());
                record.failure_message = Some(truncate(message).into());
                if auto {
                    if let Some(rule) = self.payments.wallets.get_mut(&wallet).and_then(|w| w.auto.as_mut()) {
                        rule.failures += 1;
                        let doublings = (rule.failures - 1).min(20);
                        rule.retry_at = now.saturating_add(AUTO_TOP_UP_BACKOFF_FIRST_MS << doublings);
                        if rule.failures >= AUTO_TOP_UP_FAILURES_MAX {
                            rule.enabled = false;
                            rule_disabled = true;
                        }
                    }
                }
            }
        }
        let record = &mut self.payments.top_ups[index(id.0)];
        record.settled_at = Some(now);
        let snapshot = record.clone();
        self.payments.pending_top_ups.remove(&id);
        if auto {
            if let Some(rule) = self.payments.wallets.get_mut(&wallet).and_then(|w| w.auto.as_mut()) {
                if rule.in_flight == Some(id) {
                    rule.in_flight = None;
                }
            }
            // A failure leaves the wallet below its threshold: due again after the
            // back-off while the rule is on. A success never starts another by itself
            // (only a later debit does), so a rule cannot loop.
            if snapshot.status == PaymentStatus::Failed {
                self.note_auto_top_up(wallet, now);
            }
        }
        Ok(PaymentReceipt::TopUp {
            top_up: Box::new(snapshot),
            created: false,
            settled: true,
            operation,
            rule_disabled,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn start_checkout(
        &mut self,
        consumer: OrganizationId,
        merchant: OrganizationId,
        amount: Money,
        use_wallet: bool,
        method: Option<PaymentMethodId>,
        description: &str,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        text_ok(description, true)?;
        let units = positive(amount.amount)?;
        let currency = amount.currency;
        if !amount.amount.is_whole_minor_units(currency) {
            return Err(Rejection::AmountNotInMinorUnits);
        }
        if consumer == merchant {
            return Err(Rejection::SameWallet);
        }
        self.organization(consumer).ok_or(Rejection::OrganizationNotFound)?;
        let m = self.organization(merchant).ok_or(Rejection::OrganizationNotFound)?;
        if !m.roles.merchant {
            return Err(Rejection::NotAMerchant);
        }
        let consumer_wallet = self.wallet_for(consumer, currency).ok_or(Rejection::WalletNotFound)?;
        let merchant_wallet = self.wallet_for(merchant, currency).ok_or(Rejection::WalletNotFound)?;
        let payee = self.open_wallet(merchant_wallet, currency)?;
        add(add(payee.main, payee.granted)?, units)?;
        let fee = Self::fee_of(amount.amount, Fee::Rate(self.settings.platform_fee))?;
        let wallet_part = if use_wallet {
            let w = self.debitable_wallet(consumer_wallet, currency)?;
            if w.exclusive_hold != 0 {
                return Err(Rejection::WalletOnHold);
            }
            let spendable = self.spendable_for(w, merchant, now);
            // The card is charged in whole minor units, so the wallet pays whole ones too.
            let whole = spendable.min(units) / currency.units_per_minor() * currency.units_per_minor();
            whole.max(0)
        } else {
            0
        };
        let card_part = units - wallet_part;
        if card_part > 0 {
            let method = method.ok_or(Rejection::PaymentMethodRequired)?;
            self.usable_method(method, consumer)?;
            self.system_fits(SystemAccount::ExternalFunding, currency, -card_part)?;
        }
        let id = CheckoutId(self.payments.checkouts.len() as u64 + 1);
        let mut checkout = Checkout {
            id,
            consumer,
            merchant,
            consumer_wallet,
            merchant_wallet,
            currency,
            amount: units,
            wallet_part,
            card_part,
            fee,
            hold: None,
            method: if card_part > 0 { method } else { None },
            description: description.into(),
            subscription: None,
            status: PaymentStatus::Pending,
            created_at: now,
            settled_at: None,
            provider_reference: None,
            failure_code: None,
            failure_message: None,
            operation: None,
        };
        let mut operation = None;
        if card_part == 0 {
            // The wallet pays it all: done now, in one operation.
            let action = MoneyAction::Transfer {
                from: consumer_wallet,
                to: merchant_wallet,
                amount: Money::new(Amount::from_units(units), currency),
                fee: Fee::Fixed(Amount::from_units(fee)),
                kind: TransferKind::Charge,
                product: None,
                description: description.to_string(),
            };
            let Receipt::Posted { operation: mut posted, .. } = self.apply_action(&action, now)? else {
                unreachable!("a transfer posts an operation")
            };
            posted.kind = OperationKind::Checkout;
            checkout.status = PaymentStatus::Succeeded;
            checkout.settled_at = Some(now);
            checkout.operation = Some(posted.id);
            operation = Some(posted);
            self.note_auto_top_up(consumer_wallet, now);
        } else if wallet_part > 0 {
            let action = MoneyAction::PlaceHold {
                wallet: consumer_wallet,
                amount: Money::new(Amount::from_units(wallet_part), currency),
                ttl_ms: CHECKOUT_HOLD_TTL_MS,
                exclusive: false,
                payee: Some(merchant_wallet),
                product: None,
                description: format!("checkout {id}"),
            };
            let Receipt::HoldPlaced { hold, .. } = self.apply_action(&action, now)? else {
                unreachable!("placing a hold answers with the hold")
            };
            checkout.hold = Some(hold);
        }
        if checkout.status == PaymentStatus::Pending {
            self.payments.pending_checkouts.insert(id);
        }
        self.payments.checkouts.push(checkout.clone());
        let settled = checkout.status != PaymentStatus::Pending;
        Ok(PaymentReceipt::Checkout { checkout: Box::new(checkout), created: true, settled, operation })
    }

    /// Whether a renewal payment (card part pending) exists for the subscription.
    pub(crate) fn renewal_payment_pending(&self, id: SubscriptionId) -> bool {
        self.payments.pending_checkouts.iter().any(|c| self.payments.checkouts[index(c.0)].subscription == Some(id))
    }

    /// Starts collecting a subscription's outstanding fee wallet first, under an
    /// exclusive hold, and the rest from the consumer's default payment method. False
    /// when there is no usable default method, a renewal payment is already pending,
    /// or the fee cannot go to a card (not whole minor units).
    pub(crate) fn start_renewal_payment(&mut self, id: SubscriptionId, now: Timestamp) -> bool {
        let s = &self.subscriptions[index(id.0)];
        let (consumer, merchant, wallet, merchant_wallet, owed) =
            (s.consumer, s.merchant, s.wallet, s.merchant_wallet, s.outstanding);
        let plan = self.plan(s.plan).expect("subscription's plan exists");
        let (currency, rate) = (plan.spec.currency, self.fee_rate(plan));
        let Some(&method) = self.payments.default_method.get(&consumer) else { return false };
        if self.usable_method(method, consumer).is_err()
            || owed <= 0
            || owed % currency.units_per_minor() != 0
            || self
                .payments
                .pending_checkouts
                .iter()
                .any(|c| self.payments.checkouts[index(c.0)].subscription == Some(id))
        {
            return false;
        }
        let Ok(fee) = Self::fee_of(Amount::from_units(owed), Fee::Rate(rate)) else { return false };
        let Some(w) = self.wallet(wallet) else { return false };
        let wallet_part = if w.exclusive_hold != 0 || w.status != WalletStatus::Active {
            0
        } else {
            let spendable = self.spendable_for(w, merchant, now).min(owed);
            spendable / currency.units_per_minor() * currency.units_per_minor()
        };
        let card_part = owed - wallet_part;
        if self.system_fits(SystemAccount::ExternalFunding, currency, -card_part).is_err() {
            return false;
        }
        let checkout_id = CheckoutId(self.payments.checkouts.len() as u64 + 1);
        let mut hold = None;
        if wallet_part > 0 {
            let action = MoneyAction::PlaceHold {
                wallet,
                amount: Money::new(Amount::from_units(wallet_part), currency),
                ttl_ms: CHECKOUT_HOLD_TTL_MS,
                exclusive: true,
                payee: Some(merchant_wallet),
                product: None,
                description: format!("renewal {id}"),
            };
            match self.apply_action(&action, now) {
                Ok(Receipt::HoldPlaced { hold: placed, .. }) => hold = Some(placed),
                _ => return false,
            }
        }
        self.payments.checkouts.push(Checkout {
            id: checkout_id,
            consumer,
            merchant,
            consumer_wallet: wallet,
            merchant_wallet,
            currency,
            amount: owed,
            wallet_part,
            card_part,
            fee,
            hold,
            method: Some(method),
            description: format!("recurring fee of {id}").into(),
            subscription: Some(id),
            status: PaymentStatus::Pending,
            created_at: now,
            settled_at: None,
            provider_reference: None,
            failure_code: None,
            failure_message: None,
            operation: None,
        });
        self.payments.pending_checkouts.insert(checkout_id);
        true
    }

    /// What `wallet` can spend with `merchant` now: applicable grants and main balance,
    /// less what holds reserve.
    fn spendable_for(&self, wallet: &Wallet, merchant: OrganizationId, now: Timestamp) -> i128 {
        let mut total = wallet.main - wallet.main_held;
        for grant_id in &wallet.grants {
            let grant = &self.grants[index(grant_id.0)];
            if grant.usable(now) && grant.applicability.as_ref().is_none_or(|a| a.allows(Some(merchant), None)) {
                total += grant.remaining - grant.reserved;
            }
        }
        total.min(wallet.main + wallet.granted - wallet.held)
    }

    fn settle_checkout(
        &mut self,
        id: CheckoutId,
        outcome: &ProviderOutcome,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        let checkout = self.payments.checkout(id).ok_or(Rejection::CheckoutNotFound)?.clone();
        if checkout.status != PaymentStatus::Pending {
            return Ok(PaymentReceipt::Checkout {
                checkout: Box::new(checkout),
                created: false,
                settled: false,
                operation: None,
            });
        }
        let mut operation = None;
        let hold_active = checkout.hold.is_none_or(|h| self.holds.contains_key(&h));
        let outcome = match outcome {
            ProviderOutcome::Succeeded { .. } if !hold_active => &ProviderOutcome::Failed {
                code: "hold_expired".into(),
                message: "the wallet part's hold expired before the card was confirmed; the card must be refunded"
                    .into(),
            },
            outcome => outcome,
        };
        match outcome {
            ProviderOutcome::Succeeded { reference } => {
                let currency = checkout.currency;
                let mut legs = Legs::new();
                if let Some(hold) = checkout.hold {
                    let held = self.holds.remove(&hold).expect("hold checked above");
                    let portions = self.spend(held.wallet, &held.reservations, true);
                    self.close_hold(&held);
                    legs.push(self.wallet_leg(held.wallet, -held.amount, portions));
                }
                legs.push(self.post_system(SystemAccount::ExternalFunding, currency, -checkout.card_part));
                self.wallet_mut(checkout.merchant_wallet).main += checkout.amount - checkout.fee;
                legs.push(self.wallet_leg(checkout.merchant_wallet, checkout.amount - checkout.fee, Vec::new()));
                if checkout.fee > 0 {
                    legs.push(self.post_system(SystemAccount::PlatformRevenue, currency, checkout.fee));
                }
                let kind =
                    if checkout.subscription.is_some() { OperationKind::RecurringFee } else { OperationKind::Checkout };
                let posted = self.next_operation(kind, currency, now, legs);
                if let Some(subscription) = checkout.subscription {
                    // Pays what this renewal collected; a later period's fee that came
                    // due meanwhile stays owed (and its retry is scheduled).
                    let s = &mut self.subscriptions[index(subscription.0)];
                    s.outstanding = (s.outstanding - checkout.amount).max(0);
                    if s.outstanding == 0 && s.status == SubscriptionStatus::PastDue {
                        s.status = SubscriptionStatus::Active;
                    }
                }
                let record = &mut self.payments.checkouts[index(id.0)];
                record.status = PaymentStatus::Succeeded;
                record.provider_reference = Some(reference.as_str().into());
                record.operation = Some(posted.id);
                operation = Some(posted);
                self.note_auto_top_up(checkout.consumer_wallet, now);
            }
            ProviderOutcome::Failed { code, message } => {
                if let Some(hold) = checkout.hold {
                    if let Some(held) = self.holds.remove(&hold) {
                        self.unreserve(&held, &held.reservations, now);
                        self.close_hold(&held);
                    }
                }
                let record = &mut self.payments.checkouts[index(id.0)];
                record.status = PaymentStatus::Failed;
                record.failure_code = Some(truncate(code).into());
                record.failure_message = Some(truncate(message).into());
                if let Some(subscription) = checkout.subscription {
                    let s = &mut self.subscriptions[index(subscription.0)];
                    if s.status == SubscriptionStatus::Active {
                        s.status = SubscriptionStatus::PastDue;
                        self.renewals.insert((now.saturating_add(crate::usage::FEE_RETRY_MS), subscription));
                    }
                }
            }
        }
        let record = &mut self.payments.checkouts[index(id.0)];
        record.settled_at = Some(now);
        let snapshot = record.clone();
        self.payments.pending_checkouts.remove(&id);
        Ok(PaymentReceipt::Checkout { checkout: Box::new(snapshot), created: false, settled: true, operation })
    }
}

fn replayed_refund(refund: &Refund) -> PaymentReceipt {
    PaymentReceipt::Refund { refund: Box::new(refund.clone()), created: false, settled: false, operation: None }
}

impl State {
    fn note_refund_key(&mut self, key: IdempotencyKey, receipt: &PaymentReceipt) {
        if let PaymentReceipt::Refund { refund, .. } = receipt {
            self.payments.refund_keys.insert(key.0, refund.id);
        }
    }

    fn refund_top_up(
        &mut self,
        id: TopUpId,
        amount: Option<Amount>,
        reason: &str,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        text_ok(reason, true)?;
        let top_up = self.payments.top_up(id).ok_or(Rejection::TopUpNotFound)?;
        if top_up.status != PaymentStatus::Succeeded {
            return Err(Rejection::NotRefundable);
        }
        let (wallet, currency) = (top_up.wallet, top_up.currency);
        let left = top_up.amount - top_up.refunded;
        let units = match amount {
            Some(amount) => positive(amount)?,
            None => left,
        };
        if units <= 0 || units > left {
            return Err(Rejection::RefundExceedsPayment);
        }
        if units % currency.units_per_minor() != 0 {
            return Err(Rejection::AmountNotInMinorUnits);
        }
        // Only what is unspent goes back: the main balance not reserved by holds.
        let w = self.wallet(wallet).ok_or(Rejection::WalletNotFound)?;
        if units > w.main - w.main_held {
            return Err(Rejection::InsufficientFunds);
        }
        // Taxes in proportion, each rounded half to even to minor units; the last
        // refund takes exactly what is left, so the total refunded equals what was paid.
        let last = units == left;
        let per_minor = currency.units_per_minor();
        let mut taxes = Vec::with_capacity(top_up.taxes.len());
        for (i, line) in top_up.taxes.iter().enumerate() {
            let done = top_up.refunded_taxes.get(i).copied().unwrap_or(0);
            let share = if last {
                line.amount - done
            } else {
                let exact = line.amount.checked_mul(units).ok_or(Rejection::AmountOverflow)?;
                crate::money::divide_round_half_even(exact, top_up.amount * per_minor) * per_minor
            };
            taxes.push(TaxLine { name: line.name.clone(), amount: share.min(line.amount - done).max(0) });
        }
        let tax: i128 = taxes.iter().map(|t| t.amount).sum();
        let total = units + tax;
        let organization = top_up.organization;
        // Checks are done; the money leaves now and comes back if the provider refuses.
        self.wallet_mut(wallet).main -= units;
        let mut legs = Legs::new();
        legs.push(self.wallet_leg(wallet, -units, Vec::new()));
        if tax > 0 {
            legs.push(self.post_system(SystemAccount::TaxPayable, currency, -tax));
        }
        legs.push(self.post_system(SystemAccount::ExternalFunding, currency, total));
        let operation = self.next_operation(OperationKind::Refund, currency, now, legs);
        let record = &mut self.payments.top_ups[index(id.0)];
        record.refunded += units;
        record.refunded_taxes.resize(record.taxes.len(), 0);
        for (i, line) in taxes.iter().enumerate() {
            record.refunded_taxes[i] += line.amount;
        }
        let refund = Refund {
            id: RefundId(self.payments.refunds.len() as u64 + 1),
            of: RefundOf::TopUp(id),
            wallet,
            organization,
            currency,
            amount: units,
            taxes,
            total,
            merchant_wallet: None,
            merchant_part: 0,
            fee_part: 0,
            reason: reason.into(),
            status: PaymentStatus::Pending,
            created_at: now,
            settled_at: None,
            operation: Some(operation.id),
            reversal: None,
            failure_code: None,
        };
        self.payments.pending_refunds.insert(refund.id);
        self.payments.refunds.push(refund.clone());
        Ok(PaymentReceipt::Refund {
            refund: Box::new(refund),
            created: true,
            settled: false,
            operation: Some(operation),
        })
    }

    fn settle_refund(
        &mut self,
        id: RefundId,
        outcome: &ProviderOutcome,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        let refund = self.payments.refunds.get(index(id.0)).ok_or(Rejection::RefundNotFound)?.clone();
        if refund.status != PaymentStatus::Pending {
            return Ok(replayed_refund(&refund));
        }
        let mut operation = None;
        let record = &mut self.payments.refunds[index(id.0)];
        record.settled_at = Some(now);
        match outcome {
            ProviderOutcome::Succeeded { .. } => record.status = PaymentStatus::Succeeded,
            ProviderOutcome::Failed { code, .. } => {
                record.status = PaymentStatus::Failed;
                record.failure_code = Some(truncate(code).into());
                // The provider refused: the money goes back where it came from.
                let currency = refund.currency;
                let tax: i128 = refund.taxes.iter().map(|t| t.amount).sum();
                let mut legs = Legs::new();
                legs.push(self.post_system(SystemAccount::ExternalFunding, currency, -refund.total));
                self.wallet_mut(refund.wallet).main += refund.amount;
                legs.push(self.wallet_leg(refund.wallet, refund.amount, Vec::new()));
                if tax > 0 {
                    legs.push(self.post_system(SystemAccount::TaxPayable, currency, tax));
                }
                let posted = self.next_operation(OperationKind::RefundReversal, currency, now, legs);
                self.payments.refunds[index(id.0)].reversal = Some(posted.id);
                if let RefundOf::TopUp(top_up) = refund.of {
                    let record = &mut self.payments.top_ups[index(top_up.0)];
                    record.refunded -= refund.amount;
                    for (i, line) in refund.taxes.iter().enumerate() {
                        record.refunded_taxes[i] -= line.amount;
                    }
                }
                operation = Some(posted);
            }
        }
        self.payments.pending_refunds.remove(&id);
        let snapshot = self.payments.refunds[index(id.0)].clone();
        Ok(PaymentReceipt::Refund { refund: Box::new(snapshot), created: false, settled: true, operation })
    }

    fn refund_payment(
        &mut self,
        original: &Operation,
        amount: Option<Amount>,
        reason: &str,
        now: Timestamp,
    ) -> Result<PaymentReceipt, Rejection> {
        text_ok(reason, true)?;
        if !matches!(original.kind, OperationKind::Charge | OperationKind::Checkout | OperationKind::HoldCapture)
            || original.id.0 == 0
            || original.id.0 >= self.next_operation_id
        {
            return Err(Rejection::NotRefundable);
        }
        let currency = original.currency;
        let mut consumer = None;
        let mut merchant = None;
        let mut fee = 0i128;
        let mut card = 0i128;
        for leg in &original.legs {
            match leg.account {
                Account::Wallet(wallet) if leg.amount.units() < 0 && consumer.is_none() => {
                    consumer = Some((wallet, leg.clone()))
                }
                Account::Wallet(wallet) if leg.amount.units() > 0 && merchant.is_none() => merchant = Some(wallet),
                Account::System(SystemAccount::PlatformRevenue, _) => fee += leg.amount.units(),
                Account::System(SystemAccount::ExternalFunding, _) => card -= leg.amount.units(),
                _ => {}
            }
        }
        let (Some((consumer_wallet, consumer_leg)), Some(merchant_wallet)) = (consumer, merchant) else {
            return Err(Rejection::NotRefundable);
        };
        let paid = -consumer_leg.amount.units() + card;
        let done = self.payments.refunded_payments.get(&original.id).copied().unwrap_or(0);
        let units = match amount {
            Some(amount) => positive(amount)?,
            None => paid - done,
        };
        if units <= 0 || units > paid - done {
            return Err(Rejection::RefundExceedsPayment);
        }
        // The platform's fee in proportion (rounded down); the merchant gives the rest.
        let fee_part = fee.checked_mul(units).ok_or(Rejection::AmountOverflow)? / paid;
        let merchant_part = units - fee_part;
        let m = self.wallet(merchant_wallet).ok_or(Rejection::WalletNotFound)?;
        if merchant_part > m.main - m.main_held {
            return Err(Rejection::MerchantInsufficientFunds);
        }
        let c = self.open_wallet(consumer_wallet, currency)?;
        add(add(c.main, c.granted)?, units)?;
        let organization = c.organization;
        // Checks are done. Back to the grants it came from while usable, else main.
        let mut left = units;
        let mut portions = Vec::new();
        for portion in &consumer_leg.grants {
            let taken = -portion.amount.units();
            let Some(grant) = self.grant(portion.grant) else { continue };
            let usable = matches!(grant.status, GrantStatus::Active | GrantStatus::Spent)
                && grant.expires_at.is_none_or(|at| at > now);
            let give = taken.min(left).min(grant.amount - grant.remaining);
            if !usable || give <= 0 {
                continue;
            }
            let order = grant.spending_order();
            let grant = self.grant_mut(portion.grant);
            grant.remaining += give;
            grant.status = GrantStatus::Active;
            let grants = &self.grants;
            let w = &mut self.wallets[index(consumer_wallet.0)];
            if !w.grants.contains(&portion.grant) {
                let position = w.grants.partition_point(|g| grants[index(g.0)].spending_order() < order);
                w.grants.insert(position, portion.grant);
            }
            w.granted += give;
            portions.push(GrantPortion { grant: portion.grant, amount: Amount::from_units(give) });
            left -= give;
        }
        self.wallet_mut(consumer_wallet).main += left;
        self.wallet_mut(merchant_wallet).main -= merchant_part;
        let mut legs = Legs::new();
        legs.push(self.wallet_leg(merchant_wallet, -merchant_part, Vec::new()));
        if fee_part > 0 {
            legs.push(self.post_system(SystemAccount::PlatformRevenue, currency, -fee_part));
        }
        legs.push(self.wallet_leg(consumer_wallet, units, portions));
        let operation = self.next_operation(OperationKind::Refund, currency, now, legs);
        *self.payments.refunded_payments.entry(original.id).or_default() += units;
        let refund = Refund {
            id: RefundId(self.payments.refunds.len() as u64 + 1),
            of: RefundOf::Payment(original.id),
            wallet: consumer_wallet,
            organization,
            currency,
            amount: units,
            taxes: Vec::new(),
            total: 0,
            merchant_wallet: Some(merchant_wallet),
            merchant_part,
            fee_part,
            reason: reason.into(),
            status: PaymentStatus::Succeeded,
            created_at: now,
            settled_at: Some(now),
            operation: Some(operation.id),
            reversal: None,
            failure_code: None,
        };
        self.payments.refunds.push(refund.clone());
        Ok(PaymentReceipt::Refund {
            refund: Box::new(refund),
            created: true,
            settled: true,
            operation: Some(operation),
        })
    }
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(TEXT_LENGTH_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn valid_profile(profile: &TaxProfile) -> Result<(), Rejection> {
    let country_ok = profile.country.len() == 2 && profile.country.bytes().all(|b| b.is_ascii_uppercase());
    let subdivision_ok = profile.subdivision.as_deref().is_none_or(|s| !s.is_empty() && s.len() <= 16);
    if !country_ok || !subdivision_ok || profile.taxes.len() > TAXES_PER_PROFILE_MAX {
        return Err(Rejection::InvalidTaxProfile);
    }
    for tax in &profile.taxes {
        text_ok(&tax.name, false)?;
        let fixed_ok = tax.fixed.is_none_or(|f| f.amount.units() > 0 && f.amount.is_whole_minor_units(f.currency));
        if tax.rate.0 > PartsPerMillion::MAX || !fixed_ok || (tax.rate.0 == 0 && tax.fixed.is_none()) {
            return Err(Rejection::InvalidTaxProfile);
        }
    }
    Ok(())
}
