#!/usr/bin/env bash
# Fetches what the Java peer (tests/java, run by tests/test_peer_java.py) needs
# into the local Maven repository (~/.m2): the plugins, protoc and
# protoc-gen-grpc-java executables, the libraries and Surefire's JUnit
# provider. It builds the project and runs its broker-free test
# (GoldenVectorTest), because only a real test run makes Surefire resolve
# everything a later offline run (`mvn -o`) uses. Idempotent: when everything
# is already there it checks offline and takes seconds.
set -euo pipefail
cd "$(dirname "$0")"

for tool in java mvn; do
  if ! command -v "$tool" >/dev/null; then
    echo "tests/java/install.sh: $tool is not installed (the Java peer needs a JDK 17+ and Maven 3.8+)" >&2
    exit 1
  fi
done

args=(-B -q --no-transfer-progress test -Dtest=GoldenVectorTest)
if mvn -o "${args[@]}" >/dev/null 2>&1; then
  exit 0
fi
echo "==> fetching the Java peer's Maven plugins and dependencies (tests/java)"
mvn "${args[@]}"
