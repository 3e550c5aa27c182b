"""The two halves of a method share nothing at run time: every user handler, replayed on a method
instance that has never run a round (what a Flower node builds), gives the same reply and leaves the
same user state as it did inside a running base station. A handler that reads base-station state
(a model the loop trained, a round counter, a cached mask) fails here instead of on a deployment."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import method_group
from semfl.config import load_config
from semfl.methods import available_methods, get_method
from semfl.protocol import seeding
from semfl.runtimes.local import LocalTransport
from semfl.runtimes.run import build_context


def _same(a, b) -> bool:
    """Exact equality of nested tensors / dicts / lists / plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


@pytest.mark.parametrize("method", method_group(sorted(available_methods())))
def test_user_handlers_need_nothing_from_the_base_station(method, method_run):
    """Every user-handler call of the method's short local run (3 users, 2 rounds: the base station
    has run a round before round 2's calls), replayed on a fresh instance."""
    overrides, _, calls, _ = method_run(method)
    cfg = load_config(None, overrides)
    assert calls, f"{method}: no user handler ran"

    # a fresh instance, built as a Flower node builds it: never ran a round, knows no user
    seeding.enter(cfg.seed, "setup")
    run, _ = build_context(cfg, None, log=lambda m: None, with_user_data=False)
    seeding.enter(cfg.seed, "init")
    fresh = get_method(method)(run, LocalTransport(run.link, [], cfg.seed, run.device, handlers={}))
    handlers = fresh.handlers()
    for kind, ctx, request, reply, state_after in calls:
        ctx = dataclasses.replace(ctx, state=copy.deepcopy(ctx.state))
        seeding.enter(ctx.seed)
        again = handlers[kind](ctx, copy.deepcopy(request))
        where = f"{method}: handler {kind!r} for user {ctx.user} in round {ctx.round}"
        assert again.codec == reply.codec, where
        assert _same(again.tensors, reply.tensors), f"{where}: another reply on a fresh instance"
        assert _same(again.meta, reply.meta), f"{where}: other metadata on a fresh instance"
        assert _same(ctx.state, state_after), f"{where}: another user state on a fresh instance"


def test_the_runtime_serves_users_from_a_half_that_never_runs_a_round():
    """bind() hands the transport the handlers of a second instance (the users' half, as a Flower
    node builds it): what the base station's loop changes, a handler does not see, on any runtime;
    both halves start from the same random state, and the base station draws what it drew alone."""
    from semfl.protocol.method import Method, RunContext, bind
    from semfl.protocol.transport import TransportBase

    class Probe(Method):
        name = "probe"

        def __init__(self, run, transport):
            super().__init__(run, transport)
            self.rounds_run = 0
            self.initial = torch.rand(3)  # stands for a model's initial weights

        def handlers(self):
            return {"rounds": lambda ctx, payload: self.rounds_run, "initial": lambda ctx, payload: self.initial,
                    "send": lambda ctx, payload: self.transport.send([0], "rounds", payload)}

        def run_round(self, round_, users):
            self.rounds_run += 1

    run = RunContext(cfg=None, data=None, spec=None, parts=[[0, 1]], classifier=None, link=None,
                     device=torch.device("cpu"), test_x=None, test_y=None)
    torch.manual_seed(0)
    alone, next_draw = Probe(run, TransportBase()), torch.rand(1)
    torch.manual_seed(0)
    transport = TransportBase()
    base = bind(Probe, run, transport)
    assert torch.equal(base.initial, alone.initial) and torch.equal(torch.rand(1), next_draw)
    base.run_round(1, [0])
    assert base.rounds_run == 1 and transport.handlers["rounds"](None, None) == 0
    assert torch.equal(transport.handlers["initial"](None, None), base.initial)
    with pytest.raises(RuntimeError, match="users' half cannot send"):
        transport.handlers["send"](None, None)
