"""ACG learner: golden replay of the captured runtime, plus unit checks of each rule.

Expected values come from the captures (`tests/goldens.py`), from the SPEC
text, or are written out by hand here (digests are computed in the test with
`hashlib` over hand-written canonical text, never with the code under test).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.models import RunRecord
from tests.goldens import CAPTURES, FIXTURES, assert_json_close, load_capture
from worker.engine.acg import analyze, build_prompt_ir, fold_acg, learning_key, run_learning_keys
from worker.engine.acg.canonical import jcs, normalize_whitespace, serde_float
from worker.engine.acg.stability import stable_prefix_length

VOLATILE = ("ir_id", "created_at")


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def strip_volatile(window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in obs.items() if k not in VOLATILE} for obs in window]


def id_source(prefix: str = "") -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"{prefix}00000000-0000-4000-8000-{next(counter):012d}"


CLOCK = "2026-01-01T00:00:00.000000001Z"


def fold(
    windows: dict[str, list[dict[str, Any]]],
    runs: Iterable[RunRecord],
    agent: str = "cap-agent",
    window_size: int = 100,
    new_id: Callable[[], str] | None = None,
):
    return fold_acg(
        windows,
        runs,
        agent_id=agent,
        window_size=window_size,
        clock=lambda: CLOCK,
        new_id=new_id or id_source(),
    )


def make_run(requests: list[dict[str, Any] | None], agent: str = "agent") -> RunRecord:
    """A run with one LLM call per request (None: an LLM call without a recorded request)."""
    calls: list[dict[str, Any]] = [
        {"kind": "tool", "name": "lookup", "started_at": "2026-01-01T00:00:00Z"}
    ]
    for i, request in enumerate(requests):
        call: dict[str, Any] = {
            "kind": "llm",
            "name": "llm",
            "started_at": f"2026-01-01T00:00:{i + 1:02d}Z",
            "ended_at": f"2026-01-01T00:00:{i + 1:02d}.500Z",
        }
        if request is not None:
            call["annotated_request"] = request
        calls.append(call)
    return RunRecord.model_validate(
        {
            "id": str(uuid.uuid4()),
            "agent_id": agent,
            "calls": calls,
            "started_at": "2026-01-01T00:00:00Z",
        }
    )


def user_request(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "model": "m", **extra}


# ----------------------------------------------------------------- golden


def _captured(name: str) -> tuple[Any, str, dict[str, Any]]:
    cap = load_capture(name)
    key = cap.learning_key()
    raw = {e.key: e.raw for e in cap.keys if e.kind in ("acg_observations", "acg_stability")}
    return cap, key, raw


@pytest.mark.parametrize("name", CAPTURES)
def test_golden_replay_matches_captured_acg_state(name: str) -> None:
    cap, key, raw = _captured(name)
    runs = [RunRecord.model_validate_json(r) for r in cap.runs]
    windows: dict[str, list[dict[str, Any]]] = {}
    result = fold(windows, runs, agent=cap.agent_id, new_id=id_source())

    assert result.touched_keys == [key]
    assert result.seed_key == key
    assert list(windows) == [key]

    seed = result.seed_key
    for stored_under in (key, cap.agent_id):  # learning key and the plain-agent seed copy
        expected_window = json.loads(raw[f"{cap.prefix}acg_observations:{stored_under}"])
        assert strip_volatile(windows[seed]) == strip_volatile(expected_window)
        expected_stability = json.loads(raw[f"{cap.prefix}acg_stability:{stored_under}"])
        assert_json_close(result.stability[seed], expected_stability)

    # The volatile fields come from the injected callables, one id per observation.
    assert [o["created_at"] for o in windows[key]] == [CLOCK] * len(windows[key])
    assert len({o["ir_id"] for o in windows[key]}) == len(windows[key])

    # Wire layout: with the captured ids put back, the compact JSON is byte-identical.
    expected_window = json.loads(raw[f"{cap.prefix}acg_observations:{key}"])
    restored = [
        {**ours, "ir_id": theirs["ir_id"], "created_at": theirs["created_at"]}
        for ours, theirs in zip(windows[key], expected_window, strict=True)
    ]
    assert compact(restored) == raw[f"{cap.prefix}acg_observations:{key}"]
    assert compact(result.stability[key]) == raw[f"{cap.prefix}acg_stability:{key}"]

    # What the runtime planned from the seed it read back.
    facts = json.loads((FIXTURES / name / "cache_request_facts.json").read_text())
    assert result.stability[seed]["stable_prefix_length"] == facts["stable_prefix_length"]


@pytest.mark.parametrize("name", CAPTURES)
def test_learning_keys_match_manifest(name: str) -> None:
    cap, key, _ = _captured(name)
    manifest = json.loads((FIXTURES / name / "manifest.json").read_text())
    stability_keys = {e["key"] for e in manifest["keys"] if e["kind"] == "acg_stability"}
    assert f"{cap.prefix}acg_stability:{key}" in stability_keys
    for raw_run in cap.runs:
        assert run_learning_keys(RunRecord.model_validate_json(raw_run), cap.agent_id) == [key]


def _batched(name: str, size: int) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    cap = load_capture(name)
    raw_runs = cap.runs
    windows: dict[str, list[dict[str, Any]]] = {}
    stability: dict[str, Any] = {}
    seed: str | None = None
    ids = id_source()
    for lo in range(0, len(raw_runs), size):
        batch = [RunRecord.model_validate_json(r) for r in raw_runs[lo : lo + size]]
        result = fold(windows, batch, agent=cap.agent_id, new_id=ids)
        stability.update(result.stability)
        seed = result.seed_key or seed
        windows = json.loads(json.dumps(windows))  # through storage
    return {k: strip_volatile(v) for k, v in windows.items()}, stability, seed


@pytest.mark.parametrize("name", CAPTURES)
def test_batch_independence(name: str) -> None:
    everything = _batched(name, 4)
    assert everything[2] == load_capture(name).learning_key()
    for size in (1, 2, 3):
        assert _batched(name, size) == everything


# -------------------------------------------------------- whitespace


# Unicode White_Space (what Rust's `char::is_whitespace` tests), from the
# Unicode PropList: U+0009..U+000D, U+0020, U+0085, U+00A0, U+1680,
# U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
WHITE_SPACE = set(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)


def rust_normalize(text: str) -> str:
    """Literal transcription of the runtime's loop (canonicalize.rs), for comparison."""
    start, end = 0, len(text)
    while start < end and text[start] in WHITE_SPACE:
        start += 1
    while end > start and text[end - 1] in WHITE_SPACE:
        end -= 1
    out: list[str] = []
    pending = False
    for ch in text[start:end]:
        if ch == "\n":
            pending = False
            out.append("\n")
        elif ch in WHITE_SPACE:
            pending = True
        else:
            if pending:
                out.append(" ")
                pending = False
            out.append(ch)
    return "".join(out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  a  b  ", "a b"),
        ("a\tb", "a b"),
        ("a \n b", "a\n b"),
        ("a  \n\n  b", "a\n\n b"),
        ("line1 \nline2", "line1\nline2"),
        ("a\r\nb", "a\nb"),
        ("a\n\nb", "a\n\nb"),
        ("\u00a0a\u2003 b\u3000", "a b"),
        ("é  \n x", "é\n x"),
        ("a\u200bb", "a\u200bb"),  # zero-width space is not White_Space
        ("\x1ca\x1db\x1e \x1f", "\x1ca\x1db\x1e \x1f"),  # U+001C..U+001F: Python-only space
        ("a \x1f b", "a \x1f b"),
        ("  \n \t ", ""),
        ("", ""),
    ],
)
def test_normalize_whitespace(text: str, expected: str) -> None:
    assert normalize_whitespace(text) == expected


