"""deploy/'s Prometheus and Grafana files against promtool and against the code.

- ``promtool check rules`` / ``check config`` / ``test rules`` (the alerts' unit tests in
  ``deploy/prometheus/alerts_test.yml``), skipped only when promtool is not installed;
- every ``pushfan_`` name in an alert or dashboard expression is a sample the code exports
  (built from :class:`pushfan.metrics.Metrics` by prometheus_client itself, so ``_total``,
  ``_bucket``... are its own), and every label an expression matches, groups by, or puts
  in a legend or annotation is one that sample has;
- the dashboard's structure (what Grafana needs to import it), the provisioning files,
  the scrape targets against the settings' default ports, and the runbook: a section per
  alert, a metrics table listing every exported metric.

Nothing here starts Prometheus or Grafana: the dashboard is checked as a file, never
rendered.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from pushfan.metrics import Metrics, Traffic
from pushfan.settings import (
    BridgeSettings,
    HygieneSettings,
    RegistrySettings,
    WorkerSettings,
    env_names,
)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
PROMETHEUS_K8S_CONFIG = PROMETHEUS / "prometheus-kubernetes.yml"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "pushfan.json"
RUNBOOK = ROOT / "docs" / "operations.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus); the Prometheus"
    " files are checked without it only for metric names and structure",
)

# Labels Prometheus adds to every scraped sample.
TARGET_LABELS = frozenset({"job", "instance"})
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Grafana's variables, replaced by a duration before promtool parses an expression.
GRAFANA_DURATIONS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


# -- what the code exports ----------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str  # as prometheus_client names it: a counter without _total
    type: str
    labels: tuple[str, ...]
    help: str


def _registry() -> CollectorRegistry:
    """A fresh :class:`Metrics` registry, with one connection pool's traffic watched: the
    pools' families (latency, responses, in flight) carry samples only then."""
    metrics = Metrics()
    metrics.traffic.watch("x", Traffic())
    return metrics.registry


def _collectors(registry: CollectorRegistry) -> list[MetricWrapperBase]:
    """The plain metrics registered on ``registry`` (prometheus_client keeps them
    privately); the traffic collector is read through its samples instead."""
    return [c for c in registry._collector_to_names if isinstance(c, MetricWrapperBase)]


@cache
def families() -> dict[str, Family]:
    """Every metric family :class:`Metrics` defines, by name."""
    registry = _registry()
    labels = {m._name: tuple(m._labelnames) for m in _collectors(registry)}
    out = {}
    for f in registry.collect():
        keys = {k for s in f.samples for k in s.labels if k != "le"}
        found = labels.get(f.name, tuple(sorted(keys)))
        out[f.name] = Family(f.name, f.type, found, f.documentation)
    assert len(out) > len(labels), "the traffic collector's families are missing"
    return out


@cache
def samples() -> dict[str, frozenset[str]]:
    """Every sample name a scrape of the code's metrics holds (``_total``, ``_created``,
    ``_bucket``, ``_sum``, ``_count`` forms included), with the labels it carries: one
    child of every labelled metric is made so prometheus_client lists its samples."""
    registry = _registry()
    for metric in _collectors(registry):
        if metric._labelnames:
            metric.labels(*("x" for _ in metric._labelnames))
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels | TARGET_LABELS) for name, labels in out.items()}


# -- PromQL, as far as names and labels go ------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])(pushfan_[A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ANNOTATION_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def _masked(expr: str) -> str:
    """``expr`` with the inside of its string literals blanked (same length), so names
    and braces inside label values are not read as PromQL."""
    return _STRING.sub(lambda m: m.group()[0] + " " * (len(m.group()) - 2) + m.group()[-1], expr)


