//! Exact money: amounts as i128 ledger units, the ISO 4217 currency registry, decimal
//! parsing and formatting, and the only places where rounding happens.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Digits after the decimal point that the ledger keeps. Twelve digits hold every unit
/// price the catalog accepts exactly (prices have at most 12 fractional digits), and
/// i128 still leaves about 1.7e26 major units of headroom.
pub const LEDGER_SCALE: u32 = 12;
/// Ledger units in one major unit of any currency (10^LEDGER_SCALE).
pub const UNITS_PER_MAJOR: i128 = 1_000_000_000_000;
/// Longest decimal string accepted, so parsing cannot be made to do unbounded work.
pub const DECIMAL_LENGTH_MAX: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency code {0:?}; use an ISO 4217 code such as USD")]
    UnknownCurrency(String),
    #[error("{0:?} is not a decimal amount (digits, an optional '-', an optional '.' and up to 12 fractional digits)")]
    InvalidDecimal(String),
    #[error("{0:?} has more than {LEDGER_SCALE} fractional digits")]
    TooPrecise(String),
    #[error("amount is out of range")]
    Overflow,
}

/// An ISO 4217 currency: its three-letter code and minor-unit exponent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

/// The registry: active ISO 4217 codes with their minor-unit exponents, sorted by code.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    ("ANG", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHF", 2),
    ("CLF", 4),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYI", 0),
    ("UYU", 2),
    ("UYW", 4),
    ("UZS", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
];

