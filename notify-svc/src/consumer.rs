//! The consumer-group member: fetches records, runs one worker per assigned
//! partition (records of a partition are handled in order; partitions proceed
//! independently while their buffers have room), stores each record's offset
//! only after it is handled, and commits on
//! revoke, periodically (librdkafka's auto-commit of *stored* offsets) and on
//! shutdown.

use std::{
    collections::{HashMap, HashSet},
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
use service_kit::telemetry::LogBatch;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    metrics::{Metrics, PartitionLabels},
    processor::{Outcome, Processor},
};

/// At most this many records share one batch of log lines (one `write(2)`):
/// ~20 KiB of text, and the worker yields to the others in between.
const MAX_BATCH: usize = 64;

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
/// per partition. When it is full librdkafka waits `fetch.queue.backoff.ms`
/// before fetching that partition again: 1 s by default, longer than a small
/// queue lasts at 100k records/s, so the consumer starved (8 MiB queues cost
/// a quarter of the catch-up rate). With a 10 ms backoff 2 MiB queues keep
/// up: a catch-up of 3 partitions peaks at ~47 MiB RSS (4 MiB: ~61 MiB for
/// ~3% more speed; 16 MiB with the 1 s backoff: ~108 MiB and slower).
/// BENCHMARKS.md, tuning (b).
pub fn consumer_defaults(group_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("group.id", group_id.to_owned()),
        ("enable.auto.commit", "true".into()),
        ("auto.commit.interval.ms", "1000".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", "earliest".into()),
        ("enable.partition.eof", "false".into()),
        ("statistics.interval.ms", STATS_INTERVAL.as_millis().to_string()),
        ("queued.max.messages.kbytes", "2048".into()),
        ("fetch.queue.backoff.ms", "10".into()),
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
    /// Cancelled when the worker's task has ended (returned or aborted).
    done: CancellationToken,
}

/// The workers of the assigned partitions, and the `done` signals of revoked
/// workers that may still be finishing a record: a new worker for the same
/// partition (an eager rebalance revokes everything and often hands the same
/// partitions back) waits for its predecessor, so one partition is never
/// handled by two tasks at once.
#[derive(Debug, Default)]
struct Workers {
    active: HashMap<Key, Worker>,
    retiring: HashMap<Key, CancellationToken>,
}

impl Workers {
    fn retire(&mut self, key: &Key) {
        if let Some(worker) = self.active.remove(key) {
            worker.revoked.cancel();
            worker.stop.cancel();
            self.retiring.insert(key.clone(), worker.done);
        }
    }
}

/// Logs a recurring error at most once per interval, counting the rest, so an
/// outage does not flood the log.
#[derive(Debug)]
pub(crate) struct Throttled {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    pub(crate) const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Some(number suppressed since the last log line) when this one should be logged.
    pub(crate) fn check(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

/// How often the same kind of client error is logged at most.
pub(crate) const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
    workers: Arc<Mutex<Workers>>,
    /// Partitions assigned to this member: the only ones with a lag gauge.
    assigned: Mutex<HashSet<Key>>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
    errors: Throttled,
}

impl ClientContext for ConsumerCtx {
    fn stats(&self, stats: Statistics) {
        let assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 && assigned.contains(&(topic.clone(), *partition)) {
                    let labels = PartitionLabels {
                        topic: topic.clone(),
                        partition: partition.to_string(),
                    };
                    self.metrics.lag.get_or_create(&labels).set(p.consumer_lag);
                }
            }
        }
        drop(assigned);
        let member = stats.cgrp.as_ref().is_some_and(|g| g.state == "up");
        let broker_up = stats.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        self.liveness.member.store(member, Ordering::Relaxed);
        self.liveness.broker_up.store(broker_up, Ordering::Relaxed);
        *self.liveness.last_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(suppressed) = self.errors.check() {
            tracing::warn!(%error, reason, suppressed, "Kafka client error; the client keeps reconnecting");
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
            for element in tpl.elements() {
                let key = (element.topic().to_owned(), element.partition());
                workers.retire(&key);
                assigned.remove(&key);
                self.metrics.lag.remove(&PartitionLabels {
                    topic: key.0,
                    partition: key.1.to_string(),
                });
            }
            drop((workers, assigned));
            commit(consumer, "revoke");
            tracing::info!(partitions = %describe(tpl), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
                for element in tpl.elements() {
                    assigned.insert((element.topic().to_owned(), element.partition()));
                }
                drop(assigned);
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

/// Pause after a fetch error, so that a burst of errors cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The running consumer.
pub struct Pipeline {
    consumer: Arc<StreamConsumer<ConsumerCtx>>,
    workers: Arc<Mutex<Workers>>,
    processor: Arc<Processor>,
    buffer: usize,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("buffer", &self.buffer).finish()
    }
}

impl Pipeline {
    /// Creates the consumer (not yet subscribed). `buffer` records may wait
    /// per partition for its worker before the fetch loop waits for it.
    pub fn new(
        config: &rdkafka::ClientConfig,
        processor: Arc<Processor>,
        metrics: Arc<Metrics>,
        liveness: Arc<Liveness>,
        buffer: usize,
    ) -> KafkaResult<Self> {
        let workers = Arc::new(Mutex::new(Workers::default()));
        let context = ConsumerCtx {
            workers: workers.clone(),
            assigned: Mutex::new(HashSet::new()),
            metrics,
            liveness,
            errors: Throttled::new(ERROR_LOG_INTERVAL),
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
    /// and leaves the group (for at most [`CLOSE_TIMEOUT`]). A fatal client
    /// error stops it the same way and is returned.
    pub async fn run(self, topic: &str, shutdown: CancellationToken, grace: Duration) -> KafkaResult<()> {
        self.consumer.subscribe(&[topic])?;
        tracing::info!(topic, "subscribed; joining the group");
        let mut tasks = JoinSet::new();
        let outcome = loop {
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                message = self.consumer.recv() => message,
            };
            let message = match message {
                Ok(m) => m.detach(),
                Err(error @ KafkaError::MessageConsumptionFatal(_)) => {
                    tracing::error!(%error, "fatal consumer error; stopping");
                    break Err(error);
                }
                Err(error) => {
                    if let Some(suppressed) = self.consumer.context().errors.check() {
                        tracing::warn!(%error, suppressed, "fetch failed; the client keeps reconnecting");
                    }
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break Ok(()),
                        () = tokio::time::sleep(ERROR_PAUSE) => continue,
                    }
                }
            };
            let tx = self.worker_for(&message, &shutdown, &mut tasks);
            // Back-pressure: when this partition's buffer is full, the fetch
            // loop waits for its worker, and librdkafka's bounded prefetch
            // queue stops fetching. Pausing only the slow partition would
            // isolate it further, but librdkafka purges a paused partition's
            // prefetched records and refetches them on resume: in a catch-up
            // every partition cycles through that every few milliseconds, and
            // the refetch starts mid-batch, which Tansu 0.6's memory storage
            // answers with nothing (measured: the consumer stalled for good).
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                // A closed channel means the partition was revoked meanwhile;
                // the record will be delivered to its new owner.
                _ = tx.send(message) => {}
            }
            // Reap finished workers so the set does not grow.
            while tasks.try_join_next().is_some() {}
        };

        tracing::info!("stopping: no more fetches; finishing records in hand");
        self.workers.lock().unwrap_or_else(|e| e.into_inner()).active.clear();
        let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "records still in hand after the grace period; they will be redelivered"
            );
            tasks.shutdown().await;
        }
        // Commit and close on a thread of its own: both block, and with the
        // broker gone they can take long; the process must still exit.
        let consumer = self.consumer;
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("kafka-close".into()).spawn(move || {
            commit(consumer.as_ref(), "shutdown");
            consumer.unsubscribe();
            // Dropping the last handle closes the consumer: it leaves the group.
            drop(consumer);
            let _ = closed_tx.send(());
        });
        match spawned {
            Ok(_) => match tokio::time::timeout(CLOSE_TIMEOUT, closed_rx).await {
                Ok(_) => tracing::info!("offsets committed; left the group"),
                Err(_) => tracing::warn!(
                    timeout = ?CLOSE_TIMEOUT,
                    "commit and leave did not finish in time; uncommitted records will be redelivered"
                ),
            },
            Err(error) => tracing::warn!(%error, "cannot start the close thread; not committing"),
        }
        outcome
    }

    fn worker_for(
        &self,
        message: &OwnedMessage,
        shutdown: &CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> mpsc::Sender<OwnedMessage> {
        let (topic, partition) = (message.topic(), message.partition());
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        // A scan instead of a lookup: a member has a handful of partitions,
        // and a lookup would allocate the topic name for every record.
        if let Some(worker) = workers
            .active
            .iter()
            .find_map(|((t, p), w)| (*p == partition && t == topic).then_some(w))
        {
            return worker.tx.clone();
        }
        let key = (topic.to_owned(), partition);
        let after = workers.retiring.remove(&key);
        workers.retiring.retain(|_, done| !done.is_cancelled());
        let (tx, rx) = mpsc::channel(self.buffer.max(1));
        let stop = shutdown.child_token();
        let revoked = CancellationToken::new();
        let done = CancellationToken::new();
        tasks.spawn(run_worker(
            rx,
            self.processor.clone(),
            self.consumer.clone(),
            Signals {
                stop: stop.clone(),
                revoked: revoked.clone(),
                done: done.clone(),
                after,
            },
        ));
        workers.active.insert(
            key,
            Worker {
                tx: tx.clone(),
                stop,
                revoked,
                done,
            },
        );
        tx
    }
}

/// What a worker listens to and tells.
struct Signals {
    stop: CancellationToken,
    revoked: CancellationToken,
    /// Cancelled (through a drop guard) when the worker ends.
    done: CancellationToken,
    /// The previous worker of the partition, which must end first.
    after: Option<CancellationToken>,
}

async fn run_worker(
    mut rx: mpsc::Receiver<OwnedMessage>,
    processor: Arc<Processor>,
    consumer: Arc<StreamConsumer<ConsumerCtx>>,
    signals: Signals,
) {
    let Signals {
        stop,
        revoked,
        done,
        after,
    } = signals;
    let _done: DropGuard = done.drop_guard();
    if let Some(previous) = after {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = previous.cancelled() => {}
        }
    }
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            message = rx.recv() => match message {
                Some(m) => m,
                None => return,
            },
        };
        // With the log sink, the records already waiting are handled as one
        // batch whose notification lines go out in one write(2) (a third of
        // the catch-up's CPU was one write(2) per line); their offsets are
        // stored only after that write, so a notification whose line could
        // still be lost with the process is never past the stored offset.
        let batch = processor.notifies_by_log().then(LogBatch::open);
        let mut handled: Option<OwnedMessage> = None;
        let mut next = Some(first);
        let mut stopped = false;
        let mut count = 0;
        while let Some(message) = next.take() {
            match processor.process(&message, &stop).await {
                Outcome::Handled => handled = Some(message),
                Outcome::Stopped => {
                    stopped = true;
                    break;
                }
            }
            count += 1;
            if batch.is_some() && count < MAX_BATCH && !stop.is_cancelled() {
                next = rx.try_recv().ok();
            }
        }
        drop(batch);
        if let Some(message) = handled.filter(|_| !revoked.is_cancelled()) {
            // Stores offset + 1: the next record to read.
            if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
                tracing::debug!(%error, "offset not stored (partition no longer assigned)");
            }
        }
        if stopped {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_logs_once_per_interval_and_counts_the_rest() {
        let t = Throttled::new(Duration::from_millis(200));
        assert_eq!(t.check(), Some(0), "the first one is logged");
        assert_eq!(t.check(), None);
        assert_eq!(t.check(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.check(), Some(2), "then one line saying how many were skipped");
    }
}
