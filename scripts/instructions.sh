#!/usr/bin/env bash
# Count CPU instructions per CreateOrder call for order-svc, ceiling 2
# (tonic + produce) and ceiling 6 (tonic + store transaction + produce) with
# valgrind's callgrind (BENCHMARKS.md): each server
# runs once per rate under callgrind, the whole process counted, and the
# slope between rates is the cost of one call. Instruction counts do not
# move with the machine's load, unlike times.
#
#   scripts/instructions.sh                              # Apache Kafka, 25,50,100 calls/s, 20 s each
#   scripts/instructions.sh --rates 20,40,80 --duration 30s
#   scripts/instructions.sh --broker tansu
# Other flags: `target/release/bench instructions --help`. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
broker=kafka
prev=
for arg in "$@"; do
  case "$arg" in --broker=*) broker=${arg#--broker=} ;; esac
  [ "$prev" = --broker ] && broker=$arg
  prev=$arg
done
case "$broker" in
  kafka) scripts/install-tools.sh --kafka ;;
  tansu) scripts/install-tools.sh ;;
esac
cargo build --release --locked -p bench -p order-svc
exec "${CARGO_TARGET_DIR:-target}/release/bench" instructions "$@"
