"""engine.workers: a request's users served by forked worker processes, with the same results as
the sequential loop (every method), replies in user order, errors and dead workers named, state
caps and resume intact."""
from __future__ import annotations

import os
import time

import pytest
import torch

from semfl.config import ConfigError, load_config
from conftest import method_group
from semfl.methods import available_methods
from semfl.files import read_jsonl
from semfl.runtimes.local import LocalTransport, UserStates
from semfl.runtimes.run import Runner
from semfl.runtimes.workers import resolve_workers, serve_users, usable_cpus


@pytest.fixture
def one_thread():
    """Sequential and worker runs both on one torch thread: then their floats must agree exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before  # the session's thread count
    torch.set_num_threads(before)


def rows_of(overrides, out, resume=False):
    Runner(load_config(None, overrides), out, resume=resume, show_progress=False, log=lambda m: None).execute()
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture
def short(tiny_overrides):
    """Two rounds (state carried across rounds) of 3 users with 40 samples each (2 batches)."""
    return tiny_overrides + ["rounds=2", "eval.grid_images=0", "eval.snr_sweep=[]", "classifier.epochs=1",
                             "data.max_per_user=40", "data.test_samples=50"]


# ---------------------------------------------------------------- serve_users
def _pid_and_square(user):
    if user == 0:
        time.sleep(0.3)  # user 0 finishes last: replies must still come back in user order
    return os.getpid(), {"square": torch.tensor(user * user)}


def test_replies_come_back_in_user_order_from_other_processes():
    got = list(serve_users([0, 1, 2, 3, 4], _pid_and_square, workers=2))
    assert [u for u, _, _ in got] == [0, 1, 2, 3, 4]
    assert [int(state["square"]) for _, _, state in got] == [0, 1, 4, 9, 16]
    pids = {pid for _, pid, _ in got}
    assert len(pids) == 2 and os.getpid() not in pids


def _fails_for_two(user):
    if user == 2:
        raise ValueError("bad local data")
    return user, {}


def test_a_handlers_exception_is_raised_with_the_workers_traceback():
    with pytest.raises(ValueError, match="bad local data") as info:
        list(serve_users([0, 1, 2, 3], _fails_for_two, workers=2))
    assert any("serving user 2" in note and "_fails_for_two" in note for note in info.value.__notes__)


def _dies_for_one(user):
    if user == 1:
        os._exit(7)  # killed: no reply, no exception
    return user, {}


def test_a_dead_worker_is_named():
    with pytest.raises(RuntimeError, match="serving user 1 died"):
        list(serve_users([0, 1, 2], _dies_for_one, workers=2))


def test_workers_zero_means_one_per_cpu():
    assert resolve_workers(0) == usable_cpus() >= 1
    assert resolve_workers(3) == 3


def test_peek_reads_a_spilled_state_and_keeps_its_file(tmp_path):
    states = UserStates(2, cap_bytes=100, spill_parent=tmp_path)
    states[0] = {"w": torch.zeros(1000)}
    states[1] = {"w": torch.ones(1000)}
    states.enforce(touched=[0, 1], keep=[1])
    spilled = list(tmp_path.glob("state-spill-*/user-0.pt"))
    assert len(spilled) == 1
    assert torch.equal(states.peek(0)["w"], torch.zeros(1000))
    assert spilled[0].exists() and states.loads == 0  # a worker's read leaves the parent's books alone
    states[0] = {"w": torch.full((3,), 2.0)}  # the worker's new state comes back
    assert not spilled[0].exists() and torch.equal(states[0]["w"], torch.full((3,), 2.0))


# ---------------------------------------------------------------- whole runs
@pytest.mark.parametrize("method", method_group(sorted(available_methods())))
def test_workers_give_the_sequential_metrics(method, method_run, tmp_path, one_thread):
    """The method's short run (conftest's method_run: 3 users, 2 rounds, the final sweep) with 2 worker
    processes against the same run in this process (engine.workers = 1, the default): made once per
    session and also compared with Flower (test_flower) when the session runs on one thread; else
    run again here on one thread."""
    overrides, rows, _, _ = method_run(method)
    if one_thread == 1:
        sequential = [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    else:
        sequential = rows_of(overrides + ["engine.workers=1"], tmp_path / "one")
    parallel = rows_of(overrides + ["engine.workers=2"], tmp_path / "two")
    assert parallel == sequential  # exactly: link bits, losses, PSNR, every user's row


def _sequential_rows(method_run, method, tmp_path, one_thread):
    """The rows of ``method``'s short run (conftest's method_run) in this process, on one thread."""
    overrides, rows, _, _ = method_run(method)
    if one_thread == 1:
        return overrides, [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    return overrides, rows_of(overrides + ["engine.workers=1"], tmp_path / "one")


@pytest.mark.xdist_group("method-run-psfl")
def test_workers_with_a_state_cap_give_the_sequential_metrics(method_run, tmp_path, one_thread):
    """PSFL's short run with 2 workers and every idle mentor spilled to disk against the same run in
    this process without a cap (conftest's method_run): the cap changes nothing either."""
    overrides, sequential = _sequential_rows(method_run, "psfl", tmp_path, one_thread)
    capped = rows_of(overrides + ["engine.workers=2", "engine.state_memory_mb=0.01"], tmp_path / "two")
    assert capped == sequential


@pytest.mark.xdist_group("method-run-stc")
def test_killed_mid_round_with_workers_resumes_to_the_same_metrics(method_run, tmp_path, monkeypatch, one_thread):
    """STC's short run (users keep residuals across rounds) with 2 workers, killed mid-round 2 and
    resumed, against the uninterrupted run in this process (conftest's method_run; with workers it
    gives the same metrics: test_workers_give_the_sequential_metrics[stc])."""
    overrides, reference = _sequential_rows(method_run, "stc", tmp_path, one_thread)
    overrides = overrides + ["engine.workers=2"]
    original = LocalTransport.send

    def dying_send(self, users, kind, payload, on_reply=None):
        if self.round != 2:
            return original(self, users, kind, payload, on_reply)

        def die_after_first(user, reply):
            on_reply(user, reply)
            raise KeyboardInterrupt  # killed mid-round while the other worker still trains

        return original(self, users, kind, payload, on_reply=die_after_first)

    monkeypatch.setattr(LocalTransport, "send", dying_send)
    before = _children()
    with pytest.raises(KeyboardInterrupt):
        rows_of(overrides, tmp_path / "killed")
    monkeypatch.setattr(LocalTransport, "send", original)
    assert _children() == before  # no worker left behind, not even a zombie
    assert rows_of(overrides, tmp_path / "killed", resume=True) == reference


def _children() -> set[int]:
    """This process's child processes (Linux /proc; zombies included until reaped)."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        text = open(f"/proc/self/task/{task}/children").read()
        found.update(int(pid) for pid in text.split())
    return found


@pytest.mark.parametrize("sets, message", [
    (["engine.workers=-1"], "engine.workers: must be >= 0"),
    (["engine.workers=2", "device=cuda"], "forked, which CUDA does not survive"),
    (["engine.workers=2", "train.vmap=on"], "exclude each other"),
])
def test_bad_worker_settings_are_named(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)


# ---------------------------------------------------------------- fork hazards and bounds
@pytest.fixture
def deadline():
    """Fail instead of hanging: a deadlocked worker would otherwise stall the suite."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("serve_users did not finish: a worker is stuck")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _convolve(user):
    x = torch.randn(8, 16, 32, 32)
    return float(torch.nn.functional.conv2d(x, torch.randn(16, 16, 3, 3)).sum()), {}


def test_workers_run_after_the_parent_used_several_threads(deadline):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        _convolve(0)  # the parent's OpenMP pool now has threads, which a fork does not copy
        got = list(serve_users([0, 1, 2, 3], _convolve, workers=2))  # 2 threads each would hang
    finally:
        torch.set_num_threads(before)
    assert [u for u, _, _ in got] == [0, 1, 2, 3]


def _chatty(user):
    import sys

    print(f"user {user} says hello")  # a handler's prints under a live progress display
    print(f"user {user} warns", file=sys.stderr)
    return user, {}


def test_handlers_may_print_under_a_live_progress_display(deadline, capfd):
    from rich.console import Console
    from rich.progress import Progress

    # a terminal console: Live then swaps sys.stdout/stderr for proxies that take the console's lock
    # (and the display's), which its refresh thread (gone in a fork) may hold when a worker is forked.
    # That moment is made certain here: another thread holds both locks while the workers are forked
    # (a worker printing through the proxies would wait for them forever: the deadline fails it);
    # then a few requests race the live refresh thread as it comes
    import threading

    console = Console(force_terminal=True, file=open(os.devnull, "w"))
    with Progress(console=console, refresh_per_second=100) as progress:
        task = progress.add_task("users", total=100)
        held, release = threading.Event(), threading.Event()

        def hold_the_locks():
            with progress.live._lock, console._lock:
                held.set()
                release.wait(60)

        holder = threading.Thread(target=hold_the_locks, daemon=True)
        holder.start()
        assert held.wait(60)
        try:
            for user, _, _ in serve_users([0, 1], _chatty, workers=2):
                progress.advance(task)
        finally:
            release.set()
            holder.join()
        for _ in range(5):
            for user, _, _ in serve_users([0, 1], _chatty, workers=2):
                progress.advance(task)
    captured = capfd.readouterr()
    assert "user 1 says hello" in captured.out  # straight to fd 1, not through rich's proxy
    assert "user 1 warns" in captured.err


class TwoArgumentError(Exception):
    def __init__(self, what, why):  # pickles, but does not unpickle (Exception.args holds one string)
        super().__init__(f"{what}: {why}")


def _fails_oddly(user):
    if user == 1:
        raise TwoArgumentError("mentor", "diverged")
    return user, {}


def test_an_exception_that_does_not_unpickle_still_names_itself():
    with pytest.raises(RuntimeError, match="user 1: TwoArgumentError: mentor: diverged") as info:
        list(serve_users([0, 1, 2], _fails_oddly, workers=2))
    assert any("_fails_oddly" in note for note in info.value.__notes__)


def _slow_first(user):
    if user == 0:
        time.sleep(1.0)
    return time.monotonic(), {}


def test_a_slow_user_holds_back_only_a_few_finished_replies():
    got = list(serve_users(list(range(20)), _slow_first, workers=2))
    assert [u for u, _, _ in got] == list(range(20))
    first_done = got[0][1]
    ahead = [u for u, t, _ in got if u != 0 and t < first_done]
    assert len(ahead) <= 3  # the window: at most 2 x workers places past the oldest unfinished user


def test_a_state_set_back_is_the_most_recently_used(tmp_path):
    states = UserStates(2, cap_bytes=5000, spill_parent=tmp_path)
    states[0] = {"w": torch.zeros(1000)}
    states[1] = {"w": torch.zeros(1000)}
    states[0] = {"w": torch.ones(1000)}  # user 0 served last (a worker's reply)
    states.enforce(touched=[0, 1])
    assert [p.name for p in tmp_path.glob("state-spill-*/*.pt")] == ["user-1.pt"]


def test_workers_die_with_a_killed_parent():
    """A parent of workers (a fork of this process: no interpreter start) is killed without unwinding,
    so serve_users' cleanup never runs: its workers die with it."""
    import signal
    import threading

    read_end, write_end = os.pipe()
    parent = os.fork()
    if parent == 0:  # the parent of the workers: never returns, never runs pytest's exit handlers
        try:
            os.close(read_end)

            def report():
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    kids = [p for t in os.listdir("/proc/self/task")
                            for p in open(f"/proc/self/task/{t}/children").read().split()]
                    if len(kids) >= 2:
                        break
                    time.sleep(0.05)
                os.write(write_end, (" ".join(kids) + "\n").encode())

            threading.Thread(target=report, daemon=True).start()
            list(serve_users([0, 1], lambda u: time.sleep(60), workers=2))
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        pids = [int(p) for p in reader.readline().split()]
    assert len(pids) == 2
    os.kill(parent, signal.SIGKILL)  # no unwinding: serve_users' cleanup never runs
    os.waitpid(parent, 0)

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for pid in left:  # do not leave orphans behind a failing test
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_a_machine_with_a_gpu_refuses_workers(monkeypatch):
    from semfl.wireless.link import Link  # noqa: F401 - the transport's link is not used before the check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="this machine has a GPU"):
        LocalTransport(None, [], 0, torch.device("cpu"), handlers={}, workers=2)


def test_psfl_loads_the_mentor_foundations_before_forking(short, tmp_path, one_thread):
    # one round: the mentors start from their foundations in round 1 (state across rounds with
    # workers: test_workers_give_the_sequential_metrics)
    overrides = short + ["method=psfl", "foundation.samples=100", "foundation.epochs=1", "data.user_fraction=0.5",
                         "rounds=1"]
    logs: list[str] = []
    Runner(load_config(None, overrides + ["engine.workers=2"]), tmp_path / "two", show_progress=False,
           log=logs.append).execute()
    mentors = next(m for m in logs if m.startswith("mentors: "))
    archs = {pair.split("=")[1] for pair in mentors.removeprefix("mentors: ").split(", ")}
    for arch in archs:  # in this process's log, so not pretrained (or read) by each worker
        assert any(m.startswith(f"foundation {arch}") for m in logs), (arch, logs)
    parallel = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    rows_of(overrides + ["engine.workers=1"], tmp_path / "one")
    sequential = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(parallel) == strip(sequential)
