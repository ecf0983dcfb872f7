//! Usage billing in the state machine: the catalog, subscriptions and their renewals,
//! reservations, and rating usage events into charges. Like the rest of `State`, every
//! check runs before the first write, so a rejected command or event changes nothing.

use crate::billing::*;
use crate::command::*;
use crate::ids::*;
use crate::keys::KeyTable;
use crate::money::{Amount, Currency, Money, PartsPerMillion};
use crate::rejection::Rejection;
use crate::state::*;

/// Ledger units per major unit: rating's carries are below this.
const SCALE: i128 = 1_000_000_000_000;
/// How long after a failed recurring fee it is tried again.
pub const FEE_RETRY_MS: i64 = 3600 * 1000;
/// Longest property value on a usage event, in bytes.
const PROPERTY_VALUE_MAX: usize = TEXT_LENGTH_MAX;

/// What an access check answers without moving money.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessCheck {
    pub subscription: SubscriptionId,
    pub wallet: WalletId,
    pub currency: Currency,
    /// The estimated cost, rounded up to ledger precision.
    pub cost: Amount,
    /// What the consumer's wallet can spend with this merchant now.
    pub available: Amount,
    pub allowed: bool,
    /// Why not, when not allowed.
    pub reason: Option<Rejection>,
}

fn index(id: u64) -> usize {
    (id as usize).wrapping_sub(1)
}

impl State {
    pub fn product(&self, id: ProductId) -> Option<&Product> {
        self.products.get(index(id.0))
    }

    pub fn meter(&self, id: MeterId) -> Option<&Meter> {
        self.meters.get(index(id.0))
    }

    pub fn plan(&self, id: PlanId) -> Option<&PricePlan> {
        self.plans.get(index(id.0))
    }

    pub fn subscription(&self, id: SubscriptionId) -> Option<&Subscription> {
        self.subscriptions.get(index(id.0))
    }

    fn merchant(&self, id: OrganizationId) -> Result<(), Rejection> {
        let organization = self.organization(id).ok_or(Rejection::OrganizationNotFound)?;
        if !organization.roles.merchant {
            return Err(Rejection::NotAMerchant);
        }
        Ok(())
    }

    pub(crate) fn apply_billing(&mut self, command: &Command, now: Timestamp) -> Result<Receipt, Rejection> {
        match command {
            Command::CreateProduct { merchant, name } => {
                self.merchant(*merchant)?;
                text_ok(name, false)?;
                let id = ProductId(self.products.len() as u64 + 1);
                self.products.push(Product { id, merchant: *merchant, name: name.as_str().into(), created_at: now });
                Ok(Receipt::ProductCreated(id))
            }
            Command::CreateMeter { merchant, code, unit, aggregation, product } => {
                self.merchant(*merchant)?;
                if !valid_code(code) {
                    return Err(Rejection::InvalidCode);
                }
                text_ok(unit, false)?;
                if product.is_some_and(|p| self.product(p).is_none_or(|p| p.merchant != *merchant)) {
                    return Err(Rejection::ProductNotFound);
                }
                if self.meters.iter().any(|m| m.merchant == *merchant && *m.code == **code) {
                    return Err(Rejection::MeterCodeTaken);
                }
                let id = MeterId(self.meters.len() as u64 + 1);
                self.meters.push(Meter {
                    id,
                    merchant: *merchant,
                    code: code.as_str().into(),
                    unit: unit.as_str().into(),
                    aggregation: *aggregation,
                    product: *product,
                    created_at: now,
                });
                Ok(Receipt::MeterCreated(id))
            }
            Command::CreatePlan { spec } => self.create_plan(spec, now),
            Command::ArchivePlan { plan } => {
                self.plan(*plan).ok_or(Rejection::PlanNotFound)?;
                self.plans[index(plan.0)].superseded = true;
                Ok(Receipt::PlanArchived(*plan))
            }
            Command::Subscribe { consumer, plan } => self.subscribe(*consumer, *plan, now),
            Command::CancelSubscription { subscription, at_period_end } => {
                let found = self.subscription(*subscription).ok_or(Rejection::SubscriptionNotFound)?;
                if found.status == SubscriptionStatus::Canceled {
                    return Err(Rejection::SubscriptionCanceled);
                }
                if *at_period_end {
                    self.subscriptions[index(subscription.0)].cancel_at_period_end = true;
                } else {
                    self.cancel_now(*subscription, now);
                }
                let status = self.subscriptions[index(subscription.0)].status;
                Ok(Receipt::Subscription {
                    subscription: *subscription,
                    status,
                    wallet_created: None,
                    fee: None,
                    low_balance: false,
                })
            }
            Command::Usage { merchant, events } => {
                if events.len() > USAGE_BATCH_MAX {
                    return Err(Rejection::TooManyItems);
                }
                self.merchant(*merchant)?;
                let results = events.iter().map(|event| self.usage_event(*merchant, event, now)).collect();
                Ok(Receipt::Usage { results })
            }
            _ => unreachable!("apply_billing takes billing commands only"),
        }
    }

