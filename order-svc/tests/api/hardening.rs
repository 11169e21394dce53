//! What a hostile caller cannot do: pass a token without the configured
//! issuer or audience, name two orders with one idempotency key, mint metric
//! series with made-up paths, or smuggle control characters into identifiers.

use std::collections::HashMap;

use jsonwebtoken::{EncodingKey, Header};
use orders_contract::v1::{CreateOrderRequest, LineItem};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{spawn_app, spawn_app_with, valid_request};

const SECRET: &str = "a-hardening-secret-that-is-at-least-32-bytes";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "orders";

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_without_the_configured_issuer_or_audience_is_unauthenticated() {
    let app = spawn_app_with(|c| {
        c.auth_jwt_secret = Some(SECRET.parse().unwrap());
        c.auth_jwt_issuer = Some(ISSUER.into());
        c.auth_jwt_audience = Some(AUDIENCE.into());
    })
    .await;
    let mut client = app.client().await;
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 300;
    let cases = [
        (
            "both claims",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": ISSUER, "aud": AUDIENCE}),
            Code::Ok,
        ),
        (
            "no iss",
            serde_json::json!({"sub": "alice", "exp": exp, "aud": AUDIENCE}),
            Code::Unauthenticated,
        ),
        (
            "no aud",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": ISSUER}),
            Code::Unauthenticated,
        ),
        (
            "neither",
            serde_json::json!({"sub": "alice", "exp": exp}),
            Code::Unauthenticated,
        ),
    ];
    for (case, claims, want) in cases {
        let mut request = tonic::Request::new(valid_request("alice"));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", hs256(claims)).parse().unwrap());
        let got = client
            .create_order(request)
            .await
            .map(|_| Code::Ok)
            .unwrap_or_else(|s| s.code());
        assert_eq!(got, want, "{case}");
    }
}

fn keyed(request_id: &str, quantity: u32) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: "racer".into(),
        currency: "EUR".into(),
        items: vec![LineItem {
            sku: "SKU-1".into(),
            quantity,
            unit_price_minor: 100,
        }],
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn concurrent_calls_with_one_key_never_name_two_orders() {
    let app = spawn_app().await;
    // Two connections, so the two calls of a pair really run side by side.
    let (a, b) = (app.client().await, app.client().await);
    let pairs = 40;

    let mut conflicts = 0;
    for i in 0..pairs {
        let key = format!("race-{i}");
        let (mut a, mut b) = (a.clone(), b.clone());
        let (first, second) = tokio::join!(a.create_order(keyed(&key, 1)), b.create_order(keyed(&key, 2)));
        let mut by_id: HashMap<String, Vec<i64>> = HashMap::new();
        for result in [first, second] {
            match result {
                Ok(response) => {
                    let order = response.into_inner().order.expect("an order");
                    by_id.entry(order.order_id).or_default().push(order.total_minor);
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::InvalidArgument, "{key}: {status:?}");
                    let fields: Vec<String> = status
                        .get_error_details()
                        .bad_request()
                        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                        .unwrap_or_default();
                    assert_eq!(fields, ["request_id"], "{key}: the conflict names request_id");
                    conflicts += 1;
                }
            }
        }
        assert_eq!(by_id.len(), 1, "{key}: exactly one call wins: {by_id:?}");
        for (id, totals) in &by_id {
            assert_eq!(
                totals.len(),
                1,
                "{key}: order {id} was answered OK with totals {totals:?}"
            );
        }
    }
    assert_eq!(conflicts, pairs, "every pair has one loser");

    // The same payload twice at once: the very same order for both.
    for i in 0..pairs {
        let key = format!("same-{i}");
        let (mut a, mut b) = (a.clone(), b.clone());
        let (first, second) = tokio::join!(a.create_order(keyed(&key, 3)), b.create_order(keyed(&key, 3)));
        let first = first.expect("OK").into_inner().order.expect("an order");
        let second = second.expect("OK").into_inner().order.expect("an order");
        assert_eq!(first, second, "{key}: the same order, created_at included");
    }
}

fn lines(metrics: &str) -> usize {
    metrics.lines().count()
}

#[tokio::test]
async fn calls_to_paths_this_server_does_not_serve_share_one_bounded_series() {
    let app = spawn_app().await;
    let channel = app.channel().await;
    let call = |path: String| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.expect("channel ready");
            grpc.unary(
                tonic::Request::new(()),
                http::uri::PathAndQuery::try_from(path).unwrap(),
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await
            .expect_err("not served")
            .code()
        }
    };
    // A served call and one unknown path first, so their series exist.
    let mut client = app.client().await;
    client.create_order(valid_request("user-1")).await.expect("OK");
    assert_eq!(call("/x.Y/M0".into()).await, Code::Unimplemented);
    let before = app.metrics().await;

    for i in 1..=200 {
        assert_eq!(call(format!("/x.Y/M{i}")).await, Code::Unimplemented);
    }
    assert_eq!(
        call("/orders.v1.OrderService/DeleteEverything".into()).await,
        Code::Unimplemented
    );
    let after = app.metrics().await;
    assert!(
        lines(&after) <= lines(&before),
        "/metrics grew from {} to {} lines:\n{after}",
        lines(&before),
        lines(&after)
    );
    assert!(!after.contains("x.Y") && !after.contains("M17"), "{after}");
    let unknown =
        r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"}"#;
    assert_eq!(testkit::metric(&after, unknown), Some(202.0), "{after}");
    let served =
        r#"grpc_server_handled_total{grpc_service="orders.v1.OrderService",grpc_method="CreateOrder",grpc_code="OK"}"#;
    assert_eq!(testkit::metric(&after, served), Some(1.0), "{after}");
}

#[tokio::test]
async fn identifiers_with_control_characters_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    let forged = "eve\nINFO notification: order created order_id=forged user_id=victim";
    type Breaker = fn(&mut CreateOrderRequest, &str);
    let cases: [(Breaker, &str); 4] = [
        (|r, bad| r.user_id = bad.into(), "user_id"),
        (|r, bad| r.request_id = bad.into(), "request_id"),
        (|r, bad| r.items[1].sku = bad.into(), "items[1].sku"),
        (|r, bad| r.currency = bad.into(), "currency"),
    ];
    for bad in [
        forged,
        "tab\there",
        "bell\u{7}",
        "esc\u{1b}[2J",
        "nul\0",
        "sep\u{2028}x",
        "del\u{7f}",
    ] {
        for (break_it, field) in cases {
            let mut request = valid_request("user-1");
            break_it(&mut request, bad);
            let status = client.create_order(request).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{field} {bad:?}: {status:?}");
            assert!(
                status.message().contains(field),
                "{field} {bad:?}: {}",
                status.message()
            );
            let fields: Vec<String> = status
                .get_error_details()
                .bad_request()
                .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                .unwrap_or_default();
            assert_eq!(fields, [field], "{bad:?}");
        }
    }
    // Printable Unicode stays fine.
    let mut request = valid_request("ünïcödé user ✓");
    request.request_id = "a key with spaces".into();
    client
        .create_order(request)
        .await
        .expect("printable identifiers are OK");
}
