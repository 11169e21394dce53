//! `bench instructions`: CPU instructions per `CreateOrder` call, counted by
//! valgrind's callgrind over a whole server process, for order-svc, for
//! ceiling 2 (tonic + produce) and for ceiling 6 (tonic + order-svc's store
//! transaction + produce, on a SQLite store like order-svc's). Unlike time,
//! an instruction count does not move with the machine's load, so two
//! builds compare on a busy machine.
//!
//! Each server runs once per rate, under callgrind, for the same time at a
//! fixed open-loop rate; start-up, shutdown and idle work (timers,
//! librdkafka's threads) cost the same at every rate, so the slope of the
//! total count over the calls made is the cost of one call.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use service_kit::kafka::KafkaOptions;
use testkit::BrokerKind;
use tokio::process::Command;

use crate::{
    fixtures,
    loadgen::{self, LoadSpec},
    procs::{self, Proc},
    run::RunningBroker,
};

/// What `bench instructions` is told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Open-loop rates, calls/s (at least two).
    pub rates: Vec<f64>,
    /// How long each rate runs.
    pub duration: Duration,
    /// HTTP/2 connections of the generator.
    pub connections: usize,
    /// The broker to start.
    pub broker: BrokerKind,
    /// Use this running broker instead.
    pub brokers: Option<String>,
    /// librdkafka properties for the servers.
    pub kafka_options: KafkaOptions,
    /// The order-svc binary.
    pub order_svc_bin: PathBuf,
    /// The valgrind binary.
    pub valgrind: PathBuf,
}

/// One server at one rate.
#[derive(Debug, Clone, Copy)]
struct Count {
    rate: f64,
    /// Calls the server answered (the generator's connection set-up calls included).
    calls: u64,
    /// Instructions the whole process executed, start to exit.
    instructions: u64,
}

/// Runs both servers at every rate and prints the table.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    anyhow::ensure!(s.rates.len() >= 2, "--rates needs at least two rates for a slope");
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = std::env::temp_dir().join(format!("orders-instructions-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    eprintln!("instructions: working directory {}", dir.display());
    let broker = match &s.brokers {
        Some(b) => RunningBroker::Given(b.clone()),
        None => RunningBroker::start(s.broker, None, "memory", &dir).await?,
    };
    let brokers = broker.addr();
    let (orders, ceiling) = (format!("instr-{run_id}-orders"), format!("instr-{run_id}-ceiling"));
    let stored = format!("instr-{run_id}-ceiling6");
    fixtures::create_topics(
        &brokers,
        &[(orders.clone(), 3), (ceiling.clone(), 3), (stored.clone(), 3)],
    )
    .await?;
    let exe = std::env::current_exe()?;

    let mut table = Vec::new();
    for (name, server) in [
        (
            "ceiling 2: tonic + produce",
            Server::Ceiling {
                exe: &exe,
                topic: &ceiling,
                stored: false,
            },
        ),
        (
            "ceiling 6: tonic + store transaction + produce",
            Server::Ceiling {
                exe: &exe,
                topic: &stored,
                stored: true,
            },
        ),
        (
            "order-svc CreateOrder",
            Server::OrderSvc {
                bin: &s.order_svc_bin,
                topic: &orders,
            },
        ),
    ] {
        let mut counts = Vec::new();
        for &rate in &s.rates {
            let out = dir.join(format!("callgrind.{}.{rate}", server.file_name()));
            let count = measure(&s, &server, &brokers, rate, &out).await?;
            eprintln!(
                "instructions: {name} at {rate}/s: {} calls, {} instructions",
                count.calls, count.instructions
            );
            counts.push(count);
        }
        table.push((name, counts));
    }
    broker.stop(&dir).await;
    println!("{}", report(&s, &table));
    Ok(())
}

/// A server under test.
#[derive(Debug)]
enum Server<'a> {
    /// `bench serve-ceiling --brokers`: tonic + one produce per call; with
    /// `stored`, a SQLite store's transaction before it (`--database-url`).
    Ceiling {
        exe: &'a Path,
        topic: &'a str,
        stored: bool,
    },
    /// order-svc.
    OrderSvc { bin: &'a Path, topic: &'a str },
}

impl Server<'_> {
    fn file_name(&self) -> &'static str {
        match self {
            Self::Ceiling { stored: false, .. } => "ceiling2",
            Self::Ceiling { stored: true, .. } => "ceiling6",
            Self::OrderSvc { .. } => "order-svc",
        }
    }
}

