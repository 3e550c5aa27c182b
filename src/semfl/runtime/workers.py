"""Users served in parallel by forked worker processes (``engine.workers``).

Each request forks its workers afresh, so a worker is a snapshot of this process at that moment:
the method's working models, the run context and every user's state as they are now, with no
copying. A worker serves the users it is handed, one at a time (the next user goes to whichever
worker is free), and sends back each reply with that user's new state; :func:`serve_users`
yields them in the order of ``users``, so aggregation, link charging and checkpoints see exactly
what the sequential loop sees. A handler may only change its context's state and return its
reply: the contract the Flower transport already imposes, where handlers run on other machines.

Why processes and not threads: on a CPU the small convolutions of a user's local step scale
poorly across torch's intra-op threads, while independent users scale almost linearly.
Fork is not usable once CUDA is initialised, so this is a CPU engine (the config says so).
"""
from __future__ import annotations

import io
import os
import signal
import traceback
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, Callable, Iterator

import torch


_IN_WORKER = False


def in_worker() -> bool:
    """True in a forked worker: its other threads (a progress display's refresh) did not survive
    the fork, and a lock one of them held stays held, so a worker logs with a bare write."""
    return _IN_WORKER


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """``engine.workers``: 0 = one per usable CPU; 1 = sequential, in this process."""
    return usable_cpus() if workers == 0 else workers


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)  # our own worker's bytes


def _worker_loop(conn: Connection, serve: Callable[[int], tuple[Any, Any]], threads: int) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(threads)
    while True:
        user = conn.recv()
        if user is None:
            return
        try:
            reply, state = serve(user)
            message = _dumps(("ok", user, reply, state))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
            text = traceback.format_exc()
            try:
                message = _dumps(("error", user, exc, text))
            except Exception:  # an exception that does not pickle
                message = _dumps(("error", user, RuntimeError(repr(exc)), text))
            conn.send_bytes(message)
            return
        conn.send_bytes(message)


def _start_worker(serve: Callable[[int], tuple[Any, Any]], threads: int,
                  parent_ends: list[Connection]) -> tuple[int, Connection]:
    parent_end, child_end = Pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns, never runs this process's exit handlers
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends a worker at once
            parent_end.close()
            for other in parent_ends:
                other.close()
            _worker_loop(child_end, serve, threads)
        except BaseException:  # noqa: BLE001 - the parent sees the pipe close and names the user
            code = 1
        finally:
            os._exit(code)
    child_end.close()
    return pid, parent_end


def serve_users(users: list[int], serve: Callable[[int], tuple[Any, Any]],
                workers: int) -> Iterator[tuple[int, Any, Any]]:
    """Run ``serve(user) -> (reply, state)`` for every user in up to ``workers`` forked processes;
    yield ``(user, reply, state)`` in the order of ``users``.

    A handler's exception is raised here, with the worker's traceback as a note; a worker that
    dies (killed, out of memory) raises a RuntimeError naming the user it was serving. Either way
    the other workers are stopped before this returns.
    """
    users = list(users)
    count = min(workers, len(users))
    threads = max(1, torch.get_num_threads() // count)
    pids: dict[Connection, int] = {}
    serving: dict[Connection, int] = {}
    done: dict[int, tuple[Any, Any]] = {}
    queue = iter(users)
    finished = False
    try:
        for _ in range(count):
            pid, conn = _start_worker(serve, threads, list(pids))
            pids[conn] = pid
        for conn in pids:
            serving[conn] = next(queue)
            conn.send(serving[conn])
        emitted = 0
        while emitted < len(users):
            while emitted < len(users) and users[emitted] in done:
                user = users[emitted]
                reply, state = done.pop(user)
                emitted += 1
                yield user, reply, state
            if emitted == len(users):
                break
            for conn in wait(list(serving)):
                user = serving.pop(conn)
                try:
                    status, got, reply, state = _loads(conn.recv_bytes())
                except EOFError:
                    raise RuntimeError(f"engine.workers: the worker process serving user {user} died "
                                       "(killed, or out of memory?)") from None
                if status == "error":
                    reply.add_note(f"raised in the worker process serving user {got}:\n{state}")
                    raise reply
                done[got] = (reply, state)
                following = next(queue, None)
                conn.send(following)
                if following is not None:
                    serving[conn] = following
        finished = True
    finally:
        for conn, pid in pids.items():
            if not finished:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            conn.close()
            os.waitpid(pid, 0)
