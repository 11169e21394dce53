//! `orderctl dlq`: the dead letters notify-svc writes, made actionable. `list`
//! them with filters and paging, `show` one with its headers and event, and
//! `redrive` a selection back to the topic it came from, resumably. It reads
//! the brokers' settings the services read (service-kit's `KafkaArgs`).
//!
//! Results go to stdout, logs to stderr.

mod filter;
mod letter;
mod redrive;
mod scan;

use std::{io::Write, time::Duration};

use clap::{Args, Subcommand};
use orders_contract::envelope::{self, Event};
use rdkafka::message::{Headers, Message};
use service_kit::kafka::{CheckError, KafkaArgs};

use filter::{Filter, FilterArgs, Position};
use letter::{DeadLetter, printable};
use scan::{Dlq, Range};

/// Dead letters: list, show, redrive.
#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// The topic of the OrderCreated events.
    #[arg(long, env = "ORDERS_TOPIC", default_value = "orders")]
    orders_topic: String,

    /// The dead-letter topic notify-svc writes.
    #[arg(long, env = "DLQ_TOPIC", default_value = "orders.dlq")]
    dlq_topic: String,

    #[command(subcommand)]
    command: DlqCmd,
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// List dead letters: position, origin, error, attempts, failed-at, order
    /// and event id. Reads one page (--limit) from the start or --from.
    List(ListArgs),
    /// Show one dead letter, <partition>:<offset>, with all its headers and
    /// the decoded event.
    Show {
        /// The dead letter's position on the dead-letter topic, e.g. 0:17.
        position: Position,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish the selected dead letters back to their original topic, with
    /// their key, value and headers (minus dlq.* and kafka_dlt-*, plus
    /// dlq.redriven.from and dlq.redriven.at). Resumable: the position is
    /// committed in a consumer group after each record is acknowledged.
    Redrive(redrive::RedriveArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Print one JSON object per dead letter per line (JSON Lines).
    #[arg(long)]
    json: bool,
    /// Most dead letters printed (0: no limit); the position to go on from
    /// is printed on stderr.
    #[arg(long, default_value_t = 100)]
    limit: u64,
    /// Start at this position, <partition>:<offset> (the next page's start
    /// that a limited list prints); later partitions are read from their
    /// start.
    #[arg(long, value_name = "POSITION")]
    from: Option<Position>,
}

/// Why a `dlq` command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A setting or argument is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The broker does not answer or the topic is missing.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The client failed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The position is below the partition's oldest record.
    #[error(
        "dead letter {topic}:{at} no longer exists: partition {} starts at offset {low} now (older records were removed by retention)",
        at.partition
    )]
    Gone { topic: String, at: Position, low: i64 },
    /// The position is at or past the partition's end.
    #[error("dead letter {topic}:{at} does not exist: partition {} {holds}", at.partition)]
    NotYet { topic: String, at: Position, holds: String },
    /// The partition is not one of the topic's.
    #[error("partition {partition} does not exist: {topic} has {count} partition(s)")]
    NoPartition { topic: String, partition: i32, count: i32 },
    /// A record that exists did not arrive.
    #[error("reading {topic} at {at} made no progress for {waited:?}")]
    Stalled {
        topic: String,
        at: Position,
        waited: Duration,
    },
    /// The group's position belongs to another selection.
    #[error(
        "group {group} holds a redrive position on {topic} saved for the selection \"{saved}\", and this run selects \"{now}\": \
         run with the same filters to resume it, use --group for another selection, or --restart to start from the beginning"
    )]
    OtherSelection {
        group: String,
        topic: String,
        saved: String,
        now: String,
    },
    /// A redriven record was not acknowledged.
    #[error("cannot redrive {topic}:{at} to {target}: {source}; nothing after it was redriven, run again to resume")]
    Produce {
        topic: String,
        at: Position,
        target: String,
        source: Box<rdkafka::error::KafkaError>,
    },
    /// Output could not be written.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_owned(),
        source,
    }
}

