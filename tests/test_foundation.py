"""Foundation mentors: the public pool, pretraining that learns, the cache, and PSFL's use of it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semfl.protocol.transport import TransportBase

from semfl.methods import foundation
from semfl.config import ConfigError, load_config
from semfl.methods.common import build_semantic_model
from semfl.runtimes.run import build_context
from semfl.training import evaluate_semantic, load_weights


def test_public_pool_holds_only_images_no_user_has():
    parts = [np.array([0, 3, 5]), np.array([1, 2]), np.array([9])]
    pool = foundation.public_pool(12, parts, 5, seed=0)
    assert len(pool) == 5 and len(set(pool.tolist())) == 5
    assert not set(pool.tolist()) & {0, 1, 2, 3, 5, 9}
    assert np.all(np.diff(pool) > 0)
    assert np.array_equal(pool, foundation.public_pool(12, parts, 5, seed=0))
    assert set(foundation.public_pool(12, parts, 6, seed=0).tolist()) == {4, 6, 7, 8, 10, 11}
    with pytest.raises(ConfigError, match=r"^foundation.samples: 7 requested, but only 6"):
        foundation.public_pool(12, parts, 7, seed=0)


def test_foundation_options_are_checked():
    with pytest.raises(ConfigError, match=r"^foundation: samples and epochs must be >= 0"):
        load_config(None, ["method=psfl", "foundation.samples=-1"])
    with pytest.raises(ConfigError, match=r"^foundation.global_model: needs foundation.samples > 0"):
        load_config(None, ["method=fedavg", "foundation.global_model=true"])


@pytest.fixture(scope="module")
def classifier_files(fmnist_root, shared_cache):
    """The frozen classifier of these tests' runs (classifier.epochs=3, tiny_overrides' own), trained
    once into the session cache. Each test copies it into a cache folder of its own (own_cache), so
    the foundation mentors it trains, loads or tears are still its own."""
    cfg = load_config(None, [f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "scale=tiny",
                             "data.download=false", "classifier.epochs=3"])
    build_context(cfg, None, log=lambda m: None, with_user_data=False)
    return sorted(shared_cache.glob("classifier-*.pt"))


def own_cache(classifier_files, cache):
    import shutil

    cache.mkdir(parents=True, exist_ok=True)
    for path in classifier_files:
        shutil.copy(path, cache / path.name)
    return cache


@pytest.fixture
def tiny_run(fmnist_root, tmp_path, classifier_files):
    own_cache(classifier_files, tmp_path / "cache")
    overrides = [f"data.root={fmnist_root}", f"classifier.cache_dir={tmp_path / 'cache'}", "scale=tiny",
                 "data.download=false", "data.test_samples=100", "classifier.epochs=3", "method=psfl", "users=3",
                 "data.user_fraction=0.2", "foundation.samples=300", "foundation.epochs=4"]
    cfg = load_config(None, overrides)
    run, _ = build_context(cfg, None, log=lambda m: None)
    return cfg, run, tmp_path


def test_foundation_learns_is_cached_and_reloaded(tiny_run):
    cfg, run, tmp = tiny_run
    foundation._MEMO.clear()
    torch.manual_seed(123)
    untrained = build_semantic_model(run, "gsc-m")
    before = evaluate_semantic(untrained, run.classifier, run.test_x, run.test_y, 10.0, 50)
    weights = foundation.foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m"))
    cached = list((tmp / "cache").glob("foundation-*gsc-m*.pt"))
    assert len(cached) == 1 and "n300-e4" in cached[0].name
    model = build_semantic_model(run, "gsc-m")
    load_weights(model, weights)
    after = evaluate_semantic(model, run.classifier, run.test_x, run.test_y, 10.0, 50)
    assert after["mse"] < 0.7 * before["mse"]  # it learnt to reconstruct images it never saw

    foundation._MEMO.clear()  # a new process: the weights come back from the cache, bit for bit
    again = foundation.foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)

    cached[0].write_bytes(b"torn")
    foundation._MEMO.clear()
    with pytest.raises(RuntimeError, match="foundation mentor cache .* is unreadable"):
        foundation.foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m"))


def test_foundation_weights_do_not_depend_on_the_callers_random_state(tiny_run):
    from semfl.protocol import seeding

    cfg, run, tmp = tiny_run
    trained = []
    for state in ("round-1-user-0", "round-3-user-2"):  # e.g. which user first needed the mentor
        foundation._MEMO.clear()
        for cached in (tmp / "cache").glob("foundation-*"):
            cached.unlink()
        seeding.enter(cfg.seed, state)  # moves torch's and Sionna's channel generators
        trained.append(foundation.foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m")))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_psfl_mentors_start_from_the_foundation(tiny_run):
    from semfl.methods.psfl.psfl import PSFL

    cfg, run, _ = tiny_run
    foundation._MEMO.clear()
    method = PSFL(run, transport=TransportBase())

    class Ctx:  # the parts of a UserContext that mentor initialisation reads
        user, x = 0, run.data.train_x[:8]

    start = method._init_mentor(Ctx(), "gsc-m")
    expected = foundation.foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m"))
    assert all(torch.equal(start[k], expected[k]) for k in expected)


def test_global_model_from_the_foundation_only_when_asked(fmnist_root, tmp_path, classifier_files):
    from semfl.methods.fedavg import FedAvg

    overrides = [f"data.root={fmnist_root}", f"classifier.cache_dir={own_cache(classifier_files, tmp_path / 'cache')}",
                 "scale=tiny", "data.download=false", "data.test_samples=50", "classifier.epochs=3", "method=fedavg", "users=2",
                 "model.arch=gsc-m", "data.user_fraction=0.2", "foundation.samples=200", "foundation.epochs=1"]
    cfg = load_config(None, overrides + ["foundation.global_model=true"])
    run, _ = build_context(cfg, None, log=lambda m: None)
    foundation._MEMO.clear()
    pretrained = FedAvg(run, transport=TransportBase()).global_weights
    expected = foundation.foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m"))
    assert all(torch.equal(pretrained[k], expected[k]) for k in expected)
    run.cfg = load_config(None, overrides)  # samples set, global_model off: a random start, as before
    scratch = FedAvg(run, transport=TransportBase()).global_weights
    assert not all(torch.equal(scratch[k], expected[k]) for k in expected)


def test_psfl_metrics_do_not_depend_on_whether_the_foundation_was_cached(fmnist_root, tmp_path, classifier_files):
    from semfl.files import read_jsonl
    from semfl.runtimes.run import Runner

    overrides = [f"data.root={fmnist_root}", f"classifier.cache_dir={own_cache(classifier_files, tmp_path / 'cache')}",
                 "scale=tiny", "data.download=false", "data.test_samples=50", "classifier.epochs=3", "method=psfl", "users=2",
                 "rounds=1", "data.user_fraction=0.2", "foundation.samples=100", "foundation.epochs=1",
                 "eval.snr_sweep=[]", "eval.grid_images=0", "psfl.user_eval_samples=20"]
    rows = []
    for name in ("trains-it", "loads-it"):
        foundation._MEMO.clear()  # as in a new process
        Runner(load_config(None, overrides), tmp_path / name, show_progress=False, log=lambda m: None).execute()
        rows.append([{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(tmp_path / name / "metrics.jsonl")])
    assert len(list((tmp_path / "cache").glob("foundation-*.pt"))) == 2  # GSC-M and GSC-L, trained once
    assert rows[0] == rows[1]
