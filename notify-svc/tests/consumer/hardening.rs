//! What a hostile producer of the orders topic cannot do: forge the context
//! headers of a dead letter.

use rdkafka::message::{Headers, Message, OwnedMessage};

use crate::helpers::{WAIT, order_id, webhook_setup};

/// The value of the first header called `name`, as a reader scanning the
/// headers in order finds it.
fn first_header(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn keys(message: &OwnedMessage) -> Vec<String> {
    message
        .headers()
        .map(|h| h.iter().map(|h| h.key.to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_records_own_dlq_headers_are_not_copied_into_its_dead_letter() {
    let (broker, topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    // Offset 0: undecodable, carrying forged dead-letter context.
    publisher
        .raw(
            None,
            b"forged-key",
            b"\xff\xffnot an event",
            &[
                ("x-custom", b"kept"),
                ("dlq.error.class", b"forged"),
                ("dlq.original.topic", b"elsewhere"),
                ("dlq.original.offset", b"999"),
                ("DLQ.Attempts", b"99"),
                ("dlq.omitted", b"nothing"),
            ],
        )
        .await;
    // Offset 1: a valid order behind it, so we know offset 0 was handled.
    let next = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&next), WAIT).await;

    let dlq = format!("{topic}.dlq");
    let got = broker.read_all(&dlq, 1, WAIT).await.expect("read the DLQ");
    assert_eq!(got.len(), 1, "one dead letter on {dlq}");
    let letter = &got[0];

    assert_eq!(first_header(letter, "dlq.error.class").as_deref(), Some("malformed"));
    assert_eq!(
        first_header(letter, "dlq.original.topic").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(first_header(letter, "dlq.original.offset").as_deref(), Some("0"));
    assert_eq!(first_header(letter, "dlq.attempts").as_deref(), Some("0"));
    assert_eq!(
        first_header(letter, "x-custom").as_deref(),
        Some("kept"),
        "other headers are kept"
    );
    let keys = keys(letter);
    assert!(
        !keys.iter().any(|k| k == "DLQ.Attempts" || k == "dlq.omitted"),
        "no forged dlq.* header survives: {keys:?}"
    );
    for name in ["dlq.error.class", "dlq.original.topic", "dlq.original.offset"] {
        assert_eq!(
            keys.iter().filter(|k| *k == name).count(),
            1,
            "{name} appears once: {keys:?}"
        );
    }
    assert_eq!(letter.key(), Some(&b"forged-key"[..]));
    app.shutdown().await;
}
