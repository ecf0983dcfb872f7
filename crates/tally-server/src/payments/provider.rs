//! Payment providers behind one trait. Amounts cross this boundary in whole minor units
//! of the currency; every call that creates something carries an idempotency key, so a
//! retry after a timeout or a crash finds the first attempt instead of paying twice.

use futures::future::BoxFuture;
use tally_ledger::payments::MethodDetails;

/// A payment to authorize: `idempotency_key` is Tally's id of the top-up or checkout.
#[derive(Clone, Debug)]
pub struct PaymentRequest {
    pub idempotency_key: String,
    pub amount_minor: i64,
    /// ISO 4217, upper case.
    pub currency: String,
    pub method_token: String,
    pub description: String,
}

/// Where a payment stands at the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentState {
    /// Waiting for a confirmation that arrives later (3-D Secure, a slow bank).
    Pending,
    Authorized,
    Captured,
    Canceled,
    Failed {
        code: String,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderPayment {
    /// The provider's id of the payment.
    pub reference: String,
    pub idempotency_key: String,
    pub amount_minor: i64,
    pub state: PaymentState,
    pub refunded_minor: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider could not be reached or answered with a server error: the outcome
    /// is unknown, so the same request is retried later under the same key.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (an unknown token, a refund beyond the payment).
    #[error("payment provider refused the request: {code}: {message}")]
    Invalid { code: String, message: String },
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// A payment provider. Implementations must be idempotent per key: `authorize` twice
/// with one key is one payment.
pub trait PaymentProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// What may be shown of a payment method token (brand, last four, expiry).
    fn describe_method<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ProviderResult<MethodDetails>>;
    fn authorize<'a>(&'a self, request: &'a PaymentRequest) -> BoxFuture<'a, ProviderResult<ProviderPayment>>;
    fn capture<'a>(&'a self, reference: &'a str, amount_minor: i64) -> BoxFuture<'a, ProviderResult<ProviderPayment>>;
    fn cancel<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, ProviderResult<ProviderPayment>>;
    fn refund<'a>(
        &'a self,
        reference: &'a str,
        amount_minor: i64,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, ProviderResult<ProviderPayment>>;
    /// The payment made under an idempotency key, if any.
    fn lookup<'a>(&'a self, idempotency_key: &'a str) -> BoxFuture<'a, ProviderResult<Option<ProviderPayment>>>;
}
