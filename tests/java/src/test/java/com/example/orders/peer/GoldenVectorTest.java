package com.example.orders.peer;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.example.orders.v1.LineItem;
import com.example.orders.v1.OrderCreated;
import com.google.protobuf.util.JsonFormat;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;

/**
 * The golden encodings in proto/testdata/ decode with the Java classes generated from proto/,
 * as they do in Rust and Python. Needs no broker, so tests/java/install.sh runs it to fetch
 * everything a test run uses.
 */
class GoldenVectorTest {

  private static Path testdata() {
    String root = System.getProperty("proto.root");
    if (root == null || root.isBlank()) {
      throw new AssertionError("system property proto.root is not set: run through Maven (pom.xml sets it)");
    }
    return Path.of(root, "testdata");
  }

  @Test
  void v1SampleDecodesToItsJson() throws Exception {
    byte[] raw = Files.readAllBytes(testdata().resolve("order_created_v1.bin"));
    OrderCreated event = OrderCreated.parseFrom(raw);

    OrderCreated.Builder expected = OrderCreated.newBuilder();
    JsonFormat.parser().merge(Files.readString(testdata().resolve("order_created_v1.json")), expected);
    assertEquals(expected.build(), event);

    long total = 0;
    for (LineItem item : event.getOrder().getItemsList()) {
      total += item.getQuantity() * item.getUnitPriceMinor();
    }
    assertEquals(event.getOrder().getTotalMinor(), total, "total_minor is not the sum of the lines");
    assertEquals(4498, total);
    assertArrayEquals(raw, event.toByteArray(), "Java no longer encodes the sample byte for byte");
  }

  @Test
  void unknownFieldsAreSkippedAndKept() throws Exception {
    OrderCreated v1 = OrderCreated.parseFrom(Files.readAllBytes(testdata().resolve("order_created_v1.bin")));
    byte[] raw = Files.readAllBytes(testdata().resolve("order_created_with_unknown_field.bin"));
    OrderCreated event = OrderCreated.parseFrom(raw);

    // Known fields read as in v1; the unknown ones survive a round trip.
    assertEquals(JsonFormat.printer().print(v1), JsonFormat.printer().print(event));
    // proto/testdata/generate.py writes field 100 on OrderCreated and 101 on its Order.
    assertTrue(event.getUnknownFields().hasField(100), "OrderCreated's unknown field 100 was dropped");
    assertTrue(event.getOrder().getUnknownFields().hasField(101), "Order's unknown field 101 was dropped");
    assertNotEquals(v1, event);
    assertArrayEquals(raw, event.toByteArray(), "re-encoding lost the unknown fields");
  }
}
