//! `orderctl get` and `orderctl list`: read orders back from order-svc
//! (GetOrder, ListOrders), one line per order.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use orders_contract::v1::{GetOrderRequest, ListOrdersRequest, Order, order_service_client::OrderServiceClient};
use tonic::transport::Channel;

/// `orderctl get`.
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// The order's id.
    order_id: String,
}

/// `orderctl list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// The user whose orders to list (newest first).
    #[arg(long)]
    user: String,
    /// Orders per page (0: the server's default, 50; at most 1000).
    #[arg(long, default_value_t = 0)]
    page_size: i32,
    /// Start at this page (a next_page_token printed by a previous call).
    #[arg(long, default_value = "")]
    page_token: String,
    /// Follow next_page_token to the last page.
    #[arg(long)]
    all: bool,
}

fn request<T>(message: T, token: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(15));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(request)
}

/// One order as one line (the same fields `orderctl create` prints, and more).
fn line(order: &Order) -> String {
    let created_at = order
        .created_at
        .as_ref()
        .and_then(orders_contract::from_timestamp)
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    let items = order
        .items
        .iter()
        .map(|i| format!("{}:{}:{}", i.sku, i.quantity, i.unit_price_minor))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "order_id={} user_id={} total_minor={} currency={} created_at={} request_id={} items={}",
        order.order_id, order.user_id, order.total_minor, order.currency, created_at, order.request_id, items
    )
}

/// Prints the order, or fails with the status (NOT_FOUND when absent).
pub(crate) async fn get(channel: Channel, token: Option<&str>, args: &GetArgs) -> anyhow::Result<()> {
    let message = GetOrderRequest {
        order_id: args.order_id.clone(),
    };
    match OrderServiceClient::new(channel)
        .get_order(request(message, token)?)
        .await
    {
        Ok(response) => {
            println!("{}", line(&response.into_inner().order.unwrap_or_default()));
            Ok(())
        }
        Err(status) => bail!("GetOrder failed: {:?}: {}", status.code(), status.message()),
    }
}

/// Prints a page of orders (or every page with `--all`), then the next
/// page's token when there is one.
pub(crate) async fn list(channel: Channel, token: Option<&str>, args: &ListArgs) -> anyhow::Result<()> {
    let mut client = OrderServiceClient::new(channel);
    let mut page_token = args.page_token.clone();
    loop {
        let message = ListOrdersRequest {
            user_id: args.user.clone(),
            page_size: args.page_size,
            page_token: page_token.clone(),
        };
        let page = match client.list_orders(request(message, token)?).await {
            Ok(response) => response.into_inner(),
            Err(status) => bail!("ListOrders failed: {:?}: {}", status.code(), status.message()),
        };
        for order in &page.orders {
            println!("{}", line(order));
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        if !args.all {
            println!("next_page_token={}", page.next_page_token);
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}