    fn create_plan(&mut self, spec: &PlanSpec, now: Timestamp) -> Result<Receipt, Rejection> {
        self.merchant(spec.merchant)?;
        text_ok(&spec.name, false)?;
        validate_prices(&spec.prices)?;
        for price in &spec.prices {
            if self.meter(price.meter).is_none_or(|m| m.merchant != spec.merchant) {
                return Err(Rejection::MeterNotFound);
            }
        }
        if spec.recurring_fee.is_some_and(|fee| fee.units() < 0) {
            return Err(Rejection::AmountMustBePositive);
        }
        if spec.platform_fee.is_some_and(|fee| fee.0 > PartsPerMillion::MAX) {
            return Err(Rejection::InvalidSetting);
        }
        let version = match spec.replaces {
            Some(old) => {
                let old = self.plan(old).filter(|p| p.spec.merchant == spec.merchant).ok_or(Rejection::PlanNotFound)?;
                if old.spec.currency != spec.currency {
                    return Err(Rejection::CurrencyMismatch);
                }
                old.version + 1
            }
            None => 1,
        };
        let wallet_created = self.ensure_wallet(spec.merchant, spec.currency);
        if let Some(old) = spec.replaces {
            self.plans[index(old.0)].superseded = true;
        }
        let id = PlanId(self.plans.len() as u64 + 1);
        self.plans.push(PricePlan { id, spec: spec.clone(), version, superseded: false, created_at: now });
        Ok(Receipt::PlanCreated { plan: id, wallet_created })
    }

    /// The organization's wallet in `currency`, created if it has none; returns the new
    /// wallet's id when it made one.
    fn ensure_wallet(&mut self, organization: OrganizationId, currency: Currency) -> Option<WalletId> {
        if self.wallet_for(organization, currency).is_some() {
            return None;
        }
        let command = Command::CreateWallet { organization, currency, low_balance_threshold: None, additional: false };
        match self.apply(&command, 0) {
            Ok(Receipt::WalletCreated(wallet)) => Some(wallet),
            other => unreachable!("creating a missing wallet of an existing organization cannot fail: {other:?}"),
        }
    }

