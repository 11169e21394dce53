"""The proto contract as a product, checked from outside Rust.

- buf lint and buf breaking (against proto/baseline/orders-v1.binpb) pass, and
  buf breaking does flag a breaking change;
- buf.gen.yaml generates Python and TypeScript with local plugins;
- a Python client (grpcio-tools) and a JavaScript client (protoc-gen-es +
  Connect) generated from proto/ at test time call the real order-svc;
- a Python confluent-kafka consumer decodes the OrderCreated that order-svc
  published, with code generated from proto/, and checks the CloudEvents headers;
- notify-svc handles an OrderCreated written by Python and dead-letters an
  unknown ce_type;
- the golden vectors in proto/testdata/ decode to their JSON and are
  reproduced by proto/testdata/generate.py.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from conftest import NODE_DIR, PROTO, ROOT, wait_until

BASELINE = PROTO / "baseline" / "orders-v1.binpb"
TESTDATA = PROTO / "testdata"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


# --- buf: lint, breaking, generate -------------------------------------------


def test_buf_sees_the_contract_files(buf):
    out = buf("ls-files")
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == [
        "proto/orders/v1/events.proto",
        "proto/orders/v1/order.proto",
        "proto/orders/v1/order_service.proto",
    ]


def test_buf_lint_passes(buf):
    out = buf("lint")
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_breaking_against_the_baseline_passes(buf):
    out = buf("breaking", "--against", str(BASELINE))
    assert out.returncode == 0, out.stdout + out.stderr


def copy_contract(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of buf.yaml and the .proto files to change freely."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(PROTO / "orders", tmp_path / "proto" / "orders")
    return tmp_path


def edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("change", "old", "new", "expect"),
    [
        ("type change", "int64 total_minor = 5;", "string total_minor = 5;", "total_minor"),
        ("field deleted without reserving", "  string request_id = 7;\n", "", "request_id"),
        ("field renamed", "string currency = 4;", "string currency_code = 4;", "currency"),
        ("field renumbered", "string user_id = 2;", "string user_id = 8;", "user_id"),
    ],
)
def test_buf_breaking_flags_a_breaking_change(buf, tmp_path, change, old, new, expect):
    work = copy_contract(tmp_path)
    edit(work / "proto/orders/v1/order.proto", old, new)
    out = buf("breaking", "--against", str(BASELINE), cwd=work)
    assert out.returncode != 0, f"{change} was not flagged:\n{out.stdout}{out.stderr}"
    assert expect in out.stdout + out.stderr


def test_buf_breaking_accepts_an_added_field_and_a_reserved_removal(buf, tmp_path):
    work = copy_contract(tmp_path)
    order = work / "proto/orders/v1/order.proto"
    edit(order, "  string request_id = 7;\n",
         "  reserved 7;\n  reserved \"request_id\";\n  // Where the order came from.\n  string channel = 8;\n")
    lint = buf("lint", cwd=work)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # A removal, even reserved, breaks FILE (generated code loses a field):
    # FILE is strict on purpose; an added field alone passes.
    out = buf("breaking", "--against", str(BASELINE), cwd=work)
    assert out.returncode != 0 and "request_id" in out.stdout + out.stderr
    work2 = copy_contract(tmp_path / "added")
    edit(work2 / "proto/orders/v1/order.proto", "  string request_id = 7;\n",
         "  string request_id = 7;\n  // Where the order came from.\n  string channel = 8;\n")
    out = buf("breaking", "--against", str(BASELINE), cwd=work2)
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_lint_flags_a_badly_named_message(buf, tmp_path):
    work = copy_contract(tmp_path)
    with open(work / "proto/orders/v1/events.proto", "a") as f:
        f.write("\n// Badly named.\nmessage order_shipped {\n  // Id.\n  string ID = 1;\n}\n")
    out = buf("lint", cwd=work)
    assert out.returncode != 0
    assert "order_shipped" in out.stdout + out.stderr


def local_template(tmp_path: pathlib.Path, es_opt: str | None = None) -> pathlib.Path:
    """The repository's buf.gen.yaml without the Go plugins (Go is not installed
    here), writing under tmp_path, with this Python for the Python plugins."""
    template = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    plugins = []
    for plugin in template["plugins"]:
        local = plugin.get("local")
        if isinstance(local, str) and local.startswith("protoc-gen-go"):
            continue
        if isinstance(local, list) and local[0].endswith("python"):
            plugin["local"] = [sys.executable, *local[1:]]
        if "protoc_path" in plugin:
            plugin["protoc_path"] = [sys.executable, *plugin["protoc_path"][1:]]
        if es_opt is not None and "protoc-gen-es" in str(local):
            opts = plugin["opt"] if isinstance(plugin["opt"], list) else [plugin["opt"]]
            plugin["opt"] = [es_opt if o.startswith("target=") else o for o in opts]
        plugin["out"] = str(tmp_path / plugin["out"])
        plugins.append(plugin)
    template["plugins"] = plugins
    path = tmp_path / "buf.gen.yaml"
    path.write_text(yaml.safe_dump(template))
    return path


def test_buf_gen_yaml_generates_python_and_typescript(buf, tmp_path):
    template = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    assert template["version"] == "v2"
    locals_ = [str(p.get("local") or p.get("protoc_builtin")) for p in template["plugins"]]
    assert any("protoc-gen-go-grpc" in p for p in locals_), "Go gRPC stubs missing from buf.gen.yaml"
    assert not any("remote" in p for p in template["plugins"]), "remote plugins are unreachable here"

    out = buf("generate", "--template", str(local_template(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    py = tmp_path / "gen/python/orders/v1"
    for name in ("order_pb2.py", "events_pb2.py", "order_service_pb2.py", "order_service_pb2.pyi"):
        assert (py / name).is_file(), name
    assert "class OrderServiceStub" in (py / "order_service_pb2_grpc.py").read_text()
    ts = (tmp_path / "gen/ts/orders/v1/order_service_pb.ts").read_text()
    assert "export const OrderService" in ts and "createOrder" in ts


# --- clients generated from proto/ call the real order-svc --------------------


@pytest.fixture(scope="module")
def orders_topic(kafka):
    return kafka.unique_topic("orders-contract")


@pytest.fixture(scope="module")
def order_svc(start_order_svc, orders_topic):
    return start_order_svc(orders_topic)


@pytest.fixture
def stub(pb, order_svc):
    import grpc

    channel = grpc.insecure_channel(order_svc.grpc_addr)
    yield pb.order_service_pb2_grpc.OrderServiceStub(channel)
    channel.close()


def new_request(pb, request_id: str | None = None):
    return pb.order_service_pb2.CreateOrderRequest(
        user_id="py-user",
        currency="EUR",
        items=[
            pb.order_pb2.LineItem(sku="PY-1", quantity=3, unit_price_minor=250),
            pb.order_pb2.LineItem(sku="PY-2", quantity=1, unit_price_minor=1000),
        ],
        request_id=request_id or f"py-{uuid.uuid4()}",
    )


def test_python_client_creates_an_order(pb, stub, order_svc):
    request = new_request(pb)
    response = stub.CreateOrder(request, timeout=15)
    order = response.order
    assert UUID_RE.match(order.order_id), order.order_id
    assert order.user_id == "py-user"
    assert order.currency == "EUR"
    assert [(i.sku, i.quantity, i.unit_price_minor) for i in order.items] == [
        ("PY-1", 3, 250), ("PY-2", 1, 1000)]
    assert order.total_minor == 3 * 250 + 1000
    assert order.request_id == request.request_id
    assert abs(order.created_at.ToSeconds() - time.time()) < 120
    # A retry with the same request_id is the same order.
    again = stub.CreateOrder(request, timeout=15)
    assert again.order == order, "a retry with the same request_id is the very same order"
    # Read back from the store: by id, and in the user's newest-first list.
    got = stub.GetOrder(pb.order_service_pb2.GetOrderRequest(order_id=order.order_id), timeout=15)
    assert got.order == order
    page = stub.ListOrders(pb.order_service_pb2.ListOrdersRequest(user_id="py-user", page_size=1), timeout=15)
    assert list(page.orders) == [order], "the newest of the user's orders"


def test_python_client_gets_invalid_argument_for_a_bad_request(pb, stub):
    import grpc

    bad = pb.order_service_pb2.CreateOrderRequest(user_id="", currency="euro")
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateOrder(bad, timeout=15)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    # The field violations travel as google.rpc.Status details.
    trailers = dict(err.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailers, trailers.keys()


@pytest.fixture(scope="module")
def js_client_dir(tmp_path_factory):
    """JavaScript generated from proto/ by the repository's buf.gen.yaml entry
    for protoc-gen-es (emitting JS + .d.ts, since Node 20 does not run .ts),
    with node_modules linked so the generated imports resolve."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed")
    from conftest import BUF

    tmp = tmp_path_factory.mktemp("gen-js")
    out = subprocess.run([str(BUF), "generate", "--template", str(local_template(tmp, "target=js+dts"))],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    (tmp / "node_modules").symlink_to(NODE_DIR / "node_modules", target_is_directory=True)
    gen = tmp / "gen/ts"
    assert (gen / "orders/v1/order_service_pb.js").is_file()
    return gen


def test_javascript_client_creates_an_order(js_client_dir, order_svc):
    request_id = f"js-{uuid.uuid4()}"
    out = subprocess.run(
        ["node", str(NODE_DIR / "create_order.mjs"), str(js_client_dir), order_svc.grpc_addr, request_id],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr + "\n" + order_svc.logs()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    order = result["order"]
    assert UUID_RE.match(order["orderId"]), order
    assert order["userId"] == "ts-user"
    assert order["currency"] == "EUR"
    assert order["totalMinor"] == str(2 * 250 + 1000)  # int64 is a string in proto3 JSON
    assert [i["sku"] for i in order["items"]] == ["TS-1", "TS-2"]
    assert order["requestId"] == request_id
    assert result["invalid"] is not None and result["invalid"]["code"] == "InvalidArgument", result


# --- a Python consumer decodes what order-svc published ----------------------


def consume(bootstrap: str, topic: str, match, timeout: float = 30):
    """Reads `topic` from the beginning until `match(msg)` holds; returns that msg."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"contract-test-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
    })
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen = []

        def found():
            msg = consumer.poll(0.2)
            if msg is None:
                return None
            assert msg.error() is None, msg.error()
            seen.append(msg.key())
            return msg if match(msg) else None

        return wait_until(found, timeout, f"a matching record on {topic} (saw keys {seen})", interval=0)
    finally:
        consumer.close()


def test_python_consumer_decodes_order_created_with_cloudevents_headers(pb, stub, kafka, orders_topic):
    request = new_request(pb)
    order = stub.CreateOrder(request, timeout=15).order

    msg = consume(kafka.bootstrap, orders_topic, lambda m: m.key() == order.order_id.encode())
    event = pb.events_pb2.OrderCreated.FromString(msg.value())
    assert event.order == order, "the event's order differs from what the RPC answered"
    assert UUID_RE.match(event.event_id)
    assert event.occurred_at == order.created_at

    headers = {}
    for name, value in msg.headers() or []:
        headers[name] = value.decode()  # last one wins, as in the Rust consumer
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_id"] == event.event_id
    assert headers["ce_type"] == "orders.v1.OrderCreated"
    assert headers["ce_type"] == pb.events_pb2.OrderCreated.DESCRIPTOR.full_name
    assert headers["ce_source"] == "/order-svc"
    assert headers["content-type"] == "application/protobuf"
    from google.protobuf.timestamp_pb2 import Timestamp

    ce_time = Timestamp()
    ce_time.FromJsonString(headers["ce_time"])  # RFC 3339
    assert ce_time == event.occurred_at, headers["ce_time"]
    assert TRACEPARENT_RE.match(headers["traceparent"]), headers["traceparent"]


# --- notify-svc reads what another stack writes ------------------------------


def test_notify_svc_handles_python_events_and_dead_letters_unknown_types(pb, kafka, start_notify_svc):
    from confluent_kafka import Producer

    topic = kafka.unique_topic("orders-py")
    dlq = kafka.unique_topic("orders-py-dlq")
    notify = start_notify_svc(topic, dlq)

    event = pb.events_pb2.OrderCreated.FromString((TESTDATA / "order_created_v1.bin").read_bytes())
    event.event_id = str(uuid.uuid4())
    event.order.order_id = str(uuid.uuid4())
    ce = {
        "ce_specversion": "1.0",
        "ce_id": event.event_id,
        "ce_type": "orders.v1.OrderCreated",
        "ce_source": "/python-test",
        "ce_time": event.occurred_at.ToJsonString(),
        "content-type": "application/protobuf",
    }
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": False, "acks": "all"})
    producer.produce(topic, key=event.order.order_id, value=event.SerializeToString(), headers=list(ce.items()))
    shipped_key = str(uuid.uuid4())
    shipped = {**ce, "ce_id": str(uuid.uuid4()), "ce_type": "orders.v1.OrderShipped"}
    producer.produce(topic, key=shipped_key, value=event.SerializeToString(), headers=list(shipped.items()))
    assert producer.flush(15) == 0, "records not delivered"

    wait_until(lambda: notify.metric("notifications_sent_total") >= 1, 30,
               f"notify-svc to notify the Python-written OrderCreated\n{notify.logs()}", interval=0.2)

    dead = consume(kafka.bootstrap, dlq, lambda m: m.key() == shipped_key.encode())
    dl_headers = {n: v.decode(errors="replace") for n, v in dead.headers() or []}
    assert dl_headers["dlq.error.class"] == "unknown_type", dl_headers
    assert "orders.v1.OrderShipped" in dl_headers["dlq.error.message"]
    assert dl_headers["dlq.original.topic"] == topic
    assert dl_headers["ce_type"] == "orders.v1.OrderShipped"
    assert dead.value() == event.SerializeToString()
    # Only the OrderCreated was notified; the unknown type never reached a handler.
    assert notify.metric("notifications_sent_total") == 1
    assert notify.metric("events_dead_lettered_total") == 1


# --- golden vectors ---------------------------------------------------------


def test_golden_v1_decodes_to_its_json(pb):
    from google.protobuf import json_format

    raw = (TESTDATA / "order_created_v1.bin").read_bytes()
    event = pb.events_pb2.OrderCreated.FromString(raw)
    expected = json_format.Parse((TESTDATA / "order_created_v1.json").read_text(), pb.events_pb2.OrderCreated())
    assert event == expected
    assert event.order.total_minor == sum(i.quantity * i.unit_price_minor for i in event.order.items) == 4498
    assert event.SerializeToString() == raw, "Python no longer encodes the sample byte for byte"


def test_golden_record_with_unknown_fields_decodes_and_keeps_them(pb):
    from google.protobuf import json_format

    raw = (TESTDATA / "order_created_with_unknown_field.bin").read_bytes()
    v1 = pb.events_pb2.OrderCreated.FromString((TESTDATA / "order_created_v1.bin").read_bytes())
    event = pb.events_pb2.OrderCreated.FromString(raw)
    assert raw != v1.SerializeToString()
    assert json_format.MessageToDict(event) == json_format.MessageToDict(v1)
    # A pass-through consumer re-encodes what it read without losing the new fields.
    assert event.SerializeToString() == raw


def test_golden_vectors_are_reproduced_by_their_generator(tmp_path):
    out = subprocess.run([sys.executable, str(TESTDATA / "generate.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("order_created_v1.bin", "order_created_v1.json", "order_created_with_unknown_field.bin"):
        assert (tmp_path / name).read_bytes() == (TESTDATA / name).read_bytes(), \
            f"{name} differs from proto/testdata/generate.py's output: regenerate deliberately"
