//! GetOrder and ListOrders read back what CreateOrder committed: the same
//! order, NOT_FOUND for an unknown id, a user's orders newest first in pages
//! (AIP-158) whose tokens cannot be forged into anything but INVALID_ARGUMENT.

use std::collections::HashSet;

use orders_contract::v1::{GetOrderRequest, ListOrdersRequest, Order};
use tonic::Code;

use crate::helpers::{create, spawn_app, valid_request};

#[tokio::test]
async fn get_order_returns_the_created_order_or_not_found() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    let mut request = valid_request("reader-1");
    request.request_id = "k-1".into();
    let created = create(&mut client, request).await;
    let got = client
        .get_order(GetOrderRequest {
            order_id: created.order_id.clone(),
        })
        .await
        .expect("GetOrder")
        .into_inner()
        .order
        .expect("an order");
    assert_eq!(got, created, "the very order CreateOrder answered, created_at included");

    for missing in [uuid::Uuid::now_v7().to_string(), "not-a-uuid".into(), "x".repeat(500)] {
        let status = client
            .get_order(GetOrderRequest { order_id: missing })
            .await
            .expect_err("no such order");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let status = client
        .get_order(GetOrderRequest {
            order_id: String::new(),
        })
        .await
        .expect_err("empty id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

async fn list(
    client: &mut orders_contract::v1::order_service_client::OrderServiceClient<tonic::transport::Channel>,
    user_id: &str,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<Order>, String), tonic::Status> {
    let page = client
        .list_orders(ListOrdersRequest {
            user_id: user_id.into(),
            page_size,
            page_token: page_token.into(),
        })
        .await?
        .into_inner();
    Ok((page.orders, page.next_page_token))
}

#[tokio::test]
async fn list_orders_pages_newest_first_and_refuses_tampered_tokens() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    let mut created = Vec::new();
    for _ in 0..7 {
        created.push(create(&mut client, valid_request("lister")).await);
    }
    create(&mut client, valid_request("someone-else")).await;
    created.reverse();

    // Pages of 3: 3 + 3 + 1, newest first, every order once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let (orders, next) = list(&mut client, "lister", 3, &token).await.expect("a page");
        pages += 1;
        assert!(orders.len() <= 3);
        seen.extend(orders);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "newest first, each order once, items included");

    // The default page holds them all; a huge page size is capped, not refused.
    let (all, next) = list(&mut client, "lister", 0, "").await.unwrap();
    assert_eq!(all.len(), 7);
    assert!(next.is_empty());
    let (all, _) = list(&mut client, "lister", 1_000_000, "").await.unwrap();
    assert_eq!(all.len(), 7);
    let (none, next) = list(&mut client, "nobody", 0, "").await.unwrap();
    assert!(none.is_empty() && next.is_empty());

    // Tokens: altered, truncated, garbage or another user's are INVALID_ARGUMENT.
    let (_, token) = list(&mut client, "lister", 2, "").await.unwrap();
    let mut tampered = token.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let bad_tokens = [
        tampered,
        token[..token.len() - 2].to_owned(),
        "%%%".to_owned(),
        "A".repeat(10_000),
    ];
    for bad in &bad_tokens {
        let status = list(&mut client, "lister", 2, bad).await.expect_err("a bad token");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let status = list(&mut client, "someone-else", 2, &token)
        .await
        .expect_err("another user's token");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = list(&mut client, "lister", -1, "")
        .await
        .expect_err("negative page size");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = list(&mut client, "", 1, "").await.expect_err("no user");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let ids: HashSet<_> = seen.iter().map(|o| o.order_id.clone()).collect();
    assert_eq!(ids.len(), 7);
}
