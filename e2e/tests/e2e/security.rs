//! Both services against an Apache Kafka broker whose clients' listener is SASL_SSL
//! (TLS from a fresh CA, SCRAM-SHA-512), configured only through the
//! documented environment variables: an order flows end to end; a client
//! that does not trust the broker's CA, or has the wrong password, does not
//! start and never prints the password.

use std::time::Duration;

use crate::helpers::{NOTIFICATION, OrderSvc, START_TIMEOUT, notify_env, order, start_notify};

const USER: &str = "orders-app";
const PASSWORD: &str = "tls-and-scram-pw-7";

fn security_env(broker: &testkit::Broker, password: &str, ca: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl".to_owned()),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_owned()),
        ("KAFKA_SASL_USERNAME", USER.to_owned()),
        ("KAFKA_SASL_PASSWORD", password.to_owned()),
        ("KAFKA_SSL_CA_LOCATION", ca.to_owned()),
        ("KAFKA_STARTUP_TIMEOUT", "8s".to_owned()),
        ("KAFKA_BROKERS", broker.addr()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_services_over_sasl_ssl_and_refused_without_trust_or_password() {
    let topic = testkit::unique("secure");
    let dlq = format!("{topic}.dlq");
    let broker = testkit::Broker::start_with_tls_and_sasl(USER, PASSWORD, &[(topic.as_str(), 2), (dlq.as_str(), 1)])
        .await
        .expect("a SASL_SSL broker starts");
    let ca = broker
        .ca_location()
        .expect("a TLS broker has a CA")
        .display()
        .to_string();

    let secured = security_env(&broker, PASSWORD, &ca);
    let orders = OrderSvc::start(&broker.addr(), &topic, &secured).await;
    let group = testkit::unique("notify");
    let notify = start_notify(&notify_env(&broker.addr(), &topic, &group, &secured)).await;
    let created = orders
        .client()
        .await
        .create_order(order("secure-user"))
        .await
        .expect("CreateOrder over SASL_SSL")
        .into_inner()
        .order
        .expect("an order");
    notify
        .wait_for_line(&[NOTIFICATION, &created.order_id], Duration::from_secs(30))
        .await;

    // The system's own CA bundle does not vouch for this broker.
    let untrusted = security_env(&broker, PASSWORD, "/etc/ssl/certs/ca-certificates.crt");
    let wrong_password = security_env(&broker, "not-the-password", &ca);
    for (what, env) in [("untrusted CA", untrusted), ("wrong password", wrong_password)] {
        let env = notify_env(&broker.addr(), &topic, &testkit::unique("notify"), &env);
        let mut refused = testkit::Service::spawn("notify-svc", &env).expect("notify-svc runs");
        let status = refused
            .wait_exit(START_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!status.success(), "{what}: notify-svc must not start");
        let output = refused.output().join("\n");
        assert!(!output.contains("not-the-password"), "{what}: {output}");
        assert!(!output.contains(PASSWORD), "{what}: {output}");
    }
}
