//! The Kafka ceilings, rdkafka without gRPC: a producer at a fixed
//! concurrency (ceiling 3), a consumer draining a pre-filled topic (ceiling
//! 4), the producer-to-consumer latency at a fixed rate, and the pre-fill
//! itself.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use orders_contract::envelope;
use rdkafka::{
    Message,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, Headers},
    producer::{FutureProducer, FutureRecord},
};
use service_kit::kafka::{KafkaOptions, Role, client_config};
use tokio::task::JoinSet;

use crate::{
    fixtures::{headers, sample_event, sample_record, service_producer_config},
    stats,
};

/// A closed-loop Kafka run.
#[derive(Debug)]
pub struct ProduceResult {
    /// Acknowledged records in the measured window.
    pub ok: u64,
    /// Failed ones.
    pub errors: u64,
    /// Measured window.
    pub elapsed: Duration,
    /// Send to acknowledgement.
    pub latency: Histogram<u64>,
}

/// Ceiling 3: `concurrency` tasks, each producing one record and awaiting
/// its acknowledgement before the next, with order-svc's producer settings.
pub async fn produce_closed_loop(
    brokers: &str,
    topic: &str,
    options: &KafkaOptions,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<ProduceResult> {
    let producer: FutureProducer = service_producer_config(brokers, options).create()?;
    let record = Arc::new(sample_record(0));
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let mut tasks = JoinSet::new();
    for task in 0..concurrency.max(1) {
        let (producer, record, topic) = (producer.clone(), record.clone(), topic.to_owned());
        tasks.spawn(async move {
            let (mut ok, mut errors, mut latency) = (0u64, 0u64, stats::histogram());
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                // A key per record, so records spread over the partitions.
                n += 1;
                let key = format!("{task}-{n}");
                let fr = FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&record.value)
                    .headers(headers(&record));
                let acked = match producer.send_result(fr) {
                    Ok(delivery) => matches!(delivery.await, Ok(Ok(_))),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        false
                    }
                };
                if t0 < measure_from {
                    continue;
                }
                if acked {
                    ok += 1;
                    stats::record(&mut latency, t0.elapsed());
                } else {
                    errors += 1;
                }
            }
            (ok, errors, latency)
        });
    }
    let mut total = ProduceResult {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: stats::histogram(),
    };
    while let Some(done) = tasks.join_next().await {
        let (ok, errors, latency) = done?;
        total.ok += ok;
        total.errors += errors;
        let _ = total.latency.add(&latency);
    }
    total.elapsed = Instant::now().saturating_duration_since(measure_from);
    Ok(total)
}

/// Fills `topic` with `count` valid `OrderCreated` records as fast as the
/// broker takes them (batching on); returns how long it took.
pub async fn prefill(brokers: &str, topic: &str, options: &KafkaOptions, count: u64) -> anyhow::Result<Duration> {
    let producer: FutureProducer = client_config(
        brokers,
        Role::Producer,
        [
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "20"),
            ("batch.num.messages", "10000"),
            ("batch.size", "1000000"),
            ("queue.buffering.max.messages", "1000000"),
            ("queue.buffering.max.kbytes", "1048576"),
            ("message.timeout.ms", "600000"),
        ],
        options,
    )
    .create()?;
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut failed = 0u64;
    for i in 0..count {
        let record = envelope::encode_order_created(&sample_event(i), "/bench-prefill");
        let mut fr = FutureRecord::to(topic)
            .key(&record.key)
            .payload(&record.value)
            .headers(headers(&record));
        loop {
            match producer.send_result(fr) {
                Ok(delivery) => {
                    inflight.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    match inflight.next().await {
                        Some(Ok(Ok(_))) => {}
                        Some(_) => failed += 1,
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                Err((error, _)) => anyhow::bail!("pre-fill produce failed: {error}"),
            }
        }
        while inflight.len() > 200_000 {
            if !matches!(inflight.next().await, Some(Ok(Ok(_)))) {
                failed += 1;
            }
        }
    }
    while let Some(done) = inflight.next().await {
        if !matches!(done, Ok(Ok(_))) {
            failed += 1;
        }
    }
    anyhow::ensure!(failed == 0, "{failed} pre-fill records were not acknowledged");
    Ok(started.elapsed())
}

fn consumer(brokers: &str, group: &str, options: &KafkaOptions) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = client_config(
        brokers,
        Role::Consumer,
        notify_svc::consumer::consumer_defaults(group),
        options,
    )
    .create()?;
    Ok(consumer)
}

/// Ceiling 4: how a raw consumer drained a topic.
#[derive(Debug, Clone, Copy)]
pub struct DrainResult {
    /// Records read.
    pub count: u64,
    /// Subscribe to first record (group join and first fetch).
    pub join: Duration,
    /// First record to last.
    pub drain: Duration,
}

