#!/usr/bin/env bash
# Installs what running and testing the system need, once per machine
# (idempotent; later runs take seconds):
#   - unless --kafka: tansu 0.6.0, the Kafka-compatible broker scripts/run.sh starts
#     (crates.io; ~10 minutes to build the first time), into ~/.cargo/bin;
#   - with --kafka or --test: Apache Kafka's broker, the jars scripts/kafka/pom.xml
#     names, copied from Maven Central by Maven (checksums checked) into
#     .tools/kafka-<version>/libs; the broker of the tests and benchmarks;
#   - with --test: Debian's postgresql (the tests start their own servers from
#     its initdb and pg_ctl; no system service is used) when it is missing,
#     a Python venv in .tools/venv with tests/requirements.txt,
#     the Node packages in tests/node (npm ci), and the Go and Java peers'
#     dependencies, for the cross-language tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=${1:-}
case "$mode" in
  ""|--kafka|--test) ;;
  *) echo "usage: $0 [--kafka|--test]" >&2; exit 2 ;;
esac

TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$mode" != --kafka ] && ! tansu --version 2>/dev/null | grep -qx "tansu $TANSU_VERSION"; then
  echo "==> installing tansu $TANSU_VERSION (first time only; takes ~10 minutes)"
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql
fi

[ -n "$mode" ] || exit 0

# Apache Kafka needs Java 17 or newer and Maven to fetch it.
java_major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
if [ -z "$java_major" ] || [ "${java_major%%.*}" -lt 17 ]; then
  echo "error: Apache Kafka needs Java 17 or newer on PATH (found: ${java_major:-none})" >&2
  exit 1
fi
command -v mvn >/dev/null || { echo "error: Maven (mvn) is needed to fetch Apache Kafka's jars" >&2; exit 1; }
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' scripts/kafka/pom.xml)
kafka_libs="$root/.tools/kafka-$kafka_version/libs"
kafka_stamp="$root/.tools/kafka-$kafka_version/.pom.sha256"
want=$(sha256sum scripts/kafka/pom.xml | cut -d' ' -f1)
if [ "$(cat "$kafka_stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Apache Kafka $kafka_version's jars from Maven Central into .tools/"
  rm -rf "$kafka_libs"
  mvn -B -q -C -f scripts/kafka/pom.xml \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$kafka_libs"
  echo "$want" > "$kafka_stamp"
fi

[ "$mode" = "--test" ] || exit 0

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "==> installing Debian's postgresql (initdb and pg_ctl for the tests)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y postgresql
  # The package starts a cluster as a system service; the tests do not use it.
  $sudo service postgresql stop >/dev/null 2>&1 || true
fi

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

# The Go and Java peers (tests/go, tests/java): their pinned modules, plugins
# and libraries.
tests/go/install.sh
tests/java/install.sh
