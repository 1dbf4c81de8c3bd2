"""Profile evidence for the dispatch figures: design floors and a task's pieces.

Three stripped-down executors run beside the real ones in section 1, so the
cost of *a thread per context* is told apart from the cost of what
``ContextExecutor`` adds to it (routing, autograd flags, pinning, the gate,
statistics, cancellation):

- ``ThreadPerContext``: one thread and one ``SimpleQueue`` per context, a
  plain lock per task to wait on and nothing else: the floor of
  ``ContextExecutor.map``'s design.
- ``CorrectFloor``: ``ThreadPerContext`` plus the flags and the routing,
  which no correct executor can drop: the floor of ``ContextExecutor``'s
  ``map`` (a lock per task) and ``submit`` (a ``Future`` per task).
- ``ContractFloor``: a lean executor that keeps every per-task promise of
  ``ContextExecutor``'s contract (statistics, cancellation, pinning, the
  fork guard, shutdown checks besides the flags and routing), written as
  directly as it can be: the floor of the contract, not of the design.
- ``SharedQueue``: threads sharing one input queue and one output queue, no
  futures, driven through ``put``/``get``: the floor of gluonnlp's
  ``Parallel`` design, which cannot pin a shard to its device, and of
  ``pe.Parallel``, which uses it too. ``SharedQueue(n, fn, carry_flags=True)``
  adds what ``pe.Parallel`` keeps on top of that design: the caller's flags
  read at each put and set in the worker around the call (the worker's put
  back after it), and an outcome per call, so a call that raises reaches
  ``get()`` instead of ending its worker. ``SharedQueueContract`` keeps, besides, every other per-call
  promise of ``pe.Parallel``: the floor of its contract.

``task_pieces`` times, in one thread, each piece of work a ``ContextExecutor``
task does besides the hand-off. It uses the package's private modules on
purpose: it measures them.
"""

from __future__ import annotations

import queue
import threading
import time
import timeit
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Sequence, Tuple

import mxnet as mx

import parallel_exec as pe
from parallel_exec import _forkguard, _held, _lifecycle, _routing, _state
from parallel_exec._executor import _results_in_order
from parallel_exec._future import MapFuture, TaskFuture
from parallel_exec._stats import WorkerCounters


def _pending() -> Tuple[Any, List[Any]]:
    """What a floor's call is waited on with: a lock held until its result is in the box."""
    done = threading.Lock()
    done.acquire()
    return done, []


def _results(pending: Sequence[Tuple[Any, List[Any]]]) -> List[Any]:
    """Wait for each call in order; its result."""
    results = []
    for done, box in pending:
        done.acquire()
        results.append(box[0])
    return results


