"""A user's view: grpcurl (a real one, 1.8.6, which speaks only reflection
v1alpha) against the running order-svc with no proto files, and the
notification for exactly that order in notify-svc's output, as text and as
JSON (LOG_FORMAT=json)."""

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import wait_until

GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRPCURL), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def system(kafka, start_order_svc, start_notify_svc):
    topic = kafka.unique_topic("grpcurl", partitions=3)
    dlq = kafka.create_topic(f"{topic}.dlq")
    order_svc = start_order_svc(topic)
    text = start_notify_svc(topic, dlq)
    as_json = start_notify_svc(topic, f"{dlq}", LOG_FORMAT="json")
    return order_svc, text, as_json


def test_grpcurl_lists_and_describes_without_proto_files(system):
    order_svc, _, _ = system
    listed = grpcurl("-plaintext", order_svc.grpc_addr, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "orders.v1.OrderService" in services
    assert "grpc.health.v1.Health" in services
    described = grpcurl("-plaintext", order_svc.grpc_addr, "describe", "orders.v1.OrderService")
    assert described.returncode == 0, described.stderr
    assert "rpc CreateOrder ( .orders.v1.CreateOrderRequest ) returns ( .orders.v1.CreateOrderResponse )" in described.stdout
    assert "rpc GetOrder ( .orders.v1.GetOrderRequest ) returns ( .orders.v1.GetOrderResponse )" in described.stdout
    assert "rpc ListOrders ( .orders.v1.ListOrdersRequest ) returns ( .orders.v1.ListOrdersResponse )" in described.stdout
    message = grpcurl("-plaintext", order_svc.grpc_addr, "describe", "orders.v1.LineItem")
    assert "int64 unit_price_minor = 3;" in message.stdout, message.stdout
    health = grpcurl("-plaintext", order_svc.grpc_addr, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"SERVING"' in health.stdout, health.stdout + health.stderr


def test_grpcurl_create_order_is_notified(system):
    order_svc, text, as_json = system
    request = {"user_id": "grpcurl-user", "currency": "EUR",
               "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price_minor": 1250}]}
    created = grpcurl("-plaintext", "-H", f"traceparent: 00-{TRACE_ID}-b7ad6b7169203331-01",
                      "-d", json.dumps(request), order_svc.grpc_addr, "orders.v1.OrderService/CreateOrder")
    assert created.returncode == 0, created.stderr
    order = json.loads(created.stdout)["order"]
    assert order["userId"] == "grpcurl-user"
    assert order["totalMinor"] == "2500"
    order_id = order["orderId"]
    got = grpcurl("-plaintext", "-d", json.dumps({"order_id": order_id}), order_svc.grpc_addr,
                  "orders.v1.OrderService/GetOrder")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["order"] == order, "GetOrder reads back what CreateOrder answered"
    listed = grpcurl("-plaintext", "-d", json.dumps({"user_id": "grpcurl-user", "page_size": 1}),
                     order_svc.grpc_addr, "orders.v1.OrderService/ListOrders")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["orders"][0]["orderId"] == order_id

    # Text logs: one line naming exactly this order, its user, total and trace.
    def text_line():
        return [l for l in text.logs().splitlines() if f"order_id={order_id}" in l and "notification" in l]
    lines = wait_until(text_line, 10, f"notify-svc to log order_id={order_id}")
    assert "user_id=grpcurl-user" in lines[0] and "total_minor=2500" in lines[0], lines[0]
    assert f"trace_id={TRACE_ID}" in lines[0], lines[0]

    # JSON logs (another group on the same topic): one object per line.
    def json_line():
        for line in as_json.logs().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                pytest.fail(f"not JSON: {line}")
            if obj.get("order_id") == order_id:
                return obj
        return None
    obj = wait_until(json_line, 10, "a JSON notification line")
    assert obj["user_id"] == "grpcurl-user" and obj["total_minor"] == 2500, obj
    assert obj["trace_id"] == TRACE_ID, obj
    assert obj["level"] == "INFO"


def test_grpcurl_invalid_request_names_the_fields(system):
    order_svc, _, _ = system
    bad = {"user_id": "", "currency": "eur", "items": [{"sku": "", "quantity": 0}]}
    refused = grpcurl("-plaintext", "-d", json.dumps(bad), order_svc.grpc_addr, "orders.v1.OrderService/CreateOrder")
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert "InvalidArgument" in out, out
    for field in ["user_id", "currency", "items[0].sku", "items[0].quantity"]:
        assert field in out, out