impl DrainResult {
    /// Records per second after the first one arrived.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.drain.as_secs_f64().max(1e-9)
    }
}

/// Reads `count` records of `topic` in a new group with notify-svc's
/// consumer settings; blocking.
pub fn drain(
    brokers: &str,
    topic: &str,
    group: &str,
    options: &KafkaOptions,
    count: u64,
    timeout: Duration,
) -> anyhow::Result<DrainResult> {
    let consumer = consumer(brokers, group, options)?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut first = None;
    let mut n = 0u64;
    let mut bytes = 0usize;
    while n < count {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "raw consumer read {n} of {count} records within {timeout:?}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                first.get_or_insert_with(Instant::now);
                n += 1;
                bytes += message.payload_len();
            }
            Some(Err(error)) => anyhow::bail!("raw consumer: {error}"),
            None => {}
        }
    }
    let first = first.unwrap_or(started);
    std::hint::black_box(bytes);
    Ok(DrainResult {
        count: n,
        join: first - started,
        drain: first.elapsed(),
    })
}

/// The header the raw end-to-end run stamps on each record.
const SENT_AT: &str = "bench_sent_unix_ns";

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Raw end-to-end: records produced at `rate` per second with the service's
/// producer settings, read by a consumer with notify-svc's settings; latency
/// from the produce call to the consumer having the record.
#[derive(Debug)]
pub struct E2eResult {
    /// Records produced in the measured window.
    pub sent: u64,
    /// Of those, received.
    pub received: u64,
    /// Produce call to consumer.
    pub latency: Histogram<u64>,
}

/// Runs the raw end-to-end measurement on a fresh `topic`.
pub async fn end_to_end(
    brokers: &str,
    topic: &str,
    options: &KafkaOptions,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<E2eResult> {
    let consumer = consumer(brokers, &format!("{topic}-group"), options)?;
    consumer.subscribe(&[topic])?;
    let stop = Arc::new(AtomicBool::new(false));
    let measure_from_ns = Arc::new(AtomicU64::new(u64::MAX));
    let (assigned_tx, assigned_rx) = tokio::sync::oneshot::channel();
    let reader = {
        let (stop, measure_from_ns) = (stop.clone(), measure_from_ns.clone());
        std::thread::spawn(move || -> (u64, Histogram<u64>) {
            let mut assigned_tx = Some(assigned_tx);
            let (mut received, mut latency) = (0u64, stats::histogram());
            while !stop.load(Ordering::Relaxed) {
                let message = consumer.poll(Duration::from_millis(20));
                if assigned_tx.is_some() && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
                    let _ = assigned_tx.take().map(|tx| tx.send(()));
                }
                let Some(Ok(message)) = message else { continue };
                let now = unix_ns(SystemTime::now());
                let sent = message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == SENT_AT)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<u64>().ok())
                });
                if let Some(sent) = sent
                    && sent >= measure_from_ns.load(Ordering::Relaxed)
                {
                    received += 1;
                    stats::record(&mut latency, Duration::from_nanos(now.saturating_sub(sent)));
                }
            }
            (received, latency)
        })
    };
    tokio::time::timeout(Duration::from_secs(60), assigned_rx)
        .await
        .map_err(|_| anyhow::anyhow!("the raw consumer got no partitions within 60 s"))??;
    // Let the consumer settle on its fetch positions.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let producer: FutureProducer = service_producer_config(brokers, options).create()?;
    let record = sample_record(0);
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut deliveries = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut i = 0u64;
    loop {
        let scheduled = start + period.mul_f64(i as f64);
        if scheduled >= end {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        if scheduled >= measure_from && measure_from_ns.load(Ordering::Relaxed) == u64::MAX {
            measure_from_ns.store(unix_ns(SystemTime::now()), Ordering::Relaxed);
        }
        let stamp = unix_ns(SystemTime::now()).to_string();
        let headers = headers(&record).insert(Header {
            key: SENT_AT,
            value: Some(stamp.as_bytes()),
        });
        let key = i.to_string();
        let fr = FutureRecord::to(topic)
            .key(&key)
            .payload(&record.value)
            .headers(headers);
        if let Ok(delivery) = producer.send_result(fr) {
            deliveries.push(delivery);
            if scheduled >= measure_from {
                sent += 1;
            }
        }
        i += 1;
        while let Some(Some(_)) = futures::FutureExt::now_or_never(deliveries.next()) {}
    }
    while deliveries.next().await.is_some() {}
    // Give the last records time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (received, latency) = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the raw consumer thread panicked"))?;
    Ok(E2eResult {
        sent,
        received,
        latency,
    })
}
