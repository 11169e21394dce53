//! Shared helpers of the end-to-end tests: start the real binaries against a
//! broker, a typed gRPC client, a stream of concurrent `CreateOrder` calls, a
//! webhook receiver that can fail on purpose, and parsers for what the
//! services print. Everything waits by polling with a deadline.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    process::ExitStatus,
    sync::{
        Arc, LazyLock, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use orders_contract::v1::{CreateOrderRequest, LineItem, order_service_client::OrderServiceClient};
use rdkafka::{Message, message::OwnedMessage};
use testkit::{Broker, BrokerKind, Service, free_port};
use tonic::{Code, transport::Channel};

/// How long a service may take to start (debug build, shared 2-core machine).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The log line notify-svc prints for each notification (log sink).
pub(crate) const NOTIFICATION: &str = "notification: order created";

/// The shared broker with a new `topic` (and `topic.dlq`) of `partitions`
/// partitions.
pub(crate) async fn broker_with_topic(prefix: &str, partitions: i32) -> (Broker, String) {
    topic_on(Broker::shared().await.expect("broker starts"), prefix, partitions).await
}

/// Like [`broker_with_topic`], on a broker of its own that the test may stop
/// or kill.
pub(crate) async fn own_broker_with_topic(prefix: &str, partitions: i32) -> (Broker, String) {
    topic_on(Broker::start().await.expect("broker starts"), prefix, partitions).await
}

async fn topic_on(broker: Broker, prefix: &str, partitions: i32) -> (Broker, String) {
    let topic = testkit::unique(prefix);
    broker
        .create_topics(&topic, partitions)
        .await
        .expect("topics are created");
    (broker, topic)
}

/// The running order-svc binary and where it listens.
#[derive(Debug)]
pub(crate) struct OrderSvc {
    pub(crate) service: Service,
    pub(crate) grpc_addr: SocketAddr,
    /// The directory of its SQLite store, unless the test chose the store.
    _store: Option<Arc<tempfile::TempDir>>,
}

/// The temporary directories of the topics' SQLite stores, while some
/// order-svc (or test) of the topic holds one.
static STORES: LazyLock<Mutex<HashMap<String, Weak<tempfile::TempDir>>>> = LazyLock::new(Mutex::default);

/// The store directory of `topic`: the same one while anything holds it, so a
/// restarted order-svc on the topic finds its orders; removed with the last
/// holder (nothing is left in /tmp).
pub(crate) fn store_dir(topic: &str) -> Arc<tempfile::TempDir> {
    let mut stores = STORES.lock().unwrap();
    stores.retain(|_, dir| dir.strong_count() > 0);
    if let Some(dir) = stores.get(topic).and_then(Weak::upgrade) {
        return dir;
    }
    let dir = Arc::new(
        tempfile::Builder::new()
            .prefix("e2e-order-store-")
            .tempdir()
            .expect("a temporary directory"),
    );
    stores.insert(topic.to_owned(), Arc::downgrade(&dir));
    dir
}

/// The `DATABASE_URL` of a SQLite store in `dir`.
pub(crate) fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("orders.db").display())
}

impl OrderSvc {
    /// Starts order-svc on free ports against `brokers`/`topic`, with `extra`
    /// variables on top, and waits until it serves. Without a `DATABASE_URL`
    /// in `extra` it uses the topic's SQLite store ([`store_dir`]).
    pub(crate) async fn start(brokers: &str, topic: &str, extra: &[(&str, String)]) -> Self {
        let grpc_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut env = vec![
            ("GRPC_ADDR", grpc_addr.to_string()),
            ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
            ("KAFKA_BROKERS", brokers.to_owned()),
            ("ORDERS_TOPIC", topic.to_owned()),
            ("KAFKA_OPTIONS", BrokerKind::from_env().client_options().to_owned()),
        ];
        let store = (!extra.iter().any(|(k, _)| *k == "DATABASE_URL")).then(|| {
            let dir = store_dir(topic);
            env.push(("DATABASE_URL", sqlite_url(&dir)));
            dir
        });
        env.extend(extra.iter().cloned());
        let service = Service::spawn("order-svc", &env).expect("order-svc starts");
        service.wait_for_line(&["order-svc serving"], START_TIMEOUT).await;
        Self {
            service,
            grpc_addr,
            _store: store,
        }
    }

    /// A generated tonic client connected to it.
    pub(crate) async fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("connects to order-svc")
    }
}

/// The environment of a notify-svc on `brokers`, consuming `topic` in `group`
/// (dead letters to `topic.dlq`), plus `extra`.
pub(crate) fn notify_env<'a>(
    brokers: &str,
    topic: &str,
    group: &str,
    extra: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
        ("KAFKA_BROKERS", brokers.to_owned()),
        ("ORDERS_TOPIC", topic.to_owned()),
        ("DLQ_TOPIC", format!("{topic}.dlq")),
        ("KAFKA_GROUP_ID", group.to_owned()),
        ("KAFKA_OPTIONS", BrokerKind::from_env().client_options().to_owned()),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// Starts notify-svc with `env` and waits until it consumes.
