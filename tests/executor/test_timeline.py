"""ContextExecutor.record_timeline writes a valid Chrome trace-event file."""

import json
import logging
import os
import threading
import time

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec._timeline import TracedFuture

from helpers import CPU2, TIMEOUT


def double(x):
    return (x * 2).asnumpy()


def test_trace_has_a_track_per_worker_and_a_span_per_task(tmp_path):
    path = tmp_path / "trace.json"
    contexts = [mx.cpu(0), mx.cpu(1), mx.cpu(1)]
    shards = [mx.nd.ones((8, 8), ctx=contexts[i % 3]) for i in range(12)]
    with pe.ContextExecutor(contexts) as ex:
        with ex.record_timeline(path) as timeline:
            results = list(ex.map(double, shards, timeout=TIMEOUT))
        assert timeline.path == str(path)
        outside = ex.submit(double, shards[0])  # after the region: not recorded
        outside.result(TIMEOUT)
    assert len(results) == 12

    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    tasks = [e for e in events if e["ph"] == "X" and e["cat"] == "task"]
    assert len(tasks) == 12 and all(e["name"] == "double" for e in tasks)
    worker_tracks = {e["tid"] for e in tasks}
    assert len(worker_tracks) == 3  # the duplicated context has two workers, two tracks
    assert sorted(names[t].split("[")[1] for t in worker_tracks) == ["cpu(0)]", "cpu(1)]", "cpu(1)]"]
    for event in events:
        assert {"ph", "pid", "name"} <= set(event)
        if event["ph"] == "X":
            assert event["ts"] >= 0 and event["dur"] >= 0
    # Complete spans on one track never overlap.
    for tid in {e["tid"] for e in events if e["ph"] == "X"}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X" and e["tid"] == tid)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end - 1e-3
    # Queued phases are async begin/end pairs, one per task.
    begins = [e for e in events if e["ph"] == "b"]
    assert len(begins) == 12 and len({e["id"] for e in begins}) == 12
    # map's waits in result() are on the caller's own track.
    assert any(names[e["tid"]].endswith("(caller)") for e in events if e["ph"] == "X" and e["cat"] == "wait")


def test_gate_wait_is_marked(tmp_path):
    path = tmp_path / "trace.json"
    inside, release = threading.Event(), threading.Event()

    def first_task():
        inside.set()
        release.wait(TIMEOUT)

    with pe.ContextExecutor(CPU2) as ex:
        with ex.record_timeline(path):
            a = ex.submit_to(mx.cpu(0), first_task)
            assert inside.wait(TIMEOUT)
            b = ex.submit_to(mx.cpu(1), double, mx.nd.ones(2, ctx=mx.cpu(1)))
            release.set()
            a.result(TIMEOUT)
            b.result(TIMEOUT)
    events = json.loads(path.read_text())["traceEvents"]
    gates = [e for e in events if e["ph"] == "X" and e["cat"] == "gate"]
    assert len(gates) >= 1 and gates[0]["name"] == "serial-init gate"


def test_recording_stops_and_writes_when_the_region_raises(tmp_path):
    path = tmp_path / "trace.json"
    with pe.ContextExecutor(CPU2) as ex:
        with pytest.raises(KeyError):
            with ex.record_timeline(path):
                ex.submit(double, mx.nd.ones(2)).result(TIMEOUT)
                raise KeyError("leave the region")
        after = ex.submit(double, mx.nd.ones(2))
        assert not isinstance(after, TracedFuture)  # recording is off again
        after.result(TIMEOUT)
        with ex.record_timeline(tmp_path / "again.json"):  # a new recording may start
            with pytest.raises(RuntimeError, match="already being recorded"):
                with ex.record_timeline(tmp_path / "third.json"):
                    pass
    tasks = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "task"]
    assert len(tasks) == 1


def test_mean_concurrency_tells_whether_tasks_overlapped(tmp_path):
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def meet():
        barrier.wait()
        time.sleep(0.01)  # both tasks are inside together for at least this long

    with pe.ContextExecutor(CPU2, serial_init=False) as ex:
        with ex.record_timeline(tmp_path / "together.json") as together:
            for future in [ex.submit_to(c, meet) for c in CPU2]:
                future.result(TIMEOUT)
        with ex.record_timeline(tmp_path / "apart.json") as apart:
            for _ in range(3):
                ex.submit_to(mx.cpu(0), time.sleep, 0.001).result(TIMEOUT)
        with ex.record_timeline(tmp_path / "empty.json") as empty:
            pass
    assert together.mean_concurrency() > 1.2
    assert apart.mean_concurrency() == pytest.approx(1.0)
    assert empty.mean_concurrency() == 0.0


def test_the_timeline_is_a_public_type():
    assert "Timeline" in pe.__all__
    with pe.ContextExecutor([mx.cpu(0)]) as ex:
        with ex.record_timeline(os.devnull) as timeline:
            pass
    assert type(timeline) is pe.Timeline


def test_records_the_tasks_that_finish_inside_the_block(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="parallel_exec")
    release = threading.Event()

    def parked(tag):
        release.wait(TIMEOUT)
        return tag

    with pe.ContextExecutor([mx.cpu(0)]) as ex:
        before = ex.submit(parked, "before")  # submitted before the block...
        with ex.record_timeline(tmp_path / "trace.json") as timeline:
            release.set()
            assert before.result(TIMEOUT) == "before"  # ...finishes inside it: recorded
            inside = ex.submit(time.sleep, 0)
            inside.result(TIMEOUT)
    names = [e["name"].rsplit(".", 1)[-1] for e in timeline.events() if e.get("cat") == "task"]
    assert names == ["parked", "sleep"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_warns_when_tasks_submitted_inside_finish_after_the_block(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="parallel_exec")
    release = threading.Event()
    path = tmp_path / "trace.json"
    with pe.ContextExecutor(CPU2) as ex:
        with ex.record_timeline(path) as timeline:
            futures = [ex.submit(release.wait, TIMEOUT) for _ in range(3)]
        release.set()  # the results are read only after the block
        assert all(f.result(TIMEOUT) for f in futures)
        with ex.record_timeline(tmp_path / "nothing.json"):
            pass  # nothing submitted: an empty trace is no surprise, no warning
    assert not [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "task"]
    assert timeline.mean_concurrency() == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and "3 task(s) were submitted inside the block" in warnings[0]