def test_python_isspace_differs_from_rust_on_information_separators() -> None:
    # The point of not using str.split/isspace: these are whitespace to Python only.
    for ch in "\x1c\x1d\x1e\x1f":
        assert ch.isspace()
        assert normalize_whitespace(f"{ch}x{ch}{ch}y{ch}") == f"{ch}x{ch}{ch}y{ch}"


_TEXT_ALPHABET = st.sampled_from(
    [*"ab \n\t\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u200b", "é"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXT_ALPHABET, max_size=40).map("".join))
def test_normalize_whitespace_matches_rust_loop(text: str) -> None:
    assert normalize_whitespace(text) == rust_normalize(text)


# ------------------------------------------------------------ RFC 8785


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_jcs_equals_rfc8785_package(value: Any) -> None:
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:
        return  # lone surrogates: rejected by the reference (and by the runtime's parser)
    assert jcs(value).encode("utf-8") == expected


def test_jcs_number_and_key_order() -> None:
    # RFC 8785: 3.0 is written 3; keys sort by UTF-16 code units (U+1F600 before U+FFFD).
    assert jcs({"b": 3.0, "a": [1e21, 1e-7, 0.5]}) == '{"a":[1e+21,1e-7,0.5],"b":3}'
    assert jcs({"\ufffd": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufffd":1}'


@pytest.mark.parametrize(
    ("value", "expected"),
    # ryu's layout as serde_json writes f64 (decimal for 1e-5 <= |x| < 1e16).
    [
        (1.0, "1.0"),
        (-2.5, "-2.5"),
        (0.0, "0.0"),
        (1e-5, "0.00001"),
        (1.5e-5, "0.000015"),
        (1e-6, "1e-6"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e16"),
        (1.2345e20, "1.2345e20"),
        (123.456, "123.456"),
    ],
)
def test_serde_float_layout(value: float, expected: str) -> None:
    assert serde_float(value) == expected


# --------------------------------------------------------------- PromptIR


def ir(request: dict[str, Any]) -> dict[str, Any]:
    return build_prompt_ir(request, ir_id="id", created_at=CLOCK)


def test_tool_result_part_json_keeps_rust_field_order() -> None:
    part = {
        "zeta": 1,
        "is_error": False,
        "content": {"b": 1, "a": 2.0},
        "alpha": "x",
        "tool_use_id": "t1",
        "type": "tool_result",
    }
    blocks = ir({"messages": [{"role": "user", "content": [part]}]})["blocks"]
    # type, declared fields (tool_use_id, content, is_error), then extras sorted;
    # nested maps sorted, 2.0 written as serde does.
    assert blocks[0]["content"] == (
        '{"type":"tool_result","tool_use_id":"t1","content":{"a":2.0,"b":1},'
        '"is_error":false,"alpha":"x","zeta":1}'
    )


def test_parts_text_and_dropped_pieces() -> None:
    content = [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text", "text": ""},
        {"type": "tool_use", "input": {"q": 1}, "name": "f", "id": "u1"},
        {"type": "tool_result", "tool_use_id": "t", "content": "ok", "is_error": None},
    ]
    blocks = ir({"messages": [{"role": "user", "content": content}]})["blocks"]
    assert blocks[0]["content"] == (
        'first\n{"type":"tool_use","id":"u1","name":"f","input":{"q":1}}\n'
        '{"type":"tool_result","tool_use_id":"t","content":"ok"}'
    )


def test_block_layout_and_scaffold_position() -> None:
    request = {
        "instructions": "be  brief",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "developer", "content": "dev"},
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":  1}'},
                    }
                ],
            },
            {"role": "tool", "content": " done ", "tool_call_id": "c1"},
            {"role": "assistant", "content": None},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": None}}],
        "response_format": {"type": "json_object"},
    }
    observation = ir(request)
    spans = [
        (b["span_id"], b["role"], b["content_type"], b["provenance"], b["content"])
        for b in observation["blocks"]
    ]
    assert spans == [
        ("system-0-instructions", "system", "text", "system", "be brief"),
        ("system-1", "system", "text", "system", "sys"),
        ("system-2-developer", "system", "text", "developer", "dev"),
        (
            "system-3-f",
            "system",
            "tool_schema",
            "system",
            '{"function":{"name":"f"},"type":"function"}',
        ),
        (
            "system-4-structured-output",
            "system",
            "structured_output",
            "system",
            '{"type":"json_object"}',
        ),
        ("user-5", "user", "text", "user", "hi"),
        ("assistant-6", "assistant", "text", "developer", ""),
        # Canonical JSON of the call, then whitespace-normalized: the two spaces
        # inside the arguments string collapse.
        (
            "assistant-7-f",
            "assistant",
            "text",
            "developer",
            '{"function":{"arguments":"{\\"a\\": 1}","name":"f"},"id":"c1","type":"function"}',
        ),
        ("tool-8-c1", "tool", "tool_result", "tool", "done"),
    ]
    assert [b["sequence_index"] for b in observation["blocks"]] == list(range(9))
    assert {b["sensitivity"] for b in observation["blocks"]} == {"public"}
    assert observation["tool_schema_hashes"] == [
        {"tool_name": "f", "schema_hash": sha('{"function":{"name":"f"},"type":"function"}')}
    ]
    assert observation["structured_output_schema_id"] == sha('{"type":"json_object"}')
    assert list(observation) == [
        "ir_id",
        "blocks",
        "tool_schema_hashes",
        "structured_output_schema_id",
        "source_request_hash",
        "created_at",
    ]


