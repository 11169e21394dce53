//! The consumer-group member: a fetch loop on a thread of its own serves the
//! client (rebalances, statistics) and hands each record to its partition's
//! worker through a bounded buffer; records of a partition are handled in
//! order and partitions proceed independently. Each assigned partition has
//! its own client queue, so when one partition's buffer is full that queue is
//! simply not read until its worker catches up (the client stops fetching
//! the partition at its prefetch bound), and a slow partition never stops
//! the others, the group membership or the statistics readiness is built on.
//! Each record's offset is stored only after it is handled; stored offsets are
//! committed periodically (librdkafka's auto-commit of *stored* offsets), on
//! revoke (after the revoked partitions' work in hand has finished or been
//! abandoned) and on shutdown.
//!
//! By job: [`callbacks`] (what librdkafka calls back), [`fetch`] (the fetch
//! loop), [`worker`] (a partition's worker); this module wires them.

mod callbacks;
mod fetch;
mod worker;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

pub use callbacks::{ConsumerCtx, ConsumerHealth};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext},
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    topic_partition_list::TopicPartitionList,
};
use tokio::{runtime::Handle, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    processor::Processor,
    throttle::{ERROR_LOG_INTERVAL, Throttled},
};
use fetch::{Fetcher, Wake, Workers};

/// librdkafka statistics interval: feeds `kafka_consumer_lag` and readiness.
pub const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// Consumer defaults; `KAFKA_OPTIONS` overrides any of them.
///
/// `enable.auto.offset.store=false` is the heart of at-least-once: librdkafka
/// auto-commits only offsets this service stored, after handling. New groups
/// start at the earliest record so nothing published before they joined is
/// missed.
///
/// Prefetch memory: `queued.max.messages.kbytes` bounds librdkafka's queue
/// per partition, and a fetch may overshoot it by `fetch.message.max.bytes`
/// (1 MiB) per partition. Both count record *values* only, while a queued
/// record also holds its key, headers, a share of the fetch response it came
/// in and a librdkafka op of several hundred bytes: with order-sized records
/// the queue's real footprint is several times its nominal size. A catch-up's
/// peak RSS is mostly these queues, the partition buffers and the dedup
/// cache, so the queue is as small as keeps the workers fed while the broker
/// answers the next fetch on a busy machine (BENCHMARKS.md). When a queue is
/// full librdkafka waits `fetch.queue.backoff.ms` (1 s by default) before
/// fetching that partition again: longer than a small queue lasts during a
/// catch-up, so the short backoff lets a small queue keep up.
pub fn consumer_defaults(group_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("group.id", group_id.to_owned()),
        ("enable.auto.commit", "true".into()),
        ("auto.commit.interval.ms", "1000".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", "earliest".into()),
        ("enable.partition.eof", "false".into()),
        ("statistics.interval.ms", STATS_INTERVAL.as_millis().to_string()),
        ("queued.max.messages.kbytes", "1536".into()),
        ("fetch.queue.backoff.ms", "10".into()),
        ("reconnect.backoff.ms", "50".into()),
        ("reconnect.backoff.max.ms", "1000".into()),
    ]
}

type Key = (String, i32);

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
/// Nothing is committed when the assignment was lost (the group moved on
/// without this member): those offsets are not ours to commit any more.
fn commit<C: ConsumerContext>(consumer: &impl Consumer<C>, when: &str) {
    if consumer.assignment_lost() {
        tracing::warn!(when, "assignment lost; not committing");
        return;
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(when, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, when, "offset commit failed"),
    }
}

/// How long shutdown waits for the final commit and leaving the group (the
/// broker may be gone: then the group expires the membership by itself).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The running consumer.
pub struct Pipeline {
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    workers: Arc<Mutex<Workers>>,
    processor: Arc<Processor>,
    wake: Arc<Wake>,
    buffer: usize,
    buffer_bytes: usize,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("buffer", &self.buffer)
            .field("buffer_bytes", &self.buffer_bytes)
            .finish()
    }
}

