//! `bench`: run everything (`bench all`), drive one target (`bench loadgen`),
//! serve a ceiling (`bench serve-ceiling`, used by `bench all`), or count
//! instructions per call (`bench instructions`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bench::{grpc_ceiling, instructions, loadgen, procs, run, stats::Percentiles};
use clap::{Args, Parser, Subcommand};
use service_kit::kafka::KafkaOptions;

// The services' allocator, so that the ceilings served from this binary
// (`serve-ceiling`) are built from the same parts as order-svc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "CreateOrder benchmarks against the tonic and rdkafka ceilings"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a broker (unless --brokers) and the services, measure
    /// everything, print the results table.
    All(Box<AllArgs>),
    /// Drive one OrderService endpoint, closed loop (--concurrency) or open
    /// loop (--rate).
    Loadgen(LoadArgs),
    /// Serve the OrderService ceiling: ceiling 1 (bare tonic), with
    /// --brokers ceiling 2 (one produce per call), with --database-url
    /// ceiling 5 (order-svc's store transaction per call), with both
    /// ceiling 6 (the transaction, then the produce).
    #[command(alias = "serve-bare")]
    ServeCeiling(CeilingArgs),
    /// Count CPU instructions per CreateOrder call (valgrind callgrind,
    /// whole process) for order-svc, ceiling 2 and ceiling 6 at fixed rates.
    Instructions(InstructionsArgs),
}

#[derive(Debug, Args)]
struct InstructionsArgs {
    /// Open-loop rates, calls/s, comma-separated (at least two: the cost of
    /// a call is the slope between them). Low enough that under callgrind
    /// each order still commits alone: at rates where orders queue for the
    /// store, the group sizes, and with them the count per call, vary from
    /// run to run.
    #[arg(long, value_delimiter = ',', default_value = "25,50,100")]
    rates: Vec<f64>,
    /// How long each rate runs.
    #[arg(long, default_value = "20s", value_parser = humantime_duration)]
    duration: Duration,
    /// HTTP/2 connections of the generator.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The broker to start.
    #[arg(long, value_enum, default_value_t = Broker::Kafka)]
    broker: Broker,
    /// Use this running broker instead of starting one.
    #[arg(long)]
    brokers: Option<String>,
    /// librdkafka properties for the servers [default: none on Apache
    /// Kafka; on Tansu, scripts/tansu-kafka-options].
    #[arg(long, env = "KAFKA_OPTIONS")]
    kafka_options: Option<KafkaOptions>,
    /// order-svc binary [default: next to this one].
    #[arg(long)]
    order_svc_bin: Option<PathBuf>,
    /// valgrind binary.
    #[arg(long, default_value = "valgrind")]
    valgrind: PathBuf,
}

