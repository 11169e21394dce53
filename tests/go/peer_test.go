// Package peer checks order-svc from a Go stack that shares nothing with it
// but proto/: a grpc-go client creates orders and a kafka-go consumer-group
// member reads their OrderCreated records, both through code that buf
// generates from proto/orders/v1 (see README.md).
//
// The targets come from the environment and a missing one fails the tests:
// a peer test that silently skips proves nothing.
//
//	ORDER_SVC_ADDR  host:port of order-svc's gRPC listener (plaintext)
//	KAFKA_BROKERS   bootstrap servers, comma separated
//	ORDERS_TOPIC    the topic that order-svc publishes to
//	CE_SOURCE       the ce_source order-svc is configured with (default /order-svc)
package peer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	ordersv1 "example.com/orders/gen/go/orders/v1"
)

var (
	uuidRE        = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	traceparentRE = regexp.MustCompile(`^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$`)
)

// How long one RPC, and the whole consumption, may take: generous, because
// the first JoinGroup of a new group waits for the broker's rebalance.
const (
	rpcTimeout     = 15 * time.Second
	consumeTimeout = 90 * time.Second
	// How long MEMBER_ID_REQUIRED answers are borne before the broker is
	// taken not to speak kafka-go's JoinGroup versions.
	memberIDRequiredGrace = 10 * time.Second
)

// brokerGap starts the failure message of a broker that kafka-go's consumer
// group cannot work with, so that a caller can tell it from a contract failure.
const brokerGap = "BROKER GAP"

func requireEnv(t *testing.T, name string) string {
	t.Helper()
	v := strings.TrimSpace(os.Getenv(name))
	if v == "" {
		t.Fatalf("environment variable %s is not set: the Go peer tests need a running broker and order-svc "+
			"(ORDER_SVC_ADDR, KAFKA_BROKERS, ORDERS_TOPIC); tests/test_peer_go.py starts both and sets them", name)
	}
	return v
}

func newClient(t *testing.T) ordersv1.OrderServiceClient {
	t.Helper()
	addr := requireEnv(t, "ORDER_SVC_ADDR")
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient(%q): %v", addr, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return ordersv1.NewOrderServiceClient(conn)
}

func createOrder(t *testing.T, client ordersv1.OrderServiceClient, req *ordersv1.CreateOrderRequest) *ordersv1.Order {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), rpcTimeout)
	defer cancel()
	resp, err := client.CreateOrder(ctx, req)
	if err != nil {
		t.Fatalf("CreateOrder(%s): %v", protojson.Format(req), err)
	}
	if resp.GetOrder() == nil {
		t.Fatalf("CreateOrder(%s) answered OK without an order", protojson.Format(req))
	}
	return resp.GetOrder()
}

func uniqueSuffix() string {
	return fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano())
}

// checkAnswer compares an accepted order with the request it answers.
func checkAnswer(t *testing.T, req *ordersv1.CreateOrderRequest, order *ordersv1.Order) {
	t.Helper()
	if !uuidRE.MatchString(order.GetOrderId()) {
		t.Errorf("order_id %q is not a lower-case UUID", order.GetOrderId())
	}
	if order.GetUserId() != req.GetUserId() || order.GetCurrency() != req.GetCurrency() ||
		order.GetRequestId() != req.GetRequestId() {
		t.Errorf("order (user_id %q, currency %q, request_id %q) does not echo the request (%q, %q, %q)",
			order.GetUserId(), order.GetCurrency(), order.GetRequestId(),
			req.GetUserId(), req.GetCurrency(), req.GetRequestId())
	}
	if len(order.GetItems()) != len(req.GetItems()) {
		t.Fatalf("order has %d items, the request %d", len(order.GetItems()), len(req.GetItems()))
	}
	var total int64
	for i, item := range req.GetItems() {
		if !proto.Equal(order.GetItems()[i], item) {
			t.Errorf("items[%d] = %s, want %s (the order keeps the request's items in order)",
				i, protojson.Format(order.GetItems()[i]), protojson.Format(item))
		}
		total += int64(item.GetQuantity()) * item.GetUnitPriceMinor()
	}
	if order.GetTotalMinor() != total {
		t.Errorf("total_minor = %d, want %d (the sum of quantity * unit_price_minor)", order.GetTotalMinor(), total)
	}
	if created := order.GetCreatedAt().AsTime(); time.Since(created).Abs() > 2*time.Minute {
		t.Errorf("created_at %s is not close to now", created.Format(time.RFC3339Nano))
	}
}

