"""A Java peer nobody here wrote, from proto/ alone (tests/java).

Maven generates protobuf-java classes and grpc-java stubs from proto/orders/v1
and runs JUnit tests against a real broker and a real order-svc: a grpc-java
client places orders (and reads a refusal's google.rpc.BadRequest details), and
a kafka-clients consumer in its own group reads the OrderCreated records,
decodes them with the generated classes and checks the key and the CloudEvents
and trace headers. The Java side is also shown to fail: on a header it does
not expect, and without its targets.

Maven runs offline: tests/java/install.sh (called by scripts/install-tools.sh
--test) fetches the plugins and dependencies once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

JAVA_DIR = ROOT / "tests" / "java"
PEER_TEST = "OrderServicePeerTest"
# Surefire's summary line for a whole run.
RESULTS_RE = re.compile(r"Tests run: (\d+), Failures: (\d+), Errors: (\d+), Skipped: (\d+)\s*$", re.M)
# Maven on two busy cores: a JVM to build, then one to test.
MAVEN_TIMEOUT = 240


def maven(*args: str, env: dict[str, str], drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`mvn -o -B test` in tests/java with `env` added and `drop` removed from
    this process's environment; output (stdout and stderr) in .stdout."""
    mvn = shutil.which("mvn")
    if mvn is None:
        pytest.fail("mvn is not installed: the Java peer needs Maven 3.8+ and a JDK 17+")
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env)
    try:
        return subprocess.run(
            [mvn, "-o", "-B", "--no-transfer-progress", "test", *args],
            cwd=JAVA_DIR, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=MAVEN_TIMEOUT, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"mvn test did not finish in {MAVEN_TIMEOUT}s:\n{out[-6000:]}")


def explain(out: subprocess.CompletedProcess, svc=None) -> str:
    text = f"mvn exited {out.returncode}:\n{out.stdout[-12000:]}"
    if "offline" in out.stdout and "Cannot access" in out.stdout:
        text += "\n(Maven is offline and something is missing: run tests/java/install.sh)"
    if svc is not None:
        text += f"\n--- order-svc log ---\n{svc.logs()}"
    return text


def summary(out: subprocess.CompletedProcess) -> tuple[int, int, int, int]:
    """(run, failures, errors, skipped) of the whole Maven run."""
    found = RESULTS_RE.findall(out.stdout)
    assert found, f"no Surefire summary in the output:\n{out.stdout[-6000:]}"
    return tuple(int(n) for n in found[-1])  # the last one totals the run


@pytest.fixture(scope="module")
def targets(kafka, start_order_svc):
    """A topic with three partitions and an order-svc publishing to it, as the
    Java tests' environment."""
    topic = kafka.unique_topic("orders-java", partitions=3)
    svc = start_order_svc(topic)
    env = {"KAFKA_BROKERS": kafka.bootstrap, "ORDERS_TOPIC": topic, "ORDER_SVC_ADDR": svc.grpc_addr}
    return env, svc


def test_java_peer_places_orders_and_consumes_their_events(targets):
    env, svc = targets
    out = maven(env=env, drop=("EXPECTED_CE_SOURCE",))  # order-svc's default, /order-svc
    assert out.returncode == 0, explain(out, svc)
    run, failures, errors, skipped = summary(out)
    # GoldenVectorTest (2) and OrderServicePeerTest (2), none of them skipped.
    assert (run, failures, errors, skipped) == (4, 0, 0, 0), explain(out, svc)


def test_java_peer_fails_when_order_svc_sends_another_ce_source(kafka, start_order_svc):
    topic = kafka.unique_topic("orders-java-src")
    svc = start_order_svc(topic, CE_SOURCE="/not-order-svc")
    env = {"KAFKA_BROKERS": kafka.bootstrap, "ORDERS_TOPIC": topic, "ORDER_SVC_ADDR": svc.grpc_addr}
    out = maven(f"-Dtest={PEER_TEST}#ordersCreated*", env=env, drop=("EXPECTED_CE_SOURCE",))
    assert out.returncode != 0, "the Java peer passed although ce_source changed:\n" + explain(out, svc)
    assert re.search(r"ce_source .*expected: </order-svc> but was: </not-order-svc>", out.stdout), \
        explain(out, svc)


def test_java_peer_fails_without_its_targets():
    out = maven(f"-Dtest={PEER_TEST}", env={},
                drop=("KAFKA_BROKERS", "ORDERS_TOPIC", "ORDER_SVC_ADDR"))
    assert out.returncode != 0, "the Java peer passed with no broker or order-svc to test:\n" + explain(out)
    assert "is not set" in out.stdout, explain(out)
    run, failures, errors, skipped = summary(out)
    assert skipped == 0 and failures + errors >= 1, explain(out)
