#!/usr/bin/env bash
# Rerun the benchmarks (BENCHMARKS.md): install the broker, build release,
# start the broker and the services, measure CreateOrder, end to end and
# catch-up beside the tonic and rdkafka ceilings, and print the results table.
#
#   scripts/bench.sh                 # full run on Apache Kafka (about 7 minutes on 2 cores)
#   scripts/bench.sh --quick         # short runs, 100k catch-up records
#   scripts/bench.sh --broker tansu  # on Tansu (in-memory storage) instead
#   scripts/bench.sh --store postgres # order-svc and ceilings 5/6 on PostgreSQL
#                                    # (testkit's server) instead of SQLite files
#   scripts/bench.sh --out run.md    # also write the report as Markdown
#   scripts/bench.sh --brokers 127.0.0.1:9092 --order-svc-url http://127.0.0.1:50051
#                                    # target a running broker / order-svc
# Any other flag goes to `bench all` (see `target/release/bench all --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

broker=kafka given= store=sqlite
prev=
for arg in "$@"; do
  case "$arg" in
    --broker=*) broker=${arg#--broker=} ;;
    --brokers|--brokers=*) given=1 ;;
    --store=*) store=${arg#--store=} ;;
  esac
  [ "$prev" = --broker ] && broker=$arg
  [ "$prev" = --store ] && store=$arg
  prev=$arg
done

# A running broker (--brokers) needs nothing installed here.
if [ -z "$given" ]; then
  case "$broker" in
    kafka) scripts/install-tools.sh --kafka ;;
    tansu) scripts/install-tools.sh ;;
  esac
fi
# PostgreSQL: the run starts its own server from Debian's initdb and pg_ctl
# (or $PG_BIN's), as the tests do; --test installs the package when missing.
if [ "$store" = postgres ] && [ -z "${PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  scripts/install-tools.sh --test
fi
cargo build --release --locked -p bench -p order-svc -p notify-svc
exec "${CARGO_TARGET_DIR:-target}/release/bench" all "$@"
