"""The pool process gets each body decoded once (worker/request.py)."""

from __future__ import annotations

import json
import pickle
from typing import Any

from celery.worker.request import Request

from bench.workload import synthetic_runs
from tasks import jobs
from tests.test_poison import check, message
from worker.celery import INGEST_TASK, app
from worker.request import DecodedRequest

RUNS = [json.dumps(r) for r in synthetic_runs(50, agent_id="decoded", seed=4)]


def _job(request_cls: type[Request]) -> tuple[Any, bytes, int]:
    """(the request, what the prefork pool would pickle, the raw body's size),
    for a message the guard has checked, built the way Celery's strategy does."""
    msg = message([[RUNS], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    assert check(msg) == INGEST_TASK  # the guard decodes (and kombu caches) the body
    request = request_cls(
        msg,
        app=app,
        task=jobs.ingest_runs,
        body=msg.body,
        headers=msg.headers,
        decoded=False,
    )
    job = pickle.dumps(
        (
            request.type,
            request.id,
            request.request_dict,
            request.body,
            request.content_type,
            request.content_encoding,
        ),
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    return request, job, len(msg.body)


def test_every_task_uses_it() -> None:
    """One decode per body, and the prefetch hold of long tasks (worker/prefetch.py)."""
    ours = [t for name, t in app.tasks.items() if name.startswith("adaptive.")]
    assert {t.name for t in ours} >= {INGEST_TASK, jobs.learn_agent.name, jobs.rebuild_agent.name}
    assert all(t.Request is DecodedRequest for t in ours)


def test_the_pool_gets_the_arguments_once_and_no_body_to_decode() -> None:
    request, job, body_size = _job(DecodedRequest)
    assert request.content_type is None  # the pool process decodes nothing
    args, kwargs, _ = request.body
    assert args == [RUNS] and kwargs == {}
    assert request.request_dict["args"] is args  # one object: pickled once
    assert len(job) < 1.1 * body_size


def test_celerys_own_request_sends_the_body_twice() -> None:
    """The cost this avoids (and proof the size check above can fail)."""
    request, job, body_size = _job(Request)
    assert request.content_type == "application/json"
    assert len(job) > 1.8 * body_size


def test_an_already_decoded_body_is_kept() -> None:
    decoded_body = ([["x"]], {}, None)
    msg = message([[RUNS[:1]], {}, {}])
    request = DecodedRequest(
        msg, app=app, task=jobs.ingest_runs, body=decoded_body, headers=msg.headers, decoded=True
    )
    assert request.body is decoded_body
