package com.example.orders.peer;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.example.orders.v1.CreateOrderRequest;
import com.example.orders.v1.LineItem;
import com.example.orders.v1.Order;
import com.example.orders.v1.OrderCreated;
import com.example.orders.v1.OrderServiceGrpc;
import com.google.protobuf.Any;
import com.google.protobuf.Timestamp;
import com.google.rpc.BadRequest;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.regex.Pattern;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * order-svc as a Java client and a Java consumer see it, with code generated from proto/ alone.
 *
 * <p>Targets come from the environment: {@code ORDER_SVC_ADDR} (host:port of order-svc's gRPC
 * listener, plaintext), {@code KAFKA_BROKERS} and {@code ORDERS_TOPIC} (where that order-svc
 * publishes). {@code EXPECTED_CE_SOURCE} is the {@code ce_source} order-svc is configured with
 * ({@code /order-svc} when unset). A missing target fails the run: a peer test that skips itself
 * would pass without checking anything.
 */
class OrderServicePeerTest {

  private static final Pattern UUID_RE =
      Pattern.compile("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$");
  private static final Pattern TRACEPARENT_RE =
      Pattern.compile("^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$");
  // RFC 3339 date-time: full date, 'T', time with optional fraction, 'Z' or a numeric offset.
  private static final Pattern RFC3339_RE = Pattern.compile(
      "^\\d{4}-\\d{2}-\\d{2}[Tt]\\d{2}:\\d{2}:\\d{2}(\\.\\d+)?([Zz]|[+-]\\d{2}:\\d{2})$");
  private static final Duration CONSUME_TIMEOUT = Duration.ofSeconds(45);
  private static final long CALL_DEADLINE_SECONDS = 15;

  private static String brokers;
  private static String topic;
  private static String expectedSource;
  private static ManagedChannel channel;
  private static OrderServiceGrpc.OrderServiceBlockingStub stub;

  private static String required(String name, String what) {
    String value = System.getenv(name);
    if (value == null || value.isBlank()) {
      fail(name + " is not set: it must name " + what
          + " (tests/test_peer_java.py sets it when it starts a broker and order-svc)");
    }
    return value.trim();
  }

  @BeforeAll
  static void connect() {
    String address = required("ORDER_SVC_ADDR", "order-svc's gRPC listener, host:port");
    brokers = required("KAFKA_BROKERS", "the Kafka bootstrap servers order-svc publishes to");
    topic = required("ORDERS_TOPIC", "the topic order-svc publishes OrderCreated records to");
    String source = System.getenv("EXPECTED_CE_SOURCE");
    expectedSource = source == null || source.isBlank() ? "/order-svc" : source;
    channel = ManagedChannelBuilder.forTarget(address).usePlaintext().build();
    stub = OrderServiceGrpc.newBlockingStub(channel);
  }

