//! The consumer-group member: a fetch loop on a thread of its own polls the
//! client (records, rebalances, statistics) and hands each record to its
//! partition's worker through a bounded buffer; records of a partition are
//! handled in order and partitions proceed independently. When one
//! partition's buffer is full its further records are held in order, up to
//! as many bytes as the client prefetches per partition, and then that
//! partition alone is paused until its worker catches up, so a slow partition
//! never stops the others, the group membership or the statistics readiness
//! is built on.
//! Each record's offset is stored only after it is handled; stored offsets are
//! committed periodically (librdkafka's auto-commit of *stored* offsets), on
//! revoke (after the revoked partitions' work in hand has finished or been
//! abandoned) and on shutdown.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    message::{Headers, Message, OwnedMessage},
    statistics::Statistics,
    topic_partition_list::TopicPartitionList,
};
use service_kit::telemetry::LogBatch;
use tokio::{
    runtime::Handle,
    sync::mpsc::{self, error::TrySendError},
    task::{AbortHandle, JoinSet},
};
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
    /// Bytes of the records in `tx`'s buffer ([`record_bytes`]).
    waiting: Arc<AtomicUsize>,
    /// Cancelled on revoke or shutdown: finish the record in hand, then stop.
    stop: CancellationToken,
    /// Cancelled when a revoked partition's work is abandoned at the drain
    /// deadline: the partition is someone else's now, so no offset may be
    /// stored for it.
    abandon: CancellationToken,
    /// Cancelled when the worker's task has ended (returned or aborted).
    done: CancellationToken,
    task: AbortHandle,
    /// The offset after the last record handed to this worker or held for it.
    /// A record below it is one the client fetched again (it refetches a
    /// resumed partition from the position the application reached) and is
    /// already on its way.
    next_offset: i64,
}

/// The workers of the assigned partitions, the records held for the paused
/// ones, and the `done` signals of revoked workers that may still be
/// finishing a record: a new worker for the same partition (an eager
/// rebalance revokes everything and often hands the same partitions back)
/// waits for its predecessor, so one partition is never handled by two tasks
/// at once.
#[derive(Debug, Default)]
struct Workers {
    active: HashMap<Key, Worker>,
    /// Records of partitions whose buffers were full.
    held: HashMap<Key, Held>,
    retiring: HashMap<Key, CancellationToken>,
}

/// The records of one partition waiting for room in its worker's buffer.
#[derive(Debug, Default)]
struct Held {
    /// Oldest first.
    records: VecDeque<OwnedMessage>,
    /// Their [`record_bytes`].
    bytes: usize,
    /// Whether the partition is paused: set once `bytes` reach the hold
    /// limit, cleared once they are down to half of it.
    paused: bool,
}

impl Held {
    fn push(&mut self, message: OwnedMessage) {
        self.bytes += record_bytes(&message);
        self.records.push_back(message);
    }
}

impl Workers {
    /// The active worker of `topic`/`partition`. A scan instead of a lookup:
    /// a member has a handful of partitions, and a lookup would allocate the
    /// topic name for every record.
    fn find(&mut self, topic: &str, partition: i32) -> Option<(&Key, &mut Worker)> {
        self.active.iter_mut().find(|((t, p), _)| *p == partition && t == topic)
    }
}

/// What a record takes in a partition buffer: its value, key and headers.
fn record_bytes(message: &OwnedMessage) -> usize {
    let headers = message.headers().map_or(0, |h| {
        h.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum()
    });
    message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len) + headers
}

