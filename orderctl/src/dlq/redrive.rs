//! `dlq redrive`: publishes selected dead letters back to the topic they came
//! from, one at a time with the idempotent producer, and commits the
//! position after each acknowledged record in its own consumer group, so a
//! run that is interrupted (even by `kill -9`) can be run again without
//! skipping a record. A record whose publish was acknowledged but whose
//! commit was lost is published once more by the next run; it keeps its
//! event id, so notify-svc (and the webhook's `Idempotency-Key`) drop it as a
//! duplicate.
//!
//! A run reads up to the end each partition had when it started: records
//! dead-lettered during the run (a redriven record failing again, say) wait
//! for the next run instead of looping.

use std::{
    collections::HashSet,
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use rdkafka::{
    Message,
    message::{Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
};
use service_kit::kafka::{KafkaArgs, Role, check_topic};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tracing::Instrument;

use super::{
    Error,
    filter::{Filter, FilterArgs, Position},
    letter::{DeadLetter, header},
    scan::{Dlq, Range},
};

/// `dlq redrive`'s flags.
#[derive(Debug, clap::Args)]
pub(crate) struct RedriveArgs {
    #[command(flatten)]
    filter: FilterArgs,

    /// Print what would be redriven; publish and commit nothing.
    #[arg(long)]
    dry_run: bool,

    /// Consumer group that keeps the redrive's position on the dead-letter
    /// topic (committed after each acknowledged record, with the selection).
    #[arg(long, env = "DLQ_REDRIVE_GROUP", default_value = "orderctl-dlq-redrive")]
    group: String,

    /// Start from the beginning of the dead-letter topic instead of the
    /// group's position. Records redriven before are published again;
    /// notify-svc drops those it still remembers (DEDUP_CACHE_SIZE) as
    /// duplicates, and the webhook gets the same Idempotency-Key.
    #[arg(long)]
    restart: bool,

    /// Redrive at most this many records in this run; the next run goes on
    /// from there.
    #[arg(long)]
    limit: Option<u64>,

    /// Wait this long after each redriven record, to go easy on a receiver
    /// that has just recovered (e.g. 100ms: at most ten a second).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pause: Duration,

    /// Write the run's figures to this file in the Prometheus text format
    /// (replaced atomically), for node_exporter's textfile collector.
    #[arg(long, env = "DLQ_REDRIVE_METRICS_FILE", value_name = "PATH")]
    metrics_file: Option<PathBuf>,
}

/// Producer defaults: idempotent with `acks=all`, like order-svc's, so the
/// client's own retries neither duplicate nor reorder a redriven record.
const PRODUCER_DEFAULTS: [(&str, &str); 4] = [
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("message.timeout.ms", "30000"),
    ("linger.ms", "0"),
];

/// What a run did, for the summary, the log and the metrics file.
#[derive(Debug, Default)]
struct Tally {
    read: u64,
    redriven: u64,
    not_selected: u64,
    /// Selected but without a value (notify-svc trimmed it): the original is
    /// still at its topic, partition and offset.
    without_value: u64,
    /// The first position not done, per partition read.
    positions: Vec<Position>,
}

/// Redrives the selection from `dlq_topic`; a dead letter that does not say
/// where it came from goes to `orders_topic`.
pub(crate) async fn run(
    kafka: &KafkaArgs,
    dlq_topic: &str,
    orders_topic: &str,
    args: &RedriveArgs,
) -> Result<(), Error> {
    let filter = Filter::try_from(args.filter.clone()).map_err(Error::Invalid)?;
    let started = Instant::now();
    let mut tally = Tally::default();
    let result = redrive(kafka, dlq_topic, orders_topic, args, &filter, &mut tally)
        .instrument(tracing::info_span!("redrive", dlq = dlq_topic, group = %args.group, selection = %filter, dry_run = args.dry_run))
        .await;
    let positions = tally
        .positions
        .iter()
        .map(Position::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let verb = match (args.dry_run, result.is_ok()) {
        (true, true) => "dry run finished: would redrive",
        (true, false) => "dry run stopped: would redrive",
        (false, true) => "redrive finished: redriven",
        (false, false) => "redrive stopped: redriven",
    };
    println!(
        "{verb} {}, not selected {}, without value {}, read {}; position {}",
        tally.redriven,
        tally.not_selected,
        tally.without_value,
        tally.read,
        if positions.is_empty() { "-" } else { &positions }
    );
    let elapsed = started.elapsed();
    match &result {
        Ok(()) => tracing::info!(
            redriven = tally.redriven,
            not_selected = tally.not_selected,
            without_value = tally.without_value,
            read = tally.read,
            dry_run = args.dry_run,
            ?elapsed,
            "redrive finished"
        ),
        Err(error) => tracing::warn!(
            redriven = tally.redriven,
            not_selected = tally.not_selected,
            without_value = tally.without_value,
            read = tally.read,
            dry_run = args.dry_run,
            ?elapsed,
            %error,
            "redrive stopped"
        ),
    }
    if let Some(path) = &args.metrics_file {
        write_metrics(path, dlq_topic, &tally, result.is_ok(), elapsed, args.dry_run)?;
    }
    result
}

async fn redrive(
    kafka: &KafkaArgs,
    dlq_topic: &str,
    orders_topic: &str,
    args: &RedriveArgs,
    filter: &Filter,
    tally: &mut Tally,
) -> Result<(), Error> {
    let dlq = Dlq::open(kafka, dlq_topic, &args.group).await?;
    let selection = filter.to_string();
    let committed = if args.restart { Vec::new() } else { dlq.committed()? };
    for (partition, offset, saved) in &committed {
        if offset.is_some() && saved.is_empty() {
            // Apache Kafka keeps a commit's metadata; some brokers (Tansu
            // 0.6) drop it, and then the selection cannot be checked.
            tracing::warn!(
                partition,
                "the saved position carries no selection (the broker keeps no commit metadata, or another tool committed it); resuming it for this run's selection"
            );
        }
        if offset.is_some() && !saved.is_empty() && *saved != selection {
            return Err(Error::OtherSelection {
                group: args.group.clone(),
                topic: dlq_topic.to_owned(),
                saved: saved.clone(),
                now: selection,
            });
        }
    }
    let mut ranges = Vec::new();
    for partition in 0..dlq.partitions() {
        let (low, high) = dlq.watermarks(partition)?;
        let saved = committed
            .iter()
            .find(|(p, _, _)| *p == partition)
            .and_then(|(_, offset, _)| *offset);
        let start = match saved {
            Some(offset) if offset < low => {
                tracing::warn!(
                    partition,
                    saved = offset,
                    low,
                    "records after the saved position were removed by retention before they were redriven"
                );
                low
            }
            Some(offset) => offset,
            None => low,
        };
        tracing::info!(partition, start, end = high, resumed = saved.is_some(), "redrive range");
        ranges.push(Range {
            partition,
            start,
            end: high,
        });
        tally.positions.push(Position {
            partition,
            offset: start,
        });
    }
    let producer: FutureProducer = kafka.client_config(Role::Producer, PRODUCER_DEFAULTS).create()?;
    let mut checked_topics = HashSet::new();
    let mut cursor = dlq.cursor(ranges);
    let mut out = std::io::stdout();
    // Positions past records that were only read (not selected) are
    // committed at the next redriven record or at the end: re-reading them
    // after a crash costs nothing.
    let mut uncommitted: Option<Position> = None;
    while args.limit.is_none_or(|limit| tally.redriven < limit) {
        let Some(message) = cursor.next().await? else {
            break;
        };
        tally.read += 1;
        let at = Position {
            partition: message.partition(),
            offset: message.offset(),
        };
        let letter = DeadLetter::read(&message);
        let done = Position {
            partition: at.partition,
            offset: at.offset + 1,
        };
        if !filter.matches(&letter) {
            tally.not_selected += 1;
            uncommitted = Some(done);
            set_position(tally, done);
            continue;
        }
        let span = tracing::info_span!(
            "record",
            from = %format_args!("{dlq_topic}:{at}"),
            order_id = letter.order_id.as_deref().unwrap_or("-"),
            event_id = letter.event_id.as_deref().unwrap_or("-"),
            class = letter.error_class.as_deref().unwrap_or("-"),
        );
        let ids = format!(
            "order_id={} event_id={} class={}",
            letter.order_id.as_deref().unwrap_or("-"),
            letter.event_id.as_deref().unwrap_or("-"),
            letter.error_class.as_deref().unwrap_or("-"),
        );
        let handled = async {
            if message.payload().is_none() || letter.omitted.is_some() {
                tracing::warn!(
                    omitted = letter.omitted.as_deref().unwrap_or("-"),
                    original = %letter.original(),
                    "dead letter has no value (too large for the dead-letter topic); the original is still at its origin; not redriven"
                );
                let _ = writeln!(out, "skipped {dlq_topic}:{at}: no value; the original is at {}", letter.original());
                return Ok(false);
            }
            let target = match &letter.original_topic {
                Some(t) => t.clone(),
                None => {
                    tracing::warn!(topic = %orders_topic, "dead letter does not say where it came from; redriving to ORDERS_TOPIC");
                    orders_topic.to_owned()
                }
            };
            if !checked_topics.contains(&target) {
                tokio::task::block_in_place(|| {
                    check_topic(producer.client(), &kafka.brokers, &target, kafka.startup_timeout)
                })?;
                checked_topics.insert(target.clone());
            }
            if args.dry_run {
                let _ = writeln!(out, "would redrive {dlq_topic}:{at} -> {target} {ids}");
                return Ok(true);
            }
            let redriven_at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
            let from = format!("{dlq_topic}:{at}");
            let headers = redriven_headers(&message, &from, &redriven_at);
            let mut record = FutureRecord::<[u8], [u8]>::to(&target).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(value) = message.payload() {
                record = record.payload(value);
            }
            let delivered = producer
                .send(record, Duration::from_secs(5))
                .await
                .map_err(|(source, _)| Error::Produce {
                    topic: dlq_topic.to_owned(),
                    at,
                    target: target.clone(),
                    source: Box::new(source),
                })?;
            // Acknowledged: only now may the position pass it.
            dlq.commit(done.partition, done.offset, &selection)?;
            tracing::info!(to = %format_args!("{target}:{}:{}", delivered.partition, delivered.offset), "redriven");
            let _ = writeln!(
                out,
                "redriven {from} -> {target}:{}:{} {ids}",
                delivered.partition, delivered.offset,
            );
            let _ = out.flush();
            Ok::<bool, Error>(true)
        }
        .instrument(span)
        .await?;
        set_position(tally, done);
        if !handled {
            tally.without_value += 1;
            uncommitted = Some(done);
            continue;
        }
        tally.redriven += 1;
        if args.dry_run {
            continue;
        }
        uncommitted = None;
        if !args.pause.is_zero() {
            tokio::time::sleep(args.pause).await;
        }
    }
    if let (Some(done), false) = (uncommitted, args.dry_run) {
        dlq.commit(done.partition, done.offset, &selection)?;
    }
    if !args.dry_run {
        producer.flush(Duration::from_secs(10))?;
    }
    Ok(())
}

/// Records the first position not done of `done.partition`.
fn set_position(tally: &mut Tally, done: Position) {
    if let Some(p) = tally.positions.iter_mut().find(|p| p.partition == done.partition) {
        p.offset = done.offset;
    }
}

/// The original's headers as the dead letter carries them, without the
/// dead-letter context (`dlq.*`, `kafka_dlt-*`), plus where and when it was
/// redriven from.
fn redriven_headers<M: Message>(message: &M, from: &str, at: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = message.headers() {
        for h in h.iter().filter(|h| !header::is_dead_letter_context(h.key)) {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    headers
        .insert(Header {
            key: header::REDRIVEN_FROM,
            value: Some(from.as_bytes()),
        })
        .insert(Header {
            key: header::REDRIVEN_AT,
            value: Some(at.as_bytes()),
        })
}

/// Writes the run's figures in the Prometheus text format, replacing `path`
/// atomically (a temporary file renamed over it) as the textfile collector
/// expects. A redrive is a short-lived run nothing can scrape: the file
/// keeps its last figures where node_exporter picks them up.
fn write_metrics(
    path: &std::path::Path,
    dlq: &str,
    tally: &Tally,
    ok: bool,
    elapsed: Duration,
    dry_run: bool,
) -> Result<(), Error> {
    let dlq = dlq.replace('\\', "\\\\").replace('"', "\\\"");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut text = String::new();
    text.push_str(
        "# HELP orderctl_dlq_redrive_last_run_records Dead letters the last redrive run handled, by outcome.\n",
    );
    text.push_str("# TYPE orderctl_dlq_redrive_last_run_records gauge\n");
    for (outcome, n) in [
        ("redriven", tally.redriven),
        ("not_selected", tally.not_selected),
        ("without_value", tally.without_value),
    ] {
        text.push_str(&format!(
            "orderctl_dlq_redrive_last_run_records{{dlq=\"{dlq}\",outcome=\"{outcome}\",dry_run=\"{dry_run}\"}} {n}\n"
        ));
    }
    text.push_str("# HELP orderctl_dlq_redrive_last_run_success Whether the last redrive run finished without error (1) or not (0).\n");
    text.push_str("# TYPE orderctl_dlq_redrive_last_run_success gauge\n");
    text.push_str(&format!(
        "orderctl_dlq_redrive_last_run_success{{dlq=\"{dlq}\"}} {}\n",
        u8::from(ok)
    ));
    text.push_str(
        "# HELP orderctl_dlq_redrive_last_run_timestamp_seconds When the last redrive run ended (Unix time).\n",
    );
    text.push_str("# TYPE orderctl_dlq_redrive_last_run_timestamp_seconds gauge\n");
    text.push_str(&format!(
        "orderctl_dlq_redrive_last_run_timestamp_seconds{{dlq=\"{dlq}\"}} {now}\n"
    ));
    text.push_str("# HELP orderctl_dlq_redrive_last_run_duration_seconds How long the last redrive run took.\n");
    text.push_str("# TYPE orderctl_dlq_redrive_last_run_duration_seconds gauge\n");
    text.push_str(&format!(
        "orderctl_dlq_redrive_last_run_duration_seconds{{dlq=\"{dlq}\"}} {:.3}\n",
        elapsed.as_secs_f64()
    ));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let what = format!("writing the metrics file {}", path.display());
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| Error::Io { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::{Timestamp, message::OwnedMessage};

    #[test]
    fn redriven_headers_drop_dead_letter_context_and_say_where_from() {
        let headers = [
            ("ce_id", "e-1"),
            ("traceparent", "00-abc-def-01"),
            ("dlq.error.class", "notify_permanent"),
            ("DLQ.original.topic", "orders"),
            ("kafka_dlt-original-offset", "x"),
            ("x-custom", "kept"),
        ]
        .iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        });
        let m = OwnedMessage::new(
            Some(b"v".to_vec()),
            Some(b"k".to_vec()),
            "orders.dlq".into(),
            Timestamp::NotAvailable,
            2,
            17,
            Some(headers),
        );
        let out = redriven_headers(&m, "orders.dlq:2:17", "2026-12-05T08:00:00Z");
        let got: Vec<(String, String)> = out
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("ce_id", "e-1"),
            ("traceparent", "00-abc-def-01"),
            ("x-custom", "kept"),
            ("dlq.redriven.from", "orders.dlq:2:17"),
            ("dlq.redriven.at", "2026-12-05T08:00:00Z"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn metrics_file_is_prometheus_text_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("orderctl-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("redrive.prom");
        std::fs::write(&path, "old").unwrap();
        let tally = Tally {
            redriven: 3,
            not_selected: 2,
            ..Tally::default()
        };
        write_metrics(&path, "orders.dlq", &tally, true, Duration::from_millis(1500), false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(
                "orderctl_dlq_redrive_last_run_records{dlq=\"orders.dlq\",outcome=\"redriven\",dry_run=\"false\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("orderctl_dlq_redrive_last_run_success{dlq=\"orders.dlq\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("orderctl_dlq_redrive_last_run_duration_seconds{dlq=\"orders.dlq\"} 1.500\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.starts_with("orderctl_dlq_redrive_last_run_"), "{line}");
            value.parse::<f64>().unwrap();
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