    fn subscribe(&mut self, consumer: OrganizationId, plan_id: PlanId, now: Timestamp) -> Result<Receipt, Rejection> {
        let plan = self.plan(plan_id).ok_or(Rejection::PlanNotFound)?;
        if plan.superseded {
            return Err(Rejection::PlanSuperseded);
        }
        let (merchant, currency, period, prices) =
            (plan.spec.merchant, plan.spec.currency, plan.spec.period, plan.spec.prices.len());
        let organization = self.organization(consumer).ok_or(Rejection::OrganizationNotFound)?;
        if !organization.roles.consumer {
            return Err(Rejection::NotAConsumer);
        }
        if consumer == merchant {
            return Err(Rejection::SameWallet);
        }
        if self.subscription_by_pair.contains_key(&(consumer, merchant)) {
            return Err(Rejection::SubscriptionExists);
        }
        let merchant_wallet = self.wallet_for(merchant, currency).ok_or(Rejection::WalletNotFound)?;
        self.open_wallet(merchant_wallet, currency)?;
        if let Some(existing) = self.wallet_for(consumer, currency) {
            self.open_wallet(existing, currency)?;
        }
        // Checks are done; from here on nothing is refused.
        let wallet_created = self.ensure_wallet(consumer, currency);
        let wallet = self.wallet_for(consumer, currency).expect("ensured above");
        let id = SubscriptionId(self.subscriptions.len() as u64 + 1);
        let period_end = period_boundary(now, period, 1);
        self.subscriptions.push(Subscription {
            id,
            consumer,
            merchant,
            plan: plan_id,
            wallet,
            merchant_wallet,
            status: SubscriptionStatus::Active,
            anchor: now,
            period_index: 0,
            period_start: now,
            period_end,
            cancel_at_period_end: false,
            outstanding: 0,
            created_at: now,
            canceled_at: None,
            meters: vec![MeterPeriod::default(); prices],
        });
        self.subscription_by_pair.insert((consumer, merchant), id);
        self.renewals.insert((period_end, id));
        let renewal = self.start_period_fee(id, now);
        Ok(Receipt::Subscription {
            subscription: id,
            status: renewal.status,
            wallet_created,
            fee: renewal.fee,
            low_balance: renewal.low_balance,
        })
    }

    fn cancel_now(&mut self, id: SubscriptionId, now: Timestamp) {
        let subscription = &mut self.subscriptions[index(id.0)];
        subscription.status = SubscriptionStatus::Canceled;
        subscription.canceled_at = Some(now);
        subscription.outstanding = 0;
        let pair = (subscription.consumer, subscription.merchant);
        if self.subscription_by_pair.get(&pair) == Some(&id) {
            self.subscription_by_pair.remove(&pair);
        }
    }

    pub(crate) fn fee_rate(&self, plan: &PricePlan) -> PartsPerMillion {
        plan.spec.platform_fee.unwrap_or(self.settings.platform_fee)
    }

    /// Sets the period's recurring fee as outstanding and tries to collect it.
    fn start_period_fee(&mut self, id: SubscriptionId, now: Timestamp) -> Renewal {
        let plan = self.subscription(id).map(|s| s.plan).expect("subscription exists");
        let fee = self.plan(plan).and_then(|p| p.spec.recurring_fee).map_or(0, |f| f.units());
        // Added, not set: a renewal payment still waiting for the card keeps what it owes
        // (otherwise the outstanding amount is zero at a period's start).
        self.subscriptions[index(id.0)].outstanding += fee;
        self.collect_outstanding(id, now)
    }

    /// Charges what the subscription owes; past due if the wallet cannot pay it.
    fn collect_outstanding(&mut self, id: SubscriptionId, now: Timestamp) -> Renewal {
        if self.renewal_payment_pending(id) {
            // A card is still paying an earlier fee: collecting now could take that fee
            // twice. Try again later, when it has settled.
            self.renewals.insert((now.saturating_add(FEE_RETRY_MS), id));
            let subscription = &self.subscriptions[index(id.0)];
            return Renewal {
                subscription: id,
                status: subscription.status,
                period_start: subscription.period_start,
                fee: None,
                low_balance: false,
            };
        }
        let subscription = &self.subscriptions[index(id.0)];
        let (wallet, to, owed, plan) =
            (subscription.wallet, subscription.merchant_wallet, subscription.outstanding, subscription.plan);
        let plan = self.plan(plan).expect("subscription's plan exists");
        let (currency, rate) = (plan.spec.currency, self.fee_rate(plan));
        let mut fee = None;
        let mut low_balance = false;
        let status = if owed == 0 {
            SubscriptionStatus::Active
        } else {
            let transfer = MoneyAction::Transfer {
                from: wallet,
                to,
                amount: Money::new(Amount::from_units(owed), currency),
                fee: Fee::Rate(rate),
                kind: TransferKind::Charge,
                product: None,
                description: String::new(),
            };
            match self.apply_action(&transfer, now) {
                Ok(Receipt::Posted { mut operation, .. }) => {
                    operation.kind = OperationKind::RecurringFee;
                    fee = Some(operation);
                    low_balance = self.note_low_balance(wallet);
                    self.subscriptions[index(id.0)].outstanding = 0;
                    SubscriptionStatus::Active
                }
                // The wallet cannot pay it all: the wallet part under an exclusive
                // hold, the rest by the consumer's default payment method, settled
                // when the provider answers (past due then if it fails).
                _ if self.start_renewal_payment(id, now) => SubscriptionStatus::Active,
                _ => {
                    self.renewals.insert((now.saturating_add(FEE_RETRY_MS), id));
                    SubscriptionStatus::PastDue
                }
            }
        };
        let subscription = &mut self.subscriptions[index(id.0)];
        subscription.status = status;
        Renewal { subscription: id, status, period_start: subscription.period_start, fee, low_balance }
    }