  @AfterAll
  static void disconnect() throws InterruptedException {
    if (channel != null) {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  private static OrderServiceGrpc.OrderServiceBlockingStub call() {
    return stub.withDeadlineAfter(CALL_DEADLINE_SECONDS, TimeUnit.SECONDS);
  }

  private static LineItem item(String sku, int quantity, long unitPriceMinor) {
    return LineItem.newBuilder().setSku(sku).setQuantity(quantity).setUnitPriceMinor(unitPriceMinor).build();
  }

  private static CreateOrderRequest request(String requestId) {
    return CreateOrderRequest.newBuilder()
        .setUserId("java-peer-" + UUID.randomUUID())
        .setCurrency("EUR")
        .addItems(item("BOOK-1", 2, 1250))
        .addItems(item("PEN-7", 3, 199))
        .setRequestId(requestId)
        .build();
  }

  private static Instant instant(Timestamp t) {
    return Instant.ofEpochSecond(t.getSeconds(), t.getNanos());
  }

  private static String hex(int bytes) {
    byte[] b = new byte[bytes];
    ThreadLocalRandom.current().nextBytes(b);
    StringBuilder s = new StringBuilder();
    for (byte x : b) {
      s.append(String.format("%02x", x));
    }
    return s.toString();
  }

  /** What the RPC answered, checked against the request. */
  private static void checkAnswer(CreateOrderRequest request, Order order) {
    assertTrue(UUID_RE.matcher(order.getOrderId()).matches(), "order_id is not a UUID: " + order.getOrderId());
    assertEquals(request.getUserId(), order.getUserId());
    assertEquals(request.getCurrency(), order.getCurrency());
    assertEquals(request.getItemsList(), order.getItemsList(), "items differ from the request, or are reordered");
    assertEquals(request.getRequestId(), order.getRequestId());
    assertEquals(2 * 1250 + 3 * 199, order.getTotalMinor(), "total_minor is not the sum of the lines");
    assertTrue(order.hasCreatedAt(), "created_at is not set");
    Instant created = instant(order.getCreatedAt());
    assertTrue(Duration.between(created, Instant.now()).abs().compareTo(Duration.ofMinutes(5)) < 0,
        "created_at is not now: " + created);
  }

  /**
   * Reads the topic from the beginning in a consumer group of its own until a record keyed by
   * each of {@code orderIds} has arrived; returns the first such record of each.
   */
  private static Map<String, ConsumerRecord<byte[], byte[]>> consume(Set<String> orderIds) {
    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
    props.put(ConsumerConfig.GROUP_ID_CONFIG, "java-peer-" + UUID.randomUUID());
    props.put(ConsumerConfig.CLIENT_ID_CONFIG, "java-peer-test");
    // The classic protocol: what every broker version speaks (KIP-848's is newer).
    props.put(ConsumerConfig.GROUP_PROTOCOL_CONFIG, "classic");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    // A short session joins the group sooner; a short fetch wait keeps polls quick on brokers
    // that wait out fetch.max.wait.ms even when records are there.
    props.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, "6000");
    props.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, "1000");
    props.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, "100");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());

    Map<String, ConsumerRecord<byte[], byte[]>> found = new HashMap<>();
    List<String> seen = new ArrayList<>();
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      consumer.subscribe(List.of(topic));
      long deadline = System.nanoTime() + CONSUME_TIMEOUT.toNanos();
      while (found.size() < orderIds.size()) {
        if (System.nanoTime() > deadline) {
          Set<String> missing = new HashSet<>(orderIds);
          missing.removeAll(found.keySet());
          fail("no record on " + topic + " after " + CONSUME_TIMEOUT.toSeconds() + " s for orders " + missing
              + " (saw keys " + seen + ", assigned " + consumer.assignment() + ")");
        }
        for (ConsumerRecord<byte[], byte[]> record : consumer.poll(Duration.ofMillis(200))) {
          String key = record.key() == null ? null : new String(record.key(), StandardCharsets.UTF_8);
          seen.add(key);
          if (key != null && orderIds.contains(key)) {
            found.putIfAbsent(key, record);
          }
        }
      }
      // The group's own position, kept by the broker: a restarted peer would resume here.
      consumer.commitSync(Duration.ofSeconds(10));
      Map<TopicPartition, OffsetAndMetadata> committed =
          consumer.committed(consumer.assignment(), Duration.ofSeconds(10));
      for (ConsumerRecord<byte[], byte[]> record : found.values()) {
        OffsetAndMetadata at = committed.get(new TopicPartition(record.topic(), record.partition()));
        assertNotNull(at, "no offset committed for partition " + record.partition());
        assertTrue(at.offset() > record.offset(),
            "committed offset " + at.offset() + " is not past record " + record.offset());
      }
    }
    return found;
  }

  /** Header values by name, decoded as UTF-8; the last of a repeated name wins. */
  private static Map<String, String> headers(ConsumerRecord<byte[], byte[]> record) {
    Map<String, String> headers = new LinkedHashMap<>();
    for (Header h : record.headers()) {
      headers.put(h.key(), h.value() == null ? null : new String(h.value(), StandardCharsets.UTF_8));
    }
    return headers;
  }

  private static String header(Map<String, String> headers, String name) {
    String value = headers.get(name);
    assertNotNull(value, "header " + name + " is missing (headers: " + headers.keySet() + ")");
    return value;
  }

  @Test
  void ordersCreatedOverGrpcArriveOnTheTopicAsOrderCreatedWithCloudEventsHeaders() throws Exception {
    // A caller's W3C trace context continues into the event.
    String traceId = hex(16);
    Metadata trace = new Metadata();
    trace.put(Metadata.Key.of("traceparent", Metadata.ASCII_STRING_MARSHALLER),
        "00-" + traceId + "-" + hex(8) + "-01");

    CreateOrderRequest plain = request("");
    CreateOrderRequest keyed = request("java-peer-" + UUID.randomUUID());
    CreateOrderRequest traced = request("");
    Map<String, CreateOrderRequest> requests = new LinkedHashMap<>();
    Map<String, Order> answers = new LinkedHashMap<>();
    for (CreateOrderRequest r : List.of(plain, keyed)) {
      Order order = call().createOrder(r).getOrder();
      checkAnswer(r, order);
      requests.put(order.getOrderId(), r);
      answers.put(order.getOrderId(), order);
    }
    Order tracedOrder = call().withInterceptors(MetadataUtils.newAttachHeadersInterceptor(trace))
        .createOrder(traced).getOrder();
    checkAnswer(traced, tracedOrder);
    requests.put(tracedOrder.getOrderId(), traced);
    answers.put(tracedOrder.getOrderId(), tracedOrder);
    assertEquals(3, answers.size(), "two calls got the same order id: " + answers.keySet());

    // The same user_id and request_id again: the same order id.
    Order keyedOrder = answers.values().stream()
        .filter(o -> !o.getRequestId().isEmpty()).findFirst().orElseThrow();
    assertEquals(keyedOrder.getOrderId(), call().createOrder(keyed).getOrder().getOrderId(),
        "a replayed request_id got another order id");

    Map<String, ConsumerRecord<byte[], byte[]>> records = consume(answers.keySet());

    Set<String> eventIds = new HashSet<>();
    for (Map.Entry<String, ConsumerRecord<byte[], byte[]>> entry : records.entrySet()) {
      String orderId = entry.getKey();
      ConsumerRecord<byte[], byte[]> record = entry.getValue();
      String where = " (order " + orderId + ", partition " + record.partition() + ", offset " + record.offset() + ")";

      assertEquals(orderId, new String(record.key(), StandardCharsets.UTF_8), "key is not the order id" + where);
      OrderCreated event = OrderCreated.parseFrom(record.value());
      assertTrue(event.getUnknownFields().asMap().isEmpty(),
          "the event has fields proto/ does not know: " + event.getUnknownFields() + where);
      assertEquals(answers.get(orderId), event.getOrder(), "the event's order differs from the RPC's answer" + where);
      assertTrue(UUID_RE.matcher(event.getEventId()).matches(), "event_id is not a UUID: " + event.getEventId() + where);
      assertTrue(eventIds.add(event.getEventId()), "two orders share event_id " + event.getEventId());
      assertEquals(event.getOrder().getCreatedAt(), event.getOccurredAt(), "occurred_at is not created_at" + where);

      Map<String, String> headers = headers(record);
      assertEquals("1.0", header(headers, "ce_specversion"), "ce_specversion" + where);
      assertEquals(event.getEventId(), header(headers, "ce_id"), "ce_id is not the event_id" + where);
      assertEquals("orders.v1.OrderCreated", header(headers, "ce_type"), "ce_type" + where);
      assertEquals(OrderCreated.getDescriptor().getFullName(), header(headers, "ce_type"),
          "ce_type is not the full name of the message in the value" + where);
      assertEquals(expectedSource, header(headers, "ce_source"), "ce_source" + where);
      assertEquals("application/protobuf", header(headers, "content-type"), "content-type" + where);

      String ceTime = header(headers, "ce_time");
      assertTrue(RFC3339_RE.matcher(ceTime).matches(), "ce_time is not RFC 3339: " + ceTime + where);
      Instant time = OffsetDateTime.parse(ceTime, DateTimeFormatter.ISO_OFFSET_DATE_TIME).toInstant();
      assertEquals(instant(event.getOccurredAt()), time, "ce_time is not occurred_at: " + ceTime + where);

      String traceparent = header(headers, "traceparent");
      var tp = TRACEPARENT_RE.matcher(traceparent);
      assertTrue(tp.matches(), "traceparent is not W3C trace context: " + traceparent + where);
      assertNotEquals("0".repeat(32), tp.group(1), "traceparent has the invalid all-zero trace id" + where);
      assertNotEquals("0".repeat(16), tp.group(2), "traceparent has the invalid all-zero parent id" + where);
      if (orderId.equals(tracedOrder.getOrderId())) {
        assertEquals(traceId, tp.group(1), "the caller's trace was not continued into the event" + where);
      } else {
        assertNotEquals(traceId, tp.group(1), "an untraced call's event carries another call's trace" + where);
      }
    }
  }

  @Test
  void anInvalidOrderIsRefusedWithBadRequestDetailsNamingEachField() throws Exception {
    CreateOrderRequest bad = CreateOrderRequest.newBuilder()
        .setUserId("")
        .setCurrency("eur")
        .addItems(item("", 0, -1))
        .build();
    StatusRuntimeException refused =
        assertThrows(StatusRuntimeException.class, () -> call().createOrder(bad), "an invalid order was accepted");
    assertEquals(Status.Code.INVALID_ARGUMENT, refused.getStatus().getCode(), refused.toString());

    com.google.rpc.Status status = StatusProto.fromThrowable(refused);
    assertNotNull(status, "no grpc-status-details-bin on the refusal: " + refused);
    assertEquals(Status.Code.INVALID_ARGUMENT.value(), status.getCode());
    BadRequest badRequest = null;
    for (Any detail : status.getDetailsList()) {
      if (detail.is(BadRequest.class)) {
        badRequest = detail.unpack(BadRequest.class);
      }
    }
    assertNotNull(badRequest, "no google.rpc.BadRequest among the details: " + status.getDetailsList());

    Set<String> fields = new HashSet<>();
    for (BadRequest.FieldViolation v : badRequest.getFieldViolationsList()) {
      fields.add(v.getField());
      assertFalse(v.getDescription().isBlank(), "violation of " + v.getField() + " does not say why");
      assertTrue(refused.getStatus().getDescription().contains(v.getField()),
          "the message does not name " + v.getField() + ": " + refused.getStatus().getDescription());
    }
    assertEquals(Set.of("user_id", "currency", "items[0].sku", "items[0].quantity", "items[0].unit_price_minor"),
        fields);
  }
}
