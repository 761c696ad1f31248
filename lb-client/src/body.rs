//! The response body: tracks a call until its last frame, so that in-flight
//! counts cover whole calls, the gRPC status in the trailers feeds
//! ejection, and the load report there feeds weighted round robin.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::{
    endpoint::{EndpointState, FAILURE_PENALTY, Outcome, now_nanos},
    pool::Pool,
};

/// One call in flight on an endpoint; ends it exactly once.
pub(crate) struct CallGuard {
    endpoint: Arc<EndpointState>,
    pool: Arc<Pool>,
    done: bool,
}

impl CallGuard {
    pub(crate) fn start(endpoint: Arc<EndpointState>, pool: Arc<Pool>) -> Self {
        endpoint.start_call();
        Self {
            endpoint,
            pool,
            done: false,
        }
    }

    pub(crate) fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Feeds the call's load report (the `endpoint-load-metrics-bin`
    /// trailer) to the endpoint's weight, when weighted round robin reads
    /// reports per call: no cost under other policies.
    pub(crate) fn record_load(&self, trailers: &HeaderMap) {
        let Some(wrr) = self.pool.wrr() else {
            return;
        };
        if wrr.out_of_band.is_some() {
            return;
        }
        if let Some(report) = lookaside_orca::decode_trailer(trailers) {
            self.endpoint
                .load_weight()
                .record(&report, wrr.error_utilization_penalty, now_nanos());
        }
    }

    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        self.endpoint.end_call();
        if matches!(
            outcome,
            Outcome::ServerError | Outcome::Unavailable | Outcome::Timeout
        ) {
            self.endpoint.observe(FAILURE_PENALTY, now_nanos());
        }
        self.pool.report(&self.endpoint, outcome);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.end(Outcome::Cancelled);
    }
}

/// What a gRPC status code says about the server.
pub(crate) fn outcome_of(headers: &HeaderMap) -> Option<Outcome> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<u8>()
        .ok()?;
    Some(match code {
        14 => Outcome::Unavailable,
        2 | 13 | 15 => Outcome::ServerError,
        _ => Outcome::Success,
    })
}

pin_project_lite::pin_project! {
    /// A response body that ends its call when the stream ends.
    pub struct ResponseBody {
        #[pin]
        inner: hyper::body::Incoming,
        guard: Option<CallGuard>,
        // From a trailers-only response's headers, if any.
        outcome: Option<Outcome>,
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl ResponseBody {
    pub(crate) fn new(
        inner: hyper::body::Incoming,
        guard: CallGuard,
        outcome: Option<Outcome>,
    ) -> Self {
        // A trailers-only response (its status in the headers, as a server
        // sends an error before any message) is over already, and tonic
        // returns that status without reading the body, so dropping it would
        // count the call as cancelled: an UNAVAILABLE would never eject.
        let guard = match outcome {
            Some(outcome) => {
                guard.finish(outcome);
                None
            }
            None => Some(guard),
        };
        Self {
            inner,
            guard,
            outcome,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let outcome = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|t| {
                if let Some(guard) = this.guard.as_ref() {
                    guard.record_load(t);
                }
                outcome_of(t).unwrap_or(Outcome::Success)
            }),
            Some(Err(_)) => Some(Outcome::Unavailable),
            None => Some(this.outcome.unwrap_or(Outcome::Success)),
        };
        if let Some(outcome) = outcome
            && let Some(guard) = this.guard.take()
        {
            guard.finish(outcome);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
