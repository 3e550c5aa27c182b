"""Shared fixtures: a small Fashion-MNIST-format dataset with learnable structure, and a tiny run config."""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

# Threads that wait for work sleep rather than spin (read once, when torch loads OpenMP): a test that
# runs torch on several threads (the workers benchmark's "N threads" setting) then costs its work, not
# seconds of spinning against the other processes on a 2-core machine. Single-threaded tests: no effect.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: one torch thread each, so they do not oversubscribe
    os.environ["OMP_NUM_THREADS"] = "1"  # for the runs tests start in subprocesses
    torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_data import idx_bytes  # noqa: E402


def structured_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class sets the position and orientation of a bright bar: a classifier can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.normal(30, 10, (n, 28, 28))
    for i, c in enumerate(labels):
        pos = 3 + 2 * (c % 5)
        if c < 5:
            images[i, pos:pos + 4, 4:24] += 200
        else:
            images[i, 4:24, pos:pos + 4] += 200
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_structured_fmnist(root: Path, n_train: int = 800, n_test: int = 200) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = structured_images(n, seed)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    return write_structured_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One classifier/foundation cache for the session (per xdist worker): tiny runs with the same
    settings train their frozen classifier and foundation mentors once, not once per test. Runs give
    the same metrics whether the cache was cold or warm (tests/test_foundation.py checks it)."""
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture
def tiny_overrides(fmnist_root, shared_cache) -> list[str]:
    """--set overrides for a seconds-long run on the fixture data (no figures: tests that check them
    add ``log.figures=true``)."""
    return [f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "scale=tiny", "users=3",
            "rounds=3", "data.download=false", "data.test_samples=100", "eval.grid_images=4",
            "eval.snr_sweep=[0.0, 10.0]", "train.lr=0.05", "classifier.epochs=3", "log.figures=false", "data.max_per_user=96"]


# methods that need a model family other than the default (csc) in the tests that run every method
METHOD_MODELS = {"fedsfr": "vq-jscc", "skbs": "vq-jscc", "fedsfd": "vq-jscc"}


def method_overrides(method: str) -> list[str]:
    """``--set`` overrides that select a method, with the model family it needs."""
    return [f"method={method}"] + ([f"model.arch={METHOD_MODELS[method]}"] if method in METHOD_MODELS else [])


# a short run of one method for the tests that compare or replay what its users did: 3 users, 2 rounds
# (state carried from one round to the next), 60 images each, 50 test images, a one-SNR final sweep
# and a 2-image grid (the final models, some fetched from the users, are still tested)
SHORT_RUN = ["rounds=2", "users=3", "data.max_per_user=60", "data.test_samples=50", "eval.snr_sweep=[10.0]",
             "eval.grid_images=2", "classifier.epochs=1"]


def short_run_overrides(fmnist_root, cache_dir, method: str) -> list[str]:
    """--set overrides of ``method``'s short run (tiny_overrides, then SHORT_RUN, then the method's)."""
    extra = ["finefed.fedavg_rounds=1"] if method == "finefed" else []  # both of FineFed's stages
    return [f"data.root={fmnist_root}", f"classifier.cache_dir={cache_dir}", "scale=tiny", "data.download=false",
            "train.lr=0.05", "log.figures=false", *SHORT_RUN, *method_overrides(method), *extra]


def method_group(methods) -> list:
    """pytest params of methods, each in the xdist group of its method_run (one worker makes it once)."""
    return [pytest.param(m, marks=pytest.mark.xdist_group(f"method-run-{m}")) for m in methods]


def _recorded(calls: list, kind: str, handler):
    import copy
    import dataclasses

    def recorded(ctx, payload):
        before = copy.deepcopy(ctx.state)
        request = copy.deepcopy(payload)
        reply = handler(ctx, payload)
        calls.append((kind, dataclasses.replace(ctx, state=before), request, copy.deepcopy(reply),
                      copy.deepcopy(ctx.state)))
        return reply
    return recorded


@pytest.fixture(scope="session")
def method_run(fmnist_root, shared_cache, tmp_path_factory):
    """method_run(method) -> (overrides, metrics rows, calls, run directory) of ``method``'s short run on the local
    transport, made once per session (per xdist worker) and method: tests/test_flower.py compares its
    metrics with the Flower transport's, tests/test_halves.py replays its user-handler calls. Each call
    is (kind, context with the user's state before, request, reply, the user's state after). Recording
    only copies: the run's metrics are those of an unrecorded run (no batched handlers run on the CPU,
    where train.vmap = 'auto' is off)."""
    from semfl.config import load_config
    from semfl.files import read_jsonl
    from semfl.runtimes.local import LocalTransport
    from semfl.runtimes.run import Runner

    made: dict[str, tuple] = {}

    def make(method: str):
        if method not in made:
            overrides = short_run_overrides(fmnist_root, shared_cache, method)
            out = tmp_path_factory.mktemp(f"short-{method}") / "run"
            calls: list = []
            bind = LocalTransport.bind

            def recording_bind(self, handlers, *args, **kwargs):
                bind(self, {k: _recorded(calls, k, h) for k, h in handlers.items() if not k.endswith(":batched")},
                     *args, **kwargs)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(LocalTransport, "bind", recording_bind)
                Runner(load_config(None, overrides), out, show_progress=False, log=lambda m: None).execute()
            made[method] = (overrides, read_jsonl(out / "metrics.jsonl"), calls, out)
        return made[method]
    return make


def vq_overrides(fmnist_root, cache_dir, method: str, users: int) -> list[str]:
    """--set overrides for tiny runs of the VQ-JSCC methods (FedSFR and its baselines): IID users with
    60 samples each, training and testing at a fixed 20 dB, no classifier term."""
    return [f"data.root={fmnist_root}", f"classifier.cache_dir={cache_dir}", "scale=tiny", "data.download=false",
            "data.test_samples=100", "classifier.epochs=1", "eval.snr_sweep=[]", f"users={users}",
            "model.arch=vq-jscc", f"method={method}", "data.partition=iid", "data.max_per_user=60",
            "train.task_weight=0", "channel.train_snr=fixed", "channel.snr_db=20", "log.figures=false"]


def record_learning_rates(monkeypatch, modules) -> list[float]:
    """Patch make_optimizer in each module to record the learning rate of every optimiser it makes;
    returns the (live) list of rates, in order."""
    seen: list[float] = []
    for module in modules:
        make = module.make_optimizer

        def wrapped(params, train_cfg, lr=None, make=make):
            seen.append(train_cfg.lr if lr is None else lr)
            return make(params, train_cfg, lr=lr)

        monkeypatch.setattr(module, "make_optimizer", wrapped)
    return seen


def local_method(method_cls, overrides: list[str], round_: int = 1):
    """A method wired to a LocalTransport outside the runner, for tests that drive its handlers:
    (cfg, run context, user data, transport, method)."""
    from semfl.config import load_config
    from semfl.protocol.method import bind
    from semfl.runtimes.local import LocalTransport
    from semfl.runtimes.run import build_context

    cfg = load_config(None, overrides)
    run, user_data = build_context(cfg, None, log=lambda m: None)
    transport = LocalTransport(run.link, user_data, cfg.seed, run.device, handlers={})
    method = bind(method_cls, run, transport)
    transport.start_round(round_)
    return cfg, run, user_data, transport, method


def lines_before(run_dir: Path, round_: int) -> list[str]:
    """The metrics lines a run wrote for the rounds before ``round_`` (those it finished before a
    kill in ``round_``); :func:`assert_kept` checks a resume kept them."""
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    done = [line for line in lines if json.loads(line)["round"] < round_]
    assert done, f"{run_dir}: no rows of the rounds before {round_}"
    return done


def assert_kept(run_dir: Path, lines: list[str]) -> None:
    """A resumed run kept the rows of the rounds finished before the kill as they were written,
    wall_s included; a run that started over instead (deterministic as runs are, its metrics would
    be the same) rewrites them."""
    assert (Path(run_dir) / "metrics.jsonl").read_text().splitlines()[:len(lines)] == lines


def whole_and_resumed(cfg, tmp: Path, monkeypatch, owner, attribute: str, round_: int, keep: tuple[str, ...]):
    """Run cfg once whole, once killed (KeyboardInterrupt) when ``owner.attribute`` is first called
    in ``round_`` and then resumed; return both runs' metric rows cut to ``keep``. The resumed run
    must really resume: ``owner.attribute`` is not called again in a round before ``round_``
    (starting over would give the same metrics, deterministic as runs are)."""
    from semfl.files import read_jsonl
    from semfl.runtimes.run import Runner

    quiet = dict(show_progress=False, log=lambda m: None)
    Runner(cfg, tmp / "whole", **quiet).execute()
    original = getattr(owner, attribute)

    from semfl.protocol.context import UserContext

    def now(self, args):
        # a user handler knows the round from its context (it runs on the users' half, which runs no round)
        return args[0].round if args and isinstance(args[0], UserContext) else self.transport.round

    def killed(self, *args, **kwargs):
        if now(self, args) == round_:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, attribute, killed)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, tmp / "resumed", **quiet).execute()
    done = lines_before(tmp / "resumed", round_)
    rounds = []

    def recorded(self, *args, **kwargs):
        rounds.append(now(self, args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, attribute, recorded)
    Runner(cfg, tmp / "resumed", resume=True, **quiet).execute()
    monkeypatch.setattr(owner, attribute, original)
    assert rounds and min(rounds) == round_, f"the resumed run called {attribute} in rounds {sorted(set(rounds))}"
    assert_kept(tmp / "resumed", done)
    return [[{k: r.get(k) for k in keep} for r in read_jsonl(tmp / d / "metrics.jsonl")] for d in ("whole", "resumed")]


@pytest.fixture(scope="session")
def finished_run(fmnist_root, tmp_path_factory):
    """finished_run(method, *overrides) -> the directory of a finished tiny run (2 rounds, 3 users of
    60 images, every round's checkpoint kept), made once per session and arguments."""
    from semfl.config import load_config
    from semfl.runtimes.run import Runner

    made: dict[tuple, Path] = {}
    cache = tmp_path_factory.mktemp("finished-cache")

    def make(method: str, *overrides: str) -> Path:
        key = (method, *overrides)
        if key not in made:
            out = tmp_path_factory.mktemp(f"run-{method}") / "run"
            cfg = load_config(None, [f"data.root={fmnist_root}", f"classifier.cache_dir={cache}", "scale=tiny",
                                     "users=3", "rounds=2", "data.download=false", "data.test_samples=100",
                                     "eval.grid_images=4", "eval.snr_sweep=[0.0, 10.0]", "train.lr=0.05",
                                     "classifier.epochs=1", "data.max_per_user=60", "log.checkpoint_every=1", "log.figures=false",
                                     *method_overrides(method), *overrides])
            made[key] = Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
        return made[key]
    return make


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make ``xdist_group`` marks group under ``--dist loadgroup`` with pytest >= 9: pytest-xdist 3.8
    tags a grouped test by setting ``item._nodeid``, which pytest 9 no longer reads (``Node.nodeid`` is
    ``str(item._id)``), so every group was silently split across workers and the fixtures a group
    shares were made once per worker. Same suffix as xdist's (``<nodeid>@<group>``); a no-op where
    xdist's own tagging took effect, and outside loadgroup workers."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            object.__setattr__(item._id, "_str_cache", f"{item.nodeid}@{'_'.join(names)}")
