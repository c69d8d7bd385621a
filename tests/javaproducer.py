"""Records published by Kafka's own Java producer (``tests/tools/RecordProducer.java``), for tests that
must see what a non-Python channel sends: every compression codec, idempotent multi-record batches.

It runs with the JDK's source launcher (no build step, nothing written to the repository) on the jars the
local stack already fetched (``deploy/local/kafka.sh``: ``$BUBUH_LOCAL_DIR/kafka/libs``, java from PATH).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from services.kernel import kafka_auth
from services.kernel.events import Outgoing
from services.kernel.settings import REPO_ROOT, Settings

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
SOURCE = REPO_ROOT / "tests" / "tools" / "RecordProducer.java"


class JavaKafkaUnavailable(RuntimeError):
    """No java on PATH, or the local stack's Kafka jars were never fetched."""


def kafka_home(settings: Settings | None = None) -> Path:
    """Where deploy/local/kafka.sh keeps Kafka: ``$BUBUH_LOCAL_DIR/kafka`` (default ``.local/kafka``)."""
    local = os.environ.get("BUBUH_LOCAL_DIR")
    return Path(local) / "kafka" if local else (settings or Settings()).local_dir / "kafka"


def java_and_libs(settings: Settings | None = None) -> tuple[str, Path]:
    """The java binary and the Kafka libs dir, or JavaKafkaUnavailable saying what to do."""
    java = shutil.which("java")
    if java is None:
        raise JavaKafkaUnavailable("java not found on PATH: install Java 17 "
                                   "(Debian: apt-get install openjdk-17-jre-headless)")
    libs = kafka_home(settings) / "libs"
    if not (libs / ".complete").exists() or not any(libs.glob("kafka-clients-*.jar")):
        raise JavaKafkaUnavailable(f"no Kafka jars in {libs}: run deploy/local/kafka.sh fetch (or stack.sh up)")
    return java, libs


def run_java(settings: Settings, main: str, *args: str, stdin: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """``java -cp <libs>/* MAIN ARGS`` (MAIN: a class, or a .java file for the source launcher)."""
    java, libs = java_and_libs(settings)
    # short-lived tools: C1 only and the serial collector start faster (and load a busy machine less)
    command = [java, "-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", f"{libs}/*", main, *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def _b64(data: bytes | None, what: str) -> str:
    if data is None:
        return ""                       # the program reads an empty field as null
    if not data:
        raise ValueError(f"an empty (non-null) {what} cannot be expressed to RecordProducer")
    return base64.b64encode(data).decode()


def _line(rec: Outgoing) -> str:
    headers = []
    for name, value in rec.headers:
        if not name or re.search(r"[,=\t\n]", name):
            raise ValueError(f"header name {name!r} cannot be expressed to RecordProducer")
        headers.append(f"{name}={base64.b64encode(value or b'').decode()}")
    return "\t".join([rec.topic, _b64(rec.key, "key"), _b64(rec.value, "value"), ",".join(headers)])


def publish_with_java(settings: Settings, records: list[Outgoing], compression: str, *,
                      linger_ms: int | None = None, batch_size: int | None = None, timeout: float = 120,
                      credential: tuple[str, str] | None = None) -> None:
    """Publish ``records`` with Kafka's Java producer (acks=all, idempotent, ``compression``); returns once
    every one is acknowledged, raises with the program's stderr otherwise. It authenticates as the settings'
    principal, or with ``credential`` (a channel's)."""
    if compression not in CODECS:
        raise ValueError(f"compression {compression!r} is not one of {CODECS}")
    # the credential travels in a file of our own (mode 600), not on a command line others can read
    config = tempfile.NamedTemporaryFile("w", prefix="bubuh-client-", suffix=".properties", delete=False)
    with config:
        for name, value in kafka_auth.java_properties(settings, credential).items():
            config.write(f"{name}={_escape(value)}\n")
    try:
        _publish(settings, records, compression, config.name, linger_ms, batch_size, timeout)
    finally:
        os.unlink(config.name)


def _escape(value: str) -> str:
    """A value for java.util.Properties.load: backslashes doubled, the rest as is."""
    return value.replace("\\", "\\\\")


def _publish(settings: Settings, records: list[Outgoing], compression: str, client_config: str,
             linger_ms: int | None, batch_size: int | None, timeout: float) -> None:
    args = ["--bootstrap", settings.kafka_bootstrap, "--compression", compression, "--client-config", client_config]
    if linger_ms is not None:
        args += ["--linger-ms", str(linger_ms)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    stdin = "".join(_line(r) + "\n" for r in records)
    out = run_java(settings, str(SOURCE), *args, stdin=stdin, timeout=timeout)
    if out.returncode != 0 or out.stdout.strip() != f"sent {len(records)}":
        raise RuntimeError(f"RecordProducer ({compression}) exited {out.returncode}, stdout {out.stdout.strip()!r}, "
                           f"expected 'sent {len(records)}'; stderr:\n{out.stderr[-4000:]}")


def log_dir(settings: Settings | None = None) -> Path:
    """The local broker's log.dirs (deploy/local/kafka.sh writes it into server.properties)."""
    home = kafka_home(settings)
    props = home / "server.properties"
    if props.exists():
        for line in props.read_text().splitlines():
            if line.startswith("log.dirs="):
                return Path(line.split("=", 1)[1].split(",")[0].strip())
    return home / "data"


def dump_batches(settings: Settings, topic: str) -> dict[int, list[dict[str, str]]]:
    """Every record batch of ``topic`` as the local broker stored it, per partition, read from the raw log
    segments by Kafka's own ``kafka.tools.DumpLogSegments`` (``compresscodec``, ``count``, ``baseOffset``, ...).
    Only for the locally managed broker: it reads the broker's files."""
    pattern = re.compile(re.escape(topic) + r"-(\d+)")
    partitions = {int(m.group(1)): d for d in log_dir(settings).iterdir() if (m := pattern.fullmatch(d.name))}
    if not partitions:
        raise AssertionError(f"no partition directories of {topic} under {log_dir(settings)}")
    out: dict[int, list[dict[str, str]]] = {p: [] for p in partitions}
    of_segment = {str(seg): p for p, d in partitions.items() for seg in sorted(d.glob("*.log"))}
    if not of_segment:
        return out
    dumped = run_java(settings, "kafka.tools.DumpLogSegments", "--files", ",".join(of_segment))
    if dumped.returncode != 0:
        raise RuntimeError(f"DumpLogSegments exited {dumped.returncode}: {dumped.stderr[-2000:]}")
    partition = None
    for line in dumped.stdout.splitlines():
        if line.startswith("Dumping "):
            partition = of_segment[line.removeprefix("Dumping ").strip()]
        elif line.startswith("baseOffset:"):
            if partition is None:
                raise RuntimeError(f"DumpLogSegments printed a batch before naming its file:\n{dumped.stdout[:2000]}")
            out[partition].append(dict(re.findall(r"(\w+): (\S+)", line)))
    return out