// TestCreateOrderPublishesOrderCreated creates orders with grpc-go, then reads
// their records with kafka-go in a consumer group of its own, from the first
// offset, and checks each record's key, value and CloudEvents headers.
func TestCreateOrderPublishesOrderCreated(t *testing.T) {
	brokers := strings.Split(requireEnv(t, "KAFKA_BROKERS"), ",")
	topic := requireEnv(t, "ORDERS_TOPIC")
	ceSource := os.Getenv("CE_SOURCE")
	if ceSource == "" {
		ceSource = "/order-svc"
	}
	client := newClient(t)

	suffix := uniqueSuffix()
	requests := []*ordersv1.CreateOrderRequest{
		{UserId: "go-user-1", Currency: "EUR", RequestId: "go-" + suffix + "-1", Items: []*ordersv1.LineItem{
			{Sku: "GO-1", Quantity: 2, UnitPriceMinor: 1250},
			{Sku: "GO-2", Quantity: 1, UnitPriceMinor: 999},
		}},
		{UserId: "go-user-2", Currency: "USD", RequestId: "go-" + suffix + "-2", Items: []*ordersv1.LineItem{
			{Sku: "GO-FREE", Quantity: 5, UnitPriceMinor: 0},
		}},
		// No request_id: the service picks a time-ordered id.
		{UserId: "go-user-3", Currency: "JPY", Items: []*ordersv1.LineItem{
			{Sku: "GO-3", Quantity: 1, UnitPriceMinor: 4200},
		}},
	}
	want := map[string]*ordersv1.Order{}
	for _, req := range requests {
		order := createOrder(t, client, req)
		checkAnswer(t, req, order)
		want[order.GetOrderId()] = order
	}
	if len(want) != len(requests) {
		t.Fatalf("%d requests yielded %d distinct order ids", len(requests), len(want))
	}
	// A retry with the same request_id is the same order.
	again := createOrder(t, client, requests[0])
	if first := want[again.GetOrderId()]; first == nil || !proto.Equal(first, again) {
		t.Errorf("a retry with request_id %q answered %s, not the first answer", requests[0].GetRequestId(),
			protojson.Format(again))
	}

	records := consume(t, brokers, topic, want)
	for id, order := range want {
		eventIDs := map[string]bool{}
		for _, msg := range records[id] {
			eventID, problems := checkRecord(msg, topic, order, ceSource)
			for _, problem := range problems {
				t.Errorf("record %s/%d@%d (key %q): %s", msg.Topic, msg.Partition, msg.Offset, msg.Key, problem)
			}
			eventIDs[eventID] = true
		}
		if len(eventIDs) != 1 {
			t.Errorf("order %s: %d records carry %d different event ids, want one event id: %v",
				id, len(records[id]), len(eventIDs), eventIDs)
		}
	}
}