#[derive(Debug, Args)]
struct AllArgs {
    /// Short runs (1 s warm-up, 3 s per closed-loop run, 2 rounds, 5 s open
    /// loop, 100,000 catch-up records) for a quick check.
    #[arg(long)]
    quick: bool,
    /// Closed-loop concurrencies, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    concurrency: Vec<usize>,
    /// HTTP/2 connections per run (at most one per concurrent call).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Unmeasured warm-up before each run [default: 2s, quick 1s].
    #[arg(long, value_parser = humantime_duration)]
    warmup: Option<Duration>,
    /// Measured time of each closed-loop run [default: 5s, quick 3s].
    #[arg(long, value_parser = humantime_duration)]
    duration: Option<Duration>,
    /// Closed-loop rounds: every target once per round at each concurrency,
    /// the order reversed every other round; rows pool all rounds
    /// [default: 4, quick 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// Open-loop rate for the end-to-end comparison, calls/s.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured time of the open-loop runs [default: 20s, quick 5s].
    #[arg(long, value_parser = humantime_duration)]
    e2e_duration: Option<Duration>,
    /// Unmeasured broker load before the first measurement: a JVM broker
    /// compiles its hot paths in its first minute [default: 30s, quick 10s].
    #[arg(long, value_parser = humantime_duration)]
    broker_warmup: Option<Duration>,
    /// Records pre-filled for the catch-up [default: 1000000, quick 100000].
    #[arg(long)]
    catchup_count: Option<u64>,
    /// Partitions of each topic the run creates.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// The broker to start (with --brokers: the kind of the running one,
    /// which decides the default --kafka-options).
    #[arg(long, value_enum, default_value_t = Broker::Kafka)]
    broker: Broker,
    /// Tansu storage: memory, sqlite, or a full storage URL.
    #[arg(long, default_value = "memory")]
    storage: String,
    /// Tansu binary [default: as the tests find it: $TANSU_BIN, PATH, ~/.cargo/bin].
    #[arg(long, env = "TANSU")]
    tansu: Option<PathBuf>,
    /// Use this running broker instead of starting one.
    #[arg(long)]
    brokers: Option<String>,
    /// librdkafka properties for every client [default: none on Apache
    /// Kafka; on Tansu, scripts/tansu-kafka-options].
    #[arg(long, env = "KAFKA_OPTIONS")]
    kafka_options: Option<KafkaOptions>,
    /// Target a running order-svc (http://host:port) instead of starting one.
    #[arg(long)]
    order_svc_url: Option<String>,
    /// The running order-svc's pid, for its RSS and CPU.
    #[arg(long)]
    order_svc_pid: Option<u32>,
    /// order-svc binary [default: next to this one].
    #[arg(long)]
    order_svc_bin: Option<PathBuf>,
    /// notify-svc binary [default: next to this one].
    #[arg(long)]
    notify_svc_bin: Option<PathBuf>,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the pre-fill, the raw drain and the notify-svc catch-up.
    #[arg(long)]
    catchup_only: bool,
    /// The server under test (ceiling servers, services) on CPUs of its own,
    /// the broker and this load generator on the others (on 2 CPUs: the
    /// server on one, everything else on the other) [default: on 4 or more
    /// CPUs].
    #[arg(long, conflicts_with = "no_pin")]
    pin: bool,
    /// Every process on every CPU, even on 4 or more.
    #[arg(long)]
    no_pin: bool,
    /// The store of order-svc and of ceilings 5 and 6, a fresh one each:
    /// SQLite files in the run's directory, or databases on a PostgreSQL
    /// server started as the tests start it (testkit).
    #[arg(long, value_enum, default_value_t = Store::Sqlite)]
    store: Store,
    /// KEY=VALUE environment for the catch-up notify-svc (tuning
    /// experiments, e.g. RUST_LOG=warn or DEDUP_CACHE_SIZE=10000); repeatable.
    #[arg(long, value_parser = parse_env)]
    notify_env: Vec<(String, String)>,
}

/// Which store `bench all` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Store {
    /// SQLite (order-svc's default, embedded).
    Sqlite,
    /// PostgreSQL (testkit's server; Debian's postgresql package).
    Postgres,
}

/// Which broker `bench all` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Broker {
    /// Apache Kafka (KRaft, from the jars of `scripts/install-tools.sh --kafka`).
    Kafka,
    /// Tansu, the broker of `scripts/run.sh`.
    Tansu,
}

impl Broker {
    fn kind(self) -> testkit::BrokerKind {
        match self {
            Broker::Kafka => testkit::BrokerKind::Kafka,
            Broker::Tansu => testkit::BrokerKind::Tansu,
        }
    }
}

/// `given`, else what users run with: librdkafka's defaults on Apache Kafka;
/// on Tansu, what scripts/tansu-kafka-options says it needs.
fn default_options(given: Option<KafkaOptions>, broker: testkit::BrokerKind) -> anyhow::Result<KafkaOptions> {
    Ok(match given {
        Some(options) => options,
        None => match broker {
            testkit::BrokerKind::Kafka => KafkaOptions::default(),
            testkit::BrokerKind::Tansu => broker.client_options().parse()?,
        },
    })
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The OrderService endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Calls in flight (closed loop).
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections.
    #[arg(long, short = 'm', default_value_t = 4)]
    connections: usize,
    /// Fixed rate in calls/s (open loop); latency counts from the scheduled time.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    duration: Duration,
    /// Unmeasured warm-up.
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    warmup: Duration,
}

