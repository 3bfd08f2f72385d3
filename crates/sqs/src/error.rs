//! SQS backend errors, each saying what was being done.

use redrive_core::{StoreError, TransportError};

/// An SQS backend error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SqsError {
    /// The `--broker` URL or a queue's settings are wrong.
    #[error("{0}")]
    Config(String),
    /// SQS did not answer at start, or refused the credentials.
    #[error("SQS at {address} is unreachable: {reason}")]
    Unreachable {
        /// The endpoint or region (never credentials).
        address: String,
        /// Why.
        reason: String,
    },
    /// An SQS call failed.
    #[error("SQS: {context}: {reason}")]
    Call {
        /// What was being done.
        context: String,
        /// Why, with the service's error code when it gave one.
        reason: String,
        /// The service's error code (`ReceiptHandleIsInvalid`, …), if any.
        code: Option<String>,
    },
}

impl SqsError {
    /// A failed step that the service did not report (no error code).
    pub(crate) fn call(context: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Call {
            context: context.into(),
            reason: reason.to_string(),
            code: None,
        }
    }

    /// The service's error code, when the failure is one the service reported.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Call { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// `map_err` helper for SDK calls: `.map_err(during("send to the DLQ"))`. Keeps the
/// service's error code and the whole cause chain in the message.
pub(crate) fn during<E>(context: &str) -> impl Fn(aws_sdk_sqs::error::SdkError<E>) -> SqsError + '_
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    move |e| {
        let code = aws_sdk_sqs::error::ProvideErrorMetadata::code(&e).map(str::to_owned);
        SqsError::Call {
            context: context.to_owned(),
            reason: chain(&e),
            code,
        }
    }
}

/// An error and its causes, each by its message, joined with `: ` (the SDK's own
/// `DisplayErrorContext` appends a Debug dump of the request and response).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !out.ends_with(&next) {
            out.push_str(": ");
            out.push_str(&next);
        }
        source = s.source();
    }
    out
}

/// The receipt handle no longer names an in-flight message: its lease expired and it was
/// (or will be) received again.
pub(crate) fn is_lease_lost(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "ReceiptHandleIsInvalid"
                | "InvalidReceiptHandle"
                | "MessageNotInflight"
                | "AWS.SimpleQueueService.MessageNotInflight"
                | "InvalidParameterValue"
        )
    )
}

impl From<SqsError> for TransportError {
    fn from(e: SqsError) -> Self {
        match e {
            SqsError::Unreachable { address, reason } => Self::Unavailable {
                backend: "sqs",
                address,
                source: reason.into(),
            },
            SqsError::Config(reason) => Self::Misconfigured {
                backend: "sqs",
                reason,
            },
            other => Self::Backend {
                context: "sqs".into(),
                source: Box::new(other),
            },
        }
    }
}

impl From<SqsError> for StoreError {
    fn from(e: SqsError) -> Self {
        Self::Backend {
            context: "sqs".into(),
            source: Box::new(e),
        }
    }
}