// consume joins a new consumer group on topic, reads from the first offset
// until every order in want has at least one record, commits what it read and
// returns the records by key. Records of other orders are skipped.
func consume(t *testing.T, brokers []string, topic string, want map[string]*ordersv1.Order) map[string][]kafka.Message {
	t.Helper()
	group := "go-peer-" + uniqueSuffix()
	reader := kafka.NewReader(kafka.ReaderConfig{
		Brokers:           brokers,
		GroupID:           group,
		Topic:             topic,
		StartOffset:       kafka.FirstOffset,
		MinBytes:          1,
		MaxBytes:          10 << 20,
		MaxWait:           500 * time.Millisecond,
		SessionTimeout:    6 * time.Second,
		HeartbeatInterval: time.Second,
		RebalanceTimeout:  10 * time.Second,
		JoinGroupBackoff:  500 * time.Millisecond,
		ReadBackoffMin:    50 * time.Millisecond,
		ReadBackoffMax:    500 * time.Millisecond,
		ErrorLogger: kafka.LoggerFunc(func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "kafka-go error: "+format+"\n", args...)
		}),
	})
	defer func() {
		if err := reader.Close(); err != nil {
			t.Errorf("closing the kafka-go reader: %v", err)
		}
	}()

	ctx, cancel := context.WithTimeout(t.Context(), consumeTimeout)
	defer cancel()
	started := time.Now()
	found := map[string][]kafka.Message{}
	var read []kafka.Message
	var otherKeys []string
	var groupErrors []string
	for len(found) < len(want) {
		msg, err := reader.FetchMessage(ctx)
		if err != nil && ctx.Err() == nil {
			// The reader hands over group errors (a coordinator that is not
			// ready yet, a rebalance) and retries by itself: keep fetching.
			groupErrors = append(groupErrors, err.Error())
			// kafka-go joins with JoinGroup v1/v2 and drops the member id of a
			// MEMBER_ID_REQUIRED answer, which KIP-394 allows only from v4 on:
			// against a broker that sends it anyway it would retry forever.
			if errors.Is(err, kafka.MemberIDRequired) && time.Since(started) > memberIDRequiredGrace {
				t.Fatalf("%s: the broker keeps answering kafka-go's JoinGroup (v1/v2) with MEMBER_ID_REQUIRED, "+
					"which KIP-394 reserves for JoinGroup v4 and later, so kafka-go cannot join group %s "+
					"(Tansu 0.6 does this; Apache Kafka does not). Last error: %v", brokerGap, group, err)
			}
			continue
		}
		if err != nil {
			var missing []string
			for id := range want {
				if found[id] == nil {
					missing = append(missing, id)
				}
			}
			stats := reader.Stats()
			t.Fatalf("reading %s as group %s: %v\nno record yet for orders %v; read %d records (other keys: %q)\n"+
				"errors on the way: %q\n"+
				"kafka-go stats: dials=%d fetches=%d messages=%d errors=%d rebalances=%d offset=%d lag=%d",
				topic, group, err, missing, len(read), otherKeys, lastErrors(groupErrors, 5),
				stats.Dials, stats.Fetches, stats.Messages, stats.Errors, stats.Rebalances, stats.Offset, stats.Lag)
		}
		read = append(read, msg)
		key := string(msg.Key)
		if want[key] == nil {
			otherKeys = append(otherKeys, key)
			continue
		}
		found[key] = append(found[key], msg)
	}
	// Committing is part of being a well-behaved group member: the broker must
	// accept this peer's offsets too.
	commitCtx, cancelCommit := context.WithTimeout(t.Context(), rpcTimeout)
	defer cancelCommit()
	if err := reader.CommitMessages(commitCtx, read...); err != nil {
		t.Errorf("committing %d records as group %s: %v", len(read), group, err)
	}
	return found
}

func lastErrors(errs []string, n int) []string {
	return errs[max(0, len(errs)-n):]
}

// checkRecord checks one record against the order it is keyed by: it returns
// the record's event id and what is wrong with the record, one line each.
func checkRecord(msg kafka.Message, topic string, order *ordersv1.Order, ceSource string) (string, []string) {
	var problems []string
	fail := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	if msg.Topic != topic {
		fail("topic %q, want %q", msg.Topic, topic)
	}
	if string(msg.Key) != order.GetOrderId() {
		fail("key %q is not the order id %q", msg.Key, order.GetOrderId())
	}

	headers := map[string][]string{}
	for _, h := range msg.Headers {
		headers[h.Key] = append(headers[h.Key], string(h.Value))
	}
	header := func(name string) string {
		values := headers[name]
		switch len(values) {
		case 0:
			fail("header %s is missing (headers: %v)", name, headers)
			return ""
		case 1:
			return values[0]
		default:
			fail("header %s appears %d times: %q", name, len(values), values)
			return values[len(values)-1]
		}
	}

	// Route on ce_type before decoding, as the contract tells consumers to.
	eventName := string((&ordersv1.OrderCreated{}).ProtoReflect().Descriptor().FullName())
	if ceType := header("ce_type"); ceType != "orders.v1.OrderCreated" || ceType != eventName {
		fail("ce_type = %q, want %q (the full name of the generated OrderCreated, %q)",
			ceType, "orders.v1.OrderCreated", eventName)
	}
	if ct := header("content-type"); ct != "application/protobuf" {
		fail("content-type = %q, want application/protobuf", ct)
	}
	if v := header("ce_specversion"); v != "1.0" {
		fail("ce_specversion = %q, want 1.0", v)
	}
	if v := header("ce_source"); v != ceSource {
		fail("ce_source = %q, want %q", v, ceSource)
	}
	ceID := header("ce_id")
	ceTime := header("ce_time")
	traceparent := header("traceparent")

	if m := traceparentRE.FindStringSubmatch(traceparent); m == nil {
		fail("traceparent %q is not W3C trace context (00-<32 hex>-<16 hex>-<2 hex>)", traceparent)
	} else if strings.Trim(m[1], "0") == "" || strings.Trim(m[2], "0") == "" {
		fail("traceparent %q has an all-zero trace or span id, which W3C forbids", traceparent)
	}

	var event ordersv1.OrderCreated
	if err := proto.Unmarshal(msg.Value, &event); err != nil {
		fail("value does not decode as orders.v1.OrderCreated: %v", err)
		return "", problems
	}
	if !uuidRE.MatchString(event.GetEventId()) {
		fail("event_id %q is not a lower-case UUID", event.GetEventId())
	}
	if ceID != event.GetEventId() {
		fail("ce_id = %q, want the event_id %q", ceID, event.GetEventId())
	}
	if !proto.Equal(event.GetOrder(), order) {
		fail("the event's order differs from what CreateOrder answered:\n event: %s\n   rpc: %s",
			protojson.Format(event.GetOrder()), protojson.Format(order))
	}
	if event.GetOccurredAt() == nil || !proto.Equal(event.GetOccurredAt(), order.GetCreatedAt()) {
		fail("occurred_at %v differs from the order's created_at %v", event.GetOccurredAt(), order.GetCreatedAt())
	}
	if at, err := time.Parse(time.RFC3339Nano, ceTime); err != nil {
		fail("ce_time %q is not RFC 3339: %v", ceTime, err)
	} else if !at.Equal(event.GetOccurredAt().AsTime()) {
		fail("ce_time %s differs from occurred_at %s", ceTime, event.GetOccurredAt().AsTime().Format(time.RFC3339Nano))
	}
	return event.GetEventId(), problems
}

