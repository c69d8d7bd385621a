// Publishes records read from stdin with Kafka's own Java producer, so tests can check that the platform
// consumes what a non-Python client sends (every compression codec, idempotent batches, headers).
//
// Run with the JDK source launcher (no build step) and the local stack's Kafka jars:
//   java -cp '.local/kafka/libs/*' tests/tools/RecordProducer.java --bootstrap 127.0.0.1:19092 \
//        --compression zstd [--linger-ms 30000] [--batch-size 1048576] [--client-config client.properties] < records.tsv
// --client-config: a Java properties file with the broker's security settings (security.protocol,
// sasl.mechanism, sasl.jaas.config, ...), as a channel's own client would carry them.
//
// One record per line, tab-separated, binary fields in standard base64:
//   topic <TAB> key_b64 <TAB> value_b64 <TAB> headers
// where headers is a comma-separated list of name=value_b64 (possibly empty; the fourth field may be
// omitted). An empty key or value field is a null key or value. Blank lines are ignored.
//
// On success prints exactly one line "sent N" on stdout once every record was acknowledged (acks=all,
// idempotent). On any failure prints the error on stderr and exits non-zero (2: bad arguments or input,
// 1: Kafka refused or timed out). Library logging never reaches stdout: it is redirected to stderr.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public final class RecordProducer {

    private static final List<String> CODECS = List.of("none", "gzip", "snappy", "lz4", "zstd");

    private static final class UsageError extends Exception {
        UsageError(String message) {
            super(message);
        }
    }

    public static void main(String[] args) {
        // Keep stdout for our one result line: any logger that writes to the console (log4j's default
        // configuration does, on System.out) is created after this and so writes to stderr instead.
        PrintStream result = System.out;
        System.setOut(System.err);
        int code;
        try {
            result.println("sent " + run(args));
            result.flush();
            code = 0;
        } catch (UsageError e) {
            System.err.println("RecordProducer: " + e.getMessage());
            code = 2;
        } catch (Exception e) {
            System.err.println("RecordProducer: failed: " + e);
            Throwable cause = e.getCause();
            while (cause != null) {
                System.err.println("  caused by: " + cause);
                cause = cause.getCause();
            }
            code = 1;
        }
        System.exit(code);
    }

    private static int run(String[] args) throws Exception {
        String bootstrap = null;
        String compression = null;
        String clientConfig = null;     // a properties file: security.protocol, sasl.*, ... (the broker's door)
        // Records are held until flush() (or a full batch), which then sends each partition's records as
        // one batch: a short linger splits batches whenever the cold JVM is slow on the first send.
        int lingerMs = 30000;
        int batchSize = 1 << 20;
        for (int i = 0; i < args.length; i++) {
            String flag = args[i];
            if (i + 1 >= args.length) {
                throw new UsageError("missing value for " + flag);
            }
            String value = args[++i];
            switch (flag) {
                case "--bootstrap" -> bootstrap = value;
                case "--compression" -> compression = value;
                case "--linger-ms" -> lingerMs = parseInt(flag, value);
                case "--batch-size" -> batchSize = parseInt(flag, value);
                case "--client-config" -> clientConfig = value;
                default -> throw new UsageError("unknown argument " + flag);
            }
        }
        if (bootstrap == null || compression == null) {
            throw new UsageError("usage: RecordProducer --bootstrap HOST:PORT --compression "
                    + String.join("|", CODECS) + " [--linger-ms N] [--batch-size N] [--client-config FILE]");
        }
        if (!CODECS.contains(compression)) {
            throw new UsageError("unknown compression " + compression + " (one of " + CODECS + ")");
        }

        List<ProducerRecord<byte[], byte[]>> records = readRecords();

        Properties props = new Properties();
        if (clientConfig != null) {
            try (java.io.Reader in = java.nio.file.Files.newBufferedReader(java.nio.file.Path.of(clientConfig))) {
                props.load(in);
            }
        }
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ProducerConfig.CLIENT_ID_CONFIG, "bubuh-tests-java-producer");
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        props.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, compression);
        props.put(ProducerConfig.LINGER_MS_CONFIG, Integer.toString(lingerMs));
        props.put(ProducerConfig.BATCH_SIZE_CONFIG, Integer.toString(batchSize));
        props.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "20000");
        props.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, "15000");
        props.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Integer.toString(30000 + lingerMs));
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());

        AtomicReference<Exception> firstError = new AtomicReference<>();
        List<Future<RecordMetadata>> acked = new ArrayList<>(records.size());
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(props);
        try {
            // held until flush() (linger), so the records of one partition share a batch and its compression
            for (ProducerRecord<byte[], byte[]> record : records) {
                acked.add(producer.send(record, (metadata, error) -> {
                    if (error != null) {
                        firstError.compareAndSet(null, error);
                    }
                }));
                if (firstError.get() != null) {
                    throw firstError.get();      // e.g. no such topic: do not wait max.block.ms per record
                }
            }
            producer.flush();
            for (Future<RecordMetadata> f : acked) {
                f.get(60, TimeUnit.SECONDS);     // throws ExecutionException with the broker's error
            }
            if (firstError.get() != null) {
                throw firstError.get();
            }
        } finally {
            producer.close(Duration.ofSeconds(10));
        }
        return acked.size();
    }

    private static List<ProducerRecord<byte[], byte[]>> readRecords() throws Exception {
        Base64.Decoder b64 = Base64.getDecoder();
        List<ProducerRecord<byte[], byte[]>> out = new ArrayList<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        int lineNo = 0;
        while ((line = in.readLine()) != null) {
            lineNo++;
            if (line.isBlank()) {
                continue;
            }
            String[] f = line.split("\t", -1);
            if (f.length < 3 || f.length > 4 || f[0].isEmpty()) {
                throw new UsageError("line " + lineNo + ": expected topic<TAB>key_b64<TAB>value_b64[<TAB>headers]");
            }
            try {
                byte[] key = f[1].isEmpty() ? null : b64.decode(f[1]);
                byte[] value = f[2].isEmpty() ? null : b64.decode(f[2]);
                ProducerRecord<byte[], byte[]> record = new ProducerRecord<>(f[0], key, value);
                if (f.length == 4 && !f[3].isEmpty()) {
                    for (String header : f[3].split(",", -1)) {
                        int eq = header.indexOf('=');
                        if (eq <= 0) {
                            throw new UsageError("line " + lineNo + ": header " + header + " is not name=value_b64");
                        }
                        record.headers().add(new RecordHeader(header.substring(0, eq),
                                b64.decode(header.substring(eq + 1))));
                    }
                }
                out.add(record);
            } catch (IllegalArgumentException e) {
                throw new UsageError("line " + lineNo + ": bad base64: " + e.getMessage());
            }
        }
        return out;
    }

    private static int parseInt(String flag, String value) throws UsageError {
        try {
            return Integer.parseInt(value);
        } catch (NumberFormatException e) {
            throw new UsageError(flag + " needs a number, got " + value);
        }
    }
}
