//! What happens to one record: decode, drop a duplicate, notify with retries,
//! or dead-letter. The caller stores the record's offset only when this
//! returns [`Outcome::Handled`], so a record is never let go of before it is
//! either notified or safely on the dead-letter topic.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use orders_contract::envelope::{self, Event};
use rdkafka::message::{Headers, Message, OwnedMessage};
use service_kit::telemetry;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use crate::{
    dead_letter::{DeadLetters, Failure},
    dedup::Dedup,
    metrics::{Metrics, ReasonLabels},
    notifier::{self, Notification, Notifier, NotifyError},
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
pub enum Outcome {
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

fn header<'m>(message: &'m OwnedMessage, name: &str) -> Option<&'m [u8]> {
    message
        .headers()
        .and_then(|h| h.iter().filter(|h| h.key == name).last().and_then(|h| h.value))
}

impl Processor {
    /// A processor sending through `notifier`, dead-lettering to `dead_letters`.
    ///
    /// With the log sink, a notification line that cannot be written stops
    /// the process before its offset is stored
    /// ([`telemetry::exit_when_lines_lost`], see [`notifier::log`]): a
    /// notification whose line was lost is never let go of, and the next
    /// start delivers it.
    pub fn new(
        notifier: Notifier,
        dead_letters: DeadLetters,
        dedup: Dedup,
        retry: RetryPolicy,
        metrics: Arc<Metrics>,
        max_record_bytes: usize,
    ) -> Self {
        if matches!(notifier, Notifier::Log) {
            telemetry::exit_when_lines_lost(notifier::EXIT_OUTPUT_BROKEN);
        }
        Self {
            notifier,
            dead_letters,
            dedup,
            retry,
            metrics,
            max_record_bytes,
        }
    }

    /// Whether the sink's notification is a log line, so a batch of records
    /// can share one `write(2)` ([`telemetry::LogBatch`]).
    pub fn notifies_by_log(&self) -> bool {
        matches!(self.notifier, Notifier::Log)
    }

    /// Handles `message`. `stop` interrupts waits between attempts (never an
    /// attempt in flight): the record is then left for redelivery.
    pub async fn process(&self, message: &OwnedMessage, stop: &CancellationToken) -> Outcome {
        let started = Instant::now();
        self.metrics.consumed.inc();
        if self.log_without_span(message) {
            self.metrics.handling_seconds.observe(started.elapsed().as_secs_f64());
            return Outcome::Handled;
        }
        let span = tracing::info_span!(
            "event",
            topic = %message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            order_id = Empty,
            event_id = Empty,
        );
        telemetry::continue_trace(&span, |name| {
            header(message, name).map(|v| String::from_utf8_lossy(v).into_owned())
        });
        let outcome = async {
            match envelope::decode(|name| header(message, name), message.payload(), self.max_record_bytes) {
                Err(error) => {
                    tracing::warn!(%error, "record is not a valid event; dead-lettering it");
                    let failure = Failure {
                        class: error.class(),
                        message: error.to_string(),
                        attempts: 0,
                    };
                    self.dead_letter(message, failure, stop).await
                }
                Ok(Event::OrderCreated(event)) => {
                    let span = tracing::Span::current();
                    span.record("event_id", event.event_id.as_str());
                    span.record(
                        "order_id",
                        event.order.as_ref().map(|o| o.order_id.as_str()).unwrap_or_default(),
                    );
                    self.notify(message, &event, &span, stop).await
                }
            }
        }
        .instrument(span)
        .await;
        if outcome == Outcome::Handled {
            self.metrics.handling_seconds.observe(started.elapsed().as_secs_f64());
        }
        outcome
    }

    /// The log sink's success path without the record's `event` span, when
    /// nothing exports spans: the span's creation, fields and registry entry
    /// were a tenth of a catch-up's CPU. The line carries the same trace id
    /// the span would have had. Anything else (another sink, an exporter, a
    /// record that does not decode, a duplicate) returns `false` having done
    /// nothing, and takes the spanned path.
    fn log_without_span(&self, message: &OwnedMessage) -> bool {
        if !self.notifies_by_log() || telemetry::exporting() {
            return false;
        }
        let decoded = envelope::decode(|name| header(message, name), message.payload(), self.max_record_bytes);
        let Ok(Event::OrderCreated(event)) = decoded else {
            return false;
        };
        if self.dedup.seen(&event.event_id) {
            return false;
        }
        let trace = telemetry::TraceContext::continue_from(|name| {
            header(message, name).map(|v| String::from_utf8_lossy(v).into_owned())
        });
        notifier::log(&Notification::from_event(&event, Some(trace.trace_id())));
        self.sent(&event);
        true
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
    ) -> Outcome {
        if self.dedup.seen(&event.event_id) {
            self.metrics.duplicates.inc();
            tracing::info!("duplicate delivery of a handled event; skipped");
            return Outcome::Handled;
        }
        let notification = Notification::from_event(event, telemetry::trace_id(span));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.notifier.send(&notification).await {
                Ok(()) => {
                    self.sent(event);
                    return Outcome::Handled;
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
                    telemetry::flush_logs();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = stop.cancelled() => return Outcome::Stopped,
                    }
                }
            };
            tracing::warn!(attempt, error = %failure.message, class = failure.class, "notification failed for good; dead-lettering");
            return self.dead_letter(message, failure, stop).await;
        }
    }

    /// Publishes to the dead-letter topic, retrying until it is acknowledged
    /// or `stop` fires: the record's offset never moves past an unsaved failure.
    async fn dead_letter(&self, message: &OwnedMessage, failure: Failure, stop: &CancellationToken) -> Outcome {
        let mut attempt = 0;
        loop {
            // The publish awaits the broker (up to its deadline in an
            // outage): no line of an open LogBatch waits through it.
            telemetry::flush_logs();
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
                    return Outcome::Handled;
                }
                Err(error) => {
                    attempt += 1;
                    let delay = DEAD_LETTER_BACKOFF.delay(attempt);
                    tracing::error!(%error, attempt, ?delay, "cannot publish to the dead-letter topic; holding the offset and retrying");
                    telemetry::flush_logs();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return Outcome::Stopped,
                    }
                }
            }
        }
    }
}
