//! Memory a client controls stays bounded by bytes: order-svc remembers an
//! answer per idempotency key, and a flood of the largest orders with fresh
//! keys must not grow its resident memory with the orders' size.

use std::{path::Path, time::Duration};

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

/// A valid `OrderCreated` record (key, value, headers) for one order.
fn order_created_record() -> (String, Vec<u8>, Vec<(&'static str, String)>) {
    use orders_contract::v1::{Order, OrderCreated};
    let order_id = testkit::unique("order");
    let mut event = OrderCreated {
        event_id: testkit::unique("event"),
        order: Some(Order {
            order_id,
            user_id: "memory".into(),
            items: testkit::sample_items(),
            currency: "EUR".into(),
            total_minor: 4498,
            created_at: Some(Default::default()),
            request_id: String::new(),
        }),
        occurred_at: Some(Default::default()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if let Some(at) = event.occurred_at.as_mut() {
        at.seconds = now;
    }
    let record = orders_contract::envelope::encode_order_created(&event, "/e2e-memory");
    let headers = record.headers.into_iter().map(|(k, v)| (k, v.into_owned())).collect();
    (record.key, record.value, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_waiting_behind_a_stuck_notification_are_bounded_in_bytes() {
    use rdkafka::{
        ClientConfig,
        message::{Header, OwnedHeaders},
        producer::{FutureProducer, FutureRecord},
    };
    const RECORDS: usize = 200;
    const RECORD_BYTES: usize = 700 * 1024;
    /// The default PARTITION_BUFFER_BYTES is 16 MiB; librdkafka prefetches
    /// up to 1.5 MiB more per partition (queued.max.messages.kbytes). Unbounded by bytes, the buffer takes
    /// all 200 records: ~140 MiB.
    const MAX_GROWTH_KIB: u64 = 64 * 1024;
    let (broker, topic) = broker_with_topic("bigrecords", 1).await;
    // A webhook that accepts connections and never answers: the first
    // notification waits for its timeout, and every record behind it waits
    // in the partition's buffer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let url = format!("http://{}/hook", silent.local_addr().expect("an address"));
    let (called_tx, called) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().map_while(Result::ok) {
            held.push(stream);
            let _ = called_tx.send(());
        }
    });
    let group = testkit::unique("notify");
    let env = crate::helpers::notify_env(
        &broker.addr(),
        &topic,
        &group,
        &[("NOTIFY_WEBHOOK_URL", url), ("NOTIFY_WEBHOOK_TIMEOUT", "300s".into())],
    );
    let metrics = env
        .iter()
        .find(|(k, _)| *k == "METRICS_ADDR")
        .map(|(_, v)| format!("METRICS_ADDR={v}"))
        .expect("notify_env sets METRICS_ADDR");
    let notify = crate::helpers::start_notify(&env).await;
    let pid = pid_of(&testkit::bin_path("notify-svc"), &metrics);

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("linger.ms", "5")
        .create()
        .expect("a producer");
    let (key, value, headers) = order_created_record();
    let mut h = OwnedHeaders::new();
    for (k, v) in &headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::to(&topic).key(&key).payload(&value).headers(h),
            Duration::from_secs(10),
        )
        .await
        .expect("the event is published");
    // The worker has the event in hand and waits on the webhook.
    let called = tokio::task::spawn_blocking(move || called.recv_timeout(Duration::from_secs(30)));
    called
        .await
        .expect("the accept thread")
        .expect("notify-svc calls the webhook");
    let before = rss_kib(pid);
    let big = vec![b'x'; RECORD_BYTES];
    let keys: Vec<String> = (0..RECORDS).map(|n| format!("big-{n}")).collect();
    let mut sends = Vec::new();
    for key in &keys {
        sends.push(producer.send(FutureRecord::to(&topic).key(key).payload(&big), Duration::from_secs(30)));
    }
    for send in futures_join(sends).await {
        send.expect("a large record is published");
    }

    // The consumer fetches what it may within a few seconds on a local
    // broker; watch its memory for a while.
    let mut peak = before;
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < deadline {
        peak = peak.max(rss_kib(pid));
        if peak - before > MAX_GROWTH_KIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("notify-svc VmRSS {before} KiB before {RECORDS} records of {RECORD_BYTES} bytes, peak {peak} KiB");
    assert!(
        peak - before <= MAX_GROWTH_KIB,
        "notify-svc grew by {} KiB holding records behind a stuck notification (allowed {MAX_GROWTH_KIB} KiB)",
        peak - before
    );
    drop(notify);
}

/// Awaits every future, in order.
async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        out.push(f.await);
    }
    out
}