pub(crate) async fn start_notify(env: &[(&str, String)]) -> Service {
    let service = Service::spawn("notify-svc", env).expect("notify-svc starts");
    service.wait_for_line(&["notify-svc consuming"], START_TIMEOUT).await;
    service
}

/// A valid order for `user_id` (one line item, total 2500 EUR minor units).
pub(crate) fn order(user_id: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.to_owned(),
        currency: "EUR".into(),
        items: vec![LineItem {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price_minor: 1250,
        }],
        request_id: String::new(),
    }
}

/// The value of field `name` in a tracing text line (`name=value`), without
/// quotes; the first occurrence that is a whole field name.
pub(crate) fn field(line: &str, name: &str) -> Option<String> {
    let pattern = format!("{name}=");
    let mut from = 0;
    while let Some(at) = line[from..].find(&pattern).map(|i| i + from) {
        let boundary = line[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'));
        if boundary {
            let rest = &line[at + pattern.len()..];
            let value: String = rest
                .trim_start_matches('"')
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, '}' | ',' | '"'))
                .collect();
            return Some(value);
        }
        from = at + pattern.len();
    }
    None
}

/// The order ids notify-svc printed a notification line for.
pub(crate) fn notified_ids(service: &Service) -> HashSet<String> {
    service
        .lines_with(&[NOTIFICATION])
        .iter()
        .filter_map(|l| field(l, "order_id"))
        .collect()
}

/// The record keys of `messages`, as text.
pub(crate) fn keys(messages: &[OwnedMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()))
        .collect()
}

/// Reads `topic` until every one of `wanted` keys is there or `timeout`
/// passes; returns the keys that are still missing.
pub(crate) async fn missing_on_topic(
    broker: &Broker,
    topic: &str,
    wanted: &HashSet<String>,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = broker
            .read_all(topic, wanted.len(), Duration::from_secs(5))
            .await
            .expect("the topic can be read");
        let mut seen: HashSet<String> = keys(&records).into_iter().collect();
        if records.len() >= wanted.len() && !wanted.is_subset(&seen) {
            // More records than calls answered OK: read everything there is.
            let all = broker
                .read_all(topic, usize::MAX, Duration::from_secs(3))
                .await
                .expect("the topic can be read");
            seen.extend(keys(&all));
        }
        let mut missing: Vec<String> = wanted.difference(&seen).cloned().collect();
        if missing.is_empty() || Instant::now() >= deadline {
            missing.sort();
            return missing;
        }
    }
}

/// Waits for `service` to exit while checking every few milliseconds whether
/// something accepts connections on `port`; returns the exit status and
/// whether the port was ever bound.
pub(crate) async fn exit_watching_port(service: &mut Service, port: u16, timeout: Duration) -> (ExitStatus, bool) {
    let deadline = Instant::now() + timeout;
    let mut bound = false;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            bound = true;
        }
        if let Ok(status) = service.wait_exit(Duration::from_millis(20)).await {
            return (status, bound);
        }
        assert!(
            Instant::now() < deadline,
            "the service did not exit within {timeout:?}; output:\n{}",
            service.output().join("\n")
        );
    }
}

/// What a stream of `CreateOrder` calls got back.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    /// Order ids of calls answered OK, in answer order.
    pub(crate) ok: Vec<String>,
    /// Failed calls: code and message.
    pub(crate) failed: Vec<(Code, String)>,
}

/// Concurrent `CreateOrder` calls running in the background.
#[derive(Debug)]
pub(crate) struct OrderStream {
    outcomes: Arc<Mutex<Outcomes>>,
    stop: Arc<AtomicBool>,
    workers: tokio::task::JoinSet<()>,
}

