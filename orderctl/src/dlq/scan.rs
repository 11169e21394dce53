//! Reading the dead-letter topic one record at a time: a consumer assigned to
//! one partition at a time from a given offset up to the end the partition
//! had when the command started, with a small prefetch, so memory stays
//! bounded however large the topic is. It joins no group and commits nothing
//! by itself.

use std::{collections::VecDeque, time::Duration};

use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer},
    error::KafkaError,
    message::OwnedMessage,
    types::RDKafkaErrorCode,
};
use service_kit::kafka::{KafkaArgs, Role, check_topic};

use super::{Error, filter::Position};

/// How long a read may wait for the next record it knows exists.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The consumer's callbacks: the end of a partition is how a read knows it
/// is done (`enable.partition.eof`), not an error worth a log line; other
/// client errors are logged as warnings.
#[derive(Debug)]
pub(crate) struct ReaderCtx;

impl ClientContext for ReaderCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::warn!(%error, reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for ReaderCtx {}

/// The dead-letter topic, open for reading.
pub(crate) struct Dlq {
    consumer: StreamConsumer<ReaderCtx>,
    topic: String,
    partitions: i32,
    timeout: Duration,
}

impl std::fmt::Debug for Dlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlq")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// Offsets `[start, end)` of one partition still to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub(crate) partition: i32,
    pub(crate) start: i64,
    pub(crate) end: i64,
}

impl Dlq {
    /// Opens `topic` with a consumer in `group` (which only `commit` uses),
    /// checking that the broker answers and the topic exists.
    pub(crate) async fn open(kafka: &KafkaArgs, topic: &str, group: &str) -> Result<Self, Error> {
        let consumer: StreamConsumer<ReaderCtx> = kafka
            .client_config(
                Role::Consumer,
                [
                    ("group.id", group),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("enable.partition.eof", "true"),
                    // A position below the partition's start (removed by
                    // retention) reads from its start, never from its end.
                    ("auto.offset.reset", "earliest"),
                    // The prefetch bound: at most ~1 MiB of records wait in
                    // the client, whatever the topic's size.
                    ("queued.max.messages.kbytes", "1024"),
                    ("fetch.wait.max.ms", "50"),
                ],
            )
            .create_with_context(ReaderCtx)?;
        let timeout = kafka.startup_timeout;
        let partitions = blocking(|| check_topic(consumer.client(), &kafka.brokers, topic, timeout))?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            partitions: i32::try_from(partitions).unwrap_or(i32::MAX),
            timeout,
        })
    }

    /// The topic's name.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// Its partition count.
    pub(crate) fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The oldest offset still there and the offset the next record will get.
    pub(crate) fn watermarks(&self, partition: i32) -> Result<(i64, i64), Error> {
        Ok(blocking(|| {
            self.consumer.fetch_watermarks(&self.topic, partition, self.timeout)
        })?)
    }

    /// Refuses a partition the topic does not have.
    pub(crate) fn check_partition(&self, partition: i32) -> Result<(), Error> {
        if (0..self.partitions).contains(&partition) {
            Ok(())
        } else {
            Err(Error::NoPartition {
                topic: self.topic.clone(),
                partition,
                count: self.partitions,
            })
        }
    }

    /// The group's committed positions per partition, with their metadata.
    pub(crate) fn committed(&self) -> Result<Vec<(i32, Option<i64>, String)>, Error> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = blocking(|| self.consumer.committed_offsets(tpl, self.timeout))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (e.partition(), offset, e.metadata().to_owned())
            })
            .collect())
    }

    /// Commits `next` (the first record not yet done) of `partition` for the
    /// consumer's group, with `metadata`; returns once the broker has it.
    pub(crate) fn commit(&self, partition: i32, next: i64, metadata: &str) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next))?;
        if let Some(mut e) = tpl.find_partition(&self.topic, partition) {
            e.set_metadata(metadata);
        }
        Ok(blocking(|| self.consumer.commit(&tpl, CommitMode::Sync))?)
    }

    /// Reads `ranges` in turn.
    pub(crate) fn cursor(&self, ranges: Vec<Range>) -> Cursor<'_> {
        Cursor {
            dlq: self,
            ranges: ranges.into(),
            current: None,
        }
    }
}

/// Runs a blocking client call (metadata, watermarks, a synchronous commit)
/// off the async worker; the calls are few and short, so `block_in_place`.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Records of some ranges, in partition and offset order.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    dlq: &'a Dlq,
    ranges: VecDeque<Range>,
    current: Option<Range>,
}

impl Cursor<'_> {
    /// The next record, or `None` when every range is read.
    pub(crate) async fn next(&mut self) -> Result<Option<OwnedMessage>, Error> {
        loop {
            let Some(range) = &mut self.current else {
                let Some(range) = self.ranges.pop_front() else {
                    return Ok(None);
                };
                if range.start < range.end {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&self.dlq.topic, range.partition, Offset::Offset(range.start))?;
                    self.dlq.consumer.assign(&tpl)?;
                    self.current = Some(range);
                }
                continue;
            };
            if range.start >= range.end {
                self.current = None;
                continue;
            }
            let received = tokio::time::timeout(IDLE_TIMEOUT, self.dlq.consumer.recv()).await;
            match received {
                Err(_) => {
                    return Err(Error::Stalled {
                        topic: self.dlq.topic.clone(),
                        at: Position {
                            partition: range.partition,
                            offset: range.start,
                        },
                        waited: IDLE_TIMEOUT,
                    });
                }
                // The partition ends before the end it had at the start:
                // retention or truncation; nothing more to read there.
                Ok(Err(KafkaError::PartitionEOF(p))) if p == range.partition => self.current = None,
                Ok(Err(KafkaError::PartitionEOF(_))) => {}
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(m)) => {
                    // Records of a partition assigned before are stale.
                    if m.partition() != range.partition || m.offset() < range.start {
                        continue;
                    }
                    if m.offset() >= range.end {
                        self.current = None;
                        continue;
                    }
                    range.start = m.offset() + 1;
                    return Ok(Some(m.detach()));
                }
            }
        }
    }

    /// Where the next page starts: the first position not read yet, if any
    /// is left.
    pub(crate) fn next_position(&self) -> Option<Position> {
        self.current
            .iter()
            .chain(self.ranges.iter())
            .find(|r| r.start < r.end)
            .map(|r| Position {
                partition: r.partition,
                offset: r.start,
            })
    }
}