impl Worker {
    /// Hands `message` to the worker unless its buffer is full: `buffer`
    /// records, or `max_bytes` of them (a record larger than that alone waits
    /// for an empty buffer). A record above `MAX_RECORD_BYTES` is only
    /// dead-lettered when its turn comes, so without the byte bound a slow
    /// partition could hold `buffer` of the largest records the broker serves.
    fn offer(&self, message: OwnedMessage, max_bytes: usize) -> Result<(), TrySendError<OwnedMessage>> {
        let size = record_bytes(&message);
        let waiting = self.waiting.load(Ordering::Acquire);
        if waiting > 0 && waiting + size > max_bytes {
            return Err(TrySendError::Full(message));
        }
        // Counted before it can be received (and uncounted by the worker).
        self.waiting.fetch_add(size, Ordering::AcqRel);
        self.tx.try_send(message).inspect_err(|_| {
            self.waiting.fetch_sub(size, Ordering::AcqRel);
        })
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
    /// The runtime the workers run on, and how long a revoke waits for them;
    /// set when the pipeline starts.
    drain: OnceLock<(Handle, Duration)>,
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
    /// On revoke: stops the revoked partitions' workers, drops the records
    /// held for them and lifts their pause (a partition handed back must not
    /// stay paused), waits for the record each worker has in hand (a webhook
    /// attempt, a dead-letter publish) and only then commits, so the new owner
    /// starts after it instead of handling it at the same time. The wait is
    /// bounded by the shutdown grace; work still running then is abandoned
    /// (its offset is not stored) and goes to the new owner. This runs on the
    /// fetch thread, so waiting here blocks no worker.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut revoked = Vec::new();
        let mut paused = TopicPartitionList::new();
        {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
            for element in tpl.elements() {
                let key = (element.topic().to_owned(), element.partition());
                if let Some(worker) = workers.active.remove(&key) {
                    worker.stop.cancel();
                    revoked.push((key.clone(), worker));
                }
                if workers.held.remove(&key).is_some_and(|held| held.paused) {
                    paused.add_partition(&key.0, key.1);
                }
                assigned.remove(&key);
                self.metrics.lag.remove(&PartitionLabels {
                    topic: key.0,
                    partition: key.1.to_string(),
                });
            }
        }
        if paused.count() > 0
            && let Err(error) = consumer.resume(&paused)
        {
            tracing::warn!(%error, partitions = %describe(&paused), "cannot resume revoked partitions");
        }
        // A lost assignment is already someone else's: nothing of it will be
        // committed, so its work is abandoned at once.
        let unfinished = self.drain(revoked, consumer.assignment_lost());
        if !unfinished.is_empty() {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.retiring.retain(|_, done| !done.is_cancelled());
            workers.retiring.extend(unfinished);
        }
        commit(consumer, "revoke");
        tracing::info!(partitions = %describe(tpl), "partitions revoked");
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

impl ConsumerCtx {
    /// Waits for the revoked workers to end, for at most the drain deadline,
    /// then abandons the ones still running (their offsets are not stored,
    /// their tasks are aborted). Returns the `done` signals of workers that
    /// had not ended even after that, for their successors to wait on.
    fn drain(&self, revoked: Vec<(Key, Worker)>, lost: bool) -> Vec<(Key, CancellationToken)> {
        if revoked.is_empty() {
            return Vec::new();
        }
        let all_ended = |workers: &[(Key, Worker)]| {
            let dones: Vec<CancellationToken> = workers.iter().map(|(_, w)| w.done.clone()).collect();
            async move {
                for done in dones {
                    done.cancelled().await;
                }
            }
        };
        let started = Instant::now();
        if let Some((runtime, deadline)) = self.drain.get().filter(|_| !lost) {
            let wait = all_ended(&revoked);
            if runtime
                .block_on(async { tokio::time::timeout(*deadline, wait).await })
                .is_ok()
            {
                tracing::debug!(elapsed = ?started.elapsed(), "revoked partitions' records in hand finished");
                return Vec::new();
            }
        }
        let late: Vec<(Key, Worker)> = revoked.into_iter().filter(|(_, w)| !w.done.is_cancelled()).collect();
        if late.is_empty() {
            return Vec::new();
        }
        for (_, worker) in &late {
            worker.abandon.cancel();
            worker.task.abort();
        }
        tracing::warn!(
            partitions = %late.iter().map(|((t, p), _)| format!("{t}[{p}]")).collect::<Vec<_>>().join(","),
            elapsed = ?started.elapsed(),
            lost,
            "records in hand of revoked partitions abandoned (not finished in time, or the assignment was lost); they go to the new owner"
        );
        if let Some((runtime, _)) = self.drain.get() {
            let wait = all_ended(&late);
            let _ = runtime.block_on(async { tokio::time::timeout(ABANDON_WAIT, wait).await });
        }
        late.into_iter()
            .filter(|(_, w)| !w.done.is_cancelled())
            .map(|(key, w)| (key, w.done))
            .collect()
    }
}

/// How long a revoke waits, after abandoning a worker, for its task to end.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

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

/// How long one poll waits for an event: the fetch loop notices shutdown
/// within it.
const POLL_IDLE: Duration = Duration::from_millis(100);

/// How long one poll waits while records are held: they go to their worker
/// (and a paused partition resumes) within it once the worker has room.
const POLL_HOLDING: Duration = Duration::from_millis(5);

/// The running consumer.
pub struct Pipeline {
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    workers: Arc<Mutex<Workers>>,
    processor: Arc<Processor>,
    buffer: usize,
    buffer_bytes: usize,
    hold_bytes: usize,
}

/// librdkafka's default `queued.max.messages.kbytes`.
const DEFAULT_HOLD_KBYTES: usize = 65_536;

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
    /// beyond them the partition's records are held up to
    /// `queued.max.messages.kbytes` (the client's own prefetch bound per
    /// partition), and then the partition is paused.
    pub fn new(
        config: &rdkafka::ClientConfig,
        processor: Arc<Processor>,
        metrics: Arc<Metrics>,
        liveness: Arc<Liveness>,
        buffer: usize,
        buffer_bytes: usize,
    ) -> KafkaResult<Self> {
        let workers = Arc::new(Mutex::new(Workers::default()));
        let context = ConsumerCtx {
            workers: workers.clone(),
            assigned: Mutex::new(HashSet::new()),
            metrics,
            liveness,
            errors: Throttled::new(ERROR_LOG_INTERVAL),
            drain: OnceLock::new(),
        };
        let hold_bytes = config
            .get("queued.max.messages.kbytes")
            .and_then(|kbytes| kbytes.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_HOLD_KBYTES)
            .saturating_mul(1024);
        let consumer: BaseConsumer<ConsumerCtx> = config.create_with_context(context)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            workers,
            processor,
            buffer,
            buffer_bytes,
            hold_bytes,
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
            hold_bytes: self.hold_bytes,
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

/// The fetch loop's state, owned by the fetch thread.
struct Fetcher {
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    workers: Arc<Mutex<Workers>>,
    processor: Arc<Processor>,
    buffer: usize,
    buffer_bytes: usize,
    hold_bytes: usize,
    shutdown: CancellationToken,
    orphaned: CancellationToken,
    runtime: Handle,
    tasks: JoinSet<()>,
}

impl Fetcher {
    /// Polls until shutdown or a fatal error, then lets the workers finish
    /// their records in hand for at most `grace`.
    fn run(mut self, grace: Duration) -> KafkaResult<()> {
        let outcome = loop {
            if self.shutdown.is_cancelled() || self.orphaned.is_cancelled() {
                break Ok(());
            }
            let holding = self.hand_on_held();
            let polled = self.consumer.poll(if holding { POLL_HOLDING } else { POLL_IDLE });
            match polled {
                None => {}
                Some(Ok(message)) => {
                    let message = message.detach();
                    self.dispatch(message);
                }
                Some(Err(error @ KafkaError::MessageConsumptionFatal(_))) => {
                    tracing::error!(%error, "fatal consumer error; stopping");
                    break Err(error);
                }
                Some(Err(error)) => {
                    if let Some(suppressed) = self.consumer.context().errors.check() {
                        tracing::warn!(%error, suppressed, "fetch failed; the client keeps reconnecting");
                    }
                    std::thread::sleep(ERROR_PAUSE);
                }
            }
            // Reap finished workers so the set does not grow.
            while self.tasks.try_join_next().is_some() {}
        };

        tracing::info!("stopping: no more fetches; finishing records in hand");
        {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.active.clear();
            workers.held.clear();
        }
        if self.orphaned.is_cancelled() {
            // The runtime is gone, and the workers with it.
            return outcome;
        }
        let mut tasks = std::mem::take(&mut self.tasks);
        let drained = self.runtime.block_on(async {
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await
        });
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "records still in hand after the grace period; they will be redelivered"
            );
            self.runtime.block_on(tasks.shutdown());
        }
        outcome
    }

    /// Hands `message` to its partition's worker. When the worker's buffer is
    /// full the record is held, and so is every later record of that
    /// partition, in order; once the held records reach the hold limit the
    /// partition is paused. The client then drops what it had prefetched for
    /// the partition and, on resume, fetches again from the position after
    /// the last record it returned, so nothing is skipped; a record fetched
    /// twice is recognised by its offset and dropped. Holding before pausing
    /// spares a busy partition a refetch of its prefetched records every time
    /// its buffer fills.
    fn dispatch(&mut self, message: OwnedMessage) {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let workers = self.workers.clone();
        let mut workers = workers.lock().unwrap_or_else(|e| e.into_inner());
        let holding = !workers.held.is_empty();
        let key = match workers.find(topic, partition) {
            Some((_, worker)) if offset < worker.next_offset => {
                tracing::debug!(
                    topic,
                    partition,
                    offset,
                    "record fetched again after a pause; already in hand"
                );
                return;
            }
            Some((key, worker)) => {
                worker.next_offset = offset + 1;
                key.clone()
            }
            None => self.spawn_worker(&mut workers, &message),
        };
        if let Some(held) = workers.held.get_mut(&key).filter(|_| holding) {
            held.push(message);
        } else {
            match workers.active.get(&key).map(|w| w.offer(message, self.buffer_bytes)) {
                Some(Err(TrySendError::Full(message))) => workers.held.entry(key.clone()).or_default().push(message),
                // Sent; or the worker has stopped (shutdown) and the record is
                // left uncommitted, for redelivery.
                _ => return,
            }
        }
        if let Some(held) = workers.held.get_mut(&key)
            && !held.paused
            && held.bytes >= self.hold_bytes
        {
            held.paused = true;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            match self.consumer.pause(&tpl) {
                Ok(()) => {
                    tracing::debug!(partition = %describe(&tpl), "partition buffer and hold full; partition paused")
                }
                Err(error) => tracing::warn!(%error, partition = %describe(&tpl), "cannot pause a partition"),
            }
        }
    }

    /// Moves held records to their workers as far as the buffers have room
    /// and resumes the paused partitions whose held records are down to half
    /// the hold limit (their records keep coming while the worker works
    /// through the rest). Returns whether records are still held.
    fn hand_on_held(&mut self) -> bool {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if workers.held.is_empty() {
            return false;
        }
        let Workers { active, held, .. } = &mut *workers;
        let (buffer_bytes, hold_bytes) = (self.buffer_bytes, self.hold_bytes);
        let mut resume = TopicPartitionList::new();
        held.retain(|key, held| {
            let worker = active.get(key);
            while let Some(message) = held.records.pop_front() {
                let bytes = record_bytes(&message);
                match worker.map(|w| w.offer(message, buffer_bytes)) {
                    Some(Ok(())) => held.bytes -= bytes,
                    Some(Err(TrySendError::Full(message))) => {
                        held.records.push_front(message);
                        break;
                    }
                    // Without a worker to take them (it stopped) the records
                    // are left uncommitted, for redelivery.
                    _ => {
                        held.records.clear();
                        held.bytes = 0;
                    }
                }
            }
            if held.paused && held.bytes * 2 <= hold_bytes {
                held.paused = false;
                resume.add_partition(&key.0, key.1);
            }
            !held.records.is_empty() || held.paused
        });
        let holding = !held.is_empty();
        drop(workers);
        if resume.count() > 0 {
            match self.consumer.resume(&resume) {
                Ok(()) => {
                    tracing::debug!(partitions = %describe(&resume), "held records handed on; partitions resumed")
                }
                Err(error) => tracing::warn!(%error, partitions = %describe(&resume), "cannot resume partitions"),
            }
        }
        holding
    }

    fn spawn_worker(&mut self, workers: &mut Workers, message: &OwnedMessage) -> Key {
        let key = (message.topic().to_owned(), message.partition());
        let after = workers.retiring.remove(&key);
        workers.retiring.retain(|_, done| !done.is_cancelled());
        let (tx, rx) = mpsc::channel(self.buffer);
        let waiting = Arc::new(AtomicUsize::new(0));
        let stop = self.shutdown.child_token();
        let abandon = CancellationToken::new();
        let done = CancellationToken::new();
        let task = self.tasks.spawn_on(
            run_worker(
                rx,
                waiting.clone(),
                self.processor.clone(),
                self.consumer.clone(),
                Signals {
                    stop: stop.clone(),
                    abandon: abandon.clone(),
                    done: done.clone(),
                    after,
                },
            ),
            &self.runtime,
        );
        workers.active.insert(
            key.clone(),
            Worker {
                tx,
                waiting,
                stop,
                abandon,
                done,
                task,
                next_offset: message.offset() + 1,
            },
        );
        key
    }
}

/// What a worker listens to and tells.
struct Signals {
    stop: CancellationToken,
    abandon: CancellationToken,
    /// Cancelled (through a drop guard) when the worker ends.
    done: CancellationToken,
    /// The previous worker of the partition, which must end first.
    after: Option<CancellationToken>,
}

async fn run_worker(
    mut rx: mpsc::Receiver<OwnedMessage>,
    waiting: Arc<AtomicUsize>,
    processor: Arc<Processor>,
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    signals: Signals,
) {
    let Signals {
        stop,
        abandon,
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
            waiting.fetch_sub(record_bytes(&message), Ordering::AcqRel);
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
        if let Some(message) = handled.filter(|_| !abandon.is_cancelled()) {
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
