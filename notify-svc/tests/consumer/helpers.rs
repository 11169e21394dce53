//! Test support for notify-svc's black-box tests: a real Tansu broker per
//! test, the in-process `Application` on port 0, a real HTTP webhook receiver
//! that records every request and can be told to fail or be slow, and record
//! builders that go through the contract's envelope like order-svc does.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, post},
};
use notify_svc::{config::Config, startup::Application};
use orders_contract::{
    envelope,
    v1::{Order, OrderCreated},
};
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use testkit::{Broker, eventually, unique};
use tokio::{sync::oneshot, task::JoinHandle};

pub(crate) const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- the webhook

/// What the receiver does with requests for one order id.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Behaviour {
    /// Answer `status` to the first `n` attempts, then 200.
    FailFirst(u32, u16),
    /// Always answer `status`.
    Always(u16),
    /// Wait this long, then 200.
    Slow(Duration),
    /// Wait, and answer `status` to the first `n` attempts (then 200).
    SlowFailFirst(Duration, u32, u16),
    /// Answer 302 to another URL (which would answer 200).
    Redirect,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) idempotency_key: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) traceparent: Option<String>,
    pub(crate) body: serde_json::Value,
    /// What the receiver answered (0 while it is still answering).
    pub(crate) status: u16,
    pub(crate) at: Instant,
    /// The client's address: the same for requests on one connection.
    pub(crate) peer: SocketAddr,
}

impl Request {
    pub(crate) fn order_id(&self) -> &str {
        self.body["order_id"].as_str().unwrap_or_default()
    }
}

#[derive(Debug, Default)]
struct ReceiverState {
    requests: Vec<Request>,
    behaviours: HashMap<String, Behaviour>,
    attempts: HashMap<String, u32>,
    redirected: usize,
}

