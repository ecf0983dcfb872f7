//! Merchant payouts in the state machine: organization verification, external bank
//! accounts (validated, stored masked, verified by two small deposits or an admin),
//! payouts to them, and payout schedules.
//!
//! A payout moves the money from the wallet to payouts in transit at once; the server
//! then sends it to the payout rail under the payout's id as idempotency key and
//! records the rail's answer (`SettlePayout`): paid (in transit leaves for the outside
//! world) or failed (the money returns to the wallet). As with payments, a settled
//! payout ignores later answers.

use crate::command::*;
use crate::ids::*;
use crate::money::{Amount, Currency, Money};
use crate::payments::{PaymentStatus, ProviderOutcome};
use crate::rejection::Rejection;
use crate::state::*;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Wrong test-deposit confirmations after which a bank account fails verification.
pub const DEPOSIT_ATTEMPTS_MAX: u32 = 3;
/// Most bank accounts per organization.
pub const BANK_ACCOUNTS_PER_ORGANIZATION_MAX: usize = 16;
const DAY_MS: i64 = 24 * 3600 * 1000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    #[default]
    Unverified,
    Pending,
    Verified,
    Rejected,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub status: VerificationStatus,
    pub reason: Option<Box<str>>,
    pub updated_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankAccountStatus {
    New,
    PendingVerification,
    Verified,
    Failed,
    Removed,
}

/// An external bank account as the ledger keeps it: never the full number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAccount {
    pub id: BankAccountId,
    pub organization: OrganizationId,
    pub country: Box<str>,
    pub currency: Currency,
    pub holder_name: Box<str>,
    pub last4: Box<str>,
    /// The vault's or rail's token for the full details.
    pub token: Box<str>,
    pub status: BankAccountStatus,
    /// The two test deposits, in minor units, while verification is pending.
    pub deposits: Option<(i64, i64)>,
    pub attempts: u32,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    pub id: PayoutId,
    pub wallet: WalletId,
    pub organization: OrganizationId,
    pub bank_account: BankAccountId,
    pub currency: Currency,
    pub amount: i128,
    /// Pending: in transit, waiting for the rail's answer.
    pub status: PaymentStatus,
    pub scheduled: bool,
    pub created_at: Timestamp,
    pub settled_at: Option<Timestamp>,
    pub rail_reference: Option<Box<str>>,
    pub failure_code: Option<Box<str>>,
    pub failure_message: Option<Box<str>>,
    pub operation: OperationId,
    pub return_operation: Option<OperationId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayoutInterval {
    Daily,
    Weekly,
}