class ThreadPerContext:
    """One thread and queue per shard position; a plain lock per task says it is done.

    The lock stands for what ``ContextExecutor.map`` gives each call (a
    ``MapFuture``, whose waiting is one lock); ``submit`` hands out a
    ``Future``, as ``ThreadPoolExecutor`` does.
    """

    def __init__(self, n: int) -> None:
        self._queues: List[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        self._threads = [threading.Thread(target=self._serve, args=(q,), daemon=True) for q in self._queues]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _serve(work: queue.SimpleQueue) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            done, box, fn, arg = item
            box.append(fn(arg))
            done.release()

    def call_on(self, index: int, fn: Callable[[Any], Any], arg: Any) -> Any:
        """Run ``fn(arg)`` on thread ``index`` and wait for it: one shard of a serial first step."""
        done, box = _pending()
        self._queues[index].put((done, box, fn, arg))
        return _results([(done, box)])[0]

    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> List[Any]:
        pending = []
        for work, shard in zip(self._queues, shards):
            done, box = _pending()
            work.put((done, box, fn, shard))
            pending.append((done, box))
        return _results(pending)

    def close(self) -> None:
        for work in self._queues:
            work.put(None)
        for thread in self._threads:
            thread.join()


class CorrectFloor:
    """``ThreadPerContext`` plus only what a correct ``ContextExecutor`` cannot drop.

    A call runs on the thread of its shard's device (one GIL-keeping C call
    to read the device), with the caller's autograd and NumPy flags (read in
    the caller: three C calls per ``map`` or ``submit``), and the worker's own
    flags are put back after it, since a task may leave any flag changed
    (three C calls per task). No routing tables, gate, statistics,
    cancellation, fork guard, shutdown or error handling: the floor of the
    design with its correctness kept, using the package's own flag and
    device functions.
    """

    def __init__(self, contexts: Sequence["mx.Context"]) -> None:
        self._queues: Dict[Any, queue.SimpleQueue] = {}
        self._threads = []
        for context in contexts:
            work: queue.SimpleQueue = queue.SimpleQueue()
            self._queues[(context.device_typeid, context.device_id)] = work
            self._threads.append(threading.Thread(target=self._serve, args=(work,), daemon=True))
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _serve(work: queue.SimpleQueue) -> None:
        own = _state.capture_flags()
        while True:
            item = work.get()
            if item is None:
                return
            done, fn, arg, flags = item
            scope = _state.apply_flags(flags, own)  # sets nothing when they are the worker's own
            result = fn(arg)
            _state.restore_flags(own, scope)
            if isinstance(done, Future):
                done.set_running_or_notify_cancel()
                done.set_result(result)
            else:
                done[1].append(result)
                done[0].release()

    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> List[Any]:
        flags = _state.capture_flags()
        pending = [_pending() for _ in shards]
        placed = [(self._queues[_held.device_of(shard)], (done, fn, shard, flags))
                  for shard, done in zip(shards, pending)]
        for work, item in placed:  # back to back: each put wakes a thread (RESULTS.md)
            work.put(item)
        return _results(pending)

    def submit(self, fn: Callable[[Any], Any], shard: Any) -> Future:
        future: Future = Future()
        self._queues[_held.device_of(shard)].put((future, fn, shard, _state.capture_flags()))
        return future

    def close(self) -> None:
        for work in self._queues.values():
            work.put(None)
        for thread in self._threads:
            thread.join()


class _ContractWorker:
    """One worker of ``ContractFloor``: its queue, counters and flags."""

    def __init__(self, context: "mx.Context") -> None:
        self.context = context
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.counters = WorkerCounters()
        self.pinned = mx.Context(context)
        self.known: Any = None  # its flags, when nothing else can have run on its thread since a task

    @property
    def load(self) -> int:
        return self.counters.load

    def serve(self) -> None:
        _state.set_worker_context(self.context, self.pinned)
        own = self.known = _state.capture_flags()
        work, counters, pinned, now = self.queue, self.counters, self.pinned, time.perf_counter_ns
        ident, busy = threading.get_ident(), _forkguard._busy
        while True:
            item = work.get()
            if item is None:
                return
            busy.add(ident)  # the fork guard's bookkeeping (no fork runs here)
            future, fn, args, kwargs, flags, submit_ns = item
            start = now()
            if future.set_running_or_notify_cancel():
                known, self.known = self.known, None
                if known is None:
                    _state.keep_default_context(pinned)
                try:
                    scope = _state.apply_flags(flags, known)
                    try:
                        result = fn(*args, **kwargs)
                    finally:
                        _state.keep_default_context(pinned)
                        _state.restore_flags(own, scope)
                except BaseException as exc:
                    counters.add_task(start - submit_ns, 0, now() - start, False)
                    future.set_exception(exc)
                else:
                    counters.add_task(start - submit_ns, 0, now() - start, True)
                    future.set_result(result)
                    if not future._done_callbacks:
                        self.known = own
            busy.discard(ident)
            del item, future, fn, args, kwargs


class ContractFloor:
    """A lean executor that keeps every per-task promise ``ContextExecutor`` makes.

    Written for this benchmark, as directly as it can be: the routing rule
    (first NDArray's device, the least loaded of its workers, else round
    robin), the caller's flags in force in the task and the worker's put
    back, the worker's context kept the default, a future that can be
    cancelled and counts it (the package's ``TaskFuture`` and ``MapFuture``),
    the statistics (counts, times, recent samples), the fork guard's
    bookkeeping, the checks that refuse work after shutdown, under a lock,
    and ``map``'s results iterator (the package's: it cancels what is left
    when a result raises or the iterator is closed). Left out, because they
    cost one attribute test a task once set up: the serial-init gate (open
    after the first step) and the timeline (off). What ``ContextExecutor``
    costs above this is its structure, not its promises.
    """

    def __init__(self, contexts: Sequence["mx.Context"]) -> None:
        self._lock = threading.Lock()
        self._shutdown = False
        self._workers = [_ContractWorker(context) for context in contexts]
        self._router = _routing.Router(self._workers)
        self._threads = [threading.Thread(target=worker.serve, daemon=True) for worker in self._workers]
        for thread in self._threads:
            thread.start()

    def _check_open(self) -> None:
        if self._shutdown or _lifecycle.exiting:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        future = TaskFuture()
        item = (future, fn, args, kwargs, _state.capture_flags(), time.perf_counter_ns())
        candidates = self._router.candidates_for(args, kwargs)
        with self._lock:
            self._check_open()
            worker = self._router.pick(candidates)
            worker.counters.submitted += 1
            future.counters = worker.counters
            worker.queue.put(item)
        return future

    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> List[Any]:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        flags, submit_ns = _state.capture_flags(), time.perf_counter_ns()
        routed: List[Tuple[Any, MapFuture, Tuple[Any, ...]]] = []
        for shard in shards:
            args = (shard,)
            future = MapFuture()
            routed.append((self._router.candidates_for(args, {}), future, (future, fn, args, {}, flags, submit_ns)))
        with self._lock:
            self._check_open()
            placed = []
            for candidates, future, item in routed:
                worker = self._router.pick(candidates)
                worker.counters.submitted += 1
                future.counters = worker.counters
                placed.append((worker.queue, item))
            for work, item in placed:  # back to back: each put wakes a thread (RESULTS.md)
                work.put(item)
        # Executor.map's iterator: results in order, the rest cancelled if one raises.
        return list(_results_in_order([future for _, future, _ in routed], None))

    def close(self) -> None:
        with self._lock:
            self._shutdown = True
        for worker in self._workers:
            worker.queue.put(None)
        for thread in self._threads:
            thread.join()


class SharedQueue:
    """Threads taking calls of ``fn`` from one queue and putting results on another.

    Driven as the put/get shims are (``put(x)`` per call, ``get()`` per
    result, in completion order), so it is their floor, the per-call Python
    of that API included. With ``carry_flags``, each call also carries its
    caller's flags and its outcome (a result or the exception raised), as
    ``pe.Parallel``'s do.
    """

    def __init__(self, n: int, fn: Callable[[Any], Any], carry_flags: bool = False) -> None:
        self._in: queue.SimpleQueue = queue.SimpleQueue()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._fn = fn
        self._carry_flags = carry_flags
        serve = self._serve_with_flags if carry_flags else self._serve
        self._threads = [threading.Thread(target=serve, daemon=True) for _ in range(n)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        fn = self._fn
        while True:
            item = self._in.get()
            if item is None:
                return
            self._out.put(fn(item[0]))

    def _serve_with_flags(self) -> None:
        fn = self._fn
        own = _state.capture_flags()
        while True:
            item = self._in.get()
            if item is None:
                return
            arg, flags = item
            scope = _state.apply_flags(flags, own)  # the flags are own between calls
            try:
                outcome = (True, fn(arg))
            except BaseException as exc:
                outcome = (False, exc)
            _state.restore_flags(own, scope)
            self._out.put(outcome)

    def put(self, x: Any) -> None:
        self._in.put((x, _state.capture_flags()) if self._carry_flags else (x,))

    def get(self) -> Any:
        if not self._carry_flags:
            return self._out.get()
        succeeded, outcome = self._out.get()
        if not succeeded:
            raise outcome
        return outcome

    def close(self) -> None:
        for _ in self._threads:
            self._in.put(None)
        for thread in self._threads:
            thread.join()


class SharedQueueContract(SharedQueue):
    """``SharedQueue`` with flags, plus every other per-call promise of ``pe.Parallel``.

    Written as directly as it can be: ``get()`` with no call pending raises
    instead of blocking, and ``put()`` after ``close()`` raises (a count and
    a flag under one lock, taken by ``put`` and ``get``); a ``put()``
    interrupted after queueing takes its call back unless a worker has it
    (a lock per call, taken once); workers hold between calls while
    ``os.fork()`` runs (``_forkguard``); and each call runs under the
    worker's default context, whatever the last one left entered.
    """

    def __init__(self, n: int, fn: Callable[[Any], Any]) -> None:
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        super().__init__(n, fn, carry_flags=True)

    def _serve_with_flags(self) -> None:
        # The base's loop written out again with the promises in it: a helper
        # shared by both would add a call per task to what each floor measures.
        fn = self._fn
        ident = threading.get_ident()
        own = _state.capture_flags()
        pinned = mx.Context(mx.current_context())
        while True:
            item = self._in.get()
            if item is None:
                return
            arg, flags, claim = item
            _forkguard.begin_task(ident)
            if claim.acquire(False):
                _state.keep_default_context(pinned)
                scope = _state.apply_flags(flags, own)
                try:
                    outcome = (True, fn(arg))
                except BaseException as exc:
                    outcome = (False, exc)
                _state.restore_flags(own, scope)
                self._out.put(outcome)
            _forkguard.end_task(ident)

    def put(self, x: Any) -> None:
        claim = threading.Lock()
        call = (x, _state.capture_flags(), claim)
        with self._lock:
            if self._closed:
                raise RuntimeError("put() after close()")
            self._pending += 1
            try:
                self._in.put(call)
            except BaseException:
                if claim.acquire(False):
                    self._pending -= 1
                raise

    def get(self) -> Any:
        with self._lock:
            if not self._pending:
                raise RuntimeError("get() with no pending put()")
            self._pending -= 1
        return super().get()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        super().close()


def task_pieces(number: int = 20_000) -> Dict[str, float]:
    """Microseconds of each piece of a ``ContextExecutor`` task, timed in one thread.

    Returns:
        piece -> microseconds per call (best of 5 repeats).
    """
    shard = mx.nd.zeros((1,), ctx=mx.cpu(1))
    by_context = {mx.cpu(0): 0, mx.cpu(1): 1}
    by_device = {(1, 0): 0, (1, 1): 1}
    own = _state.capture_flags()
    pinned = mx.Context(mx.cpu(1))
    _state.keep_default_context(pinned)

    def future_life(future: Any) -> None:
        future.set_running_or_notify_cancel()
        future.set_result(None)
        future.result()
        future.cancel()  # as map's iterator does

    def pin() -> None:
        _state.keep_default_context(pinned)  # before the task
        _state.keep_default_context(pinned)  # after it

    def pin_by_entering() -> None:
        with pinned:
            pass

    executor = pe.ContextExecutor([mx.cpu(1)])
    slot = executor._slots[0]

    def timeline_off() -> None:
        # What a task pays for the timeline while none is recorded: submit
        # and the worker each read one attribute (_executor, _worker).
        if executor._crew.timeline is not None or slot.timeline is not None:
            raise AssertionError("no timeline is being recorded")

    pieces: Dict[str, Callable[[], Any]] = {
        "before: read the autograd flags through mx.autograd (2 GIL-releasing C calls)": lambda: (
            mx.autograd.is_recording(), mx.autograd.is_training()
        ),
        "before: set the autograd flags through mx.autograd (2 GIL-releasing C calls)": lambda: (
            mx.autograd.set_recording(False), mx.autograd.set_training(False)
        ),
        "read the caller's flags (3 GIL-keeping C calls + 1 attribute; once per map)": _state.capture_flags,
        "before: route by the NDArray's .context (1 GIL-releasing C call + an mx.Context)": lambda: by_context.get(
            # Never None (the shard is an NDArray); a check here would be timed with the piece.
            _routing.find_first_ndarray((shard,), {}).context  # type: ignore[union-attr]
        ),
        "route: find the first NDArray and look up its device (1 GIL-keeping C call)": lambda: by_device.get(
            _held.device_of(_routing.find_first_ndarray((shard,), {}))
        ),
        "submit: a Future's life (create, run, set, read, cancel)": lambda: future_life(TaskFuture()),
        "map: a MapFuture's life (create, run, set, read, cancel)": lambda: future_life(MapFuture()),
        "before: pin by entering and leaving the worker's Context": pin_by_entering,
        "pin: keep the worker's Context the default (checked before and after)": pin,
        "apply and restore the flags in the worker (6 GIL-keeping C calls)": lambda: _state.restore_flags(
            own, _state.apply_flags(own)
        ),
        "timeline while none is recorded: two attribute reads": timeline_off,
    }
    try:
        return {name: min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6 for name, fn in pieces.items()}
    finally:
        executor.shutdown()
