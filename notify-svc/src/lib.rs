//! notify-svc as a library: the binary is a thin shell over
//! [`startup::Application`], and the tests drive the same `Application`.
//!
//! A record's path: [`consumer`] fetches it and hands it to its partition's
//! worker; [`processor`] decodes it, drops a duplicate ([`dedup`]), sends the
//! notification through a [`notifier`] with retries ([`retry`]), or sends it to
//! the dead-letter topic ([`dead_letter`]); only then is its offset stored.

pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod dedup;
pub mod error;
pub mod metrics;
pub mod notifier;
pub mod processor;
pub mod retry;
pub mod startup;
pub mod throttle;
