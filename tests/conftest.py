"""Fixtures for the Python suites: a real broker (Apache Kafka by default), the real service
binaries, the npm-installed buf, and Python code generated from proto/.

Everything runs on 127.0.0.1 with free ports in temporary folders, and is torn
down at the end of its scope. Waiting is by polling with a deadline; a process
that dies while we wait fails the test with the tail of its log.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Callable

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
NODE_DIR = ROOT / "tests" / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"

def _ports_below_ephemeral_range() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    return range(10_000, max(first_ephemeral, 10_001))


_next_port = itertools.count(os.getpid() * 97)


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago, for a child to bind.
    It comes from below the kernel's ephemeral range, as testkit's does: a port
    bound with port 0 is ephemeral, and any outgoing connection may take it
    before the child binds it."""
    ports = _ports_below_ephemeral_range()
    for _ in ports:
        port = ports[next(_next_port) % len(ports)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Polls `check` until it returns something truthy (returned) or `timeout`
    seconds pass (fails the test, saying `what` was awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclasses.dataclass
class Broker:
    """A real broker started by testkit's `test-broker` (Apache Kafka, or
    Tansu with TEST_BROKER=tansu): the same launcher the Rust tests use."""

    bootstrap: str
    kind: str
    log: pathlib.Path
    client_options: str
    proc: subprocess.Popen

    def create_topic(self, name: str, partitions: int = 1) -> str:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)],
                                      operation_timeout=30, request_timeout=30)
        try:
            futures[name].result(timeout=40)
        except Exception as e:  # noqa: BLE001 - the broker's own error is the message
            pytest.fail(f"cannot create topic {name}: {e}\n{tail(self.log)}")
        return name

    def unique_topic(self, prefix: str, partitions: int = 1) -> str:
        return self.create_topic(f"{prefix}-{uuid.uuid4().hex[:12]}", partitions)


@pytest.fixture(scope="session")
def kafka() -> Broker:
    """One broker for the session; tests isolate themselves with unique topics
    and groups."""
    proc = subprocess.Popen([str(binary("test-broker"))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"test-broker exited ({proc.returncode}) without a broker:\n{proc.stderr.read()}")
    info = json.loads(line)
    broker = Broker(bootstrap=info["bootstrap"], kind=info["kind"], log=pathlib.Path(info["log"]),
                    client_options=info["client_options"], proc=proc)
    try:
        yield broker
    finally:
        # Closing its standard input takes the broker down with it.
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclasses.dataclass
class Service:
    """A running service binary."""

    name: str
    proc: subprocess.Popen
    log: pathlib.Path
    metrics_addr: str
    grpc_addr: str | None = None

    def logs(self) -> str:
        return tail(self.log)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """Sum of every sample of `name` (all label sets) in /metrics."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def binary(name: str) -> pathlib.Path:
    path = TARGET / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `cargo build --workspace --bins` first")
    return path


def start_service(name: str, env: dict[str, str], folder: pathlib.Path, metrics_addr: str,
                  grpc_addr: str | None = None) -> Service:
    log = folder / f"{name}-{uuid.uuid4().hex[:8]}.log"
    full_env = {**os.environ, "METRICS_ADDR": metrics_addr,
                "LOG_FORMAT": "text", "NO_COLOR": "1", **env}
    full_env.setdefault("RUST_LOG", "info")
    if name == "order-svc":
        # A store of its own in the test's folder, not orders.db in the cwd.
        full_env.setdefault("DATABASE_URL", f"sqlite://{folder}/orders-{uuid.uuid4().hex[:8]}.db")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary(name))], env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    service = Service(name=name, proc=proc, log=log, metrics_addr=metrics_addr, grpc_addr=grpc_addr)

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"{name} exited ({proc.returncode}) before it was ready:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://{metrics_addr}/readyz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(ready, 30, f"{name} /readyz")
    except BaseException:
        stop(proc)
        raise
    return service


@pytest.fixture(scope="module")
def start_order_svc(kafka: Broker, tmp_path_factory):
    """Factory: starts target/debug/order-svc on free ports, publishing to `topic`."""
    started: list[Service] = []
    folder = tmp_path_factory.mktemp("order-svc")

    def start(topic: str, **env: str) -> Service:
        grpc_addr = f"127.0.0.1:{free_port()}"
        metrics_addr = f"127.0.0.1:{free_port()}"
        # Each instance gets a store of its own: the default (orders.db in the
        # working directory) would outlive the test and its broker.
        store = folder / f"orders-{uuid.uuid4().hex[:8]}.db"
        svc = start_service(
            "order-svc",
            {"GRPC_ADDR": grpc_addr, "KAFKA_BROKERS": kafka.bootstrap, "KAFKA_OPTIONS": kafka.client_options,
             "ORDERS_TOPIC": topic, "DATABASE_URL": f"sqlite://{store}", **env},
            folder, metrics_addr, grpc_addr,
        )
        started.append(svc)
        return svc

    yield start
    for svc in started:
        stop(svc.proc)


@pytest.fixture(scope="module")
def start_notify_svc(kafka: Broker, tmp_path_factory):
    """Factory: starts target/debug/notify-svc consuming `topic` with a unique group."""
    started: list[Service] = []
    folder = tmp_path_factory.mktemp("notify-svc")

    def start(topic: str, dlq_topic: str, **env: str) -> Service:
        metrics_addr = f"127.0.0.1:{free_port()}"
        svc = start_service(
            "notify-svc",
            {"KAFKA_BROKERS": kafka.bootstrap, "KAFKA_OPTIONS": kafka.client_options,
             "ORDERS_TOPIC": topic, "DLQ_TOPIC": dlq_topic,
             "KAFKA_GROUP_ID": f"notify-{uuid.uuid4().hex[:12]}", **env},
            folder, metrics_addr,
        )
        started.append(svc)
        return svc

    yield start
    for svc in started:
        stop(svc.proc)


@pytest.fixture(scope="session")
def buf() -> Callable[..., subprocess.CompletedProcess]:
    """Runs the npm-installed buf (tests/node) with cwd = the repository root
    unless `cwd` is given."""
    if not os.access(BUF, os.X_OK):
        pytest.fail(f"{BUF} is missing: run scripts/install-tools.sh --test (npm ci in tests/node)")

    def run(*args: str, cwd: pathlib.Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    return run


def generate_python(out: pathlib.Path, proto_root: pathlib.Path = PROTO) -> None:
    """Python messages and gRPC stubs for proto/orders/v1, by grpcio-tools' protoc."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.glob("orders/v1/*.proto"))
    assert files, f"no .proto files under {proto_root}/orders/v1"
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", *files])
    assert rc == 0, "grpc_tools.protoc failed"


@dataclasses.dataclass
class Generated:
    """The modules generated from proto/orders/v1."""

    folder: pathlib.Path
    order_pb2: object
    events_pb2: object
    order_service_pb2: object
    order_service_pb2_grpc: object


@pytest.fixture(scope="session")
def pb(tmp_path_factory) -> Generated:
    """Python code generated from proto/ at test time, importable as orders.v1.*."""
    out = tmp_path_factory.mktemp("gen-python")
    generate_python(out)
    sys.path.insert(0, str(out))
    import importlib

    mods = {m: importlib.import_module(f"orders.v1.{m}")
            for m in ("order_pb2", "events_pb2", "order_service_pb2", "order_service_pb2_grpc")}
    assert pathlib.Path(mods["events_pb2"].__file__).is_relative_to(out), "imported stale generated code"
    return Generated(folder=out, **mods)
