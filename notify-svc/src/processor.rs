//! What happens to one record: decode, drop a duplicate, notify with retries,
//! or dead-letter, in the record's `event` span. The caller stores the
//! record's offset only when this returns [`RecordOutcome::Handled`] (and
//! after [`Processor::flush_output`]), so a record is never let go of before
//! it is either notified or safely on the dead-letter topic.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use orders_contract::envelope::{self, Event};
use rdkafka::message::{Message, OwnedMessage};
use service_kit::telemetry;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    dead_letter::{DeadLetters, Failure},
    dedup::Dedup,
    metrics::{Metrics, ReasonLabels},
    notifier::{Notification, Notifier, NotifyError},
    retry::RetryPolicy,
};

/// Backoff between attempts to publish a dead letter. Independent of the
/// notification retry settings, so that a tiny RETRY_INITIAL_DELAY cannot turn
/// an unreachable dead-letter topic into a busy loop of errors.
const DEAD_LETTER_BACKOFF: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_delay: Duration::from_millis(250),
    max_delay: Duration::from_secs(10),
};

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Notified, dropped as a duplicate, or dead-lettered: its offset may be stored.
    Handled,
    /// Stopped before it was handled (shutdown or revoke): its offset must not
    /// be stored, so the record is delivered again.
    Stopped,
}

/// Handles records.
#[derive(Debug)]
pub struct Processor {
    notifier: Notifier,
    dead_letters: DeadLetters,
    dedup: Dedup,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    max_record_bytes: usize,
}

impl Processor {
    /// A processor sending through `notifier`, dead-lettering to `dead_letters`.
    pub fn new(
        notifier: Notifier,
        dead_letters: DeadLetters,
        dedup: Dedup,
        retry: RetryPolicy,
        metrics: Arc<Metrics>,
        max_record_bytes: usize,
    ) -> Self {
        Self {
            notifier,
            dead_letters,
            dedup,
            retry,
            metrics,
            max_record_bytes,
        }
    }

    /// Bytes of notifications sent into the log sink's buffer and not yet
    /// written; `None` for a sink that delivers each one as it is sent.
    pub fn output_pending(&self) -> Option<usize> {
        match &self.notifier {
            Notifier::Log(sink) => Some(sink.pending()),
            Notifier::Webhook(_) => None,
        }
    }

    /// Writes the log sink's pending lines. Until it has returned `Ok`, no
    /// offset of a record notified through the log sink may be stored.
    pub fn flush_output(&self) -> std::io::Result<()> {
        match &self.notifier {
            Notifier::Log(sink) => sink.flush(),
            Notifier::Webhook(_) => Ok(()),
        }
    }

    /// Handles `message`. `stop` interrupts waits between attempts (never an
    /// attempt in flight): the record is then left for redelivery.
    pub async fn process(&self, message: &OwnedMessage, stop: &CancellationToken) -> RecordOutcome {
        let started = Instant::now();
        self.metrics.consumed.inc();
        // Decoded before the span exists, so the span is created with every
        // field at once: each later `record` formats the span's fields again.
        let headers = telemetry::KafkaHeaders::of(message.headers());
        let decoded = envelope::decode(|name| headers.value(name), message.payload(), self.max_record_bytes);
        let event = match &decoded {
            Ok(Event::OrderCreated(event)) => Some(event),
            Err(_) => None,
        };
        let span = tracing::info_span!(
            "event",
            topic = %message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            order_id = event.and_then(|e| e.order.as_ref()).map(|o| o.order_id.as_str()),
            event_id = event.map(|e| e.event_id.as_str()),
        );
        telemetry::continue_trace(&span, &headers);
        let outcome = async {
            match decoded {
                Err(error) => {
                    tracing::warn!(%error, "record is not a valid event; dead-lettering it");
                    let failure = Failure {
                        class: error.class(),
                        message: error.to_string(),
                        attempts: 0,
                    };
                    self.dead_letter(message, failure, stop).await
                }
                Ok(Event::OrderCreated(event)) => self.notify(message, &event, &tracing::Span::current(), stop).await,
            }
        }
        .instrument(span)
        .await;
        if outcome == RecordOutcome::Handled {
            self.metrics.handling_seconds.observe(started.elapsed().as_secs_f64());
        }
        outcome
    }

    /// Counts a sent notification and remembers its event as handled.
    fn sent(&self, event: &orders_contract::v1::OrderCreated) {
        self.metrics.sent.inc();
        if let Some(at) = event.occurred_at.as_ref().and_then(orders_contract::from_timestamp) {
            let age = time::OffsetDateTime::now_utc() - at;
            self.metrics.end_to_end_seconds.observe(age.as_seconds_f64().max(0.0));
        }
        self.dedup.mark(&event.event_id);
    }

    async fn notify(
        &self,
        message: &OwnedMessage,
        event: &orders_contract::v1::OrderCreated,
        span: &tracing::Span,
        stop: &CancellationToken,
    ) -> RecordOutcome {
        if self.dedup.seen(&event.event_id) {
            self.metrics.duplicates.inc();
            tracing::info!("duplicate delivery of a handled event; skipped");
            return RecordOutcome::Handled;
        }
        let notification = Notification::from_event(event, telemetry::trace_id(span));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.notifier.send(&notification).await {
                Ok(()) => {
                    self.sent(event);
                    return RecordOutcome::Handled;
                }
                Err(error) => error,
            };
            self.metrics.failed.inc();
            let failure = match error {
                NotifyError::Permanent(reason) => Failure {
                    class: "notify_permanent",
                    message: reason,
                    attempts: attempt,
                },
                NotifyError::Transient(reason) if attempt >= self.retry.max_attempts => Failure {
                    class: "retries_exhausted",
                    message: reason,
                    attempts: attempt,
                },
                NotifyError::Transient(reason) => {
                    let delay = self.retry.delay(attempt);
                    tracing::warn!(attempt, ?delay, sink = self.notifier.kind(), error = %reason, "notification failed; will retry");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = stop.cancelled() => return RecordOutcome::Stopped,
                    }
                }
            };
            tracing::warn!(attempt, error = %failure.message, class = failure.class, "notification failed for good; dead-lettering");
            return self.dead_letter(message, failure, stop).await;
        }
    }

    /// Publishes to the dead-letter topic, retrying until it is acknowledged
    /// or `stop` fires: the record's offset never moves past an unsaved failure.
    async fn dead_letter(&self, message: &OwnedMessage, failure: Failure, stop: &CancellationToken) -> RecordOutcome {
        let mut attempt = 0;
        loop {
            match self.dead_letters.publish(message, &failure).await {
                Ok(()) => {
                    self.metrics
                        .dead_lettered
                        .get_or_create(&ReasonLabels {
                            reason: failure.class.to_owned(),
                        })
                        .inc();
                    tracing::warn!(
                        class = failure.class,
                        reason = %failure.message,
                        dlq = self.dead_letters.topic(),
                        "record dead-lettered"
                    );
                    return RecordOutcome::Handled;
                }
                Err(error) => {
                    attempt += 1;
                    let delay = DEAD_LETTER_BACKOFF.delay(attempt);
                    tracing::error!(%error, attempt, ?delay, "cannot publish to the dead-letter topic; holding the offset and retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return RecordOutcome::Stopped,
                    }
                }
            }
        }
    }
}
