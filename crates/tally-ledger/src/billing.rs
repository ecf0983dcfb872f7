//! Usage billing's pure parts: the catalog's shapes (products, meters, prices, plans,
//! subscriptions), rating (quantity to exact money), and calendar arithmetic for billing
//! periods. Nothing here touches wallets; `usage.rs` applies ratings to the ledger.

use crate::command::Timestamp;
use crate::ids::*;
use crate::money::{Amount, Currency, PartsPerMillion};
use crate::rejection::Rejection;
use serde::{Deserialize, Serialize};

/// Ledger units per major unit, and per rated unit of quantity: both have 12 decimals.
const SCALE: i128 = 1_000_000_000_000;

/// Most prices in a plan, tiers in a graduated price, values in a dimensional price.
pub const PRICES_PER_PLAN_MAX: usize = 32;
pub const TIERS_MAX: usize = 32;
pub const DIMENSION_VALUES_MAX: usize = 64;
/// Most properties on one usage event.
pub const EVENT_PROPERTIES_MAX: usize = 16;
/// Longest meter code, dimension name or value, in bytes.
pub const CODE_LENGTH_MAX: usize = 64;
/// Most events in one usage batch.
pub const USAGE_BATCH_MAX: usize = 10_000;

/// A measured quantity, exact to 10^-12 of a unit, never negative.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug, Serialize, Deserialize)]
pub struct Quantity(pub i128);

impl Quantity {
    pub const ONE: Quantity = Quantity(SCALE);

    /// Parses a plain non-negative decimal with at most 12 fractional digits.
    pub fn parse(text: &str) -> Result<Quantity, Rejection> {
        let amount = Amount::parse(text).map_err(|_| Rejection::InvalidQuantity)?;
        if amount.units() < 0 {
            return Err(Rejection::InvalidQuantity);
        }
        Ok(Quantity(amount.units()))
    }

    pub fn format(self) -> String {
        Amount::from_units(self.0).format(0)
    }
}

/// Money computed with 12 more digits than the ledger keeps (10^-24 of a major unit):
/// a unit price (10^-12) times a quantity (10^-12) is exact here.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Debug, Serialize, Deserialize)]
pub struct Exact(pub i128);

impl Exact {
    fn add(self, other: Exact) -> Result<Exact, Rejection> {
        self.0.checked_add(other.0).map(Exact).ok_or(Rejection::AmountOverflow)
    }

    fn sub(self, other: Exact) -> Result<Exact, Rejection> {
        self.0.checked_sub(other.0).map(Exact).ok_or(Rejection::AmountOverflow)
    }

    /// Splits into whole ledger units (rounded down) and the remainder below one unit.
    pub fn split_round_down(self) -> (i128, i128) {
        (self.0.div_euclid(SCALE), self.0.rem_euclid(SCALE))
    }
}

