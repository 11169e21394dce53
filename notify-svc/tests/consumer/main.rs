//! notify-svc's black-box tests: the in-process `Application` against a real
//! Tansu broker and a real HTTP webhook receiver, a unique topic and group
//! per test. One binary; each topic in its own file.

mod configuration;
mod dead_letters;
mod delivery;
mod flow_control;
mod hardening;
mod helpers;
mod offsets;
mod operations;
mod security;