def _label_replace_targets(expr: str) -> set[str]:
    """The labels ``label_replace`` calls create (their second argument)."""
    masked = _masked(expr)
    created = set()
    for call in re.finditer(r"\blabel_replace\s*\(", masked):
        depth, i = 0, call.end()
        while i < len(masked):
            c = masked[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 0:
                after = expr[i + 1 :]
                literal = _STRING.match(after, len(after) - len(after.lstrip()))
                if literal:
                    created.add(literal.group()[1:-1])
                break
            i += 1
    return created


@dataclass
class Usage:
    metrics: set[str]
    problems: list[str]
    labels: frozenset[str]  # every label the expression's result may carry


def check_expr(expr: str) -> Usage:
    """Names and labels of ``expr`` against what the code exports."""
    known = samples()
    masked = _masked(expr)
    problems = []
    used: set[str] = set()
    for selector in _SELECTOR.finditer(masked):
        name, braces = selector.group(1), selector.group(2) or ""
        used.add(name)
        if name not in known:
            problems.append(f"{name} is not a sample pushfan exports")
            continue
        for key in _MATCHER_KEY.findall(braces):
            if key not in known[name]:
                problems.append(f"{name} has no label {key!r} (it has {sorted(known[name])})")
    labels = frozenset(
        TARGET_LABELS.union(*(known.get(n, frozenset()) for n in used))
        | _label_replace_targets(expr)
    )
    for grouping in _GROUPING.findall(masked):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in labels:
                problems.append(f"groups by {label!r}, which none of {sorted(used)} has")
    return Usage(used, problems, labels)


# -- the files ----------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


# -- promtool -----------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    done = promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


@needs_promtool
def test_promtool_checks_the_config_and_its_rule_files() -> None:
    done = promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


@needs_promtool
def test_promtool_checks_the_kubernetes_config(tmp_path: Path) -> None:
    """The Kubernetes scrape config; a promtool built without Kubernetes discovery
    (Debian's) checks the rest of it (relabelling, rule files) with the discovery block
    swapped for an empty static one."""
    done = promtool("check", "config", str(PROMETHEUS_K8S_CONFIG.relative_to(ROOT)))
    if "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
        config = load_yaml(PROMETHEUS_K8S_CONFIG)
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": []}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(ALERTS, tmp_path / "alerts.yml")
        done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


@needs_promtool
def test_the_alerts_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_the_alerts_unit_tests_fail_on_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests catch a wrong threshold (so they test something)."""
    text = ALERTS.read_text()
    broken = text.replace("> 0.05\n", "> 0.5\n", 1)  # PushfanProviderErrorRateHigh
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode != 0
    assert "PushfanProviderErrorRateHigh" in done.stdout + done.stderr


@needs_promtool
def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables made durations, as a recording rule
    for promtool to parse."""
    rules = []
    for n, (_, target) in enumerate(dashboard_targets()):
        expr = target["expr"]
        for variable, duration in GRAFANA_DURATIONS.items():
            expr = expr.replace(variable, duration)
        assert "$" not in expr, f"a Grafana variable promtool cannot parse: {expr}"
        rules.append({"record": f"dashboard:expr_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# -- names and labels ---------------------------------------------------------------------


def test_the_checker_finds_wrong_names_and_labels() -> None:
    """What the tests below rely on: a misspelt metric, a counter without _total, a
    label a metric lacks and a grouping label nothing has are each reported."""
    for right in (
        'sum by (platform) (rate(pushfan_worker_sends_total{outcome="x"}[5m]))',
        "histogram_quantile(0.9, sum by (le) (rate(pushfan_worker_send_seconds_bucket[5m])))",
        "pushfan_worker_shards_running",
    ):
        assert check_expr(right).problems == [], right
    for wrong in (
        "rate(pushfan_worker_send_total[5m])",
        "rate(pushfan_worker_sends[5m])",
        "pushfan_worker_send_seconds",
        'rate(pushfan_worker_sends_total{status="5xx"}[5m])',
        "sum by (status) (rate(pushfan_worker_sends_total[5m]))",
    ):
        assert check_expr(wrong).problems, wrong
    # names inside strings are label values, not metrics; label_replace makes a label
    fine = (
        'sum by (source) (label_replace(pushfan_ready{service="pushfan_x"}, "source", "a", "", ""))'
    )
    assert check_expr(fine).problems == []
    assert check_expr(fine).metrics == {"pushfan_ready"}


def test_alerts_use_exported_metrics_and_labels() -> None:
    problems = []
    for rule in alert_rules():
        usage = check_expr(rule["expr"])
        problems += [f"{rule['alert']}: {p}" for p in usage.problems]
        for text in rule["annotations"].values():
            for label in _ANNOTATION_LABEL.findall(text):
                if label not in usage.labels:
                    problems.append(f"{rule['alert']}: annotation uses $labels.{label}")
    assert problems == []


def test_dashboard_uses_exported_metrics_and_labels() -> None:
    problems = []
    for title, target in dashboard_targets():
        usage = check_expr(target["expr"])
        problems += [f"{title!r}: {p}" for p in usage.problems]
        for label in _LEGEND.findall(target.get("legendFormat", "")):
            if label not in usage.labels:
                problems.append(f"{title!r}: legend uses {{{{{label}}}}}")
    assert problems == []


def test_every_exported_metric_is_on_the_dashboard() -> None:
    """A metric added to pushfan/metrics.py needs a panel (or a reason here)."""
    shown = {
        name for _, target in dashboard_targets() for name in check_expr(target["expr"]).metrics
    }
    missing = [
        family.name
        for family in families().values()
        if not any(sample.startswith(family.name) for sample in shown)
    ]
    assert missing == []


# -- the dashboard's structure ------------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "pushfan"
    assert board["title"] == "pushfan"
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = list(all_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) for i in ids)
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel.get("title"), where
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), where
        assert grid["w"] > 0, where
        assert grid["h"] > 0, where
        assert 0 <= grid["x"] <= 24 - grid["w"], where
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target["datasource"] == DATASOURCE, where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard()["panels"]):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[x, y]!r}"
                taken[x, y] = panel["title"]


