//! Prometheus metrics of order-svc, and the tower layer that measures every
//! gRPC call (`grpc_server_handled_total`, `grpc_server_handling_seconds`,
//! labelled as go-grpc-prometheus does so existing dashboards fit).
//!
//! Only the methods this server serves get series of their own: any client
//! can send any path, so a call to anything else is counted under
//! `grpc_service="unknown", grpc_method="unknown"` and the number of series
//! stays bounded.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use http_body::{Body, Frame};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use prost::Message as _;
use tower::{Layer, Service};

/// Labels of `grpc_server_handled_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    /// Full service name, e.g. `orders.v1.OrderService`.
    pub grpc_service: String,
    /// Method name, e.g. `CreateOrder`.
    pub grpc_method: String,
    /// Status code name, e.g. `OK`, `InvalidArgument`.
    pub grpc_code: String,
}

/// Labels of `grpc_server_handling_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// Full service name.
    pub grpc_service: String,
    /// Method name.
    pub grpc_method: String,
}

/// Latency buckets in seconds, from 100 µs to 10 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

/// Every metric order-svc exports.
#[derive(Debug)]
pub struct Metrics {
    /// `orders_created_total`: orders committed to the store.
    pub orders_created: Counter,
    /// `outbox_pending`: committed events the broker has not acknowledged.
    pub outbox_pending: Gauge,
    /// `outbox_oldest_age_seconds`: how long the oldest of them has waited.
    pub outbox_oldest_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `grpc_server_handled_total`.
    pub handled: Family<HandledLabels, Counter>,
    /// `grpc_server_handling_seconds`.
    pub handling_seconds: Family<MethodLabels, Histogram>,
    /// `kafka_produce_seconds`: send to acknowledgement.
    pub produce_seconds: Histogram,
    /// `kafka_produce_errors_total`.
    pub produce_errors: Counter,
    /// The labels of each served method, by path. Fixed at start, so the
    /// label values are bounded by what this server serves.
    routes: HashMap<Box<str>, MethodLabels>,
    /// The labels of every path this server does not serve.
    unknown: MethodLabels,
}

/// The label value of the service and method of a path this server does not serve.
pub const UNKNOWN: &str = "unknown";

/// The encoded descriptor sets of the services order-svc serves: the order
/// API, health, and reflection v1 and v1alpha.
const SERVED: [&[u8]; 4] = [
    orders_contract::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// The labels of every method in [`SERVED`], by path (`/package.Service/Method`).
fn served_routes() -> impl Iterator<Item = (String, MethodLabels)> {
    SERVED
        .into_iter()
        .filter_map(|encoded| prost_types::FileDescriptorSet::decode(encoded).ok())
        .flat_map(|set| set.file)
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service.into_iter().flat_map(move |service| {
                let grpc_service = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                service.method.into_iter().map(move |method| {
                    let labels = MethodLabels {
                        grpc_service: grpc_service.clone(),
                        grpc_method: method.name().to_owned(),
                    };
                    (format!("/{}/{}", labels.grpc_service, labels.grpc_method), labels)
                })
            })
        })
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            orders_created: Counter::default(),
            outbox_pending: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            handled: Family::default(),
            handling_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            produce_seconds: Histogram::new(latency_buckets()),
            produce_errors: Counter::default(),
            routes: served_routes()
                .map(|(path, labels)| (path.into_boxed_str(), labels))
                .collect(),
            unknown: MethodLabels {
                grpc_service: UNKNOWN.to_owned(),
                grpc_method: UNKNOWN.to_owned(),
            },
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "orders_created",
            "Orders created (committed to the store with their event)",
            metrics.orders_created.clone(),
        );
        registry.register(
            "outbox_pending",
            "Committed events the broker has not acknowledged yet",
            metrics.outbox_pending.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest committed event the broker has not acknowledged (0 when none)",
            metrics.outbox_oldest_age_seconds.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "gRPC calls completed, by status code",
            metrics.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from a gRPC call's arrival to its status",
            metrics.handling_seconds.clone(),
        );
        registry.register(
            "kafka_produce_seconds",
            "Time from handing an event to the producer to the broker's acknowledgement",
            metrics.produce_seconds.clone(),
        );
        registry.register(
            "kafka_produce_errors",
            "Events the broker did not acknowledge",
            metrics.produce_errors.clone(),
        );
        metrics
    }

    /// The labels of the route at `path` (`/package.Service/Method`): its
    /// own when this server serves it, else the `unknown` ones.
    fn labels(&self, path: &str) -> &MethodLabels {
        self.routes.get(path).unwrap_or(&self.unknown)
    }
}

/// Measures every gRPC call passing through.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Records one call's outcome exactly once: when the status is known, or
/// (as `Cancelled`) when the response is dropped before it was.
#[derive(Debug)]
struct Outcome {
    metrics: Arc<Metrics>,
    labels: MethodLabels,
    started: Instant,
    done: bool,
}

impl Outcome {
    fn record(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // A series appears on its first use: a method's when it is first
        // called, a status code's when it first happens.
        self.metrics
            .handling_seconds
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .handled
            .get_or_create(&HandledLabels {
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: code_name(code),
            })
            .inc();
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let mut outcome = Outcome {
            labels: self.metrics.labels(req.uri().path()).clone(),
            metrics: self.metrics.clone(),
            started: Instant::now(),
            done: false,
        };
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = match future.await {
                Ok(response) => response,
                Err(error) => {
                    outcome.record(tonic::Code::Internal);
                    return Err(error);
                }
            };
            // A "trailers-only" answer carries the status in its headers.
            if let Some(code) = status_of(response.headers()) {
                outcome.record(code);
            }
            Ok(response.map(|inner| MeteredBody {
                inner,
                outcome: Some(outcome),
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call's status from its trailers.
    #[derive(Debug)]
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        outcome: Option<Outcome>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => f.trailers_ref().and_then(status_of),
            Some(Err(_)) => Some(tonic::Code::Internal),
            None => Some(tonic::Code::Unknown),
        };
        if let Some(code) = code
            && let Some(mut outcome) = this.outcome.take()
        {
            outcome.record(code);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_have_their_own_labels_and_other_paths_share_one() {
        let metrics = Metrics::new(&mut Registry::default());
        for (path, service, method) in [
            (
                "/orders.v1.OrderService/CreateOrder",
                "orders.v1.OrderService",
                "CreateOrder",
            ),
            ("/grpc.health.v1.Health/Check", "grpc.health.v1.Health", "Check"),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo",
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ),
            ("/orders.v1.OrderService/Nope", UNKNOWN, UNKNOWN),
            ("/x.Y/M1", UNKNOWN, UNKNOWN),
            ("", UNKNOWN, UNKNOWN),
        ] {
            let labels = metrics.labels(path);
            assert_eq!(
                (labels.grpc_service.as_str(), labels.grpc_method.as_str()),
                (service, method),
                "{path}"
            );
        }
    }
}