// TestCreateOrderRefusalNamesTheBadFields sends invalid requests and checks
// that each INVALID_ARGUMENT carries google.rpc.BadRequest details naming
// exactly the bad fields, and that the message names them too.
func TestCreateOrderRefusalNamesTheBadFields(t *testing.T) {
	client := newClient(t)
	item := func(sku string, quantity uint32, price int64) *ordersv1.LineItem {
		return &ordersv1.LineItem{Sku: sku, Quantity: quantity, UnitPriceMinor: price}
	}
	cases := []struct {
		name   string
		req    *ordersv1.CreateOrderRequest
		fields []string
	}{
		{"empty user and bad currency",
			&ordersv1.CreateOrderRequest{UserId: "", Currency: "euro", Items: []*ordersv1.LineItem{item("GO-1", 1, 100)}},
			[]string{"currency", "user_id"}},
		{"no items",
			&ordersv1.CreateOrderRequest{UserId: "go-user", Currency: "EUR"},
			[]string{"items"}},
		{"bad lines",
			&ordersv1.CreateOrderRequest{UserId: "go-user", Currency: "EUR", Items: []*ordersv1.LineItem{
				item("GO-1", 1, -5), item("GO-2", 0, 100), item("", 1, 100)}},
			[]string{"items[0].unit_price_minor", "items[1].quantity", "items[2].sku"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), rpcTimeout)
			defer cancel()
			resp, err := client.CreateOrder(ctx, tc.req)
			if err == nil {
				t.Fatalf("CreateOrder(%s) was accepted: %s", protojson.Format(tc.req), protojson.Format(resp))
			}
			st, ok := status.FromError(err)
			if !ok {
				t.Fatalf("CreateOrder failed without a gRPC status: %v", err)
			}
			if st.Code() != codes.InvalidArgument {
				t.Fatalf("code %s, want InvalidArgument (%v)", st.Code(), err)
			}
			var badRequests []*errdetails.BadRequest
			for _, detail := range st.Details() {
				switch d := detail.(type) {
				case *errdetails.BadRequest:
					badRequests = append(badRequests, d)
				case error:
					t.Errorf("a status detail does not decode: %v", d)
				}
			}
			if len(badRequests) != 1 {
				t.Fatalf("%d google.rpc.BadRequest details, want 1 (details: %v)", len(badRequests), st.Details())
			}
			var fields []string
			for _, v := range badRequests[0].GetFieldViolations() {
				fields = append(fields, v.GetField())
				if strings.TrimSpace(v.GetDescription()) == "" {
					t.Errorf("the violation of %q has no description", v.GetField())
				}
			}
			slices.Sort(fields)
			if !slices.Equal(fields, tc.fields) {
				t.Errorf("BadRequest names fields %q, want %q", fields, tc.fields)
			}
			for _, field := range tc.fields {
				if !strings.Contains(st.Message(), field) {
					t.Errorf("the status message %q does not name %s", st.Message(), field)
				}
			}
		})
	}
}