impl PayoutInterval {
    fn ms(self) -> i64 {
        match self {
            PayoutInterval::Daily => DAY_MS,
            PayoutInterval::Weekly => 7 * DAY_MS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutSchedule {
    pub interval: PayoutInterval,
    /// Available balance kept back.
    pub reserve: Amount,
    pub bank_account: BankAccountId,
    pub next_at: Timestamp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payouts {
    pub verifications: FxHashMap<OrganizationId, Verification>,
    pub bank_accounts: Vec<BankAccount>,
    pub payouts: Vec<Payout>,
    pub payout_keys: FxHashMap<u128, PayoutId>,
    pub pending: BTreeSet<PayoutId>,
    pub schedules: FxHashMap<WalletId, PayoutSchedule>,
    /// Schedules by when they are due.
    pub schedule_due: BTreeSet<(Timestamp, WalletId)>,
    /// The smallest payout, per currency (absent: one minor unit).
    pub minimums: Vec<Money>,
}

/// Details a bank account is added with; the server validates the number's format
/// and checksum and keeps only its last four digits and a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBankAccount {
    pub organization: OrganizationId,
    pub country: String,
    pub currency: Currency,
    pub holder_name: String,
    pub last4: String,
    pub token: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayoutCommand {
    /// The organization submits its details for review: unverified or rejected -> pending.
    SubmitVerification {
        organization: OrganizationId,
    },
    /// The platform decides: pending -> verified or rejected (with a reason).
    DecideVerification {
        organization: OrganizationId,
        approve: bool,
        reason: String,
    },
    AddBankAccount {
        account: NewBankAccount,
    },
    /// Records the two test deposits sent to the account (the server picks them).
    StartDepositVerification {
        account: BankAccountId,
        deposits: (i64, i64),
    },
    ConfirmDeposits {
        account: BankAccountId,
        deposits: (i64, i64),
    },
    /// The platform verifies an account directly.
    VerifyBankAccount {
        account: BankAccountId,
    },
    RemoveBankAccount {
        account: BankAccountId,
    },
    SetMinimum {
        minimum: Money,
    },
    CreatePayout {
        key: IdempotencyKey,
        actor: Option<OrganizationId>,
        wallet: WalletId,
        amount: Money,
        bank_account: BankAccountId,
    },
    SettlePayout {
        payout: PayoutId,
        outcome: ProviderOutcome,
    },
    SetSchedule {
        wallet: WalletId,
        schedule: Option<PayoutSchedule>,
    },
    /// Runs a due schedule: pays out available above the reserve, then moves it on.
    RunSchedule {
        wallet: WalletId,
    },
}

// The payout variant carries its operation inline, as `Receipt::Posted` does: a receipt
// is as large as its largest variant either way.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayoutReceipt {
    Verification {
        organization: OrganizationId,
        verification: Verification,
    },
    BankAccount(Box<BankAccount>),
    MinimumSet,
    ScheduleSet(WalletId),
    /// A schedule ran but there was nothing (enough) to pay out.
    ScheduleSkipped {
        wallet: WalletId,
        reason: Rejection,
    },
    Payout {
        payout: Box<Payout>,
        created: bool,
        settled: bool,
        operation: Option<Operation>,
    },
}

fn index(id: u64) -> usize {
    (id as usize).wrapping_sub(1)
}

impl Payouts {
    pub fn bank_account(&self, id: BankAccountId) -> Option<&BankAccount> {
        self.bank_accounts.get(index(id.0))
    }

    pub fn payout(&self, id: PayoutId) -> Option<&Payout> {
        self.payouts.get(index(id.0))
    }

    pub fn verification(&self, organization: OrganizationId) -> Verification {
        self.verifications.get(&organization).cloned().unwrap_or_default()
    }

    pub fn minimum(&self, currency: Currency) -> i128 {
        self.minimums.iter().find(|m| m.currency == currency).map_or(currency.units_per_minor(), |m| m.amount.units())
    }
}

impl State {
    pub(crate) fn apply_payout(&mut self, command: &PayoutCommand, now: Timestamp) -> Result<Receipt, Rejection> {
        let receipt = match command {
            PayoutCommand::SubmitVerification { organization } => {
                self.organization(*organization).ok_or(Rejection::OrganizationNotFound)?;
                let current = self.payouts.verification(*organization).status;
                if !matches!(current, VerificationStatus::Unverified | VerificationStatus::Rejected) {
                    return Err(Rejection::InvalidStatusChange);
                }
                if self.organization(*organization).and_then(|o| o.billing.as_ref()).is_none() {
                    return Err(Rejection::BillingDetailsRequired);
                }
                self.set_verification(*organization, VerificationStatus::Pending, None, now)
            }
            PayoutCommand::DecideVerification { organization, approve, reason } => {
                text_ok(reason, *approve)?;
                if self.payouts.verification(*organization).status != VerificationStatus::Pending {
                    return Err(Rejection::InvalidStatusChange);
                }
                let (status, reason) = if *approve {
                    (VerificationStatus::Verified, None)
                } else {
                    (VerificationStatus::Rejected, Some(reason.as_str().into()))
                };
                self.set_verification(*organization, status, reason, now)
            }
            PayoutCommand::AddBankAccount { account } => {
                self.organization(account.organization).ok_or(Rejection::OrganizationNotFound)?;
                text_ok(&account.holder_name, false)?;
                text_ok(&account.token, false)?;
                let country_ok = account.country.len() == 2 && account.country.bytes().all(|b| b.is_ascii_uppercase());
                let last4_ok = account.last4.len() == 4 && account.last4.bytes().all(|b| b.is_ascii_alphanumeric());
                if !country_ok || !last4_ok {
                    return Err(Rejection::InvalidBankAccount);
                }
                let owned = self
                    .payouts
                    .bank_accounts
                    .iter()
                    .filter(|a| a.organization == account.organization && a.status != BankAccountStatus::Removed)
                    .count();
                if owned >= BANK_ACCOUNTS_PER_ORGANIZATION_MAX {
                    return Err(Rejection::TooManyItems);
                }
                let id = BankAccountId(self.payouts.bank_accounts.len() as u64 + 1);
                let record = BankAccount {
                    id,
                    organization: account.organization,
                    country: account.country.as_str().into(),
                    currency: account.currency,
                    holder_name: account.holder_name.as_str().into(),
                    last4: account.last4.as_str().into(),
                    token: account.token.as_str().into(),
                    status: BankAccountStatus::New,
                    deposits: None,
                    attempts: 0,
                    created_at: now,
                };
                self.payouts.bank_accounts.push(record.clone());
                PayoutReceipt::BankAccount(Box::new(record))
            }
            PayoutCommand::StartDepositVerification { account, deposits } => {
                let a = self.payouts.bank_account(*account).ok_or(Rejection::BankAccountNotFound)?;
                if a.status != BankAccountStatus::New {
                    return Err(Rejection::InvalidStatusChange);
                }
                if !(1..100).contains(&deposits.0) || !(1..100).contains(&deposits.1) {
                    return Err(Rejection::InvalidSetting);
                }
                let a = &mut self.payouts.bank_accounts[index(account.0)];
                a.status = BankAccountStatus::PendingVerification;
                a.deposits = Some(*deposits);
                PayoutReceipt::BankAccount(Box::new(a.clone()))
            }
            PayoutCommand::ConfirmDeposits { account, deposits } => {
                let a = self.payouts.bank_account(*account).ok_or(Rejection::BankAccountNotFound)?;
                if a.status != BankAccountStatus::PendingVerification {
                    return Err(Rejection::InvalidStatusChange);
                }
                let expected = a.deposits.expect("pending verification has deposits");
                let matches = expected == *deposits || expected == (deposits.1, deposits.0);
                let a = &mut self.payouts.bank_accounts[index(account.0)];
                if matches {
                    a.status = BankAccountStatus::Verified;
                    a.deposits = None;
                } else {
                    a.attempts += 1;
                    if a.attempts >= DEPOSIT_ATTEMPTS_MAX {
                        a.status = BankAccountStatus::Failed;
                        a.deposits = None;
                    }
                }
                // A wrong guess is an accepted command (it counts), answered as such.
                PayoutReceipt::BankAccount(Box::new(a.clone()))
            }
            PayoutCommand::VerifyBankAccount { account } => {
                let a = self.payouts.bank_account(*account).ok_or(Rejection::BankAccountNotFound)?;
                if !matches!(a.status, BankAccountStatus::New | BankAccountStatus::PendingVerification) {
                    return Err(Rejection::InvalidStatusChange);
                }
                let a = &mut self.payouts.bank_accounts[index(account.0)];
                a.status = BankAccountStatus::Verified;
                a.deposits = None;
                PayoutReceipt::BankAccount(Box::new(a.clone()))
            }
            PayoutCommand::RemoveBankAccount { account } => {
                let a = self.payouts.bank_account(*account).ok_or(Rejection::BankAccountNotFound)?;
                if a.status == BankAccountStatus::Removed {
                    return Err(Rejection::BankAccountNotFound);
                }
                if self.payouts.schedules.values().any(|s| s.bank_account == *account) {
                    return Err(Rejection::BankAccountInUse);
                }
                let a = &mut self.payouts.bank_accounts[index(account.0)];
                a.status = BankAccountStatus::Removed;
                PayoutReceipt::BankAccount(Box::new(a.clone()))
            }
            PayoutCommand::SetMinimum { minimum } => {
                if minimum.amount.units() <= 0 || !minimum.amount.is_whole_minor_units(minimum.currency) {
                    return Err(Rejection::InvalidSetting);
                }
                self.payouts.minimums.retain(|m| m.currency != minimum.currency);
                self.payouts.minimums.push(*minimum);
                PayoutReceipt::MinimumSet
            }
            PayoutCommand::CreatePayout { key, actor, wallet, amount, bank_account } => {
                if let Some(existing) = self.payouts.payout_keys.get(&key.0) {
                    let payout = &self.payouts.payouts[index(existing.0)];
                    if payout.wallet != *wallet
                        || payout.amount != amount.amount.units()
                        || payout.bank_account != *bank_account
                    {
                        return Err(Rejection::IdempotencyKeyMismatch);
                    }
                    return Ok(Receipt::Payout(PayoutReceipt::Payout {
                        payout: Box::new(payout.clone()),
                        created: false,
                        settled: false,
                        operation: None,
                    }));
                }
                let w = self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                if actor.is_some_and(|a| a != w.organization) {
                    return Err(Rejection::WalletNotFound);
                }
                let receipt = self.new_payout(*wallet, *amount, *bank_account, false, now)?;
                if let PayoutReceipt::Payout { payout, .. } = &receipt {
                    self.payouts.payout_keys.insert(key.0, payout.id);
                }
                receipt
            }
            PayoutCommand::SettlePayout { payout, outcome } => self.settle_payout(*payout, outcome, now)?,
            PayoutCommand::SetSchedule { wallet, schedule } => {
                let w = self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                let (organization, currency) = (w.organization, w.currency);
                if let Some(schedule) = schedule {
                    let account = self.payouts.bank_account(schedule.bank_account);
                    if !account
                        .is_some_and(|a| a.organization == organization && a.status != BankAccountStatus::Removed)
                    {
                        return Err(Rejection::BankAccountNotFound);
                    }
                    if schedule.reserve.units() < 0 || !schedule.reserve.is_whole_minor_units(currency) {
                        return Err(Rejection::InvalidSetting);
                    }
                }
                self.payouts.schedule_due.retain(|(_, w)| w != wallet);
                match schedule {
                    Some(schedule) => {
                        let mut schedule = schedule.clone();
                        if schedule.next_at <= now {
                            schedule.next_at = now + schedule.interval.ms();
                        }
                        self.payouts.schedule_due.insert((schedule.next_at, *wallet));
                        self.payouts.schedules.insert(*wallet, schedule);
                    }
                    None => {
                        self.payouts.schedules.remove(wallet);
                    }
                }
                PayoutReceipt::ScheduleSet(*wallet)
            }
            PayoutCommand::RunSchedule { wallet } => {
                let Some(schedule) = self.payouts.schedules.get(wallet).cloned() else {
                    return Err(Rejection::InvalidStatusChange);
                };
                if schedule.next_at > now {
                    return Err(Rejection::InvalidStatusChange);
                }
                // Move the schedule on first: whatever happens, it runs once per period.
                let mut next = schedule.next_at;
                while next <= now {
                    next += schedule.interval.ms();
                }
                self.payouts.schedule_due.remove(&(schedule.next_at, *wallet));
                self.payouts.schedule_due.insert((next, *wallet));
                self.payouts.schedules.get_mut(wallet).expect("schedule read above").next_at = next;
                let w = self.wallet(*wallet).ok_or(Rejection::WalletNotFound)?;
                let currency = w.currency;
                let per_minor = currency.units_per_minor();
                let above = (w.main - w.main_held - schedule.reserve.units()).max(0) / per_minor * per_minor;
                let amount = Money::new(Amount::from_units(above), currency);
                match self.new_payout(*wallet, amount, schedule.bank_account, true, now) {
                    Ok(receipt) => receipt,
                    Err(reason) => PayoutReceipt::ScheduleSkipped { wallet: *wallet, reason },
                }
            }
        };
        Ok(Receipt::Payout(receipt))
    }

    fn set_verification(
        &mut self,
        organization: OrganizationId,
        status: VerificationStatus,
        reason: Option<Box<str>>,
        now: Timestamp,
    ) -> PayoutReceipt {
        let verification = Verification { status, reason, updated_at: now };
        self.payouts.verifications.insert(organization, verification.clone());
        PayoutReceipt::Verification { organization, verification }
    }

    /// Checks a payout and moves its money to payouts in transit.
    fn new_payout(
        &mut self,
        wallet: WalletId,
        amount: Money,
        bank_account: BankAccountId,
        scheduled: bool,
        now: Timestamp,
    ) -> Result<PayoutReceipt, Rejection> {
        let units = positive(amount.amount)?;
        let w = self.debitable_wallet(wallet, amount.currency)?;
        let organization = w.organization;
        if self.payouts.verification(organization).status != VerificationStatus::Verified {
            return Err(Rejection::OrganizationNotVerified);
        }
        let account = self
            .payouts
            .bank_account(bank_account)
            .filter(|a| a.organization == organization && a.status != BankAccountStatus::Removed)
            .ok_or(Rejection::BankAccountNotFound)?;
        if account.status != BankAccountStatus::Verified {
            return Err(Rejection::BankAccountNotVerified);
        }
        if account.currency != amount.currency {
            return Err(Rejection::CurrencyMismatch);
        }
        if !amount.amount.is_whole_minor_units(amount.currency) {
            return Err(Rejection::AmountNotInMinorUnits);
        }
        if units < self.payouts.minimum(amount.currency) {
            return Err(Rejection::AmountBelowMinimum);
        }
        // Payouts take main balance only: grants are credit for spending, not cash.
        if units > w.main - w.main_held {
            return Err(Rejection::InsufficientFunds);
        }
        self.system_fits(SystemAccount::PayoutsInTransit, amount.currency, units)?;
        let plan = [Reservation { portion: Portion::Main, amount: units }];
        let portions = self.spend(wallet, &plan, false);
        let mut legs = Legs::new();
        legs.push(self.wallet_leg(wallet, -units, portions));
        legs.push(self.post_system(SystemAccount::PayoutsInTransit, amount.currency, units));
        let operation = self.next_operation(OperationKind::Payout, amount.currency, now, legs);
        let payout = Payout {
            id: PayoutId(self.payouts.payouts.len() as u64 + 1),
            wallet,
            organization,
            bank_account,
            currency: amount.currency,
            amount: units,
            status: PaymentStatus::Pending,
            scheduled,
            created_at: now,
            settled_at: None,
            rail_reference: None,
            failure_code: None,
            failure_message: None,
            operation: operation.id,
            return_operation: None,
        };
        self.payouts.pending.insert(payout.id);
        self.payouts.payouts.push(payout.clone());
        Ok(PayoutReceipt::Payout {
            payout: Box::new(payout),
            created: true,
            settled: false,
            operation: Some(operation),
        })
    }

    fn settle_payout(
        &mut self,
        id: PayoutId,
        outcome: &ProviderOutcome,
        now: Timestamp,
    ) -> Result<PayoutReceipt, Rejection> {
        let payout = self.payouts.payout(id).ok_or(Rejection::PayoutNotFound)?.clone();
        if payout.status != PaymentStatus::Pending {
            return Ok(PayoutReceipt::Payout {
                payout: Box::new(payout),
                created: false,
                settled: false,
                operation: None,
            });
        }
        let currency = payout.currency;
        let mut legs = Legs::new();
        let kind = match outcome {
            ProviderOutcome::Succeeded { .. } => {
                // Paid: the money leaves for the outside world.
                legs.push(self.post_system(SystemAccount::PayoutsInTransit, currency, -payout.amount));
                legs.push(self.post_system(SystemAccount::ExternalFunding, currency, payout.amount));
                OperationKind::PayoutPaid
            }
            ProviderOutcome::Failed { .. } => {
                legs.push(self.post_system(SystemAccount::PayoutsInTransit, currency, -payout.amount));
                self.wallet_mut(payout.wallet).main += payout.amount;
                legs.push(self.wallet_leg(payout.wallet, payout.amount, Vec::new()));
                OperationKind::PayoutReturn
            }
        };
        let operation = self.next_operation(kind, currency, now, legs);
        let record = &mut self.payouts.payouts[index(id.0)];
        record.settled_at = Some(now);
        match outcome {
            ProviderOutcome::Succeeded { reference } => {
                record.status = PaymentStatus::Succeeded;
                record.rail_reference = Some(reference.as_str().into());
            }
            ProviderOutcome::Failed { code, message } => {
                record.status = PaymentStatus::Failed;
                record.failure_code = Some(code.chars().take(TEXT_LENGTH_MAX).collect::<String>().into());
                record.failure_message = Some(message.chars().take(TEXT_LENGTH_MAX).collect::<String>().into());
                record.return_operation = Some(operation.id);
            }
        }
        let snapshot = record.clone();
        self.payouts.pending.remove(&id);
        Ok(PayoutReceipt::Payout {
            payout: Box::new(snapshot),
            created: false,
            settled: true,
            operation: Some(operation),
        })
    }
}
