// Calls OrderService.CreateOrder on a running order-svc through a client
// generated from proto/ by protoc-gen-es (protobuf-es v2) and the Connect
// runtime's gRPC transport over HTTP/2, then sends an invalid request.
//
//   node tests/node/create_order.mjs GEN_DIR HOST:PORT REQUEST_ID
//
// GEN_DIR holds the generated orders/v1/*_pb.js. Prints one JSON line:
// { "order": <CreateOrderResponse.order in proto3 JSON>, "invalid": { "code", "message" } }.
import { pathToFileURL } from "node:url";
import { join } from "node:path";
import { toJson } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

const [genDir, addr, requestId] = process.argv.slice(2);
if (!genDir || !addr || !requestId) {
  console.error("usage: create_order.mjs GEN_DIR HOST:PORT REQUEST_ID");
  process.exit(2);
}
const svc = await import(pathToFileURL(join(genDir, "orders/v1/order_service_pb.js")).href);

const transport = createGrpcTransport({ baseUrl: `http://${addr}`, httpVersion: "2" });
const client = createClient(svc.OrderService, transport);

const res = await client.createOrder(
  {
    userId: "ts-user",
    currency: "EUR",
    items: [
      { sku: "TS-1", quantity: 2, unitPriceMinor: 250n },
      { sku: "TS-2", quantity: 1, unitPriceMinor: 1000n },
    ],
    requestId,
  },
  { timeoutMs: 10_000 },
);

let invalid = null;
try {
  await client.createOrder({ userId: "", currency: "euro", items: [] }, { timeoutMs: 10_000 });
} catch (err) {
  const e = ConnectError.from(err);
  invalid = { code: Code[e.code], message: e.rawMessage };
}

console.log(
  JSON.stringify({
    order: toJson(svc.CreateOrderResponseSchema, res).order,
    invalid,
  }),
);