    /// Rolls over every subscription whose period ended, and retries past-due fees.
    pub(crate) fn renew_due(&mut self, now: Timestamp) -> Vec<Renewal> {
        let mut renewals = Vec::new();
        while let Some(&(at, id)) = self.renewals.first() {
            if at > now {
                break;
            }
            self.renewals.pop_first();
            let subscription = &self.subscriptions[index(id.0)];
            if subscription.status == SubscriptionStatus::Canceled {
                continue;
            }
            if at < subscription.period_end {
                // A retry of a past-due fee within the period.
                if subscription.status == SubscriptionStatus::PastDue {
                    renewals.push(self.collect_outstanding(id, now));
                }
                continue;
            }
            // The period ended. A subscription still past due when it ends, or set to
            // cancel, is canceled; the others start their next period.
            if subscription.cancel_at_period_end || subscription.status == SubscriptionStatus::PastDue {
                let period_start = subscription.period_start;
                self.cancel_now(id, at);
                renewals.push(Renewal {
                    subscription: id,
                    status: SubscriptionStatus::Canceled,
                    period_start,
                    fee: None,
                    low_balance: false,
                });
                continue;
            }
            let period = self.plan(subscription.plan).expect("plan exists").spec.period;
            let subscription = &mut self.subscriptions[index(id.0)];
            subscription.period_index += 1;
            subscription.period_start = subscription.period_end;
            subscription.period_end = period_boundary(subscription.anchor, period, subscription.period_index + 1);
            for meter in &mut subscription.meters {
                // Quantities and amounts restart; the carry does not, so nothing is lost.
                meter.quantity = Quantity(0);
                meter.charged = 0;
            }
            let next = subscription.period_end;
            self.renewals.insert((next, id));
            renewals.push(self.start_period_fee(id, now));
        }
        renewals
    }

    /// Reports a crossing of the low-balance threshold once: true the first time
    /// available falls below it, and again only after it has risen back above.
    pub(crate) fn note_low_balance(&mut self, wallet: WalletId) -> bool {
        let w = self.wallet_mut(wallet);
        let Some(threshold) = w.low_balance_threshold else { return false };
        let below = w.main + w.granted - w.held < threshold.units();
        let crossed = below && !w.low_balance_notified;
        w.low_balance_notified = below;
        crossed
    }

    /// The subscription, its plan's price index and the meter that an event names.
    fn priced_meter(
        &self,
        merchant: OrganizationId,
        consumer: OrganizationId,
        meter_code: &str,
    ) -> Result<(SubscriptionId, usize, MeterId), Rejection> {
        let id = *self.subscription_by_pair.get(&(consumer, merchant)).ok_or(Rejection::NoActiveSubscription)?;
        let subscription = &self.subscriptions[index(id.0)];
        if subscription.status != SubscriptionStatus::Active {
            return Err(Rejection::NoActiveSubscription);
        }
        let plan = self.plan(subscription.plan).expect("subscription's plan exists");
        let price = plan
            .spec
            .prices
            .iter()
            .position(|p| self.meters[index(p.meter.0)].code.as_ref() == meter_code)
            .ok_or(Rejection::UnknownMeter)?;
        Ok((id, price, plan.spec.prices[price].meter))
    }