#[derive(Debug, Args)]
struct CeilingArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Produce one record per call to this broker (ceiling 2).
    #[arg(long, requires = "topic")]
    brokers: Option<String>,
    /// Topic for those records.
    #[arg(long)]
    topic: Option<String>,
    /// librdkafka properties over order-svc's producer defaults.
    #[arg(long, default_value = "")]
    kafka_options: KafkaOptions,
    /// Commit each call's order to this store first (order-svc's
    /// DATABASE_URL syntax): ceiling 5, or with --brokers ceiling 6.
    #[arg(long)]
    database_url: Option<String>,
    /// Leave Nagle's algorithm on for accepted connections.
    #[arg(long)]
    no_nodelay: bool,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::All(a) => {
            let a = *a;
            let q = a.quick;
            let broker = a.broker.kind();
            let kafka_options = default_options(a.kafka_options, broker)?;
            let pick = |v: Option<Duration>, full: u64, quick: u64| {
                v.unwrap_or(Duration::from_secs(if q { quick } else { full }))
            };
            let run = run::all(run::Settings {
                concurrency: a.concurrency,
                connections: a.connections,
                warmup: pick(a.warmup, 2, 1),
                duration: pick(a.duration, 5, 3),
                rounds: a.rounds.unwrap_or(if q { 2 } else { 4 }),
                rate: a.rate,
                e2e_duration: pick(a.e2e_duration, 20, 5),
                broker_warmup: pick(a.broker_warmup, 30, 10),
                catchup_count: a.catchup_count.unwrap_or(if q { 100_000 } else { 1_000_000 }),
                partitions: a.partitions,
                broker,
                storage: a.storage,
                tansu: a.tansu,
                brokers: a.brokers,
                kafka_options,
                order_svc_url: a.order_svc_url,
                order_svc_pid: a.order_svc_pid,
                order_svc_bin: a.order_svc_bin.unwrap_or_else(|| procs::sibling_binary("order-svc")),
                notify_svc_bin: a.notify_svc_bin.unwrap_or_else(|| procs::sibling_binary("notify-svc")),
                out: a.out,
                catchup_only: a.catchup_only,
                notify_env: a.notify_env,
                store: match a.store {
                    Store::Sqlite => run::StoreKind::Sqlite,
                    Store::Postgres => run::StoreKind::Postgres,
                },
                placement: procs::Placement::plan(match (a.pin, a.no_pin) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                })?,
            });
            // On Ctrl-C or SIGTERM, drop the run: its child processes (broker,
            // services, ceiling servers) are killed on drop.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = run => result,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
                _ = term.recv() => anyhow::bail!("terminated"),
            }
        }
        Cmd::Instructions(a) => {
            let broker = a.broker.kind();
            instructions::run(instructions::Settings {
                rates: a.rates,
                duration: a.duration,
                connections: a.connections,
                broker,
                brokers: a.brokers,
                kafka_options: default_options(a.kafka_options, broker)?,
                order_svc_bin: a.order_svc_bin.unwrap_or_else(|| procs::sibling_binary("order-svc")),
                valgrind: a.valgrind,
            })
            .await
        }
        Cmd::Loadgen(a) => {
            let result = loadgen::run(&loadgen::LoadSpec {
                target: a.target,
                connections: a.connections,
                concurrency: a.concurrency,
                rate: a.rate,
                duration: a.duration,
                warmup: a.warmup,
                track_orders: false,
            })
            .await?;
            println!(
                "{:.0} calls/s, {}, errors {}",
                result.rate(),
                Percentiles::of(&result.latency),
                result.errors
            );
            if let Some(service) = &result.service_time {
                println!("service time (from send): {}", Percentiles::of(service));
            }
            if let Some(e) = result.first_error {
                println!("first error: {e}");
            }
            Ok(())
        }
        Cmd::ServeCeiling(a) => {
            let kafka = a.brokers.map(|brokers| grpc_ceiling::KafkaTarget {
                brokers,
                topic: a.topic.unwrap_or_default(),
                options: a.kafka_options,
            });
            grpc_ceiling::serve(a.addr, kafka, a.database_url, !a.no_nodelay).await
        }
    }
}
