//! Flow control between the fetch loop, the partition workers and the group:
//! a partition whose worker is stuck does not stop the others, readiness or
//! the statistics, and then drains in order, once; a rebalance waits for the
//! revoked partitions' records in hand, so no record is handled by two
//! members at once or delivered out of partition order.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use orders_contract::v1::OrderCreated;
use testkit::eventually;

use crate::helpers::{
    Behaviour, Publisher, Receiver, TestApp, WAIT, broker_with_topic, config, metric, order_created, order_id, series,
    webhook_setup,
};

/// An order whose id carries its partition and its place in that partition.
fn sequenced(tag: &str, partition: i32, seq: usize) -> OrderCreated {
    let mut event = order_created();
    if let Some(order) = event.order.as_mut() {
        order.order_id = format!("{tag}-p{partition}-{seq:03}");
    }
    event
}

/// Records beyond a full buffer are held up to the client's prefetch bound
/// per partition; 1 KiB makes a few records pause the partition.
fn hold_little(config: &mut notify_svc::config::Config) {
    config
        .kafka
        .options
        .0
        .push(("queued.max.messages.kbytes".into(), "1".into()));
}

/// (partition, seq) of an order id made by [`sequenced`].
fn place(order_id: &str) -> Option<(i32, usize)> {
    let mut parts = order_id.rsplitn(3, '-');
    let seq = parts.next()?.parse().ok()?;
    let partition = parts.next()?.strip_prefix('p')?.parse().ok()?;
    Some((partition, seq))
}

/// The order ids answered with 2xx, in arrival order, per partition.
fn delivered_per_partition(receiver: &Receiver) -> HashMap<i32, Vec<usize>> {
    let mut out: HashMap<i32, Vec<usize>> = HashMap::new();
    for request in receiver.requests() {
        if (200..300).contains(&request.status)
            && let Some((partition, seq)) = place(request.order_id())
        {
            out.entry(partition).or_default().push(seq);
        }
    }
    out
}

#[tokio::test]
async fn a_full_partition_buffer_pauses_that_partition_only_and_it_drains_in_order_once() {
    // Retries go on until the receiver heals; two records fill a buffer, and
    // a few more held ones (1 KiB) pause the partition.
    let (_broker, topic, receiver, app, publisher) = webhook_setup(2, |config| {
        config.retry_max_attempts = 100_000;
        config.partition_buffer = 2;
        hold_little(config);
    })
    .await;
    let tag = testkit::unique("flow");

    // Partition 0's first record is refused until healed: its worker retries,
    // its buffer fills and 28 more records wait behind it.
    let stuck = sequenced(&tag, 0, 0);
    receiver.set(&order_id(&stuck), Behaviour::Always(503));
    publisher.event(Some(0), &stuck, &[]).await;
    for seq in 1..30 {
        publisher.event(Some(0), &sequenced(&tag, 0, seq), &[]).await;
    }
    receiver.wait_attempts(&order_id(&stuck), 3, WAIT).await;

    // Partition 1 keeps going meanwhile.
    for seq in 0..5 {
        publisher.event(Some(1), &sequenced(&tag, 1, seq), &[]).await;
    }
    for seq in 0..5 {
        receiver.wait_delivered(&order_id(&sequenced(&tag, 1, seq)), WAIT).await;
    }
    // Statistics keep coming (the lag gauge is fed by them: partition 1 is
    // committed to its end) and readiness stays up for longer than stale
    // statistics would keep it (three statistics intervals).
    let lag = |p: i32| format!(r#"kafka_consumer_lag{{topic="{topic}",partition="{p}"}}"#);
    app.wait_metric(&lag(1), 0.0).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(app.get("/readyz").await.0, 200, "ready while partition 0 is stuck");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, &lag(1)), Some(0.0), "partition 1's lag stays live");
    assert!(
        receiver.delivered(&order_id(&stuck)).is_empty(),
        "partition 0 is still stuck"
    );
    let late = sequenced(&tag, 1, 5);
    publisher.event(Some(1), &late, &[]).await;
    receiver.wait_delivered(&order_id(&late), WAIT).await;

    // Healed, partition 0 drains: every record, in order, once.
    receiver.heal(&order_id(&stuck));
    eventually(WAIT, "partition 0 drained", || async {
        (delivered_per_partition(&receiver).get(&0).map_or(0, Vec::len) >= 30).then_some(())
    })
    .await;
    app.wait_metric(&lag(0), 0.0).await;
    let delivered = delivered_per_partition(&receiver);
    assert_eq!(delivered[&0], (0..30).collect::<Vec<_>>(), "partition 0 in order, once");
    assert_eq!(delivered[&1], (0..6).collect::<Vec<_>>(), "partition 1 in order, once");
    app.shutdown().await;
}

// ------------------------------------------------- a receiver slow per request

/// One request to [`SlowReceiver`]: when it came and when it was answered.
#[derive(Debug, Clone)]
struct Visit {
    order_id: String,
    arrived: Instant,
    answered: Option<Instant>,
}

/// A webhook receiver that takes `delay` to answer each request and records
/// every request's arrival and answer.
#[derive(Debug, Clone)]
struct SlowReceiver {
    addr: SocketAddr,
    visits: Arc<Mutex<Vec<Visit>>>,
}

