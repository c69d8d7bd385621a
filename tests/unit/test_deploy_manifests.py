"""deploy/ checked against the code: the production shape cannot be run here, so it is parsed.

Names drift: a metric, a label, a setting or a consumer group renamed in the code silently breaks
an alert, a dashboard, a ScaledObject or a manifest. These tests read every file under deploy/
(except deploy/local, the local stack) and compare what they name with what the code declares:

* metrics and their labels from ``prometheus_client``'s registry, after importing every module;
* settings from ``Settings.model_fields`` (env prefix ``BUBUH_``);
* consumer groups from the ``CONSUMER`` constants, topics from ``services.kernel.topics``;
* service names and ``serve`` arguments from ``services.platform`` and the CLI's own parser;
* where a process serves ``/metrics`` and ``/healthz`` (its HTTP port with API routes, else
  ``BUBUH_METRICS_PORT``), as ``services.platform.serve`` decides: every tier must be scraped and
  probed there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shlex
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import prometheus_client
import pytest
import yaml

import services
from services.kernel import topics
from services.kernel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "compose" / ".env.example"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DOCKERFILE = DEPLOY / "Dockerfile"

# settings whose values are secrets: only in Secrets (k8s) or interpolated from .env (compose)
SECRET_SETTINGS = {"secret_key", "database_url", "smtp_username", "smtp_password", "signing_pkcs11_pin",
                   "signing_p12_password", "kafka_password", "kafka_admin_password"}
# labels Prometheus or the Kafka exporter add; the rest must be declared by the metric
EXTERNAL_LABELS = {"job", "instance", "tier", "le", "consumergroup", "topic", "partition"}


# ----------------------------------------------------------------------------------------------
# what deploy/ holds
# ----------------------------------------------------------------------------------------------

def cli():
    """The CLI module, imported late: a service that fails to import fails the tests that need it,
    not the collection of this file."""
    from services.operator import cli as module
    return module


def platform():
    from services import platform as module
    return module


def deploy_files(*suffixes: str) -> list[Path]:
    """Files we own under deploy/ (deploy/local is the local stack's, not checked here)."""
    out = []
    for p in sorted(DEPLOY.rglob("*")):
        if not p.is_file() or (DEPLOY / "local") in p.parents:
            continue
        if not suffixes or p.suffix in suffixes or p.name in suffixes:
            out.append(p)
    return out


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@cache
def k8s_objects() -> tuple[dict, ...]:
    return tuple(d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in yaml_docs(p))


def k8s(kind: str) -> list[dict]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def k8s_one(kind: str, name: str) -> dict:
    found = [o for o in k8s(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads() -> list[dict]:
    return k8s("Deployment") + k8s("StatefulSet")


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


@cache
def config_data() -> dict[str, str]:
    return k8s_one("ConfigMap", "bubuh-config")["data"]


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services() -> dict[str, dict]:
    return compose()["services"]


def is_bubuh(svc: dict) -> bool:
    return "deploy/Dockerfile" in json.dumps(svc.get("build", {}))


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def serve_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(api, workers) of a `bubuh serve ...` command line, parsed by the CLI's own parser."""
    assert argv and argv[0] == "serve", f"not a `bubuh serve` command: {argv}"
    args = cli().build_parser().parse_args(argv)
    return platform().parse_names(args.api), platform().parse_names(args.workers)


def metrics_port(argv: list[str], env: dict[str, str]) -> int:
    """The port a `bubuh serve` process serves /metrics and /healthz on, as ``services.platform.serve``
    decides: its HTTP port when it runs API routes, else BUBUH_METRICS_PORT (0: none)."""
    api, _ = serve_args(argv)
    if api:
        return int(env.get("BUBUH_HTTP_PORT", Settings.model_fields["http_port"].default))
    return int(env.get("BUBUH_METRICS_PORT", Settings.model_fields["metrics_port"].default))


def container_env(c: dict) -> dict[str, str]:
    """A Kubernetes container's environment as far as the manifests fix it: its ConfigMaps (envFrom,
    in order), then its own ``env`` values (Secrets hold placeholders only)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(k8s_one("ConfigMap", src["configMapRef"]["name"]).get("data", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
    return env


def compose_tiers() -> dict[str, dict]:
    """The compose services running `bubuh serve ...` (every tier)."""
    return {n: s for n, s in compose_services().items() if is_bubuh(s) and s["command"][0] == "serve"}


def expand_alternatives(regex: str) -> list[str]:
    """The names a job regex like ``bubuh-(a|b)`` or ``a|b`` matches (plain words only)."""
    m = re.fullmatch(r"([\w-]*)\(([\w|-]+)\)([\w-]*)", regex)
    if m:
        return [m.group(1) + alt + m.group(3) for alt in m.group(2).split("|")]
    return literal_alternatives(regex)


# ----------------------------------------------------------------------------------------------
# what the code declares
# ----------------------------------------------------------------------------------------------

@cache
def all_modules() -> tuple:
    """Every module under services/ imported (that is what registers the metrics)."""
    mods = []
    for info in pkgutil.walk_packages(services.__path__, prefix="services."):
        mods.append(importlib.import_module(info.name))
    return tuple(mods)


@cache
def code_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series name a bubuh_* metric exposes -> (family name, its label names)."""
    all_modules()
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    out: dict[str, tuple[str, frozenset[str]]] = {}
    registry = prometheus_client.REGISTRY
    for family in registry.collect():
        if not family.name.startswith("bubuh_"):
            continue
        # prometheus_client has no public accessor for a metric's label names
        collector = registry._names_to_collectors.get(family.name) or \
            registry._names_to_collectors.get(family.name + "_total")
        labels = frozenset(getattr(collector, "_labelnames", ()))
        for suffix in suffixes.get(family.type, ("",)):
            out[family.name + suffix] = (family.name, labels)
    assert out, "no bubuh_* metric registered: did the imports fail?"
    return out


@cache
def code_consumers() -> dict[str, set[str]]:
    """service name -> the consumer names its modules declare (``CONSUMER = "..."``)."""
    out: dict[str, set[str]] = {}
    for mod in all_modules():
        name = getattr(mod, "CONSUMER", None)
        if isinstance(name, str):
            out.setdefault(mod.__name__.split(".")[1], set()).add(name)
    assert set(out) == set(platform().SERVICES), f"every service has consumers: {out}"
    return out


def setting_names() -> set[str]:
    return {f"BUBUH_{name.upper()}" for name in Settings.model_fields}


@cache
def source_literals(package: str = "") -> frozenset[str]:
    """Every string literal in services/<package>/*.py and the kernel (where label values come from:
    a service's own outcomes, the kernel's error codes)."""
    lits = set()
    dirs = {ROOT / "services" / package, ROOT / "services" / "kernel"} if package else {ROOT / "services"}
    for d in dirs:
        for p in d.rglob("*.py"):
            lits.update(re.findall(r"""["']([^"'\n]{1,200})["']""", p.read_text()))
    return frozenset(lits)


@cache
def metric_package(family: str) -> str:
    """The service package declaring a metric family ("" for the kernel's: used everywhere)."""
    for mod in all_modules():
        if mod.__name__.endswith(".metrics") and f'"{family}' in Path(mod.__file__).read_text():
            part = mod.__name__.split(".")[1]
            return "" if part == "kernel" else part
    raise AssertionError(f"no metrics module declares {family}")


# ----------------------------------------------------------------------------------------------
# PromQL, as far as these checks need it
# ----------------------------------------------------------------------------------------------

METRIC_RE = re.compile(r"(?<![\w:])(bubuh_[a-z0-9_]*[a-z0-9])(_?\*)?")
SELECTOR_RE = re.compile(r"(?<![\w:])([a-z_][a-z0-9_]*)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
RECORDED_RE = re.compile(r"(?<![\w])(bubuh:[a-z0-9_:]+)")


def rule_list() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_targets() -> Iterator[tuple[Path, dict, dict]]:
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in walk_panels(json.loads(path.read_text())["panels"]):
            for target in panel.get("targets", []):
                yield path, panel, target


def walk_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def all_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every rule and every dashboard query."""
    out = [(f"rules.yml {r.get('record') or r.get('alert')}", r["expr"]) for r in rule_list()]
    out += [(f"{p.name} panel {panel['title']!r}", t["expr"]) for p, panel, t in dashboard_targets()]
    return out


def literal_alternatives(regex: str) -> list[str]:
    """The plain words of a label regex like ``a|b|c`` or ``.*(a|b)``; parts with regex syntax are skipped."""
    body = regex.removeprefix(".*").strip("()")
    return [part for part in body.split("|") if re.fullmatch(r"[A-Za-z0-9_./{}-]+", part)]


# ----------------------------------------------------------------------------------------------
# every file parses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", deploy_files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_under_deploy_parses(path):
    assert yaml_docs(path), f"{path} is empty"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_json_file_under_deploy_parses(path):
    assert json.loads(path.read_text())


def test_the_shape_is_all_there():
    for p in (DOCKERFILE, ROOT / ".dockerignore", COMPOSE_FILE, ENV_EXAMPLE, RULES, PROMETHEUS_CONFIG,
              DASHBOARDS / "bubuh-overview.json", K8S / "kustomization.yaml", DEPLOY / "README.md"):
        assert p.is_file(), f"missing {p.relative_to(ROOT)}"
    assert list((DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.yml"))
    assert list((DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.yml"))


# ----------------------------------------------------------------------------------------------
# metrics: names, labels, label values
# ----------------------------------------------------------------------------------------------

def test_every_bubuh_metric_named_under_deploy_exists_in_the_code():
    """Rules, dashboards, README, comments: a bubuh_* name must be a metric the code declares, as a
    series or as its family (``bubuh_x_*`` is a prefix and must match one)."""
    series = code_metrics()
    names = set(series) | {family for family, _ in series.values()}
    unknown = []
    for path in deploy_files():
        for name, star in METRIC_RE.findall(path.read_text()):
            ok = any(s.startswith(name) for s in names) if star else name in names
            if not ok:
                unknown.append(f"{path.relative_to(ROOT)}: {name}{star}")
    assert not unknown, "metrics the code does not declare (renamed?):\n" + "\n".join(sorted(set(unknown)))


def test_every_bubuh_series_queried_is_exposed():
    """In PromQL only series exist: a counter is ``_total``, a histogram ``_bucket``/``_sum``/``_count``."""
    series = code_metrics()
    problems = [f"{where}: {name}{star}" for where, expr in all_expressions()
                for name, star in METRIC_RE.findall(expr) if star or name not in series]
    assert not problems, "not a series the code exposes:\n" + "\n".join(problems)


def test_the_rules_and_dashboards_cover_the_domain_metrics():
    text = RULES.read_text() + "".join(p.read_text() for p in DASHBOARDS.glob("*.json"))
    for family in ("bubuh_consumer_lag_records", "bubuh_dead_letter_records_total", "bubuh_http_request_seconds_bucket",
                   "bubuh_http_requests_total", "bubuh_outbox_lag_seconds_bucket", "bubuh_stamp_queue_depth_requests",
                   "bubuh_stamp_outcomes_total", "bubuh_stamp_stage_seconds_bucket", "bubuh_ledger_operations_total",
                   "bubuh_purchases_total", "bubuh_webhook_deliveries_total"):
        assert family in code_metrics(), f"{family} left the code: update this list and deploy/"
        assert family in text, f"{family} is neither alerted on nor charted"


def test_label_names_in_selectors_and_groupings_are_the_metrics_own():
    metrics = code_metrics()
    problems = []
    for where, expr in all_expressions():
        used = {m for m, _ in METRIC_RE.findall(expr)}
        for metric, body in SELECTOR_RE.findall(expr):
            if metric not in metrics:
                continue
            allowed = metrics[metric][1] | ({"le"} if metric.endswith("_bucket") else set())
            for label, _op, _value in MATCHER_RE.findall(body):
                if label not in allowed:
                    problems.append(f"{where}: {metric} has no label {label!r} (it has {sorted(allowed)})")
        if RECORDED_RE.search(expr):
            continue  # groupings over recorded series carry the recording rule's labels
        known = set().union(*(metrics[m][1] for m in used if m in metrics)) | EXTERNAL_LABELS
        for group in GROUPING_RE.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                if label not in known:
                    problems.append(f"{where}: grouping by {label!r}, which no metric of the expression has")
    assert not problems, "\n".join(problems)


def test_label_values_matched_exactly_are_values_the_code_uses():
    """``outcome="refused"``, ``route="/v1/stamps"``, ``code!~"PDF_INVALID|..."``: each word must be
    a string literal of the package declaring the metric, or of the kernel (a renamed outcome or code
    would silence an alert)."""
    metrics = code_metrics()
    consumers = {c for names in code_consumers().values() for c in names}
    problems = []
    for where, expr in all_expressions():
        for metric, body in SELECTOR_RE.findall(expr):
            for label, op, value in MATCHER_RE.findall(body):
                if metric == "kafka_consumergroup_lag" and label == "consumergroup":
                    words = literal_alternatives(value)
                    problems += [f"{where}: no consumer group {w!r}" for w in words if w not in consumers]
                    assert words, f"{where}: no consumer group named in {value!r}"
                    continue
                if not metric.startswith("bubuh_") or label in ("le", "status"):
                    continue  # status: HTTP codes, numbers the code formats, not literals
                package = metric_package(metrics[metric][0]) if metric in metrics else ""
                literals = source_literals(package)
                words = [value] if op in ("=", "!=") else literal_alternatives(value)
                problems += [f"{where}: {metric}{{{label}{op}...}}: {w!r} is no literal in services/{package}"
                             for w in words if w and w not in literals]
    assert not problems, "\n".join(problems)


def test_recording_rules_used_are_defined():
    defined = {r["record"] for r in rule_list() if "record" in r}
    used = {name for _, expr in all_expressions() for name in RECORDED_RE.findall(expr)}
    assert used <= defined, f"recording rules used but not defined: {sorted(used - defined)}"
    for name in defined:
        assert re.fullmatch(r"bubuh:[a-z0-9_]+:[a-z0-9_]+", name), f"recording rule {name}: bubuh:<what>:<how>"


def test_every_rule_is_well_formed():
    for rule in rule_list():
        assert ("record" in rule) != ("alert" in rule), rule
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule
        assert rule["expr"].count("{") == rule["expr"].count("}"), rule
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_alerts_the_platform_needs_are_there():
    alerts = {r["alert"]: r["expr"] for r in rule_list() if "alert" in r}
    must = {
        "consumer lag growing": ("bubuh:consumer_lag_records:sum", "deriv("),
        "dead letters": ("bubuh_dead_letter_records_total",),
        "intake p99 over 500 ms": ("bubuh:intake_latency_seconds:p99_5m", "> 0.5"),
        "5xx ratio": ("bubuh:http_5xx:ratio5m",),
        "outbox lag": ("bubuh:outbox_lag_seconds:p99_5m",),
        "stamp failure ratio by code": ("bubuh:stamp_platform_failures:rate15m", "ignoring(code)"),
        "ledger refusals (QuotaRefused)": ("bubuh_ledger_operations_total", 'outcome="refused"', "commit|release"),
    }
    for what, needles in must.items():
        assert any(all(n in expr for n in needles) for expr in alerts.values()), f"no alert for {what}"


def test_intake_routes_named_by_the_rules_are_the_api_routes():
    routes = set()
    for name in platform().SERVICES:
        mod = importlib.import_module(f"services.{name}.api")
        # the route label is the path template the router declares
        routes |= set(re.findall(r'@r\.(?:get|post)\("([^"]+)"', Path(mod.__file__).read_text()))
    for where, expr in all_expressions():
        for metric, body in SELECTOR_RE.findall(expr):
            for label, _op, value in MATCHER_RE.findall(body):
                if metric.startswith("bubuh_http_") and label == "route":
                    for r in literal_alternatives(value):
                        assert r in routes, f"{where}: route {r} is not an API route ({sorted(routes)})"


def test_dashboards_use_the_provisioned_datasource():
    prov = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    uids = {d["uid"] for d in prov["datasources"]}
    for path, panel, target in dashboard_targets():
        for ds in (panel.get("datasource"), target.get("datasource")):
            if isinstance(ds, dict):
                assert ds["uid"] in uids, f"{path.name} {panel['title']!r}: datasource {ds['uid']} not provisioned"
    for path in DASHBOARDS.glob("*.json"):
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["title"] and dash["panels"]
        ids = [p["id"] for p in walk_panels(dash["panels"])]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------

def test_every_bubuh_env_var_under_deploy_is_a_setting():
    """compose, .env.example, ConfigMaps, Secrets, Dockerfile, README: ``BUBUH_X`` must be a field
    of Settings (``BUBUH_X_*`` a prefix of one)."""
    fields = setting_names()
    files = deploy_files() + [ROOT / ".dockerignore"]
    unknown = []
    for path in files:
        for name, star in re.findall(r"(?<![A-Za-z0-9_])(BUBUH_[A-Z0-9_]*[A-Z0-9])(_?\*)?", path.read_text()):
            ok = any(f.startswith(name) for f in fields) if star else name in fields
            if not ok:
                unknown.append(f"{path.relative_to(ROOT)}: {name}{star}")
    assert not unknown, "not a Settings field (services/kernel/settings.py):\n" + "\n".join(sorted(set(unknown)))


def test_the_env_var_names_of_the_manifests_are_settings_structurally():
    fields = setting_names()
    keys = set(config_data())
    for cm in k8s("ConfigMap"):
        keys |= {k for k in cm.get("data", {}) if k.startswith("BUBUH_")}
    for secret in k8s("Secret"):
        keys |= set(secret.get("stringData", {}))
    for w in workloads():
        for c in containers(w):
            keys |= {e["name"] for e in c.get("env", [])}
    for svc in compose_services().values():
        keys |= {k for k in (svc.get("environment") or {}) if k.startswith("BUBUH_")}
    assert keys and keys <= fields, f"not settings: {sorted(keys - fields)}"


def test_secrets_are_only_in_secrets():
    secret_envs = {f"BUBUH_{n.upper()}" for n in SECRET_SETTINGS}
    assert secret_envs <= setting_names()
    for cm in k8s("ConfigMap"):
        leaked = secret_envs & set(cm.get("data", {}))
        assert not leaked, f"ConfigMap {cm['metadata']['name']} carries secrets {leaked}"
    for secret in k8s("Secret"):
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"Secret {secret['metadata']['name']}.{key}: placeholders only"
    for name, svc in compose_services().items():
        for key, value in (svc.get("environment") or {}).items():
            if key in secret_envs or "PASSWORD" in key:
                assert "${" in str(value), f"compose {name}: {key} must come from .env, not the file"


def test_env_example_defines_every_compose_variable_and_holds_no_secret():
    text = COMPOSE_FILE.read_text()
    example = env_example()
    for name, default in re.findall(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}", text):
        assert name in example or default.startswith((":-", "-")), f"${{{name}}} is not in .env.example"
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert {"BUBUH_SECRET_KEY", "POSTGRES_PASSWORD", "KAFKA_ADMIN_PASSWORD", "KAFKA_CONTROLLER_PASSWORD",
            "KAFKA_MONITOR_PASSWORD"} <= required
    assert {f"KAFKA_{t.upper()}_PASSWORD" for t in compose_tiers()} <= required
    assert required <= set(example), f"not in .env.example: {sorted(required - set(example))}"
    for name in required:
        assert example.get(name, "") == "", f".env.example: {name} must stay empty (no real secrets)"


def test_http_listens_on_all_interfaces_where_it_is_served():
    """127.0.0.1, the local default, would be unreachable from a Service, a port mapping, the probes or
    Prometheus. The api's HTTP port and a worker's metrics port both bind to BUBUH_HTTP_HOST."""
    default = Settings.model_fields["http_host"].default
    assert config_data()["BUBUH_HTTP_HOST"] == "0.0.0.0"
    assert "BUBUH_HTTP_HOST=0.0.0.0" in DOCKERFILE.read_text()
    served = set()
    for name, svc in compose_tiers().items():
        assert svc["environment"].get("BUBUH_HTTP_HOST", default) == "0.0.0.0", name
        served.add(metrics_port(svc["command"], svc["environment"]))
    for w in workloads():
        for c in containers(w):
            assert container_env(c).get("BUBUH_HTTP_HOST", default) == "0.0.0.0", w["metadata"]["name"]
            served.add(metrics_port(c["args"], container_env(c)))
    exposed = {int(p.split("/")[0]) for k, a in dockerfile_instructions() if k == "EXPOSE" for p in a.split()}
    assert served <= exposed, f"the image documents (EXPOSE) {sorted(exposed)}, the tiers serve {sorted(served)}"


def test_the_public_url_is_set_and_is_the_ingress_host():
    url = config_data()["BUBUH_PUBLIC_BASE_URL"]
    assert url.startswith("https://"), "stamps print this URL in their QR code: https in production"
    hosts = {rule["host"] for ing in k8s("Ingress") for rule in ing["spec"]["rules"]}
    assert hosts == {urlsplit(url).hostname}
    env = compose_services()["api"]["environment"]
    assert env["BUBUH_PUBLIC_BASE_URL"]


# ----------------------------------------------------------------------------------------------
# consumer groups and autoscaling
# ----------------------------------------------------------------------------------------------

def kafka_triggers() -> Iterator[tuple[dict, dict]]:
    for so in k8s("ScaledObject"):
        for trig in so["spec"]["triggers"]:
            yield so, trig


def test_keda_consumer_groups_are_the_codes():
    prefix = config_data().get("BUBUH_TOPIC_PREFIX", "")
    groups = {prefix + c for names in code_consumers().values() for c in names}
    named = set()
    for so, trig in kafka_triggers():
        assert trig["type"] == "kafka", so["metadata"]["name"]
        group = trig["metadata"]["consumerGroup"]
        assert group in groups, f"ScaledObject {so['metadata']['name']}: no consumer group {group!r} in the code"
        named.add(group)
    assert named == groups, f"consumer groups nobody scales on: {sorted(groups - named)}"


def test_keda_scales_each_workload_on_the_groups_it_runs():
    prefix = config_data().get("BUBUH_TOPIC_PREFIX", "")
    consumers = code_consumers()
    for so in k8s("ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        target = k8s_one(ref.get("kind", "Deployment"), ref["name"])
        api, workers = serve_args(containers(target)[0]["args"])
        assert workers and not api, f"{ref['name']}: KEDA scales worker tiers; the api scales on CPU"
        expected = {prefix + c for w in workers for c in consumers[w]}
        got = {t["metadata"]["consumerGroup"] for t in so["spec"]["triggers"]}
        assert got == expected, f"{ref['name']} runs {workers}: scale on {sorted(expected)}, not {sorted(got)}"


def test_keda_triggers_reach_the_same_kafka_and_topics_the_services_use():
    bootstrap = config_data()["BUBUH_KAFKA_BOOTSTRAP"]
    prefix = config_data().get("BUBUH_TOPIC_PREFIX", "")
    known_topics = {prefix + t.name for t in topics.ALL}
    for so, trig in kafka_triggers():
        meta = trig["metadata"]
        assert meta["bootstrapServers"] == bootstrap, so["metadata"]["name"]
        if "topic" in meta:
            assert meta["topic"] in known_topics, f"{so['metadata']['name']}: no topic {meta['topic']}"
        assert int(meta["lagThreshold"]) > 0
        assert meta.get("allowIdleConsumers", "false") == "false"
        assert meta.get("offsetResetPolicy") == "earliest"   # as ConsumerLoop's auto_offset_reset


def test_keda_never_scales_to_zero_nor_past_the_partitions():
    """Workers also run the outbox relays and timers (expiry sweep): never zero. A consumer past the
    partition count would sit idle."""
    partitions = int(config_data()["BUBUH_DEFAULT_PARTITIONS"])
    for so in k8s("ScaledObject"):
        spec = so["spec"]
        assert spec["minReplicaCount"] >= 2, so["metadata"]["name"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, so["metadata"]["name"]


def test_every_worker_tier_has_one_scaler_and_the_api_an_hpa_on_cpu():
    scaled = {(so["spec"]["scaleTargetRef"].get("kind", "Deployment"), so["spec"]["scaleTargetRef"]["name"])
              for so in k8s("ScaledObject")}
    served_workers: set[str] = set()
    for w in workloads():
        api, workers = serve_args(containers(w)[0]["args"])
        key = (w["kind"], w["metadata"]["name"])
        if workers:
            assert key in scaled, f"{key} has no ScaledObject"
            served_workers |= set(workers)
        if api:
            hpas = [h for h in k8s("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == key[1]]
            assert len(hpas) == 1 and key not in scaled, f"{key}: one HPA, no ScaledObject"
            assert any(m["resource"]["name"] == "cpu" for m in hpas[0]["spec"]["metrics"])
    assert served_workers == set(platform().SERVICES), "every service's workers run somewhere"


# ----------------------------------------------------------------------------------------------
# Kubernetes workloads
# ----------------------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kust = yaml_docs(K8S / "kustomization.yaml")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == k8s("Namespace")[0]["metadata"]["name"]
    assert {i["name"] for i in kust["images"]} == {c["image"] for w in workloads() for c in containers(w)}


def test_workloads_run_tiers_the_cli_accepts_with_requests_and_limits():
    for w in workloads():
        for c in containers(w):
            serve_args(c["args"])
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), f"{w['metadata']['name']}: {kind}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_workloads_run_as_the_images_non_root_user():
    uid = int(re.search(r"^USER\s+(\d+)", DOCKERFILE.read_text(), re.M).group(1))
    for w in workloads():
        sc = w["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid, w["metadata"]["name"]


def test_env_sources_exist():
    cms = {o["metadata"]["name"] for o in k8s("ConfigMap")}
    secrets = {o["metadata"]["name"] for o in k8s("Secret")}
    pvcs = {o["metadata"]["name"] for o in k8s("PersistentVolumeClaim")}
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in cms
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
            assert c["envFrom"][0] == {"configMapRef": {"name": "bubuh-config"}}
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in cms
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs


def test_api_probes_healthz_on_the_http_port_and_is_exposed():
    port = int(config_data()["BUBUH_HTTP_PORT"])
    api = k8s_one("Deployment", "bubuh-api")
    (c,) = containers(api)
    assert serve_args(c["args"]) == (list(platform().SERVICES), [])
    named_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port in named_ports.values()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert named_ports.get(get["port"], get["port"]) == port, probe
    ann = api["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] == "/metrics" and int(ann["prometheus.io/port"]) == port
    svc = k8s_one("Service", "bubuh-api")
    assert svc["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    target = svc["spec"]["ports"][0]["targetPort"]
    assert named_ports.get(target, target) == port
    (ing,) = k8s("Ingress")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for rule in ing["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["name"] == "bubuh-api"
            assert path["backend"]["service"]["port"]["name"] in svc_ports


def test_worker_tiers_serve_metrics_on_their_metrics_port_and_are_probed_and_scraped_there():
    """A worker-only process serves /metrics and /healthz only on BUBUH_METRICS_PORT: every worker
    container sets it, names it `metrics`, is probed on /healthz there and annotated for scraping."""
    worker_tiers = set()
    for w in workloads():
        name = w["metadata"]["name"]
        (c,) = containers(w)
        api, workers = serve_args(c["args"])
        if api:
            continue
        worker_tiers |= set(workers)
        env = container_env(c)
        assert int(env.get("BUBUH_METRICS_PORT", 0)) > 0, f"{name}: BUBUH_METRICS_PORT unset, no /metrics"
        port = metrics_port(c["args"], env)
        named_ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert named_ports.get("metrics") == port, f"{name}: container port `metrics` must be {port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name}: no {probe}"
            get = c[probe]["httpGet"]
            assert get["path"] == "/healthz", f"{name} {probe}"
            assert named_ports.get(get["port"], get["port"]) == port, f"{name} {probe}: not the metrics port"
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true", f"{name}: not scraped"
        assert int(ann["prometheus.io/port"]) == port, f"{name}: scraped on another port than {port}"
        assert ann.get("prometheus.io/path", "/metrics") == "/metrics", name
    assert worker_tiers == set(platform().SERVICES), "every service's workers are scraped somewhere"


def test_every_workload_is_scraped_as_the_job_the_alerts_name():
    """Kubernetes scrapes by annotations; deploy/README.md names the job bubuh-<component label>, which
    must be the job names of prometheus.yml (the ones the up{job=...} alerts use)."""
    cfg = yaml_docs(PROMETHEUS_CONFIG)[0]
    bubuh_jobs = {j["job_name"] for j in cfg["scrape_configs"] if j["job_name"].startswith("bubuh-")}
    components = set()
    for w in workloads():
        meta = w["spec"]["template"]["metadata"]
        (c,) = containers(w)
        assert meta.get("annotations", {}).get("prometheus.io/scrape") == "true", w["metadata"]["name"]
        assert int(meta["annotations"]["prometheus.io/port"]) == metrics_port(c["args"], container_env(c))
        components.add(meta["labels"]["app.kubernetes.io/component"])
    assert {f"bubuh-{c}" for c in components} == bubuh_jobs
    readme = (DEPLOY / "README.md").read_text()
    assert "__meta_kubernetes_pod_label_app_kubernetes_io_component" in readme and "bubuh-$1" in readme, \
        "deploy/README.md shows how Kubernetes pods get the job bubuh-<component>"


def test_ingress_lets_the_largest_upload_through():
    from services.kernel.document_profiles import MAX_BYTES_ANY_PROFILE
    from services.kernel.settings import Settings
    (ing,) = k8s("Ingress")
    size = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    value, unit = re.fullmatch(r"(\d+)([kmg]?)", size).groups()
    limit = int(value) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    defaults = Settings()
    assert limit >= max(defaults.stamp_max_body_bytes, defaults.verify_max_body_bytes) > MAX_BYTES_ANY_PROFILE


def test_every_workload_has_a_disruption_budget_selecting_it():
    for w in workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in k8s("PodDisruptionBudget")
                if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(pdbs) == 1, f"{w['metadata']['name']}: {len(pdbs)} PodDisruptionBudgets"
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_stamping_is_one_core_per_process_with_a_unique_node_id():
    sts = [w for w in workloads() if "stamping" in serve_args(containers(w)[0]["args"])[1]]
    assert len(sts) == 1 and sts[0]["kind"] == "StatefulSet", "stamping: a StatefulSet (its ordinal is the node id)"
    (c,) = containers(sts[0])
    assert str(c["resources"]["requests"]["cpu"]) == "1" and str(c["resources"]["limits"]["cpu"]) == "1"
    (node,) = [e for e in c["env"] if e["name"] == "BUBUH_STAMP_NODE_ID"]
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert "stamp_node_id" in Settings.model_fields
    for cm in k8s("ConfigMap"):
        assert "BUBUH_STAMP_NODE_ID" not in cm.get("data", {}), "a shared value would repeat across processes"
    assert {"configMapRef": {"name": "bubuh-signing"}} in c["envFrom"]


def test_signing_settings_name_an_hsm_and_its_pin_is_secret():
    signing = k8s_one("ConfigMap", "bubuh-signing")["data"]
    assert signing["BUBUH_SIGNING_PKCS11_MODULE"], "production signs through PKCS#11"
    pin = k8s_one("Secret", "bubuh-signing-pin")["stringData"]
    assert set(pin) == {"BUBUH_SIGNING_PKCS11_PIN"}


def test_partitions_and_replication_match_the_cluster():
    assert int(config_data()["BUBUH_REPLICATION_FACTOR"]) == 3


# ----------------------------------------------------------------------------------------------
# docker compose
# ----------------------------------------------------------------------------------------------

NODE_SCRIPT = DEPLOY / "compose" / "kafka" / "node.sh"
# what the compose brokers kept from their PLAINTEXT days, unchanged
KAFKA_REPLICATION = {
    "default.replication.factor": "3", "min.insync.replicas": "2", "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3", "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3", "share.coordinator.state.topic.min.isr": "2",
    "unclean.leader.election.enable": "false", "auto.create.topics.enable": "false",
    "group.initial.rebalance.delay.ms": "3000",
}
INTERPOLATION_RE = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")


def compose_brokers() -> dict[str, dict]:
    return {n: s for n, s in compose_services().items() if s.get("image", "").startswith("apache/kafka")}


def env_var(value: str) -> str:
    """The .env variable a compose value is interpolated from (``${NAME:?...}``)."""
    m = INTERPOLATION_RE.fullmatch(str(value))
    assert m, f"{value!r} must be a ${{VAR}} from .env, nothing else"
    return m.group(1)


def interpolate(value: str) -> str:
    """A compose value as docker compose would make it from a filled-in .env: .env.example's values,
    and a test password of the allowed alphabet for every empty (required) one."""
    dotenv = {k: v or f"test-{k.lower().replace('_', '-')}" for k, v in env_example().items()}

    def one(m: re.Match) -> str:
        name, kind, rest = m.groups()
        if dotenv.get(name):
            return dotenv[name]
        assert kind == "-", f"${{{name}}} is required but not in .env.example"
        return rest
    return INTERPOLATION_RE.sub(one, str(value))


def properties(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not key=value: {line!r}"
            assert key not in out, f"{path.name}: {key} twice"
            out[key] = value
    return out


def run_node_script(env: dict[str, str], conf_dir: Path) -> subprocess.CompletedProcess:
    env = {**env, "NODE_CONF_DIR": str(conf_dir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["bash", str(NODE_SCRIPT), "--config-only"], env=env, capture_output=True, text=True,
                          timeout=30)


def node_config(svc: dict, conf_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(server.properties, admin.properties) node.sh writes for a compose broker."""
    env = {k: interpolate(v) for k, v in svc["environment"].items()}
    done = run_node_script(env, conf_dir)
    assert done.returncode == 0, f"node.sh --config-only failed: {done.stderr}"
    return properties(conf_dir / "server.properties"), properties(conf_dir / "admin.properties")


def jaas(value: str) -> dict[str, str]:
    return dict(re.findall(r'(\S+)="([^"]*)"', value))


def test_compose_kafka_nodes_run_the_node_script_with_its_environment():
    """Each broker's entrypoint is node.sh, mounted read-only; every NODE_* it reads is set, passwords
    from .env; no KAFKA_* variable (the image's env-to-properties wrapper is not used); the healthcheck
    authenticates with the client config the script writes."""
    brokers = compose_brokers()
    assert len(brokers) == 3
    script_vars = set(re.findall(r"\b(NODE_[A-Z_]+)\b", NODE_SCRIPT.read_text()))
    assert script_vars >= {"NODE_ADMIN_PASSWORD", "NODE_CONTROLLER_PASSWORD", "NODE_ID", "NODE_CLUSTER_ID"}
    ids = set()
    for name, svc in brokers.items():
        env = svc["environment"]
        assert script_vars <= set(env), f"{name}: node.sh needs {sorted(script_vars - set(env))}"
        assert not [k for k in env if k.startswith("KAFKA_")], f"{name}: KAFKA_* is the image wrapper's"
        for key in ("NODE_ADMIN_PASSWORD", "NODE_CONTROLLER_PASSWORD"):
            assert ":?" in env[key] and env_var(env[key]), f"{name}: {key} is required from .env"
        ids.add(env["NODE_ID"])
        assert env["NODE_HOST"] == svc["hostname"] == name
        bash, target = svc["entrypoint"]
        assert bash == "/bin/bash"
        mounts = [v.split(":") for v in svc["volumes"]]
        script_mounts = [m for m in mounts if m[1] == target]
        assert len(script_mounts) == 1 and script_mounts[0][2] == "ro", f"{name}: mount node.sh read-only"
        assert (COMPOSE_FILE.parent / script_mounts[0][0]).resolve() == NODE_SCRIPT
        assert [m[1] for m in mounts if not m[0].startswith(".")] == [env["NODE_DATA_DIR"]], f"{name}: data volume"
        check = " ".join(svc["healthcheck"]["test"])
        assert "kafka-broker-api-versions.sh --bootstrap-server localhost:9092" in check, name
        assert f"--command-config {env['NODE_CONF_DIR']}/admin.properties" in check, f"{name}: unauthenticated"
    assert len(ids) == 3


def test_compose_kafka_is_three_kraft_nodes_secured_with_scram_and_acls(tmp_path):
    """The server.properties node.sh writes for each broker: SASL_PLAINTEXT only, SCRAM-SHA-512 for
    clients and between brokers, PLAIN with one user on the controller listener, the StandardAuthorizer
    denying what no ACL allows, and the replication settings the PLAINTEXT brokers had."""
    brokers = compose_brokers()
    bubuh_env = compose()["x-bubuh-env"]
    node_ids, advertised = set(), set()
    for name, svc in brokers.items():
        env = {k: interpolate(v) for k, v in svc["environment"].items()}
        server, admin = node_config(svc, tmp_path / name)
        assert set(server["process.roles"].split(",")) == {"broker", "controller"}
        assert server["node.id"] == env["NODE_ID"]
        voters = dict(v.split("@") for v in server["controller.quorum.voters"].split(","))
        assert {hp.split(":")[0] for hp in voters.values()} == set(brokers), name
        assert voters[env["NODE_ID"]].split(":")[0] == name, f"{name}: its own id in the quorum"
        node_ids.add(server["node.id"])
        # every listener SASL_PLAINTEXT, none PLAINTEXT
        protocol = dict(p.split(":") for p in server["listener.security.protocol.map"].split(","))
        listeners = [ln.split("://")[0] for ln in server["listeners"].split(",")]
        assert {protocol[ln] for ln in listeners} == {"SASL_PLAINTEXT"}, f"{name}: {server['listeners']}"
        (adv,) = server["advertised.listeners"].split(",")
        assert protocol[adv.split("://")[0]] == "SASL_PLAINTEXT"
        advertised.add(adv.split("://")[1])
        client = server["inter.broker.listener.name"]
        assert client in listeners and server["controller.listener.names"] in listeners
        assert server["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
        assert server["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
        scram = jaas(server[f"listener.name.{client.lower()}.scram-sha-512.sasl.jaas.config"])
        assert scram == {"username": env["NODE_ADMIN_USER"], "password": env["NODE_ADMIN_PASSWORD"]}
        ctl = server["controller.listener.names"].lower()
        assert server[f"listener.name.{ctl}.sasl.enabled.mechanisms"] == "PLAIN"
        assert server["sasl.mechanism.controller.protocol"] == "PLAIN"
        user, password = env["NODE_CONTROLLER_USER"], env["NODE_CONTROLLER_PASSWORD"]
        assert jaas(server[f"listener.name.{ctl}.plain.sasl.jaas.config"]) == {
            "username": user, "password": password, f"user_{user}": password}
        assert server["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert server["allow.everyone.if.no.acl.found"] == "false"
        assert set(server["super.users"].split(";")) == {f"User:{env['NODE_ADMIN_USER']}", f"User:{user}"}
        assert server["log.dirs"] == env["NODE_DATA_DIR"]
        assert {k: server.get(k) for k in KAFKA_REPLICATION} == KAFKA_REPLICATION, name
        # the healthcheck's client: the admin, over SCRAM
        assert admin["security.protocol"] == "SASL_PLAINTEXT" and admin["sasl.mechanism"] == "SCRAM-SHA-512"
        assert jaas(admin["sasl.jaas.config"]) == scram
        assert (os.stat(tmp_path / name / "server.properties").st_mode & 0o077) == 0, "secrets: mode 600"
    assert len(node_ids) == 3
    assert set(bubuh_env["BUBUH_KAFKA_BOOTSTRAP"].split(",")) == advertised
    assert bubuh_env["BUBUH_REPLICATION_FACTOR"] == KAFKA_REPLICATION["default.replication.factor"]


@pytest.mark.parametrize("key, value", [("NODE_ADMIN_PASSWORD", 'pa"ss'), ("NODE_CONTROLLER_PASSWORD", "a,b]"),
                                        ("NODE_ADMIN_PASSWORD", ""), ("NODE_ID", "one")])
def test_the_node_script_refuses_values_that_would_break_jaas_or_add_scram(tmp_path, key, value):
    svc = next(iter(compose_brokers().values()))
    env = {k: interpolate(v) for k, v in svc["environment"].items()} | {key: value}
    done = run_node_script(env, tmp_path)
    assert done.returncode != 0 and key in done.stderr
    assert not (tmp_path / "server.properties").exists()


def test_compose_tiers_authenticate_as_their_own_principal():
    from services.kernel import access
    common = compose()["x-bubuh-env"]
    assert "BUBUH_KAFKA_USERNAME" not in common and "BUBUH_KAFKA_PASSWORD" not in common
    for name, svc in compose_tiers().items():
        env = svc["environment"]
        assert env["BUBUH_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert env["BUBUH_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert name in access.principal_names(), f"{name}: no principal of that name in access.py"
        assert env["BUBUH_KAFKA_USERNAME"] == access.service_user(name), name
        assert env_var(env["BUBUH_KAFKA_PASSWORD"]) == f"KAFKA_{name.upper()}_PASSWORD", name
        assert svc["depends_on"]["kafka-setup"]["condition"] == "service_completed_successfully", name


def kafka_setup_steps() -> list[argparse.Namespace]:
    svc = compose_services()["kafka-setup"]
    assert svc["entrypoint"] == ["/bin/sh", "-ec"], "one shell script; -e: the first failure fails the service"
    (script,) = svc["command"]
    steps = []
    for line in filter(None, (ln.strip() for ln in script.splitlines())):
        argv = shlex.split(line)
        assert argv[0] == "bubuh", f"kafka-setup: {line!r}"
        steps.append(cli().build_parser().parse_args(argv[1:]))
    return steps


def test_compose_kafka_setup_makes_the_topics_and_every_principal_as_the_admin():
    """Topics first, then `kafka principal` with --password-env for every tier and the monitor, each
    with the .env variable the tier (or the exporter) authenticates with."""
    from services.kernel import access
    svc = compose_services()["kafka-setup"]
    assert is_bubuh(svc)
    env = svc["environment"]
    steps = kafka_setup_steps()
    assert steps[0].command == "kafka" and steps[0].kafka_command == "setup"
    made = {}
    for step in steps[1:]:
        assert step.command == "kafka" and step.kafka_command == "principal" and step.password_env
        made[step.service] = env_var(env[step.password_env])
    tiers = compose_tiers()
    assert set(made) == set(tiers) | {access.MONITOR}
    for name, tier in tiers.items():
        assert made[name] == env_var(tier["environment"]["BUBUH_KAFKA_PASSWORD"]), f"{name}: another password"
    exporter = compose_services()["kafka-exporter"]["command"]
    assert f"--sasl.password=${{{made[access.MONITOR]}" in " ".join(exporter)
    # as the admin the brokers bootstrapped
    broker_env = next(iter(compose_brokers().values()))["environment"]
    assert env["BUBUH_KAFKA_ADMIN_USERNAME"] == broker_env["NODE_ADMIN_USER"]
    assert env_var(env["BUBUH_KAFKA_ADMIN_PASSWORD"]) == env_var(broker_env["NODE_ADMIN_PASSWORD"])
    # set, BUBUH_KAFKA_USERNAME keeps `kafka setup` from making the local stack's platform principal
    assert env["BUBUH_KAFKA_USERNAME"] == env["BUBUH_KAFKA_ADMIN_USERNAME"]
    assert env["BUBUH_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert {n for n, d in svc["depends_on"].items() if d["condition"] == "service_healthy"} == set(compose_brokers())
    assert svc.get("restart") == "no"


def test_compose_channel_commands_run_as_the_kafka_admin():
    """`bubuh channel add` creates the channel's Kafka credential and ACLs, which only the admin may: the
    service the compose file and deploy/README.md name for it carries the admin's credential."""
    broker_env = next(iter(compose_brokers().values()))["environment"]
    named = set()
    for path in (COMPOSE_FILE, DEPLOY / "README.md"):
        named |= set(re.findall(r"docker compose run --rm (\S+) channel ", path.read_text()))
    assert named == {"admin"}, f"channel commands run in {sorted(named)}"
    svc = compose_services()["admin"]
    assert is_bubuh(svc) and svc["profiles"] == ["tools"], "started by `docker compose run` only"
    cli().build_parser().parse_args(svc["command"])
    env = svc["environment"]
    assert env["BUBUH_KAFKA_ADMIN_USERNAME"] == env["BUBUH_KAFKA_USERNAME"] == broker_env["NODE_ADMIN_USER"]
    assert env_var(env["BUBUH_KAFKA_ADMIN_PASSWORD"]) == env_var(broker_env["NODE_ADMIN_PASSWORD"])
    # the channel registry: the tiers' database, and the key that seals the channels' secrets
    common = compose()["x-bubuh-env"]
    assert env["BUBUH_DATABASE_URL"] == common["BUBUH_DATABASE_URL"]
    assert env["BUBUH_SECRET_KEY"] == common["BUBUH_SECRET_KEY"]


def test_compose_kafka_exporter_authenticates_as_the_monitor(tmp_path):
    from services.kernel import access
    svc = compose_services()["kafka-exporter"]
    flags = dict((f.split("=", 1) + [""])[:2] for f in svc["command"])
    assert "--sasl.enabled" in flags and not flags["--sasl.enabled"]
    server, _ = node_config(next(iter(compose_brokers().values())), tmp_path)
    # the exporter's spelling of the brokers' mechanism
    assert flags["--sasl.mechanism"] == {"SCRAM-SHA-512": "scram-sha512"}[server["sasl.enabled.mechanisms"]]
    assert flags["--sasl.username"] == access.service_user(access.MONITOR)
    assert ":?" in flags["--sasl.password"] and env_var(flags["--sasl.password"])
    servers = [v for f, v in ((f.split("=", 1) + [""])[:2] for f in svc["command"]) if f == "--kafka.server"]
    assert set(servers) == set(compose()["x-bubuh-env"]["BUBUH_KAFKA_BOOTSTRAP"].split(","))
    assert svc["depends_on"]["kafka-setup"]["condition"] == "service_completed_successfully"


def test_compose_runs_one_container_per_tier():
    tiers: dict[str, tuple[list[str], list[str]]] = {}
    for name, svc in compose_services().items():
        if is_bubuh(svc) and svc["command"][0] == "serve":
            tiers[name] = serve_args(svc["command"])
            assert svc["depends_on"]["keys"]["condition"] == "service_completed_successfully", name
            assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert tiers.pop("api") == (list(platform().SERVICES), [])
    assert {n: w for n, (a, w) in tiers.items()} == {s: [s] for s in platform().SERVICES}
    assert all(not a for a, _ in tiers.values())


def test_compose_stamping_runs_replicas_without_a_shared_node_id():
    svc = compose_services()["stamping"]
    assert svc["deploy"]["replicas"] >= 2
    assert "BUBUH_STAMP_NODE_ID" not in svc["environment"], "replicas share the environment: the id would repeat"


def test_compose_dev_keys_come_from_the_one_shot_keys_service():
    keys = compose_services()["keys"]
    args = cli().build_parser().parse_args(keys["command"])
    assert args.what == "dev-ca" and args.if_missing
    (vol,) = keys["volumes"]
    source, target = vol.split(":")[:2]
    assert args.out == target
    stamping_env = compose_services()["stamping"]["environment"]
    assert stamping_env["BUBUH_SIGNING_P12_PATH"].startswith(target + "/")
    for name in ("api", "stamping"):
        assert any(v.split(":")[:2] == [source, target] for v in compose_services()[name]["volumes"]), name
    # the document store is shared by intake (api) and the workers
    docs = compose()["x-bubuh-env"]["BUBUH_DOCUMENT_STORE_ROOT"]
    for name in ("api", "stamping"):
        assert any(v.split(":")[1] == docs for v in compose_services()[name]["volumes"]), name


def scrape_targets(job: dict) -> Iterator[tuple[str, str, bool]]:
    """(host, port, found by DNS) of a scrape job's static and DNS targets."""
    for sc in job.get("static_configs", []):
        for target in sc["targets"]:
            host, port = target.rsplit(":", 1)
            yield host, port, False
    for sd in job.get("dns_sd_configs", []):
        for host in sd["names"]:
            yield host, str(sd["port"]), True


def job_tier_labels(job: dict) -> set[str]:
    """The values a job gives the `tier` label (static labels or a relabelling)."""
    out = {sc.get("labels", {}).get("tier") for sc in job.get("static_configs", [])}
    out |= {r.get("replacement") for r in job.get("relabel_configs", []) if r.get("target_label") == "tier"}
    return out - {None}


def test_compose_worker_tiers_serve_metrics_and_are_healthchecked_on_the_metrics_port():
    for name, svc in compose_tiers().items():
        env = svc["environment"]
        api, _ = serve_args(svc["command"])
        port = metrics_port(svc["command"], env)
        if not api:
            assert int(env.get("BUBUH_METRICS_PORT", 0)) > 0, f"{name}: BUBUH_METRICS_PORT unset, no /metrics"
            assert port in {int(p) for p in svc.get("expose", [])}, f"{name}: expose {port}"
            assert not svc.get("ports"), f"{name}: the metrics port stays on the compose network"
        check = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in check, f"{name}: healthcheck on /healthz at :{port}"


def test_prometheus_scrapes_every_tier_where_it_serves_metrics():
    """Each tier on the port it serves /metrics on (HTTP port for the api, BUBUH_METRICS_PORT for the
    workers), as job bubuh-<service> (the alerts' job names), every replica; and the Kafka exporter."""
    cfg = yaml_docs(PROMETHEUS_CONFIG)[0]
    assert [Path(f).name for f in cfg["rule_files"]] == [RULES.name]
    services_ = compose_services()
    mounts = [v for v in services_["prometheus"]["volumes"] if v.startswith("../prometheus:")]
    assert mounts and Path(cfg["rule_files"][0]).parent == Path(mounts[0].split(":")[1])
    scraped: set[str] = set()
    for job in cfg["scrape_configs"]:
        for host, port, by_dns in scrape_targets(job):
            if host == "localhost":
                continue
            assert host in services_, f"job {job['job_name']}: no compose service {host}"
            svc = services_[host]
            if not is_bubuh(svc):
                continue
            served = metrics_port(svc["command"], svc["environment"])
            assert served, f"{host} serves no /metrics (set BUBUH_METRICS_PORT)"
            assert int(port) == served, f"job {job['job_name']}: {host} serves /metrics on {served}, not {port}"
            assert job.get("metrics_path", "/metrics") == "/metrics"
            assert job["job_name"] == f"bubuh-{host}", f"{host}: the alerts expect job bubuh-{host}"
            assert job_tier_labels(job) == {host}, f"job {job['job_name']}: label tier={host}"
            if svc.get("deploy", {}).get("replicas", 1) > 1:
                assert by_dns, f"{host} runs replicas: a static target reaches one of them only"
            scraped.add(host)
    assert scraped == set(compose_tiers()), f"tiers not scraped: {sorted(set(compose_tiers()) - scraped)}"
    exporter = [j for j in cfg["scrape_configs"] for h, _, _ in scrape_targets(j) if h == "kafka-exporter"]
    assert exporter and "kafka-exporter" in services_, "the Kafka exporter: lag even while a tier is down"


def test_the_down_alerts_name_the_scrape_jobs():
    """up{job=...} in the rules names jobs that exist, and every bubuh-* job has an ``up == 0`` alert."""
    cfg = yaml_docs(PROMETHEUS_CONFIG)[0]
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    named: set[str] = set()
    for where, expr in [(w, e) for w, e in all_expressions() if re.search(r"==\s*0\b", e)]:
        for metric, body in SELECTOR_RE.findall(expr):
            if metric != "up":
                continue
            for label, _op, value in MATCHER_RE.findall(body):
                if label == "job":
                    words = expand_alternatives(value)
                    assert words, f"{where}: no job named in {value!r}"
                    assert set(words) <= jobs, f"{where}: no scrape job {sorted(set(words) - jobs)}"
                    named |= set(words)
    missing = {j for j in jobs if j.startswith("bubuh-")} - named
    assert not missing, f"scrape jobs no up{{job=...}} == 0 alert watches: {sorted(missing)}"
    for where, expr in all_expressions():
        for metric, body in SELECTOR_RE.findall(expr):
            for label, _op, value in MATCHER_RE.findall(body):
                if metric == "up" and label == "job":
                    unknown = set(expand_alternatives(value)) - jobs
                    assert not unknown, f"{where}: no scrape job {sorted(unknown)}"


def test_grafana_is_provisioned_from_deploy():
    graf = compose_services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"] if v.startswith("../"))
    prov = yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "bubuh.yml")[0]
    path = prov["providers"][0]["options"]["path"]
    assert mounts["../grafana/dashboards"] == path
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"][0]
    assert urlsplit(ds["url"]).hostname in compose_services()


# ----------------------------------------------------------------------------------------------
# the image
# ----------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M) if not m.group(0).lstrip().startswith("#")]


def test_dockerfile_builds_the_package_and_runs_bubuh_as_non_root():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert image == "python:3.11-slim", f
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    runtime = {k: a for k, a in final}
    assert json.loads(runtime["ENTRYPOINT"]) == ["bubuh"]
    assert json.loads(runtime["CMD"]) == ["serve"]
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert not any("grpcio-tools" in a for k, a in final), "protoc stays in the build stage"
    build_runs = " ".join(a for k, a in ins if k == "RUN")
    assert re.search(r"pip install \.(\s|$)", build_runs)


def test_dockerfile_generates_the_protobuf_code_as_make_does():
    text = DOCKERFILE.read_text()
    make = (ROOT / "Makefile").read_text()
    make_args = re.search(r"grpc_tools\.protoc (.*) \$\(PROTOS\)", make).group(1)
    assert f"-m grpc_tools.protoc {make_args} proto/bubuh/v1/*.proto" in text
    rewrite = re.search(r"^\tsed (.*) \$\(@D\)/\*_pb2\.py \$\(@D\)/\*_pb2\.pyi$", make, re.M).group(1)
    assert f"sed {rewrite} services/contracts/bubuh/v1/*_pb2.py services/contracts/bubuh/v1/*_pb2.pyi" in text, \
        "the Dockerfile rewrites the generated imports as make does"
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"(grpcio-tools[^"]*)"', pyproject).group(1)
    assert f'"{pin}"' in text, "the Dockerfile's grpcio-tools pin follows the dev extra's"


def test_dockerignore_keeps_local_state_out_of_the_context():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {".venv", ".local", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis"} <= lines
    for needed in ("pyproject.toml", "README.md", "proto", "services"):
        assert needed not in lines, f"{needed} is needed by the build"
