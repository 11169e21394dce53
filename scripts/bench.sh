#!/usr/bin/env bash
# Rerun the benchmarks (BENCHMARKS.md): build release, start a Tansu broker
# and the services, measure CreateOrder, end to end and catch-up beside the
# tonic and rdkafka ceilings, and print the results table.
#
#   scripts/bench.sh                 # full run (about 4 minutes on 2 cores)
#   scripts/bench.sh --quick         # short runs, 100k catch-up records
#   scripts/bench.sh --brokers 127.0.0.1:9092 --order-svc-url http://127.0.0.1:50051
#                                    # target a running broker / order-svc
# Any other flag goes to `bench all` (see `target/release/bench all --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p bench -p order-svc -p notify-svc
command -v "${TANSU:-tansu}" >/dev/null || [[ " $* " == *" --brokers "* ]] || {
  echo "bench.sh: tansu not found (cargo install tansu --locked --version 0.6.0 --features dynostore,libsql, or pass --brokers)" >&2
  exit 1
}
exec target/release/bench all "$@"