def test_grafana_provisioning() -> None:
    provisioning = GRAFANA / "provisioning"
    sources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert [(s["uid"], s["type"], s["url"]) for s in sources] == [
        ("prometheus", "prometheus", "http://prometheus:9090")
    ]
    providers = load_yaml(provisioning / "dashboards" / "pushfan.yml")["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [
        ("file", "/var/lib/grafana/dashboards")
    ]


# -- alerts, scrape config, runbook -------------------------------------------------------


def test_alert_rules_have_for_severity_annotations_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    headings = {
        _anchor(m.group(1)) for m in re.finditer(r"^#{2,4} (.+)$", runbook, flags=re.MULTILINE)
    }
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Pushfan[A-Za-z0-9]+", name)
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/operations.md", name
        assert anchor == name.lower(), name
        assert anchor in headings, f"{name}: no section #{anchor} in docs/operations.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [
        case for test in load_yaml(ALERTS_TEST)["tests"] for case in test.get("alert_rule_test", [])
    ]
    for name in (r["alert"] for r in alert_rules()):
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


# The job of each service, as the alerts and the dashboard know them, and its port.
SCRAPED = {
    "pushfan-worker": ("worker", WorkerSettings().metrics_port),
    "pushfan-registry": ("registry", RegistrySettings().port),
    "pushfan-cleanup": ("cleanup", HygieneSettings().cleanup_metrics_port),
    "pushfan-bridge": ("bridge", BridgeSettings().metrics_port),
}


