"""compose.yaml's broker and services, run without Docker.

There is no Docker engine where this runs, so this starts what compose.yaml
describes from its own settings: the `kafka` service's KRaft broker from its
`KAFKA_*` environment (translated to server.properties the way the
apache/kafka image does), on the Apache Kafka jars of the same version as the
image (scripts/install-tools.sh --kafka), the topics `kafka-init` creates, the
`postgres` service from its `POSTGRES_*` environment (the image's rules, on
Debian's PostgreSQL that scripts/install-tools.sh --test installs), and
order-svc (as many replicas as compose.yaml runs) and notify-svc with the
environment compose.yaml gives them. Only
host names and ports change: containers' names and fixed ports become
127.0.0.1 and free ports. Nothing is copied from compose.yaml into this file,
so when compose.yaml changes, this test runs the change.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid

import grpc
import pytest
import yaml

from conftest import ROOT, free_port, start_service, stop, tail, wait_until

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
KAFKA_VERSION = re.search(r"<kafka.version>(.+?)</kafka.version>",
                          (ROOT / "scripts" / "kafka" / "pom.xml").read_text()).group(1)
KAFKA_LIBS = ROOT / ".tools" / f"kafka-{KAFKA_VERSION}" / "libs"


def image_env_to_properties(env: dict) -> dict[str, str]:
    """The apache/kafka image's rule: KAFKA_FOO_BAR -> foo.bar, with `___`
    for `-` and `__` for `_`; CLUSTER_ID is for formatting only."""
    props = {}
    for key, value in env.items():
        if not key.startswith("KAFKA_"):
            continue
        name = key[len("KAFKA_"):].lower().replace("___", "-").replace("__", "\0").replace("_", ".")
        props[name.replace("\0", "_")] = str(value)
    return props


class Addresses:
    """Maps compose's host:port pairs to 127.0.0.1 and a free port each, the
    same port for the same compose port."""

    def __init__(self, hosts: set[str]):
        self.hosts = hosts
        self.ports: dict[int, int] = {}

    def port(self, port: int) -> int:
        return self.ports.setdefault(port, free_port())

    def rewrite(self, text: str) -> str:
        def one(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            if host and host not in self.hosts:
                return m.group(0)
            return f"127.0.0.1:{self.port(port)}"

        return re.sub(r"(?<![\w.-])([A-Za-z0-9.-]*):(\d{2,5})\b", one, text)


def compose_hosts() -> set[str]:
    hosts = {"localhost", "0.0.0.0"}
    for name, service in COMPOSE["services"].items():
        hosts.add(name)
        if "hostname" in service:
            hosts.add(service["hostname"])
    return hosts


def created_topics() -> list[tuple[str, int, int]]:
    """(topic, partitions, replication factor) of each `kafka-topics.sh
    --create` in kafka-init's command."""
    script = "\n".join(COMPOSE["services"]["kafka-init"]["command"])
    topics = []
    for line in script.splitlines():
        words = shlex.split(line)
        if not words or not words[0].endswith("kafka-topics.sh") or "--create" not in words:
            continue
        arg = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
        topics.append((arg["--topic"], int(arg["--partitions"]), int(arg["--replication-factor"])))
    return topics


