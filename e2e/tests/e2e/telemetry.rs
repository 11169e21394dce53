//! OTLP export: with OTEL_EXPORTER_OTLP_ENDPOINT set, both services export
//! their spans, and the CreateOrder span and notify-svc's per-record span share
//! one trace, the caller's.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

use crate::helpers::{NOTIFICATION, OrderSvc, broker_with_topic, notify_env, order, start_notify};

/// (service.name, span name, trace id as hex) of every exported span.
type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

#[derive(Clone, Default)]
struct Collector {
    spans: Spans,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((service.clone(), span.name, trace));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (SocketAddr, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let spans = collector.spans.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_in_one_trace() {
    let (collector, spans) = start_collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ];
    let (broker, topic) = broker_with_topic("otlp", 1).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &otel).await;
    let notify = start_notify(&notify_env(&broker.addr(), &topic, &testkit::unique("notify"), &otel)).await;

    let trace_id = "5b8efff798038103d269b633813fc60c";
    let mut request = tonic::Request::new(order("otel-user"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-eee19b7ec3c1b174-01").parse().unwrap(),
    );
    let created = orders
        .client()
        .await
        .create_order(request)
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    notify
        .wait_for_line(&[NOTIFICATION, &created.order_id], Duration::from_secs(10))
        .await;

    let found = testkit::eventually(Duration::from_secs(15), "both services' spans at the collector", || {
        let spans = spans.clone();
        async move {
            let spans = spans.lock().unwrap();
            let ours: Vec<_> = spans.iter().filter(|(_, _, t)| t == trace_id).cloned().collect();
            let rpc = ours
                .iter()
                .any(|(s, n, _)| s.contains("order-svc") && n == "CreateOrder");
            let record = ours.iter().any(|(s, n, _)| s.contains("notify-svc") && n == "event");
            (rpc && record).then_some(ours)
        }
    })
    .await;
    assert!(found.len() >= 2, "{found:?}");
}
