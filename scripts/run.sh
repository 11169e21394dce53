#!/usr/bin/env bash
# Runs the whole system on this machine, end to end: installs the broker if
# needed, builds the services (release), starts a Tansu broker with sqlite
# storage (in .run/), creates the topics, starts notify-svc and order-svc (its
# order store in .run/orders.db), places one order, reads it back with
# `orderctl get` and shows its notification, then keeps everything running
# until Ctrl+C, which stops it all cleanly.
#
#   scripts/run.sh            # ports: gRPC 50051, metrics 9090 / 9091, Kafka 9092
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

BROKER_PORT=${BROKER_PORT:-9092}
GRPC_PORT=${GRPC_PORT:-50051}
ORDER_METRICS_PORT=${ORDER_METRICS_PORT:-9090}
NOTIFY_METRICS_PORT=${NOTIFY_METRICS_PORT:-9091}
run="$root/.run"
mkdir -p "$run/tansu"

scripts/install-tools.sh
echo "==> building the services (release)"
cargo build --release --locked -p order-svc -p notify-svc -p orderctl
bin="$root/target/release"

# Children run in their own sessions (setsid) so that Ctrl+C reaches only this
# script, which then stops them in order.
tail_pid="" order_pid="" notify_pid="" broker_pid=""
stop() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping: order-svc drains and flushes, notify-svc commits and leaves the group, then the broker"
  for pid in $tail_pid $order_pid $notify_pid $broker_pid; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  echo "==> stopped; broker data kept in .run/tansu, orders in .run/orders.db (delete .run to start afresh)"
}
trap stop INT TERM EXIT

wait_port() { # host port what
  for _ in $(seq 1 300); do (echo >"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.1; done
  echo "$3 did not open port $2" >&2; return 1
}
wait_ready() { # url what
  for _ in $(seq 1 300); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$2 is not ready ($1)" >&2; return 1
}

if (echo >"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null; then
  echo "port $BROKER_PORT is taken: stop what runs there or set BROKER_PORT" >&2; exit 1
fi
echo "==> starting Tansu on 127.0.0.1:$BROKER_PORT (sqlite storage in .run/tansu)"
url="tcp://127.0.0.1:$BROKER_PORT"
# Tansu resolves the sqlite path against its working directory.
(cd "$run/tansu" && exec setsid tansu broker --listener-url "$url" --advertised-listener-url "$url" \
  --storage-engine sqlite://tansu.db >"$run/tansu.log" 2>&1) &
broker_pid=$!
wait_port 127.0.0.1 "$BROKER_PORT" tansu
for topic in orders:3 orders.dlq:1; do
  tansu topic create "${topic%%:*}" --partitions "${topic##*:}" --broker "$url" >/dev/null 2>&1 || true
done

export KAFKA_BROKERS="127.0.0.1:$BROKER_PORT"
# What Tansu needs from its clients (the file says why).
export KAFKA_OPTIONS="$(grep -v '^#' "$root/scripts/tansu-kafka-options")"
echo "==> starting notify-svc (metrics :$NOTIFY_METRICS_PORT) and order-svc (gRPC :$GRPC_PORT, metrics :$ORDER_METRICS_PORT)"
METRICS_ADDR="0.0.0.0:$NOTIFY_METRICS_PORT" setsid "$bin/notify-svc" >"$run/notify-svc.log" 2>&1 &
notify_pid=$!
DATABASE_URL="sqlite://$run/orders.db" GRPC_ADDR="0.0.0.0:$GRPC_PORT" METRICS_ADDR="0.0.0.0:$ORDER_METRICS_PORT" \
  setsid "$bin/order-svc" >"$run/order-svc.log" 2>&1 &
order_pid=$!
wait_ready "http://127.0.0.1:$ORDER_METRICS_PORT/readyz" order-svc
wait_ready "http://127.0.0.1:$NOTIFY_METRICS_PORT/readyz" notify-svc

echo "==> placing an order"
out=$("$bin/orderctl" --addr "http://127.0.0.1:$GRPC_PORT" create --user demo-user --currency EUR \
  --item SKU-BOOK:2:1999 --item SKU-PEN:1:250)
echo "    $out"
order_id=$(sed -n 's/^order_id=\([^ ]*\).*/\1/p' <<<"$out")
echo "==> reading it back (orderctl get $order_id)"
"$bin/orderctl" --addr "http://127.0.0.1:$GRPC_PORT" get "$order_id" | sed 's/^/    /'
for _ in $(seq 1 100); do grep -q "order_id=$order_id" "$run/notify-svc.log" && break; sleep 0.1; done
echo "==> notify-svc:"
grep "order_id=$order_id" "$run/notify-svc.log" | grep notification | sed 's/^/    /'

cat <<MSG

The system is running. Try:
  grpcurl -plaintext localhost:$GRPC_PORT list
  grpcurl -plaintext -d '{"user_id":"u-1","currency":"EUR","items":[{"sku":"SKU-1","quantity":1,"unit_price_minor":500}]}' \\
    localhost:$GRPC_PORT orders.v1.OrderService/CreateOrder
  $bin/orderctl list --user demo-user
  curl -s localhost:$ORDER_METRICS_PORT/metrics | grep -E 'orders_created_total|outbox_pending' 
Logs follow (.run/*.log). Ctrl+C stops everything.

MSG
tail -n 0 -F "$run/order-svc.log" "$run/notify-svc.log" &
tail_pid=$!
wait "$tail_pid"
