//! Black-box tests of order-svc: the real `Application` in-process, a real
//! Tansu broker per test, a generated tonic client, and what a user sees
//! (statuses, records on the topic, /metrics, health).

mod create_order;
mod hardening;
mod helpers;
mod operability;
mod outage;
mod security;
mod validation;
