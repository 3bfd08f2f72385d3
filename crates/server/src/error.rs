//! Errors as HTTP responses: a clear message for what the caller can fix, and a generic
//! one for internal failures, whose cause is logged once here and never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::triage::BackendError;

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed; the message says how.
    BadRequest(String),
    /// No such thing.
    NotFound(String),
    /// Authenticated, but not allowed.
    Forbidden(String),
    /// A body that is not declared as JSON.
    UnsupportedMediaType(String),
    /// JSON of the wrong shape.
    Unprocessable(String),
    /// A body over the limit.
    TooLarge(String),
    /// The request does not fit the thing's current state (a job already done).
    Conflict(String),
    /// The backend failed.
    Internal(BackendError),
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        Self::Internal(e)
    }
}

impl ApiError {
    /// The status and the message safe to show.
    #[must_use]
    pub fn parts(&self) -> (StatusCode, String) {
        match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m.clone()),
            Self::UnsupportedMediaType(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, m.clone()),
            Self::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, m.clone()),
            Self::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
            Self::Conflict(m) => (StatusCode::CONFLICT, m.clone()),
            Self::Internal(e) => {
                tracing::error!(error = %e, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error: the backend failed; see the server log".to_owned(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = self.parts();
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}