def test_tools_without_messages_go_last_and_hashes_follow_tools_key() -> None:
    blocks = ir({"tools": [{"type": "function", "function": {"name": "g"}}]})["blocks"]
    assert [b["span_id"] for b in blocks] == ["system-0-g"]
    assert ir({"messages": [], "tools": []})["tool_schema_hashes"] == []
    assert "tool_schema_hashes" not in ir({"messages": []})


def test_null_optional_tool_fields_vanish_from_schema_but_not_from_request_hash() -> None:
    request = {"tools": [{"type": "function", "function": {"name": "f", "description": None}}]}
    observation = ir(request)
    assert observation["tool_schema_hashes"] == [
        {"tool_name": "f", "schema_hash": sha('{"function":{"name":"f"},"type":"function"}')}
    ]
    assert observation["source_request_hash"] == sha(
        '{"tools":[{"function":{"description":null,"name":"f"},"type":"function"}]}'
    )


def test_source_request_hash_is_rfc8785_of_stored_request() -> None:
    request = {"params": {"temperature": 3.0}, "messages": [{"role": "user", "content": "hi"}]}
    expected = sha('{"messages":[{"content":"hi","role":"user"}],"params":{"temperature":3}}')
    assert ir(request)["source_request_hash"] == expected


# ---------------------------------------------------------- learning key


