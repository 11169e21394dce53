//! Issue 22's proof, the dead-letter round trip as an operator runs it: the
//! webhook receiver refuses (422) one user's orders, notify-svc dead-letters
//! them; `orderctl dlq list --json` shows exactly them with the right reason;
//! the receiver is fixed; `orderctl dlq redrive` is killed with SIGKILL
//! halfway and run again, and every refused order is delivered exactly once
//! with its event id as `Idempotency-Key`. A redrive of the same dead letters
//! again (`--restart`) publishes them again and notify-svc drops every one as
//! a duplicate. Plus the clear errors: a missing topic, a bad filter, a
//! record that does not exist, a position saved for another selection; and
//! `list` over a dead-letter topic much larger than its memory.

use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use rdkafka::Message;
use testkit::{BrokerKind, header};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::helpers::{OrderSvc, broker_with_topic, notify_env, order, start_notify};

/// Orders of the user the receiver refuses, and of one it accepts.
const REFUSED: usize = 16;
const ACCEPTED: usize = 6;

/// What the receiver saw, per order id.
#[derive(Debug, Default)]
struct Seen {
    delivered: HashMap<String, u32>,
    refused: HashMap<String, u32>,
    bad_idempotency_key: Vec<String>,
}

#[derive(Clone)]
struct Hook {
    seen: Arc<Mutex<Seen>>,
    refused_user: String,
    refusing: Arc<AtomicBool>,
}

/// 422 for the refused user's orders while `refusing`, 200 otherwise.
async fn hook(State(hook): State<Hook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let order_id = json["order_id"].as_str().unwrap_or_default().to_owned();
    let event_id = json["event_id"].as_str().unwrap_or_default();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let mut seen = hook.seen.lock().unwrap_or_else(|e| e.into_inner());
    if event_id.is_empty() || key != Some(event_id) {
        seen.bad_idempotency_key.push(order_id.clone());
    }
    if hook.refusing.load(Ordering::SeqCst) && json["user_id"].as_str() == Some(hook.refused_user.as_str()) {
        *seen.refused.entry(order_id).or_default() += 1;
        return StatusCode::UNPROCESSABLE_ENTITY;
    }
    *seen.delivered.entry(order_id).or_default() += 1;
    StatusCode::OK
}

/// Runs `orderctl` with `args` against the test's broker and topics; its
/// stdout lines as they come, and its exit.
struct Ctl {
    child: tokio::process::Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn ctl_env(brokers: &str, topic: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKERS", brokers.to_owned()),
        ("ORDERS_TOPIC", topic.to_owned()),
        ("DLQ_TOPIC", format!("{topic}.dlq")),
        ("KAFKA_OPTIONS", BrokerKind::from_env().client_options().to_owned()),
        ("KAFKA_STARTUP_TIMEOUT", "10s".to_owned()),
    ]
}

