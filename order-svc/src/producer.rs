//! A Kafka producer whose delivery reports are served on the tokio runtime.
//!
//! rdkafka's `FutureProducer` serves librdkafka's main queue from a dedicated
//! polling thread: every batch of acknowledgements is one more thread
//! hand-off (broker thread -> polling thread -> tokio worker). [`AckProducer`]
//! instead registers a callback on that queue (`rd_kafka_queue_cb_event_enable`),
//! which librdkafka calls when the queue goes from empty to non-empty; the
//! callback wakes one tokio task that drains the queue, completing each
//! record's [`Ack`] on the worker that is about to run its caller anyway.
//!
//! order-svc's publisher and the benchmark's "tonic + produce" ceiling both
//! use it, so the ceiling measures the same produce path.

use std::{
    ffi::c_void,
    future::Future,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext, bindings as rdsys,
    client::Client,
    config::FromClientConfigAndContext,
    error::{KafkaError, KafkaResult},
    message::{OwnedHeaders, ToBytes},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
};
use tokio::sync::{Notify, oneshot};

/// Delivers each record's outcome to its [`Ack`].
#[derive(Debug, Default)]
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<oneshot::Sender<KafkaResult<()>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.clone()),
        };
        let _ = ack.send(outcome);
    }
}

/// The broker's answer for one record: `Ok` once acknowledged,
/// `Err(KafkaError::Canceled)` if the producer went away first.
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<KafkaResult<()>>);

impl Future for Ack {
    type Output = KafkaResult<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(KafkaError::Canceled)))
    }
}

/// A reference to librdkafka's main queue of one client, and the [`Notify`]
/// its callback wakes.
struct MainQueue {
    ptr: *mut rdsys::rd_kafka_queue_t,
    /// Kept alive here until the callback pointing to it is disabled.
    notify: Arc<Notify>,
}

// SAFETY: librdkafka queues are thread-safe; the pointer is a counted reference.
unsafe impl Send for MainQueue {}
// SAFETY: as above.
unsafe impl Sync for MainQueue {}

impl MainQueue {
    fn len(&self) -> usize {
        // SAFETY: a valid queue reference until drop.
        unsafe { rdsys::rd_kafka_queue_length(self.ptr) }
    }
}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: no callback may run after this (it is disabled under the
        // queue's lock, which librdkafka holds while calling it).
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.ptr, None, std::ptr::null_mut());
            rdsys::rd_kafka_queue_destroy(self.ptr);
        }
    }
}

/// Called by librdkafka, under the queue's lock, when the queue becomes non-empty.
unsafe extern "C" fn queue_not_empty(_rk: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` a `MainQueue` keeps alive until it
    // has disabled this callback.
    let notify = unsafe { &*(opaque as *const Notify) };
    notify.notify_one();
}

/// Owns the queue reference and the producer; the drain task only holds
/// weak references, so both go when the last [`AckProducer`] does.
struct Shared {
    // Field order is drop order: the callback is disabled and the queue
    // reference released before the producer purges and flushes its queue.
    queue: Arc<MainQueue>,
    producer: Arc<BaseProducer<AckContext>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Let the drain task see the producer is gone and end.
        self.queue.notify.notify_one();
    }
}

/// An idempotent-capable producer whose acknowledgements are futures served
/// on the current tokio runtime. Cheap to clone.
#[derive(Clone)]
pub struct AckProducer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AckProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckProducer").finish_non_exhaustive()
    }
}

impl AckProducer {
    /// Creates the producer and its drain task. Must be called inside a
    /// tokio runtime.
    pub fn new(config: &ClientConfig) -> KafkaResult<Self> {
        let producer = Arc::new(BaseProducer::from_config_and_context(config, AckContext)?);
        let notify = Arc::new(Notify::new());
        let queue = Arc::new(MainQueue {
            // SAFETY: the client is valid; the reference is released in MainQueue::drop.
            ptr: unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) },
            notify: notify.clone(),
        });
        // SAFETY: `queue` keeps the Notify alive until it disables the callback.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(
                queue.ptr,
                Some(queue_not_empty),
                Arc::as_ptr(&notify) as *mut c_void,
            );
        }
        tokio::spawn(drain(Arc::downgrade(&producer), Arc::downgrade(&queue), notify.clone()));
        // Anything queued before the callback was registered.
        notify.notify_one();
        Ok(Self {
            shared: Arc::new(Shared { queue, producer }),
        })
    }

    /// Queues `payload` under `key` with `headers` for `topic`; the returned
    /// [`Ack`] resolves with the broker's answer. Fails at once if the record
    /// cannot be queued (e.g. `QueueFull`).
    pub fn send<K, P>(&self, topic: &str, key: &K, payload: &P, headers: OwnedHeaders) -> KafkaResult<Ack>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (tx, rx) = oneshot::channel();
        let record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .key(key)
            .payload(payload)
            .headers(headers);
        match self.shared.producer.send(record) {
            Ok(()) => Ok(Ack(rx)),
            Err((error, _record)) => Err(error),
        }
    }

    /// The underlying client, for metadata requests.
    pub fn client(&self) -> &Client<AckContext> {
        self.shared.producer.client()
    }

    /// Waits up to `timeout` for every queued record to be answered
    /// (blocking: call from a blocking thread).
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.shared.producer.flush(timeout)
    }
}

/// Most events served in one go before giving other tasks a turn.
const DRAIN_BATCH: usize = 64;

/// Serves the main queue whenever the callback says it is not empty, until
/// the producer is dropped.
async fn drain(producer: Weak<BaseProducer<AckContext>>, queue: Weak<MainQueue>, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        let (Some(producer), Some(queue)) = (producer.upgrade(), queue.upgrade()) else {
            return;
        };
        let mut served = 0;
        while queue.len() > 0 {
            // One event (a delivery report carries a batch of records).
            producer.poll(Duration::ZERO);
            served += 1;
            if served % DRAIN_BATCH == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
}
