//! What operators and tools rely on: reflection (v1 and v1alpha), health,
//! /metrics, /healthz, /readyz, and a clean shutdown.

use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::helpers::{metric, spawn_app, valid_request};

async fn reflection_services_v1(addr: std::net::SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn reflection_v1alpha_describes(addr: std::net::SocketAddr, symbol: &str) -> bool {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let Ok(response) = client.server_reflection_info(tokio_stream::iter([request])).await else {
        return false;
    };
    // An unknown symbol is an error answer (or an error status): not described.
    matches!(
        response.into_inner().message().await,
        Ok(Some(answer)) if matches!(
            &answer.message_response,
            Some(MessageResponse::FileDescriptorResponse(files)) if !files.file_descriptor_proto.is_empty()
        )
    )
}

#[tokio::test]
async fn reflection_lists_and_describes_without_proto_files() {
    let app = spawn_app().await;
    let services = reflection_services_v1(app.grpc_addr).await;
    for wanted in ["orders.v1.OrderService", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == wanted), "{wanted} not in {services:?}");
    }
    // grpcurl before 1.8.8 speaks only v1alpha.
    assert!(reflection_v1alpha_describes(app.grpc_addr, "orders.v1.OrderService").await);
    assert!(reflection_v1alpha_describes(app.grpc_addr, "orders.v1.OrderCreated").await);
    for read in ["orders.v1.GetOrderRequest", "orders.v1.ListOrdersResponse"] {
        assert!(reflection_v1alpha_describes(app.grpc_addr, read).await, "{read}");
    }
    assert!(reflection_v1alpha_describes(app.grpc_addr, "grpc.health.v1.Health").await);
    assert!(!reflection_v1alpha_describes(app.grpc_addr, "orders.v1.NoSuchThing").await);
}

#[tokio::test]
async fn health_is_serving_and_not_serving_during_shutdown() {
    let mut app = spawn_app().await;
    let mut health = HealthClient::new(app.channel().await);
    for service in ["", "orders.v1.OrderService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get("/readyz").await.0, 200);

    let stopping = tokio::spawn(async move {
        app.stop().await.unwrap();
        app
    });
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("watch sees shutdown");
    if let Ok(Some(update)) = next {
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
    stopping.await.unwrap();
}

#[tokio::test]
async fn metrics_count_calls_by_code_and_produce_latency() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    for _ in 0..3 {
        client.create_order(valid_request("user-1")).await.unwrap();
    }
    let mut bad = valid_request("user-1");
    bad.currency = "nope".into();
    client.create_order(bad).await.unwrap_err();

    let text = app.metrics().await;
    let series = |code: &str| {
        format!(
            "grpc_server_handled_total{{grpc_service=\"orders.v1.OrderService\",grpc_method=\"CreateOrder\",grpc_code=\"{code}\"}}"
        )
    };
    assert_eq!(metric(&text, "orders_created_total"), Some(3.0), "{text}");
    assert_eq!(metric(&text, &series("OK")), Some(3.0), "{text}");
    assert_eq!(metric(&text, &series("InvalidArgument")), Some(1.0), "{text}");
    // The events go out right after the answers.
    let text = testkit::eventually(Duration::from_secs(5), "3 events acknowledged", || async {
        let text = app.metrics().await;
        (metric(&text, "kafka_produce_seconds_count") == Some(3.0)).then_some(text)
    })
    .await;
    assert_eq!(metric(&text, "kafka_produce_errors_total"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "outbox_pending"), Some(0.0), "{text}");
    assert_eq!(
        metric(
            &text,
            "grpc_server_handling_seconds_count{grpc_service=\"orders.v1.OrderService\",grpc_method=\"CreateOrder\"}"
        ),
        Some(4.0),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_calls_then_exits() {
    let mut app = spawn_app().await;
    let client = app.client().await;
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { client.create_order(valid_request(&format!("user-{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    app.stop().await.expect("clean exit");
    let mut ok = Vec::new();
    for call in calls {
        if let Ok(response) = call.await.unwrap() {
            ok.push(response.into_inner().order.unwrap().order_id);
        }
    }
    // Every order that was answered OK is on the topic.
    let records = app
        .broker
        .read_all(&app.topic, ok.len(), Duration::from_secs(5))
        .await
        .unwrap();
    let keys: std::collections::HashSet<_> = records
        .iter()
        .map(|r| String::from_utf8_lossy(rdkafka::Message::key(r).unwrap()).into_owned())
        .collect();
    for id in &ok {
        assert!(keys.contains(id), "acknowledged order {id} missing from the topic");
    }
    assert!(
        TcpProbe::closed(app.grpc_addr).await,
        "the gRPC port is closed after shutdown"
    );
}

struct TcpProbe;

impl TcpProbe {
    async fn closed(addr: std::net::SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_err()
    }
}