impl SlowReceiver {
    async fn start(delay: Duration) -> Self {
        let visits: Arc<Mutex<Vec<Visit>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route(
                "/hook",
                post(
                    move |State(visits): State<Arc<Mutex<Vec<Visit>>>>, body: Bytes| async move {
                        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let index = {
                            let mut visits = visits.lock().unwrap();
                            visits.push(Visit {
                                order_id: body["order_id"].as_str().unwrap_or_default().to_owned(),
                                arrived: Instant::now(),
                                answered: None,
                            });
                            visits.len() - 1
                        };
                        tokio::time::sleep(delay).await;
                        visits.lock().unwrap()[index].answered = Some(Instant::now());
                        "ok"
                    },
                ),
            )
            .with_state(visits.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, visits }
    }

    fn url(&self) -> reqwest::Url {
        format!("http://{}/hook", self.addr).parse().unwrap()
    }

    fn visits(&self) -> Vec<Visit> {
        self.visits.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_rebalance_waits_for_records_in_hand_so_partition_order_holds_across_members() {
    const PARTITIONS: i32 = 4;
    const PER_PARTITION: usize = 6;
    let (broker, topic, group) = broker_with_topic(PARTITIONS).await;
    let receiver = SlowReceiver::start(Duration::from_millis(1500)).await;
    let configure = || {
        let mut config = config(&broker, &topic, &group, None);
        config.notify_webhook_url = Some(receiver.url());
        config
    };
    let first = TestApp::spawn_ready(configure()).await;
    let publisher = Publisher::new(&broker, &topic);
    let tag = testkit::unique("rebalance");
    for seq in 0..PER_PARTITION {
        for partition in 0..PARTITIONS {
            publisher
                .event(Some(partition), &sequenced(&tag, partition, seq), &[])
                .await;
        }
    }
    // Every partition has a request in flight at the first member when the
    // second one joins and forces a rebalance.
    eventually(WAIT, "a request in flight per partition", || async {
        (receiver.visits().len() >= PARTITIONS as usize).then_some(())
    })
    .await;
    let second = TestApp::spawn(configure()).await;

    let total = PARTITIONS as usize * PER_PARTITION;
    eventually(Duration::from_secs(60), "every record answered", || async {
        let answered: std::collections::HashSet<String> = receiver
            .visits()
            .into_iter()
            .filter(|v| v.answered.is_some())
            .map(|v| v.order_id)
            .collect();
        (answered.len() >= total).then_some(())
    })
    .await;
    // Let anything still in flight (a duplicate) arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let visits = receiver.visits();
    let mut per_partition: HashMap<i32, Vec<&Visit>> = HashMap::new();
    for visit in &visits {
        let (partition, _) = place(&visit.order_id).expect("a sequenced order id");
        per_partition.entry(partition).or_default().push(visit);
    }
    for partition in 0..PARTITIONS {
        let visits = &per_partition[&partition];
        let order: Vec<usize> = visits.iter().map(|v| place(&v.order_id).unwrap().1).collect();
        assert_eq!(
            order,
            (0..PER_PARTITION).collect::<Vec<_>>(),
            "partition {partition}: each record once, in order"
        );
        for pair in visits.windows(2) {
            assert!(
                pair[0].answered.is_some_and(|answered| answered <= pair[1].arrived),
                "partition {partition}: {} arrived while {} was still in hand",
                pair[1].order_id,
                pair[0].order_id
            );
        }
    }
    second.shutdown().await;
    first.shutdown().await;
}

#[tokio::test]
async fn paused_partitions_revoked_by_a_rebalance_drain_at_their_next_owner_in_order_once() {
    let (broker, topic, group) = broker_with_topic(2).await;
    let receiver = Receiver::start().await;
    let configure = || {
        let mut config = config(&broker, &topic, &group, Some(&receiver));
        config.retry_max_attempts = 100_000;
        config.partition_buffer = 2;
        hold_little(&mut config);
        config
    };
    let first = TestApp::spawn_ready(configure()).await;
    let publisher = Publisher::new(&broker, &topic);
    let tag = testkit::unique("paused");

    // Both partitions stuck behind their first record, buffers full: both paused.
    let stuck: Vec<OrderCreated> = (0..2).map(|p| sequenced(&tag, p, 0)).collect();
    for (partition, event) in (0..).zip(&stuck) {
        receiver.set(&order_id(event), Behaviour::Always(503));
        publisher.event(Some(partition), event, &[]).await;
        for seq in 1..20 {
            publisher
                .event(Some(partition), &sequenced(&tag, partition, seq), &[])
                .await;
        }
    }
    for event in &stuck {
        receiver.wait_attempts(&order_id(event), 3, WAIT).await;
    }

    // A second member joins: the eager rebalance revokes both partitions from
    // the first member; one moves to the second, the other comes back.
    let second = TestApp::spawn_ready(configure()).await;
    for event in &stuck {
        receiver.heal(&order_id(event));
    }
    eventually(WAIT, "both partitions drained", || async {
        let delivered = delivered_per_partition(&receiver);
        (0..2)
            .all(|p| delivered.get(&p).map_or(0, Vec::len) >= 20)
            .then_some(())
    })
    .await;
    // Each member owns one partition: one moved while paused, one came back.
    for app in [&first, &second] {
        eventually(WAIT, "one lag gauge per member", || async {
            (series(&app.metrics().await, "kafka_consumer_lag").len() == 1).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = delivered_per_partition(&receiver);
    for partition in 0..2 {
        assert_eq!(
            delivered[&partition],
            (0..20).collect::<Vec<_>>(),
            "partition {partition} in order, once"
        );
    }
    second.shutdown().await;
    first.shutdown().await;
}
