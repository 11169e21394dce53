//! `bench all`: one run that starts a broker (unless given one), the ceiling
//! servers and the services, drives each with the same generator and
//! settings, and prints every figure beside its ceiling and target.

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use service_kit::kafka::KafkaOptions;
use testkit::BrokerKind;
use tokio::process::Command;

use crate::{
    fixtures, kafka_ceiling,
    loadgen::{self, LoadSpec},
    procs::{self, CpuWindow, Proc},
    prom,
    stats::{self, Percentiles},
};

/// Everything `bench all` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Closed-loop concurrencies.
    pub concurrency: Vec<usize>,
    /// HTTP/2 connections per run (capped at the concurrency).
    pub connections: usize,
    /// Unmeasured time before each run.
    pub warmup: Duration,
    /// Measured time of each closed-loop run.
    pub duration: Duration,
    /// Closed-loop rounds (each target once per round, order reversed every
    /// other round; rows pool all rounds).
    pub rounds: usize,
    /// Open-loop rate for the end-to-end comparison.
    pub rate: f64,
    /// Measured time of the open-loop and raw end-to-end runs.
    pub e2e_duration: Duration,
    /// Unmeasured broker load before the first measurement (half a raw
    /// producer at C=64, half raw end to end at `rate`).
    pub broker_warmup: Duration,
    /// Records pre-filled for the catch-up and raw drain.
    pub catchup_count: u64,
    /// Partitions of every topic the run creates.
    pub partitions: i32,
    /// The broker to start (or the kind of the one given by `brokers`).
    pub broker: BrokerKind,
    /// Tansu's storage: `memory` or `sqlite` (or a full Tansu storage URL).
    pub storage: String,
    /// The Tansu binary (default: where testkit finds it).
    pub tansu: Option<PathBuf>,
    /// Use this broker instead of starting one.
    pub brokers: Option<String>,
    /// librdkafka properties for every client (services and raw).
    pub kafka_options: KafkaOptions,
    /// Target a running order-svc (`http://host:port`) instead of starting one.
    pub order_svc_url: Option<String>,
    /// Its pid, for RSS and CPU.
    pub order_svc_pid: Option<u32>,
    /// order-svc and notify-svc binaries.
    pub order_svc_bin: PathBuf,
    /// notify-svc binary.
    pub notify_svc_bin: PathBuf,
    /// Also write the report here.
    pub out: Option<PathBuf>,
    /// Only the pre-fill, raw drain and notify-svc catch-up (for tuning).
    pub catchup_only: bool,
    /// Extra environment for the catch-up notify-svc (for tuning experiments).
    pub notify_env: Vec<(String, String)>,
    /// Which CPUs the servers under test, the broker and the generator use.
    pub placement: procs::Placement,
    /// The store of order-svc and of ceilings 5 and 6.
    pub store: StoreKind,
}

/// Which database order-svc and the store ceilings commit to: each its own,
/// created for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// One SQLite file each in the run's directory.
    Sqlite,
    /// One database each on a PostgreSQL server testkit starts for the run.
    Postgres,
}

impl StoreKind {
    /// The store's durability setting, for the report: SQLite as order-svc's
    /// store.rs opens it, PostgreSQL as testkit starts it.
    pub fn durability(self) -> &'static str {
        match self {
            StoreKind::Sqlite => {
                "SQLite, a file per server in the run's directory, as order-svc opens it: journal_mode=WAL, \
                 synchronous=FULL (each commit fsyncs the WAL before CreateOrder answers: an OK survives a power loss)"
            }
            StoreKind::Postgres => {
                "PostgreSQL as testkit starts it for the tests (a database per server, one server, co-located): \
                 synchronous_commit=on (the default), fsync=off, full_page_writes=off (a commit waits for its WAL \
                 write, which is never flushed: an OK survives a crash of any process, not a power loss)"
            }
        }
    }

    /// The ceiling labels of this store: (store transaction, + produce).
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            StoreKind::Sqlite => (
                "ceiling 5: tonic + store transaction (SQLite)",
                "ceiling 6: tonic + store transaction + produce (SQLite)",
            ),
            StoreKind::Postgres => (
                "ceiling 5: tonic + store transaction (PostgreSQL)",
                "ceiling 6: tonic + store transaction + produce (PostgreSQL)",
            ),
        }
    }
}

#[derive(Debug)]
struct Row {
    what: String,
    concurrency: String,
    rate: f64,
    unit: &'static str,
    latency: Percentiles,
    errors: u64,
    cpu: String,
}

