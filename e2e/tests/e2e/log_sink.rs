//! The log sink when its output breaks: notify-svc's stdout is a pipe whose
//! reader goes away after a few kilobytes (as with `notify-svc | head -c 3000`).
//! A notification whose line was not written must not be counted as sent nor
//! have its offset committed, and a restart with a working stdout delivers it.

use std::{
    collections::{HashMap, HashSet},
    io::Read,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use testkit::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{NOTIFICATION, OrderStream, OrderSvc, broker_with_topic, field, notified_ids, notify_env};

/// How many bytes of notify-svc's output the reader takes before it leaves.
const READ_BYTES: usize = 3000;
/// Linux's default pipe capacity: what notify-svc may have written into the
/// pipe that the reader never read.
const PIPE_CAPACITY: usize = 64 * 1024;
/// The consumer's batch of records whose lines are written together
/// (notify-svc's `consumer::worker::MAX_BATCH`): a running process may count
/// one batch per partition before its write returns.
const MAX_BATCH: usize = 64;

/// Kills the child if the test ends early.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /metrics` on `addr`; `None` while nothing answers.
async fn scrape(addr: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    body.contains("200 OK").then_some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stdout_stops_the_log_sink_without_losing_notifications() {
    const PARTITIONS: i32 = 2;
    const ORDERS: usize = 1000;
    let (broker, topic) = broker_with_topic("logsink", PARTITIONS).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let stream = OrderStream::start(orders.grpc_addr, 8, ORDERS, Duration::ZERO).await;
    stream.wait_ok(ORDERS, Duration::from_secs(120)).await;
    let published: HashSet<String> = stream.finish(false).await.ok.into_iter().collect();
    assert_eq!(published.len(), ORDERS);

    // notify-svc's stdout goes to a pipe whose reader takes READ_BYTES and
    // closes it; stderr is kept for what the service says about it.
    let group = testkit::unique("notify");
    let env = notify_env(&broker.addr(), &topic, &group, &[]);
    let metrics_addr = env
        .iter()
        .find(|(k, _)| *k == "METRICS_ADDR")
        .map(|(_, v)| v.clone())
        .expect("notify_env sets METRICS_ADDR");
    let mut command = Command::new(testkit::bin_path("notify-svc"));
    command.env_clear();
    for keep in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(keep) {
            command.env(keep, v);
        }
    }
    command.env("RUST_LOG", "info").env("NO_COLOR", "1");
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = Guard(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("notify-svc starts"),
    );
    let mut stdout = child.0.stdout.take().expect("piped stdout");
    let mut stderr = child.0.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut head = vec![0; READ_BYTES];
        stdout.read_exact(&mut head).map(|()| head)
        // `stdout` is dropped here: the pipe has no reader any more.
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    // Watch /metrics until the process ends (or keeps going for too long).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_sent = None;
    let status = loop {
        if let Some(text) = scrape(&metrics_addr).await
            && let Some(sent) = testkit::metric(&text, "notifications_sent_total")
        {
            last_sent = Some(sent as usize);
            if sent as usize >= ORDERS {
                // Today's failure: everything counted although the output broke.
                break child.0.try_wait().expect("try_wait");
            }
        }
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let head = reader
        .join()
        .expect("the reader thread")
        .expect("notify-svc printed at least READ_BYTES");
    let head = String::from_utf8_lossy(&head).into_owned();
    // Whole lines only: the last one was cut by the reader.
    let whole = &head[..head.rfind('\n').map_or(0, |at| at + 1)];
    let read_lines: Vec<&str> = whole.lines().filter(|l| l.contains(NOTIFICATION)).collect();
    let read_ids: HashSet<String> = read_lines.iter().filter_map(|l| field(l, "order_id")).collect();
    let shortest = read_lines.iter().map(|l| l.len() + 1).min().unwrap_or(200);
    // Lines notify-svc may have written: those read, a partial one, and those
    // left in the pipe when the reader went away.
    let written_bound = read_ids.len() + 1 + PIPE_CAPACITY / shortest;
    println!(
        "read {} notification lines; last notifications_sent_total {last_sent:?}; status {status:?}; \
         at most {written_bound} lines can have been written",
        read_ids.len()
    );
    assert!(
        last_sent.unwrap_or(0) <= written_bound + MAX_BATCH * PARTITIONS as usize,
        "notifications_sent_total reached {last_sent:?}, but at most {written_bound} notification lines \
         can have been written (read {})",
        read_ids.len()
    );
    let Some(status) = status else {
        panic!("notify-svc kept running for 60 s after its stdout broke")
    };
    let _ = child.0.wait();
    let said = stderr_reader.join().expect("the stderr thread");
    assert_eq!(
        status.code(),
        Some(74),
        "notify-svc exits with EX_IOERR (not killed by SIGPIPE, not 0): {status:?}; stderr:\n{said}"
    );
    assert!(
        said.contains("log output is broken") && said.to_lowercase().contains("pipe"),
        "it says why on stderr: {said}"
    );

    // The group's committed offsets pass no record whose line was not
    // written: at most the lines that went into the pipe.
    let committed = committed(&broker.addr(), &topic, &group, PARTITIONS).await;
    let committed_total: i64 = committed.values().sum();
    println!("committed offsets {committed:?}");
    assert!(
        committed_total as usize <= written_bound,
        "offsets committed past {committed_total} records, but at most {written_bound} lines were written"
    );

    // Every record at or after its partition's committed offset is notified
    // by a notify-svc with a working stdout.
    let records = broker
        .read_all(&topic, ORDERS, Duration::from_secs(20))
        .await
        .expect("the topic can be read");
    assert_eq!(records.len(), ORDERS);
    let unwritten: HashSet<String> = records
        .iter()
        .filter(|m| m.offset() >= committed.get(&m.partition()).copied().unwrap_or(0))
        .filter_map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()))
        .collect();
    assert!(unwritten.len() >= ORDERS - written_bound);
    let restarted = Service::spawn("notify-svc", &notify_env(&broker.addr(), &topic, &group, &[]))
        .expect("notify-svc starts again");
    testkit::eventually(
        Duration::from_secs(60),
        "the restarted notify-svc to notify every record past the committed offsets",
        || async { unwritten.is_subset(&notified_ids(&restarted)).then_some(()) },
    )
    .await;
    let again = notified_ids(&restarted);
    let seen: HashSet<&String> = read_ids.iter().chain(again.iter()).collect();
    assert!(
        published.iter().filter(|id| !seen.contains(id)).count() <= written_bound - read_ids.len(),
        "only notifications left unread in the pipe are missing from what was read"
    );
}

/// The committed offset of each partition of `topic` for `group` (0 when none).
async fn committed(brokers: &str, topic: &str, group: &str, partitions: i32) -> HashMap<i32, i64> {
    let (brokers, topic, group) = (brokers.to_owned(), topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("a consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let offsets = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        offsets
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                (e.partition(), offset)
            })
            .collect()
    })
    .await
    .expect("the blocking task")
}
