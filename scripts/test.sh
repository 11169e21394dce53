#!/usr/bin/env bash
# Runs every check and test on a fresh machine: installs the tools it needs
# (scripts/install-tools.sh --test), then formatting, lints, the Rust tests
# (unit, integration and end-to-end against real Apache Kafka brokers;
# order-svc's api suite once more on PostgreSQL), the
# Python suites (contract, cross-language peers in Python, TypeScript, Go and
# Java, compose checks, compose's broker settings), and a smoke test of the
# Tansu path scripts/run.sh takes. This is the command .ci/run calls.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

scripts/install-tools.sh --test

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries the end-to-end tests run)"
cargo build --workspace --bins --locked
echo "==> cargo test (Apache Kafka)"
cargo test --workspace --locked
echo "==> order-svc's api tests on PostgreSQL (Debian's server, started by testkit)"
TEST_DATABASE=postgres cargo test --locked -p order-svc --test api
echo "==> python tests (Apache Kafka)"
.tools/venv/bin/python -m pytest tests -q
echo "==> smoke test on Tansu, the broker of scripts/run.sh: an order end to end, and a broker outage"
TEST_BROKER=tansu cargo test --locked -p e2e --test e2e -- flow:: outage::
