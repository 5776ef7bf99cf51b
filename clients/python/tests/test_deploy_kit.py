"""The operators' kit against the live binary: every metric the Grafana dashboard and the
Prometheus alert rules query is one sandboxd exports on /metrics (so neither silently shows
nothing after a rename)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sandboxd_client import Client

from .conftest import Server

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")
# PromQL words that look like names but are not metrics.
NOT_METRICS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "time", "max", "min", "le",
    "instance", "job", "phase", "state", "start", "result", "kind", "outcome", "operation",
    "up", "humanize", "humanizeDuration", "value", "labels", "and", "or", "without",
}


def exported(metrics_text: str) -> set[str]:
    names: set[str] = set()
    for line in metrics_text.splitlines():
        m = re.match(r"# TYPE (\S+) ", line)
        if m:
            names.update(m.group(1) + s for s in SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w.startswith("sandbox")}


def test_every_metric_the_dashboard_queries_is_exported(server: Server) -> None:
    text = Client(server.url, token=server.token).metrics()
    names = exported(text)
    dashboard = json.loads((DEPLOY / "grafana" / "sandboxd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 20
    used = set().union(*(referenced(e) for e in exprs))
    missing = sorted(used - names)
    assert not missing, f"the dashboard queries metrics sandboxd does not export: {missing}"
    # The panels the kit promises.
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("phase", "create latency", "starts", "backoff", "data plane", "egress", "pool"):
        assert topic in titles, topic


def test_every_metric_the_alert_rules_query_is_exported(server: Server) -> None:
    names = exported(Client(server.url, token=server.token).metrics())
    rules = (DEPLOY / "prometheus" / "sandboxd-alerts.yml").read_text()
    exprs = re.findall(r"^\s+expr: (.+)$", rules, re.M)
    assert len(exprs) >= 10
    used = set().union(*(referenced(e) for e in exprs))
    missing = sorted(used - names)
    assert not missing, f"alert rules query metrics sandboxd does not export: {missing}"
