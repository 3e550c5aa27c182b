"""The PSFL paper's contenders (STC, FTTQ, FedPAQ, top-k) as methods: end to end on the fixture
data with GSC-M, exact uplink bits from the model's shapes, residual identities inside the user
handlers, per-user sync of the STC downlink, determinism."""
from __future__ import annotations

import math

import pytest
import torch

from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.base import META_BITS
from semfl.wireless.codecs.sparse import sparse_tensor_bits
from semfl.wireless.compress import keep_count, qsgd_bits, stc_bits, ternary_layers
from semfl.config import ConfigError, load_config
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner, build_context, participants
from semfl.training import weights_of
from conftest import assert_kept, lines_before

METHODS = ["stc", "fttq", "fedpaq", "topk"]
# per-method extras of the end-to-end runs: FedPAQ samples 2 of 3 users and trains tau = 3 steps
EXTRA = {"stc": [], "fttq": [], "fedpaq": ["train.participation=0.6", "fedpaq.local_steps=3"], "topk": []}
REPLY_META_BITS = 2 * META_BITS  # num_samples, loss
UNUSED = {"mask_token"}  # the MAE mask token gets no gradient without masking: its update is 0


@pytest.fixture(scope="module", autouse=True)
def no_report():
    """The HTML report (matplotlib, most of a tiny run's time) is method-independent and tested in
    test_run.py; these runs skip it."""
    import semfl.report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(semfl.report, "write_run_report", lambda out, summary: None)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory, fmnist_root, shared_cache):
    tmp = tmp_path_factory.mktemp("contenders")
    overrides = ["log.figures=false", f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "scale=tiny", "users=3",
                 "rounds=2", "data.download=false", "data.test_samples=100", "eval.grid_images=0",
                 "eval.snr_sweep=[]", "train.lr=0.05", "classifier.epochs=3", "model.arch=gsc-m"]
    return overrides, tmp


def execute(overrides, out):
    cfg = load_config(None, overrides)
    Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
    return cfg, read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(base):
    overrides, tmp = base
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = execute(overrides + [f"method={method}", *EXTRA[method]], tmp / method)
        return cache[method]

    return get


def shapes(cfg) -> dict[str, int]:
    from semfl.wireless.channel import Channel
    from semfl.models import ImageSpec, build_model

    model = build_model(cfg.model.arch, cfg.scale, ImageSpec(1, 28, 28, 10), Channel("awgn"))
    return {n: p.numel() for n, p in model.named_parameters()}


def expected_uplink_bits(method: str, cfg) -> int:
    sizes = shapes(cfg)
    if method == "stc":
        p = cfg.table("stc").sparsity
        bits = sum(stc_bits(n, 0 if k in UNUSED else keep_count(p, n)) for k, n in sizes.items())
    elif method == "topk":
        f = cfg.table("topk").fraction
        bits = sum(sparse_tensor_bits(n, 0 if k in UNUSED else keep_count(f, n)) for k, n in sizes.items())
    elif method == "fedpaq":
        bits = sum(qsgd_bits(n, cfg.table("fedpaq").levels) for n in sizes.values())
    else:
        bits = fttq_bits(cfg)
    return bits + REPLY_META_BITS


def fttq_bits(cfg) -> int:
    """2 bits per entry + 32 for w_p per quantised tensor, 32 bits per full-precision entry."""
    from semfl.wireless.channel import Channel
    from semfl.models import ImageSpec, build_model

    from semfl.methods.compression.fttq import io_layers

    spec = ImageSpec(1, 28, 28, 10)
    model = build_model(cfg.model.arch, cfg.scale, spec, Channel("awgn"))
    params = dict(model.named_parameters())
    quantised = set(ternary_layers(params, io_layers(model, spec, "cpu")))
    assert quantised and len(quantised) < len([p for p in params.values() if p.dim() >= 2])
    return sum(2 * p.numel() + 32 if k in quantised else 32 * p.numel() for k, p in params.items())


def global_rows(rows):
    return {r["round"]: r for r in rows if r["scope"] == "global"}


@pytest.mark.parametrize("method", METHODS)
def test_runs_end_to_end_and_learns(runs, method):
    cfg, rows = runs(method)
    g = global_rows(rows)
    assert sorted(g) == [0, 1, 2]
    assert g[2]["loss"] < g[0]["loss"]
    assert g[2]["psnr_db"] > g[0]["psnr_db"]
    assert all(r["method"] == method for r in rows)