/// Runs a `dlq` subcommand.
pub(crate) async fn run(args: &DlqArgs) -> Result<(), Error> {
    init_logs();
    args.kafka.security.validate().map_err(Error::Invalid)?;
    match &args.command {
        DlqCmd::List(list_args) => list(args, list_args).await,
        DlqCmd::Show { position, json } => show(args, *position, *json).await,
        DlqCmd::Redrive(redrive_args) => {
            redrive::run(&args.kafka, &args.dlq_topic, &args.orders_topic, redrive_args).await
        }
    }
}

/// Logs on stderr (stdout carries the results); `RUST_LOG` overrides `info`.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Consumer group of `list` and `show`: they never commit, so nothing is
/// stored under it.
const READER_GROUP: &str = "orderctl-dlq-reader";

async fn list(args: &DlqArgs, list: &ListArgs) -> Result<(), Error> {
    let filter = Filter::try_from(list.filter.clone()).map_err(Error::Invalid)?;
    let dlq = Dlq::open(&args.kafka, &args.dlq_topic, READER_GROUP).await?;
    if let Some(from) = list.from {
        dlq.check_partition(from.partition)?;
    }
    let mut ranges = Vec::new();
    for partition in list.from.map_or(0, |f| f.partition)..dlq.partitions() {
        let (low, high) = dlq.watermarks(partition)?;
        let start = match list.from {
            Some(from) if from.partition == partition => {
                if from.offset < low {
                    tracing::warn!(%from, low, "records before the partition's start were removed by retention; listing from its start");
                }
                from.offset.max(low)
            }
            _ => low,
        };
        ranges.push(Range {
            partition,
            start,
            end: high,
        });
    }
    let mut cursor = dlq.cursor(ranges);
    let mut out = std::io::stdout().lock();
    if !list.json {
        writeln!(
            out,
            "{:<10} {:<28} {:<18} {:>3} {:<30} {:<36} {:<36} MESSAGE",
            "DLQ", "ORIGINAL", "CLASS", "ATT", "FAILED AT", "ORDER ID", "EVENT ID"
        )
        .map_err(io("writing the list"))?;
    }
    let (mut shown, mut read) = (0u64, 0u64);
    while list.limit == 0 || shown < list.limit {
        let Some(message) = cursor.next().await? else {
            break;
        };
        read += 1;
        let letter = DeadLetter::read(&message);
        if !filter.matches(&letter) {
            continue;
        }
        shown += 1;
        if list.json {
            serde_json::to_writer(&mut out, &letter)
                .map_err(|e| Error::Io {
                    what: "writing JSON".into(),
                    source: e.into(),
                })
                .and_then(|()| writeln!(out).map_err(io("writing JSON")))?;
        } else {
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{:<10} {:<28} {:<18} {:>3} {:<30} {:<36} {:<36} {}",
                format!("{}:{}", letter.partition, letter.offset),
                letter.original(),
                dash(&letter.error_class),
                letter.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                dash(&letter.failed_at),
                dash(&letter.order_id),
                dash(&letter.event_id),
                escape(&dash(&letter.error_message)),
            )
            .map_err(io("writing the list"))?;
        }
    }
    out.flush().map_err(io("writing the list"))?;
    match cursor.next_position() {
        Some(next) => {
            eprintln!("{shown} dead letter(s) of {read} read (selection: {filter}); more may follow: --from {next}")
        }
        None => eprintln!(
            "{shown} dead letter(s) of {read} read (selection: {filter}); end of {}",
            dlq.topic()
        ),
    }
    Ok(())
}

/// One line per value: control characters escaped.
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(char::escape_default)
        .collect::<String>()
        .replace("\\'", "'")
        .replace("\\\"", "\"")
}

