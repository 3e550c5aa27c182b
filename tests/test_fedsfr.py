"""FedSFR: the QAM codebook, the VQ model, stochastic VQ of updates (unbiased, on the grid), exact
bit counts and budgets, the users' roles, feature reconstruction and a whole run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import local_method, record_learning_rates, vq_overrides
from semfl.wireless.channel import make_channel
from semfl.wireless.codecs import Payload, get_codec
from semfl.wireless.codecs.base import META_BITS
from semfl.wireless.compress import keep_count, stochastic_grid_quantize, svq_bits, svq_error_feedback, svq_fraction_for_budget
from semfl.config import ConfigError, load_config
from semfl.methods.fedsfr.fedsfr import FedSFR, capacity_bits
from semfl.models import ImageSpec, build_model
from semfl.models.vqjscc import largest_margin, nearest_codeword, qam_codebook
from semfl.protocol import seeding
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner, build_context
from semfl.training import snr_tensor

GRID = qam_codebook(8)[:, 0].unique().sort().values


def test_codebook_is_sionnas_unit_energy_256_qam():
    from sionna.phy.mapping import qam

    book = qam_codebook(8)
    assert book.shape == (256, 2)
    torch.testing.assert_close(torch.view_as_complex(book.contiguous()), torch.from_numpy(qam(8)))
    assert float((book ** 2).sum(1).mean()) == pytest.approx(1.0, abs=1e-6)
    assert len(GRID) == 16 and not (GRID == 0).any()
    torch.testing.assert_close(GRID, torch.arange(-15, 16, 2, dtype=torch.float32) / math.sqrt(170))


def test_stochastic_vq_is_unbiased_and_lands_on_neighbouring_grid_points():
    v = torch.randn(400, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([stochastic_grid_quantize(v, GRID, gen) for _ in range(4000)])
    scale = v.abs().max() / GRID[-1]
    on_grid = draws / scale
    assert torch.isclose(on_grid.unsqueeze(-1), GRID, atol=1e-5).any(-1).all()  # every value is a grid point
    step = float(GRID[1] - GRID[0]) * scale
    assert float((draws - v).abs().max()) <= step + 1e-6  # only the two neighbours of each value
    assert (draws != 0).all()
    # unbiased: the mean of 4000 draws is within 5 standard errors of v (variance <= step^2 / 4)
    assert float((draws.mean(0) - v).abs().max()) < 5 * (step / 2) / math.sqrt(4000)
    exact = stochastic_grid_quantize(torch.tensor([-2.0, 2.0]), GRID, gen)
    assert exact.tolist() == [-2.0, 2.0]  # the extremes map onto the outermost points exactly
    assert torch.equal(stochastic_grid_quantize(torch.zeros(3), GRID, gen), torch.zeros(3))


def test_svq_bits_by_hand_and_through_the_codec():
    # 1000 entries, 10 kept: scale + count 64, positions min(10 * 10, 1000) = 100, 5 pairs * 8 bits = 40
    assert svq_bits(1000, 10, 8) == 204
    assert svq_bits(1000, 11, 8) == 64 + 110 + 6 * 8  # an odd count pads its last pair
    assert svq_bits(16, 16, 4) == 64 + 16 + 8 * 4  # a bitmap is cheaper than 16 four-bit indices
    t = torch.zeros(1000)
    t[torch.arange(0, 1000, 100)] = 0.5
    assert get_codec("svq8").tensor_bits(t) == 204
    assert get_codec("index6").tensor_bits(torch.zeros(7, 3, dtype=torch.uint8)) == 7 * 3 * 6
    with pytest.raises(ValueError, match="index4"):
        get_codec("index4").tensor_bits(torch.tensor([16], dtype=torch.uint8))


def test_budget_gives_the_largest_fraction_that_fits():
    numels = [1000, 50, 7]
    for budget in (200, 3000, 20000, 10 ** 6):
        p = svq_fraction_for_budget(numels, budget, 8)
        total = lambda f: sum(svq_bits(n, keep_count(f, n), 8) for n in numels)  # noqa: E731
        if total(0.0) > budget:
            assert p == 0.0
            continue
        assert total(p) <= budget
        assert p == 1.0 or total(min(1.0, p + 1e-3)) > budget


def test_error_feedback_keeps_what_was_not_sent():
    delta = {"a": torch.randn(100), "b": torch.randn(4, 5)}
    residual = {"a": torch.randn(100) * 0.1, "b": torch.zeros(4, 5)}
    sent, new = svq_error_feedback(delta, residual, 0.1, GRID, torch.Generator().manual_seed(0))
    for name in delta:
        torch.testing.assert_close(sent[name] + new[name], delta[name] + residual[name])
        assert int(torch.count_nonzero(sent[name])) == keep_count(0.1, delta[name].numel())


def test_capacity_by_hand():
    assert capacity_bits(1e6, 0.05, 10.0) == int(1e6 * 0.05 * math.log2(11))  # 172,971
    assert capacity_bits(1e6, 0.05, 0.0) == 50000


def vq_model():
    cfg = load_config(None, ["scale=tiny"])
    return build_model("vq-jscc", "tiny", ImageSpec(1, 28, 28, 10), make_channel(cfg.channel))


def test_vq_model_sends_codewords_detects_them_and_passes_gradients():
    model = vq_model()
    x = torch.rand(3, 1, 28, 28)
    X = torch.view_as_real(model.transmit_symbols(x))
    assert torch.isclose(X.unsqueeze(-2), model.codebook, atol=1e-6).all(-1).any(-1).all()  # every symbol a codeword
    assert float(model.features(x).detach().abs().max()) <= model.bound
    seeding.enter(0)
    y = model.channel(torch.view_as_complex(X.contiguous()), snr_tensor(60.0, 3, x.device))
    assert torch.equal(nearest_codeword(torch.view_as_real(y), model.codebook), nearest_codeword(X, model.codebook))
    # the receiver detects: at 0 dB the symbols leave the codebook, and they decode as their nearest
    # codewords do (reconstruct), and forward's decoder is handed codewords only
    model.eval()
    with torch.no_grad():
        seeding.enter(1)
        noisy = model.channel(model.transmit_symbols(x), snr_tensor(0.0, 3, x.device))
        nearest = model.codewords_of(nearest_codeword(torch.view_as_real(noisy), model.codebook))
        assert not torch.isclose(torch.view_as_real(noisy).unsqueeze(-2), model.codebook, atol=1e-3).all(-1).any(-1).all()
        assert torch.equal(model.reconstruct(noisy), model.reconstruct(torch.view_as_complex(nearest.contiguous())))
        handed, received = [], model._received
        model._received = lambda c: (handed.append(c), received(c))[1]
        model(x, snr_tensor(0.0, 3, x.device))
        del model._received
    assert torch.isclose(torch.view_as_real(handed[0]).unsqueeze(-2), model.codebook, atol=1e-6).all(-1).any(-1).all()
    model.train()
    out = model(x, snr_tensor(20.0, 3, x.device))
    assert out.aux is not None and out.recon.shape == x.shape
    (out.recon.mean() + out.aux).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("encoder."))


def test_usage_kl_is_zero_for_uniform_use_and_log_m_for_one_codeword():
    model = vq_model()
    model.soft_sigma = 1e4  # hard assignments
    assert float(model.usage_kl(model.codebook.clone())) == pytest.approx(0.0, abs=1e-4)
    assert float(model.usage_kl(model.codebook[:1].repeat(50, 1))) == pytest.approx(math.log(256), abs=1e-3)


@pytest.fixture(scope="module")
def base(fmnist_root, tmp_path_factory, shared_cache):
    tmp = tmp_path_factory.mktemp("fedsfr")
    return vq_overrides(fmnist_root, shared_cache, "fedsfr", users=4), tmp


def make_method(overrides):
    cfg, run, user_data, transport, method = local_method(FedSFR, overrides)
    return cfg, run, user_data, method, transport


def test_users_below_the_threshold_send_features_within_their_budget(base):
    overrides, _ = base
    cfg = load_config(None, overrides)
    run, _ = build_context(cfg, None, log=lambda m: None)
    snrs = sorted(run.link.snr_db(1, u) for u in range(4))
    threshold = (snrs[1] + snrs[2]) / 2  # two users on each side
    cfg, run, user_data, method, transport = make_method(overrides + [f"fedsfr.threshold_db={threshold}",
                                                                      "fedsfr.slot_s=0.002"])
    transport.states[0]["residual"] = {k: torch.ones_like(v) for k, v in method.global_weights.items()}
    replies = transport.send(range(4), "train", Payload(method.global_weights, codec="dense"))
    links = {r["user"]: r for r in run.link.drain(1)}
    per_image = method.model.tokens * method.model.symbols_per_token * 8
    for user, reply in replies.items():
        snr = run.link.snr_db(1, user)
        budget = capacity_bits(cfg.link.uplink_bandwidth_hz, 0.002, snr)
        assert reply.meta["budget_bits"] == budget and links[user]["uplink_bits"] <= budget
        if snr < threshold:
            images = reply.meta["images"]
            assert reply.tensors["indices"].shape == (images, method.model.tokens * method.model.symbols_per_token)
            assert links[user]["uplink_bits"] == images * per_image + META_BITS * len(reply.meta)
            assert budget - links[user]["uplink_bits"] < per_image  # as many images as fit
            assert "residual" not in transport.states[user]  # error memory reset
        else:
            assert "indices" not in reply.tensors and 0 < reply.meta["keep_fraction"] < 1
            assert "residual" in transport.states[user]


def test_feature_reconstruction_lowers_its_loss(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + ["fedsfr.server_lr=0.01", "fedsfr.server_epochs=4"])
    indices = nearest_codeword(method.model.features(user_data[0][0][:40]), method.model.codebook)
    before = {k: v.clone() for k, v in method.global_weights.items()}
    first = method.feature_reconstruction(indices, 1)
    second = method.feature_reconstruction(indices, 2)
    assert second < first
    assert any(not torch.equal(before[k], method.global_weights[k]) for k in before)


def test_config_errors_name_the_field(base):
    with pytest.raises(ConfigError, match=r"^model.arch"):
        load_config(None, ["method=fedsfr"])
    with pytest.raises(ConfigError, match=r"^fedsfr.mode"):
        load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.mode=fedavg"])
    with pytest.raises(ConfigError, match=r"^fedsfr.bits_per_symbol"):
        load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.bits_per_symbol=5"])
    with pytest.raises(ConfigError, match=r"^fedsfr.weighting"):
        load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.weighting=median"])
    with pytest.raises(ConfigError, match=r"^fedsfr.public_fraction"):
        load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.public_fraction=0"])


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_every_codeword_is_reachable_below_the_largest_margin_and_the_outer_ring_is_not_at_it(bits):
    book = qam_codebook(bits)
    side = torch.linspace(-1, 1, 801)
    grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)

    def reachable(margin):  # the codewords some encoder output (1 - margin) max|c| [-1, 1]^2 quantises to
        return len(nearest_codeword(grid * (1 - margin) * book.abs().max(), book).unique())

    limit = largest_margin(bits)
    assert limit == pytest.approx(1 / (2 ** (bits / 2) - 1))
    assert reachable(0.9 * limit) == 2 ** bits
    assert reachable(0.05) == 2 ** bits  # the default
    # at the limit the bound sits on the outer decision boundary: the outer ring drops out
    assert reachable(limit + 1e-4) == 2 ** bits - (4 * 2 ** (bits // 2) - 4)


def test_a_margin_that_hides_codewords_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^fedsfr.margin: must be in \[0, 0.0667\) for 256-QAM.*60 of 256"):
        load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.margin=0.1"])
    load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.bits_per_symbol=4", "fedsfr.margin=0.3"])
    with pytest.raises(ValueError, match="margin 0.2: 64-QAM"):
        vq_model().configure(6, 0.2)


@pytest.mark.parametrize("mode", ["fr", "compressed-fedavg"])
def test_a_run_learns_within_every_budget(base, mode):
    overrides, tmp = base
    cfg = load_config(None, overrides + ["rounds=4", f"fedsfr.mode={mode}", "fedsfr.threshold_db=12",
                                         "fedsfr.slot_s=0.2", "train.optimizer=adam", "train.lr=0.003",
                                         "fedsfr.measure_fr=true"])
    out = tmp / mode
    Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
    rows = read_jsonl(out / "metrics.jsonl")
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert glob[4]["psnr_db"] > glob[0]["psnr_db"] + 1.0
    users = {(r["round"], r["user"]): r for r in rows if r["scope"] == "user" and r["round"] > 0}
    links = [r for r in rows if r["scope"] == "link"]
    assert all(r["uplink_bits"] <= users[(r["round"], r["user"])]["budget_bits"] for r in links)
    roles = {r["role"] for r in users.values()}
    if mode == "fr":
        assert roles == {"update", "features"} and all(np.isfinite(glob[r]["fr_loss"]) for r in range(1, 5))
        assert all("fr_gain_db" in glob[r] for r in range(1, 5))
    else:
        assert roles == {"update"} and "fr_loss" not in glob[4]


def test_aggregation_weights_by_hand():
    from semfl.methods.fedsfr.fedsfr import aggregation_weights

    assert aggregation_weights([0.0, 0.0], [100, 300], "size") == [0.25, 0.75]
    e = [math.exp(v) for v in (1.0, 2.0, 3.0)]
    assert aggregation_weights([1.0, 2.0, 3.0], [1, 1, 1], "loss-softmax") == pytest.approx([v / sum(e) for v in e])
    # FedLol: (S - L_k) / ((K - 1) S) with S = 6: 5/12, 4/12, 3/12 (smaller loss, larger weight)
    assert aggregation_weights([1.0, 2.0, 3.0], [1, 1, 1], "fedlol") == pytest.approx([5 / 12, 4 / 12, 3 / 12])
    assert aggregation_weights([0.7], [5], "fedlol") == [1.0]


@pytest.mark.parametrize("rule", ["size", "loss-softmax", "fedlol"])
def test_running_weighted_updates_equal_the_explicit_weighted_sum(rule):
    from semfl.methods.fedsfr.fedsfr import WeightedUpdates, aggregation_weights

    gen = torch.Generator().manual_seed(4)
    updates = [{"w": torch.randn(3, 2, generator=gen)} for _ in range(4)]
    losses, sizes = [0.3, 0.1, 0.6, 0.2], [10, 40, 20, 30]
    running = WeightedUpdates(rule)
    for u, loss, n in zip(updates, losses, sizes):
        running.add(u, loss, n)
    weights = aggregation_weights(losses, sizes, rule)
    expected = sum(w * u["w"] for w, u in zip(weights, updates))
    torch.testing.assert_close(running.result(updates[0])["w"], expected, rtol=1e-5, atol=1e-6)
    assert WeightedUpdates(rule).result(updates[0]) is None


def test_a_budget_too_small_for_one_image_sends_none_and_the_round_goes_on(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + ["fedsfr.threshold_db=100", "fedsfr.slot_s=1e-5"])
    info = method.run_round(1, [0, 1, 2, 3])  # every user below the threshold, a few hundred bits each
    assert info["feature_users"] == 4 and "fr_loss" not in info
    assert all(r["images"] == 0 and r["role"] == "features" for r in info["user_rows"])


def test_learning_rates_decay_by_the_schedule(base, monkeypatch):
    """fedsfr.lr_decay: the users' and the FR learning rate x decay ** ((round - 1) // every)."""
    import semfl.methods.fedsfr.fedsfr as fedsfr_module
    import semfl.training as training
    from semfl.methods.fedsfr.fedsfr import FedSFROptions, lr_factor

    options = FedSFROptions(lr_decay=0.9, lr_decay_every=10)
    assert [lr_factor(options, r) for r in (1, 10, 11, 20, 21)] == pytest.approx([1, 1, 0.9, 0.9, 0.81])
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + ["fedsfr.lr_decay=0.5", "fedsfr.lr_decay_every=2",
                                                                      "fedsfr.mode=compressed-fedavg", "train.lr=0.02",
                                                                      "fedsfr.server_lr=0.004"])
    seen = record_learning_rates(monkeypatch, (training, fedsfr_module))
    for round_, factor in ((2, 1.0), (3, 0.5), (5, 0.25)):
        transport.round = round_
        seen.clear()
        transport.send([0], "train", Payload(method.global_weights, codec="dense"))
        method.feature_reconstruction(torch.zeros(4, method.model.tokens * method.model.symbols_per_token,
                                                  dtype=torch.long), round_)
        assert seen == pytest.approx([0.02 * factor, 0.004 * factor]), round_
    with pytest.raises(ConfigError, match=r"^fedsfr.lr_decay"):
        load_config(None, ["method=fedsfr", "model.arch=vq-jscc", "fedsfr.lr_decay=0"])