def test_no_scaffold_key_user_seed() -> None:
    text = "Plan a trip"
    key = learning_key("a", user_request(text))
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert key == f"a::model=m::seed=user:sha256:{digest[:4]}::system=no-system::tools=no-tools"


def test_no_scaffold_key_assistant_seed_and_empty_tools() -> None:
    request = {
        "messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}],
        "tools": [],
    }
    # Model absent: "unknown"; `tools: []` is no scaffold and cuts to 16 bytes.
    assert learning_key("a", request) == (
        "a::model=unknown::seed=assistant:sha256::system=no-system::tools=tools-unavailabl"
    )
    no_content = {"messages": [{"role": "assistant", "tool_calls": []}]}
    assert "::seed=assistant:no-con::" in learning_key("a", no_content)
    assert "::seed=no-seed::" in learning_key("a", {"messages": []})
    tool_first = {"messages": [{"role": "tool", "content": "r", "tool_call_id": "c"}]}
    assert f"::seed=tool:sha256:{hashlib.sha256(b'r').hexdigest()[:4]}::" in learning_key(
        "a", tool_first
    )


def test_seed_text_keeps_images() -> None:
    content = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "u", "detail": "low"}},
    ]
    request = {"messages": [{"role": "user", "content": content}]}
    seed_text = "look\n[image:low:" + sha("u") + "]"
    expected = "user:" + sha(seed_text)
    assert f"::seed={expected[:16]}::" in learning_key("a", request)


