//! What librdkafka calls back on the fetch thread: statistics (lag gauges
//! and readiness), client errors, rebalances (a revoke waits for the revoked
//! partitions' records in hand, then commits) and commit results.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    statistics::Statistics,
    topic_partition_list::TopicPartitionList,
};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::{
    Key, STATS_INTERVAL, commit, describe,
    fetch::{Wake, Workers},
    worker::Worker,
};
use crate::{
    metrics::{Metrics, PartitionLabels},
    throttle::Throttled,
};

/// The consumer's health from librdkafka's statistics: a live broker
/// connection and group membership make it ready.
#[derive(Debug, Default)]
pub struct ConsumerHealth {
    member: AtomicBool,
    broker_up: AtomicBool,
    last_stats: Mutex<Option<Instant>>,
}

impl ConsumerHealth {
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
    pub(super) workers: Arc<Mutex<Workers>>,
    /// The consumer itself, to split the queues of assigned partitions; set
    /// once it exists (weak: the consumer owns this context).
    pub(super) consumer: OnceLock<Weak<BaseConsumer<ConsumerCtx>>>,
    /// Wakes the fetch loop when a partition queue gets records.
    pub(super) wake: Arc<Wake>,
    /// Partitions assigned to this member: the only ones with a lag gauge.
    pub(super) assigned: Mutex<HashSet<Key>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<ConsumerHealth>,
    pub(super) errors: Throttled,
    /// The runtime the workers run on, and how long a revoke waits for them;
    /// set when the pipeline starts.
    pub(super) drain: OnceLock<(Handle, Duration)>,
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
        self.health.member.store(member, Ordering::Relaxed);
        self.health.broker_up.store(broker_up, Ordering::Relaxed);
        *self.health.last_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(suppressed) = self.errors.check() {
            tracing::warn!(%error, reason, suppressed, "Kafka client error; the client keeps reconnecting");
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    /// On revoke: stops the revoked partitions' workers, drops their queues
    /// and the records waiting in them, waits for the record each worker has in hand (a webhook
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
        {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
            for element in tpl.elements() {
                let key = (element.topic().to_owned(), element.partition());
                if let Some(worker) = workers.active.remove(&key) {
                    worker.stop.cancel();
                    revoked.push((key.clone(), worker));
                }
                workers.partitions.remove(&key);
                assigned.remove(&key);
                self.metrics.lag.remove(&PartitionLabels {
                    topic: key.0,
                    partition: key.1.to_string(),
                });
            }
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
                let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
                // Split here, before the partitions' first records are
                // fetched: they then arrive on their own queues.
                let consumer = self.consumer.get().and_then(Weak::upgrade);
                for element in tpl.elements() {
                    let key = (element.topic().to_owned(), element.partition());
                    let queue = consumer.as_ref().and_then(|c| c.split_partition_queue(&key.0, key.1));
                    let Some(mut queue) = queue else {
                        tracing::warn!(partition = %describe(tpl), "cannot split a partition's queue");
                        continue;
                    };
                    let wake = self.wake.clone();
                    queue.set_nonempty_callback(move || wake.wake());
                    workers.partitions.entry(key.clone()).or_default().queue = Some(queue);
                    assigned.insert(key);
                }
                drop((assigned, workers));
                // The fetch loop may have gone to sleep on the old assignment.
                self.wake.wake();
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
