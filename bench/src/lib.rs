//! Benchmarks (see BENCHMARKS.md): the `CreateOrder` load generator, the
//! ceilings it is compared with (bare tonic, tonic + one produce, raw
//! rdkafka producer and consumer), and `bench all`, which runs everything
//! against a broker and the two services in one go.

pub mod bare;
pub mod loadgen;
pub mod procs;
pub mod prom;
pub mod raw;
pub mod run;
pub mod stats;