fn times(price: Amount, quantity: Quantity) -> Result<Exact, Rejection> {
    price.units().checked_mul(quantity.0).map(Exact).ok_or(Rejection::AmountOverflow)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The period's quantity is the sum of the events' quantities.
    Sum,
    /// The period's quantity is the number of events; each event counts one.
    Count,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Product {
    pub id: ProductId,
    pub merchant: OrganizationId,
    pub name: Box<str>,
    pub created_at: Timestamp,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Meter {
    pub id: MeterId,
    pub merchant: OrganizationId,
    pub code: Box<str>,
    pub unit: Box<str>,
    pub aggregation: Aggregation,
    pub product: Option<ProductId>,
    pub created_at: Timestamp,
}

/// One step of a graduated price: units up to `up_to` (of the period's quantity) cost
/// `unit_price` each; the last tier has no limit.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Tier {
    pub up_to: Option<Quantity>,
    pub unit_price: Amount,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum PriceModel {
    PerUnit {
        unit_price: Amount,
    },
    /// Each started package of `size` units costs `package_price`, counted over the
    /// period, so splitting usage into many events never costs more.
    Package {
        size: Quantity,
        package_price: Amount,
    },
    /// Tiers over the period-to-date quantity.
    Graduated {
        tiers: Vec<Tier>,
    },
    /// A unit price chosen by an event property's value, or the default.
    Dimensional {
        property: String,
        values: Vec<(String, Amount)>,
        default: Option<Amount>,
    },
}

#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Price {
    pub meter: MeterId,
    pub model: PriceModel,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingPeriod {
    Day,
    Week,
    Month,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct PlanSpec {
    pub merchant: OrganizationId,
    pub name: String,
    pub currency: Currency,
    pub period: BillingPeriod,
    pub recurring_fee: Option<Amount>,
    pub prices: Vec<Price>,
    /// The platform's fee on this plan's charges; None takes the platform's default.
    pub platform_fee: Option<PartsPerMillion>,
    /// The plan this one is a new version of; the old one stops taking subscriptions.
    pub replaces: Option<PlanId>,
}

/// A plan never changes once created: a change is a new version, so a subscription's
/// prices cannot move under it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PricePlan {
    pub id: PlanId,
    pub spec: PlanSpec,
    pub version: u32,
    /// Set when a newer version replaces it or it is archived: no new subscriptions.
    pub superseded: bool,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    PastDue,
    Canceled,
}

/// A subscription's usage of one priced meter in the current period.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct MeterPeriod {
    pub quantity: Quantity,
    /// Money charged for this meter in the period, in ledger units.
    pub charged: i128,
    /// What rating owes below one ledger unit, carried to the next event (10^-24 units,
    /// always below one ledger unit). Never reset, so the sum charged over all events
    /// stays within one unit of the exact sum.
    pub carry: i128,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub consumer: OrganizationId,
    pub merchant: OrganizationId,
    pub plan: PlanId,
    pub wallet: WalletId,
    pub merchant_wallet: WalletId,
    pub status: SubscriptionStatus,
    /// The first period's start; later periods are counted from it.
    pub anchor: Timestamp,
    pub period_index: u32,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub cancel_at_period_end: bool,
    /// The recurring fee still unpaid (past due), in ledger units.
    pub outstanding: i128,
    pub created_at: Timestamp,
    pub canceled_at: Option<Timestamp>,
    /// Index-aligned with the plan's prices.
    pub meters: Vec<MeterPeriod>,
}

/// What rating an event decided, before any money moves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rating {
    /// Index of the price in the plan.
    pub price: usize,
    /// The quantity the event adds to the period (1 for a counting meter).
    pub quantity: Quantity,
    /// Ledger units to charge now.
    pub amount: i128,
    /// The carry after this event.
    pub carry: i128,
    /// Index of the dimension value that priced it, if dimensional (`None` = default).
    pub dimension: Option<usize>,
}

/// The exact cost of the first `quantity` units of a period under a model that depends
/// on the period's total (package, graduated).
fn cost_to_date(model: &PriceModel, quantity: Quantity) -> Result<Exact, Rejection> {
    match model {
        PriceModel::Package { size, package_price } => {
            let packages = quantity.0.div_euclid(size.0) + i128::from(quantity.0.rem_euclid(size.0) != 0);
            packages
                .checked_mul(package_price.units())
                .and_then(|v| v.checked_mul(SCALE))
                .map(Exact)
                .ok_or(Rejection::AmountOverflow)
        }
        PriceModel::Graduated { tiers } => {
            let mut total = Exact(0);
            let mut floor = Quantity(0);
            for tier in tiers {
                let ceiling = tier.up_to.unwrap_or(Quantity(i128::MAX));
                if quantity <= floor {
                    break;
                }
                let in_tier = Quantity(quantity.0.min(ceiling.0) - floor.0);
                total = total.add(times(tier.unit_price, in_tier)?)?;
                floor = ceiling;
            }
            Ok(total)
        }
        PriceModel::PerUnit { unit_price } => times(*unit_price, quantity),
        PriceModel::Dimensional { .. } => Err(Rejection::InvalidPrice),
    }
}

