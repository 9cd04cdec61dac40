"""The Grafana dashboard, checked against a REAL Prometheus scraping a REAL worker.

A dashboard query that names a metric wrongly, or a label the worker never
exports, shows an empty panel and nothing fails. So this test starts
Debian's `prometheus` binary (scrape interval 1 s) on a `celery worker`
process's /metrics, feeds that worker the captured relay-openai runs through
the agent-side client, and then evaluates EVERY `expr` of every panel of
docs/grafana/adaptive-worker.json through Prometheus's HTTP API, with the
dashboard's template variables resolved the way Grafana resolves them
(`label_values(...)` asked of Prometheus, multi-value as a regex
alternation): each must return data. The queries are read from the JSON, so
a new panel is checked without touching this file.

The compose profile that runs Prometheus and Grafana is checked statically
(no container engine here): its files exist, agree with each other, and
`promtool` accepts the Prometheus configuration.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from adaptive_worker_client import RunClient
from storage.store import Store
from tests.conftest import REDIS_URL
from tests.goldens import load_capture
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from tests.test_metrics import free_port
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "docs" / "grafana"
DASHBOARD = GRAFANA / "adaptive-worker.json"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS = (
    "Debian's `prometheus` package is not installed (no `prometheus` on PATH);"
    " .ci/run installs it with apt-get, which failed or was not run"
)

# Grafana's built-in interval variables, as Grafana would set them for a
# one-hour view of a Prometheus scraped every 15 s ($__rate_interval is at
# least four scrape intervals).
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
# `$name`, `${name}`, `${name:format}` and the deprecated `[[name]]`.
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*$")
# Hostile on purpose: quotes, a backslash, a regex metacharacter, non-ASCII.
HOSTILE_AGENT = 'agent "q" \\ (x|y) ü'
AGENTS = ["cap-a", "cap-b", HOSTILE_AGENT]


# ------------------------------------------------------------------ dashboard


@dataclass(frozen=True, slots=True)
class Query:
    panel: str
    ref: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide")
    ]


def variable_query(variable: dict[str, Any]) -> str:
    """The PromQL/label_values text of a query variable (string or Grafana 10+ object form)."""
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def promql_regex_alternation(values: list[str]) -> str:
    """A multi-value selection as Grafana puts it into `=~"$var"`: `(a|b)`, each value
    regex-escaped, then escaped for a PromQL double-quoted string."""
    escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", v) for v in values]
    regex = "(" + "|".join(escaped) + ")"
    return regex.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        assert name in values, f"{expr!r} uses ${name}, which the dashboard does not define"
        return values[name]

    return VARIABLE.sub(one, expr)


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "adaptive-worker" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = dashboard_queries(dashboard)
    exprs = " ".join(q.expr for q in queries)
    # What issue 13 asks the dashboard to show, by the metrics that carry it.
    for metric in (
        "adaptive_up",
        "adaptive_learning_lag_runs",
        "adaptive_runs_ingested_total",
        "adaptive_runs_learned_total",
        "adaptive_dead_letters_total",
        "adaptive_learn_conflicts_total",
        "adaptive_agent_llm_latency_seconds",
        "adaptive_agent_output_tokens",
        "adaptive_agent_plan_groups",
        "adaptive_agent_stable_prefix_blocks",
        "adaptive_metrics_agents_omitted",
    ):
        assert metric in exprs, f"no panel queries {metric}"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        # Every panel and target goes through the datasource variable, so an
        # imported copy works with whatever the Prometheus datasource is called.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()
    # Per-agent panels follow the `agent` variable.
    for q in queries:
        if "adaptive_agent_" in q.expr and "_errors_total" not in q.expr:
            assert 'agent_id=~"$agent"' in q.expr, q


def test_compose_profile_files_agree() -> None:
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    mounts: dict[str, dict[str, str]] = {}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+", services[name]["image"]), name
        mounts[name] = {}
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                mounts[name][target] = source
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./docs/grafana/prometheus.yml"
    # Grafana: the provisioning tree, and the dashboard where its provider looks.
    provisioning = mounts["grafana"]["/etc/grafana/provisioning"]
    assert provisioning == "./docs/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/adaptive-worker.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert (
        mounts["grafana"][f"{folder}/adaptive-worker.json"] == "./docs/grafana/adaptive-worker.json"
    )
    env = services["grafana"]["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{folder}/adaptive-worker.json"
    # A read-only view: no login to leave at admin/admin, viewers only.
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true" and env["GF_AUTH_BASIC_ENABLED"] == "false"
    (datasource,) = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    # Prometheus scrapes the worker service on the metrics port the workers use.
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    (sd,) = config["scrape_configs"][0]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and "worker" in services
    assert sd["port"] == Settings.model_fields["metrics_port"].default
    assert str(sd["port"]) in services["worker"]["expose"]


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS.replace("`prometheus`", "`promtool`"))
def test_compose_prometheus_config_is_valid() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "config", str(GRAFANA / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


# ------------------------------------------------------------ real Prometheus


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@dataclass
class RunningPrometheus:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = api(self.base, "/api/v1/query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        result: list[dict[str, Any]] = (
            data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]
        )
        return result

    def label_values(self, label: str, match: str | None) -> list[str]:
        params = {"match[]": match} if match else {}
        values: list[str] = api(self.base, f"/api/v1/label/{label}/values", **params)
        return values


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """A factory: start Prometheus scraping a target every second; stopped after the test."""
    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    started: list[RunningPrometheus] = []

    def start(target: str) -> RunningPrometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "adaptive-worker",
                            "scrape_interval": "1s",
                            "scrape_timeout": "1s",
                            "static_configs": [{"targets": [target]}],
                        }
                    ],
                }
            )
        )
        port = free_port()
        log = tmp_path / "prometheus.log"
        assert PROMETHEUS is not None
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = RunningPrometheus(proc, f"http://127.0.0.1:{port}", log)
        started.append(running)

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{running.base}/-/ready", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(ready, 30, "prometheus to be ready", lambda: log.read_text()[-2000:])
        return running

    yield start
    for running in started:
        running.proc.terminate()
        try:
            running.proc.wait(10)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait(10)


def fixture_runs(agent: str, n: int) -> list[dict[str, Any]]:
    """The captured relay-openai runs for `agent` (ids unique per agent)."""
    runs = []
    for raw in load_capture("relay-openai").runs:
        run = json.loads(raw)
        run["agent_id"] = agent
        run["id"] = f"00000000-0000-4000-8{n:03d}-{len(runs):012d}"
        runs.append(run)
    return runs


def describe(result: list[dict[str, Any]]) -> str:
    """`{labels} value` per series, for the log this test prints."""
    parts = []
    for series in result:
        labels = series.get("metric") or ""
        parts.append(f"{labels} {series['value'][1]}".strip())
    return "; ".join(parts)


@pytest.mark.slow
def test_every_dashboard_query_returns_data(
    real_store: Store, tmp_path: Path, prometheus: Any
) -> None:
    started = time.monotonic()
    prefix = real_store.keys.prefix
    metrics_port = free_port()
    env = worker_env(
        prefix, REDIS_URL, metrics_port=metrics_port, metrics_bind="127.0.0.1", learn_linger_s=0
    )
    with celery_workers(env, tmp_path) as workers:
        workers.start("metrics", concurrency=1)
        prom: RunningPrometheus = prometheus(f"127.0.0.1:{metrics_port}")
        wait_until(
            lambda: [s["value"][1] for s in prom.query("adaptive_up")] == ["1"],
            30,
            "Prometheus to scrape the worker (adaptive_up 1)",
            lambda: prom.log.read_text()[-2000:],
        )

        # The agent's side: real runs through the client and the broker,
        # plus one payload that can only be dead-lettered.
        settings = load_settings(
            _env_file=None,
            redis_url=REDIS_URL,
            key_prefix=prefix,
            client_spool_dir=tmp_path / "spool",
        )
        client = RunClient(settings)
        for n, agent in enumerate(AGENTS):
            for run in fixture_runs(agent, n):
                client.submit_run(run)
        client.submit_run('{"agent_id": "cap-a", "calls": "not a list"}')
        assert client.flush(30)
        client.close(5)
        expected = {agent: 4 for agent in AGENTS}
        wait_until(lambda: caught_up(real_store, AGENTS, expected), 60, "learning to catch up")

        dashboard = load_dashboard()
        variables: dict[str, str] = dict(BUILTINS)
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            text = variable_query(variable)
            parsed = LABEL_VALUES.match(text)
            assert parsed, f"variable {variable['name']}: unsupported query {text!r}"
            metric, label = parsed.groups()

            def resolved(m: str | None = metric, lab: str = label) -> bool:
                return set(prom.label_values(lab, m)) >= set(AGENTS)

            # The per-agent gauges appear once learned and the insight cache (5 s) renews.
            wait_until(resolved, 30, f"variable {variable['name']} to list every agent")
            values = sorted(prom.label_values(label, metric))
            assert values == sorted(AGENTS), values
            variables[variable["name"]] = promql_regex_alternation(values)

        queries = dashboard_queries(dashboard)
        assert len(queries) >= 15
        results: dict[Query, list[dict[str, Any]]] = {}

        def all_answer() -> bool:
            for q in queries:
                results[q] = prom.query(substitute(q.expr, variables))
            return all(results.values())

        def empty() -> str:
            return ": empty: " + ", ".join(
                f"{q.panel}/{q.ref}" for q, r in results.items() if not r
            )

        wait_until(all_answer, 30, "every dashboard query to return data", empty)

        # While the worker still runs: once it stops, Prometheus marks its
        # series stale and instant queries return nothing.
        # Beyond "not empty": numbers known from the fixture and what was fed.
        def one(expr: str) -> float:
            (series,) = prom.query(expr)
            return float(series["value"][1])

        assert one("min(adaptive_up)") == 1
        assert one("max(adaptive_agents)") == len(AGENTS)
        assert one("max(adaptive_runs_learned_total)") == 4 * len(AGENTS)
        assert one("max(adaptive_dead_letter_list_length)") == 1
        assert one("sum(max by (agent_id) (adaptive_learning_lag_runs))") == 0
        # The captured plan of these runs has 3 parallel groups (fixtures/relay-openai/plan.json).
        plan = {
            s["metric"]["agent_id"]: s["value"][1] for s in prom.query("adaptive_agent_plan_groups")
        }
        assert plan == dict.fromkeys(AGENTS, "3")
        assert one("max(adaptive_metrics_agents_omitted)") == 0

    # The `agent` selection (every agent, the hostile id too, regex- and
    # string-escaped) matches each agent's series in every per-agent panel.
    for q in queries:
        if "$agent" in q.expr:
            assert {s["metric"]["agent_id"] for s in results[q]} == set(AGENTS), q

    print(f"\n{len(queries)} dashboard queries, all with data:")
    for q in queries:
        print(f"- [{q.panel} / {q.ref}] {q.expr}\n    -> {describe(results[q])}")
    elapsed = time.monotonic() - started
    assert elapsed < 90, f"took {elapsed:.0f} s"
