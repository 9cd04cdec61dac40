"""Reserving ahead for ingest only (worker/prefetch.py) and the hand-off (worker/handoff.py)."""

from __future__ import annotations

import gc
import uuid
from typing import Any

import pytest
from kombu.common import QoS

from tests.test_poison import check, message
from worker import handoff, prefetch
from worker.celery import INGEST_TASK, LEARN_TASK, app
from worker.request import DecodedRequest

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class Consumer:
    """What `prefetch` reads of Celery's consumer: its QoS and the multiplier."""

    def __init__(self, processes: int, multiplier: int) -> None:
        self.prefetch_multiplier = multiplier
        self.applied: list[int] = []
        self.qos = QoS(
            lambda prefetch_count: self.applied.append(prefetch_count), processes * multiplier
        )


@pytest.fixture
def bound() -> Any:
    """Bind a consumer of `processes` and `multiplier` for one test."""

    def bind(processes: int, multiplier: int) -> Consumer:
        consumer = Consumer(processes, multiplier)
        prefetch.bind(consumer)
        return consumer

    yield bind
    prefetch.bind(None)


def test_a_long_task_holds_its_share_of_the_window(bound: Any) -> None:
    c = bound(processes=2, multiplier=2)
    assert prefetch.hold(INGEST_TASK) is None  # ingest: reserve ahead behind it
    first, second = prefetch.hold(LEARN_TASK), prefetch.hold("adaptive.rebuild_agent")
    assert first is not None and second is not None
    # Both processes in long tasks: the window is just those two, nothing ahead.
    assert c.qos.value == 2
    assert c.qos.update() == 2 and c.applied[-1] == 2  # what the broker is told
    first.release()
    first.release()  # once only
    assert c.qos.value == 3
    second.release()
    assert c.qos.value == 4


def test_the_window_never_goes_below_one_and_comes_back_exactly(bound: Any) -> None:
    c = bound(processes=1, multiplier=2)
    running, queued = prefetch.hold(LEARN_TASK), prefetch.hold(LEARN_TASK)
    assert running is not None and queued is None  # 2 -> 1, and 1 is kombu's floor
    assert c.qos.value == 1
    running.release()
    assert c.qos.value == 2


def test_nothing_to_hold_with_a_multiplier_of_one(bound: Any) -> None:
    c = bound(processes=2, multiplier=1)
    assert prefetch.hold(LEARN_TASK) is None
    assert c.qos.value == 2


def _request(task: str, args: list[Any]) -> DecodedRequest:
    msg = message([args, {}, EMBED], task=task)
    assert check(msg) == task
    return DecodedRequest(
        msg,
        app=app,
        task=app.tasks[task],
        body=msg.body,
        headers=msg.headers,
        decoded=False,
    )


@pytest.mark.parametrize("settle", ["acknowledge", "reject"])
def test_a_learn_request_holds_from_its_arrival_until_settled(bound: Any, settle: str) -> None:
    c = bound(processes=1, multiplier=2)
    _request(INGEST_TASK, [["{}"]])
    assert c.qos.value == 2
    learn = _request(LEARN_TASK, ["agent-" + uuid.uuid4().hex[:6]])
    assert c.qos.value == 1
    getattr(learn, settle)()
    assert c.qos.value == 2
    getattr(learn, settle)()
    assert c.qos.value == 2


def test_a_request_dropped_unsettled_gives_the_window_back(bound: Any) -> None:
    c = bound(processes=1, multiplier=2)
    learn = _request(LEARN_TASK, ["agent-" + uuid.uuid4().hex[:6]])
    assert c.qos.value == 1
    del learn
    gc.collect()
    assert c.qos.value == 2


# ------------------------------------------------------------------ hand-off


class Hub:
    def __init__(self) -> None:
        self.later: list[Any] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.later.append(callback)

    def run(self) -> None:
        pending, self.later = self.later, []
        for callback in pending:
            callback()


class Jobs:
    """The attributes of Celery's AsynPool the hand-off reads."""

    def __init__(self) -> None:
        self.outbound_buffer: list[Any] = []
        self._active_writes: set[int] = set()
        self._busy_workers: set[int] = {10}
        self._all_inqueues: set[int] = {10, 11}
        self._pool: list[Any] = []


class PoolWrapper:
    def __init__(self, jobs: Any) -> None:
        self._pool = jobs


class HubConsumer:
    def __init__(self, jobs: Any, hub: Any) -> None:
        self.pool = PoolWrapper(jobs)
        self.hub = hub


def test_messages_wait_in_order_while_a_job_is_written() -> None:
    jobs_, hub, handled = Jobs(), Hub(), []
    door = handoff.HandOff(HubConsumer(jobs_, hub), handled.append)
    door("m1")
    assert handled == ["m1"]  # nothing in flight: at once
    jobs_._active_writes.add(11)
    door("m2")
    jobs_._active_writes.clear()
    jobs_.outbound_buffer.append("job")  # written next, to the idle process 11
    door("m3")
    hub.run()
    assert handled == ["m1"]
    jobs_.outbound_buffer.clear()
    door("m4")  # behind the held ones, never ahead of them
    hub.run()
    assert handled == ["m1", "m2", "m3", "m4"]
    assert hub.later == []


def test_a_job_waiting_for_a_busy_process_holds_nothing() -> None:
    jobs_, hub, handled = Jobs(), Hub(), []
    jobs_._busy_workers = {10, 11}
    jobs_.outbound_buffer.append("job")  # both processes busy: prefetched, not in flight
    handoff.HandOff(HubConsumer(jobs_, hub), handled.append)("m1")
    assert handled == ["m1"]


def test_a_message_is_held_at_most_max_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs_, hub, handled = Jobs(), Hub(), []
    clock = [100.0]
    monkeypatch.setattr(handoff.time, "monotonic", lambda: clock[0])
    jobs_._active_writes.add(11)  # a write that never finishes (a stuck process)
    door = handoff.HandOff(HubConsumer(jobs_, hub), handled.append)
    door("m1")
    hub.run()
    assert handled == []
    clock[0] += 2 * handoff.MAX_HOLD_S
    hub.run()
    assert handled == ["m1"]


def test_reset_forgets_held_messages() -> None:
    jobs_, hub, handled = Jobs(), Hub(), []
    jobs_._active_writes.add(11)
    door = handoff.HandOff(HubConsumer(jobs_, hub), handled.append)
    door("m1")
    door.reset()
    jobs_._active_writes.clear()
    hub.run()
    assert handled == []


def test_without_a_prefork_pool_messages_go_straight_through() -> None:
    handled: list[Any] = []
    handoff.HandOff(HubConsumer(object(), Hub()), handled.append)("m1")
    handoff.HandOff(HubConsumer(Jobs(), None), handled.append)("m2")
    assert handled == ["m1", "m2"]
