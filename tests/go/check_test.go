package peer

import (
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	ordersv1 "example.com/orders/gen/go/orders/v1"
)

// goodRecord is a record as the contract describes it, built here without
// order-svc, so that the checker itself can be checked.
func goodRecord(t *testing.T) (kafka.Message, *ordersv1.Order) {
	t.Helper()
	created := timestamppb.New(time.Date(2026, 3, 1, 12, 30, 45, 123456000, time.UTC))
	order := &ordersv1.Order{
		OrderId:    "01950a2b-3c4d-7e5f-8a9b-0c1d2e3f4a5b",
		UserId:     "u1",
		Items:      []*ordersv1.LineItem{{Sku: "S", Quantity: 2, UnitPriceMinor: 5}},
		Currency:   "EUR",
		TotalMinor: 10,
		CreatedAt:  created,
	}
	const eventID = "01950a2b-3c4d-7e5f-8a9b-aaaaaaaaaaaa"
	value, err := proto.Marshal(&ordersv1.OrderCreated{EventId: eventID, Order: order, OccurredAt: created})
	if err != nil {
		t.Fatal(err)
	}
	return kafka.Message{
		Topic: "orders",
		Key:   []byte(order.GetOrderId()),
		Value: value,
		Headers: []kafka.Header{
			{Key: "ce_specversion", Value: []byte("1.0")},
			{Key: "ce_id", Value: []byte(eventID)},
			{Key: "ce_type", Value: []byte("orders.v1.OrderCreated")},
			{Key: "ce_source", Value: []byte("/order-svc")},
			{Key: "ce_time", Value: []byte("2026-03-01T12:30:45.123456Z")},
			{Key: "content-type", Value: []byte("application/protobuf")},
			{Key: "traceparent", Value: []byte("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")},
		},
	}, order
}

func withHeader(msg kafka.Message, name, value string) kafka.Message {
	var headers []kafka.Header
	for _, h := range msg.Headers {
		if h.Key != name {
			headers = append(headers, h)
		}
	}
	if value != "" {
		headers = append(headers, kafka.Header{Key: name, Value: []byte(value)})
	}
	msg.Headers = headers
	return msg
}

// TestRecordCheckCatchesBrokenRecords proves that the peer test can fail: each
// way a record can break the contract is reported, naming what broke.
func TestRecordCheckCatchesBrokenRecords(t *testing.T) {
	good, order := goodRecord(t)
	if _, problems := checkRecord(good, "orders", order, "/order-svc"); len(problems) > 0 {
		t.Fatalf("a record that follows the contract is refused: %q", problems)
	}
	otherOrder := proto.Clone(order).(*ordersv1.Order)
	otherOrder.TotalMinor = 11
	duplicated := good
	duplicated.Headers = append(append([]kafka.Header{}, good.Headers...),
		kafka.Header{Key: "ce_type", Value: []byte("orders.v1.OrderShipped")})

	cases := []struct {
		name   string
		msg    kafka.Message
		order  *ordersv1.Order
		expect string
	}{
		{"no ce_type", withHeader(good, "ce_type", ""), order, "ce_type is missing"},
		{"other ce_type", withHeader(good, "ce_type", "orders.v1.OrderShipped"), order, "ce_type"},
		{"ce_type twice", duplicated, order, "ce_type appears 2 times"},
		{"no ce_specversion", withHeader(good, "ce_specversion", ""), order, "ce_specversion"},
		{"ce_id is not the event id", withHeader(good, "ce_id", "x"), order, "ce_id"},
		{"other ce_source", withHeader(good, "ce_source", "/elsewhere"), order, "ce_source"},
		{"ce_time not RFC 3339", withHeader(good, "ce_time", "2026-03-01 12:30:45"), order, "RFC 3339"},
		{"ce_time not occurred_at", withHeader(good, "ce_time", "2026-03-01T12:30:46Z"), order, "ce_time"},
		{"JSON content-type", withHeader(good, "content-type", "application/json"), order, "content-type"},
		{"no traceparent", withHeader(good, "traceparent", ""), order, "traceparent"},
		{"malformed traceparent", withHeader(good, "traceparent", "00-abc-def-01"), order, "traceparent"},
		{"zero trace id", withHeader(good, "traceparent",
			"00-00000000000000000000000000000000-00f067aa0ba902b7-01"), order, "all-zero"},
		{"key is not the order id", func() kafka.Message { m := good; m.Key = []byte("k"); return m }(), order, "key"},
		{"value is not protobuf", func() kafka.Message { m := good; m.Value = []byte{0xff, 0xff}; return m }(),
			order, "does not decode"},
		{"event differs from the answer", good, otherOrder, "differs from what CreateOrder answered"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, problems := checkRecord(tc.msg, "orders", tc.order, "/order-svc")
			if !strings.Contains(strings.Join(problems, "\n"), tc.expect) {
				t.Errorf("want a problem containing %q, got %q", tc.expect, problems)
			}
		})
	}
}