def test_scaffold_key_uses_full_fingerprints() -> None:
    request = {
        "instructions": "inst",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
            {"role": "user", "content": "u"},
        ],
        "model": "m",
        "tools": [
            {"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "g", "parameters": {"b": 1, "a": 2}}},
        ],
    }
    system = sha(
        '[{"content":"inst","source":"instructions"},'
        '{"content":"sys","role":"system","source":"message"},'
        '{"content":[{"text":"dev","type":"text"}],"role":"developer","source":"message"}]'
    )
    tools = sha(
        '{"function":{"name":"f"},"type":"function"}|'
        '{"function":{"name":"g","parameters":{"a":2,"b":1}},"type":"function"}'
    )
    assert learning_key("a", request) == (
        f"a::model=m::seed=stable-scaffold::system={system}::tools={tools}"
    )


def test_response_format_only_top_level_reaches_key() -> None:
    top = user_request("x", response_format={"type": "json_schema", "n": 1.0})
    digest = sha('{"n":1,"type":"json_schema"}')
    assert learning_key("a", top) == (
        "a::model=m::seed=stable-scaffold::system=no-system::tools=no-tools"
        f"::response_format={digest}"
    )
    chat = user_request(
        "x", api_specific={"api": "openai_chat", "response_format": {"type": "json_object"}}
    )
    assert "response_format" not in learning_key("a", chat)
    assert "::seed=user:sha256:" in learning_key("a", chat)
    assert learning_key("a", user_request("x", response_format=None)) == learning_key(
        "a", user_request("x")
    )


def test_changed_system_prompt_is_a_new_key() -> None:
    a = {"messages": [{"role": "system", "content": "Today is Monday"}], "model": "m"}
    b = {"messages": [{"role": "system", "content": "Today is Tuesday"}], "model": "m"}
    assert learning_key("x", a) != learning_key("x", b)


# -------------------------------------------------------------- analysis


def obs(blocks: list[tuple[str, str]], source: str = "sha256:src") -> dict[str, Any]:
    """An observation from (span_id, content) pairs; role from the span id prefix."""
    out = []
    for i, (span, content) in enumerate(blocks):
        role = span.split("-")[0]
        out.append(
            {
                "span_id": span,
                "sequence_index": i,
                "role": role,
                "content": content,
                "content_type": "text",
                "provenance": role,
                "sensitivity": "public",
            }
        )
    return {"ir_id": "i", "blocks": out, "source_request_hash": source, "created_at": CLOCK}


def block_json(span: str, content: str) -> str:
    role = span.split("-")[0]
    return compact([span, role, "text", content])


def test_prefix_descent_differs_from_leading_stable_spans() -> None:
    # 20 observations: span system-0 and user-1 each keep one content in 19 of 20
    # (score 0.95, stable), but the odd one out differs, so only 18 share both.
    window = []
    for i in range(20):
        first = "odd" if i == 0 else "S"
        second = "odd" if i == 1 else "U"
        window.append(obs([("system-0", first), ("user-1", second)], source=f"sha256:{i}"))
    result = analyze(window, "k")
    assert [s["classification"] for s in result["scores"]] == ["stable", "stable"]
    assert [s["score"] for s in result["scores"]] == [0.95, 0.95]
    # required = ceil(0.95 * 20) = 19: depth 0 keeps 19, depth 1 only 18 agree.
    assert result["stable_prefix_length"] == 1
    digest = sha(block_json("system-0", "S"))
    assert result["stable_prefix_fingerprint"] == sha(f"k\n{digest}\nstable-scaffold")
    assert result["total_observations"] == 20