def test_compose_scrape_targets_find_every_replica() -> None:
    """prometheus.yml against docker-compose.yml: a service that can be scaled (no
    published port, no container name) is found by DNS, each replica a target; one that
    cannot is a static target. Names and ports are the services' and the settings'."""
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    services = load_yaml(COMPOSE)["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs.keys() == SCRAPED.keys()
    for name, (service, port) in SCRAPED.items():
        job, compose = jobs[name], services[service]
        scalable = "ports" not in compose and "container_name" not in compose
        if scalable:
            assert "static_configs" not in job, name
            assert job["dns_sd_configs"] == [{"names": [service], "type": "A", "port": port}]
        else:
            assert "dns_sd_configs" not in job, name
            targets = [t for c in job["static_configs"] for t in c["targets"]]
            assert targets == [f"{service}:{port}"]
    # `docker compose up --scale worker=N` is what the compose file and its README offer.
    assert "dns_sd_configs" in jobs["pushfan-worker"]


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling (keep, drop, replace) of one target; None if dropped."""
    out = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        assert action in ("keep", "drop", "replace"), f"{action}: not simulated here"
        joined = rule.get("separator", ";").join(out.get(n, "") for n in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), joined)
        if action == "keep" and match is None:
            return None
        if action == "drop" and match is not None:
            return None
        if action == "replace" and match is not None:
            template = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            out[rule["target_label"]] = match.expand(template)
    return out


def _meta(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _pods() -> dict[str, dict[str, str]]:
    """What Kubernetes pod discovery gives Prometheus for one pod of each workload of
    deploy/k8s (Deployments, Jobs, the CronJob), by workload name."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            kind = obj and obj["kind"]
            if kind not in ("Deployment", "Job", "CronJob"):
                continue
            spec = obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"]
            template = spec["template"]
            (container, *_) = template["spec"]["containers"]
            ports = [p["containerPort"] for p in container.get("ports", [])]
            ip = "10.0.0.7"
            meta = {
                "__address__": f"{ip}:{ports[0]}" if ports else ip,
                "__meta_kubernetes_namespace": "pushfan",
                "__meta_kubernetes_pod_name": f"{obj['metadata']['name']}-7d9f8-x2x4z",
                "__meta_kubernetes_pod_ip": ip,
                "__meta_kubernetes_pod_phase": "Running",
            }
            for key, value in template["metadata"].get("labels", {}).items():
                meta[f"__meta_kubernetes_pod_label_{_meta(key)}"] = value
            for key, value in template["metadata"].get("annotations", {}).items():
                meta[f"__meta_kubernetes_pod_annotation_{_meta(key)}"] = value
            out[obj["metadata"]["name"]] = meta
    return out


def test_kubernetes_scrape_config_finds_each_service_under_its_job() -> None:
    """prometheus-kubernetes.yml's relabelling applied to the pods of deploy/k8s: each
    service's pods are scraped on the settings' port under the job name the alerts and
    the dashboard use; one-shot pods are not scraped."""
    config = load_yaml(PROMETHEUS_K8S_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    (discovery,) = job["kubernetes_sd_configs"]
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert discovery == {"role": "pod", "namespaces": {"names": [kustomization["namespace"]]}}
    pods = _pods()
    scraped = {}
    for meta in pods.values():
        target = _relabel(meta, job["relabel_configs"])
        if target is not None:
            assert target["job"] not in scraped, target
            scraped[target["job"]] = (target["__address__"], target["__metrics_path__"])
            assert target["instance"] == meta["__meta_kubernetes_pod_name"]
    assert scraped == {job: (f"10.0.0.7:{port}", "/metrics") for job, (_, port) in SCRAPED.items()}
    assert {"pushfan-migrate", "pushfan-hygiene"} <= pods.keys()  # found, and left out
    finished = {**pods["pushfan-worker"], "__meta_kubernetes_pod_phase": "Succeeded"}
    assert _relabel(finished, job["relabel_configs"]) is None


def test_the_runbook_lists_every_exported_metric() -> None:
    rows = re.findall(
        r"^\| `(pushfan_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", RUNBOOK.read_text(), re.MULTILINE
    )
    listed = {name: (kind, re.findall(r"`(\w+)`", labels)) for name, kind, labels in rows}
    expected = {_query_name(f): (f.type, list(f.labels)) for f in families().values()}
    assert listed == expected


def test_the_docs_name_real_settings() -> None:
    """Settings named in the runbook, the deploy README and the Prometheus files exist
    (``PUSHFAN_RETRY__*``: a section that exists)."""
    names = {name for name, _ in env_names()}
    sections = {name.rsplit("__", 1)[0] + "__" for name in names}
    paths = [
        RUNBOOK,
        ROOT / "deploy" / "README.md",
        ALERTS,
        PROMETHEUS_CONFIG,
        PROMETHEUS_K8S_CONFIG,
    ]
    unknown = {
        (path.name, found)
        for path in paths
        for found in re.findall(r"PUSHFAN_[A-Z0-9_]+", path.read_text())
        if found not in names and found not in sections
    }
    assert unknown == set()


def _query_name(family: Family) -> str:
    """The name one queries: a counter's ``_total``; a histogram's family name."""
    return f"{family.name}_total" if family.type == "counter" else family.name
