//! Prometheus metrics of notify-svc.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of `events_dead_lettered_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why: `malformed`, `unknown_type`, `notify_permanent`, `retries_exhausted`, ...
    pub reason: String,
}

/// Labels of `kafka_consumer_lag`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// Topic.
    pub topic: String,
    /// Partition number.
    pub partition: String,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
    .into_iter()
}

/// Every metric notify-svc exports.
#[derive(Debug)]
pub struct Metrics {
    /// `events_consumed_total`: records taken from the topic.
    pub consumed: Counter,
    /// `notifications_sent_total`.
    pub sent: Counter,
    /// `notifications_failed_total`: failed attempts.
    pub failed: Counter,
    /// `events_duplicate_total`: deliveries of an already handled event.
    pub duplicates: Counter,
    /// `events_dead_lettered_total{reason}`.
    pub dead_lettered: Family<ReasonLabels, Counter>,
    /// `event_handling_seconds`: record in hand to offset stored.
    pub handling_seconds: Histogram,
    /// `event_end_to_end_seconds`: the event's occurred_at to notification sent.
    pub end_to_end_seconds: Histogram,
    /// `kafka_consumer_lag{topic,partition}`.
    pub lag: Family<PartitionLabels, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            consumed: Counter::default(),
            sent: Counter::default(),
            failed: Counter::default(),
            duplicates: Counter::default(),
            dead_lettered: Family::default(),
            handling_seconds: Histogram::new(seconds_buckets()),
            end_to_end_seconds: Histogram::new(seconds_buckets()),
            lag: Family::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "events_consumed",
            "Records taken from the orders topic",
            metrics.consumed.clone(),
        );
        registry.register(
            "notifications_sent",
            "Notifications delivered to the sink",
            metrics.sent.clone(),
        );
        registry.register(
            "notifications_failed",
            "Notification attempts that failed",
            metrics.failed.clone(),
        );
        registry.register(
            "events_duplicate",
            "Deliveries of an event already handled, dropped",
            metrics.duplicates.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Records sent to the dead-letter topic, by reason",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "event_handling_seconds",
            "Time from taking a record to storing its offset",
            metrics.handling_seconds.clone(),
        );
        registry.register(
            "event_end_to_end_seconds",
            "Time from the event's occurred_at to its notification being sent",
            metrics.end_to_end_seconds.clone(),
        );
        registry.register(
            "kafka_consumer_lag",
            "Records behind the partition's high watermark",
            metrics.lag.clone(),
        );
        metrics
    }
}
