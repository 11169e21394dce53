//! The orders contract: the one crate both services share.
//!
//! It holds the code generated from `proto/` (the `orders.v1` messages, the
//! `OrderService` client and server), the encoded file descriptor set that
//! server reflection serves, and [`envelope`]: how an event becomes a Kafka
//! record (key, value, CloudEvents headers) and back. Nothing specific to one
//! service lives here.

pub mod envelope;

/// Code generated from `proto/` by `build.rs`.
pub mod proto {
    /// The `orders` proto packages.
    pub mod orders {
        /// `orders.v1`: the order, the `OrderService` RPC and the events.
        #[allow(
            missing_docs,
            unreachable_pub,
            missing_debug_implementations,
            clippy::all,
            clippy::pedantic
        )]
        pub mod v1 {
            tonic::include_proto!("orders.v1");
        }
    }
}

pub use proto::orders::v1;

/// The encoded `FileDescriptorSet` of every file under `proto/`, for server
/// reflection and for tools that need the schema at run time.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orders_descriptor");

/// Converts a time to the protobuf well-known `Timestamp`.
pub fn timestamp(at: time::OffsetDateTime) -> prost_types::Timestamp {
    let nanos = at.unix_timestamp_nanos();
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// Converts a protobuf `Timestamp` back to a time; `None` when it is out of range.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<time::OffsetDateTime> {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn descriptor_set_describes_the_service_and_the_event() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let names: Vec<_> = set
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_owned();
                f.message_type
                    .iter()
                    .map(move |m| format!("{pkg}.{}", m.name()))
                    .chain(f.service.iter().map(|s| format!("orders.v1.{}", s.name())))
                    .collect::<Vec<_>>()
            })
            .collect();
        for wanted in [
            "orders.v1.OrderService",
            "orders.v1.CreateOrderRequest",
            "orders.v1.OrderCreated",
            "orders.v1.Order",
        ] {
            assert!(names.iter().any(|n| n == wanted), "{wanted} missing from {names:?}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(1_764_000_000_123_456_789).unwrap();
        assert_eq!(from_timestamp(&timestamp(at)), Some(at));
    }
}