@pytest.mark.parametrize("method", METHODS)
def test_uplink_bits_exact(runs, method):
    cfg, rows = runs(method)
    expected = expected_uplink_bits(method, cfg)
    links = [r for r in rows if r["scope"] == "link"]
    assert links and all(r["uplink_bits"] == expected for r in links)
    dense = 32 * sum(shapes(cfg).values())
    assert expected < dense


def test_downlink_bits(runs):
    # top-k / FedPAQ: the dense model; FTTQ: the ternary model, same layout as its uplink
    for method in ("topk", "fedpaq"):
        cfg, rows = runs(method)
        dense = 32 * sum(shapes(cfg).values())
        assert all(r["downlink_bits"] == dense for r in rows if r["scope"] == "link")
    cfg, rows = runs("fttq")
    assert all(r["downlink_bits"] == fttq_bits(cfg) for r in rows if r["scope"] == "link")


def test_stc_downlink_dense_first_then_sparse(runs):
    cfg, rows = runs("stc")
    dense = 32 * sum(shapes(cfg).values())
    links = [r for r in rows if r["scope"] == "link"]
    assert all(r["downlink_bits"] == dense for r in links if r["round"] == 1)
    later = [r for r in links if r["round"] == 2]
    assert later and all(r["downlink_bits"] < dense / 50 for r in later)
    assert len({r["downlink_bits"] for r in later}) == 1  # one broadcast update


def test_stc_partial_participation_resyncs_with_dense_model(base):
    overrides, tmp = base
    cfg, rows = execute(overrides + ["method=stc", "rounds=3", "train.participation=0.6", "eval.every=10"],
                        tmp / "stc-partial")
    dense = 32 * sum(shapes(cfg).values())
    links = [r for r in rows if r["scope"] == "link"]
    seen_dense = seen_stc = 0
    for r in links:
        behind = r["round"] == 1 or r["user"] not in participants(cfg, r["round"] - 1)
        if behind:
            assert r["downlink_bits"] == dense, r
            seen_dense += 1
        else:
            assert r["downlink_bits"] < dense / 50, r
            seen_stc += 1
    assert seen_stc > 0 and seen_dense > len(participants(cfg, 1))


def test_fedpaq_samples_configured_users(runs):
    cfg, rows = runs("fedpaq")
    expected = math.ceil(0.6 * cfg.users)
    for t in (1, 2):
        users = sorted(r["user"] for r in rows if r["scope"] == "link" and r["round"] == t)
        assert users == participants(cfg, t) and len(users) == expected
        assert global_rows(rows)[t]["participants"] == expected


def test_stc_resume_after_kill_matches_uninterrupted(runs, base, monkeypatch):
    """Residuals, user model copies and the server's sync record survive a kill mid-round
    (this also checks that STC is deterministic: the resumed run equals the first one)."""
    from semfl.runtimes.local import LocalTransport

    overrides, tmp = base
    _, reference = runs("stc")
    original = LocalTransport.send

    def dying_send(self, users, kind, payload, on_reply=None):
        if self.round == 2:
            def die_after_first(user, reply):
                on_reply(user, reply)
                raise KeyboardInterrupt  # killed mid-round, after one user answered
            return original(self, users, kind, payload, on_reply=die_after_first)
        return original(self, users, kind, payload, on_reply)

    monkeypatch.setattr(LocalTransport, "send", dying_send)
    cfg = load_config(None, overrides + ["method=stc"])
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, tmp / "stc-killed", show_progress=False, log=lambda m: None).execute()
    monkeypatch.setattr(LocalTransport, "send", original)
    done = lines_before(tmp / "stc-killed", 2)
    Runner(cfg, tmp / "stc-killed", resume=True, show_progress=False, log=lambda m: None).execute()
    assert_kept(tmp / "stc-killed", done)
    resumed = read_jsonl(tmp / "stc-killed" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(reference)


@pytest.mark.parametrize("method", ["fttq", "fedpaq", "topk"])
def test_same_seed_same_metrics(runs, base, method):
    overrides, tmp = base
    _, first = runs(method)
    _, second = execute(overrides + [f"method={method}", *EXTRA[method]], tmp / f"{method}-again")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)


# ----------------------------------------------------------------------------- user handlers
@pytest.fixture(scope="module")
def context(base):
    overrides, _ = base

    def make(method, extra=()):
        from semfl.methods import get_method
        from semfl.runtimes.local import LocalTransport

        cfg = load_config(None, overrides + [f"method={method}", *extra])
        run, user_data = build_context(cfg, None, log=lambda m: None)
        transport = LocalTransport(run.link, user_data, cfg.seed, run.device, handlers={})
        m = get_method(method)(run, transport)
        transport.handlers = m.handlers()
        return cfg, m, transport, user_data

    return make


