//! The `Handler` trait: what the runner calls for each delivery.

use std::future::Future;

use redrive_core::{Envelope, HandlerError, HandlerResult};
use serde::de::DeserializeOwned;

/// Handles one message. Return `Ok(())` when done, or a [`HandlerError`]: retry,
/// retry after a delay, or poison. A panic or a timeout counts as a failed attempt.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery of `message`; `message.attempt` is 0 on the first.
    fn handle(&self, message: Envelope) -> impl Future<Output = HandlerResult> + Send;
}

/// A handler from an async closure.
#[derive(Debug, Clone)]
pub struct FnHandler<F>(F);

/// Wraps an async closure `Fn(Envelope) -> impl Future<Output = HandlerResult>`.
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    FnHandler(f)
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    fn handle(&self, message: Envelope) -> impl Future<Output = HandlerResult> + Send {
        (self.0)(message)
    }
}

/// A handler that decodes the payload as JSON into `T` first. A payload that does not
/// decode is poison (class `decode`): retrying cannot fix it.
#[derive(Debug, Clone)]
pub struct JsonHandler<F, T> {
    f: F,
    _task: std::marker::PhantomData<fn() -> T>,
}

/// Wraps an async closure `Fn(T, Envelope) -> impl Future<Output = HandlerResult>`
/// that receives the decoded payload.
pub fn json_handler<T, F, Fut>(f: F) -> JsonHandler<F, T>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    JsonHandler {
        f,
        _task: std::marker::PhantomData,
    }
}

impl<T, F, Fut> Handler for JsonHandler<F, T>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    async fn handle(&self, message: Envelope) -> HandlerResult {
        let task: T = serde_json::from_slice(&message.payload).map_err(|e| {
            HandlerError::poison("decode", format!("payload is not a valid task: {e}"))
        })?;
        (self.f)(task, message).await
    }
}
