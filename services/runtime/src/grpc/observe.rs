//! A tower layer for gRPC servers: one OpenTelemetry server span per RPC
//! (parented on the caller's W3C `traceparent`) and the RPC count and duration
//! metrics, labelled with the final status code.
//!
//! A unary or streaming RPC's status usually arrives in the trailers, after the
//! body, so the response body is wrapped and the RPC is recorded when the
//! trailers pass (or when the body is dropped early: `CANCELLED`).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{rpc_name, status};
use crate::{metrics, telemetry::propagation};

/// Layer producing [`Observe`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

/// Service wrapping each RPC in a server span and recording its metrics.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Observe<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // Label only paths the authorisation table knows: a caller sending
        // arbitrary paths must not grow the metrics without bound.
        let (service, method) = match super::authz::rule_for(req.uri().path()) {
            Some(_) => rpc_name(req.uri().path()),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(propagation::extract(req.headers()));
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ObserveFuture {
            inner: future,
            recorder: Some(Recorder {
                service,
                method,
                start: Instant::now(),
                span,
                done: false,
            }),
        }
    }
}

pin_project! {
    /// Future of [`Observe`].
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        recorder: Option<Recorder>,
    }
}

impl<F, ResBody, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<ObservedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.recorder.as_ref().map(|r| r.span.enter());
            ready!(this.inner.poll(cx))
        };
        let mut recorder = this.recorder.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (an immediate error) carries its
                // status in the headers.
                if let Some(code) = status::from_headers(response.headers())
                    && let Some(r) = recorder.take()
                {
                    r.finish(code);
                }
                Ok(response.map(|inner| ObservedBody { inner, recorder }))
            }
            Err(e) => {
                if let Some(r) = recorder {
                    r.finish(Code::Unknown);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// Response body that records the RPC when its trailers pass.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => f
                .trailers_ref()
                .map(|t| status::from_headers(t).unwrap_or(Code::Unknown)),
            // A body error, or an end without trailers: no status was sent.
            Some(Err(_)) | None => Some(Code::Unknown),
        };
        if let Some(code) = code
            && let Some(r) = this.recorder.take()
        {
            r.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records one RPC exactly once: at its status, or as `CANCELLED` when the
/// response is dropped before it completed (the client went away).
pub(crate) struct Recorder {
    service: String,
    method: String,
    start: Instant,
    span: tracing::Span,
    done: bool,
}

impl Recorder {
    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let name = status::code_name(code);
        let elapsed = self.start.elapsed();
        let m = metrics::server_rpc();
        let labels = [self.service.as_str(), self.method.as_str(), name];
        m.handled.with_label_values(&labels).inc();
        m.handling_seconds
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        self.span.record("rpc.grpc.status_code", code as i32);
        if status::is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        tracing::debug!(
            parent: &self.span,
            grpc_code = name,
            latency_ms = elapsed.as_secs_f64() * 1e3,
            "rpc finished"
        );
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}
