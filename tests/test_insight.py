"""`tasks.insight`: every number of the report, checked against hand-computed values.

The agent is the captured `cap-agent` (relay-openai and relay-anthropic: the
real NeMo Relay runtime's four runs and the state it learned from them),
loaded into the real Redis under a private prefix. Expected values come
from the captured files: learned quantiles from the captured trie (the
runtime's own p50/p90), measured ones from the run records' start/end
times with plain sorted-list arithmetic written here, and a few literal
numbers worked out by hand from the timestamps (in the comments).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from storage.store import Store
from tasks import insight
from tests.goldens import CAPTURES, Capture, load_capture

pytestmark = pytest.mark.redis

OPENAI = "relay-openai"


# --------------------------------------------------------------- fixture state


def load_into(client: redis.Redis, prefix: str, capture: Capture, *, learned: int = 4) -> Store:
    """Every captured key under `prefix` instead of the capture's, plus what our
    learn commit adds to the runtime's keys: the agent's learning-key set and
    its cursor (`learned` runs learned)."""
    for entry in capture.keys:
        key = prefix + entry.key[len(capture.prefix) :]
        if isinstance(entry.raw, list):
            client.rpush(key, *entry.raw)
        else:
            client.set(key, entry.raw)
    store = Store(client, prefix)
    client.sadd(store.keys.learning_key_set(capture.agent_id), capture.learning_key())
    client.hset(store.keys.cursor(capture.agent_id), mapping={"learned": learned, "version": 1})
    return store


@pytest.fixture
def loaded(real_redis: redis.Redis) -> Iterator[dict[str, tuple[Store, Capture]]]:
    """Both captures, each under its own fresh prefix."""
    stores = {}
    for name in CAPTURES:
        prefix = f"test:{uuid.uuid4().hex[:12]}:"
        stores[name] = (load_into(real_redis, prefix, load_capture(name)), load_capture(name))
    yield stores
    for store, _ in stores.values():
        store.delete_prefix()


# ------------------------------------------------------------ hand arithmetic


def ns(stamp: str) -> int:
    """`2026-11-29T07:00:04.028940237Z` as integer nanoseconds (9 digits, as captured)."""
    whole, fraction = stamp.rstrip("Z").split(".")
    seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0"))


def pct(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, by hand."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    i = int(h)
    j = min(i + 1, len(xs) - 1)
    return xs[i] + (h - i) * (xs[j] - xs[i])


def records(capture: Capture) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in capture.runs]


def durations(capture: Capture, kind: str, name: str | None = None) -> list[float]:
    return [
        (ns(c["ended_at"]) - ns(c["started_at"])) / 1e9
        for run in records(capture)
        for c in run["calls"]
        if c["kind"] == kind and (name is None or c["name"] == name) and c.get("ended_at")
    ]


def trie_root(capture: Capture) -> dict[str, Any]:
    root: dict[str, Any] = capture.value("trie")["root"]
    return root


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


# ===================================================================== pure


def test_exact_quantile_is_linear_interpolation_between_ranks() -> None:
    # [1, 2, 4, 8]: p50 at rank 1.5 -> 3; p90 at rank 2.7 -> 4 + 0.7*4 = 6.8.
    assert insight.exact_quantile([1.0, 2.0, 4.0, 8.0], 0.5) == 3.0
    assert math.isclose(insight.exact_quantile([1.0, 2.0, 4.0, 8.0], 0.9), 6.8)
    assert insight.exact_quantile([5.0], 0.99) == 5.0
    q = insight.measured([8.0, 1.0, 4.0, 2.0])
    assert (q.count, q.mean, q.p50) == (4, 3.75, 3.0)
    assert insight.measured([]) == insight.Quantiles(0)


def test_union_and_running_together_by_hand() -> None:
    # [0,10) and [5,20) overlap: union 20; [20,30) touches 20 only: +10.
    assert insight.union_ns([(5, 20), (0, 10), (20, 30)]) == 30
    assert insight.union_ns([]) == 0
    run = _run(
        [
            ("tool", "a", 0, 10),
            ("tool", "b", 10, 20),  # starts exactly when a ends: not together
            ("tool", "c", 15, 30),
            ("tool", "c", 16, 18),
        ]
    )
    assert not insight.ran_together(run, ["a", "b"])
    assert insight.ran_together(run, ["b", "c"])
    assert insight.ran_together(run, ["c", "c"])  # two calls of c at once (at 16)
    assert not insight.ran_together(run, ["b", "c", "c", "c"])  # only two c ever
    plan = {
        "parallel_groups": [
            {"group_id": "g1", "tool_names": ["a", "b"]},
            {"group_id": "g2", "tool_names": ["b", "c"]},
            {"group_id": "g3", "tool_names": ["a", "z"]},
        ]
    }
    rows = insight.group_rows(plan, [run])
    assert [(g.group_id, g.runs_with_tools, g.runs_together) for g in rows] == [
        ("g1", 1, 0),
        ("g2", 1, 1),
        ("g3", 0, 0),
    ]


def test_run_timing_by_hand() -> None:
    # Tools [0,10) [5,20) [30,35) ns: sum 10 + 15 + 5 = 30, busy 20 + 5 = 25, saved 5; one
    # unfinished tool is ignored; no run end: wall = latest call end 40.
    run = _run(
        [
            ("llm", "m", 35, 40),
            ("tool", "a", 0, 10),
            ("tool", "b", 5, 20),
            ("tool", "c", 30, 35),
            ("tool", "d", 31, None),
        ],
        end=None,
    )
    t = insight.run_timing(run)
    assert (t.tool_sum_s, t.tool_busy_s) == (30e-9, 25e-9)
    assert t.saved_s == pytest.approx(5e-9, rel=1e-9)
    assert t.wall_s == 40e-9 and t.llm_s == 5e-9
    (d,) = [row for row in insight.tool_rows([run]) if row.name == "d"]
    assert (d.latency_s.count, d.unfinished) == (0, 1)


def _run(calls: list[tuple[str, str, int, int | None]], end: int | None = 100) -> Any:
    from storage.models import RunRecord, parse_wire
    from storage.timestamps import format_ns

    base = 1_800_000_000_000_000_000
    value = {
        "id": str(uuid.uuid4()),
        "agent_id": "a",
        "started_at": format_ns(base),
        "calls": [
            {
                "kind": kind,
                "name": name,
                "started_at": format_ns(base + s),
                **({"ended_at": format_ns(base + e)} if e is not None else {}),
            }
            for kind, name, s, e in calls
        ],
    }
    if end is not None:
        value["ended_at"] = format_ns(base + end)
    return parse_wire(RunRecord, value)


# ============================================================ the captures


@pytest.mark.parametrize("name", CAPTURES)
def test_llm_rows_learned_values_are_the_runtimes_trie(
    loaded: dict[str, tuple[Store, Capture]], name: str
) -> None:
    store, capture = loaded[name]
    report = insight.build_report(store, capture.agent_id)
    root = trie_root(capture)
    (path,) = root["children"]  # "openai" / "anthropic": the one call name
    expected_nodes = {"": root, path: root["children"][path]}
    seen = set()
    for row in report.llm:
        node = expected_nodes[row.path]
        prediction = (
            node["predictions_any_index"]
            if row.call_index is None
            else node["predictions_by_call_index"][str(row.call_index)]
        )
        seen.add((row.path, row.call_index))
        # Request counts: the trie's sample counts.
        assert row.requests == prediction["remaining_calls"]["sample_count"]
        for stat, got in (
            ("output_tokens", row.output_tokens),
            ("interarrival_ms", row.interarrival_ms),
        ):
            want = prediction[stat]
            assert got.count == want["sample_count"]
            if want["sample_count"]:
                assert close(got.p50, want["p50"]) and close(got.p90, want["p90"])
                assert close(got.mean, want["mean"])
        assert row.latency_sensitivity == prediction["latency_sensitivity"]
    indices = {int(i) for i in root["predictions_by_call_index"]}
    assert seen == {(p, i) for p in ("", path) for i in [None, *indices]}


@pytest.mark.parametrize("name", CAPTURES)
def test_llm_p99_of_output_tokens_is_the_largest_sample(
    loaded: dict[str, tuple[Store, Capture]], name: str
) -> None:
    """With fewer than 50 samples the crate's estimate at 0.99 lands on the last
    centroid and clamps to the maximum: p99 = the largest token count seen."""
    store, capture = loaded[name]
    report = insight.build_report(store, capture.agent_id)
    tokens = [
        c["output_tokens"] for run in records(capture) for c in run["calls"] if c["kind"] == "llm"
    ]
    (root_any,) = [r for r in report.llm if r.path == "" and r.call_index is None]
    assert root_any.output_tokens.p99 == max(tokens)
    # openai: 61 x4, 213, 200, 213, 200, 187, 200 -> 213; anthropic: 197.
    assert max(tokens) == {"relay-openai": 213, "relay-anthropic": 197}[name]


def test_llm_latency_quantiles_and_trend_by_hand(
    loaded: dict[str, tuple[Store, Capture]],
) -> None:
    store, capture = loaded[OPENAI]
    report = insight.build_report(store, capture.agent_id)
    rows = {(r.path, r.call_index): r for r in report.llm}
    every = durations(capture, "llm")
    root = rows[("", None)]
    assert root.latency_s.count == 10
    for q, got in (
        (0.5, root.latency_s.p50),
        (0.9, root.latency_s.p90),
        (0.99, root.latency_s.p99),
    ):
        assert close(got, pct(every, q))
    # Run 1's calls: .030011363-.028940237 = .001071126 s and
    # .219492070-.217363838 = .002128232 s; mean .001599679 s.
    assert close(root.trend_s[0], 0.001599679)
    # Call #1 of every run, in index order: .001071126, .006874157,
    # .008221095, .001099529 s; sorted, p50 = (.001099529 + .006874157) / 2.
    first = rows[("openai", 1)]
    assert first.trend_s == pytest.approx([0.001071126, 0.006874157, 0.008221095, 0.001099529])
    assert close(first.latency_s.p50, (0.001099529 + 0.006874157) / 2)
    # Only runs 2 and 4 have a third call.
    assert [v is None for v in rows[("openai", 3)].trend_s] == [True, False, True, False]


@pytest.mark.parametrize("name", CAPTURES)
def test_tool_latency_quantiles_by_hand(
    loaded: dict[str, tuple[Store, Capture]], name: str
) -> None:
    store, capture = loaded[name]
    report = insight.build_report(store, capture.agent_id)
    names = sorted({c["name"] for r in records(capture) for c in r["calls"] if c["kind"] == "tool"})
    assert [t.name for t in report.tools] == names
    for tool in report.tools:
        values = durations(capture, "tool", tool.name)
        assert tool.latency_s.count == len(values) == 4
        for q, got in ((0.5, tool.latency_s.p50), (0.9, tool.latency_s.p90)):
            assert close(got, pct(values, q))
        assert close(tool.latency_s.p99, pct(values, 0.99))


def test_search_flights_latency_worked_by_hand(loaded: dict[str, tuple[Store, Capture]]) -> None:
    store, capture = loaded[OPENAI]
    (flights,) = [
        t for t in insight.build_report(store, capture.agent_id).tools if t.name == "search_flights"
    ]
    # Durations (end - start): .092842512, .094425507, .094671609, .092556406 s.
    # Sorted: .092556406 .092842512 .094425507 .094671609
    # p50 = (.092842512 + .094425507)/2 = .0936340095
    # p90 = rank 2.7: .094425507 + .7 * .000246102 = .0945977784
    assert close(flights.latency_s.p50, 0.0936340095)
    assert close(flights.latency_s.p90, 0.0945977784)


@pytest.mark.parametrize("name", CAPTURES)
def test_wall_time_vs_tool_time_per_run(
    loaded: dict[str, tuple[Store, Capture]], name: str
) -> None:
    store, capture = loaded[name]
    report = insight.build_report(store, capture.agent_id)
    assert [r.run_id for r in report.runs] == capture.index
    for timing, run in zip(report.runs, records(capture), strict=True):
        tools = [
            (ns(c["started_at"]), ns(c["ended_at"]))
            for c in run["calls"]
            if c["kind"] == "tool" and c.get("ended_at")
        ]
        # Union by hand: sweep the sorted intervals.
        busy, (cur_s, cur_e) = 0, sorted(tools)[0]
        for s, e in sorted(tools)[1:]:
            if s > cur_e:
                busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
        assert close(timing.tool_sum_s, sum(e - s for s, e in tools) / 1e9)
        assert close(timing.tool_busy_s, busy / 1e9)
        assert close(timing.wall_s, (ns(run["ended_at"]) - ns(run["started_at"])) / 1e9)
    t = report.totals
    assert close(t.saved_s, sum(r.saved_s for r in report.runs))
    assert close(t.saved_share, t.saved_s / t.tool_sum_s)
    if name == OPENAI:
        # Run 1: tools add up to .092842512 + .071820985 + .051119114 + .023048148
        # + .017418326 = .256249085 s; flights covers hotels and weather, so busy
        # = .092842512 + .023048148 + .017418326 = .133308986 s; saved .122940099 s;
        # wall .219786830 - .028188927 = .191597903 s.
        first = report.runs[0]
        assert close(first.tool_sum_s, 0.256249085)
        assert close(first.tool_busy_s, 0.133308986)
        assert close(first.saved_s, 0.122940099)
        assert close(first.wall_s, 0.191597903)


@pytest.mark.parametrize("name", CAPTURES)
def test_plan_groups_ran_together_in_every_run(
    loaded: dict[str, tuple[Store, Capture]], name: str
) -> None:
    store, capture = loaded[name]
    report = insight.build_report(store, capture.agent_id)
    plan = capture.value("plan")
    assert [(g.group_id, g.tool_names) for g in report.groups] == [
        (g["group_id"], g["tool_names"]) for g in plan["parallel_groups"]
    ]
    # tool_timeline.json: in each run the three searches start within ~1 ms and
    # each lasts 50 ms or more, so every group of them ran together 4 times of 4.
    assert all((g.runs_with_tools, g.runs_together) == (4, 4) for g in report.groups)


@pytest.mark.parametrize("name", CAPTURES)
def test_prompt_stability_from_the_captured_values(
    loaded: dict[str, tuple[Store, Capture]], name: str
) -> None:
    store, capture = loaded[name]
    report = insight.build_report(store, capture.agent_id)
    stability = capture.value("acg_stability")
    window = capture.value("acg_observations")
    (row,) = report.stability
    assert row.learning_key == capture.learning_key()
    assert row.seed  # the captured seed copy equals the learning key's result
    assert row.observations == stability["total_observations"] == 10
    assert row.window == len(window) == 10
    assert row.stable_prefix_blocks == stability["stable_prefix_length"] == 6
    assert row.fingerprint == stability["stable_prefix_fingerprint"]
    stable = [s for s in stability["scores"] if s["classification"] == "stable"]
    assert (row.stable_spans, row.spans) == (len(stable), len(stability["scores"]))
    shares = [min(6, len(o["blocks"])) / len(o["blocks"]) for o in window]
    assert close(row.prefix_share, sum(shares) / len(shares))
    # Token estimate: the window holds the runs' LLM calls in index order, one
    # observation each; prompt_tokens x prefix characters / prompt characters.
    calls = [c for r in records(capture) for c in r["calls"] if c["kind"] == "llm"]
    assert len(calls) == len(window)
    estimates = []
    for call, observation in zip(calls, window, strict=True):
        sizes = [len(b["content"]) for b in observation["blocks"]]
        estimates.append(call["prompt_tokens"] * sum(sizes[:6]) / sum(sizes))
    assert row.prefix_tokens.count == 10
    assert close(row.prefix_tokens.p50, pct(estimates, 0.5))
    assert close(row.prefix_tokens.p90, pct(estimates, 0.9))


def test_without_a_learning_key_set_the_seed_profile_is_shown(
    loaded: dict[str, tuple[Store, Capture]],
) -> None:
    """State a NeMo Relay agent learned itself has no learning-key set of ours."""
    store, capture = loaded[OPENAI]
    store.client.delete(store.keys.learning_key_set(capture.agent_id))
    (row,) = insight.build_report(store, capture.agent_id).stability
    assert (row.learning_key, row.seed, row.stable_prefix_blocks) == (capture.agent_id, True, 6)


def test_health_counts_lag_and_the_agents_dead_letters(
    loaded: dict[str, tuple[Store, Capture]],
) -> None:
    store, capture = loaded[OPENAI]
    agent = capture.agent_id
    report = insight.build_report(store, agent)
    h = report.health
    assert (h.runs_stored, h.runs_retained, h.runs_learned, h.lag_runs) == (4, 4, 4, 0)
    assert h.last_commit_at == capture.value("trie")["generated_at"]
    assert h.oldest_unlearned_age_s is None and h.runs_read == 4 and h.runs_unreadable == 0

    # Two runs not learned; the first of them stored 100 s ago (server clock).
    store.client.hset(store.keys.cursor(agent), "learned", 2)
    now = float(store.client.time()[0])
    store.client.zadd(store.keys.stored_at(agent), {capture.index[2]: now - 100})
    store.client.zadd(store.keys.stored_at(agent), {capture.index[3]: now - 50})
    run = json.loads(capture.runs[0])
    entries = [
        {"reason": "x", "stage": "learn", "agent_id": agent, "raw": ""},
        {"reason": "x", "stage": "ingest", "raw": json.dumps(run)},
        {"reason": "x", "stage": "learn", "agent_id": "someone-else", "raw": ""},
        {"reason": "x", "stage": "ingest", "raw": json.dumps({**run, "agent_id": "other"})},
    ]
    store.push_dead_letters([json.dumps(e) for e in entries] + ["not json"])
    h = insight.build_report(store, agent).health
    assert (h.runs_learned, h.lag_runs) == (2, 2)
    assert h.oldest_unlearned_age_s is not None and 99 <= h.oldest_unlearned_age_s <= 103
    assert (h.dead_letters, h.dead_letters_scanned, h.dead_letters_total) == (2, 5, 5)
    assert h.last_stored_at is not None and h.last_stored_at.startswith(
        time.strftime("%Y-%m-%dT", time.gmtime(now - 50))
    )
    # A bounded scan sees the newest entries only (and says so).
    report = insight.build_report(store, agent, dead_letter_scan=3)
    assert (report.health.dead_letters, report.health.dead_letters_scanned) == (0, 3)
    assert any("newest 3 of 5" in n for n in report.notes)


def test_the_report_reads_the_newest_runs_only(loaded: dict[str, tuple[Store, Capture]]) -> None:
    store, capture = loaded[OPENAI]
    report = insight.build_report(store, capture.agent_id, max_runs=2)
    assert report.run_ids == capture.index[2:]
    assert report.health.runs_read == 2
    assert any("newest 2 of 4" in n for n in report.notes)
    (root,) = [r for r in report.llm if r.path == "" and r.call_index is None]
    assert root.latency_s.count == 5  # runs 3 and 4: 2 + 3 LLM calls
    assert root.requests == 10  # learned values still cover every learned run


def test_an_unreadable_run_is_counted_not_fatal(loaded: dict[str, tuple[Store, Capture]]) -> None:
    store, capture = loaded[OPENAI]
    store.client.set(store.keys.run(capture.agent_id, capture.index[1]), "{broken")
    report = insight.build_report(store, capture.agent_id)
    assert report.health.runs_unreadable == 1 and len(report.runs) == 3


def test_as_dict_is_plain_json(loaded: dict[str, tuple[Store, Capture]]) -> None:
    store, capture = loaded[OPENAI]
    data = insight.build_report(store, capture.agent_id).as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["llm"][0]["output_tokens"]["p50"] == 196.75  # the captured trie's root p50


# ================================================================= headline


@pytest.mark.parametrize("name", CAPTURES)
def test_headline_by_hand(loaded: dict[str, tuple[Store, Capture]], name: str) -> None:
    store, capture = loaded[name]
    h = insight.headline(store, capture.agent_id)
    every = durations(capture, "llm")
    assert close(h.root_llm_latency_p50_s, pct(every, 0.5))
    assert close(h.root_llm_latency_p90_s, pct(every, 0.9))
    prediction = trie_root(capture)["predictions_any_index"]
    assert h.root_output_tokens_p50 == prediction["output_tokens"]["p50"]
    assert h.root_interarrival_p50_ms == prediction["interarrival_ms"]["p50"]
    assert h.root_interarrival_p90_ms == prediction["interarrival_ms"]["p90"]
    assert h.root_requests == 10
    assert h.plan_groups == len(capture.value("plan")["parallel_groups"]) == 3
    assert h.stable_prefix_blocks == {capture.learning_key(): 6}


def test_headlines_of_many_agents_in_two_round_trips(
    loaded: dict[str, tuple[Store, Capture]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, capture = loaded[OPENAI]
    executes = []
    original = redis.client.Pipeline.execute

    def counting(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        executes.append(len(self.command_stack))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    agents = [capture.agent_id, "nobody", "also-nobody"]
    result = insight.headlines(store, agents, latency_runs=3)
    assert len(executes) == 2
    assert result["nobody"] == insight.Headline(None, None, None, None, {})
    # The newest 3 runs only: runs 2-4 hold 3 + 2 + 3 LLM calls.
    latest = [d for run in records(capture)[1:] for d in _llm(run)]
    assert len(latest) == 8
    assert close(result[capture.agent_id].root_llm_latency_p50_s, pct(latest, 0.5))
    # Runs are immutable: a second scrape reads no run again (the cache is by
    # run ids), so even a run deleted meanwhile does not change the numbers.
    store.client.delete(store.keys.run(capture.agent_id, capture.index[3]))
    again = insight.headlines(store, agents, latency_runs=3)
    assert again == result


def _llm(run: dict[str, Any]) -> list[float]:
    return [
        (ns(c["ended_at"]) - ns(c["started_at"])) / 1e9
        for c in run["calls"]
        if c["kind"] == "llm" and c.get("ended_at")
    ]


def test_headline_survives_corrupt_values(loaded: dict[str, tuple[Store, Capture]]) -> None:
    store, capture = loaded[OPENAI]
    agent = capture.agent_id
    store.client.set(store.keys.trie(agent), "not json")
    store.client.set(store.keys.plan(agent), json.dumps({"parallel_groups": "nope"}))
    store.client.set(store.keys.acg_stability(capture.learning_key()), "[]")
    h = insight.headline(store, agent, latency_runs=0)
    assert h == insight.Headline(None, None, None, None, {})


def test_downsample_averages_consecutive_buckets() -> None:
    assert insight.downsample([1.0, 2.0, 3.0, 4.0, None, None, 7.0, 8.0], 4) == [
        1.5,
        3.5,
        None,
        7.5,
    ]
    # 10 values into 3 buckets: [0:3], [3:6], [6:10].
    assert insight.downsample([float(i) for i in range(10)], 3) == [1.0, 4.0, 7.5]
    assert insight.downsample([1.0, None], 5) == [1.0, None]