impl Currency {
    /// Looks a code up in the registry; codes are upper-case three-letter ISO 4217 codes.
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        let index = CURRENCIES
            .binary_search_by(|(candidate, _)| candidate.cmp(&code))
            .map_err(|_| MoneyError::UnknownCurrency(code.chars().take(16).collect()))?;
        let (found, exponent) = CURRENCIES[index];
        let bytes = found.as_bytes();
        Ok(Currency { code: [bytes[0], bytes[1], bytes[2]], exponent })
    }

    pub fn code(&self) -> &str {
        // The code bytes always come from the registry, which holds ASCII only.
        std::str::from_utf8(&self.code).expect("currency codes are ASCII")
    }

    /// Digits of the currency's minor unit (2 for USD, 0 for JPY, 3 for KWD).
    pub fn minor_unit_exponent(&self) -> u32 {
        u32::from(self.exponent)
    }

    /// Ledger units in one minor unit of this currency.
    pub fn units_per_minor(&self) -> i128 {
        10i128.pow(LEDGER_SCALE - self.minor_unit_exponent())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An exact amount in ledger units (10^-12 of a major unit). It carries no currency:
/// the wallet or the [`Money`] around it does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Amount(i128);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub const fn from_units(units: i128) -> Amount {
        Amount(units)
    }

    pub const fn units(self) -> i128 {
        self.0
    }

    /// Whole major units, for tests and fixtures.
    pub fn from_major(major: i64) -> Amount {
        Amount(i128::from(major) * UNITS_PER_MAJOR)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn checked_add(self, other: Amount) -> Result<Amount, MoneyError> {
        self.0.checked_add(other.0).map(Amount).ok_or(MoneyError::Overflow)
    }

    pub fn checked_sub(self, other: Amount) -> Result<Amount, MoneyError> {
        self.0.checked_sub(other.0).map(Amount).ok_or(MoneyError::Overflow)
    }

    /// Parses a plain decimal string ("12", "-0.5", "0.000000000001"). Exponents, signs
    /// other than a leading '-', spaces, "NaN" and more than 12 fractional digits are refused.
    pub fn parse(text: &str) -> Result<Amount, MoneyError> {
        let invalid = || MoneyError::InvalidDecimal(text.chars().take(DECIMAL_LENGTH_MAX).collect());
        if text.is_empty() || text.len() > DECIMAL_LENGTH_MAX {
            return Err(invalid());
        }
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = match digits.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (digits, None),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let fraction = fraction.unwrap_or("");
        if digits.contains('.') && fraction.is_empty() {
            return Err(invalid());
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        if fraction.len() > LEDGER_SCALE as usize {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let mut units: i128 = 0;
        for b in whole.bytes() {
            units =
                units.checked_mul(10).and_then(|u| u.checked_add(i128::from(b - b'0'))).ok_or(MoneyError::Overflow)?;
        }
        units = units.checked_mul(UNITS_PER_MAJOR).ok_or(MoneyError::Overflow)?;
        let mut fraction_units: i128 = 0;
        for b in fraction.bytes() {
            fraction_units = fraction_units * 10 + i128::from(b - b'0');
        }
        fraction_units *= 10i128.pow(LEDGER_SCALE - fraction.len() as u32);
        units = units.checked_add(fraction_units).ok_or(MoneyError::Overflow)?;
        Ok(Amount(if negative { -units } else { units }))
    }

    /// Formats with at least `fraction_digits_min` fractional digits and no trailing
    /// zeros beyond them, so "50.00" stays "50.00" and a charge of 0.024 stays "0.024".
    pub fn format(self, fraction_digits_min: u32) -> String {
        // Digits written by hand into one string: every answer formats several amounts,
        // and `format!` with u128 arithmetic was 5 % of the server's time on usage batches.
        let magnitude = self.0.unsigned_abs();
        let scale = UNITS_PER_MAJOR.unsigned_abs();
        let mut whole = magnitude / scale;
        let mut fraction = (magnitude % scale) as u64;
        let mut fraction_digits = [b'0'; LEDGER_SCALE as usize];
        for slot in fraction_digits.iter_mut().rev() {
            *slot = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        let keep = fraction_digits_min.min(LEDGER_SCALE) as usize;
        let mut kept = fraction_digits.len();
        while kept > keep && fraction_digits[kept - 1] == b'0' {
            kept -= 1;
        }
        // u128::MAX has 39 digits.
        let mut whole_digits = [0u8; 40];
        let mut start = whole_digits.len();
        loop {
            start -= 1;
            whole_digits[start] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        let mut text = String::with_capacity(2 + whole_digits.len() - start + kept);
        if self.0 < 0 {
            text.push('-');
        }
        // Both buffers hold ASCII digits only.
        text.push_str(std::str::from_utf8(&whole_digits[start..]).expect("ASCII digits"));
        if kept > 0 {
            text.push('.');
            text.push_str(std::str::from_utf8(&fraction_digits[..kept]).expect("ASCII digits"));
        }
        text
    }

    /// Whether the amount is a whole number of the currency's minor units, as payment
    /// providers and banks require.
    pub fn is_whole_minor_units(self, currency: Currency) -> bool {
        self.0 % currency.units_per_minor() == 0
    }

    /// The amount as a count of minor units, if it is whole.
    pub fn to_minor_units(self, currency: Currency) -> Option<i128> {
        self.is_whole_minor_units(currency).then(|| self.0 / currency.units_per_minor())
    }

    pub fn from_minor_units(minor: i128, currency: Currency) -> Result<Amount, MoneyError> {
        minor.checked_mul(currency.units_per_minor()).map(Amount).ok_or(MoneyError::Overflow)
    }

    /// Rounds to the currency's minor unit, ties to even (banker's rounding).
    pub fn round_to_minor_unit_half_even(self, currency: Currency) -> Amount {
        Amount(divide_round_half_even(self.0, currency.units_per_minor()) * currency.units_per_minor())
    }

    /// Rounds up (away from zero for positive amounts) to the currency's minor unit.
    pub fn round_to_minor_unit_up(self, currency: Currency) -> Amount {
        let step = currency.units_per_minor();
        Amount(self.0.div_euclid(step) * step + if self.0.rem_euclid(step) == 0 { 0 } else { step })
    }

    /// Multiplies by a rate in parts per million and rounds down to ledger precision.
    /// Used for platform fees: the fee never exceeds the exact product.
    pub fn times_parts_per_million_round_down(self, rate: PartsPerMillion) -> Result<Amount, MoneyError> {
        let product = self.0.checked_mul(i128::from(rate.0)).ok_or(MoneyError::Overflow)?;
        // 128-bit division is slow; most products fit in 64 bits and divide natively.
        if let Ok(small) = i64::try_from(product) {
            return Ok(Amount(i128::from(small.div_euclid(1_000_000))));
        }
        Ok(Amount(product.div_euclid(1_000_000)))
    }
}

/// Divides and rounds the quotient half to even. `divisor` must be positive.
pub fn divide_round_half_even(numerator: i128, divisor: i128) -> i128 {
    assert!(divisor > 0, "rounding divisor must be positive");
    let quotient = numerator.div_euclid(divisor);
    let remainder = numerator.rem_euclid(divisor);
    let twice = remainder * 2;
    if twice > divisor || (twice == divisor && quotient % 2 != 0) {
        quotient + 1
    } else {
        quotient
    }
}

/// Rounds a value held with `extra_digits` more fractional digits than the ledger keeps
/// to ledger precision, ties to even. Rating computes with extra digits and then calls this.
pub fn round_to_ledger_half_even(value: i128, extra_digits: u32) -> Amount {
    Amount(divide_round_half_even(value, 10i128.pow(extra_digits)))
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format(0))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format(0))
    }
}

/// A rate in parts per million (20_000 = 2%). Bounded to 0..=1_000_000 when parsed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct PartsPerMillion(pub u32);

impl PartsPerMillion {
    pub const MAX: u32 = 1_000_000;
}

/// An amount together with its currency, as it crosses the edge of the ledger.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Money {
    pub amount: Amount,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount: Amount, currency: Currency) -> Money {
        Money { amount, currency }
    }

    /// Parses "12.34" and "USD" into money, both checked.
    pub fn parse(amount: &str, currency: &str) -> Result<Money, MoneyError> {
        Ok(Money { amount: Amount::parse(amount)?, currency: Currency::parse(currency)? })
    }

    /// The amount with at least the currency's minor-unit digits.
    pub fn format_amount(&self) -> String {
        self.amount.format(self.currency.minor_unit_exponent())
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.format_amount(), self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward formatting the hand-written one replaced.
    fn format_reference(amount: Amount, fraction_digits_min: u32) -> String {
        let magnitude = amount.0.unsigned_abs();
        let scale = UNITS_PER_MAJOR.unsigned_abs();
        let mut fraction_text = format!("{:012}", magnitude % scale);
        while fraction_text.len() > fraction_digits_min.min(LEDGER_SCALE) as usize && fraction_text.ends_with('0') {
            fraction_text.pop();
        }
        let sign = if amount.0 < 0 { "-" } else { "" };
        let whole = magnitude / scale;
        if fraction_text.is_empty() {
            format!("{sign}{whole}")
        } else {
            format!("{sign}{whole}.{fraction_text}")
        }
    }

    proptest::proptest! {
        #[test]
        fn format_writes_what_the_straightforward_formatting_writes(
            units in proptest::prelude::any::<i128>(),
            small in -10_000_000_000_000_000i128..10_000_000_000_000_000,
            minimum in 0u32..15,
        ) {
            for amount in [Amount::from_units(units), Amount::from_units(small)] {
                proptest::prop_assert_eq!(amount.format(minimum), format_reference(amount, minimum));
            }
        }
    }

    #[test]
    fn format_edges() {
        assert_eq!(Amount::from_units(0).format(0), "0");
        assert_eq!(Amount::from_units(0).format(2), "0.00");
        assert_eq!(Amount::from_units(-1).format(2), "-0.000000000001");
        assert_eq!(Amount::from_units(50 * UNITS_PER_MAJOR).format(2), "50.00");
        assert_eq!(Amount::from_units(i128::MIN).format(0), format_reference(Amount::from_units(i128::MIN), 0));
    }

    #[test]
    fn registry_is_sorted_and_unique() {
        for pair in CURRENCIES.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
    }

    #[test]
    fn currency_lookup() {
        assert_eq!(Currency::parse("USD").unwrap().minor_unit_exponent(), 2);
        assert_eq!(Currency::parse("JPY").unwrap().minor_unit_exponent(), 0);
        assert_eq!(Currency::parse("KWD").unwrap().minor_unit_exponent(), 3);
        for bad in ["usd", "XXX", "", "USDD", "US"] {
            assert!(matches!(Currency::parse(bad), Err(MoneyError::UnknownCurrency(_))), "{bad}");
        }
    }

    #[test]
    fn parse_accepts_plain_decimals() {
        let cases = [
            ("0", 0),
            ("12", 12 * UNITS_PER_MAJOR),
            ("12.34", 12_340_000_000_000),
            ("-0.5", -500_000_000_000),
            ("0.000000000001", 1),
            ("0.024", 24_000_000_000),
        ];
        for (text, units) in cases {
            assert_eq!(Amount::parse(text).unwrap().units(), units, "{text}");
        }
    }

    #[test]
    fn parse_refuses_everything_else() {
        for bad in ["", "1e3", "NaN", "+5", " 5", "5 ", "1.", ".5", "1.2.3", "--1", "0x10", "1,5", "inf", "١"] {
            assert!(matches!(Amount::parse(bad), Err(MoneyError::InvalidDecimal(_))), "{bad:?}");
        }
        assert!(matches!(Amount::parse("0.1234567891234"), Err(MoneyError::TooPrecise(_))));
        assert!(matches!(Amount::parse("999999999999999999999999999999999"), Err(MoneyError::Overflow)));
        assert!(Amount::parse(&"1".repeat(DECIMAL_LENGTH_MAX + 1)).is_err());
    }

    #[test]
    fn format_round_trips() {
        let usd = Currency::parse("USD").unwrap();
        for text in ["50.00", "0.024", "-3.10", "1234567.000000000001"] {
            let money = Money::parse(text, "USD").unwrap();
            assert_eq!(money.format_amount(), text);
        }
        assert_eq!(Money::new(Amount::from_major(5), usd).to_string(), "5.00 USD");
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money::new(Amount::from_major(5), jpy).format_amount(), "5");
    }

    #[test]
    fn checked_arithmetic_never_wraps() {
        let max = Amount::from_units(i128::MAX);
        assert_eq!(max.checked_add(Amount::from_units(1)), Err(MoneyError::Overflow));
        let min = Amount::from_units(i128::MIN);
        assert_eq!(min.checked_sub(Amount::from_units(1)), Err(MoneyError::Overflow));
        assert_eq!(max.times_parts_per_million_round_down(PartsPerMillion(2)), Err(MoneyError::Overflow));
    }

    #[test]
    fn rounding_is_named_and_exact() {
        let usd = Currency::parse("USD").unwrap();
        let round = |t: &str| Amount::parse(t).unwrap().round_to_minor_unit_half_even(usd).format(2);
        assert_eq!(round("0.125"), "0.12");
        assert_eq!(round("0.135"), "0.14");
        assert_eq!(round("0.1251"), "0.13");
        assert_eq!(round("-0.125"), "-0.12");
        let up = |t: &str| Amount::parse(t).unwrap().round_to_minor_unit_up(usd).format(2);
        assert_eq!(up("0.001"), "0.01");
        assert_eq!(up("0.01"), "0.01");
        assert_eq!(round_to_ledger_half_even(15, 1), Amount::from_units(2));
        assert_eq!(round_to_ledger_half_even(25, 1), Amount::from_units(2));
        assert_eq!(round_to_ledger_half_even(26, 1), Amount::from_units(3));
        let fee = Amount::parse("0.024").unwrap().times_parts_per_million_round_down(PartsPerMillion(25_000)).unwrap();
        assert_eq!(fee.format(2), "0.0006");
        assert!(Amount::parse("999.99").unwrap().is_whole_minor_units(usd));
        assert!(!Amount::parse("0.024").unwrap().is_whole_minor_units(usd));
        assert_eq!(Amount::parse("999.99").unwrap().to_minor_units(usd), Some(99_999));
    }
}
