//! The consumer-group member: fetches records, runs one worker per assigned
//! partition (records of a partition are handled in order; partitions proceed
//! independently), stores each record's offset only after it is handled, and
//! commits on revoke, periodically (librdkafka's auto-commit of *stored*
//! offsets) and on shutdown.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    message::{Message, OwnedMessage},
    statistics::Statistics,
    topic_partition_list::TopicPartitionList,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{Metrics, PartitionLabels},
    processor::{Outcome, Processor},
};

/// librdkafka statistics interval: feeds `kafka_consumer_lag` and readiness.
pub const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// Consumer defaults; `KAFKA_OPTIONS` overrides any of them.
///
/// `enable.auto.offset.store=false` is the heart of at-least-once: librdkafka
/// auto-commits only offsets this service stored, after handling. New groups
/// start at the earliest record so nothing published before they joined is
/// missed. `queued.max.messages.kbytes` bounds the prefetch memory.
pub fn consumer_defaults(group_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("group.id", group_id.to_owned()),
        ("enable.auto.commit", "true".into()),
        ("auto.commit.interval.ms", "1000".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", "earliest".into()),
        ("enable.partition.eof", "false".into()),
        ("statistics.interval.ms", STATS_INTERVAL.as_millis().to_string()),
        ("queued.max.messages.kbytes", "16384".into()),
        ("reconnect.backoff.ms", "50".into()),
        ("reconnect.backoff.max.ms", "1000".into()),
    ]
}

type Key = (String, i32);

#[derive(Debug)]
struct Worker {
    tx: mpsc::Sender<OwnedMessage>,
    /// Cancelled on revoke or shutdown: finish the record in hand, then stop.
    stop: CancellationToken,
    /// Cancelled on revoke only: the partition is someone else's now, so
    /// offsets must not be stored for it.
    revoked: CancellationToken,
}

/// Whether the consumer has a live broker connection and group membership,
/// from librdkafka's statistics.
#[derive(Debug, Default)]
pub struct Liveness {
    member: AtomicBool,
    broker_up: AtomicBool,
    last_stats: Mutex<Option<Instant>>,
}

impl Liveness {
    /// True while the latest statistics (fresh ones) show a connected broker
    /// and a joined group.
    pub fn ready(&self) -> bool {
        let fresh = self
            .last_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < STATS_INTERVAL * 3);
        fresh && self.member.load(Ordering::Relaxed) && self.broker_up.load(Ordering::Relaxed)
    }
}

/// Callbacks librdkafka makes: rebalances, statistics, errors.
#[derive(Debug)]
pub struct ConsumerCtx {
    workers: Arc<Mutex<HashMap<Key, Worker>>>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
}

impl ClientContext for ConsumerCtx {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    let labels = PartitionLabels {
                        topic: topic.clone(),
                        partition: partition.to_string(),
                    };
                    self.metrics.lag.get_or_create(&labels).set(p.consumer_lag);
                }
            }
        }
        let member = stats.cgrp.as_ref().is_some_and(|g| g.state == "up");
        let broker_up = stats.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        self.liveness.member.store(member, Ordering::Relaxed);
        self.liveness.broker_up.store(broker_up, Ordering::Relaxed);
        *self.liveness.last_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            for element in tpl.elements() {
                if let Some(worker) = workers.remove(&(element.topic().to_owned(), element.partition())) {
                    worker.revoked.cancel();
                    worker.stop.cancel();
                }
            }
            drop(workers);
            commit(consumer, "revoke");
            tracing::info!(partitions = %describe(tpl), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = %describe(offsets), "offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => {
                tracing::warn!(%error, "offset commit failed; will retry with the next commit")
            }
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| match e.offset().to_raw() {
            Some(o) if o >= 0 => format!("{}[{}]@{o}", e.topic(), e.partition()),
            _ => format!("{}[{}]", e.topic(), e.partition()),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Commits the stored offsets synchronously; "nothing to commit" is fine.
fn commit<C: ConsumerContext>(consumer: &impl Consumer<C>, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(when, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, when, "offset commit failed"),
    }
}

