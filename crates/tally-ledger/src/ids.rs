//! Typed identifiers. The core hands out dense u64 ids in order, so they are
//! deterministic; the HTTP edge shows them as opaque prefixed strings.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// Parses the prefixed form ("wal_42"), refusing other prefixes.
            pub fn parse(text: &str) -> Option<$name> {
                let digits = text.strip_prefix($prefix)?.strip_prefix('_')?;
                if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                digits.parse().ok().filter(|n| *n > 0).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0)
            }
        }
    };
}

id_type!(OrganizationId, "org");
id_type!(WalletId, "wal");
id_type!(GrantId, "grt");
id_type!(HoldId, "hld");
id_type!(OperationId, "op");
id_type!(ProductId, "prd");
id_type!(MeterId, "mtr");
id_type!(PlanId, "pln");
id_type!(SubscriptionId, "sub");
id_type!(PaymentMethodId, "pm");
id_type!(TopUpId, "top");
id_type!(CheckoutId, "chk");
id_type!(RefundId, "ref");
id_type!(BankAccountId, "ba");
id_type!(PayoutId, "po");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_ids_round_trip() {
        assert_eq!(WalletId(42).to_string(), "wal_42");
        assert_eq!(WalletId::parse("wal_42"), Some(WalletId(42)));
        for bad in ["wal42", "hld_42", "wal_", "wal_0", "wal_-1", "wal_4a", "wal_99999999999999999999999"] {
            assert_eq!(WalletId::parse(bad), None, "{bad}");
        }
    }
}