impl OrderStream {
    /// Starts `workers` callers on `addr`, together making at most `limit`
    /// calls, one every `period` at most (zero: as fast as answered).
    pub(crate) async fn start(addr: SocketAddr, workers: usize, limit: usize, period: Duration) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid uri")
            .connect()
            .await
            .expect("connects to order-svc");
        let outcomes = Arc::new(Mutex::new(Outcomes::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let started = tokio::time::Instant::now();
        let user = testkit::unique("user");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (outcomes, stop, next, user) = (outcomes.clone(), stop.clone(), next.clone(), user.clone());
            let mut client = OrderServiceClient::new(channel.clone());
            set.spawn(async move {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= limit {
                        return;
                    }
                    tokio::time::sleep_until(started + period * n as u32).await;
                    let mut request = tonic::Request::new(order(&user));
                    request.set_timeout(Duration::from_secs(20));
                    let answer = tokio::time::timeout(Duration::from_secs(25), client.create_order(request)).await;
                    let failed = {
                        let mut outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                        match answer {
                            Ok(Ok(response)) => {
                                let id = response.into_inner().order.map(|o| o.order_id).unwrap_or_default();
                                outcomes.ok.push(id);
                                false
                            }
                            Ok(Err(status)) => {
                                outcomes.failed.push((status.code(), status.message().to_owned()));
                                true
                            }
                            Err(_) => {
                                outcomes
                                    .failed
                                    .push((Code::DeadlineExceeded, "client-side timeout".into()));
                                true
                            }
                        }
                    };
                    if failed {
                        // Do not spin on a server that is gone.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
        Self {
            outcomes,
            stop,
            workers: set,
        }
    }

    /// Calls answered OK so far.
    pub(crate) fn ok_count(&self) -> usize {
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).ok.len()
    }

    /// Calls that failed so far.
    pub(crate) fn failed(&self) -> Vec<(Code, String)> {
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).failed.clone()
    }

    /// Waits until `n` calls were answered OK, at most `timeout`.
    pub(crate) async fn wait_ok(&self, n: usize, timeout: Duration) {
        testkit::eventually(timeout, &format!("{n} CreateOrder calls answered OK"), || async {
            (self.ok_count() >= n).then_some(())
        })
        .await;
    }

    /// Lets the callers finish the calls they are in, then returns the outcomes.
    pub(crate) async fn finish(mut self, stop_now: bool) -> Outcomes {
        if stop_now {
            self.stop.store(true, Ordering::Relaxed);
        }
        while let Some(result) = self.workers.join_next().await {
            result.expect("a caller panicked");
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What the test webhook receiver saw.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Order ids in the order they first arrived.
    pub(crate) first_seen: Vec<String>,
    /// Requests per order id (answered either way).
    pub(crate) attempts: HashMap<String, u32>,
    /// Requests answered 200 per order id.
    pub(crate) delivered: HashMap<String, u32>,
    /// Requests answered 503 on purpose.
    pub(crate) refused: u32,
    /// Requests whose `Idempotency-Key` was missing or not the body's event id.
    pub(crate) bad_idempotency_key: Vec<String>,
}

/// An HTTP receiver for notify-svc's webhook sink, in the test process. It
/// answers 503 to the first attempt of every `fail_every`-th order id (by
/// first arrival; 0 never fails) and 200 otherwise.
#[derive(Debug)]
pub(crate) struct Receiver {
    pub(crate) url: String,
    state: Arc<Mutex<Received>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ReceiverState {
    received: Arc<Mutex<Received>>,
    fail_every: usize,
}

async fn receive(State(state): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let order_id = json["order_id"].as_str().unwrap_or_default().to_owned();
    let event_id = json["event_id"].as_str().unwrap_or_default();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let mut received = state.received.lock().unwrap_or_else(|e| e.into_inner());
    if key != Some(event_id) || event_id.is_empty() {
        received.bad_idempotency_key.push(order_id.clone());
    }
    let attempts = {
        let attempts = received.attempts.entry(order_id.clone()).or_insert(0);
        *attempts += 1;
        *attempts
    };
    if attempts == 1 {
        received.first_seen.push(order_id.clone());
    }
    let ordinal = received.first_seen.iter().rposition(|id| *id == order_id).unwrap_or(0) + 1;
    if attempts == 1 && state.fail_every > 0 && ordinal % state.fail_every == 0 {
        received.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    *received.delivered.entry(order_id).or_insert(0) += 1;
    StatusCode::OK
}

impl Receiver {
    /// Starts the receiver on a free port.
    pub(crate) async fn start(fail_every: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds the receiver");
        let addr = listener.local_addr().expect("a bound address");
        let state = Arc::new(Mutex::new(Received::default()));
        let app = Router::new().route("/hook", post(receive)).with_state(ReceiverState {
            received: state.clone(),
            fail_every,
        });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hook"),
            state,
            server,
        }
    }

    /// Reads what was received so far.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many distinct order ids were delivered (answered 200).
    pub(crate) fn delivered_count(&self) -> usize {
        self.with(|r| r.delivered.len())
    }

    /// Waits up to `timeout` for every one of `ids` to be delivered; returns
    /// the ones that were not.
    pub(crate) async fn wait_all_delivered(&self, ids: &HashSet<String>, timeout: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let lost: Vec<String> = self.with(|r| {
                ids.iter()
                    .filter(|id| !r.delivered.contains_key(*id))
                    .cloned()
                    .collect()
            });
            if lost.is_empty() || std::time::Instant::now() > deadline {
                return lost;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
