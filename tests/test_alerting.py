"""What operators see: the alert and recording rules (deploy/prometheus/), the Grafana dashboard
(deploy/grafana/) and the PodMonitor that scrapes the workers (deploy/kubernetes/podmonitor.yaml).

promtool (Debian's prometheus package; `make setup` runs `make promtool`, which installs it where
apt-get can) checks the rules, runs their unit tests (deploy/prometheus/rules_test.yaml) and parses
every dashboard query; without it these tests skip, unless CI=true. A real worker runs a few jobs and
every metric name a rule or a panel queries must be on its /metrics, except the few named below as
coming from elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings
from sidecar.grant import make_grant
from sidecar.storage import Storage
from tests.conftest import IN_CI, ROOT
from tests.helpers import WorkerProcess, wait_until

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "a1111-sidecar.json"
PODMONITOR = ROOT / "deploy" / "kubernetes" / "podmonitor.yaml"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "deployment.yaml"

# Names a rule or a panel may query that the worker does not export, each with where it comes from.
EXTERNAL = {
    "up": "Prometheus itself, per scrape target",
    "keda_scaler_metrics_value": "KEDA's operator: the queue length its azure-queue trigger reads",
}
# The recording rules' names (rules.yaml), which alerts may query.
RECORDED = {
    "job:sidecar_images:rate5m",
    "job_outcome:sidecar_jobs:rate5m",
    "instance:sidecar_a1111_busy_ratio:rate5m",
    "job:sidecar_a1111_busy_ratio:avg_rate5m",
}
SEVERITIES = {"warning", "critical"}
JOB = {"prompt": "a red bicycle", "steps": 2, "width": 64, "height": 64}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            raise AssertionError("promtool is missing: `make promtool` installs it (Debian's prometheus)")
        pytest.skip("promtool is missing (make promtool; Debian's prometheus package)")
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL query of the dashboard: the panels' targets and the variables' label_values()."""
    targets = [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]
    return targets + variable_queries(board)


def variable_queries(board: dict[str, Any]) -> list[str]:
    """The series selectors of the dashboard's variables (label_values(SELECTOR, label))."""
    queries = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: not a label_values() query: {query}"
            queries.append(match.group(1))
    return queries


def as_promql(query: str) -> str:
    """A dashboard query as Prometheus reads it once Grafana has put in its variables."""
    query = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", query)
    return re.sub(r"\$\{?\w+\}?", ".+", query)


PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
    # aggregations, which may be followed by `by (...)` instead of their parenthesis
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values",
}  # fmt: skip
TOKEN = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)"""
    r"|(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?)"
    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<other>.)",
    re.DOTALL,
)


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL query selects: every name that is no function, aggregation, keyword,
    label name (in a {...} matcher or a by/without/on/ignoring/group_* list) or duration."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(as_promql(query)) if not m.group().isspace()]
    names: set[str] = set()
    depth_braces = 0
    label_list = False
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text == "{":
            depth_braces += 1
        elif text == "}":
            depth_braces -= 1
        elif text == ")" and label_list:
            label_list = False
        elif kind == "name" and not depth_braces and not label_list:
            lowered = text.lower()
            if lowered in {"by", "without", "on", "ignoring", "group_left", "group_right"}:
                label_list = following == "("
            elif lowered in PROMQL_KEYWORDS or following == "(":
                continue  # a keyword, or a function or aggregation being called
            else:
                names.add(text)
    return names


def queried_names() -> dict[str, set[str]]:
    """Metric name -> where it is queried (the rule or panel)."""
    where: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            where.setdefault(name, set()).add(f"rules.yaml {rule.get('alert') or rule.get('record')}")
    board = dashboard()
    for panel in panels(board):
        for target in panel.get("targets", []):
            for name in metric_names(target.get("expr", "")):
                where.setdefault(name, set()).add(f"dashboard panel {panel['title']!r}")
    for query in variable_queries(board):
        for name in metric_names(query):
            where.setdefault(name, set()).add("dashboard variables")
    return where


def test_metric_names_are_read_from_promql() -> None:
    """The extraction itself, on the shapes the rules and panels use."""
    assert metric_names(
        'histogram_quantile(0.95, sum by (stage, le) (rate(sidecar_stage_seconds_bucket{job=~"$job",'
        'stage="generate"}[$__rate_interval])))'
    ) == {"sidecar_stage_seconds_bucket"}
    assert metric_names(
        "sum without (stage) (sidecar_in_flight) > 0"
        " unless ignoring(outcome) increase(sidecar_images_total[15m]) > 0"
    ) == {"sidecar_in_flight", "sidecar_images_total"}
    assert metric_names(
        'a_total{outcome="lost"} > 0 unless a_total offset 15m or on() group_left(x) b:c:rate5m * 1e3'
    ) == {"a_total", "b:c:rate5m"}
    assert metric_names('count by (version, python) (sidecar_build_info{instance=~"$instance"})') == {
        "sidecar_build_info"
    }


# --------------------------------------------------------------------------- the rules


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_says_what_and_how_bad() -> None:
    found = alerts()
    assert found
    for rule in found:
        name = rule["alert"]
        assert re.fullmatch(r"Sidecar[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, (
            f"{name}: severity {rule['labels'].get('severity')!r}"
        )
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert len(annotations.get("description", "").split()) >= 10, f"{name}: no real description"
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names)), "two alerts share a name"


def test_the_operators_alerts_are_all_there() -> None:
    """The issue's list: down, not ready, restarting, stalled, failures, poison, lost, GPU idle, slow
    generations and uploads, the credential (a day, an hour)."""
    by_name = {rule["alert"]: rule for rule in alerts()}
    expected = {
        "SidecarWorkerDown": "up",
        "SidecarNotReady": "sidecar_ready",
        "SidecarRestarting": "process_start_time_seconds",
        "SidecarWorkerStalled": "sidecar_in_flight",
        "SidecarFleetStalled": "keda_scaler_metrics_value",
        "SidecarFailureRatioHigh": "sidecar_jobs_total",
        "SidecarPoisonSpike": "sidecar_jobs_total",
        "SidecarMessageLost": "sidecar_jobs_total",
        "SidecarGpuIdle": "instance:sidecar_a1111_busy_ratio:rate5m",
        "SidecarSlowGenerations": "sidecar_stage_seconds_bucket",
        "SidecarSlowUploads": "sidecar_stage_seconds_bucket",
        "SidecarCredentialExpiresWithinADay": "sidecar_credential_expiry_seconds",
        "SidecarCredentialExpiresWithinAnHour": "sidecar_credential_expiry_seconds",
    }
    assert set(by_name) == set(expected)
    for name, metric in expected.items():
        assert metric in metric_names(by_name[name]["expr"]), f"{name} does not query {metric}"
    assert by_name["SidecarMessageLost"]["labels"]["severity"] == "critical"
    assert by_name["SidecarCredentialExpiresWithinAnHour"]["labels"]["severity"] == "critical"
    assert by_name["SidecarNotReady"]["for"] == "30m", "not ready must outlast a cold start"
    assert (
        'outcome="lost"' in by_name["SidecarMessageLost"]["expr"]
        and "for" not in by_name["SidecarMessageLost"]
    )
    records = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    assert set(records) == RECORDED, "RECORDED must list exactly the recording rules"
    assert records["job:sidecar_images:rate5m"] == "sum by (job) (rate(sidecar_images_total[5m]))"


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    """rules_test.yaml has, for every alert, a case where it fires and one where it must not."""
    document = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    assert document["rule_files"] == [RULES.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for group in document["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), f"never shown firing: {sorted(names - fires)}"
    assert names - silent == set(), f"never shown silent: {sorted(names - silent)}"
    assert (fires | silent) - names == set(), (
        f"tests of alerts that do not exist: {sorted((fires | silent) - names)}"
    )
    # The first group is a healthy fleet: every alert silent there.
    healthy = {
        case["alertname"] for case in document["tests"][0]["alert_rule_test"] if not case["exp_alerts"]
    }
    assert healthy == names


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_is_importable_and_covers_the_fleet() -> None:
    board = dashboard()
    assert board["uid"] == "a1111-sidecar" and board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']}: off the grid"
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), (
            f"panel {panel.get('id')} lacks a title or description"
        )
        assert panel["datasource"]["uid"] == "${datasource}", f"{panel['title']}: a fixed data source"
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    queried = set(queried_names())
    # The panels: images/min, busy ratio, stage latencies p50/p95, failures by outcome, in
    # flight, job age, credential expiry, A1111 errors by status, storage errors by code.
    for name in (
        "sidecar_images_total",
        "sidecar_a1111_busy_seconds_total",
        "sidecar_stage_seconds_bucket",
        "sidecar_jobs_total",
        "sidecar_in_flight",
        "sidecar_job_age_seconds_bucket",
        "sidecar_credential_expiry_seconds",
        "sidecar_a1111_errors_total",
        "sidecar_storage_errors_total",
    ):
        assert name in queried, f"no panel shows {name}"
    text = DASHBOARD.read_text(encoding="utf-8")
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.95," in text
    for label in ("outcome", "status", "code"):
        assert f"sum by ({label})" in text, f"nothing broken down by {label}"


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    """promtool parses every query, put into a rule file as recording rules with Grafana's variables
    filled in as Grafana would."""
    queries = dashboard_queries(dashboard())
    document = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": as_promql(q)} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    checked = run_promtool("check", "rules", path.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --------------------------------------------------------------------------- what a worker exports


async def test_every_queried_metric_is_exported_by_a_worker(
    make_settings: Any, standin: Any, tmp_path: Path
) -> None:
    """Steps: a worker on a SAS from `grant` (so the credential's countdown is on) runs three jobs; its
    /metrics is scraped; every name a rule or panel queries is one of its samples (a histogram's
    _bucket/_sum/_count), a recording rule, or one of the few EXTERNAL names."""
    admin: Settings = make_settings()
    store = Storage.connect(admin)
    await store.ensure()
    queue = admin.queue_name[0]
    try:
        grant = make_grant(admin, 2)
        node = make_settings(
            storage_connection_string=grant.settings["SIDECAR_STORAGE_CONNECTION_STRING"],
            blob_connection_string=grant.settings["SIDECAR_BLOB_CONNECTION_STRING"],
            queue_name=queue,
            container_name=admin.container_name,
        )
        for index in range(3):
            await store.send(queue, json.dumps({**JOB, "id": f"alerting-{index}"}))
        worker = WorkerProcess(node, log_dir=tmp_path)
        try:
            await worker.wait_for(lambda: len(worker.done_jobs()) >= 3, timeout=60, what="3 jobs done")
            port = int(worker.messages("starting")[0]["http_port"])

            async def scraped() -> str:
                async with httpx.AsyncClient() as http:
                    response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                response.raise_for_status()
                return response.text

            await wait_until(lambda: _images_at_least(scraped, 3), timeout=10, what="3 images counted")
            text = await scraped()
        finally:
            worker.stop()
    finally:
        await store.close()

    families = list(text_string_to_metric_families(text))
    exported = {sample.name for family in families for sample in family.samples}
    histograms = {family.name for family in families if family.type == "histogram"}
    missing = {}
    for name, where in sorted(queried_names().items()):
        if name in EXTERNAL or name in RECORDED:
            continue
        if name not in exported:
            missing[name] = sorted(where)
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base != name and name.endswith("_bucket"):
            assert base in histograms, (
                f"{name} is queried as a histogram's buckets, but {base} is no histogram"
            )
    assert not missing, "queried but not on the worker's /metrics:\n" + "\n".join(
        f"  {name}: {', '.join(where)}" for name, where in missing.items()
    )
    # The countdown is on with a SAS (and far from either alert's threshold).
    (expiry,) = [
        s.value for f in families for s in f.samples if s.name == "sidecar_credential_expiry_seconds"
    ]
    assert 86400 < expiry <= 2 * 86400


async def _images_at_least(scrape: Any, count: int) -> bool:
    text = await scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sidecar_images_total":
                return bool(sample.value >= count)
    return False


# --------------------------------------------------------------------------- the PodMonitor


def test_podmonitor_scrapes_the_workers_http_port() -> None:
    """It selects the Deployment's pods by their labels, scrapes the container port named `http` at
    /metrics, and names the job a1111-sidecar, as the rules' `up` and `process_*` selectors expect."""
    (monitor,) = [d for d in yaml.safe_load_all(PODMONITOR.read_text(encoding="utf-8")) if d]
    (deployment,) = [
        d
        for d in yaml.safe_load_all(DEPLOYMENT.read_text(encoding="utf-8"))
        if d and d["kind"] == "Deployment"
    ]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    template = deployment["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items(), "the selector misses the worker pods"
    (container,) = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint.get("path", "/metrics") == "/metrics"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports[endpoint["port"]])
    job_label = monitor["spec"]["jobLabel"]
    assert template["metadata"]["labels"][job_label] == "a1111-sidecar"
    assert 'up{job="a1111-sidecar"}' in RULES.read_text(encoding="utf-8")