    fn check_properties(properties: &[(String, String)]) -> Result<(), Rejection> {
        if properties.len() > EVENT_PROPERTIES_MAX {
            return Err(Rejection::TooManyItems);
        }
        for (name, value) in properties {
            if name.is_empty() || name.len() > CODE_LENGTH_MAX || value.len() > PROPERTY_VALUE_MAX {
                return Err(Rejection::TextLengthOutOfRange);
            }
        }
        Ok(())
    }

    /// Rates and charges one event, or refuses it and changes nothing.
    fn usage_event(
        &mut self,
        merchant: OrganizationId,
        event: &UsageEvent,
        now: Timestamp,
    ) -> Result<UsageCharge, Rejection> {
        if self.usage_keys.get(event.key.0).or_else(|| self.usage_keys_previous.get(event.key.0)).is_some() {
            return Err(Rejection::DuplicateEvent);
        }
        if event.at < now.saturating_sub(self.settings.usage_window_ms) {
            return Err(Rejection::EventTooOld);
        }
        if event.at > now.saturating_add(USAGE_FUTURE_MAX_MS) {
            return Err(Rejection::EventInFuture);
        }
        Self::check_properties(&event.properties)?;
        let (id, price_index, meter_id) = self.priced_meter(merchant, event.consumer, &event.meter)?;
        let subscription = &self.subscriptions[index(id.0)];
        let plan = self.plan(subscription.plan).expect("plan exists");
        let meter = &self.meters[index(meter_id.0)];
        let period = &subscription.meters[price_index];
        let (quantity, amount, carry, dimension) =
            rate(&plan.spec.prices[price_index].model, meter.aggregation, period, event.quantity, &event.properties)?;
        let period_quantity = period.quantity.0.checked_add(quantity.0).ok_or(Rejection::AmountOverflow)?;
        let period_charged = add(period.charged, amount)?;
        let (wallet, to, currency, product) =
            (subscription.wallet, subscription.merchant_wallet, plan.spec.currency, meter.product);
        let fee_units = Self::fee_of(Amount::from_units(amount), Fee::Rate(self.fee_rate(plan)))?;
        let payer = self.debitable_wallet(wallet, currency)?;
        let payee = self.open_wallet(to, currency)?;
        add(add(payee.main, payee.granted)?, amount - fee_units)?;
        self.system_fits(SystemAccount::PlatformRevenue, currency, fee_units)?;
        let from_hold = match event.reservation {
            Some(hold_id) => {
                let hold = self.active_hold(hold_id)?;
                if hold.wallet != wallet || hold.payee != Some(to) {
                    return Err(Rejection::ReservationMismatch);
                }
                hold.amount.min(amount)
            }
            None => 0,
        };
        let excess = if amount > from_hold {
            self.plan_spend(payer, amount - from_hold, Some(merchant), product, false, now)?
        } else {
            crate::state::Plan::new()
        };
        // Checks are done; from here on nothing fails.
        let mut portions = Vec::new();
        let mut released = None;
        if let Some(hold_id) = event.reservation {
            let taken = self.consume_hold(hold_id, from_hold);
            portions.extend(self.spend(wallet, &taken, true));
            let finished = self.holds.get(&hold_id).is_some_and(|h| h.amount == 0);
            if event.finish || finished {
                let held = self.holds.remove(&hold_id).expect("hold checked above");
                self.unreserve(&held, &held.reservations, now);
                self.close_hold(&held);
                released = Some(Amount::from_units(held.amount));
            }
        }
        portions.extend(self.spend(wallet, &excess, false));
        let operation = (amount > 0).then(|| {
            self.wallet_mut(to).main += amount - fee_units;
            let mut legs = Legs::new();
            legs.push(self.wallet_leg(wallet, -amount, portions));
            legs.push(self.wallet_leg(to, amount - fee_units, Vec::new()));
            if fee_units > 0 {
                legs.push(self.post_system(SystemAccount::PlatformRevenue, currency, fee_units));
            }
            self.next_operation(OperationKind::Charge, currency, now, legs)
        });
        let period = &mut self.subscriptions[index(id.0)].meters[price_index];
        period.quantity = Quantity(period_quantity);
        period.charged = period_charged;
        period.carry = carry;
        let record = IdempotencyRecord {
            fingerprint: 0,
            operation: operation.as_ref().map_or(0, |o| o.id.0),
            object: id.0,
            object_is_grant: false,
        };
        self.usage_keys.insert_new(event.key.0, record);
        let low_balance = amount > 0 && self.note_low_balance(wallet);
        Ok(UsageCharge {
            subscription: id,
            period_start: self.subscriptions[index(id.0)].period_start,
            currency,
            meter: meter_id,
            product,
            quantity,
            dimension: dimension.map(|d| d as u16),
            amount: Amount::from_units(amount),
            fee: Amount::from_units(fee_units),
            operation,
            reservation: event.reservation,
            released,
            low_balance,
        })
    }

