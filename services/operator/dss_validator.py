"""The EU Commission's DSS library as an outside validator (``deploy/local/dss/DssValidate.java``), offline,
under its default ETSI policy, trusting only the local PKI's trust anchor.

Used by the tests and by ``bubuh demo``. Fetched on first use the way ``deploy/local/kafka.sh`` fetches
Kafka: ``mvn dependency:copy-dependencies`` on ``deploy/local/dss/pom.xml`` into ``$BUBUH_LOCAL_DIR/dss/libs``
(once; nothing is committed), and the validator compiled once into ``$BUBUH_LOCAL_DIR/dss/classes``. Java 17
and Maven are what the stack already needs.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.kernel.settings import REPO_ROOT, Settings

POM = REPO_ROOT / "deploy" / "local" / "dss" / "pom.xml"
SOURCE = REPO_ROOT / "deploy" / "local" / "dss" / "DssValidate.java"


def _version() -> str:
    """The DSS version the POM pins (one place says it)."""
    try:
        found = re.search(r"<dss.version>([^<]+)</dss.version>", POM.read_text())
    except OSError:
        return "?"
    return found.group(1) if found else "?"


VERSION = _version()


class DssUnavailable(RuntimeError):
    """No java / javac / mvn, or Maven Central could not be reached for the jars."""


class DssFailed(RuntimeError):
    """The validator ran and failed (its exception on stderr): no verdict."""


def home() -> Path:
    local = os.environ.get("BUBUH_LOCAL_DIR")
    return Path(local) / "dss" if local else Settings().local_dir / "dss"


def ensure() -> Path:
    """The classpath directory holding DSS's jars and the compiled validator; fetched and built once."""
    for tool in ("java", "javac", "mvn"):
        if shutil.which(tool) is None:
            raise DssUnavailable(f"{tool} not found on PATH (Debian: openjdk-17-jdk-headless, maven)")
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    libs, classes = root / "libs", root / "classes"
    with open(root / ".lock", "w") as lock:   # xdist workers: one fetch
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = libs / ".complete"
        if not marker.exists() or marker.stat().st_mtime < POM.stat().st_mtime:
            shutil.rmtree(libs, ignore_errors=True)   # a new DSS version must not run beside the old jars
            libs.mkdir()
            done = subprocess.run(["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                                   f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
                                  capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                raise DssUnavailable(f"mvn could not fetch DSS: {(done.stdout + done.stderr)[-2000:]}")
            marker.touch()
        compiled = classes / "DssValidate.class"
        if not compiled.exists() or compiled.stat().st_mtime < SOURCE.stat().st_mtime:
            classes.mkdir(exist_ok=True)
            done = subprocess.run(["javac", "-d", str(classes), "-cp", f"{libs}/*", str(SOURCE)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise DssUnavailable(f"javac DssValidate.java: {done.stderr[-2000:]}")
    return root


@dataclass
class Verdict:
    id: str
    indication: str
    subindication: str | None
    format: str = ""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class DssReport:
    signatures: list[Verdict]
    timestamps: list[Verdict]
    modifications: list[str]  # "<signature id> undefined|annotation <action> <object>"
    raw: str


def built() -> bool:
    """Whether the jars are fetched and the validator compiled (the first ``ensure`` takes a minute or two)."""
    root = home()
    return (root / "libs" / ".complete").exists() and (root / "classes" / "DssValidate.class").exists()


def validate(pdf: bytes, trust_anchor: Path, *, at: datetime | None = None) -> DssReport:
    """DSS's verdict on ``pdf`` (validation time ``at``, default now), no network."""
    root = ensure()
    with tempfile.TemporaryDirectory(prefix="bubuh-dss-") as tmp:
        path = Path(tmp) / "document.pdf"
        path.write_bytes(pdf)
        args = [str(path), str(Path(trust_anchor).resolve())] + ([at.strftime("%Y-%m-%dT%H:%M:%SZ")] if at else [])
        done = subprocess.run(["java", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                               "-cp", f"{root / 'classes'}:{root / 'libs'}/*", "DssValidate", *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp)
    if done.returncode != 0:
        raise DssFailed(f"DSS failed: {done.stderr[-3000:]}")
    return _parse(done.stdout)


def validate_many(pdfs: list[bytes], trust_anchor: Path, at: datetime | None = None) -> list[DssReport]:
    """``validate`` for several documents in one JVM (start-up is most of one call's time); reports in order."""
    root = ensure()
    with tempfile.TemporaryDirectory(prefix="bubuh-dss-") as tmp:
        paths = []
        for n, pdf in enumerate(pdfs):
            paths.append(Path(tmp) / f"document-{n}.pdf")
            paths[-1].write_bytes(pdf)
        args = ["--batch", str(Path(trust_anchor).resolve()), at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else "-",
                *map(str, paths)]
        done = subprocess.run(["java", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                               "-cp", f"{root / 'classes'}:{root / 'libs'}/*", "DssValidate", *args],
                              capture_output=True, text=True, timeout=300 + 30 * len(pdfs), cwd=tmp)
    if done.returncode != 0:
        raise AssertionError(f"DSS failed: {done.stderr[-3000:]}")
    sections = re.split(r"^DOCUMENT ", done.stdout, flags=re.M)[1:]
    if len(sections) != len(pdfs):
        raise AssertionError(f"DSS answered for {len(sections)} of {len(pdfs)} documents: {done.stdout[-3000:]}")
    return [_parse(section.partition("\n")[2]) for section in sections]


def _parse(out: str) -> DssReport:
    report = DssReport([], [], [], out)
    last: Verdict | None = None
    for line in out.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind in ("SIGNATURE", "TIMESTAMP"):
            parts = rest.split(" ")
            last = Verdict(parts[0], parts[1], None if parts[2] == "-" else parts[2], " ".join(parts[3:]))
            (report.signatures if kind == "SIGNATURE" else report.timestamps).append(last)
        elif kind == "ERROR" and last is not None:
            last.errors.append(rest)
        elif kind == "WARNING" and last is not None:
            last.warnings.append(rest)
        elif kind == "MODIFICATION":
            report.modifications.append(rest)
    return report