def user_ctx(user_data, state, round_=1, user=0):
    from semfl.protocol.context import UserContext

    x, y = user_data[user]
    return UserContext(user=user, round=round_, x=x, y=y, snr_db=10.0, state=state, seed=round_)


@pytest.mark.parametrize("method", ["stc", "topk"])
def test_sent_plus_residual_is_accumulated(context, method):
    cfg, m, _, user_data = context(method)
    state = {}
    residual = None
    for round_ in (1, 2):
        reply = m.user_train(user_ctx(user_data, state, round_), Payload(m.global_weights, codec="dense"))
        trained = weights_of(m.model)
        accumulated = {k: trained[k] - m.global_weights[k] + (0 if residual is None else residual[k])
                       for k in trained}
        new = state["residual"]
        for k, a in accumulated.items():
            sent = reply.tensors[k]
            total = sent + new[k]
            if method == "topk":
                assert torch.equal(total, a), k
                assert int(torch.count_nonzero(sent)) == (0 if k in UNUSED else keep_count(0.01, a.numel()))
            else:
                assert torch.equal(total[sent == 0], a[sent == 0]), k
                torch.testing.assert_close(total, a, rtol=0, atol=1e-6)
                nz = sent[sent != 0]
                k_expected = 0 if k in UNUSED else keep_count(cfg.table("stc").sparsity, a.numel())
                assert nz.numel() == k_expected, k
                if nz.numel():
                    assert torch.all(nz.abs() == nz.abs()[0])  # one magnitude mu
                    assert torch.all(torch.sign(sent[sent != 0]) == torch.sign(a[sent != 0]))  # signs kept
        residual = new
        assert reply.bits() == expected_uplink_bits(method, cfg)


def test_stc_users_rebuild_the_global_model_bitwise(context):
    _, m, transport, _ = context("stc")
    for round_ in (1, 2, 3):
        transport.round = round_
        m.run_round(round_, [0, 1, 2])
        if round_ >= 2:
            for user in (0, 1, 2):  # users hold the model broadcast at the start of this round
                for k, v in transport.states[user]["weights"].items():
                    assert torch.equal(v, before[k]), (user, k)
        before = {k: v.clone() for k, v in m.global_weights.items()}
    state = m.state_dict()
    assert state["version"] == 3 and state["synced"] == {0: 2, 1: 2, 2: 2}
    assert set(state["residual"]) == set(m.global_weights)


def test_fttq_uploads_are_ternary(context):
    cfg, m, _, user_data = context("fttq")
    quantised = set(m.quantised)
    for k in quantised:  # the broadcast model is ternary too
        assert torch.unique(m.global_weights[k]).numel() <= 3
    names_before = [n for n, _ in m.model.named_parameters()]
    reply = m.user_train(user_ctx(user_data, {}), m.payload(m.global_weights))
    assert sorted(n for n, _ in m.model.named_parameters()) == sorted(names_before)  # parametrisation removed
    assert set(reply.tensors) == set(names_before)
    for k, t in reply.tensors.items():
        if k in quantised:
            values = torch.unique(t)
            assert values.numel() <= 3, k
            nonzero = values[values != 0].abs()
            assert torch.all(nonzero == nonzero.max()), k  # {-w_p, 0, +w_p}
            assert reply.codec_of(k) == "ternary"
        else:
            assert reply.codec_of(k) == "dense"
    # the learnt scale differs from the broadcast one (w_p trains), and weights moved
    changed = [k for k in quantised if not torch.equal(reply.tensors[k], m.global_weights[k])]
    assert changed
    from semfl.wireless.codecs.ternary import ternary_scale

    assert any(float(ternary_scale(reply.tensors[k])) != float(ternary_scale(m.global_weights[k]))
               for k in quantised)
    assert reply.bits() == expected_uplink_bits("fttq", cfg)


def test_fedpaq_local_steps_and_grid(context):
    cfg, m, _, user_data = context("fedpaq", ["fedpaq.local_steps=2", "fedpaq.levels=4"])
    reply = m.user_train(user_ctx(user_data, {}), Payload(m.global_weights, codec="dense"))
    assert reply.codec == "qsgd4"
    from semfl.wireless.codecs.qsgd import qsgd_levels

    for k, t in reply.tensors.items():
        _, levels = qsgd_levels(t, 4, k)  # raises unless on a 4-level grid
        assert int(levels.abs().max()) <= 4
    assert reply.bits() == sum(qsgd_bits(t.numel(), 4) for t in reply.tensors.values()) + REPLY_META_BITS


