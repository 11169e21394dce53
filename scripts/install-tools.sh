#!/usr/bin/env bash
# Installs what running and testing the system need, once per machine
# (idempotent; later runs take seconds):
#   - tansu 0.6.0, the Kafka-compatible broker for local runs and tests
#     (crates.io; ~10 minutes to build the first time), into ~/.cargo/bin;
#   - with --test: a Python venv in .tools/venv with tests/requirements.txt,
#     and the Node packages in tests/node (npm ci), for the cross-language tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"
if ! tansu --version 2>/dev/null | grep -qx "tansu $TANSU_VERSION"; then
  echo "==> installing tansu $TANSU_VERSION (first time only; takes ~10 minutes)"
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql
fi

[ "${1:-}" = "--test" ] || exit 0

venv="$root/.tools/venv"
stamp="$venv/.requirements.sha256"
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing the Python test tools into .tools/venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi

if [ -f tests/node/package-lock.json ]; then
  lock=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
  if [ "$(cat tests/node/node_modules/.lock.sha256 2>/dev/null)" != "$lock" ]; then
    echo "==> installing the Node test tools (npm ci)"
    (cd tests/node && npm ci --silent --no-audit --no-fund)
    echo "$lock" > tests/node/node_modules/.lock.sha256
  fi
fi
