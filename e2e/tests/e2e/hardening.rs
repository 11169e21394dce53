//! What the real binaries never do: print a secret (in a start-up error or in
//! `--help`), or let a field of an event forge a log line.

use std::{process::Command, time::Duration};

use orders_contract::{
    envelope,
    v1::{LineItem, Order, OrderCreated},
};

use crate::helpers::{NOTIFICATION, START_TIMEOUT, broker_with_topic, field, notify_env, start_notify};

/// Runs workspace binary `name` with `args` and only `env` (plus PATH); waits
/// for it and returns its exit success and everything it printed.
fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(testkit::bin_path(name));
    command.env_clear().env("NO_COLOR", "1").args(args);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn a_malformed_kafka_options_is_refused_without_echoing_it() {
    for binary in ["order-svc", "notify-svc"] {
        // The second entry has no `=`: perhaps the rest of a password with a comma in it.
        let (ok, text) = run(binary, &[], &[("KAFKA_OPTIONS", "sasl.password=hunter2,oops")]);
        assert!(!ok, "{binary} refuses it:\n{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("oops"),
            "{binary} echoed it:\n{text}"
        );
        assert!(
            text.contains("KAFKA_OPTIONS") && text.contains("entry 2"),
            "{binary} names the entry:\n{text}"
        );

        let (ok, text) = run(binary, &["--kafka-options", "ssl.key.password=s3cr3t,=x"], &[]);
        assert!(!ok, "{binary} refuses it:\n{text}");
        assert!(!text.contains("s3cr3t"), "{binary} echoed it:\n{text}");
        assert!(text.contains("entry 2"), "{binary} names the entry:\n{text}");
    }
}

#[test]
fn help_never_shows_a_secret_value() {
    let secrets = [
        ("KAFKA_OPTIONS", "sasl.password=opt-s3cr3t"),
        ("KAFKA_SASL_PASSWORD", "sasl-s3cr3t"),
        ("AUTH_JWT_SECRET", "jwt-s3cr3t-jwt-s3cr3t-jwt-s3cr3t-jwt"),
        ("NOTIFY_WEBHOOK_URL", "https://hooks.example/services/T0KEN-s3cr3t"),
    ];
    for binary in ["order-svc", "notify-svc"] {
        let (ok, text) = run(binary, &["--help"], &secrets);
        assert!(ok, "{binary} --help succeeds:\n{text}");
        assert!(
            text.contains("KAFKA_OPTIONS"),
            "{binary} documents KAFKA_OPTIONS:\n{text}"
        );
        assert!(!text.contains("s3cr3t"), "{binary} --help shows a secret:\n{text}");
    }
}

#[test]
fn a_rejected_webhook_url_is_not_echoed() {
    for url in ["https://hooks.example:99999/T0KEN-s3cr3t", "not a url T0KEN-s3cr3t"] {
        let (ok, text) = run("notify-svc", &[], &[("NOTIFY_WEBHOOK_URL", url)]);
        assert!(!ok, "refused:\n{text}");
        assert!(text.contains("NOTIFY_WEBHOOK_URL"), "the setting is named:\n{text}");
        assert!(!text.contains("s3cr3t"), "the URL is echoed:\n{text}");
    }
}

fn event(user_id: &str) -> OrderCreated {
    OrderCreated {
        event_id: testkit::unique("event"),
        order: Some(Order {
            order_id: testkit::unique("order"),
            user_id: user_id.into(),
            items: vec![LineItem {
                sku: "SKU-1\r\nINFO x".into(),
                quantity: 1,
                unit_price_minor: 100,
            }],
            currency: "EUR".into(),
            total_minor: 100,
            created_at: None,
            request_id: String::new(),
        }),
        occurred_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_control_characters_is_notified_on_exactly_one_line() {
    let (broker, topic) = broker_with_topic("forge", 1).await;
    let group = testkit::unique("notify");
    let notify = start_notify(&notify_env(&broker.addr(), &topic, &group, &[])).await;

    // Written straight to the topic, as a producer other than order-svc could.
    let forged = event("eve\nINFO notification: order created order_id=forged user_id=victim\r\u{1b}[2K");
    let honest = event("bob");
    for e in [&forged, &honest] {
        let record = envelope::encode_order_created(e, "/somebody-else");
        let headers: Vec<(&str, &[u8])> = record.headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        broker
            .produce(&topic, record.key.as_bytes(), &record.value, &headers)
            .await
            .expect("record published");
    }
    let order_id = |e: &OrderCreated| e.order.as_ref().expect("order").order_id.clone();
    // The honest one is behind the forged one on the one partition.
    notify
        .wait_for_line(&[NOTIFICATION, &order_id(&honest)], START_TIMEOUT)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let lines = notify.lines_with(&[NOTIFICATION]);
    assert_eq!(lines.len(), 2, "one line per order:\n{}", lines.join("\n"));
    let line = notify
        .lines_with(&[NOTIFICATION, &order_id(&forged)])
        .into_iter()
        .next()
        .expect("the forged-user order is notified");
    assert_eq!(field(&line, "order_id"), Some(order_id(&forged)), "{line}");
    assert!(line.contains(r"user_id=eve\nINFO notification"), "escaped: {line}");
    assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
    let forgeries: Vec<String> = notify
        .output()
        .into_iter()
        .filter(|l| l.contains("order_id=forged") && !l.contains(&order_id(&forged)))
        .collect();
    assert!(
        forgeries.is_empty(),
        "lines of their own for the forgery: {forgeries:?}"
    );
}