def test_option_errors_name_the_field():
    cases = [("stc.sparsity=0", "stc.sparsity"), ("stc.weighting='x'", "stc.weighting"),
             ("stc.downlink_sparsity=2", "stc.downlink_sparsity"), ("fttq.threshold='x'", "fttq.threshold"),
             ("fedpaq.levels=3", "fedpaq.levels"), ("fedpaq.local_steps=-1", "fedpaq.local_steps"),
             ("topk.fraction=0", "topk.fraction"), ("topk.scope='x'", "topk.scope")]
    for override, field_name in cases:
        with pytest.raises(ConfigError, match=rf"^{field_name.replace('.', '[.]')}:"):
            load_config(None, [f"method={field_name.split('.')[0]}", override])


def test_fttq_server_requantisation_by_hand():
    from semfl.methods.compression.fttq import requantise

    theta = torch.tensor([[0.9, -0.3, 0.01], [-0.02, 0.5, -1.2]])
    delta = 0.05 * theta.abs().sum() / 6  # adaptive server rule, d0 d1 = 6
    above = theta.abs() > delta
    w = theta.abs()[above].mean()
    expected = torch.where(theta > delta, w, torch.where(theta < -delta, -w, torch.zeros(())))
    assert torch.equal(requantise(theta, "adaptive"), expected)
    fixed = requantise(theta, "fixed")  # Delta = 0.05 * 1.2 = 0.06: the two small entries drop
    assert torch.equal(fixed == 0, theta.abs() <= 0.06)
    assert torch.unique(fixed).numel() == 3
    assert torch.equal(requantise(torch.zeros(3, 2), "adaptive"), torch.zeros(3, 2))


def test_steps_data_gives_exactly_tau_batches():
    from semfl.methods.common import steps_data

    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    xs, ys = steps_data(x, y, 7, 4, torch.Generator().manual_seed(0))  # 28 samples: 2.8 epochs
    assert len(xs) == 28 and torch.equal(xs[:, 0].long(), ys)
    assert sorted(ys[:10].tolist()) == list(range(10))  # epoch by epoch: the first 10 are a permutation


@pytest.mark.parametrize("method", ["fedavg", "stc", "fttq", "fedpaq", "topk"])
def test_users_report_their_local_models_accuracy_in_evaluated_rounds(context, method):
    """Per-client local accuracy (PSFL Figs 15-16): the user's locally trained model on the first
    eval.user_samples test images, only in rounds the runner evaluates."""
    from semfl.wireless.codecs import Payload
    from semfl.methods.common import build_semantic_model, loss_rows
    from semfl.training import evaluate_semantic, load_weights

    cfg, m, _, user_data = context(method, ["eval.user_samples=40", "eval.every=2", "rounds=3", *EXTRA.get(method, [])])
    request = m.payload(m.global_weights) if method == "fttq" else Payload(m.global_weights, codec="dense")
    for round_, due in ((1, False), (2, True), (3, True)):
        reply = m.user_train(user_ctx(user_data, {}, round_=round_), request)
        assert ("eval_accuracy" in reply.meta) is due
    assert 0.0 <= reply.meta["eval_accuracy"] <= 1.0 and reply.meta["eval_loss"] > 0
    (row,) = loss_rows({0: reply.meta})
    assert row["accuracy"] == reply.meta["eval_accuracy"] and row["train_loss"] == reply.meta["loss"]
    if method == "fedavg":  # the reply is the local model itself: evaluate it independently
        model = build_semantic_model(m.run, cfg.model.arch)
        load_weights(model, reply.tensors)
        expected = evaluate_semantic(model, m.run.classifier, m.run.test_x[:40], m.run.test_y[:40],
                                     cfg.eval.snr_db, cfg.eval.batch_size)
        # the channel noise of the two evaluations differs: equal to 1 %, while the global model is far off
        assert reply.meta["eval_loss"] == pytest.approx(expected["loss"], rel=1e-2)
        load_weights(model, m.global_weights)
        before = evaluate_semantic(model, m.run.classifier, m.run.test_x[:40], m.run.test_y[:40],
                                   cfg.eval.snr_db, cfg.eval.batch_size)
        assert abs(before["loss"] - expected["loss"]) > 2e-2 * expected["loss"]