    /// Takes `amount` out of an active hold's reservations, keeping the hold active with
    /// the rest. Returns the portions taken (still marked reserved: spend them with
    /// `from_reserved`).
    fn consume_hold(&mut self, id: HoldId, amount: i128) -> crate::state::Plan {
        let mut taken = crate::state::Plan::new();
        if amount == 0 {
            return taken;
        }
        let hold = self.holds.get_mut(&id).expect("hold checked by the caller");
        let mut left = amount;
        for reservation in hold.reservations.iter_mut() {
            let take = reservation.amount.min(left);
            if take > 0 {
                reservation.amount -= take;
                left -= take;
                taken.push(Reservation { portion: reservation.portion, amount: take });
            }
        }
        debug_assert_eq!(left, 0, "a hold covers what is taken from it");
        hold.reservations.retain(|r| r.amount > 0);
        hold.amount -= amount;
        let wallet = hold.wallet;
        self.wallet_mut(wallet).held -= amount;
        taken
    }

    /// What `quantity` of a meter would be charged now: exactly what a usage event of
    /// that quantity would cost at this moment.
    fn estimate_cost(
        &self,
        subscription: SubscriptionId,
        price_index: usize,
        quantity: Quantity,
        properties: &[(String, String)],
    ) -> Result<i128, Rejection> {
        let subscription = &self.subscriptions[index(subscription.0)];
        let plan = self.plan(subscription.plan).expect("plan exists");
        let meter = &self.meters[index(plan.spec.prices[price_index].meter.0)];
        let period = &subscription.meters[price_index];
        let (_, amount, _, _) =
            rate(&plan.spec.prices[price_index].model, meter.aggregation, period, quantity, properties)?;
        Ok(amount)
    }

