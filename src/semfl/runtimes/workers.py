"""Users served in parallel by forked worker processes (``engine.workers``).

Each request forks its workers afresh, so a worker is a snapshot of this process at that moment:
the method's working models, the run context and every user's state as they are now, with no
copying. A worker serves the users it is handed, one at a time (the next user goes to whichever
worker is free, at most a few places ahead of the oldest unfinished one, which bounds the
replies held here), and sends back each reply with that user's new state; :func:`serve_users`
yields them in the order of ``users``, so aggregation, link charging and checkpoints see exactly
what the sequential loop sees. A handler may only change its context's state and return its
reply: the contract the Flower transport already imposes, where handlers run on other machines.

Why processes: one user's small convolutions synchronise torch's intra-op threads at every
operation, while independent users need no synchronisation at all. Each worker runs one torch
thread: OpenMP's thread pool does not survive a fork (a worker asking it for two threads hangs).
Fork is not usable once CUDA is initialised, so this is a CPU engine (the transport says so).
"""
from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, Callable, Iterator

import torch

_IN_WORKER = False
_PR_SET_PDEATHSIG = 1


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


def _become_worker(parent: int) -> None:
    """What a fresh fork must do before serving anyone."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends a worker at once
    try:  # die with the parent, even when it is killed without unwinding (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    # a progress display may have replaced stdout/stderr with proxies whose lock a thread that did
    # not survive the fork may hold: a handler's print or warning goes straight to the fds instead
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    torch.set_num_threads(1)


def _error_message(user: int, exc: BaseException) -> bytes:
    """The exception (pickled on its own: it may not unpickle), its summary and the traceback."""
    try:
        pickled = _dumps(exc)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: the summary carries it
        pickled = None
    return _dumps(("error", user, pickled, f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def _worker_loop(conn: Connection, serve: Callable[[int], tuple[Any, Any]]) -> None:
    while True:
        user = conn.recv()
        if user is None:
            return
        try:
            message = _dumps(("ok", user, *serve(user)))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
            conn.send_bytes(_error_message(user, exc))
            return
        conn.send_bytes(message)


def _start_worker(serve: Callable[[int], tuple[Any, Any]], parent_ends: list[Connection]) -> tuple[int, Connection]:
    parent_end, child_end = Pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: never returns, never runs this process's exit handlers
        code = 0
        try:
            _become_worker(parent)
            parent_end.close()
            for other in parent_ends:
                other.close()
            _worker_loop(child_end, serve)
        except BaseException:  # noqa: BLE001 - the parent sees the pipe close and names the user
            code = 1
        finally:
            os._exit(code)
    child_end.close()
    return pid, parent_end


def _raise_error(user: int, pickled: bytes | None, summary: str, text: str) -> None:
    note = f"raised in the worker process serving user {user}:\n{text}"
    try:
        exc = _loads(pickled) if pickled is not None else None
    except Exception:  # noqa: BLE001 - e.g. an exception whose __init__ wants other arguments
        exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"user {user}: {summary}")
    exc.add_note(note)
    raise exc


def serve_users(users: list[int], serve: Callable[[int], tuple[Any, Any]],
                workers: int) -> Iterator[tuple[int, Any, Any]]:
    """Run ``serve(user) -> (reply, state)`` for every user in up to ``workers`` forked processes;
    yield ``(user, reply, state)`` in the order of ``users``.

    A worker gets a user at most ``2 * workers`` places after the oldest one not yet yielded, so at
    most that many finished replies wait here while a slow user holds up the order. A handler's
    exception is raised here, with the worker's traceback as a note; a worker that dies (killed,
    out of memory) raises a RuntimeError naming the user it was serving. Either way the other
    workers are stopped before this returns.
    """
    users = list(users)
    count = min(workers, len(users))
    window = 2 * count
    pids: dict[Connection, int] = {}
    serving: dict[Connection, int] = {}
    done: dict[int, tuple[Any, Any]] = {}
    idle: list[Connection] = []
    handed = emitted = 0
    finished = False

    def hand_out() -> None:
        nonlocal handed
        while idle and handed < len(users) and handed < emitted + window:
            conn = idle.pop()
            serving[conn] = users[handed]
            conn.send(users[handed])
            handed += 1
        if handed == len(users):  # nothing left: idle workers may go
            while idle:
                idle.pop().send(None)

    try:
        for _ in range(count):
            pid, conn = _start_worker(serve, list(pids))
            pids[conn] = pid
            idle.append(conn)
        hand_out()
        while emitted < len(users):
            while emitted < len(users) and users[emitted] in done:
                user = users[emitted]
                reply, state = done.pop(user)
                emitted += 1
                yield user, reply, state
            hand_out()
            if emitted == len(users):
                break
            for conn in wait(list(serving)):
                user = serving.pop(conn)
                try:
                    message = _loads(conn.recv_bytes())
                except EOFError:
                    raise RuntimeError(f"engine.workers: the worker process serving user {user} died "
                                       "(killed, or out of memory?)") from None
                if message[0] == "error":
                    _raise_error(*message[1:])
                _, got, reply, state = message
                done[got] = (reply, state)
                idle.append(conn)
            hand_out()
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
