//! The fetch loop, on a thread of its own: polls the client and hands each
//! record to its partition's worker, holding (and at a limit pausing) a
//! partition whose worker's buffer is full.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, KafkaResult},
    message::{Message, OwnedMessage},
    topic_partition_list::TopicPartitionList,
};
use tokio::{
    runtime::Handle,
    sync::mpsc::{self, error::TrySendError},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    Key,
    callbacks::ConsumerCtx,
    describe,
    worker::{Worker, WorkerControl, record_bytes, run_worker},
};
use crate::processor::Processor;

/// Pause after a fetch error, so that a burst of errors cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long one poll waits for an event: the fetch loop notices shutdown
/// within it.
const POLL_IDLE: Duration = Duration::from_millis(100);

/// How long one poll waits while records are held: they go to their worker
/// (and a paused partition resumes) within it once the worker has room.
const POLL_HOLDING: Duration = Duration::from_millis(5);

/// The workers of the assigned partitions, the records held for the paused
/// ones, and the `done` signals of revoked workers that may still be
/// finishing a record: a new worker for the same partition (an eager
/// rebalance revokes everything and often hands the same partitions back)
/// waits for its predecessor, so one partition is never handled by two tasks
/// at once.
#[derive(Debug, Default)]
pub(super) struct Workers {
    pub(super) active: HashMap<Key, Worker>,
    /// Records of partitions whose buffers were full.
    pub(super) held: HashMap<Key, Held>,
    pub(super) retiring: HashMap<Key, CancellationToken>,
}

/// The records of one partition waiting for room in its worker's buffer.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Oldest first.
    records: VecDeque<OwnedMessage>,
    /// Their [`record_bytes`].
    bytes: usize,
    /// Whether the partition is paused: set once `bytes` reach the hold
    /// limit, cleared once they are down to half of it.
    pub(super) paused: bool,
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

/// The fetch loop's state, owned by the fetch thread.
pub(super) struct Fetcher {
    pub(super) consumer: Arc<BaseConsumer<ConsumerCtx>>,
    pub(super) workers: Arc<Mutex<Workers>>,
    pub(super) processor: Arc<Processor>,
    pub(super) buffer: usize,
    pub(super) buffer_bytes: usize,
    pub(super) hold_bytes: usize,
    pub(super) shutdown: CancellationToken,
    pub(super) orphaned: CancellationToken,
    pub(super) runtime: Handle,
    pub(super) tasks: JoinSet<()>,
}

impl Fetcher {
    /// Polls until shutdown or a fatal error, then lets the workers finish
    /// their records in hand for at most `grace`.
    pub(super) fn run(mut self, grace: Duration) -> KafkaResult<()> {
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
                WorkerControl {
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
