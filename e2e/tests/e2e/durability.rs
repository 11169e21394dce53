//! What an OK from CreateOrder promises, proven against the real binary
//! killed with SIGKILL at random moments: a client creates orders with
//! request ids and retries each until OK; afterwards every key names exactly
//! one order in the store (read back with ListOrders), that order is the one
//! the OK answered, and its OrderCreated event is on the topic (a duplicate
//! only ever repeats the same event id). The same with the broker down for
//! 30 s in the middle, and with two order-svc instances on one PostgreSQL
//! database answering the same keys. `orderctl get` / `orderctl list` read
//! the orders back as a user would.
//!
//! Each run creates 2,000 orders (`DURABILITY_ORDERS` sets another number),
//! spread over at least 10 s so that the killer strikes several times.
//! The killer goes on during the broker outage: order-svc starts while the
//! broker does not answer (its outbox holds the events), so the processes
//! restarted then take orders too.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use orders_contract::v1::{
    CreateOrderRequest, ListOrdersRequest, Order, OrderCreated, order_service_client::OrderServiceClient,
};
use prost::Message as _;
use testkit::{Broker, Postgres, free_port};
use tonic::transport::{Channel, Endpoint};

use crate::helpers::{OrderSvc, broker_with_topic, order, own_broker_with_topic, sqlite_url, store_dir};

/// A number in `range`, from a small xorshift generator seeded by the clock
/// (the moments only need to vary, not to be unpredictable).
fn random_in(range: std::ops::Range<usize>) -> usize {
    static STATE: AtomicUsize = AtomicUsize::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as usize)
            .unwrap_or(88172645463325252)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    range.start + x % (range.end - range.start)
}

/// Users the orders are spread over (ListOrders reads them back per user).
const USERS: usize = 8;
/// Concurrent clients.
const WORKERS: usize = 8;

