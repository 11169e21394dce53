//! Black-box tests of order-svc: the real `Application` in-process, a real
//! Apache Kafka broker (shared, or a test's own when it stops it), a
//! generated tonic client, and what a user sees
//! (statuses, records on the topic, /metrics, health).

mod create_order;
mod fatal;
mod hardening;
mod helpers;
mod operability;
mod outage;
mod postgres;
mod read_orders;
mod security;
mod store;
mod validation;