    /// Answers whether the consumer can afford `quantity` of a meter (or `amount`) with
    /// this merchant now. Changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn access_check(
        &self,
        merchant: OrganizationId,
        consumer: OrganizationId,
        meter: &str,
        quantity: Option<Quantity>,
        amount: Option<Amount>,
        properties: &[(String, String)],
        now: Timestamp,
    ) -> Result<AccessCheck, Rejection> {
        Self::check_properties(properties)?;
        let (id, price_index, meter_id) = self.priced_meter(merchant, consumer, meter)?;
        let cost = match (quantity, amount) {
            (_, Some(amount)) => positive(amount)?,
            (Some(quantity), None) => self.estimate_cost(id, price_index, quantity, properties)?,
            (None, None) => return Err(Rejection::InvalidQuantity),
        };
        let subscription = &self.subscriptions[index(id.0)];
        let wallet = self.wallet(subscription.wallet).expect("subscription's wallet exists");
        let product = self.meters[index(meter_id.0)].product;
        let spendable = self.spendable_with(wallet, merchant, product, now);
        let reason = match self.debitable_wallet(wallet.id, wallet.currency) {
            Err(rejection) => Some(rejection),
            Ok(_) if cost > spendable => Some(Rejection::InsufficientFunds),
            Ok(_) => None,
        };
        Ok(AccessCheck {
            subscription: id,
            wallet: wallet.id,
            currency: wallet.currency,
            cost: Amount::from_units(cost),
            available: Amount::from_units(spendable),
            allowed: reason.is_none(),
            reason,
        })
    }

    /// What a wallet can pay towards a merchant's product: its unreserved main balance
    /// and the unreserved parts of the grants that apply.
    fn spendable_with(
        &self,
        wallet: &Wallet,
        merchant: OrganizationId,
        product: Option<ProductId>,
        now: Timestamp,
    ) -> i128 {
        let grants: i128 = wallet
            .grants
            .iter()
            .map(|g| &self.grants[index(g.0)])
            .filter(|g| g.status == GrantStatus::Active && g.expires_at.is_none_or(|at| at > now))
            .filter(|g| g.applicability.as_ref().is_none_or(|a| a.allows(Some(merchant), product)))
            .map(|g| g.remaining - g.reserved)
            .sum();
        grants + wallet.main - wallet.main_held
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reserve(
        &mut self,
        merchant: OrganizationId,
        consumer: OrganizationId,
        meter: &str,
        quantity: Option<Quantity>,
        amount: Option<Amount>,
        properties: &[(String, String)],
        ttl_ms: i64,
        now: Timestamp,
    ) -> Result<Receipt, Rejection> {
        let check = self.access_check(merchant, consumer, meter, quantity, amount, properties, now)?;
        let subscription = &self.subscriptions[index(check.subscription.0)];
        let product = self.meters[index(self.priced_meter(merchant, consumer, meter)?.2 .0)].product;
        let hold = MoneyAction::PlaceHold {
            wallet: subscription.wallet,
            amount: Money::new(check.cost, check.currency),
            ttl_ms,
            exclusive: false,
            payee: Some(subscription.merchant_wallet),
            product,
            description: String::new(),
        };
        match self.apply_action(&hold, now)? {
            Receipt::HoldPlaced { hold, expires_at } => {
                Ok(Receipt::Reserved { hold, wallet: check.wallet, expires_at, amount: check.cost })
            }
            other => unreachable!("placing a hold answers HoldPlaced, not {other:?}"),
        }
    }

    /// Starts a new generation of usage event ids once the current one is as old as the
    /// retention period; returns how many ids were forgotten.
    pub(crate) fn turn_usage_generation(&mut self, now: Timestamp) -> u64 {
        let due = self.usage_generation_started_at.saturating_add(self.settings.usage_retention_ms);
        if now < due {
            return 0;
        }
        let forgotten = self.usage_keys_previous.len() as u64;
        let next = KeyTable::with_capacity(self.usage_keys.len().max(self.usage_keys.capacity()));
        self.usage_keys_previous = std::mem::replace(&mut self.usage_keys, next);
        self.usage_generation_started_at = now;
        forgotten
    }

    pub(crate) fn check_billing_invariants(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for subscription in &self.subscriptions {
            let Some(plan) = self.plan(subscription.plan) else {
                problems.push(format!("{:?}: no plan {:?}", subscription.id, subscription.plan));
                continue;
            };
            if subscription.meters.len() != plan.spec.prices.len() {
                problems.push(format!("{:?}: meters do not match the plan's prices", subscription.id));
            }
            if subscription.meters.iter().any(|m| !(0..SCALE).contains(&m.carry) || m.charged < 0 || m.quantity.0 < 0) {
                problems.push(format!("{:?}: a meter's carry or totals are out of range", subscription.id));
            }
            let live = self.subscription_by_pair.get(&(subscription.consumer, subscription.merchant));
            if (subscription.status != SubscriptionStatus::Canceled) != (live == Some(&subscription.id)) {
                problems.push(format!("{:?}: the live-subscription index disagrees", subscription.id));
            }
        }
        problems
    }
}
