"""engine.workers: a request's users served by forked worker processes, with the same results as
the sequential loop (every method), replies in user order, errors and dead workers named, state
caps and resume intact."""
from __future__ import annotations

import os
import time

import pytest
import torch

from semfl.config import ConfigError, load_config
from semfl.methods import available_methods
from semfl.runtime.checkpoint import read_jsonl
from semfl.runtime.local import LocalTransport, UserStates
from semfl.runtime.run import Runner
from semfl.runtime.workers import resolve_workers, serve_users, usable_cpus


@pytest.fixture
def one_thread():
    """Sequential and worker runs both on one torch thread: then their floats must agree exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_of(overrides, out, resume=False):
    Runner(load_config(None, overrides), out, resume=resume, show_progress=False, log=lambda m: None).execute()
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture
def short(tiny_overrides):
    return tiny_overrides + ["rounds=2", "eval.grid_images=0", "eval.snr_sweep=[]", "classifier.epochs=1"]


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
@pytest.mark.parametrize("method", sorted(available_methods()))
def test_workers_give_the_sequential_metrics(method, short, tmp_path, one_thread):
    overrides = short + [f"method={method}"]
    sequential = rows_of(overrides + ["engine.workers=1"], tmp_path / "one")
    parallel = rows_of(overrides + ["engine.workers=2"], tmp_path / "two")
    assert parallel == sequential  # exactly: link bits, losses, PSNR, every user's row


def test_workers_with_a_state_cap_give_the_sequential_metrics(short, tmp_path, one_thread):
    overrides = short + ["method=psfl", "engine.state_memory_mb=0.01"]  # every idle mentor is spilled
    sequential = rows_of(overrides + ["engine.workers=1"], tmp_path / "one")
    assert rows_of(overrides + ["engine.workers=2"], tmp_path / "two") == sequential


def test_killed_mid_round_with_workers_resumes_to_the_same_metrics(short, tmp_path, monkeypatch, one_thread):
    overrides = short + ["method=stc", "engine.workers=2"]  # STC: users keep residuals across rounds
    reference = rows_of(overrides, tmp_path / "full")
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
