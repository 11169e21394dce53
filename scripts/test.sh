#!/usr/bin/env bash
# Runs every check and test on a fresh machine: installs the tools it needs,
# then formatting, lints, the Rust tests (unit, integration and end-to-end
# against real Tansu brokers) and the Python suites (cross-language clients,
# compose checks). This is the command .ci/run calls.
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
echo "==> cargo test"
cargo test --workspace --locked
echo "==> python tests"
.tools/venv/bin/python -m pytest tests -q