/// The running consumer.
pub struct Pipeline {
    consumer: Arc<StreamConsumer<ConsumerCtx>>,
    workers: Arc<Mutex<HashMap<Key, Worker>>>,
    processor: Arc<Processor>,
    buffer: usize,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("buffer", &self.buffer).finish()
    }
}

impl Pipeline {
    /// Creates the consumer (not yet subscribed).
    pub fn new(
        config: &rdkafka::ClientConfig,
        processor: Arc<Processor>,
        metrics: Arc<Metrics>,
        liveness: Arc<Liveness>,
        buffer: usize,
    ) -> KafkaResult<Self> {
        let workers = Arc::new(Mutex::new(HashMap::new()));
        let context = ConsumerCtx {
            workers: workers.clone(),
            metrics,
            liveness,
        };
        let consumer: StreamConsumer<ConsumerCtx> = config.create_with_context(context)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            workers,
            processor,
            buffer,
        })
    }

    /// The underlying client, for start-up checks.
    pub fn client(&self) -> &rdkafka::client::Client<ConsumerCtx> {
        self.consumer.client()
    }

    /// Joins the group on `topic` and handles records until `shutdown` is
    /// cancelled; then finishes records in hand (for at most `grace`), commits
    /// and leaves the group.
    pub async fn run(self, topic: &str, shutdown: CancellationToken, grace: Duration) -> KafkaResult<()> {
        self.consumer.subscribe(&[topic])?;
        tracing::info!(topic, "subscribed; joining the group");
        let mut tasks = JoinSet::new();
        loop {
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                message = self.consumer.recv() => message,
            };
            let message = match message {
                Ok(m) => m.detach(),
                Err(error) => {
                    tracing::warn!(%error, "fetch failed; the client keeps reconnecting");
                    continue;
                }
            };
            let tx = self.worker_for(&message, &shutdown, &mut tasks);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                sent = tx.send(message) => {
                    // A closed channel means the partition was revoked meanwhile;
                    // the record will be delivered to its new owner.
                    let _ = sent;
                }
            }
            // Reap finished workers so the set does not grow.
            while tasks.try_join_next().is_some() {}
        }

        tracing::info!("stopping: no more fetches; finishing records in hand");
        self.workers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "records still in hand after the grace period; they will be redelivered"
            );
            tasks.shutdown().await;
        }
        let consumer = self.consumer;
        tokio::task::spawn_blocking(move || {
            commit(consumer.as_ref(), "shutdown");
            consumer.unsubscribe();
            // Dropping the last handle closes the consumer: it leaves the group.
            drop(consumer);
        })
        .await
        .map_err(|_| KafkaError::Canceled)?;
        tracing::info!("offsets committed; left the group");
        Ok(())
    }

    fn worker_for(
        &self,
        message: &OwnedMessage,
        shutdown: &CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> mpsc::Sender<OwnedMessage> {
        let key = (message.topic().to_owned(), message.partition());
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(worker) = workers.get(&key) {
            return worker.tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.buffer);
        let stop = shutdown.child_token();
        let revoked = CancellationToken::new();
        tasks.spawn(run_worker(
            rx,
            self.processor.clone(),
            self.consumer.clone(),
            stop.clone(),
            revoked.clone(),
        ));
        workers.insert(
            key,
            Worker {
                tx: tx.clone(),
                stop,
                revoked,
            },
        );
        tx
    }
}

async fn run_worker(
    mut rx: mpsc::Receiver<OwnedMessage>,
    processor: Arc<Processor>,
    consumer: Arc<StreamConsumer<ConsumerCtx>>,
    stop: CancellationToken,
    revoked: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            message = rx.recv() => match message {
                Some(m) => m,
                None => return,
            },
        };
        match processor.process(&message, &stop).await {
            Outcome::Handled if !revoked.is_cancelled() => {
                // Stores offset + 1: the next record to read.
                if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
                    tracing::debug!(%error, "offset not stored (partition no longer assigned)");
                }
            }
            Outcome::Handled => {}
            Outcome::Stopped => return,
        }
    }
}
