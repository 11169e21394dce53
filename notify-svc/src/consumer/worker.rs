//! A partition's worker: a task that handles the partition's records in
//! order, in batches whose log-sink lines are written before their offsets
//! are stored; and the handle the fetch loop offers it records through.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message, OwnedMessage},
};
use tokio::{
    sync::mpsc::{self, error::TrySendError},
    task::AbortHandle,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{callbacks::ConsumerCtx, fetch::Wake};
use crate::{
    notifier::EXIT_OUTPUT_BROKEN,
    processor::{Processor, RecordOutcome},
};

/// At most this many records share one write of log-sink lines; the worker
/// yields to the others in between.
const MAX_BATCH: usize = 64;

/// A batch also ends once this many bytes of lines wait: a few records with
/// very large fields must not make one huge write.
const MAX_PENDING_BYTES: usize = 64 * 1024;

/// The fetch loop's handle on a partition's worker task.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) tx: mpsc::Sender<OwnedMessage>,
    /// Bytes of the records in `tx`'s buffer ([`record_bytes`]).
    pub(super) waiting: Arc<AtomicUsize>,
    /// Set when an offer found the buffer full: the worker then wakes the
    /// fetch loop once it has drained half of it.
    pub(super) blocked: Arc<AtomicBool>,
    /// Cancelled on revoke or shutdown: finish the record in hand, then stop.
    pub(super) stop: CancellationToken,
    /// Cancelled when a revoked partition's work is abandoned at the drain
    /// deadline: the partition is someone else's now, so no offset may be
    /// stored for it.
    pub(super) abandon: CancellationToken,
    /// Cancelled when the worker's task has ended (returned or aborted).
    pub(super) done: CancellationToken,
    pub(super) task: AbortHandle,
}

/// What a record takes in a partition buffer: its value, key and headers.
pub(super) fn record_bytes(message: &OwnedMessage) -> usize {
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
    pub(super) fn offer(&self, message: OwnedMessage, max_bytes: usize) -> Result<(), TrySendError<OwnedMessage>> {
        let size = record_bytes(&message);
        let waiting = self.waiting.load(Ordering::Acquire);
        if waiting > 0 && waiting + size > max_bytes {
            self.blocked.store(true, Ordering::Release);
            return Err(TrySendError::Full(message));
        }
        // Counted before it can be received (and uncounted by the worker).
        self.waiting.fetch_add(size, Ordering::AcqRel);
        self.tx.try_send(message).inspect_err(|error| {
            self.waiting.fetch_sub(size, Ordering::AcqRel);
            if matches!(error, TrySendError::Full(_)) {
                self.blocked.store(true, Ordering::Release);
            }
        })
    }
}

/// What a worker shares with the fetch loop about its buffer.
pub(super) struct Buffer {
    pub(super) rx: mpsc::Receiver<OwnedMessage>,
    /// Bytes of the records in the buffer, as [`Worker::waiting`].
    pub(super) waiting: Arc<AtomicUsize>,
    /// As [`Worker::blocked`].
    pub(super) blocked: Arc<AtomicBool>,
    /// Wakes the fetch loop.
    pub(super) wake: Arc<Wake>,
}

impl Buffer {
    /// Takes `message`'s bytes off the count and, if the fetch loop found
    /// the buffer full, wakes it once half the buffer is free (or the
    /// buffer is empty, when bytes were the bound): a small buffer then
    /// refills before it runs dry, instead of after the fetch loop's
    /// fallback sleep.
    fn taken(&self, message: &OwnedMessage) {
        self.waiting.fetch_sub(record_bytes(message), Ordering::AcqRel);
        if self.blocked.load(Ordering::Acquire)
            && self.rx.len() <= self.rx.max_capacity() / 2
            && self.blocked.swap(false, Ordering::AcqRel)
        {
            self.wake.wake();
        }
    }
}

/// The cancellation tokens a worker obeys and signals its end with.
pub(super) struct WorkerControl {
    pub(super) stop: CancellationToken,
    pub(super) abandon: CancellationToken,
    /// Cancelled (through a drop guard) when the worker ends.
    pub(super) done: CancellationToken,
    /// The previous worker of the partition, which must end first.
    pub(super) after: Option<CancellationToken>,
}

/// The worker task: handles its partition's records in order until stopped
/// or its channel closes, storing each batch's last offset once the batch is
/// handled and its log-sink lines are written.
pub(super) async fn run_worker(
    mut buffer: Buffer,
    processor: Arc<Processor>,
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    control: WorkerControl,
) {
    let WorkerControl {
        stop,
        abandon,
        done,
        after,
    } = control;
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
            message = buffer.rx.recv() => match message {
                Some(m) => m,
                None => return,
            },
        };
        // With the log sink, the records already waiting are handled as one
        // batch whose lines are written together, and only then are their
        // offsets stored: a notification whose line could still be lost with
        // the process is never past the stored offset.
        let mut handled: Option<OwnedMessage> = None;
        let mut next = Some(first);
        let mut stopped = false;
        let mut count = 0;
        while let Some(message) = next.take() {
            buffer.taken(&message);
            match processor.process(&message, &stop).await {
                RecordOutcome::Handled => handled = Some(message),
                RecordOutcome::Stopped => {
                    stopped = true;
                    break;
                }
            }
            count += 1;
            let batching = processor
                .output_pending()
                .is_some_and(|bytes| bytes < MAX_PENDING_BYTES);
            if batching && count < MAX_BATCH && !stop.is_cancelled() {
                next = buffer.rx.try_recv().ok();
            }
        }
        if let Err(error) = processor.flush_output() {
            // A line that cannot be written cannot be retried or dead-lettered
            // either; exiting before any offset moves past it leaves it to the
            // next start.
            eprintln!(
                "log output is broken ({error}): notification lines were lost; exiting with status \
                 {EXIT_OUTPUT_BROKEN} before their offsets are stored"
            );
            std::process::exit(EXIT_OUTPUT_BROKEN);
        }
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
