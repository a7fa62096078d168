//! Admission control at the edge (OWASP API4, LLM10): a global limit on
//! requests in flight with fast load shedding, a per-key cap on concurrent
//! requests, and a deadline on reading the request body.
//!
//! A request holds its permits until its response body is finished, not
//! only until the handler returns: an SSE answer streams for as long as the
//! generation runs, and that is the load to bound. tower's
//! `ConcurrencyLimit`/`LoadShed` release at the end of the response future,
//! before a streamed body is written, so they would not bound streams.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::Frame;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ApiError;

/// Edge bounds shared by every request.
#[derive(Debug)]
pub struct Admission {
    in_flight: Arc<Semaphore>,
    limit: usize,
    body_timeout: Duration,
    max_body_bytes: usize,
}

impl Admission {
    /// At most `limit` requests in flight; bodies of at most
    /// `max_body_bytes`, read within `body_timeout`.
    pub fn new(limit: usize, body_timeout: Duration, max_body_bytes: usize) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(limit)),
            limit,
            body_timeout,
            max_body_bytes,
        }
    }
}

/// Middleware: sheds the request with 503 and `Retry-After: 1` when the
/// global limit is reached, else reads the whole body within the deadline
/// (408 when it is not sent in time, 413 over the size limit) and runs the
/// request holding a permit until its response body ends.
pub async fn admit(
    State(admission): State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(permit) = admission.in_flight.clone().try_acquire_owned() else {
        crate::edge::metrics::SHED.inc();
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                ApiError::Overloaded(format!(
                    "the gateway is at its limit of {} requests in flight; retry shortly",
                    admission.limit
                ))
                .envelope(),
            ),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, admission.max_body_bytes);
    let bytes = match tokio::time::timeout(admission.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return ApiError::PayloadTooLarge(admission.max_body_bytes).into_response(),
        Err(_) => {
            return ApiError::RequestTimeout(format!(
                "the request body was not received within {} ms",
                admission.body_timeout.as_millis()
            ))
            .into_response();
        }
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    hold(response, permit)
}

/// `response` with `permit` released only when its body is finished or
/// dropped.
pub fn hold(response: Response, permit: OwnedSemaphorePermit) -> Response {
    response.map(|inner| {
        Body::new(Holding {
            inner,
            _permit: permit,
        })
    })
}

pin_project! {
    /// A body that keeps a permit alive for as long as it is being sent.
    struct Holding {
        #[pin]
        inner: Body,
        _permit: OwnedSemaphorePermit,
    }
}

impl http_body::Body for Holding {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