/// A real HTTP server on 127.0.0.1:0 standing in for a notification receiver.
#[derive(Debug, Clone)]
pub(crate) struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub(crate) async fn start() -> Self {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/hook", post(receive))
            .route(
                "/elsewhere",
                any(|State(state): State<Arc<Mutex<ReceiverState>>>| async move {
                    state.lock().unwrap_or_else(|e| e.into_inner()).redirected += 1;
                    "ok"
                }),
            )
            .with_state(state.clone());
        tokio::spawn(
            async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await },
        );
        Self { addr, state }
    }

    pub(crate) fn url(&self) -> reqwest::Url {
        format!("http://{}/hook", self.addr).parse().unwrap()
    }

    /// Tells the receiver how to treat requests for `order_id`.
    pub(crate) fn set(&self, order_id: &str, behaviour: Behaviour) {
        self.lock().behaviours.insert(order_id.to_owned(), behaviour);
    }

    /// Answer 200 from now on.
    pub(crate) fn heal(&self, order_id: &str) {
        self.lock().behaviours.remove(order_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReceiverState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests that followed a redirect to the other URL.
    pub(crate) fn redirected(&self) -> usize {
        self.lock().redirected
    }

    /// Every request so far, in arrival order.
    pub(crate) fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Requests for `order_id`, answered or not.
    pub(crate) fn attempts(&self, order_id: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.order_id() == order_id)
            .collect()
    }

    /// Requests for `order_id` answered with 2xx.
    pub(crate) fn delivered(&self, order_id: &str) -> Vec<Request> {
        self.attempts(order_id)
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Waits until `order_id` was delivered (answered 2xx) once; returns it.
    pub(crate) async fn wait_delivered(&self, order_id: &str, timeout: Duration) -> Request {
        eventually(timeout, &format!("a delivered notification for {order_id}"), || async {
            self.delivered(order_id).into_iter().next()
        })
        .await
    }

    /// Waits until the receiver has got at least `n` requests for `order_id`.
    pub(crate) async fn wait_attempts(&self, order_id: &str, n: usize, timeout: Duration) {
        eventually(timeout, &format!("{n} requests for {order_id}"), || async {
            (self.attempts(order_id).len() >= n).then_some(())
        })
        .await
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let order_id = body["order_id"].as_str().unwrap_or_default().to_owned();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (index, attempt, behaviour) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let attempt = {
            let a = s.attempts.entry(order_id.clone()).or_default();
            *a += 1;
            *a
        };
        s.requests.push(Request {
            idempotency_key: text("idempotency-key"),
            content_type: text("content-type"),
            traceparent: text("traceparent"),
            body,
            status: 0,
            at: Instant::now(),
            peer,
        });
        (s.requests.len() - 1, attempt, s.behaviours.get(&order_id).copied())
    };
    let status = match behaviour {
        None => 200,
        Some(Behaviour::FailFirst(n, status)) if attempt <= n => status,
        Some(Behaviour::FailFirst(..)) => 200,
        Some(Behaviour::Always(status)) => status,
        Some(Behaviour::Slow(d)) => {
            tokio::time::sleep(d).await;
            200
        }
        Some(Behaviour::SlowFailFirst(d, n, status)) => {
            tokio::time::sleep(d).await;
            if attempt <= n { status } else { 200 }
        }
        Some(Behaviour::Redirect) => 302,
    };
    state.lock().unwrap_or_else(|e| e.into_inner()).requests[index].status = status;
    let status = StatusCode::from_u16(status).unwrap();
    if status == StatusCode::FOUND {
        return (status, [("location", "/elsewhere")], "moved").into_response();
    }
    // A body, as real receivers send one.
    (status, r#"{"received":true}"#).into_response()
}

// ------------------------------------------------------------------- the app

/// A running notify-svc against the test's broker.
#[derive(Debug)]
pub(crate) struct TestApp {
    pub(crate) ops: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), notify_svc::error::Error>>>,
    http: reqwest::Client,
}

/// The test defaults: the broker's test client options, fast retries, short grace.
pub(crate) fn config(broker: &Broker, topic: &str, group: &str, receiver: Option<&Receiver>) -> Config {
    let mut config = Config::for_tests(&broker.addr(), topic, group);
    config.kafka.options = broker.client_options().parse().unwrap();
    config.notify_webhook_url = receiver.map(Receiver::url);
    config.notify_webhook_timeout = Duration::from_secs(10);
    config.retry_max_attempts = 4;
    config.retry_initial_delay = Duration::from_millis(20);
    config.retry_max_delay = Duration::from_millis(100);
    config.service.shutdown_grace = Duration::from_secs(3);
    config
}

impl TestApp {
    /// Builds and runs `config`; returns once the app is built (not yet joined).
    pub(crate) async fn spawn(config: Config) -> Self {
        service_kit::telemetry::init_for_tests("notify-svc");
        let app = Application::build(config).await.expect("notify-svc builds");
        let ops = app.ops_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            ops,
            stop: Some(tx),
            handle: Some(handle),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }

    /// Spawns and waits until /readyz says it joined the group.
    pub(crate) async fn spawn_ready(config: Config) -> Self {
        let app = Self::spawn(config).await;
        app.wait_ready(true, WAIT).await;
        app
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("http://{}{path}", self.ops)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub(crate) async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics answers 200");
        body
    }

    /// Waits until metric `series` (name plus labels, as printed) has `value`.
    pub(crate) async fn wait_metric(&self, series: &str, value: f64) {
        let mut last = None;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                last = metric(&self.metrics().await, series);
                if last == Some(value) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(found.is_ok(), "{series} should reach {value}, last seen {last:?}");
    }

    pub(crate) async fn wait_ready(&self, ready: bool, timeout: Duration) {
        let want = if ready { 200 } else { 503 };
        eventually(timeout, &format!("/readyz to answer {want}"), || async {
            (self.get("/readyz").await.0 == want).then_some(())
        })
        .await
    }

    /// Triggers shutdown and waits for `run_until_stopped` to return; returns
    /// how long that took.
    pub(crate) async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        let result = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("notify-svc stops within 30 s")
            .expect("the run task does not panic");
        result.expect("notify-svc stops without an error");
        started.elapsed()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The value of `series` (e.g. `events_consumed_total` or
/// `events_dead_lettered_total{reason="malformed"}`) in a scrape.
pub(crate) use testkit::metric;

/// The series of `name` (labels included) in a scrape.
pub(crate) fn series<'t>(text: &'t str, name: &str) -> Vec<&'t str> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .collect()
}

// ------------------------------------------------------------------- records

/// The shared broker with a new `partitions`-partition topic and its `.dlq`,
/// and a group id.
pub(crate) async fn broker_with_topic(partitions: i32) -> (Broker, String, String) {
    topic_on(Broker::shared().await.expect("broker starts"), partitions).await
}

/// Like [`broker_with_topic`], on a broker of its own that the test may stop.
pub(crate) async fn own_broker_with_topic(partitions: i32) -> (Broker, String, String) {
    topic_on(Broker::start().await.expect("broker starts"), partitions).await
}

async fn topic_on(broker: Broker, partitions: i32) -> (Broker, String, String) {
    let topic = unique("orders");
    broker.create_topics(&topic, partitions).await.expect("topics created");
    (broker, topic, unique("notify"))
}

/// A valid OrderCreated with fresh ids.
pub(crate) fn order_created() -> OrderCreated {
    let order_id = unique("order");
    OrderCreated {
        event_id: unique("event"),
        order: Some(Order {
            order_id,
            user_id: "user-42".into(),
            items: testkit::sample_items(),
            currency: "EUR".into(),
            total_minor: 4498,
            created_at: Some(orders_contract::timestamp(time::OffsetDateTime::now_utc())),
            request_id: String::new(),
        }),
        occurred_at: Some(orders_contract::timestamp(time::OffsetDateTime::now_utc())),
    }
}

pub(crate) fn order_id(event: &OrderCreated) -> String {
    event.order.as_ref().unwrap().order_id.clone()
}

/// What most tests start from: the shared broker with a new topic, a
/// webhook receiver, notify-svc ready with [`config`] for both (changed by
/// the test's `tweak`), and a publisher to the topic.
pub(crate) async fn webhook_setup(
    partitions: i32,
    tweak: impl FnOnce(&mut Config),
) -> (Broker, String, Receiver, TestApp, Publisher) {
    let (broker, topic, group) = broker_with_topic(partitions).await;
    let receiver = Receiver::start().await;
    let mut config = config(&broker, &topic, &group, Some(&receiver));
    tweak(&mut config);
    let app = TestApp::spawn_ready(config).await;
    let publisher = Publisher::new(&broker, &topic);
    (broker, topic, receiver, app, publisher)
}

/// Publishes raw records, optionally to a given partition.
#[derive(Clone)]
pub(crate) struct Publisher {
    producer: FutureProducer,
    topic: String,
}

impl Publisher {
    pub(crate) fn new(broker: &Broker, topic: &str) -> Self {
        Self::with_max_bytes(broker, topic, 1_000_000)
    }

    pub(crate) fn with_max_bytes(broker: &Broker, topic: &str, max_bytes: usize) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", broker.addr())
            .set("linger.ms", "0")
            .set("message.max.bytes", max_bytes.to_string())
            .create()
            .unwrap();
        Self {
            producer,
            topic: topic.to_owned(),
        }
    }

    pub(crate) async fn raw(&self, partition: Option<i32>, key: &[u8], value: &[u8], headers: &[(&str, &[u8])]) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record = FutureRecord::to(&self.topic).key(key).payload(value).headers(h);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("record published");
    }

    /// Publishes `event` as order-svc does, plus `extra` headers.
    pub(crate) async fn event(&self, partition: Option<i32>, event: &OrderCreated, extra: &[(&str, &str)]) {
        let record = envelope::encode_order_created(event, "/order-svc");
        let mut headers: Vec<(&str, &[u8])> = record.headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_bytes())));
        self.raw(partition, record.key.as_bytes(), &record.value, &headers)
            .await;
    }

    /// Publishes a fresh valid order; returns it.
    pub(crate) async fn order(&self, partition: Option<i32>) -> OrderCreated {
        let event = order_created();
        self.event(partition, &event, &[]).await;
        event
    }
}
