//! Publishing the outbox: every committed `OrderCreated` record reaches the
//! topic, in order per key, even if the process dies right after the commit.
//!
//! - **Right after the commit** the call hands its record to the idempotent
//!   producer ([`Outbox::publish_now`]) and answers; its row is leased to it
//!   for `PUBLISH_TIMEOUT` plus a margin, so nothing else sends it meanwhile.
//!   This is the normal path: no polling delay. The row is the first of its
//!   key (a new order id), so sending it at once keeps the key's order.
//! - **The relay** ([`Outbox::run_relay`]) claims rows whose lease expired or
//!   was handed back (a failed send, a call whose process died, the broker
//!   down), at most one per key at a time, oldest first, and publishes them.
//!   It wakes when a send fails and otherwise every second. On PostgreSQL the
//!   claim skips rows another instance is claiming, so one instance publishes
//!   each row in the normal path; after a crash a row may be sent again, with
//!   the same bytes and so the same event id (downstream drops duplicates).
//! - **The marker** ([`Outbox::run_marker`]) records acknowledgements in
//!   batches (one UPDATE per batch instead of a write per order), and
//!   housekeeping deletes rows published longer ago than `OUTBOX_RETENTION`
//!   and idempotency keys older than `IDEMPOTENCY_RETENTION`, and exports
//!   `outbox_pending` and `outbox_oldest_age_seconds`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    publisher::{PublishError, Publisher},
    store::{self, OutboxRecord, Store},
};

/// Longest the relay sleeps when nothing wakes it.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);
/// Most rows one relay round claims.
const RELAY_BATCH: u32 = 256;
/// How often the outbox gauges are refreshed.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How often published rows and expired keys are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Most acknowledgements recorded by one UPDATE.
const MARK_BATCH: usize = 1000;

/// The outbox's publishing side, shared by the calls and the background tasks.
#[derive(Debug)]
pub struct Outbox {
    store: Arc<Store>,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    /// How long a send may take before its row may be sent again.
    lease: Duration,
    acked: mpsc::UnboundedSender<i64>,
    acked_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<i64>>,
    wake: Notify,
    /// Whether the last publish failed (so the log says when it recovers).
    failing: AtomicBool,
}

impl Outbox {
    /// An outbox over `store` publishing through `publisher`; a row sent
    /// and not acknowledged within `publish_timeout` may be sent again.
    pub fn new(store: Arc<Store>, publisher: Arc<Publisher>, metrics: Arc<Metrics>, publish_timeout: Duration) -> Self {
        let (acked, acked_rx) = mpsc::unbounded_channel();
        Self {
            store,
            publisher,
            metrics,
            // librdkafka answers every record within message.timeout.ms
            // (= PUBLISH_TIMEOUT); the margin covers the answer's way back.
            lease: publish_timeout + Duration::from_secs(5),
            acked,
            acked_rx: tokio::sync::Mutex::new(acked_rx),
            wake: Notify::new(),
            failing: AtomicBool::new(false),
        }
    }

