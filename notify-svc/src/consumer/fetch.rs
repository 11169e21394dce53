//! The fetch loop, on a thread of its own: serves the client's events
//! (rebalances, statistics, errors) and moves each assigned partition's
//! records from the partition's own queue to its worker while the worker's
//! buffer has room. A partition whose worker is full is simply not read: its
//! records stay in librdkafka's queue, which stops fetching for it at its
//! prefetch bound, and nothing is dropped or fetched twice.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicUsize},
    },
    time::Duration,
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer, base_consumer::PartitionQueue},
    error::{KafkaError, KafkaResult},
    message::{Message, OwnedMessage},
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
    worker::{Buffer, Worker, WorkerControl, run_worker},
};
use crate::processor::Processor;

/// Pause after a fetch error, so that a burst of errors cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long the loop sleeps with nothing to move: the client's events
/// (rebalances, statistics) and shutdown are served within it; a record
/// arriving on a partition queue wakes it at once.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// How long the loop sleeps at most while a worker's buffer is full: the
/// worker wakes it once half its buffer is free, and this bounds the wait
/// when that wake-up is missed (the buffer drained while it was reported full).
const FULL_WAIT: Duration = Duration::from_millis(5);

/// The workers of the assigned partitions, the partitions' queues, and the
/// `done` signals of revoked workers that may still be finishing a record: a
/// new worker for the same partition (an eager rebalance revokes everything
/// and often hands the same partitions back) waits for its predecessor, so
/// one partition is never handled by two tasks at once.
#[derive(Debug, Default)]
pub(super) struct Workers {
    pub(super) active: HashMap<Key, Worker>,
    pub(super) partitions: HashMap<Key, Partition>,
    pub(super) retiring: HashMap<Key, CancellationToken>,
}

/// An assigned partition's records on their way to its worker.
#[derive(Default)]
pub(super) struct Partition {
    /// The partition's own queue, split from the consumer's when it was
    /// assigned ([`BaseConsumer::split_partition_queue`]).
    pub(super) queue: Option<PartitionQueue<ConsumerCtx>>,
    /// Records taken from a queue that the worker had no room for, oldest
    /// first: one from the partition's queue, or any that came through the
    /// consumer's queue before the split. They go before the queue's.
    pending: VecDeque<OwnedMessage>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Wakes the fetch loop when a partition queue gets records.
#[derive(Debug, Default)]
pub(super) struct Wake {
    woken: Mutex<bool>,
    signal: Condvar,
}

impl Wake {
    pub(super) fn wake(&self) {
        *self.woken.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.signal.notify_one();
    }

    /// Sleeps until woken (or woken since the last sleep) or `timeout`.
    fn sleep(&self, timeout: Duration) {
        let woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = self
            .signal
            .wait_timeout_while(woken, timeout, |woken| !*woken)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }
}

/// The fetch loop's state, owned by the fetch thread.
pub(super) struct Fetcher {
    pub(super) consumer: Arc<BaseConsumer<ConsumerCtx>>,
    pub(super) workers: Arc<Mutex<Workers>>,
    pub(super) wake: Arc<Wake>,
    pub(super) processor: Arc<Processor>,
    pub(super) buffer: usize,
    pub(super) buffer_bytes: usize,
    pub(super) shutdown: CancellationToken,
    pub(super) orphaned: CancellationToken,
    pub(super) runtime: Handle,
    pub(super) tasks: JoinSet<()>,
}

impl Fetcher {
    /// Serves the client and moves records until shutdown or a fatal error,
    /// then lets the workers finish their records in hand for at most `grace`.
    pub(super) fn run(mut self, grace: Duration) -> KafkaResult<()> {
        let outcome = 'fetch: loop {
            if self.shutdown.is_cancelled() || self.orphaned.is_cancelled() {
                break Ok(());
            }
            // The client's events; records only for a partition between its
            // assignment and the split of its queue.
            let mut moved = false;
            while let Some(polled) = self.consumer.poll(Duration::ZERO) {
                match polled {
                    Ok(message) => {
                        let message = message.detach();
                        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
                        let key = (message.topic().to_owned(), message.partition());
                        workers.partitions.entry(key).or_default().pending.push_back(message);
                        moved = true;
                    }
                    Err(error @ KafkaError::MessageConsumptionFatal(_)) => {
                        tracing::error!(%error, "fatal consumer error; stopping");
                        break 'fetch Err(error);
                    }
                    Err(error) => {
                        if let Some(suppressed) = self.consumer.context().errors.check() {
                            tracing::warn!(%error, suppressed, "fetch failed; the client keeps reconnecting");
                        }
                        std::thread::sleep(ERROR_PAUSE);
                        break;
                    }
                }
            }
            let (handed, full) = self.hand_on();
            if !(moved || handed) {
                self.wake.sleep(if full { FULL_WAIT } else { IDLE_WAIT });
            }
            // Reap finished workers so the set does not grow.
            while self.tasks.try_join_next().is_some() {}
        };

        tracing::info!("stopping: no more fetches; finishing records in hand");
        {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.active.clear();
            workers.partitions.clear();
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

    /// Moves records to the workers, each partition's in order, as far as
    /// their buffers have room. Returns whether any moved, and whether a
    /// worker's buffer is full.
    fn hand_on(&mut self) -> (bool, bool) {
        let workers = self.workers.clone();
        let mut workers = workers.lock().unwrap_or_else(|e| e.into_inner());
        let Workers {
            active,
            partitions,
            retiring,
        } = &mut *workers;
        let (mut moved, mut full) = (false, false);
        for (key, partition) in partitions.iter_mut() {
            loop {
                let message = match partition.pending.pop_front() {
                    Some(message) => message,
                    None => match partition.queue.as_ref().and_then(|q| q.poll(Duration::ZERO)) {
                        Some(Ok(message)) => message.detach(),
                        Some(Err(error)) => {
                            if let Some(suppressed) = self.consumer.context().errors.check() {
                                tracing::warn!(%error, suppressed, "fetch failed; the client keeps reconnecting");
                            }
                            break;
                        }
                        None => break,
                    },
                };
                if !active.contains_key(key) {
                    let worker = self.spawn_worker(retiring, key);
                    active.insert(key.clone(), worker);
                }
                match active[key].offer(message, self.buffer_bytes) {
                    Ok(()) => moved = true,
                    Err(TrySendError::Full(message)) => {
                        partition.pending.push_front(message);
                        full = true;
                        break;
                    }
                    // The worker has stopped (shutdown): the record is left
                    // uncommitted, for redelivery.
                    Err(TrySendError::Closed(_)) => break,
                }
            }
        }
        (moved, full)
    }

    fn spawn_worker(&mut self, retiring: &mut HashMap<Key, CancellationToken>, key: &Key) -> Worker {
        let after = retiring.remove(key);
        retiring.retain(|_, done| !done.is_cancelled());
        let (tx, rx) = mpsc::channel(self.buffer);
        let waiting = Arc::new(AtomicUsize::new(0));
        let blocked = Arc::new(AtomicBool::new(false));
        let stop = self.shutdown.child_token();
        let abandon = CancellationToken::new();
        let done = CancellationToken::new();
        let task = self.tasks.spawn_on(
            run_worker(
                Buffer {
                    rx,
                    waiting: waiting.clone(),
                    blocked: blocked.clone(),
                    wake: self.wake.clone(),
                },
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
        Worker {
            tx,
            waiting,
            blocked,
            stop,
            abandon,
            done,
            task,
        }
    }
}