@pytest.fixture(scope="module")
def compose_kafka(tmp_path_factory):
    if not (KAFKA_LIBS / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        pytest.fail(f"Apache Kafka {KAFKA_VERSION}'s jars are missing: run scripts/install-tools.sh --kafka")
    service = COMPOSE["services"]["kafka"]
    env = service["environment"]
    addresses = Addresses(compose_hosts())
    folder = tmp_path_factory.mktemp("compose-kafka")
    props = image_env_to_properties(env)
    for key in ("listeners", "advertised.listeners", "controller.quorum.voters",
                "controller.quorum.bootstrap.servers"):
        if key in props:
            props[key] = addresses.rewrite(props[key])
    props["log.dirs"] = str(folder / "data")
    properties = folder / "server.properties"
    properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    classpath = f"{KAFKA_LIBS}/*"
    formatted = subprocess.run(
        ["java", "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", str(env["CLUSTER_ID"]),
         "-c", str(properties), "--ignore-formatted"]
        + ([] if "controller.quorum.voters" in props else ["--standalone"]),
        capture_output=True, text=True, timeout=120)
    assert formatted.returncode == 0, f"format failed:\n{formatted.stdout}{formatted.stderr}"
    log = folder / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["java", "-Xms256m", "-Xmx512m", "-XX:+UseSerialGC",
             f"-Dlog4j2.configurationFile={ROOT / 'scripts' / 'kafka' / 'log4j2.properties'}",
             "-cp", classpath, "kafka.Kafka", str(properties)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    from confluent_kafka.admin import AdminClient, NewTopic

    # Clients on the compose network use the INTERNAL listener, which the
    # services' KAFKA_BROKERS names.
    bootstrap = addresses.rewrite(COMPOSE["services"]["order-svc"]["environment"]["KAFKA_BROKERS"])
    admin = AdminClient({"bootstrap.servers": bootstrap})

    def answers():
        if proc.poll() is not None:
            pytest.fail(f"the broker exited ({proc.returncode}):\n{tail(log)}")
        try:
            admin.list_topics(timeout=2)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    try:
        wait_until(answers, 120, "the compose broker to answer", interval=0.5)
        topics = created_topics()
        assert topics, "kafka-init creates no topics"
        futures = admin.create_topics([NewTopic(t, num_partitions=p, replication_factor=r) for t, p, r in topics])
        for future in futures.values():
            future.result(timeout=60)
        yield addresses, props, bootstrap, folder
    finally:
        stop(proc, grace=20)


def postgres_bin() -> pathlib.Path:
    for version in sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version / "initdb").is_file():
            return version
    pytest.fail("PostgreSQL's initdb is missing: run scripts/install-tools.sh --test (apt-get install postgresql)")


@pytest.fixture(scope="module")
def compose_postgres(compose_kafka):
    """The `postgres` service as the image sets it up: POSTGRES_USER is the
    superuser with POSTGRES_PASSWORD (password authentication over TCP), and
    POSTGRES_DB exists; on the port compose's 5432 maps to here."""
    addresses = compose_kafka[0]
    env = COMPOSE["services"]["postgres"]["environment"]
    bindir = postgres_bin()
    root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if root else []
    # Not under pytest's tmp dir: that one is private to root, and the server
    # runs as the postgres user when the tests run as root.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="compose-postgres-"))
    if root:
        shutil.chown(folder, "postgres", "postgres")
    pwfile = folder / "pw"
    pwfile.write_text(str(env["POSTGRES_PASSWORD"]) + "\n")
    if root:
        shutil.chown(pwfile, "postgres", "postgres")
    data = folder / "data"
    def run(args: list[str], timeout: int) -> None:
        done = subprocess.run(run_as + args, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}{done.stderr}"

    run([str(bindir / "initdb"), "-D", str(data), "-U", str(env["POSTGRES_USER"]), "--pwfile", str(pwfile),
         "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"], 120)
    port = addresses.port(5432)
    log = folder / "postgres.log"
    run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
         "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], 90)
    try:
        run([str(bindir / "createdb"), "-h", str(folder), "-p", str(port), "-U", str(env["POSTGRES_USER"]),
             str(env["POSTGRES_DB"])], 60)
        yield port
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def compose_service_env(name: str, addresses: Addresses) -> dict[str, str]:
    return {k: addresses.rewrite(str(v)) for k, v in COMPOSE["services"][name]["environment"].items()}


def test_compose_kafka_image_and_the_installed_broker_are_one_version():
    for name in ("kafka", "kafka-init"):
        image = COMPOSE["services"][name]["image"]
        assert image == f"apache/kafka:{KAFKA_VERSION}", f"{name} runs {image}; scripts/kafka/pom.xml pins {KAFKA_VERSION}"


def test_the_broker_runs_with_compose_settings_and_the_topics_kafka_init_creates(compose_kafka):
    addresses, props, bootstrap, _ = compose_kafka
    from confluent_kafka.admin import AdminClient, ConfigResource

    assert props["process.roles"] == "broker,controller"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(timeout=10)
    for topic, partitions, _ in created_topics():
        assert len(metadata.topics[topic].partitions) == partitions
    broker = ConfigResource(ConfigResource.Type.BROKER, props["node.id"])
    configs = admin.describe_configs([broker])[broker].result(timeout=10)
    # The settings that matter to the services, as the running broker reports them.
    assert configs["auto.create.topics.enable"].value == props["auto.create.topics.enable"]
    assert configs["offsets.topic.replication.factor"].value == props["offsets.topic.replication.factor"]
    # A topic nobody created stays uncreated (auto-create is off).
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 3000})
    errors = []
    producer.produce(f"nobody-{uuid.uuid4().hex[:8]}", b"x", on_delivery=lambda err, _: errors.append(err))
    producer.flush(10)
    assert errors and errors[0] is not None, "a record to an uncreated topic must fail"


def test_both_services_with_compose_environment_place_and_notify_an_order(compose_kafka, compose_postgres, pb,
                                                                          tmp_path):
    addresses, _, _, _ = compose_kafka
    order_env = compose_service_env("order-svc", addresses)
    notify_env = compose_service_env("notify-svc", addresses)
    replicas = COMPOSE["services"]["order-svc"].get("deploy", {}).get("replicas", 1)
    assert replicas >= 2, "compose.yaml runs several order-svc instances on one store"
    notify = start_service("notify-svc", notify_env, tmp_path, notify_env["METRICS_ADDR"])
    # Each replica has its own container, so its own ports; here, its own free ports.
    instances = []
    for i in range(replicas):
        env = dict(order_env)
        if i:
            env["GRPC_ADDR"] = f"127.0.0.1:{free_port()}"
            env["METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
        instances.append(start_service("order-svc", env, tmp_path, env["METRICS_ADDR"], env["GRPC_ADDR"]))
    try:
        request = pb.order_service_pb2.CreateOrderRequest(
            user_id="compose-user", currency="EUR", request_id=f"compose-{uuid.uuid4().hex[:8]}",
            items=[pb.order_pb2.LineItem(sku="BOOK-1", quantity=2, unit_price_minor=1250)])
        answers = []
        for instance in instances:
            with grpc.insecure_channel(instance.grpc_addr) as channel:
                stub = pb.order_service_pb2_grpc.OrderServiceStub(channel)
                answers.append(stub.CreateOrder(request, timeout=20).order)
        order = answers[0]
        assert order.order_id
        assert all(a == order for a in answers), "every replica answers the one order of the key"
        with grpc.insecure_channel(instances[-1].grpc_addr) as channel:
            stub = pb.order_service_pb2_grpc.OrderServiceStub(channel)
            got = stub.GetOrder(pb.order_service_pb2.GetOrderRequest(order_id=order.order_id), timeout=20).order
        assert got == order, "read back from the shared store"

        def notified():
            for line in notify.log.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if json.dumps(entry).find(order.order_id) >= 0 and "notification" in json.dumps(entry):
                    return entry
            return None

        entry = wait_until(notified, 60, f"notify-svc to notify order {order.order_id}")
        # LOG_FORMAT=json from compose.yaml: the notification is one JSON object.
        assert entry
        assert notify.metric("notifications_sent_total") >= 1
    finally:
        for instance in instances:
            stop(instance.proc)
        stop(notify.proc)
