//! Benchmarks (see BENCHMARKS.md): the `CreateOrder` load generator, the
//! ceilings it is compared with (bare tonic, tonic + one produce, raw
//! rdkafka producer and consumer), `bench all`, which runs everything
//! against a broker and the two services in one go, and `bench
//! instructions`, which counts a call's CPU instructions.

pub mod fixtures;
pub mod grpc_ceiling;
pub mod instructions;
pub mod kafka_ceiling;
pub mod loadgen;
pub mod procs;
pub mod prom;
pub mod run;
pub mod stats;
