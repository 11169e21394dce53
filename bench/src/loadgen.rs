//! The `CreateOrder` load generator.
//!
//! Closed loop: `concurrency` callers, each sending its next call as soon as
//! the previous one answers, spread round-robin over `connections` HTTP/2
//! connections (one tonic `Channel` each). Open loop: calls are scheduled at
//! a fixed rate whatever the answers do, and latency is measured from the
//! *scheduled* time, so a server that falls behind shows its queueing delay
//! instead of slowing the generator down (no coordinated omission).

use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use orders_contract::v1::{CreateOrderRequest, LineItem, order_service_client::OrderServiceClient};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::stats;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `http://host:port` of an `orders.v1.OrderService`.
    pub target: String,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Calls in flight (closed loop).
    pub concurrency: usize,
    /// Calls per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Keep each answered order id with its call's start time (for end-to-end
    /// latency from the notification log).
    pub track_orders: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Calls answered OK in the measured window.
    pub ok: u64,
    /// Calls that failed in the measured window.
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Call latency (open loop: from the scheduled time).
    pub latency: Histogram<u64>,
    /// Open loop only: from the moment the call was actually sent.
    pub service_time: Option<Histogram<u64>>,
    /// Order ids and the wall-clock time their call started.
    pub started: Vec<(String, SystemTime)>,
}

impl LoadResult {
    /// Answered calls per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A valid request: two lines, EUR, no idempotency key.
/// The two lines of every benchmark order (the same in requests and in
/// pre-filled events, so records are the size the service writes).
pub fn items() -> Vec<LineItem> {
    vec![
        LineItem {
            sku: "SKU-12345".into(),
            quantity: 2,
            unit_price_minor: 1999,
        },
        LineItem {
            sku: "SKU-777".into(),
            quantity: 1,
            unit_price_minor: 500,
        },
    ]
}

pub fn request(i: u64) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: format!("bench-user-{}", i % 1000),
        currency: "EUR".into(),
        items: items(),
        request_id: String::new(),
    }
}

/// Opens `n` distinct HTTP/2 connections to `target`.
pub async fn connect(target: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(target.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

/// Runs `spec` to completion.
pub async fn run(spec: &LoadSpec) -> anyhow::Result<LoadResult> {
    let channels = connect(&spec.target, spec.connections).await?;
    // One call per connection first, so connection set-up is not measured.
    for channel in &channels {
        let _ = OrderServiceClient::new(channel.clone()).create_order(request(0)).await;
    }
    match spec.rate {
        None => closed_loop(spec, channels).await,
        Some(rate) => open_loop(spec, channels, rate).await,
    }
}

#[derive(Debug)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
    service_time: Histogram<u64>,
    started: Vec<(String, SystemTime)>,
}

impl Tally {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            first_error: None,
            latency: stats::histogram(),
            service_time: stats::histogram(),
            started: Vec::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        let _ = self.latency.add(&other.latency);
        let _ = self.service_time.add(&other.service_time);
        self.started.extend(other.started);
    }

    fn outcome(
        &mut self,
        result: Result<tonic::Response<orders_contract::v1::CreateOrderResponse>, tonic::Status>,
        track: bool,
        wall: SystemTime,
    ) {
        match result {
            Ok(response) => {
                self.ok += 1;
                if track && let Some(order) = response.into_inner().order {
                    self.started.push((order.order_id, wall));
                }
            }
            Err(status) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
    }
}

async fn closed_loop(spec: &LoadSpec, channels: Vec<Channel>) -> anyhow::Result<LoadResult> {
    let measure_from = Instant::now() + spec.warmup;
    let end = measure_from + spec.duration;
    let mut workers = JoinSet::new();
    for w in 0..spec.concurrency.max(1) {
        let mut client = OrderServiceClient::new(channels[w % channels.len()].clone());
        let track = spec.track_orders;
        workers.spawn(async move {
            let mut tally = Tally::new();
            let mut i = (w as u64) << 32;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let wall = SystemTime::now();
                let result = client.create_order(request(i)).await;
                i += 1;
                if t0 < measure_from {
                    continue;
                }
                stats::record(&mut tally.latency, t0.elapsed());
                tally.outcome(result, track, wall);
            }
            tally
        });
    }
    let mut total = Tally::new();
    while let Some(tally) = workers.join_next().await {
        total.merge(tally?);
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    Ok(LoadResult {
        ok: total.ok,
        errors: total.errors,
        first_error: total.first_error,
        elapsed,
        latency: total.latency,
        service_time: None,
        started: total.started,
    })
}

async fn open_loop(spec: &LoadSpec, channels: Vec<Channel>, rate: f64) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(rate > 0.0, "the rate must be positive");
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let clients: Vec<_> = channels.into_iter().map(OrderServiceClient::new).collect();
    let mut calls = JoinSet::new();
    let mut total = Tally::new();
    let mut i: u64 = 0;
    loop {
        let scheduled = start + period.mul_f64(i as f64);
        if scheduled >= end {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        let mut client = clients[i as usize % clients.len()].clone();
        let track = spec.track_orders && scheduled >= measure_from;
        calls.spawn(async move {
            let sent = Instant::now();
            let wall = SystemTime::now();
            let result = client.create_order(request(i)).await;
            (scheduled, sent, Instant::now(), wall, result, track)
        });
        i += 1;
        // Reap finished calls as we go so memory stays flat at high rates.
        while let Some(done) = calls.try_join_next() {
            reap(&mut total, done?, measure_from);
        }
    }
    while let Some(done) = calls.join_next().await {
        reap(&mut total, done?, measure_from);
    }
    Ok(LoadResult {
        ok: total.ok,
        errors: total.errors,
        first_error: total.first_error,
        elapsed: spec.duration,
        latency: total.latency,
        service_time: Some(total.service_time),
        started: total.started,
    })
}

type Call = (
    Instant,
    Instant,
    Instant,
    SystemTime,
    Result<tonic::Response<orders_contract::v1::CreateOrderResponse>, tonic::Status>,
    bool,
);

fn reap(total: &mut Tally, call: Call, measure_from: Instant) {
    let (scheduled, sent, done, wall, result, track) = call;
    if scheduled < measure_from {
        return;
    }
    stats::record(&mut total.latency, done - scheduled);
    stats::record(&mut total.service_time, done - sent);
    total.outcome(result, track, wall);
}
