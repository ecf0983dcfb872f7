//! API errors as `application/problem+json`, with one table from code to HTTP status.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tally_engine::EngineError;
use tally_ledger::Rejection;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: &'static str,
    pub detail: String,
    pub field: Option<String>,
    /// For `not_leader`: where the leader is.
    pub leader: Option<String>,
}

impl ApiError {
    pub fn new(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError { code, detail: detail.into(), field: None, leader: None }
    }

    pub fn field(code: &'static str, field: &str, detail: impl Into<String>) -> ApiError {
        ApiError { code, detail: detail.into(), field: Some(field.to_string()), leader: None }
    }

    pub fn not_found() -> ApiError {
        ApiError::new("not_found", "no such resource, or not yours")
    }

    pub fn invalid(field: &str, detail: impl Into<String>) -> ApiError {
        ApiError::field("invalid_request", field, detail)
    }
}

/// The shape of every error answer, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    /// A link to the code's documentation.
    r#type: String,
    /// The code again, as a title.
    title: String,
    status: u16,
    /// The stable snake_case code, for example `insufficient_funds`.
    code: String,
    /// A human sentence.
    detail: String,
    /// The request field at fault, where there is one.
    field: Option<String>,
    /// On `not_leader` (a standby): the leader's address, to send the request there.
    leader: Option<String>,
}

/// The one table from error code to HTTP status. Every code a client can see is here.
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "invalid_request"
        | "invalid_amount"
        | "unknown_currency"
        | "idempotency_key_required"
        | "text_length_out_of_range"
        | "too_many_items"
        | "invalid_billing_details"
        | "hold_ttl_out_of_range"
        | "grant_expiry_in_past"
        | "amount_must_be_positive"
        | "amount_overflow"
        | "fee_exceeds_amount"
        | "same_wallet"
        | "invalid_setting"
        | "invalid_quantity"
        | "invalid_url"
        | "invalid_price"
        | "invalid_code"
        | "event_too_old"
        | "event_in_future"
        | "invalid_payment_method"
        | "invalid_tax_profile"
        | "card_number_not_accepted"
        | "invalid_signature"
        | "invalid_bank_account"
        | "amount_not_in_minor_units"
        | "amount_below_minimum"
        | "amount_above_maximum"
        | "payment_method_required" => StatusCode::BAD_REQUEST,
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "not_found"
        | "wallet_not_found"
        | "hold_not_found"
        | "grant_not_found"
        | "organization_not_found"
        | "meter_not_found"
        | "product_not_found"
        | "plan_not_found"
        | "subscription_not_found"
        | "payment_method_not_found"
        | "top_up_not_found"
        | "checkout_not_found"
        | "refund_not_found"
        | "bank_account_not_found"
        | "payout_not_found" => StatusCode::NOT_FOUND,
        "idempotency_key_in_use"
        | "wallet_already_exists"
        | "meter_code_taken"
        | "subscription_exists"
        | "duplicate_event"
        | "total_changed" => StatusCode::CONFLICT,
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unsupported_media_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "insufficient_funds"
        | "currency_mismatch"
        | "wallet_frozen"
        | "wallet_closed"
        | "wallet_not_empty"
        | "wallet_on_hold"
        | "hold_already_resolved"
        | "capture_exceeds_hold"
        | "capture_payee_mismatch"
        | "grant_not_active"
        | "idempotency_key_mismatch"
        | "invalid_status_change"
        | "unknown_dimension"
        | "unknown_meter"
        | "plan_superseded"
        | "subscription_canceled"
        | "no_active_subscription"
        | "not_a_merchant"
        | "not_a_consumer"
        | "reservation_mismatch"
        | "billing_details_required"
        | "payment_method_type_not_allowed"
        | "payment_method_in_use"
        | "payment_declined"
        | "auto_top_up_not_active"
        | "auto_top_up_in_flight"
        | "auto_top_up_backing_off"
        | "auto_top_up_not_needed"
        | "auto_top_up_limit_reached"
        | "not_refundable"
        | "refund_exceeds_payment"
        | "merchant_insufficient_funds"
        | "bank_account_in_use"
        | "bank_account_not_verified"
        | "organization_not_verified" => StatusCode::UNPROCESSABLE_ENTITY,
        "provider_unavailable" => StatusCode::BAD_GATEWAY,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "busy" | "not_ready" | "shutting_down" | "not_leader" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        ApiError::new(rejection.code(), rejection.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Rejected(rejection) => rejection.into(),
            EngineError::Busy => ApiError::new("busy", "the ledger is at capacity; retry shortly"),
            EngineError::ShuttingDown => ApiError::new("shutting_down", "the server is shutting down"),
            EngineError::NotLeader { leader } => {
                ApiError { leader, ..ApiError::new("not_leader", "this node is a standby; send writes to the leader") }
            }
            EngineError::Storage(detail) => {
                tracing::error!(%detail, "storage error answered as 503");
                ApiError::new("not_ready", "storage is unavailable; nothing was applied, retry shortly")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.code);
        let mut body = serde_json::json!({
            "type": format!("https://docs.tally.dev/errors#{}", self.code),
            "title": self.code,
            "status": status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        if let Some(leader) = self.leader {
            body["leader"] = leader.into();
        }
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, "application/problem+json".parse().expect("valid header"));
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, "1".parse().expect("valid header"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ledger_rejection_has_a_client_error_status() {
        for rejection in Rejection::ALL {
            let status = status_of(rejection.code());
            assert!(status.is_client_error(), "{} maps to {status}", rejection.code());
        }
    }
}