#[derive(Debug, Default)]
struct Results {
    rows: Vec<Row>,
    /// (what, concurrency) -> rate
    rates: HashMap<(&'static str, usize), f64>,
    p50: HashMap<(&'static str, usize), f64>,
    notes: Vec<String>,
    e2e_service: Option<Percentiles>,
    e2e_service_hist_p99: Option<f64>,
    e2e_raw: Option<Percentiles>,
    open_loop: Option<Percentiles>,
    drain_rate: Option<f64>,
    catchup_rate: Option<f64>,
    /// The catch-up stopped short of the pre-filled count.
    catchup_stalled: bool,
    rss: Vec<(String, Option<f64>, Option<f64>)>,
    /// Which broker ran, for the report's header.
    broker: String,
}

const CEILING1: &str = "ceiling 1: bare tonic";
const CEILING2: &str = "ceiling 2: tonic + produce";
const RAW_PRODUCE: &str = "ceiling 3: raw producer";
const ORDER_SVC: &str = "order-svc CreateOrder";

fn note(results: &mut Results, line: String) {
    eprintln!("{line}");
    results.notes.push(line);
}

/// Runs everything and prints the report.
pub async fn all(s: Settings) -> anyhow::Result<()> {
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = std::env::temp_dir().join(format!("orders-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    eprintln!("bench: working directory {}", dir.display());
    // Before anything starts: threads and children inherit the affinity.
    s.placement.pin_generator()?;
    eprintln!("bench: {}", s.placement.describe());
    let http = reqwest::Client::new();
    let mut r = Results::default();
    let opts = s.kafka_options.to_string();

    // Broker.
    let broker = match &s.brokers {
        Some(b) => RunningBroker::Given(b.clone()),
        None => RunningBroker::start(s.broker, s.tansu.as_deref(), &s.storage, &dir).await?,
    };
    let brokers = broker.addr();
    let broker_pid = broker.pid();
    s.placement.pin_broker(broker_pid)?;
    r.broker = broker.describe(&s);
    eprintln!("bench: broker {}", r.broker);
    let topic = |name: &str| format!("bench-{run_id}-{name}");
    let (orders, ceiling, raw_topic, e2e_topic, catchup) = (
        topic("orders"),
        topic("ceiling"),
        topic("raw"),
        topic("e2e"),
        topic("catchup"),
    );
    let (warm, warm_e2e) = (topic("warmup"), topic("warmup-e2e"));
    let topics: Vec<(String, i32)> = [
        &warm,
        &warm_e2e,
        &orders,
        &format!("{orders}.dlq"),
        &ceiling,
        &raw_topic,
        &e2e_topic,
        &catchup,
        &format!("{catchup}.dlq"),
    ]
    .into_iter()
    .map(|t| (t.clone(), s.partitions))
    .collect();
    fixtures::create_topics(&brokers, &topics).await?;
    eprintln!("bench: broker {brokers}, topics created");
    let broker_idle = procs::rss_mib(broker_pid);
    if let Some(rss) = broker_idle {
        eprintln!("bench: broker RSS {rss:.1} MiB (pid {broker_pid})");
    }
    // A JVM broker that has just started is still compiling its hot paths
    // and spends more CPU per record than it will a minute later; the
    // first measurement (end to end) would pay for that.
    if !s.broker_warmup.is_zero() && !s.catchup_only {
        eprintln!("bench: warming the broker up for {:?}", s.broker_warmup);
        let half = s.broker_warmup / 2;
        let cpu = CpuWindow::start(&[("broker", broker_pid)]);
        kafka_ceiling::produce_closed_loop(&brokers, &warm, &s.kafka_options, 64, Duration::ZERO, half).await?;
        kafka_ceiling::end_to_end(&brokers, &warm_e2e, &s.kafka_options, s.rate, Duration::ZERO, half).await?;
        eprintln!("bench: broker warmed up [{}]", cpu.finish());
    }

    // Ceiling servers, each in its own process like the service.
    let exe = std::env::current_exe()?;
    // Stores: a fresh one for order-svc and for each store ceiling, so no
    // run starts on another's rows.
    let postgres = match s.store {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => Some(testkit::Postgres::start().await?),
    };
    let database_url = |name: &str| {
        let postgres = postgres.clone();
        let file = dir.join(format!("{name}.db"));
        let database = format!("bench_{name}");
        async move {
            anyhow::Ok(match postgres {
                None => format!("sqlite://{}", file.display()),
                Some(pg) => pg.create_database(&database).await?,
            })
        }
    };
    let mut ceiling1 = Proc::spawn("ceiling 1 server", ceiling_command(&s, &exe, None, None))?;
    let ceiling1_url = format!(
        "http://{}",
        ceiling1.wait_for_line("listening on", Duration::from_secs(10)).await?
    );
    let mut ceiling2 = Proc::spawn(
        "ceiling 2 server",
        ceiling_command(&s, &exe, Some((&brokers, &ceiling)), None),
    )?;
    let ceiling2_url = format!(
        "http://{}",
        ceiling2.wait_for_line("listening on", Duration::from_secs(10)).await?
    );
    let (ceiling5_label, ceiling6_label) = s.store.labels();
    let mut ceiling5 = Proc::spawn(
        "ceiling 5 server",
        ceiling_command(&s, &exe, None, Some(&database_url("ceiling5").await?)),
    )?;
    let ceiling5_url = format!(
        "http://{}",
        ceiling5.wait_for_line("listening on", Duration::from_secs(30)).await?
    );
    let mut ceiling6 = Proc::spawn(
        "ceiling 6 server",
        ceiling_command(
            &s,
            &exe,
            Some((&brokers, &ceiling)),
            Some(&database_url("ceiling6").await?),
        ),
    )?;
    let ceiling6_url = format!(
        "http://{}",
        ceiling6.wait_for_line("listening on", Duration::from_secs(30)).await?
    );

    // order-svc.
    let (order_url, order_proc) = match &s.order_svc_url {
        Some(url) => (url.clone(), None),
        None => {
            let (grpc, metrics) = (procs::free_port()?, procs::free_port()?);
            let mut command = s.placement.server_command(&s.order_svc_bin);
            command
                .env("KAFKA_BROKERS", &brokers)
                .env("ORDERS_TOPIC", &orders)
                .env("GRPC_ADDR", format!("127.0.0.1:{grpc}"))
                .env("METRICS_ADDR", format!("127.0.0.1:{metrics}"))
                .env("KAFKA_OPTIONS", &opts)
                .env("DATABASE_URL", database_url("orders").await?)
                .env("RUST_LOG", "info")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .stdout(std::fs::File::create(dir.join("order-svc.log"))?)
                .stderr(Stdio::inherit());
            let p = Proc::spawn("order-svc", command)?;
            wait_ready(
                &http,
                &format!("http://127.0.0.1:{metrics}/readyz"),
                Duration::from_secs(30),
            )
            .await?;
            (format!("http://127.0.0.1:{grpc}"), Some(p))
        }
    };
    let order_pid = order_proc.as_ref().map(Proc::pid).or(s.order_svc_pid).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let order_idle = procs::rss_mib(order_pid);
    let watched = |svc: u32| vec![("broker", broker_pid), ("svc", svc), ("bench", std::process::id())];

    // End to end at a fixed rate first, while the broker is nearly empty:
    // Tansu's in-memory storage gets slower to fetch from as it fills up
    // (BENCHMARKS.md), and the closed-loop runs below write millions of records.
    // order-svc -> broker -> notify-svc.
    let mut notify_idle = None;
    let mut notify_peak = None;
    if !s.catchup_only && s.order_svc_url.is_none() {
        let metrics_port = procs::free_port()?;
        let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let log = dir.join("notify-svc.log");
        // A new group starting at the end of the topic: the closed-loop
        // records above are not part of this measurement.
        let notify = spawn_notify(
            &s,
            &brokers,
            &orders,
            &format!("bench-{run_id}-notify"),
            metrics_port,
            &log,
            &[("KAFKA_OPTIONS".into(), format!("{opts},auto.offset.reset=latest"))],
        )?;
        wait_ready(&http, &metrics_url, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        notify_idle = procs::rss_mib(notify.pid());
        // Wait until it has partitions: orders sent now reach it.
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut client = orders_contract::v1::order_service_client::OrderServiceClient::new(
            loadgen::connect(&order_url, 1).await?.remove(0),
        );
        loop {
            let _ = client.create_order(loadgen::request(0)).await;
            let text = prom::scrape(&http, &metrics_url).await?;
            if prom::value(&text, "notifications_sent_total") > 0.0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "notify-svc saw no order within 90 s");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let before = prom::scrape(&http, &metrics_url).await?;
        let spec = LoadSpec {
            target: order_url.clone(),
            connections: s.connections,
            concurrency: 0,
            rate: Some(s.rate),
            duration: s.e2e_duration,
            warmup: s.warmup,
            track_orders: true,
        };
        let cpu = CpuWindow::start(&[
            ("broker", broker_pid),
            ("order-svc", order_pid),
            ("notify-svc", notify.pid()),
            ("bench", std::process::id()),
        ]);
        let result = loadgen::run(&spec).await?;
        let cpu = cpu.finish_per(result.rate());
        // Every measured order must show up in the log (the warm-up's orders
        // are notified too, so the sent counter alone cannot tell).
        let started: HashMap<String, SystemTime> = result.started.iter().cloned().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (e2e, missing) = loop {
            let (e2e, missing) = prom::log_end_to_end(&log, &started)?;
            if missing == 0 || Instant::now() >= deadline {
                break (e2e, missing);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let after = prom::scrape(&http, &metrics_url).await?;
        let open = Percentiles::of(&result.latency);
        eprintln!(
            "bench: open loop {} calls/s: {:.0} calls/s, from schedule {open}, errors {} [{cpu}]",
            s.rate,
            result.rate(),
            result.errors
        );
        r.rows.push(Row {
            what: format!("order-svc open loop at {}/s (from schedule)", s.rate),
            concurrency: "open".into(),
            rate: result.rate(),
            unit: "calls/s",
            latency: open,
            errors: result.errors,
            cpu: cpu.clone(),
        });
        r.open_loop = Some(open);
        let e2e = Percentiles::of(&e2e);
        if missing > 0 {
            note(
                &mut r,
                format!(
                    "end to end: {missing} of {} orders not found in the notify-svc log",
                    started.len()
                ),
            );
        }
        let hist_p99 = prom::quantile_between(
            &prom::buckets(&before, "event_end_to_end_seconds"),
            &prom::buckets(&after, "event_end_to_end_seconds"),
            0.99,
        )
        .map(|s| s * 1e3);
        eprintln!(
            "bench: end to end (call start to notification line): {e2e}; notify-svc histogram p99 ~{} ms",
            hist_p99.map_or("-".into(), stats::ms)
        );
        r.rows.push(Row {
            what: format!("service end to end at {}/s (call start to notification)", s.rate),
            concurrency: "open".into(),
            rate: e2e.count as f64 / s.e2e_duration.as_secs_f64(),
            unit: "events/s",
            latency: e2e,
            errors: missing as u64,
            cpu,
        });
        r.e2e_service = Some(e2e);
        r.e2e_service_hist_p99 = hist_p99;
        notify_peak = procs::peak_rss_mib(notify.pid());
        notify.stop(Duration::from_secs(5)).await;
    } else if !s.catchup_only {
        note(
            &mut r,
            "order-svc given by URL: service end to end not measured (needs the notify-svc log)".into(),
        );
    }

    // Raw end to end at the same rate.
    if !s.catchup_only {
        let cpu = CpuWindow::start(&watched(0));
        let raw_e2e =
            kafka_ceiling::end_to_end(&brokers, &e2e_topic, &s.kafka_options, s.rate, s.warmup, s.e2e_duration).await?;
        let raw_pct = Percentiles::of(&raw_e2e.latency);
        eprintln!(
            "bench: raw end to end at {}/s: {raw_pct}, {} of {} received",
            s.rate, raw_e2e.received, raw_e2e.sent
        );
        r.rows.push(Row {
            what: format!("raw producer -> consumer at {}/s", s.rate),
            concurrency: "open".into(),
            rate: raw_e2e.received as f64 / s.e2e_duration.as_secs_f64(),
            unit: "msgs/s",
            latency: raw_pct,
            errors: raw_e2e.sent.saturating_sub(raw_e2e.received),
            cpu: cpu.finish_per(s.rate),
        });
        r.e2e_raw = Some(raw_pct);
    }

    // Closed loop: every target at every concurrency, interleaved so each
    // sees the same machine state.
    let concurrency = if s.catchup_only {
        Vec::new()
    } else {
        s.concurrency.clone()
    };
    for &c in &concurrency {
        let targets = [
            (CEILING1, &ceiling1_url, ceiling1.pid()),
            (CEILING2, &ceiling2_url, ceiling2.pid()),
            (ceiling5_label, &ceiling5_url, ceiling5.pid()),
            (ceiling6_label, &ceiling6_url, ceiling6.pid()),
            (ORDER_SVC, &order_url, order_pid),
        ];
        let connections = s.connections.min(c).max(1);
        // Rounds of all targets back to back, the order reversed every other
        // round (ceiling 1, 2, 5, 6, CreateOrder; then CreateOrder, ceiling
        // 6, 5, 2, 1): the machine drifts by 10-20% within minutes
        // and runs that follow each other see the most similar machine, so
        // neither ceiling 2 nor CreateOrder always goes second. Rows pool
        // every round (calls over measured time, latencies merged).
        let mut runs: Vec<Vec<(loadgen::LoadResult, String)>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 1..=s.rounds.max(1) {
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for i in order {
                let (label, url, pid) = &targets[i];
                let spec = LoadSpec {
                    target: (*url).clone(),
                    connections,
                    concurrency: c,
                    rate: None,
                    duration: s.duration,
                    warmup: s.warmup,
                    track_orders: false,
                };
                let cpu = CpuWindow::start(&watched(*pid));
                let result = loadgen::run(&spec).await?;
                let cpu = cpu.finish_per(result.rate());
                eprintln!(
                    "bench: {label} C={c} round {round}: {:.0} calls/s, {}, errors {} [{cpu}]",
                    result.rate(),
                    Percentiles::of(&result.latency),
                    result.errors
                );
                if let Some(e) = &result.first_error {
                    note(&mut r, format!("{label} C={c} round {round}: first error: {e}"));
                }
                runs[i].push((result, cpu));
            }
        }
        let rates = |i: usize| runs[i].iter().map(|(res, _)| res.rate()).collect::<Vec<_>>();
        let pooled = |i: usize| {
            let ok: u64 = runs[i].iter().map(|(res, _)| res.ok).sum();
            let secs: f64 = runs[i].iter().map(|(res, _)| res.elapsed.as_secs_f64()).sum();
            ok as f64 / secs.max(1e-9)
        };
        if runs[0].len() > 1 {
            let ratio = |num: usize, den: usize| {
                let each = rates(num)
                    .iter()
                    .zip(rates(den))
                    .map(|(n, d)| format!("{:.2}", n / d.max(1e-9)))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{:.2} (rounds {each})", pooled(num) / pooled(den).max(1e-9))
            };
            note(
                &mut r,
                format!(
                    "C={c}, all rounds pooled: CreateOrder / ceiling 6 = {}; CreateOrder / ceiling 5 = {}; CreateOrder / ceiling 2 = {}; CreateOrder / ceiling 1 = {}",
                    ratio(4, 3),
                    ratio(4, 2),
                    ratio(4, 1),
                    ratio(4, 0)
                ),
            );
        }
        for (i, (label, _, _)) in targets.iter().enumerate() {
            // CPU from the median round (by rate); rate and latency from all.
            let mut by_rate: Vec<usize> = (0..runs[i].len()).collect();
            by_rate.sort_by(|&x, &y| runs[i][x].0.rate().total_cmp(&runs[i][y].0.rate()));
            let cpu = runs[i][by_rate[by_rate.len() / 2]].1.clone();
            let mut latency = runs[i][0].0.latency.clone();
            for (res, _) in &runs[i][1..] {
                latency.add(&res.latency)?;
            }
            let row = Row {
                what: (*label).to_owned(),
                concurrency: format!("{c} over {connections} conn"),
                rate: pooled(i),
                unit: "calls/s",
                latency: Percentiles::of(&latency),
                errors: runs[i].iter().map(|(res, _)| res.errors).sum(),
                cpu,
            };
            r.rates.insert((label, c), row.rate);
            r.p50.insert((label, c), row.latency.p50);
            r.rows.push(row);
        }
        let cpu = CpuWindow::start(&watched(0));
        let result =
            kafka_ceiling::produce_closed_loop(&brokers, &raw_topic, &s.kafka_options, c, s.warmup, s.duration).await?;
        let row = Row {
            what: RAW_PRODUCE.to_owned(),
            concurrency: c.to_string(),
            rate: result.ok as f64 / result.elapsed.as_secs_f64(),
            unit: "msgs/s",
            latency: Percentiles::of(&result.latency),
            errors: result.errors,
            cpu: cpu.finish_per(result.ok as f64 / result.elapsed.as_secs_f64()),
        };
        eprintln!(
            "bench: {RAW_PRODUCE} C={c}: {:.0} msgs/s, {}, errors {} [{}]",
            row.rate, row.latency, row.errors, row.cpu
        );
        r.rates.insert((RAW_PRODUCE, c), row.rate);
        r.rows.push(row);
    }
    let ceiling_peaks = (procs::peak_rss_mib(ceiling1.pid()), procs::peak_rss_mib(ceiling2.pid()));
    ceiling1.stop(Duration::from_secs(2)).await;
    ceiling2.stop(Duration::from_secs(2)).await;
    ceiling5.stop(Duration::from_secs(2)).await;
    ceiling6.stop(Duration::from_secs(2)).await;

    // Catch-up: pre-fill, raw drain (ceiling 4), then notify-svc.
    eprintln!("bench: pre-filling {catchup} with {} records", s.catchup_count);
    let took = kafka_ceiling::prefill(&brokers, &catchup, &s.kafka_options, s.catchup_count).await?;
    note(
        &mut r,
        format!(
            "pre-fill: {} records in {:.1} s ({:.0} msgs/s, batching producer)",
            s.catchup_count,
            took.as_secs_f64(),
            s.catchup_count as f64 / took.as_secs_f64()
        ),
    );
    let cpu = CpuWindow::start(&watched(0));
    let drain = {
        let (b, t, o, n) = (
            brokers.clone(),
            catchup.clone(),
            s.kafka_options.clone(),
            s.catchup_count,
        );
        let group = format!("bench-{run_id}-drain");
        tokio::task::spawn_blocking(move || kafka_ceiling::drain(&b, &t, &group, &o, n, Duration::from_secs(900)))
            .await??
    };
    eprintln!(
        "bench: raw consumer drained {} records at {:.0} msgs/s (join {:.1} s)",
        drain.count,
        drain.rate(),
        drain.join.as_secs_f64()
    );
    r.rows.push(Row {
        what: "ceiling 4: raw consumer drain".into(),
        concurrency: "-".into(),
        rate: drain.rate(),
        unit: "msgs/s",
        latency: Percentiles::default(),
        errors: 0,
        cpu: cpu.finish(),
    });
    r.drain_rate = Some(drain.rate());

    let metrics_port = procs::free_port()?;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let notify = spawn_notify(
        &s,
        &brokers,
        &catchup,
        &format!("bench-{run_id}-catchup"),
        metrics_port,
        &dir.join("notify-svc-catchup.log"),
        &[("KAFKA_OPTIONS".into(), opts.clone())]
            .into_iter()
            .chain(s.notify_env.iter().cloned())
            .collect::<Vec<_>>(),
    )?;
    let cpu = CpuWindow::start(&[("broker", broker_pid), ("notify-svc", notify.pid())]);
    let spawned = Instant::now();
    let deadline = spawned + Duration::from_secs(120) + Duration::from_secs(s.catchup_count / 5_000);
    let (mut first, mut sent) = (None, 0.0);
    let mut cpu_from_first = None;
    // A consumer that stops making progress is a result, not a reason to
    // lose the rest of the report: wait STALL past the last progress (or
    // the overall deadline), then report how far it got.
    const STALL: Duration = Duration::from_secs(30);
    let mut progress = (spawned, 0.0);
    let mut stalled = None;
    while sent < s.catchup_count as f64 {
        let now = Instant::now();
        if now >= deadline || (first.is_some() && now - progress.0 >= STALL) {
            stalled = Some((now - progress.0).as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(text) = prom::scrape(&http, &metrics_url).await else {
            continue;
        };
        let consumed = prom::value(&text, "events_consumed_total");
        sent = prom::value(&text, "notifications_sent_total");
        if sent > progress.1 {
            progress = (Instant::now(), sent);
        }
        if first.is_none() && consumed > 0.0 {
            first = Some((Instant::now(), consumed));
            cpu_from_first = Some(CpuWindow::start(&[
                ("broker", broker_pid),
                ("notify-svc", notify.pid()),
            ]));
        }
    }
    // A stalled run's rate counts up to its last progress.
    let done = if stalled.is_some() { progress.0 } else { Instant::now() };
    let (first_at, first_count) = first.unwrap_or((spawned, 0.0));
    let rate = (sent - first_count) / (done - first_at).as_secs_f64().max(1e-9);
    let cpu = cpu_from_first.map_or_else(|| cpu.finish(), |c| c.finish_per(rate));
    eprintln!(
        "bench: notify-svc caught up on {sent} events at {rate:.0} events/s ({:.1} s from start, {:.1} s to the first event) [{cpu}]",
        (done - spawned).as_secs_f64(),
        (first_at - spawned).as_secs_f64()
    );
    if let Some(idle) = stalled {
        note(
            &mut r,
            format!(
                "catch-up STALLED: notify-svc sent {sent} of {} notifications, none in the last {idle:.0} s",
                s.catchup_count
            ),
        );
    }
    r.rows.push(Row {
        what: "notify-svc catch-up (log sink to a file)".into(),
        concurrency: "-".into(),
        rate,
        unit: "events/s",
        latency: Percentiles::default(),
        errors: (s.catchup_count as f64 - sent).max(0.0) as u64,
        cpu,
    });
    r.catchup_rate = Some(rate);
    r.catchup_stalled = stalled.is_some();
    let catchup_peak = procs::peak_rss_mib(notify.pid());
    notify.stop(Duration::from_secs(5)).await;

    let order_peak = procs::peak_rss_mib(order_pid);
    let broker_peak = procs::peak_rss_mib(broker_pid);
    r.rss = vec![
        (format!("broker ({})", broker.name()), broker_idle, broker_peak),
        ("order-svc".into(), order_idle, order_peak),
        ("notify-svc (end-to-end run)".into(), notify_idle, notify_peak),
        ("notify-svc (catch-up run)".into(), None, catchup_peak),
        ("ceiling 1 server (bare tonic)".into(), None, ceiling_peaks.0),
        ("ceiling 2 server (tonic + produce)".into(), None, ceiling_peaks.1),
    ];
    if let Some(p) = order_proc {
        p.stop(Duration::from_secs(5)).await;
    }
    broker.stop(&dir).await;
    remove_data(&dir);

    let report = report(&s, &r);
    println!("{report}");
    if let Some(out) = &s.out {
        std::fs::write(out, &report)?;
    }
    Ok(())
}

/// Removes the run's stores and Tansu's data (hundreds of MB per run) from
/// `dir`; the logs stay for a look after the run.
fn remove_data(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if [".db", ".db-wal", ".db-shm"].iter().any(|ext| name.ends_with(ext)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The broker of a run: one `bench all` started, or one it was given.
#[derive(Debug)]
pub(crate) enum RunningBroker {
    /// Apache Kafka as testkit starts it for the tests.
    Kafka(testkit::Broker),
    /// Tansu with the storage `--storage` names (in memory by default, unlike
    /// the tests' sqlite: earlier runs measured it so).
    Tansu { proc: Box<Proc>, addr: String },
    /// A running broker (`--brokers`).
    Given(String),
}

impl RunningBroker {
    /// Starts a broker of `kind`; Tansu (`tansu`, else where testkit finds
    /// it) with `storage`, in `dir`.
    pub(crate) async fn start(
        kind: BrokerKind,
        tansu: Option<&std::path::Path>,
        storage: &str,
        dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        match kind {
            BrokerKind::Kafka => Ok(Self::Kafka(testkit::Broker::start_kind(BrokerKind::Kafka).await?)),
            BrokerKind::Tansu => {
                let tansu = match tansu {
                    Some(t) => t.to_owned(),
                    None => testkit::tansu_bin()?,
                };
                let port = procs::free_port()?;
                let proc = procs::start_tansu(&tansu, port, storage, dir)?;
                procs::wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30)).await?;
                Ok(Self::Tansu {
                    proc: Box::new(proc),
                    addr: format!("127.0.0.1:{port}"),
                })
            }
        }
    }

    pub(crate) fn addr(&self) -> String {
        match self {
            Self::Kafka(b) => b.addr(),
            Self::Tansu { addr, .. } | Self::Given(addr) => addr.clone(),
        }
    }

    /// The broker's process, for its RSS and CPU (0: not ours to watch).
    /// testkit runs the JVM in the broker's own folder, which tells it
    /// apart from this run's other children.
    fn pid(&self) -> u32 {
        match self {
            Self::Kafka(b) => procs::child_in_dir(b.dir()).unwrap_or(0),
            Self::Tansu { proc, .. } => proc.pid(),
            Self::Given(_) => 0,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "Apache Kafka, JVM",
            Self::Tansu { .. } => "Tansu",
            Self::Given(_) => "given",
        }
    }

    /// "Apache Kafka 4.1.2 (KRaft, ...), co-located" for the report.
    fn describe(&self, s: &Settings) -> String {
        match self {
            Self::Kafka(_) => {
                let version = testkit::kafka_libs()
                    .ok()
                    .and_then(|libs| kafka_version(&libs))
                    .unwrap_or_else(|| "?".into());
                let jvm = procs::jvm_flags(self.pid()).join(" ");
                format!("Apache Kafka {version} (KRaft, one combined broker and controller, JVM {jvm}), co-located")
            }
            Self::Tansu { .. } => format!("Tansu ({} storage), co-located", s.storage),
            Self::Given(addr) => format!("{addr} ({:?}, given)", s.broker),
        }
    }

    /// Stops the broker; Apache Kafka's log is kept in `dir` (testkit's
    /// folder goes with the broker).
    pub(crate) async fn stop(self, dir: &std::path::Path) {
        match self {
            Self::Kafka(mut b) => {
                let _ = std::fs::copy(b.log_path(), dir.join("kafka.log"));
                let _ = tokio::task::spawn_blocking(move || b.stop()).await;
            }
            Self::Tansu { proc, .. } => proc.stop(Duration::from_secs(3)).await,
            Self::Given(_) => {}
        }
    }
}

/// The version in the name of the broker's jar (`kafka_2.13-<version>.jar`).
fn kafka_version(libs: &std::path::Path) -> Option<String> {
    std::fs::read_dir(libs).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let version = name.strip_prefix("kafka_2.13-")?.strip_suffix(".jar")?;
        (!version.contains('-')).then(|| version.to_owned())
    })
}

fn ceiling_command(
    s: &Settings,
    exe: &std::path::Path,
    kafka: Option<(&str, &str)>,
    database_url: Option<&str>,
) -> Command {
    let mut command = s.placement.server_command(exe);
    command.args(["serve-ceiling", "--addr", "127.0.0.1:0"]);
    if let Some(url) = database_url {
        command.arg(format!("--database-url={url}"));
    }
    if let Some((brokers, topic)) = kafka {
        command
            .args(["--brokers", brokers, "--topic", topic])
            .arg(format!("--kafka-options={}", s.kafka_options));
    }
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    command
}

fn spawn_notify(
    s: &Settings,
    brokers: &str,
    topic: &str,
    group: &str,
    metrics_port: u16,
    log: &std::path::Path,
    extra_env: &[(String, String)],
) -> anyhow::Result<Proc> {
    let mut command = s.placement.server_command(&s.notify_svc_bin);
    command
        .env("KAFKA_BROKERS", brokers)
        .env("ORDERS_TOPIC", topic)
        .env("KAFKA_GROUP_ID", group)
        .env("DLQ_TOPIC", format!("{topic}.dlq"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("NOTIFY_WEBHOOK_URL")
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::inherit());
    Proc::spawn("notify-svc", command)
}

pub(crate) async fn wait_ready(http: &reqwest::Client, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{url} not ready after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn opt_ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "n/a",
    }
}

fn report(s: &Settings, r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Results\n\nStore: {}.\n\nCPU placement {}; warm-up {:?}, closed-loop runs {:?} each, open loop {:?} at {}/s, {} partitions, broker: {}, KAFKA_OPTIONS {}\n",
        if s.order_svc_url.is_some() {
            format!(
                "ceilings 5 and 6 on {}; order-svc given by URL, its store unknown",
                s.store.durability()
            )
        } else {
            s.store.durability().to_owned()
        },
        s.placement.describe(),
        s.warmup,
        s.duration,
        s.e2e_duration,
        s.rate,
        s.partitions,
        r.broker,
        if s.kafka_options.0.is_empty() {
            "(none: librdkafka's defaults over the services' own)".to_owned()
        } else {
            format!("`{}`", s.kafka_options)
        }
    );
    let _ = writeln!(
        out,
        "| run | concurrency | rate | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | CPU (machine: % of all cores; processes: % of one core; then CPU time per call or event) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let l = &row.latency;
        let lat = |v: f64| if l.count == 0 { "-".to_owned() } else { stats::ms(v) };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} {} | {} | {} | {} | {} | {} | {} |",
            row.what,
            row.concurrency,
            row.rate,
            row.unit,
            lat(l.p50),
            lat(l.p90),
            lat(l.p99),
            lat(l.p999),
            row.errors,
            row.cpu
        );
    }

    let _ = writeln!(out, "\n## Against the targets\n");
    let _ = writeln!(out, "| target | measured | ceiling / bound | ratio | met |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    let rate = |what, c| r.rates.get(&(what, c)).copied();
    let ceiling6 = s.store.labels().1;
    let (m, ce) = (rate(ORDER_SVC, 64), rate(ceiling6, 64));
    let ratio = opt_ratio(m, ce);
    let _ = writeln!(
        out,
        "| CreateOrder >= 0.8 x ceiling 6 (tonic + store transaction + produce) at C=64 | {} calls/s | {} calls/s | {} | {} |",
        m.map_or("-".into(), |v| format!("{v:.0}")),
        ce.map_or("-".into(), |v| format!("{v:.0}")),
        ratio.map_or("-".into(), |v| format!("{v:.2}")),
        verdict(ratio.map(|x| x >= 0.8))
    );
    for c in [64, 256] {
        let (m, ce) = (rate(ORDER_SVC, c), rate(CEILING2, c));
        let ratio = opt_ratio(m, ce);
        let _ = writeln!(
            out,
            "| CreateOrder >= 0.9 x ceiling 2 at C={c} | {} calls/s | {} calls/s | {} | {} |",
            m.map_or("-".into(), |v| format!("{v:.0}")),
            ce.map_or("-".into(), |v| format!("{v:.0}")),
            ratio.map_or("-".into(), |v| format!("{v:.2}")),
            verdict(ratio.map(|x| x >= 0.9))
        );
    }
    let p50 = r.p50.get(&(ORDER_SVC, 1)).copied();
    let p50_ceiling = r.p50.get(&(CEILING2, 1)).copied();
    let _ = writeln!(
        out,
        "| CreateOrder p50 at C=1 <= ceiling 2's + 0.05 ms | {} ms | tonic + produce {} ms (bare tonic {} ms) | {} | {} |",
        p50.map_or("-".into(), stats::ms),
        p50_ceiling.map_or("-".into(), stats::ms),
        r.p50.get(&(CEILING1, 1)).map_or("-".into(), |v| stats::ms(*v)),
        match (p50, p50_ceiling) {
            (Some(a), Some(b)) => format!("{:+.3} ms", a - b),
            _ => "-".into(),
        },
        verdict(p50.zip(p50_ceiling).map(|(a, b)| a <= b + 0.05))
    );
    let p99 = |p: Option<Percentiles>| p.filter(|p| p.count > 0).map(|p| p.p99);
    let (svc, rawp) = (p99(r.e2e_service), p99(r.e2e_raw));
    let ratio = opt_ratio(svc, rawp);
    let _ = writeln!(
        out,
        "| end-to-end p99 <= 25 ms and <= 1.25 x raw at {}/s | {} ms (notify-svc histogram: ~{} ms) | raw {} ms | {} | {} |",
        s.rate,
        svc.map_or("-".into(), stats::ms),
        r.e2e_service_hist_p99.map_or("-".into(), stats::ms),
        rawp.map_or("-".into(), stats::ms),
        ratio.map_or("-".into(), |v| format!("{v:.2}")),
        verdict(svc.zip(ratio).map(|(p, x)| p <= 25.0 && x <= 1.25))
    );
    let catchup_ratio = opt_ratio(r.catchup_rate, r.drain_rate);
    let _ = writeln!(
        out,
        "| notify-svc catch-up >= 100k events/s and >= 0.5 x raw ({} events) | {} events/s{} | raw consumer {} msgs/s | {} | {} |",
        s.catchup_count,
        r.catchup_rate.map_or("-".into(), |v| format!("{v:.0}")),
        if r.catchup_stalled { " (stalled)" } else { "" },
        r.drain_rate.map_or("-".into(), |v| format!("{v:.0}")),
        catchup_ratio.map_or("-".into(), |v| format!("{v:.2} of raw")),
        verdict(
            r.catchup_rate
                .zip(catchup_ratio)
                .map(|(v, x)| !r.catchup_stalled && v >= 100_000.0 && x >= 0.5)
        )
    );
    for (name, idle, peak) in &r.rss {
        let mib = |v: &Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} MiB"));
        let service = name.starts_with("order-svc") || name.starts_with("notify-svc");
        let ok = match (service, idle, peak) {
            (false, _, _) => None,
            (true, i, Some(p)) => Some(i.is_none_or(|i| i <= 20.0) && *p <= 64.0),
            _ => None,
        };
        let _ = writeln!(
            out,
            "| {name} RSS{} | idle {}, peak {} | {} | - | {} |",
            if service {
                " <= 20 MiB idle, <= 64 MiB peak"
            } else {
                " (for reference)"
            },
            mib(idle),
            mib(peak),
            if service { "20 MiB idle, 64 MiB peak" } else { "-" },
            verdict(ok)
        );
    }
    if !r.notes.is_empty() {
        let _ = writeln!(out, "\nNotes:");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}