impl Ctl {
    fn spawn(env: &[(&str, String)], args: &[&str]) -> Self {
        let mut command = tokio::process::Command::new(testkit::bin_path("orderctl"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        command.env("RUST_LOG", "info");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .arg("dlq")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("orderctl starts");
        let (stdout, stderr) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let echo = std::env::var_os("TEST_LOG").is_some();
        let out = child.stdout.take().expect("piped stdout");
        let lines = stdout.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if echo {
                    eprintln!("[orderctl] {line}");
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let err = child.stderr.take().expect("piped stderr");
        let lines = stderr.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if echo {
                    eprintln!("[orderctl!] {line}");
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Self { child, stdout, stderr }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for the exit (at most a minute) and for the output to be read.
    async fn finish(mut self) -> (bool, Vec<String>, Vec<String>) {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("orderctl ends within a minute")
            .expect("orderctl's status");
        // The readers end at EOF, right after the exit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status.success(), self.stdout(), self.stderr())
    }
}

/// Runs `orderctl dlq <args>` to the end.
async fn ctl(env: &[(&str, String)], args: &[&str]) -> (bool, Vec<String>, Vec<String>) {
    Ctl::spawn(env, args).finish().await
}

/// `GET /metrics` on `addr`.
async fn scrape(addr: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// The dead-letter position a `redriven <dlq>:<p>:<o> -> ...` line names.
fn redriven_from(line: &str) -> Option<String> {
    let mut words = line.strip_prefix("redriven ")?.split_whitespace();
    let from = words.next()?;
    (words.next()? == "->").then(|| from.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_orders_are_listed_redriven_after_a_kill_and_delivered_once() {
    let (broker, topic) = broker_with_topic("dlq", 2).await;
    let dlq = format!("{topic}.dlq");
    let refused_user = testkit::unique("refused");
    let hook_state = Hook {
        seen: Arc::new(Mutex::new(Seen::default())),
        refused_user: refused_user.clone(),
        refusing: Arc::new(AtomicBool::new(true)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let url = format!("http://{}/hook", listener.local_addr().expect("an address"));
    let app = Router::new().route("/hook", post(hook)).with_state(hook_state.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let seen = |f: &dyn Fn(&Seen) -> usize| f(&hook_state.seen.lock().unwrap_or_else(|e| e.into_inner()));

    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let env = notify_env(
        &broker.addr(),
        &topic,
        &testkit::unique("notify"),
        &[
            ("NOTIFY_WEBHOOK_URL", url.clone()),
            ("DLQ_SPRING_HEADERS", "true".into()),
        ],
    );
    let metrics_addr = env
        .iter()
        .find(|(k, _)| *k == "METRICS_ADDR")
        .map(|(_, v)| v.clone())
        .expect("notify_env sets METRICS_ADDR");
    let notify = start_notify(&env).await;

    // Orders of the refused user, interleaved with accepted ones.
    let mut client = orders.client().await;
    let (mut refused, mut accepted) = (HashSet::new(), HashSet::new());
    for i in 0..REFUSED + ACCEPTED {
        let user = if i % 4 == 3 && accepted.len() < ACCEPTED || refused.len() == REFUSED {
            "accepted-user"
        } else {
            refused_user.as_str()
        };
        let created = client
            .create_order(order(user))
            .await
            .expect("CreateOrder succeeds")
            .into_inner()
            .order
            .expect("an order");
        if user == "accepted-user" {
            accepted.insert(created.order_id);
        } else {
            refused.insert(created.order_id);
        }
    }
    assert_eq!((refused.len(), accepted.len()), (REFUSED, ACCEPTED));
    let dead = broker
        .read_all(&dlq, REFUSED + 1, Duration::from_secs(30))
        .await
        .expect("the dead-letter topic reads");
    assert_eq!(dead.len(), REFUSED, "one dead letter per refused order");
    testkit::eventually(Duration::from_secs(30), "accepted orders delivered", || async {
        (seen(&|s| s.delivered.len()) == ACCEPTED).then_some(())
    })
    .await;

    // Spring's names beside ours, in Spring's encodings.
    let raw = |m: &rdkafka::message::OwnedMessage, name: &str| -> Vec<u8> {
        use rdkafka::message::Headers;
        m.headers()
            .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
            .unwrap_or_else(|| panic!("header {name}"))
            .to_vec()
    };
    for m in &dead {
        let number = |name: &str| -> i64 { header(m, name).expect(name).parse().expect("a number") };
        let partition = i32::try_from(number("dlq.original.partition")).expect("an i32");
        assert_eq!(
            raw(m, "kafka_dlt-original-partition"),
            partition.to_be_bytes(),
            "a 4-byte big-endian int"
        );
        assert_eq!(
            raw(m, "kafka_dlt-original-offset"),
            number("dlq.original.offset").to_be_bytes(),
            "an 8-byte big-endian long"
        );
        assert_eq!(header(m, "kafka_dlt-original-topic").as_deref(), Some(topic.as_str()));
        assert_eq!(
            header(m, "kafka_dlt-exception-fqcn").as_deref(),
            Some("notify_permanent")
        );
        assert_eq!(header(m, "kafka_dlt-exception-message"), header(m, "dlq.error.message"));
    }

    // `list --json`: exactly the refused orders, with the reason.
    let cenv = ctl_env(&broker.addr(), &topic);
    let (ok, out, err) = ctl(&cenv, &["list", "--json"]).await;
    assert!(ok, "dlq list fails: {err:?}");
    let listed: Vec<serde_json::Value> = out
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let listed_ids: HashSet<String> = listed
        .iter()
        .map(|l| l["order_id"].as_str().expect("decoded order id").to_owned())
        .collect();
    assert_eq!(listed.len(), REFUSED, "{out:?}");
    assert_eq!(listed_ids, refused, "the list shows exactly the refused orders");
    for l in &listed {
        assert_eq!(l["error_class"], "notify_permanent", "{l}");
        assert!(l["error_message"].as_str().is_some_and(|m| m.contains("422")), "{l}");
        assert_eq!(l["attempts"], 1, "{l}");
        assert_eq!(l["original_topic"], topic.as_str(), "{l}");
        assert!(l["failed_at"].as_str().is_some_and(|t| t.len() >= 20), "{l}");
        assert!(l["event_id"].as_str().is_some_and(|e| !e.is_empty()), "{l}");
    }
    // Paging and filters.
    let (ok, out, err) = ctl(&cenv, &["list", "--json", "--limit", "5"]).await;
    assert!(ok && out.len() == 5, "{out:?} {err:?}");
    assert!(err.iter().any(|l| l.contains("--from 0:5")), "next page: {err:?}");
    let (ok, out, _) = ctl(&cenv, &["list", "--json", "--from", "0:5"]).await;
    assert!(ok && out.len() == REFUSED - 5, "{out:?}");
    let one = listed[3]["order_id"].as_str().expect("an id");
    let (ok, out, _) = ctl(&cenv, &["list", "--json", "--order-id", one]).await;
    assert!(ok && out.len() == 1 && out[0].contains(one), "{out:?}");
    let (ok, out, _) = ctl(&cenv, &["list", "--class", "retries_exhausted", "--json"]).await;
    assert!(ok && out.is_empty(), "{out:?}");
    let (ok, out, _) = ctl(&cenv, &["list", "--since", "1h", "--class", "notify_permanent"]).await;
    assert!(ok && out.len() == REFUSED + 1, "a header line and the letters: {out:?}");
    // `show`.
    let (ok, out, err) = ctl(&cenv, &["show", "0:3"]).await;
    let shown = out.join("\n");
    assert!(ok, "{err:?}");
    assert!(
        shown.contains(one) && shown.contains("dlq.error.class: notify_permanent"),
        "{shown}"
    );
    assert!(shown.contains("\"user_id\""), "the decoded event: {shown}");

    // Clear errors, non-zero exits.
    for (args, says, env) in [
        (&["show", "0:999"][..], "does not exist", cenv.clone()),
        (&["show", "7:0"][..], "partition 7 does not exist", cenv.clone()),
        (&["show", "zero"][..], "not a position", cenv.clone()),
        (
            &["list", "--since", "yesterday"][..],
            "neither an RFC 3339 time",
            cenv.clone(),
        ),
        (
            &["redrive", "--class", "a b"][..],
            "is not an error class",
            cenv.clone(),
        ),
        (
            &["list"][..],
            "does not exist",
            cenv.iter()
                .cloned()
                .map(|(k, v)| {
                    if k == "DLQ_TOPIC" {
                        (k, "no-such-topic".to_owned())
                    } else {
                        (k, v)
                    }
                })
                .collect(),
        ),
    ] {
        let (ok, _, err) = ctl(&env, args).await;
        assert!(!ok, "{args:?} should fail");
        assert!(err.iter().any(|l| l.contains(says)), "{args:?}: {err:?}");
    }

    // A dry run publishes nothing and saves no position.
    let (ok, out, err) = ctl(&cenv, &["redrive", "--dry-run"]).await;
    assert!(ok, "{err:?}");
    assert_eq!(
        out.iter().filter(|l| l.starts_with("would redrive")).count(),
        REFUSED,
        "{out:?}"
    );

    // The receiver is fixed; a redrive is killed halfway, then run again.
    hook_state.refusing.store(false, Ordering::SeqCst);
    let first = Ctl::spawn(&cenv, &["redrive", "--pause", "250ms"]);
    testkit::eventually(Duration::from_secs(60), "a third of the redrive", || async {
        (first.stdout().iter().filter_map(|l| redriven_from(l)).count() >= REFUSED / 3).then_some(())
    })
    .await;
    let mut first = first;
    first.child.start_kill().expect("SIGKILL");
    let (ok, first_out, _) = first.finish().await;
    assert!(!ok, "killed");
    let first_positions: Vec<String> = first_out.iter().filter_map(|l| redriven_from(l)).collect();
    assert!(first_positions.len() < REFUSED, "killed before the end: {first_out:?}");

    // Another selection cannot take over the saved position: the selection
    // travels in the commit's metadata, which Apache Kafka keeps and Tansu
    // 0.6 drops (the README says so).
    if BrokerKind::from_env() == BrokerKind::Kafka {
        let (ok, _, err) = ctl(&cenv, &["redrive", "--class", "malformed"]).await;
        assert!(
            !ok && err.iter().any(|l| l.contains("saved for the selection")),
            "{err:?}"
        );
    }

    let metrics_file = std::env::temp_dir().join(format!("{}.prom", testkit::unique("redrive")));
    let metrics_arg = metrics_file.to_string_lossy().into_owned();
    let (ok, second_out, err) = ctl(&cenv, &["redrive", "--metrics-file", &metrics_arg]).await;
    assert!(ok, "{err:?}");
    let second_positions: Vec<String> = second_out.iter().filter_map(|l| redriven_from(l)).collect();
    // Between the kill and the commit at most the record in flight is done
    // twice; none is skipped.
    let all: HashSet<&String> = first_positions.iter().chain(&second_positions).collect();
    let expected: HashSet<String> = (0..REFUSED).map(|o| format!("{dlq}:0:{o}")).collect();
    assert_eq!(
        all.len(),
        REFUSED,
        "first {first_positions:?} second {second_positions:?}"
    );
    assert!(all.iter().all(|p| expected.contains(*p)), "{all:?}");
    let doubled = first_positions.len() + second_positions.len() - REFUSED;
    assert!(doubled <= 1, "first {first_positions:?} second {second_positions:?}");
    let summary = second_out.last().cloned().unwrap_or_default();
    assert!(
        summary.starts_with(&format!("redrive finished: redriven {}, ", second_positions.len())),
        "{summary}"
    );
    let prom = std::fs::read_to_string(&metrics_file).expect("the metrics file is written");
    let _ = std::fs::remove_file(&metrics_file);
    assert!(
        prom.contains(&format!(
            "orderctl_dlq_redrive_last_run_records{{dlq=\"{dlq}\",outcome=\"redriven\",dry_run=\"false\"}} {}",
            second_positions.len()
        )),
        "{prom}"
    );

    // Every refused order is delivered once, with its event id as key.
    testkit::eventually(Duration::from_secs(60), "every refused order delivered", || async {
        (seen(&|s| s.delivered.len()) == REFUSED + ACCEPTED).then_some(())
    })
    .await;
    let metric = |text: &str, series: &str| testkit::metric(text, series).unwrap_or(0.0);
    let duplicates = testkit::eventually(Duration::from_secs(30), "the record redriven twice dropped", || async {
        let text = scrape(&metrics_addr).await?;
        let n = metric(&text, "events_duplicate_total") as usize;
        (n >= doubled).then_some(n)
    })
    .await;
    assert_eq!(
        duplicates, doubled,
        "a record redriven twice is dropped by its event id"
    );

    // The redriven records: key, value and the original's headers, without
    // the dead-letter context, saying where they came from.
    let on_topic = broker
        .read_all(&topic, usize::MAX, Duration::from_secs(5))
        .await
        .expect("the topic reads");
    let redriven: Vec<_> = on_topic
        .iter()
        .filter(|m| header(m, "dlq.redriven.from").is_some())
        .collect();
    assert_eq!(redriven.len(), REFUSED + doubled);
    for m in &redriven {
        let from = header(m, "dlq.redriven.from").expect("from");
        let letter = dead
            .iter()
            .find(|d| format!("{dlq}:0:{}", d.offset()) == from)
            .expect("from names a dead letter");
        assert_eq!(m.key(), letter.key());
        assert_eq!(m.payload(), letter.payload());
        assert_eq!(header(m, "ce_id"), header(letter, "ce_id"));
        assert!(header(m, "dlq.redriven.at").is_some());
        use rdkafka::message::Headers;
        let names: Vec<&str> = m
            .headers()
            .map(|h| h.iter().map(|h| h.key).collect())
            .unwrap_or_default();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("kafka_dlt-") || (n.starts_with("dlq.") && !n.starts_with("dlq.redriven."))),
            "{names:?}"
        );
    }

    // Nothing left to redrive; redriving everything again notifies nobody twice.
    let (ok, out, _) = ctl(&cenv, &["redrive"]).await;
    assert!(
        ok && out
            .last()
            .is_some_and(|l| l.starts_with("redrive finished: redriven 0, ")),
        "{out:?}"
    );
    let (ok, out, err) = ctl(&cenv, &["redrive", "--restart"]).await;
    assert!(ok, "{err:?}");
    assert_eq!(out.iter().filter_map(|l| redriven_from(l)).count(), REFUSED, "{out:?}");
    testkit::eventually(
        Duration::from_secs(30),
        "the second redrive dropped as duplicates",
        || async {
            let text = scrape(&metrics_addr).await?;
            (metric(&text, "events_duplicate_total") as usize >= doubled + REFUSED).then_some(())
        },
    )
    .await;

    let (delivered, refusals, bad_keys) = {
        let s = hook_state.seen.lock().unwrap_or_else(|e| e.into_inner());
        (s.delivered.clone(), s.refused.clone(), s.bad_idempotency_key.clone())
    };
    let refused_ids: HashSet<String> = refusals.keys().cloned().collect();
    assert_eq!(
        refused_ids, refused,
        "the receiver refused exactly the refused user's orders"
    );
    let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered other than once: {twice:?}");
    assert_eq!(delivered.len(), REFUSED + ACCEPTED);
    assert!(
        bad_keys.is_empty(),
        "Idempotency-Key missing or not the event id: {bad_keys:?}"
    );
    println!(
        "dlq round trip: {REFUSED} refused and dead-lettered, redrive killed after {} and resumed with {} ({doubled} redriven twice, dropped by event id), \
         each delivered once; a second full redrive dropped as duplicates",
        first_positions.len(),
        second_positions.len()
    );
    drop(notify);
    server.abort();
}

/// `VmHWM` (peak resident memory) of `pid` in KiB, while it runs.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_reads_a_large_dead_letter_topic_in_bounded_memory() {
    const RECORDS: usize = 320;
    const RECORD_BYTES: usize = 512 * 1024;
    let (broker, topic) = broker_with_topic("dlqmem", 1).await;
    let dlq = format!("{topic}.dlq");
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", broker.addr());
    for (k, v) in broker.client_options().split(',').filter_map(|kv| kv.split_once('=')) {
        config.set(k, v);
    }
    let producer: rdkafka::producer::FutureProducer =
        config.set("message.max.bytes", "1048576").create().expect("a producer");
    let value: Vec<u8> = (0..RECORD_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..RECORDS {
        let key = format!("order-{i}");
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header {
                key: "dlq.error.class",
                value: Some("malformed"),
            })
            .insert(rdkafka::message::Header {
                key: "dlq.original.topic",
                value: Some(topic.as_str()),
            });
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&dlq)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("a dead letter is produced");
    }

    let ctl = Ctl::spawn(&ctl_env(&broker.addr(), &topic), &["list", "--json", "--limit", "0"]);
    let pid = ctl.child.id().expect("a running orderctl");
    let mut peak = 0;
    while let Some(kib) = peak_rss_kib(pid) {
        peak = peak.max(kib);
        tokio::time::sleep(Duration::from_millis(10)).await;
        if ctl.stdout().len() >= RECORDS {
            // The last reading before it exits: VmHWM is the peak so far.
            if let Some(kib) = peak_rss_kib(pid) {
                peak = peak.max(kib);
            }
            break;
        }
    }
    let (ok, out, err) = ctl.finish().await;
    assert!(ok, "{err:?}");
    assert_eq!(out.len(), RECORDS, "{err:?}");
    let topic_kib = (RECORDS * RECORD_BYTES / 1024) as u64;
    println!(
        "orderctl dlq list over {RECORDS} dead letters of {RECORD_BYTES} bytes ({topic_kib} KiB): peak VmRSS {peak} KiB"
    );
    assert!(peak > 0, "the peak was read");
    assert!(
        peak < 64 * 1024,
        "orderctl's peak resident memory {peak} KiB for a {topic_kib} KiB topic: it must not hold the topic"
    );
}
