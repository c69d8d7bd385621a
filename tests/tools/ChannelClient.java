// A channel's purchase publisher, written from docs/channels.md alone (the Kafka door), as a channel that
// does not use Python would write it: Kafka's own Java client, the protobuf wire format encoded by hand
// (proto/bubuh/v1/channel_door.proto has two small messages), HMAC-SHA256 from the JDK.
//
// Run with the JDK source launcher (no build step) and the Kafka client jars:
//   java -cp '.local/kafka/libs/*' tests/tools/ChannelClient.java --bootstrap 127.0.0.1:19092 \
//        --topic purchase.submitted --channel-id ch_... --secret <hmac secret> \
//        [--compression none|gzip|snappy|lz4|zstd] \
//        [--client-config client.properties] \
//        [--security-protocol SASL_SSL --sasl-mechanism SCRAM-SHA-512 --sasl-jaas-config '...'] \
//        [--property name=value ...] < orders.tsv
//
// The channel's Kafka credential goes in as producer properties (security.protocol, sasl.mechanism,
// sasl.jaas.config): best in a --client-config file (java.util.Properties format, readable by the
// channel's user alone), since a password on a command line is visible to every user of the machine.
//
// One order per line, tab-separated:
//   channel_order_id <TAB> account_id <TAB> quantity <TAB> amount <TAB> paid_at (RFC 3339) <TAB> payment_ref
//
// Prints "sent N" once every record was acknowledged (acks=all); on failure the error on stderr and
// exit 1 (2: bad arguments or input).
//
// --dry-run prints, per order and without connecting, "<record value hex> <TAB> <bubuh-hmac>"; with
// --event-id, --trace-id and --occurred-at the output is fixed, so it can be compared with the worked
// example of docs/channels.md.