impl Pipeline {
    /// Creates the consumer (not yet subscribed). `buffer` records, of at
    /// most `buffer_bytes` together, may wait per partition for its worker;
    /// beyond them the partition's records wait in the client, which
    /// prefetches up to `queued.max.messages.kbytes` per partition.
    pub fn new(
        config: &rdkafka::ClientConfig,
        processor: Arc<Processor>,
        metrics: Arc<Metrics>,
        health: Arc<ConsumerHealth>,
        buffer: usize,
        buffer_bytes: usize,
    ) -> KafkaResult<Self> {
        let workers = Arc::new(Mutex::new(Workers::default()));
        let wake = Arc::new(Wake::default());
        let context = ConsumerCtx {
            workers: workers.clone(),
            consumer: OnceLock::new(),
            wake: wake.clone(),
            assigned: Mutex::new(HashSet::new()),
            metrics,
            health,
            errors: Throttled::new(ERROR_LOG_INTERVAL),
            drain: OnceLock::new(),
        };
        let consumer = Arc::new(config.create_with_context::<_, BaseConsumer<ConsumerCtx>>(context)?);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        Ok(Self {
            consumer,
            workers,
            processor,
            wake,
            buffer,
            buffer_bytes,
        })
    }

    /// The underlying client, for start-up checks.
    pub fn client(&self) -> &rdkafka::client::Client<ConsumerCtx> {
        self.consumer.client()
    }

    /// Joins the group on `topic` and handles records until `shutdown` is
    /// cancelled; then finishes records in hand (for at most `grace`), commits
    /// and leaves the group (for at most [`CLOSE_TIMEOUT`]). A fatal client
    /// error stops it the same way and is returned. `grace` also bounds how
    /// long a revoke waits for the revoked partitions' records in hand.
    ///
    /// The client is polled on a thread of its own: a rebalance callback may
    /// block it while revoked workers finish, and the workers run on this
    /// runtime meanwhile, whatever its flavour.
    pub async fn run(self, topic: &str, shutdown: CancellationToken, grace: Duration) -> KafkaResult<()> {
        self.consumer.subscribe(&[topic])?;
        tracing::info!(topic, "subscribed; joining the group");
        let runtime = Handle::current();
        let _ = self.consumer.context().drain.set((runtime.clone(), grace));
        // Cancelled if this future is dropped with its runtime (not a clean
        // stop): the fetch thread then stops without waiting on the runtime.
        let orphaned = CancellationToken::new();
        let orphan_guard = orphaned.clone().drop_guard();
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let consumer = self.consumer.clone();
        let fetcher = Fetcher {
            consumer: self.consumer,
            workers: self.workers,
            processor: self.processor,
            buffer: self.buffer.max(1),
            buffer_bytes: self.buffer_bytes,
            wake: self.wake,
            shutdown,
            orphaned,
            runtime,
            tasks: JoinSet::new(),
        };
        std::thread::Builder::new()
            .name("kafka-fetch".into())
            .spawn(move || {
                let outcome = fetcher.run(grace);
                let _ = stopped_tx.send(outcome);
                // Commit and close here: both block, and with the broker gone
                // they can take long; the process must still exit.
                commit(consumer.as_ref(), "shutdown");
                consumer.unsubscribe();
                // Dropping the last handle closes the consumer: it leaves the group.
                drop(consumer);
                let _ = closed_tx.send(());
            })
            .map_err(|error| KafkaError::ClientCreation(format!("cannot start the fetch thread: {error}")))?;
        let outcome = stopped_rx.await.unwrap_or_else(|_| {
            tracing::error!("the fetch thread failed; stopping");
            Err(KafkaError::Canceled)
        });
        match tokio::time::timeout(CLOSE_TIMEOUT, closed_rx).await {
            Ok(_) => tracing::info!("offsets committed; left the group"),
            Err(_) => tracing::warn!(
                timeout = ?CLOSE_TIMEOUT,
                "commit and leave did not finish in time; uncommitted records will be redelivered"
            ),
        }
        orphan_guard.disarm();
        outcome
    }
}
