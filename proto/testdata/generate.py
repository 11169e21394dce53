#!/usr/bin/env python3
"""Writes the golden vectors in proto/testdata/ from the .proto files, deliberately.

    .tools/venv/bin/python proto/testdata/generate.py [OUT_DIR]

Run it only when you mean to change the vectors (a new sample, a new field):
the Rust tests (tests/golden.rs) and the Python tests (tests/test_contract.py)
decode the committed files, and the Python tests also check that this script
still reproduces them byte for byte. The files:

- order_created_v1.bin: an OrderCreated as today's producers encode it.
- order_created_v1.json: the same event in the proto3 JSON mapping (field
  names as in the .proto), the expected content of both .bin files.
- order_created_with_unknown_field.bin: the same event as a later producer
  might write it, with fields today's schema does not have: field 100 (a
  string) on OrderCreated and field 101 (a varint) on its Order. Today's
  consumers must still decode it; pass-through consumers should keep them.

Code for the messages is generated at run time with grpcio-tools' protoc, so
the vectors come from proto/ and nothing else.
"""

import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent

# Field numbers no version of orders.v1 uses today (see proto/README.md).
UNKNOWN_EVENT_FIELD = 100
UNKNOWN_EVENT_VALUE = b"added by a later producer"
UNKNOWN_ORDER_FIELD = 101
UNKNOWN_ORDER_VALUE = 7


def generate_python(out: pathlib.Path) -> None:
    """Compiles proto/ to Python modules in `out` with grpcio-tools' protoc."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTO)) for p in PROTO.glob("orders/v1/*.proto"))
    args = ["protoc", f"-I{PROTO}", f"-I{well_known}", f"--python_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def sample(events_pb2, order_pb2):
    """The sample event: two lines, an idempotency key, nanosecond times."""
    created = {"seconds": 1_764_000_000, "nanos": 123_456_789}
    return events_pb2.OrderCreated(
        event_id="01938f4e-5a00-7000-8000-000000000001",
        order=order_pb2.Order(
            order_id="01938f4e-5a00-7000-8000-000000000002",
            user_id="user-42",
            items=[
                order_pb2.LineItem(sku="SKU-1", quantity=2, unit_price_minor=1999),
                order_pb2.LineItem(sku="SKU-2", quantity=1, unit_price_minor=500),
            ],
            currency="EUR",
            total_minor=4498,
            created_at=created,
            request_id="req-1",
        ),
        occurred_at=created,
    )


def with_unknown_fields(event, events_pb2) -> bytes:
    """Encodes `event` with an unknown field at the end of OrderCreated and of
    its Order, keeping known fields in field-number order, as an encoder of a
    later schema version would."""
    order = event.order.SerializeToString() + tag(UNKNOWN_ORDER_FIELD, 0) + varint(
        UNKNOWN_ORDER_VALUE
    )
    return (
        events_pb2.OrderCreated(event_id=event.event_id).SerializeToString()
        + length_delimited(2, order)
        + events_pb2.OrderCreated(occurred_at=event.occurred_at).SerializeToString()
        + length_delimited(UNKNOWN_EVENT_FIELD, UNKNOWN_EVENT_VALUE)
    )


def main(out_dir: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as gen:
        generate_python(pathlib.Path(gen))
        sys.path.insert(0, gen)
        from google.protobuf import json_format
        from orders.v1 import events_pb2, order_pb2

        event = sample(events_pb2, order_pb2)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "order_created_v1.bin").write_bytes(event.SerializeToString(deterministic=True))
        (out_dir / "order_created_v1.json").write_text(
            json_format.MessageToJson(event, preserving_proto_field_name=True, indent=2) + "\n"
        )
        (out_dir / "order_created_with_unknown_field.bin").write_bytes(
            with_unknown_fields(event, events_pb2)
        )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
