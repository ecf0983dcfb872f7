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
    #[error("quantities are plain non-negative decimals with at most 12 fractional digits")]
    InvalidQuantity,
    #[error("a price is malformed: negative, empty tiers, tiers not ascending or without an open last tier, a zero package, or a meter priced twice")]
    InvalidPrice,
    #[error("codes are 1 to 64 bytes of lowercase letters, digits, '_', '.' or '-'")]
    InvalidCode,
    #[error("the event's property value has no price and the price has no default")]
    UnknownDimension,
    #[error("no such meter in the subscription's plan")]
    UnknownMeter,
    #[error("no such meter")]
    MeterNotFound,
    #[error("the merchant already has a meter with this code")]
    MeterCodeTaken,
    #[error("no such product")]
    ProductNotFound,
    #[error("no such plan")]
    PlanNotFound,
    #[error("the plan was replaced by a newer version or archived: it takes no new subscriptions")]
    PlanSuperseded,
    #[error("no such subscription")]
    SubscriptionNotFound,
    #[error("the consumer already has a subscription to this merchant")]
    SubscriptionExists,
    #[error("the subscription is canceled")]
    SubscriptionCanceled,
    #[error("the consumer has no active subscription to this merchant")]
    NoActiveSubscription,
    #[error("the organization does not have the merchant role")]
    NotAMerchant,
    #[error("the organization does not have the consumer role")]
    NotAConsumer,
    #[error("an event with this id was already charged")]
    DuplicateEvent,
    #[error("the event's timestamp is outside the accepted window")]
    EventTooOld,
    #[error("the event's timestamp is too far in the future")]
    EventInFuture,
    #[error("the reservation belongs to another consumer or merchant")]
    ReservationMismatch,
    #[error("a payment method needs a token, a brand, four last digits and a valid expiry")]
    InvalidPaymentMethod,
    #[error("the platform does not allow this organization this type of payment method")]
    PaymentMethodTypeNotAllowed,
    #[error("the payment method is used by an auto top-up rule; change the rule first")]
    PaymentMethodInUse,
    #[error("no such payment method")]
    PaymentMethodNotFound,
    #[error("the wallet does not cover the amount: a payment method is needed for the rest")]
    PaymentMethodRequired,
    #[error("money paid through a provider must be a whole number of the currency's minor units")]
    AmountNotInMinorUnits,
    #[error("the amount is below the wallet's minimum top-up")]
    AmountBelowMinimum,
    #[error("the amount is above the wallet's maximum top-up")]
    AmountAboveMaximum,
    #[error("the organization needs billing details before paying in")]
    BillingDetailsRequired,
    #[error("no such top-up")]
    TopUpNotFound,
    #[error("no such checkout")]
    CheckoutNotFound,
    #[error("a tax profile needs a two-letter country, at most 8 taxes, each named with a rate of at most 100% and/or a positive fixed amount in whole minor units")]
    InvalidTaxProfile,
    #[error("the wallet has no enabled auto top-up rule")]
    AutoTopUpNotActive,
    #[error("an auto top-up of this wallet is already waiting for the provider")]
    AutoTopUpInFlight,
    #[error("the last auto top-up failed; the next is not due yet")]
    AutoTopUpBackingOff,
    #[error("available is not below the threshold")]
    AutoTopUpNotNeeded,
    #[error("the rule's daily limit on count or amount is reached")]
    AutoTopUpLimitReached,
    #[error("only a succeeded top-up, or a charge or checkout, can be refunded")]
    NotRefundable,
    #[error("the refund is larger than what is left to refund")]
    RefundExceedsPayment,
    #[error("no such refund")]
    RefundNotFound,
    #[error("the merchant's available balance does not cover the refund")]
    MerchantInsufficientFunds,
    #[error("a bank account needs a two-letter country, a holder name, and a valid account number")]
    InvalidBankAccount,
    #[error("no such bank account")]
    BankAccountNotFound,
    #[error("a payout schedule uses this bank account; change the schedule first")]
    BankAccountInUse,
    #[error("the bank account is not verified")]
    BankAccountNotVerified,
    #[error("the organization is not verified: only verified organizations are paid out")]
    OrganizationNotVerified,
    #[error("no such payout")]
    PayoutNotFound,
    #[error("the total with taxes differs from the one reviewed (the taxes changed): quote again")]
    TotalChanged,
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
            InvalidQuantity => "invalid_quantity",
            InvalidPrice => "invalid_price",
            InvalidCode => "invalid_code",
            UnknownDimension => "unknown_dimension",
            UnknownMeter => "unknown_meter",
            MeterNotFound => "meter_not_found",
            MeterCodeTaken => "meter_code_taken",
            ProductNotFound => "product_not_found",
            PlanNotFound => "plan_not_found",
            PlanSuperseded => "plan_superseded",
            SubscriptionNotFound => "subscription_not_found",
            SubscriptionExists => "subscription_exists",
            SubscriptionCanceled => "subscription_canceled",
            NoActiveSubscription => "no_active_subscription",
            NotAMerchant => "not_a_merchant",
            NotAConsumer => "not_a_consumer",
            DuplicateEvent => "duplicate_event",
            EventTooOld => "event_too_old",
            EventInFuture => "event_in_future",
            ReservationMismatch => "reservation_mismatch",
            InvalidPaymentMethod => "invalid_payment_method",
            PaymentMethodTypeNotAllowed => "payment_method_type_not_allowed",
            PaymentMethodInUse => "payment_method_in_use",
            PaymentMethodNotFound => "payment_method_not_found",
            PaymentMethodRequired => "payment_method_required",
            AmountNotInMinorUnits => "amount_not_in_minor_units",
            AmountBelowMinimum => "amount_below_minimum",
            AmountAboveMaximum => "amount_above_maximum",
            BillingDetailsRequired => "billing_details_required",
            TopUpNotFound => "top_up_not_found",
            CheckoutNotFound => "checkout_not_found",
            InvalidTaxProfile => "invalid_tax_profile",
            AutoTopUpNotActive => "auto_top_up_not_active",
            AutoTopUpInFlight => "auto_top_up_in_flight",
            AutoTopUpBackingOff => "auto_top_up_backing_off",
            AutoTopUpNotNeeded => "auto_top_up_not_needed",
            AutoTopUpLimitReached => "auto_top_up_limit_reached",
            NotRefundable => "not_refundable",
            RefundExceedsPayment => "refund_exceeds_payment",
            RefundNotFound => "refund_not_found",
            MerchantInsufficientFunds => "merchant_insufficient_funds",
            InvalidBankAccount => "invalid_bank_account",
            BankAccountNotFound => "bank_account_not_found",
            BankAccountInUse => "bank_account_in_use",
            BankAccountNotVerified => "bank_account_not_verified",
            OrganizationNotVerified => "organization_not_verified",
            PayoutNotFound => "payout_not_found",
            TotalChanged => "total_changed",
        }
    }

    /// The rejection's position in [`Rejection::ALL`] (for metrics).
    pub fn index(self) -> usize {
        self as usize
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
        Rejection::InvalidQuantity,
        Rejection::InvalidPrice,
        Rejection::InvalidCode,
        Rejection::UnknownDimension,
        Rejection::UnknownMeter,
        Rejection::MeterNotFound,
        Rejection::MeterCodeTaken,
        Rejection::ProductNotFound,
        Rejection::PlanNotFound,
        Rejection::PlanSuperseded,
        Rejection::SubscriptionNotFound,
        Rejection::SubscriptionExists,
        Rejection::SubscriptionCanceled,
        Rejection::NoActiveSubscription,
        Rejection::NotAMerchant,
        Rejection::NotAConsumer,
        Rejection::DuplicateEvent,
        Rejection::EventTooOld,
        Rejection::EventInFuture,
        Rejection::ReservationMismatch,
        Rejection::InvalidPaymentMethod,
        Rejection::PaymentMethodTypeNotAllowed,
        Rejection::PaymentMethodInUse,
        Rejection::PaymentMethodNotFound,
        Rejection::PaymentMethodRequired,
        Rejection::AmountNotInMinorUnits,
        Rejection::AmountBelowMinimum,
        Rejection::AmountAboveMaximum,
        Rejection::BillingDetailsRequired,
        Rejection::TopUpNotFound,
        Rejection::CheckoutNotFound,
        Rejection::InvalidTaxProfile,
        Rejection::AutoTopUpNotActive,
        Rejection::AutoTopUpInFlight,
        Rejection::AutoTopUpBackingOff,
        Rejection::AutoTopUpNotNeeded,
        Rejection::AutoTopUpLimitReached,
        Rejection::NotRefundable,
        Rejection::RefundExceedsPayment,
        Rejection::RefundNotFound,
        Rejection::MerchantInsufficientFunds,
        Rejection::InvalidBankAccount,
        Rejection::BankAccountNotFound,
        Rejection::BankAccountInUse,
        Rejection::BankAccountNotVerified,
        Rejection::OrganizationNotVerified,
        Rejection::PayoutNotFound,
        Rejection::TotalChanged,
    ];
}

impl From<crate::money::MoneyError> for Rejection {
    fn from(_: crate::money::MoneyError) -> Rejection {
        Rejection::AmountOverflow
    }
}
