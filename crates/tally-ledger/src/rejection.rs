//! Why the ledger refused a command. Rejections are data: one enum of stable snake_case
//! codes, each with a human sentence. A rejected command changes nothing.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("the wallet's available balance does not cover this amount")]
    InsufficientFunds,
    #[error("the amount's currency differs from the wallet's currency")]
    CurrencyMismatch,
    #[error("the wallet is frozen: no debits or holds until it is unfrozen")]
    WalletFrozen,
    #[error("the wallet is closed: it takes no movements")]
    WalletClosed,
    #[error("no such wallet")]
    WalletNotFound,
    #[error("the organization already has a wallet in this currency")]
    WalletAlreadyExists,
    #[error("only an empty wallet with no active holds or grants can be closed")]
    WalletNotEmpty,
    #[error("an exclusive hold is active on this wallet")]
    WalletOnHold,
    #[error("no such organization")]
    OrganizationNotFound,
    #[error("no such hold")]
    HoldNotFound,
    #[error("the hold was already captured, released or expired")]
    HoldAlreadyResolved,
    #[error("the capture is larger than the hold")]
    CaptureExceedsHold,
    #[error("the hold is reserved for a different payee")]
    CapturePayeeMismatch,
    #[error("the hold's time-to-live is outside the allowed range")]
    HoldTtlOutOfRange,
    #[error("no such grant")]
    GrantNotFound,
    #[error("the grant has nothing left to void")]
    GrantNotActive,
    #[error("the grant's expiry is not in the future")]
    GrantExpiryInPast,
    #[error("amounts must be positive")]
    AmountMustBePositive,
    #[error("the amount is out of range")]
    AmountOverflow,
    #[error("the platform fee is larger than the amount")]
    FeeExceedsAmount,
    #[error("a transfer needs two different wallets")]
    SameWallet,
    #[error("this idempotency key was used for a different request")]
    IdempotencyKeyMismatch,
    #[error("a text field is empty or longer than its limit")]
    TextLengthOutOfRange,
    #[error("a list is longer than its limit")]
    TooManyItems,
    #[error("the wallet's status does not allow this change")]
    InvalidStatusChange,
    #[error("a ledger setting is outside its allowed range")]
    InvalidSetting,
    #[error("billing details need a legal name, an email, a two-letter country code, and fields of at most 255 bytes")]
    InvalidBillingDetails,
}

impl Rejection {
    /// The stable snake_case code, as clients see it.
    pub fn code(self) -> &'static str {
        use Rejection::*;
        match self {
            InsufficientFunds => "insufficient_funds",
            CurrencyMismatch => "currency_mismatch",
            WalletFrozen => "wallet_frozen",
            WalletClosed => "wallet_closed",
            WalletNotFound => "wallet_not_found",
            WalletAlreadyExists => "wallet_already_exists",
            WalletNotEmpty => "wallet_not_empty",
            WalletOnHold => "wallet_on_hold",
            OrganizationNotFound => "organization_not_found",
            HoldNotFound => "hold_not_found",
            HoldAlreadyResolved => "hold_already_resolved",
            CaptureExceedsHold => "capture_exceeds_hold",
            CapturePayeeMismatch => "capture_payee_mismatch",
            HoldTtlOutOfRange => "hold_ttl_out_of_range",
            GrantNotFound => "grant_not_found",
            GrantNotActive => "grant_not_active",
            GrantExpiryInPast => "grant_expiry_in_past",
            AmountMustBePositive => "amount_must_be_positive",
            AmountOverflow => "amount_overflow",
            FeeExceedsAmount => "fee_exceeds_amount",
            SameWallet => "same_wallet",
            IdempotencyKeyMismatch => "idempotency_key_mismatch",
            TextLengthOutOfRange => "text_length_out_of_range",
            TooManyItems => "too_many_items",
            InvalidStatusChange => "invalid_status_change",
            InvalidSetting => "invalid_setting",
            InvalidBillingDetails => "invalid_billing_details",
        }
    }

    /// Every rejection, for tables and tests that must cover them all.
    pub const ALL: &'static [Rejection] = &[
        Rejection::InsufficientFunds,
        Rejection::CurrencyMismatch,
        Rejection::WalletFrozen,
        Rejection::WalletClosed,
        Rejection::WalletNotFound,
        Rejection::WalletAlreadyExists,
        Rejection::WalletNotEmpty,
        Rejection::WalletOnHold,
        Rejection::OrganizationNotFound,
        Rejection::HoldNotFound,
        Rejection::HoldAlreadyResolved,
        Rejection::CaptureExceedsHold,
        Rejection::CapturePayeeMismatch,
        Rejection::HoldTtlOutOfRange,
        Rejection::GrantNotFound,
        Rejection::GrantNotActive,
        Rejection::GrantExpiryInPast,
        Rejection::AmountMustBePositive,
        Rejection::AmountOverflow,
        Rejection::FeeExceedsAmount,
        Rejection::SameWallet,
        Rejection::IdempotencyKeyMismatch,
        Rejection::TextLengthOutOfRange,
        Rejection::TooManyItems,
        Rejection::InvalidStatusChange,
        Rejection::InvalidSetting,
        Rejection::InvalidBillingDetails,
    ];
}

impl From<crate::money::MoneyError> for Rejection {
    fn from(_: crate::money::MoneyError) -> Rejection {
        Rejection::AmountOverflow
    }
}