/// The exact cost of adding `quantity` to a period that already has `before`, with the
/// event's properties for dimensional prices. Returns the cost and the dimension used.
pub fn rate_exact(
    model: &PriceModel,
    before: Quantity,
    quantity: Quantity,
    properties: &[(String, String)],
) -> Result<(Exact, Option<usize>), Rejection> {
    match model {
        PriceModel::PerUnit { unit_price } => Ok((times(*unit_price, quantity)?, None)),
        PriceModel::Dimensional { property, values, default } => {
            let value = properties.iter().find(|(name, _)| name == property).map(|(_, v)| v.as_str());
            let found = value.and_then(|v| values.iter().position(|(name, _)| name == v));
            let price = match (found, default) {
                (Some(index), _) => values[index].1,
                (None, Some(default)) => *default,
                (None, None) => return Err(Rejection::UnknownDimension),
            };
            Ok((times(price, quantity)?, found))
        }
        PriceModel::Package { .. } | PriceModel::Graduated { .. } => {
            let after = Quantity(before.0.checked_add(quantity.0).ok_or(Rejection::AmountOverflow)?);
            Ok((cost_to_date(model, after)?.sub(cost_to_date(model, before)?)?, None))
        }
    }
}

/// Rates one event against a price and the meter's period so far: the whole ledger
/// units to charge now and the carry to keep.
pub fn rate(
    model: &PriceModel,
    aggregation: Aggregation,
    period: &MeterPeriod,
    quantity: Quantity,
    properties: &[(String, String)],
) -> Result<(Quantity, i128, i128, Option<usize>), Rejection> {
    let quantity = match aggregation {
        Aggregation::Sum => quantity,
        Aggregation::Count => Quantity::ONE,
    };
    let (exact, dimension) = rate_exact(model, period.quantity, quantity, properties)?;
    let (amount, carry) = exact.add(Exact(period.carry))?.split_round_down();
    Ok((quantity, amount, carry, dimension))
}

/// Checks a plan's shape: limits, ascending tiers, positive package sizes, prices that
/// are not negative, one price per meter.
pub fn validate_prices(prices: &[Price]) -> Result<(), Rejection> {
    if prices.len() > PRICES_PER_PLAN_MAX {
        return Err(Rejection::TooManyItems);
    }
    for (index, price) in prices.iter().enumerate() {
        if prices[..index].iter().any(|other| other.meter == price.meter) {
            return Err(Rejection::InvalidPrice);
        }
        let non_negative = |amount: &Amount| amount.units() >= 0;
        let ok = match &price.model {
            PriceModel::PerUnit { unit_price } => non_negative(unit_price),
            PriceModel::Package { size, package_price } => size.0 > 0 && non_negative(package_price),
            PriceModel::Graduated { tiers } => {
                if tiers.len() > TIERS_MAX {
                    return Err(Rejection::TooManyItems);
                }
                let ascending = tiers.windows(2).all(|pair| match (pair[0].up_to, pair[1].up_to) {
                    (Some(a), Some(b)) => a < b,
                    (Some(_), None) => true,
                    (None, _) => false,
                });
                !tiers.is_empty()
                    && ascending
                    && tiers.last().is_some_and(|t| t.up_to.is_none())
                    && tiers.iter().all(|t| non_negative(&t.unit_price) && t.up_to.is_none_or(|q| q.0 > 0))
            }
            PriceModel::Dimensional { property, values, default } => {
                if values.len() > DIMENSION_VALUES_MAX {
                    return Err(Rejection::TooManyItems);
                }
                let names_ok = |name: &str| !name.is_empty() && name.len() <= CODE_LENGTH_MAX;
                names_ok(property)
                    && values.iter().all(|(name, price)| names_ok(name) && non_negative(price))
                    && values.iter().enumerate().all(|(i, (name, _))| values[..i].iter().all(|(n, _)| n != name))
                    && default.as_ref().is_none_or(non_negative)
            }
        };
        if !ok {
            return Err(Rejection::InvalidPrice);
        }
    }
    Ok(())
}

/// A meter code: 1 to 64 bytes of lowercase letters, digits, '_', '.', '-'.
pub fn valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= CODE_LENGTH_MAX
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let next = if month == 12 { days_from_civil(year + 1, 1, 1) } else { days_from_civil(year, month + 1, 1) };
    (next - days_from_civil(year, month, 1)) as u32
}