fn orders_to_create() -> usize {
    std::env::var("DURABILITY_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// How long the orders of a killed run span at least: the killer kills every
/// 0.2-1.5 s, so a run this long sees several kills however fast the store is.
const KILLED_RUN: Duration = Duration::from_secs(10);

/// The pace that spreads `n` orders over at least [`KILLED_RUN`].
fn pace_over_killed_run(n: usize) -> Option<Duration> {
    Some(KILLED_RUN / n.max(1) as u32)
}

fn request(i: usize) -> CreateOrderRequest {
    let mut request = order(&format!("durable-user-{}", i % USERS));
    request.request_id = format!("req-{i}");
    request.items[0].quantity = 1 + (i % 7) as u32;
    request
}

/// One order-svc instance on fixed ports, so it can be killed and started
/// again where the clients look for it.
struct Instance {
    grpc: SocketAddr,
    env: Vec<(&'static str, String)>,
    running: Option<OrderSvc>,
}

impl Instance {
    async fn start(brokers: &str, topic: &str, database_url: &str) -> Self {
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let env = vec![
            ("GRPC_ADDR", grpc.to_string()),
            ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
            ("DATABASE_URL", database_url.to_owned()),
            ("PUBLISH_TIMEOUT", "2s".to_owned()),
            // A restart during the broker outage waits this long for it.
            ("KAFKA_STARTUP_TIMEOUT", "2s".to_owned()),
        ];
        let mut instance = Self {
            grpc,
            env,
            running: None,
        };
        instance.restart(brokers, topic).await;
        instance
    }

    async fn restart(&mut self, brokers: &str, topic: &str) {
        self.running = Some(OrderSvc::start(brokers, topic, &self.env).await);
    }

    async fn kill(&mut self) {
        if let Some(mut svc) = self.running.take() {
            svc.service.signal("KILL");
            svc.service
                .wait_exit(Duration::from_secs(10))
                .await
                .expect("exits on SIGKILL");
        }
    }
}

/// Creates `n` orders against `addrs` (a call goes to a random one), each
/// retried until OK; returns the answered order per request index.
/// `ok` counts the answers as they come. With `pace`, a new order starts at
/// most once per `pace` (retries are not paced), so the orders span a known
/// time whatever the store's speed.
async fn create_all(
    addrs: &[SocketAddr],
    n: usize,
    pace: Option<Duration>,
    done: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
) -> HashMap<usize, Order> {
    let ticker = pace.map(|pace| {
        let mut ticker = tokio::time::interval(pace);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Arc::new(tokio::sync::Mutex::new(ticker))
    });
    let clients: Vec<OrderServiceClient<Channel>> = addrs
        .iter()
        .map(|a| {
            OrderServiceClient::new(
                Endpoint::from_shared(format!("http://{a}"))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy(),
            )
        })
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(Mutex::new(HashMap::new()));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (clients, next, answered, retries, ok, ticker) = (
            clients.clone(),
            next.clone(),
            answered.clone(),
            retries.clone(),
            ok.clone(),
            ticker.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                if let Some(ticker) = &ticker {
                    ticker.lock().await.tick().await;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let deadline = Instant::now() + Duration::from_secs(180);
                loop {
                    let mut client = clients[random_in(0..clients.len())].clone();
                    let mut call = tonic::Request::new(request(i));
                    call.set_timeout(Duration::from_secs(5));
                    match client.create_order(call).await {
                        Ok(response) => {
                            let order = response.into_inner().order.expect("an order");
                            answered.lock().unwrap().insert(i, order);
                            ok.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(status) => {
                            assert!(
                                matches!(
                                    status.code(),
                                    tonic::Code::Unavailable
                                        | tonic::Code::Cancelled
                                        | tonic::Code::DeadlineExceeded
                                        | tonic::Code::Unknown
                                ),
                                "req-{i}: only transient failures are expected: {status:?}"
                            );
                            assert!(
                                Instant::now() < deadline,
                                "req-{i} not accepted within 180 s: {status:?}"
                            );
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("a client worker panicked");
    }
    done.store(true, Ordering::Relaxed);
    println!(
        "{n} orders answered OK after {} failed attempts",
        retries.load(Ordering::Relaxed)
    );
    Arc::try_unwrap(answered).unwrap().into_inner().unwrap()
}

/// Kills a random instance at random moments (200 ms to 1.5 s apart) and
/// starts it again, until `done`, counting the kills in `kills`. Returns how
/// many kills there were.
async fn killer(
    instances: Arc<tokio::sync::Mutex<Vec<Instance>>>,
    brokers: String,
    topic: String,
    done: Arc<AtomicBool>,
    kills: Arc<AtomicUsize>,
) -> usize {
    while !done.load(Ordering::Relaxed) {
        let pause = random_in(200..1500) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if done.load(Ordering::Relaxed) {
            continue;
        }
        let mut instances = instances.lock().await;
        let which = random_in(0..instances.len());
        instances[which].kill().await;
        kills.fetch_add(1, Ordering::Relaxed);
        instances[which].restart(&brokers, &topic).await;
    }
    kills.load(Ordering::Relaxed)
}

/// Every key names one order in the store, the one its OK answered; every
/// such order's event is on the topic, with one event id per order.
async fn check(addr: SocketAddr, broker: &Broker, topic: &str, answered: &HashMap<usize, Order>, n: usize) {
    assert_eq!(answered.len(), n, "every request was answered OK");
    // The store: all orders of all users, read back through ListOrders.
    let mut client = OrderServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut stored: Vec<Order> = Vec::new();
    for user in 0..USERS {
        let mut token = String::new();
        loop {
            let page = client
                .list_orders(ListOrdersRequest {
                    user_id: format!("durable-user-{user}"),
                    page_size: 1000,
                    page_token: token.clone(),
                })
                .await
                .expect("ListOrders")
                .into_inner();
            stored.extend(page.orders);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    let mut by_key: HashMap<String, Vec<&Order>> = HashMap::new();
    for order in &stored {
        by_key.entry(order.request_id.clone()).or_default().push(order);
    }
    assert_eq!(stored.len(), n, "the store holds one order per request, no more");
    for (i, order) in answered {
        let key = format!("req-{i}");
        let found = by_key.get(&key).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(found.len(), 1, "{key}: {} orders in the store", found.len());
        assert_eq!(found[0], order, "{key}: the stored order is the one answered OK");
    }

    // The topic: every stored order's event, each order with one event id.
    let wanted: HashSet<String> = answered.values().map(|o| o.order_id.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (events, records) = loop {
        let records = broker
            .read_all(topic, usize::MAX, Duration::from_secs(5))
            .await
            .expect("the topic can be read");
        let mut events: HashMap<String, HashSet<String>> = HashMap::new();
        for r in &records {
            let event = OrderCreated::decode(rdkafka::Message::payload(r).unwrap()).unwrap();
            events
                .entry(event.order.unwrap().order_id)
                .or_default()
                .insert(event.event_id);
        }
        let seen: HashSet<String> = events.keys().cloned().collect();
        if wanted.is_subset(&seen) || Instant::now() > deadline {
            break (events, records.len());
        }
    };
    let seen: HashSet<String> = events.keys().cloned().collect();
    let missing: Vec<_> = wanted.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged orders have no event: {missing:?}",
        missing.len()
    );
    let extra: Vec<_> = seen.difference(&wanted).collect();
    assert!(extra.is_empty(), "events of orders nobody was answered: {extra:?}");
    for (order_id, ids) in &events {
        assert_eq!(ids.len(), 1, "order {order_id} has several event ids: {ids:?}");
    }
    println!(
        "{n} orders: {records} records on the topic ({} duplicates, each repeating its event id)",
        records - n
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_order() {
    let n = orders_to_create();
    let (broker, topic) = broker_with_topic("durable", 3).await;
    let store = store_dir(&topic);
    let database = sqlite_url(&store);
    let instance = Instance::start(&broker.addr(), &topic, &database).await;
    let addr = instance.grpc;
    let instances = Arc::new(tokio::sync::Mutex::new(vec![instance]));
    let done = Arc::new(AtomicBool::new(false));
    let killing = tokio::spawn(killer(
        instances.clone(),
        broker.addr(),
        topic.clone(),
        done.clone(),
        Arc::default(),
    ));
    let started = Instant::now();
    let answered = create_all(&[addr], n, pace_over_killed_run(n), done, Arc::default()).await;
    let kills = killing.await.unwrap();
    println!("{kills} SIGKILLs in {:?}", started.elapsed());
    assert!(kills >= 3, "the run was too short to kill anything ({kills} kills)");
    // One more kill right after the last answer: the outbox is published by
    // the next process.
    instances.lock().await[0].kill().await;
    instances.lock().await[0].restart(&broker.addr(), &topic).await;
    check(addr, &broker, &topic, &answered, n).await;
    read_back_with_orderctl(addr, &answered[&0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_with_the_broker_down_for_30_s_in_the_middle() {
    let n = orders_to_create();
    let (mut broker, topic) = own_broker_with_topic("durable-outage", 3).await;
    let store = store_dir(&topic);
    let database = sqlite_url(&store);
    let instance = Instance::start(&broker.addr(), &topic, &database).await;
    let addr = instance.grpc;
    let instances = Arc::new(tokio::sync::Mutex::new(vec![instance]));
    let (done, kills) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let killing = tokio::spawn(killer(
        instances.clone(),
        broker.addr(),
        topic.clone(),
        done.clone(),
        kills.clone(),
    ));
    let ok = Arc::new(AtomicUsize::new(0));
    let creating = tokio::spawn({
        let (done, ok) = (done.clone(), ok.clone());
        // Paced so that orders keep coming through the whole outage: at
        // one order per 30 ms, a quarter of them before it (~15 s), half
        // during it and a quarter after it.
        async move { create_all(&[addr], n, Some(Duration::from_millis(30)), done, ok).await }
    });
    testkit::eventually(Duration::from_secs(120), "a quarter of the orders answered", || {
        let ok = ok.clone();
        async move { (ok.load(Ordering::Relaxed) >= n / 4).then_some(()) }
    })
    .await;
    // Take the broker away for 30 s; the killer goes on.
    tokio::task::block_in_place(|| broker.stop());
    let outage = Instant::now();
    let (before_outage, kills_before) = (ok.load(Ordering::Relaxed), kills.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during_outage = ok.load(Ordering::Relaxed) - before_outage;
    let kills_during = kills.load(Ordering::Relaxed) - kills_before;
    broker.restart().await.expect("the broker restarts");
    println!(
        "broker down for {:?}: {before_outage} orders answered OK before, {during_outage} during the outage, \
         {kills_during} SIGKILLs and restarts during it",
        outage.elapsed()
    );
    assert!(before_outage > 0, "the outage is in the middle: orders before it");
    assert!(during_outage > 0, "orders are answered OK while the broker is down");
    assert!(
        kills_during > 0,
        "order-svc was killed and started again while the broker was down"
    );
    let answered = creating.await.unwrap();
    let kills = killing.await.unwrap();
    println!("{kills} SIGKILLs");
    check(addr, &broker, &topic, &answered, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_killed_at_random_moments_answer_each_key_with_one_order() {
    let n = orders_to_create();
    let (broker, topic) = broker_with_topic("durable-pg", 3).await;
    let database = Postgres::shared()
        .await
        .expect("PostgreSQL starts")
        .create_database("orders")
        .await
        .unwrap();
    let a = Instance::start(&broker.addr(), &topic, &database).await;
    let b = Instance::start(&broker.addr(), &topic, &database).await;
    let addrs = [a.grpc, b.grpc];
    let instances = Arc::new(tokio::sync::Mutex::new(vec![a, b]));
    let done = Arc::new(AtomicBool::new(false));
    let killing = tokio::spawn(killer(
        instances.clone(),
        broker.addr(),
        topic.clone(),
        done.clone(),
        Arc::default(),
    ));
    let answered = create_all(&addrs, n, pace_over_killed_run(n), done, Arc::default()).await;
    let kills = killing.await.unwrap();
    println!("{kills} SIGKILLs over two instances");
    assert!(kills >= 3, "the run was too short to kill anything ({kills} kills)");
    check(addrs[0], &broker, &topic, &answered, n).await;
}

/// `orderctl get` and `orderctl list` show the order as a user reads it.
async fn read_back_with_orderctl(addr: SocketAddr, order: &Order) {
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(testkit::bin_path("orderctl"))
            .args(&args)
            .env_clear()
            .env("ORDER_SVC_ADDR", format!("http://{addr}"))
            .output()
            .await
            .expect("orderctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(vec!["get".into(), order.order_id.clone()]).await;
    assert!(ok, "orderctl get: {stderr}");
    assert!(stdout.contains(&format!("order_id={}", order.order_id)), "{stdout}");
    assert!(stdout.contains(&format!("request_id={}", order.request_id)), "{stdout}");
    let (ok, stdout, _) = run(vec![
        "list".into(),
        "--user".into(),
        order.user_id.clone(),
        "--page-size".into(),
        "2".into(),
    ])
    .await;
    assert!(ok);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("order_id=")).count(),
        2,
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("next_page_token=")), "{stdout}");
    let (ok, _, stderr) = run(vec!["get".into(), "00000000-0000-7000-8000-000000000000".to_owned()]).await;
    assert!(!ok, "an unknown order is an error");
    assert!(stderr.contains("NotFound"), "{stderr}");
}