def test_prefix_descent_needs_whole_blocks_not_spans() -> None:
    # Every observation has span user-0 (stable by presence) but only 2 of 3 agree on it.
    window = [obs([("user-0", "a")]), obs([("user-0", "a")]), obs([("user-0", "b")])]
    # required = clamp(ceil(2.85), 2, 3) = 3
    assert analyze(window, "k")["stable_prefix_length"] == 0
    assert "stable_prefix_fingerprint" not in analyze(window, "k")
    two = window[:2]
    assert stable_prefix_length([[("user-0", "a")], [("user-0", "a")]]) == 1
    assert analyze(two, "k")["stable_prefix_length"] == 1


def test_fingerprint_past_scaffold_binds_source_hash_and_ties_pick_smallest() -> None:
    window = [
        obs([("user-0", "hi")], source="sha256:b"),
        obs([("user-0", "hi")], source="sha256:a"),
    ]
    result = analyze(window, "key")
    assert result["stable_prefix_length"] == 1
    digest = sha(block_json("user-0", "hi"))
    candidates = [sha(f"key\n{digest}\nsha256:a"), sha(f"key\n{digest}\nsha256:b")]
    assert result["stable_prefix_fingerprint"] == min(candidates)
    assert list(result) == [
        "scores",
        "stable_prefix_length",
        "stable_prefix_fingerprint",
        "total_observations",
    ]


def test_scores_order_confidence_and_classes() -> None:
    window = [
        obs([("system-0", "s"), ("user-1-b", "x"), ("user-2", "p")]),
        obs([("system-0", "s"), ("user-1-b", "y"), ("user-1-z", "z")]),
        obs([("system-0", "s"), ("user-1-b", "x")]),
    ]
    # Give user-1-z the same smallest sequence index as user-1-b: the tie is
    # broken by class rank (variable before semi_stable) before the span id.
    window[1]["blocks"][2]["sequence_index"] = 1
    result = analyze(window, "k")
    scores = {s["span_id"]: s for s in result["scores"]}
    assert [s["span_id"] for s in result["scores"]] == [
        "system-0",
        "user-1-z",
        "user-1-b",
        "user-2",
    ]
    assert scores["system-0"]["classification"] == "stable"
    assert scores["user-1-b"]["score"] == pytest.approx(2 / 3)
    assert scores["user-1-b"]["classification"] == "semi_stable"
    assert scores["user-1-z"]["classification"] == "variable"
    assert scores["user-1-z"]["score"] == pytest.approx(1 / 3)
    assert scores["system-0"]["confidence"] == 3 / 20
    assert scores["user-2"]["observation_count"] == 1
    assert analyze([], "k") == {"scores": [], "stable_prefix_length": 0, "total_observations": 0}


def test_confidence_saturates_at_twenty() -> None:
    window = [obs([("system-0", "s")]) for _ in range(25)]
    (score,) = analyze(window, "k")["scores"]
    assert score["confidence"] == 1.0
    assert score["observation_count"] == 25


# ---------------------------------------------------------------- learner


def test_window_trims_from_front() -> None:
    windows: dict[str, list[dict[str, Any]]] = {}
    runs = [
        make_run([user_request(f"q{i}", tools=[{"type": "function", "function": {"name": "f"}}])])
        for i in range(5)
    ]
    result = fold(windows, runs, agent="agent", window_size=3, new_id=id_source("r"))
    (key,) = result.touched_keys
    assert [o["ir_id"][-1] for o in windows[key]] == ["2", "3", "4"]
    assert result.stability[key]["total_observations"] == 3
    assert [o["blocks"][1]["content"] for o in windows[key]] == ["q2", "q3", "q4"]