/// The start of period `index` of a subscription anchored at `anchor` (UTC). Monthly
/// periods keep the anchor's day of month, clamped to the month's length (Jan 31 →
/// Feb 28 → Mar 31).
pub fn period_boundary(anchor: Timestamp, period: BillingPeriod, index: u32) -> Timestamp {
    match period {
        BillingPeriod::Day => anchor.saturating_add(i64::from(index) * MS_PER_DAY),
        BillingPeriod::Week => anchor.saturating_add(i64::from(index) * 7 * MS_PER_DAY),
        BillingPeriod::Month => {
            let days = anchor.div_euclid(MS_PER_DAY);
            let time_of_day = anchor.rem_euclid(MS_PER_DAY);
            let (year, month, day) = civil_from_days(days);
            let months = i64::from(month) - 1 + i64::from(index);
            let (year, month) = (year + months.div_euclid(12), (months.rem_euclid(12) + 1) as u32);
            let day = day.min(days_in_month(year, month));
            days_from_civil(year, month, day) * MS_PER_DAY + time_of_day
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Quantity {
        Quantity::parse(text).unwrap()
    }

    fn a(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    fn charge(model: &PriceModel, before: &str, quantity: &str) -> String {
        let period = MeterPeriod { quantity: q(before), charged: 0, carry: 0 };
        let (_, amount, _, _) = rate(model, Aggregation::Sum, &period, q(quantity), &[]).unwrap();
        Amount::from_units(amount).format(0)
    }

    #[test]
    fn per_unit_seed_scenario() {
        // 1,200 tokens at 0.00002 per token cost 0.024.
        let model = PriceModel::PerUnit { unit_price: a("0.00002") };
        assert_eq!(charge(&model, "0", "1200"), "0.024");
    }

    #[test]
    fn tiny_unit_prices_carry_their_remainder() {
        let model = PriceModel::PerUnit { unit_price: a("0.000000000001") };
        let mut period = MeterPeriod::default();
        let mut total = 0;
        for _ in 0..10 {
            let (_, amount, carry, _) = rate(&model, Aggregation::Sum, &period, q("0.3"), &[]).unwrap();
            period.carry = carry;
            total += amount;
        }
        // 10 × 0.3 × 10^-12 = 3 × 10^-12: three ledger units, none lost.
        assert_eq!(total, 3);
    }

    #[test]
    fn package_rounds_up_over_the_period() {
        let model = PriceModel::Package { size: q("1000"), package_price: a("2.50") };
        assert_eq!(charge(&model, "0", "1"), "2.5");
        assert_eq!(charge(&model, "1", "999"), "0");
        assert_eq!(charge(&model, "1000", "1"), "2.5");
        assert_eq!(charge(&model, "0", "2001"), "7.5");
    }

    #[test]
    fn graduated_tier_boundaries() {
        let model = PriceModel::Graduated {
            tiers: vec![
                Tier { up_to: Some(q("100")), unit_price: a("1") },
                Tier { up_to: Some(q("1000")), unit_price: a("0.5") },
                Tier { up_to: None, unit_price: a("0.1") },
            ],
        };
        assert_eq!(charge(&model, "0", "100"), "100");
        assert_eq!(charge(&model, "99", "2"), "1.5");
        assert_eq!(charge(&model, "100", "900"), "450");
        assert_eq!(charge(&model, "999", "2"), "0.6");
        assert_eq!(charge(&model, "0", "2000"), "650");
        assert_eq!(charge(&model, "5000", "10"), "1");
    }

    #[test]
    fn dimensional_prices_and_unknown_values() {
        let model = PriceModel::Dimensional {
            property: "conversation_type".into(),
            values: vec![("marketing".into(), a("0.025")), ("service".into(), a("0.005"))],
            default: None,
        };
        let props = |v: &str| vec![("conversation_type".to_string(), v.to_string())];
        let period = MeterPeriod::default();
        let (_, amount, _, dim) = rate(&model, Aggregation::Sum, &period, q("2"), &props("marketing")).unwrap();
        assert_eq!((Amount::from_units(amount).format(0), dim), ("0.05".into(), Some(0)));
        let (_, amount, _, dim) = rate(&model, Aggregation::Sum, &period, q("2"), &props("service")).unwrap();
        assert_eq!((Amount::from_units(amount).format(0), dim), ("0.01".into(), Some(1)));
        assert_eq!(rate(&model, Aggregation::Sum, &period, q("1"), &props("other")), Err(Rejection::UnknownDimension));
        assert_eq!(rate(&model, Aggregation::Sum, &period, q("1"), &[]), Err(Rejection::UnknownDimension));
        let with_default = PriceModel::Dimensional {
            property: "model".into(),
            values: vec![("large".into(), a("0.01"))],
            default: Some(a("0.001")),
        };
        let (_, amount, _, dim) = rate(&with_default, Aggregation::Sum, &period, q("3"), &[]).unwrap();
        assert_eq!((Amount::from_units(amount).format(0), dim), ("0.003".into(), None));
    }

    #[test]
    fn counting_meters_count_events() {
        let model = PriceModel::PerUnit { unit_price: a("0.01") };
        let (quantity, amount, _, _) =
            rate(&model, Aggregation::Count, &MeterPeriod::default(), q("500"), &[]).unwrap();
        assert_eq!((quantity, amount), (Quantity::ONE, a("0.01").units()));
    }

    #[test]
    fn huge_quantities_overflow_cleanly() {
        let model = PriceModel::PerUnit { unit_price: a("1000000") };
        let huge = q("99999999999999999999");
        assert_eq!(rate(&model, Aggregation::Sum, &MeterPeriod::default(), huge, &[]), Err(Rejection::AmountOverflow));
        let tiers = PriceModel::Graduated { tiers: vec![Tier { up_to: None, unit_price: a("1000000") }] };
        let before = MeterPeriod { quantity: huge, ..MeterPeriod::default() };
        assert_eq!(rate(&tiers, Aggregation::Sum, &before, q("1"), &[]), Err(Rejection::AmountOverflow));
    }

    #[test]
    fn invalid_prices_are_refused() {
        let meter = MeterId(1);
        let bad = [
            PriceModel::PerUnit { unit_price: a("-1") },
            PriceModel::Package { size: q("0"), package_price: a("1") },
            PriceModel::Graduated { tiers: vec![] },
            PriceModel::Graduated { tiers: vec![Tier { up_to: Some(q("10")), unit_price: a("1") }] },
            PriceModel::Graduated {
                tiers: vec![
                    Tier { up_to: Some(q("10")), unit_price: a("1") },
                    Tier { up_to: Some(q("5")), unit_price: a("1") },
                    Tier { up_to: None, unit_price: a("1") },
                ],
            },
            PriceModel::Dimensional { property: "".into(), values: vec![], default: None },
        ];
        for model in bad {
            assert_eq!(
                validate_prices(&[Price { meter, model: model.clone() }]),
                Err(Rejection::InvalidPrice),
                "{model:?}"
            );
        }
        let twice = PriceModel::PerUnit { unit_price: a("1") };
        let prices = [Price { meter, model: twice.clone() }, Price { meter, model: twice }];
        assert_eq!(validate_prices(&prices), Err(Rejection::InvalidPrice));
    }

    #[test]
    fn monthly_periods_keep_the_day_and_clamp() {
        // 2026-01-31T10:00:00Z
        let anchor = days_from_civil(2026, 1, 31) * MS_PER_DAY + 10 * 3_600_000;
        let date = |t: Timestamp| civil_from_days(t.div_euclid(MS_PER_DAY));
        assert_eq!(date(period_boundary(anchor, BillingPeriod::Month, 1)), (2026, 2, 28));
        assert_eq!(date(period_boundary(anchor, BillingPeriod::Month, 2)), (2026, 3, 31));
        assert_eq!(date(period_boundary(anchor, BillingPeriod::Month, 13)), (2027, 2, 28));
        assert_eq!(period_boundary(anchor, BillingPeriod::Month, 1).rem_euclid(MS_PER_DAY), 10 * 3_600_000);
        assert_eq!(period_boundary(anchor, BillingPeriod::Week, 2) - anchor, 14 * MS_PER_DAY);
        for days in [-1000, 0, 59, 60, 10_000, 20_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }
}