async fn show(args: &DlqArgs, at: Position, json: bool) -> Result<(), Error> {
    let dlq = Dlq::open(&args.kafka, &args.dlq_topic, READER_GROUP).await?;
    dlq.check_partition(at.partition)?;
    let (low, high) = dlq.watermarks(at.partition)?;
    let topic = dlq.topic().to_owned();
    if at.offset < low {
        return Err(Error::Gone { topic, at, low });
    }
    if at.offset >= high {
        let holds = if low < high {
            format!("holds offsets {low} to {}", high - 1)
        } else {
            "holds no records".to_owned()
        };
        return Err(Error::NotYet { topic, at, holds });
    }
    let mut cursor = dlq.cursor(vec![Range {
        partition: at.partition,
        start: at.offset,
        end: at.offset + 1,
    }]);
    let Some(message) = cursor.next().await?.filter(|m| m.offset() == at.offset) else {
        // Compacted away, or removed by retention since the watermarks.
        let (low, _) = dlq.watermarks(at.partition)?;
        return Err(Error::Gone { topic, at, low });
    };
    let letter = DeadLetter::read(&message);
    let headers: Vec<(String, String)> = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_owned(), printable(h.value))).collect())
        .unwrap_or_default();
    let event = match envelope::decode(
        |name| {
            message
                .headers()
                .and_then(|h| h.iter().filter(|h| h.key == name).last().and_then(|h| h.value))
        },
        message.payload(),
        usize::MAX,
    ) {
        Ok(Event::OrderCreated(e)) => Some(event_json(&e)),
        Err(_) => None,
    };
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = serde_json::to_value(&letter).map_err(|e| Error::Io {
            what: "encoding JSON".into(),
            source: e.into(),
        })?;
        value["headers"] = serde_json::Value::Array(
            headers
                .iter()
                .map(|(k, v)| serde_json::json!({ "key": k, "value": v }))
                .collect(),
        );
        value["event"] = event.unwrap_or(serde_json::Value::Null);
        writeln!(out, "{value}").map_err(io("writing JSON"))?;
        return Ok(());
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let lines = [
        (
            "dead letter",
            format!("{}:{}:{}", dlq.topic(), letter.partition, letter.offset),
        ),
        ("original", letter.original()),
        ("error class", dash(&letter.error_class)),
        ("error message", escape(&dash(&letter.error_message))),
        (
            "attempts",
            letter.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
        ),
        ("failed at", dash(&letter.failed_at)),
        ("key", dash(&letter.key)),
        ("order id", dash(&letter.order_id)),
        ("event id", dash(&letter.event_id)),
        ("value", format!("{} bytes", letter.value_bytes)),
    ];
    for (name, value) in lines {
        writeln!(out, "{name:<14} {value}").map_err(io("writing"))?;
    }
    if let Some(omitted) = &letter.omitted {
        writeln!(
            out,
            "{:<14} {omitted} (the original is still at {})",
            "omitted",
            letter.original()
        )
        .map_err(io("writing"))?;
    }
    if let Some(error) = &letter.decode_error {
        writeln!(out, "{:<14} {}", "not decodable", escape(error)).map_err(io("writing"))?;
    }
    writeln!(out, "headers:").map_err(io("writing"))?;
    for (k, v) in &headers {
        writeln!(out, "  {}: {}", escape(k), escape(v)).map_err(io("writing"))?;
    }
    if let Some(event) = event {
        let pretty = serde_json::to_string_pretty(&event).unwrap_or_default();
        writeln!(out, "event:\n{pretty}").map_err(io("writing"))?;
    }
    Ok(())
}

/// The event as JSON for `show`.
fn event_json(e: &orders_contract::v1::OrderCreated) -> serde_json::Value {
    let ts = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(orders_contract::from_timestamp)
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
    };
    let order = e.order.as_ref().map(|o| {
        serde_json::json!({
            "order_id": o.order_id,
            "user_id": o.user_id,
            "currency": o.currency,
            "total_minor": o.total_minor,
            "request_id": o.request_id,
            "created_at": ts(&o.created_at),
            "items": o.items.iter().map(|i| serde_json::json!({
                "sku": i.sku, "quantity": i.quantity, "unit_price_minor": i.unit_price_minor,
            })).collect::<Vec<_>>(),
        })
    });
    serde_json::json!({
        "type": envelope::ORDER_CREATED_TYPE,
        "event_id": e.event_id,
        "occurred_at": ts(&e.occurred_at),
        "order": order,
    })
}
