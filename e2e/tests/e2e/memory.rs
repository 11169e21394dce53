//! Memory a client controls stays bounded by bytes: order-svc remembers an
//! answer per idempotency key, and a flood of the largest orders with fresh
//! keys must not grow its resident memory with the orders' size.

use std::path::Path;

use orders_contract::v1::{CreateOrderRequest, LineItem};

use crate::helpers::{OrderSvc, broker_with_topic};

/// The largest valid order: 100 lines of 64-character SKUs (~7 KiB).
fn large_order(user: &str, request_id: String) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user.to_owned(),
        currency: "EUR".into(),
        items: (0..100)
            .map(|i| LineItem {
                sku: format!("{i:0>64}"),
                quantity: 1,
                unit_price_minor: 100,
            })
            .collect(),
        request_id,
    }
}

/// The pid of the running `binary` whose environment has `marker`
/// (`NAME=value`), found in /proc.
fn pid_of(binary: &Path, marker: &str) -> u32 {
    let dirs = std::fs::read_dir("/proc").expect("/proc is readable");
    dirs.filter_map(Result::ok)
        .filter_map(|d| d.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            exe.as_deref() == Some(binary) && env.split(|b| *b == 0).any(|v| v == marker.as_bytes())
        })
        .unwrap_or_else(|| panic!("no {} process with {marker}", binary.display()))
}

/// Resident memory of `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is running");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Makes `calls` CreateOrder calls of large orders, each with a new
/// `request_id`, from `workers` concurrent callers; all must succeed.
async fn flood(orders: &OrderSvc, user: &str, prefix: &str, calls: usize, workers: usize) {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut client = orders.client().await;
        let (user, prefix) = (user.to_owned(), prefix.to_owned());
        set.spawn(async move {
            for n in (w..calls).step_by(workers) {
                client
                    .create_order(large_order(&user, format!("{prefix}-{n}")))
                    .await
                    .expect("CreateOrder succeeds");
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("a caller panicked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_orders_with_fresh_keys_keeps_order_svc_small() {
    const WARM_UP: usize = 500;
    const FLOOD: usize = 10_000;
    /// Growth allowed over the flood: the answers' default byte bound is
    /// 32 MiB, and 10,000 answers of this size take ~3 MiB; whole orders take
    /// ~110 MiB.
    const MAX_GROWTH_KIB: u64 = 40 * 1024;
    let (broker, topic) = broker_with_topic("memory", 2).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let pid = pid_of(
        &testkit::bin_path("order-svc"),
        &format!("GRPC_ADDR={}", orders.grpc_addr),
    );
    let user = testkit::unique("user");

    // The producer, the connections and the allocator's pools settle first.
    flood(&orders, &user, "warm", WARM_UP, 8).await;
    let before = rss_kib(pid);
    flood(&orders, &user, "flood", FLOOD, 8).await;
    let after = rss_kib(pid);
    println!("order-svc VmRSS {before} KiB before {FLOOD} large orders, {after} KiB after");
    assert!(
        after.saturating_sub(before) <= MAX_GROWTH_KIB,
        "order-svc grew by {} KiB over {FLOOD} orders of 100 64-character SKUs (allowed {MAX_GROWTH_KIB} KiB)",
        after - before
    );

    // Still remembered: a retry of a flooded key gets the same order back.
    let mut client = orders.client().await;
    let request = large_order(&user, format!("flood-{}", FLOOD - 1));
    let first = client
        .create_order(request.clone())
        .await
        .expect("a retry")
        .into_inner();
    let again = client.create_order(request).await.expect("a retry").into_inner();
    assert_eq!(first, again, "a replay answers the very same order");
    assert_eq!(first.order.map(|o| o.items.len()), Some(100));
}