def test_window_already_larger_than_size_keeps_its_size() -> None:
    # The runtime pops one before each push when full: an oversize window stays oversize.
    request = user_request("q", tools=[{"type": "function", "function": {"name": "f"}}])
    key = learning_key("agent", request)
    old = [build_prompt_ir(request, ir_id=f"old{i}", created_at=CLOCK) for i in range(5)]
    windows = {key: copy.deepcopy(old)}
    fold(windows, [make_run([request])], agent="agent", window_size=3)
    assert [o["ir_id"] for o in windows[key]][:4] == ["old1", "old2", "old3", "old4"]
    assert len(windows[key]) == 5


def test_run_without_recorded_request_touches_nothing() -> None:
    windows: dict[str, list[dict[str, Any]]] = {"x": []}
    result = fold(windows, [make_run([None])], agent="agent")
    assert result.touched_keys == [] and result.seed_key is None and result.stability == {}
    assert windows == {"x": []}
    assert run_learning_keys(make_run([None]), "agent") == []


def test_learning_keys_call_order_deduplicated() -> None:
    a = {"messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "1"}]}
    b = {"messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "2"}]}
    run = make_run([a, b, copy.deepcopy(a)])
    assert run_learning_keys(run, "agent") == [learning_key("agent", a), learning_key("agent", b)]


def test_unparseable_request_is_skipped() -> None:
    # A tool definition type the runtime's codec does not know: it cannot parse it.
    bad = user_request("x", tools=[{"type": "custom", "function": {"name": "f"}}])
    good = user_request("y")
    run = make_run([bad, good])
    assert run_learning_keys(run, "agent") == [learning_key("agent", good)]
    windows: dict[str, list[dict[str, Any]]] = {}
    result = fold(windows, [run], agent="agent")
    assert result.touched_keys == [learning_key("agent", good)]


def _two_profile_run(first_blocks: int, second_blocks: int) -> tuple[RunRecord, str, str]:
    def request(system: str, users: int) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}]
        messages += [{"role": "user", "content": f"u{i}"} for i in range(users)]
        return {"messages": messages, "model": "m"}

    a, b = request("A", first_blocks), request("B", second_blocks)
    return make_run([a, b]), learning_key("agent", a), learning_key("agent", b)


def test_seed_is_longest_prefix_of_last_run_then_first_touched_on_tie() -> None:
    run, key_a, key_b = _two_profile_run(1, 3)
    result = fold({}, [run], agent="agent")
    # One observation each: the whole prompt is the prefix (2 vs 4 blocks).
    assert result.stability[key_b]["stable_prefix_length"] == 4
    assert result.seed_key == key_b

    tie, key_a, _ = _two_profile_run(2, 2)
    assert fold({}, [tie], agent="agent").seed_key == key_a


def test_seed_comes_from_last_run_with_observations() -> None:
    big, key_big, _ = _two_profile_run(5, 0)
    small = make_run([user_request("hello", tools=[])])
    empty = make_run([None])
    result = fold({}, [big, small, empty], agent="agent")
    assert result.seed_key == learning_key("agent", user_request("hello", tools=[]))
    assert result.seed_key != key_big
    assert len(result.touched_keys) == 3


def test_one_run_at_a_time_equals_batch_with_rust_window_rule() -> None:
    requests = [
        user_request(f"q{i % 3}", tools=[{"type": "function", "function": {"name": "f"}}])
        for i in range(7)
    ]
    runs = [make_run([r, r]) for r in requests]
    batch: dict[str, list[dict[str, Any]]] = {}
    batch_result = fold(batch, runs, agent="agent", window_size=4)
    single: dict[str, list[dict[str, Any]]] = {}
    ids = id_source()
    stability: dict[str, Any] = {}
    for run in runs:
        stability.update(fold(single, [run], agent="agent", window_size=4, new_id=ids).stability)
        single = json.loads(json.dumps(single))
    assert single == json.loads(json.dumps(batch))
    assert stability == batch_result.stability
    (key,) = batch_result.touched_keys
    assert len(batch[key]) == 4
    scores = {s["span_id"]: s["score"] for s in batch_result.stability[key]["scores"]}
    assert math.isclose(scores["system-0-f"], 1.0)
