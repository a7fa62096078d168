//! The load the balancer compares: requests in flight per endpoint, where a
//! call counts until its response body ends, not only until the response
//! headers (tower's `CompleteOnResponse`), so a generation stream that runs
//! for seconds counts for those seconds.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::Bytes;
use tower::load::{completion::TrackCompletion, pending_requests::Handle};

/// Keeps the in-flight handle of a call inside its response body.
#[derive(Debug, Clone, Copy, Default)]
pub struct UntilBodyEnds;

impl<B> TrackCompletion<Handle, http::Response<B>> for UntilBodyEnds
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Output = http::Response<tonic::body::Body>;

    fn track_completion(&self, handle: Handle, response: http::Response<B>) -> Self::Output {
        response.map(|inner| {
            tonic::body::Body::new(Tracked {
                inner,
                handle: Some(handle),
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A body that releases its handle at its end (or when dropped).
    struct Tracked<B> {
        #[pin]
        inner: B,
        handle: Option<Handle>,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.handle.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