    /// When a row claimed or committed now stops being leased.
    pub fn lease_until_us(&self) -> i64 {
        store::now_us().saturating_add(i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX))
    }

    /// Sends the record of outbox row `id`, just committed, and records the
    /// broker's answer in the background.
    pub fn publish_now(self: &Arc<Self>, id: i64, record: &OutboxRecord) {
        match self.publisher.send(record) {
            Ok(ack) => {
                let this = self.clone();
                tokio::spawn(async move {
                    match ack.await {
                        Ok(()) => this.acknowledged(id),
                        Err(error) => this.failed(vec![id], &error).await,
                    }
                });
            }
            Err(error) => {
                let this = self.clone();
                tokio::spawn(async move { this.failed(vec![id], &error).await });
            }
        }
    }

    fn acknowledged(&self, id: i64) {
        let _ = self.acked.send(id);
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("Kafka acknowledges events again: the outbox drains");
        }
    }

    /// Hands `ids` back to the relay and wakes it.
    async fn failed(&self, ids: Vec<i64>, error: &PublishError) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "Kafka did not take an event: the outbox keeps it and retries (see outbox_pending)");
        }
        if let Err(error) = self.store.release(&ids).await {
            // The lease expires by itself; the relay takes the rows then.
            tracing::debug!(%error, "could not hand rows back to the relay");
        }
        self.wake.notify_one();
    }

    /// Claims and publishes rows nobody is publishing, until `stop`.
    pub async fn run_relay(self: Arc<Self>, stop: CancellationToken) {
        if self.store.backend() == store::Backend::Sqlite {
            // One process per SQLite file: whatever a previous process had
            // leased is no longer in flight.
            match self.store.release_all().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "outbox rows left by the previous process go out now"),
                Err(error) => tracing::warn!(%error, "could not release the previous process's outbox leases"),
            }
        }
        let mut backoff = Duration::ZERO;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(RELAY_INTERVAL) => {}
            }
            if !backoff.is_zero() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
            match self.relay_round().await {
                Ok(true) => {
                    backoff = Duration::ZERO;
                    // There may be more: go again without waiting.
                    self.wake.notify_one();
                }
                Ok(false) => backoff = Duration::ZERO,
                Err(()) => backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(5)),
            }
        }
    }

    /// One round: Ok(true) if it published a full batch, Ok(false) if there
    /// was less, Err if something failed.
    async fn relay_round(&self) -> Result<bool, ()> {
        let claimed = match self
            .store
            .claim(store::now_us(), self.lease_until_us(), RELAY_BATCH)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::debug!(%error, "relay cannot claim outbox rows");
                return Err(());
            }
        };
        if claimed.is_empty() {
            return Ok(false);
        }
        let full = claimed.len() == RELAY_BATCH as usize;
        let mut pending = Vec::with_capacity(claimed.len());
        let mut unsent = Vec::new();
        let mut first_error = None;
        for row in &claimed {
            if first_error.is_some() {
                unsent.push(row.id);
                continue;
            }
            match self.publisher.send(&row.record) {
                Ok(ack) => pending.push((row.id, ack)),
                Err(error) => {
                    unsent.push(row.id);
                    first_error = Some(error);
                }
            }
        }
        let mut failed = unsent;
        for (id, ack) in pending {
            match ack.await {
                Ok(()) => self.acknowledged(id),
                Err(error) => {
                    failed.push(id);
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            None => Ok(full),
            Some(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "Kafka did not take outbox events: they wait in the outbox (see outbox_pending)");
                }
                if let Err(error) = self.store.release(&failed).await {
                    tracing::debug!(%error, "could not hand rows back to the relay");
                }
                Err(())
            }
        }
    }

    /// Records acknowledgements in batches until `stop`, then records what
    /// has arrived so far.
    pub async fn run_marker(self: Arc<Self>, stop: CancellationToken) {
        let mut rx = self.acked_rx.lock().await;
        let mut batch = Vec::with_capacity(MARK_BATCH);
        loop {
            if batch.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => {
                        while let Ok(id) = rx.try_recv() { batch.push(id); }
                        if !batch.is_empty() {
                            let _ = self.store.mark_published(&batch, store::now_us()).await;
                        }
                        return;
                    }
                    id = rx.recv() => match id {
                        Some(id) => batch.push(id),
                        None => return,
                    },
                }
            }
            while batch.len() < MARK_BATCH {
                match rx.try_recv() {
                    Ok(id) => batch.push(id),
                    Err(_) => break,
                }
            }
            match self.store.mark_published(&batch, store::now_us()).await {
                Ok(()) => batch.clear(),
                Err(error) => {
                    // Unmarked rows would be sent again after their lease
                    // (same event id): keep trying while the store is away.
                    tracing::debug!(%error, rows = batch.len(), "cannot record acknowledgements yet");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    /// Refreshes the outbox gauges and deletes what is past its retention,
    /// until `stop`.
    pub async fn run_housekeeping(
        self: Arc<Self>,
        outbox_retention: Duration,
        idempotency_retention: Duration,
        stop: CancellationToken,
    ) {
        let mut last_purge = tokio::time::Instant::now();
        let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(STATS_INTERVAL) => {}
            }
            let now = store::now_us();
            if let Ok(stats) = self.store.outbox_stats().await {
                self.metrics.outbox_pending.set(stats.pending);
                let age = stats.oldest_us.map_or(0.0, |oldest| (now - oldest).max(0) as f64 / 1e6);
                self.metrics.outbox_oldest_age_seconds.set(age);
            }
            if last_purge.elapsed() >= PURGE_INTERVAL {
                last_purge = tokio::time::Instant::now();
                match self
                    .store
                    .purge(now - us(outbox_retention), now - us(idempotency_retention))
                    .await
                {
                    Ok(0) => {}
                    Ok(rows) => tracing::debug!(rows, "purged published outbox rows and expired idempotency keys"),
                    Err(error) => tracing::debug!(%error, "purge failed; next time"),
                }
            }
        }
    }
}