import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.security.SecureRandom;
import java.time.Duration;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public final class ChannelClient {

    static final String PAYLOAD_TYPE = "bubuh.v1.PurchaseSubmitted";
    static final String HEADER_HMAC = "bubuh-hmac";

    private static final class UsageError extends Exception {
        UsageError(String message) {
            super(message);
        }
    }

    record Order(String orderId, String accountId, long quantity, long amount, Instant paidAt, String paymentRef) {
    }

    public static void main(String[] args) {
        PrintStream result = System.out;
        System.setOut(System.err);          // library logging must not reach our one result line
        int code;
        try {
            run(args, result);
            result.flush();
            code = 0;
        } catch (UsageError e) {
            System.err.println("ChannelClient: " + e.getMessage());
            code = 2;
        } catch (Exception e) {
            System.err.println("ChannelClient: failed: " + e);
            for (Throwable c = e.getCause(); c != null; c = c.getCause()) {
                System.err.println("  caused by: " + c);
            }
            code = 1;
        }
        System.exit(code);
    }

    private static void run(String[] args, PrintStream result) throws Exception {
        String bootstrap = null, topic = null, channelId = null, secret = null, compression = "zstd";
        String eventId = null, traceId = null, occurredAt = null;
        boolean dryRun = false;
        Properties extra = new Properties();
        for (int i = 0; i < args.length; i++) {
            String flag = args[i];
            if (flag.equals("--dry-run")) {
                dryRun = true;
                continue;
            }
            if (i + 1 >= args.length) {
                throw new UsageError("missing value for " + flag);
            }
            String value = args[++i];
            switch (flag) {
                case "--bootstrap" -> bootstrap = value;
                case "--topic" -> topic = value;
                case "--channel-id" -> channelId = value;
                case "--secret" -> secret = value;
                case "--compression" -> compression = value;
                case "--security-protocol" -> extra.put("security.protocol", value);
                case "--sasl-mechanism" -> extra.put("sasl.mechanism", value);
                case "--sasl-jaas-config" -> extra.put("sasl.jaas.config", value);
                case "--client-config" -> {
                    try (var in = java.nio.file.Files.newBufferedReader(java.nio.file.Path.of(value))) {
                        extra.load(in);
                    }
                }
                case "--property" -> {
                    int eq = value.indexOf('=');
                    if (eq <= 0) {
                        throw new UsageError("--property needs name=value, got " + value);
                    }
                    extra.put(value.substring(0, eq), value.substring(eq + 1));
                }
                case "--event-id" -> eventId = value;
                case "--trace-id" -> traceId = value;
                case "--occurred-at" -> occurredAt = value;
                default -> throw new UsageError("unknown argument " + flag);
            }
        }
        if (channelId == null || secret == null || (!dryRun && (bootstrap == null || topic == null))) {
            throw new UsageError("usage: ChannelClient --bootstrap HOST:PORT --topic TOPIC --channel-id ID "
                    + "--secret SECRET [--compression C] [--security-protocol P --sasl-mechanism M "
                    + "--sasl-jaas-config J] [--property k=v ...] [--dry-run] < orders.tsv");
        }
        List<Order> orders = readOrders();
        // the key is the secret as given (its ASCII bytes), not hex-decoded
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(secret.getBytes(StandardCharsets.US_ASCII), "HmacSHA256"));
        HexFormat hex = HexFormat.of();     // lowercase

        List<ProducerRecord<byte[], byte[]>> records = new ArrayList<>(orders.size());
        for (Order o : orders) {
            Instant occurred = occurredAt == null ? Instant.now() : OffsetDateTime.parse(occurredAt).toInstant();
            byte[] value = envelope(eventId == null ? UUID.randomUUID().toString() : eventId,
                    traceId == null ? randomHex(16) : traceId, "channel:" + channelId, occurred,
                    purchaseSubmitted(channelId, o));
            String signature = hex.formatHex(mac.doFinal(value));
            if (dryRun) {
                result.println(hex.formatHex(value) + "\t" + signature);
                continue;
            }
            byte[] key = (channelId + "/" + o.accountId()).getBytes(StandardCharsets.UTF_8);
            ProducerRecord<byte[], byte[]> record = new ProducerRecord<>(topic, key, value);
            record.headers().add(HEADER_HMAC, signature.getBytes(StandardCharsets.US_ASCII));   // the only header
            records.add(record);
        }
        if (dryRun) {
            return;
        }
        result.println("sent " + publish(bootstrap, compression, extra, records));
    }

    private static int publish(String bootstrap, String compression, Properties extra,
                               List<ProducerRecord<byte[], byte[]>> records) throws Exception {
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ProducerConfig.CLIENT_ID_CONFIG, "channel-client-java");
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        props.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, compression);
        props.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "20000");
        props.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "60000");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        props.putAll(extra);                // credentials (security.protocol, sasl.*) and anything else
        List<Future<RecordMetadata>> acked = new ArrayList<>(records.size());
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(props)) {
            for (ProducerRecord<byte[], byte[]> r : records) {
                acked.add(producer.send(r));
            }
            producer.flush();
            for (Future<RecordMetadata> f : acked) {
                f.get(60, TimeUnit.SECONDS);    // the broker's error, if any
            }
        }
        return acked.size();
    }

    // --- bubuh.v1.PurchaseSubmitted and bubuh.v1.Envelope, proto3 wire format (default values omitted) ---

    static byte[] purchaseSubmitted(String channelId, Order o) {
        Proto m = new Proto();
        // field 1 purchase_id: left empty on the Kafka door
        m.string(2, channelId);
        m.string(3, o.orderId());
        m.string(4, o.accountId());
        m.int64(5, o.quantity());
        m.int64(6, o.amount());
        m.message(7, timestamp(o.paidAt()));
        m.string(8, o.paymentRef());
        return m.bytes();
    }

    static byte[] envelope(String eventId, String traceId, String producer, Instant occurredAt, byte[] payload) {
        Proto m = new Proto();
        m.string(1, eventId);
        m.string(3, traceId);
        m.string(4, producer);
        m.message(5, timestamp(occurredAt));
        m.string(6, PAYLOAD_TYPE);
        m.bytes(7, payload);
        return m.bytes();
    }

    static byte[] timestamp(Instant t) {
        Proto m = new Proto();
        m.int64(1, t.getEpochSecond());
        m.int64(2, t.getNano());
        return m.bytes();
    }

    /** Just enough of the protobuf encoding: varints and length-delimited fields, in field order. */
    static final class Proto {
        private final ByteArrayOutputStream out = new ByteArrayOutputStream();

        void int64(int field, long v) {
            if (v == 0) {
                return;
            }
            varint(((long) field << 3));           // wire type 0
            varint(v);                              // negatives: ten bytes, two's complement
        }

        void string(int field, String s) {
            if (s != null && !s.isEmpty()) {
                bytes(field, s.getBytes(StandardCharsets.UTF_8));
            }
        }

        void message(int field, byte[] b) {
            varint(((long) field << 3) | 2);       // always present, even when empty
            varint(b.length);
            out.writeBytes(b);
        }

        void bytes(int field, byte[] b) {
            if (b.length > 0) {
                message(field, b);
            }
        }

        private void varint(long v) {
            while ((v & ~0x7FL) != 0) {
                out.write((int) ((v & 0x7F) | 0x80));
                v >>>= 7;
            }
            out.write((int) v);
        }

        byte[] bytes() {
            return out.toByteArray();
        }
    }

    // --- input ---

    private static List<Order> readOrders() throws Exception {
        List<Order> out = new ArrayList<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        int n = 0;
        while ((line = in.readLine()) != null) {
            n++;
            if (line.isBlank()) {
                continue;
            }
            String[] f = line.split("\t", -1);
            if (f.length != 6) {
                throw new UsageError("line " + n + ": expected 6 tab-separated fields, got " + f.length);
            }
            try {
                out.add(new Order(f[0], f[1], Long.parseLong(f[2]), Long.parseLong(f[3]),
                        OffsetDateTime.parse(f[4]).toInstant(), f[5]));
            } catch (RuntimeException e) {
                throw new UsageError("line " + n + ": " + e.getMessage());
            }
        }
        return out;
    }

    private static String randomHex(int bytes) {
        byte[] b = new byte[bytes];
        new SecureRandom().nextBytes(b);
        return HexFormat.of().formatHex(b);
    }
}
