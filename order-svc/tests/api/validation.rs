//! Invalid requests get INVALID_ARGUMENT naming each bad field, in the
//! message and in google.rpc.BadRequest details, and publish nothing.

use std::time::Duration;

use orders_contract::v1::LineItem;
use tonic_types::StatusExt;

use crate::helpers::{spawn_app, valid_request};

type Breaker = Box<dyn Fn(&mut orders_contract::v1::CreateOrderRequest)>;

fn fields(status: &tonic::Status) -> Vec<String> {
    let details = status.get_error_details();
    details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn each_invalid_field_is_named() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    let cases: Vec<(Breaker, &[&str])> = vec![
        (Box::new(|r| r.user_id.clear()), &["user_id"]),
        (Box::new(|r| r.currency = "euro".into()), &["currency"]),
        (Box::new(|r| r.items.clear()), &["items"]),
        (
            Box::new(|r| {
                r.items = (0..101)
                    .map(|i| LineItem {
                        sku: format!("S{i}"),
                        quantity: 1,
                        unit_price_minor: 1,
                    })
                    .collect()
            }),
            &["items"],
        ),
        (Box::new(|r| r.items[0].sku.clear()), &["items[0].sku"]),
        (Box::new(|r| r.items[1].sku = "x".repeat(65)), &["items[1].sku"]),
        (Box::new(|r| r.items[0].quantity = 0), &["items[0].quantity"]),
        (
            Box::new(|r| r.items[1].unit_price_minor = -1),
            &["items[1].unit_price_minor"],
        ),
        (
            Box::new(|r| {
                r.user_id.clear();
                r.currency = "usd".into();
            }),
            &["user_id", "currency"],
        ),
    ];
    for (break_it, want) in cases {
        let mut request = valid_request("user-1");
        break_it(&mut request);
        let status = client.create_order(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(fields(&status), want, "{status:?}");
        for field in want {
            let bare = field.split('.').next_back().unwrap();
            assert!(
                status.message().contains(bare),
                "{} should name {field}",
                status.message()
            );
        }
    }
    let records = app
        .broker
        .read_all(&app.topic, 1, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(records.is_empty(), "nothing published for refused orders");
}