/// Runs `server` under callgrind, drives it at `rate` for the set time,
/// stops it and reads the instruction total callgrind writes at exit.
async fn measure(s: &Settings, server: &Server<'_>, brokers: &str, rate: f64, out: &Path) -> anyhow::Result<Count> {
    let mut command = Command::new(&s.valgrind);
    command
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(out.with_extension("log"))?);
    // Under callgrind a server starts tens of times slower than natively.
    const START: Duration = Duration::from_secs(180);
    let (mut proc, url) = match server {
        Server::Ceiling { exe, topic, stored } => {
            command
                .arg(exe)
                .args([
                    "serve-ceiling",
                    "--addr",
                    "127.0.0.1:0",
                    "--brokers",
                    brokers,
                    "--topic",
                    topic,
                ])
                .arg(format!("--kafka-options={}", s.kafka_options))
                .stdout(Stdio::piped());
            if *stored {
                command.arg(format!("--database-url={}", sqlite_url(out)));
            }
            let mut proc = Proc::spawn("a ceiling under callgrind", command)?;
            let addr = proc.wait_for_line("listening on", START).await?;
            (proc, format!("http://{addr}"))
        }
        Server::OrderSvc { bin, topic } => {
            let (grpc, metrics) = (procs::free_port()?, procs::free_port()?);
            command
                .arg(bin)
                .env("KAFKA_BROKERS", brokers)
                .env("ORDERS_TOPIC", topic)
                .env("GRPC_ADDR", format!("127.0.0.1:{grpc}"))
                .env("METRICS_ADDR", format!("127.0.0.1:{metrics}"))
                .env("KAFKA_OPTIONS", s.kafka_options.to_string())
                // order-svc's default would be orders.db where bench runs.
                .env("DATABASE_URL", sqlite_url(out))
                .env("RUST_LOG", "info")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .stdout(std::fs::File::create(out.with_extension("stdout"))?);
            let proc = Proc::spawn("order-svc under callgrind", command)?;
            let http = reqwest::Client::new();
            crate::run::wait_ready(&http, &format!("http://127.0.0.1:{metrics}/readyz"), START).await?;
            (proc, format!("http://127.0.0.1:{grpc}"))
        }
    };
    let result = loadgen::run(&LoadSpec {
        target: url,
        connections: s.connections,
        concurrency: 0,
        rate: Some(rate),
        duration: s.duration,
        warmup: Duration::ZERO,
        track_orders: false,
    })
    .await?;
    proc.check_alive()?;
    anyhow::ensure!(
        result.errors == 0,
        "{} calls failed at {rate}/s (first: {:?}): a count with failed calls is not a call's cost",
        result.errors,
        result.first_error
    );
    // SIGTERM: order-svc shuts down, the ceiling server is ended by the
    // signal; callgrind writes its totals either way.
    proc.stop(Duration::from_secs(120)).await;
    Ok(Count {
        rate,
        // loadgen makes one unmeasured call per connection first.
        calls: result.ok + s.connections as u64,
        instructions: callgrind_total(out)?,
    })
}

/// A fresh SQLite store per measurement, in the run's directory beside
/// callgrind's output `out`.
fn sqlite_url(out: &Path) -> String {
    format!("sqlite://{}", out.with_extension("db").display())
}

/// The `totals:` (or `summary:`) line of a callgrind output file: every
/// instruction of every thread.
fn callgrind_total(file: &Path) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("no callgrind output {}: {e}", file.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{} has no totals line", file.display()))
}

/// Least-squares slope of instructions over calls.
fn slope(counts: &[Count]) -> f64 {
    let n = counts.len() as f64;
    let mx = counts.iter().map(|c| c.calls as f64).sum::<f64>() / n;
    let my = counts.iter().map(|c| c.instructions as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for c in counts {
        let dx = c.calls as f64 - mx;
        sxy += dx * (c.instructions as f64 - my);
        sxx += dx * dx;
    }
    sxy / sxx.max(1e-9)
}

fn report(s: &Settings, table: &[(&str, Vec<Count>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Instructions per call\n\nvalgrind callgrind, whole process; open loop, {:?} per rate over {} connections; per call = the slope between rates\n",
        s.duration, s.connections
    );
    let _ = writeln!(
        out,
        "| server | rate | calls | instructions | slope from the previous rate |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (name, counts) in table {
        for (i, c) in counts.iter().enumerate() {
            let step = match i.checked_sub(1).map(|p| &counts[p]) {
                Some(p) if c.calls > p.calls => format!(
                    "{:.0}",
                    (c.instructions as f64 - p.instructions as f64) / (c.calls - p.calls) as f64
                ),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {name} | {}/s | {} | {} | {step} |",
                c.rate, c.calls, c.instructions
            );
        }
    }
    let _ = writeln!(out, "\n| server | instructions per call (fit over all rates) |");
    let _ = writeln!(out, "|---|---|");
    let slopes: Vec<f64> = table.iter().map(|(_, counts)| slope(counts)).collect();
    for ((name, _), per_call) in table.iter().zip(&slopes) {
        let _ = writeln!(out, "| {name} | {per_call:.0} |");
    }
    if let [ceiling2, ceiling6, order_svc] = slopes[..] {
        let _ = writeln!(
            out,
            "\norder-svc / ceiling 2: **{:.3}x**; order-svc / ceiling 6: **{:.3}x**",
            order_svc / ceiling2.max(1.0),
            order_svc / ceiling6.max(1.0)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_cancels_a_fixed_cost() {
        let counts: Vec<Count> = [100, 200, 400]
            .iter()
            .map(|&calls| Count {
                rate: calls as f64,
                calls,
                instructions: 5_000_000 + 1_000 * calls,
            })
            .collect();
        assert!((slope(&counts) - 1_000.0).abs() < 1e-6);
    }

    #[test]
    fn callgrind_totals_are_read() {
        let file = std::env::temp_dir().join(format!("callgrind-test-{}", std::process::id()));
        std::fs::write(&file, "events: Ir\nfn=main\n1 5\nsummary: 12345\ntotals: 12345\n").unwrap();
        assert_eq!(callgrind_total(&file).unwrap(), 12345);
        std::fs::remove_file(&file).unwrap();
    }
}
