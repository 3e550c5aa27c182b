"""PSFL at method level: mentor choice, AGP in the loop, sparse links, privacy options, pretraining."""
from __future__ import annotations

import pytest
import torch

from semfl.cli import main
from semfl.config import ConfigError, load_config
from semfl.methods.psfl.psfl import PSFLOptions, choose_mentors
from semfl.models.gsc import load_mae_checkpoint
from semfl.methods.psfl.agp import prune_ratio
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner

# the tests that read plain_run share it: one worker makes it once
pytestmark = pytest.mark.xdist_group("psfl-plain-run")

TABLE_I = [1854, 3703, 4429, 4783, 5467, 5634, 5891, 8958, 9281]


def test_mentor_choice_table_i():
    mentors = choose_mentors(TABLE_I, PSFLOptions())
    assert mentors == ["gsc-m"] * 3 + ["gsc-l"] * 4 + ["gsc-h"] * 2
    shuffled = [5634, 1854, 9281, 3703, 8958, 4429, 5891, 4783, 5467]
    by_size = dict(zip(shuffled, choose_mentors(shuffled, PSFLOptions())))
    assert [by_size[s] for s in TABLE_I] == mentors


def test_mentor_choice_rules():
    assert choose_mentors([10, 5000, 9000], PSFLOptions(mentor_rule="thresholds")) == ["gsc-m", "gsc-l", "gsc-h"]
    # the default thresholds split Table I's own sizes as Table I does: 3 M, 4 L, 2 H
    assert choose_mentors(TABLE_I, PSFLOptions(mentor_rule="thresholds")) == ["gsc-m"] * 3 + ["gsc-l"] * 4 + ["gsc-h"] * 2
    assert choose_mentors(TABLE_I, PSFLOptions(pld=False)) == ["gsc-m"] * 9
    override = ["gsc-h", "gsc-m", "gsc-l"]
    assert choose_mentors([1, 2, 3], PSFLOptions(mentors=override)) == override
    five = choose_mentors([100, 200, 300, 400, 500], PSFLOptions())
    assert five.count("gsc-m") == 2 and five.count("gsc-h") == 1 and five[0] == "gsc-m" and five[-1] == "gsc-h"


def test_mentor_thresholds_scale_with_user_fraction():
    import math

    rule = PSFLOptions(mentor_rule="thresholds")
    held = [math.ceil(0.05 * s) for s in TABLE_I]  # what users hold at data.user_fraction = 0.05 (runtime.run)
    assert choose_mentors(held, rule, user_fraction=0.05) == ["gsc-m"] * 3 + ["gsc-l"] * 4 + ["gsc-h"] * 2
    # unscaled, 93-465 samples are all below 4600: every user would silently get GSC-M; that is refused
    with pytest.raises(ConfigError, match=r"^psfl.mentor_thresholds: \[4600, 7400\] .* give every user gsc-m .*"
                                          r"change psfl.mentor_thresholds, data.user_fraction or data.max_per_user"):
        choose_mentors(held, rule)
    with pytest.raises(ConfigError, match="give every user gsc-l for user sizes 300-300"):
        choose_mentors([300] * 4, rule, user_fraction=0.05)
    assert choose_mentors([300], rule, user_fraction=0.05) == ["gsc-l"]  # one user: one mentor is no collapse


def test_psfl_config_errors():
    with pytest.raises(ConfigError, match=r"^psfl.mentors"):
        load_config(None, ["method=psfl", "users=2", "psfl.mentors=['gsc-m']"])
    with pytest.raises(ConfigError, match=r"^psfl.mentors: unknown mentor 'gsc-x'"):
        load_config(None, ["method=psfl", "users=1", "psfl.mentors=['gsc-x']"])
    with pytest.raises(ConfigError, match=r"^psfl.zeta_max"):
        load_config(None, ["psfl.zeta_max=1.5"])


# the runs that test_mentor_and_student_rows does not look at draw no figures (seconds each)
NO_FIGURES = ["log.figures=false", "eval.snr_sweep=[]", "eval.grid_images=0"]


def psfl_run(overrides, out, extra=()):
    cfg = load_config(None, overrides + ["method=psfl", "users=3", "rounds=3", *extra])
    Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
    return cfg, read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, fmnist_root, shared_cache):
    tmp = tmp_path_factory.mktemp("psfl")
    overrides = [f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "scale=tiny",
                 "data.download=false", "data.test_samples=100", "eval.grid_images=3", "eval.snr_sweep=[5.0]",
                 "train.lr=0.05", "classifier.epochs=3", "psfl.user_eval_samples=50", "data.max_per_user=96"]
    cfg, rows = psfl_run(overrides, tmp / "run")
    return overrides, cfg, rows, tmp


def test_agp_ratio_follows_eq26_and_bits_fall(plain_run):
    _, cfg, rows, _ = plain_run
    from semfl.wireless.link import Link

    link = Link(cfg.link, cfg.users, cfg.seed)
    globals_ = {r["round"]: r for r in rows if r["scope"] == "global" and r["round"] > 0}
    for t, row in globals_.items():
        zeta, raw = prune_ratio(link.snrs_db(t), 0.0, 25.0, 0.9)
        assert row["prune_ratio_target"] == pytest.approx(zeta)
        assert row["prune_ratio_raw"] == pytest.approx(raw)
        assert row["prune_ratio"] == pytest.approx(round(zeta * row["prunable_weights"]) / row["prunable_weights"])
    # downlink bits per user fall as the pruned fraction rises
    ordered = sorted(globals_.values(), key=lambda r: r["prune_ratio"])
    bits = [r["downlink_bits"] for r in ordered]
    assert all(a > b for a, b in zip(bits, bits[1:]))
    # uplink updates are sparse with the broadcast support: far below a dense student
    dense_bits = 32 * sum(p.numel() for p in _student(cfg).parameters())
    links = [r for r in rows if r["scope"] == "link"]
    assert all(r["uplink_bits"] < dense_bits for r in links)


def test_objective_is_loss_plus_eta_times_the_uplink_energy_so_far(plain_run):
    """Eq 15's objective per evaluated round: the global loss + eta * the users' uplink energy summed
    over every link row (user and round) up to that round, from the link rows the run wrote."""
    _, cfg, rows, _ = plain_run
    links = [r for r in rows if r["scope"] == "link"]
    evaluated = [r for r in rows if r["scope"] == "global" and "objective" in r]
    assert len(evaluated) >= 2 and any(r["round"] > 0 for r in evaluated)
    for row in evaluated:
        energy = sum(r["uplink_energy_j"] for r in links if r["round"] <= row["round"])
        assert row.get("cumulative_uplink_energy_j", 0.0) == pytest.approx(energy, rel=1e-12)
        assert row["objective"] == pytest.approx(row["loss"] + cfg.link.eta * energy, rel=1e-12)
    assert evaluated[-1]["cumulative_uplink_energy_j"] > 0


def _student(cfg):
    from semfl.wireless.channel import Channel
    from semfl.models import ImageSpec, build_model

    return build_model("csc", cfg.scale, ImageSpec(1, 28, 28, 10), Channel("awgn"))


def test_mentor_and_student_rows(plain_run):
    _, _, rows, tmp = plain_run
    users = [r for r in rows if r["scope"] == "user"]
    for key in ("mentor_loss", "mentor_accuracy", "student_loss", "student_accuracy", "mentor", "sem"):
        assert all(key in r for r in users), key
    assert {r["mentor"] for r in users} == {"gsc-m", "gsc-l", "gsc-h"}
    assert (tmp / "run" / "figures" / "mentor_vs_student.png").is_file()
    assert (tmp / "run" / "figures" / "reconstructions.png").is_file()


def test_masked_weights_stay_zero_in_user_update(plain_run):
    """A user handler keeps the broadcast mask: its update is zero wherever the model was pruned."""
    from semfl.wireless.codecs import Payload
    from semfl.methods.psfl.psfl import PSFL
    from semfl.methods.psfl.agp import apply, magnitude_masks, prunable
    from semfl.runtimes.local import LocalTransport
    from semfl.protocol.context import UserContext
    from semfl.runtimes.run import build_context

    overrides, cfg, _, tmp = plain_run
    cfg = load_config(None, overrides + ["method=psfl", "users=3"])
    run, user_data = build_context(cfg, None, log=lambda m: None)
    transport = LocalTransport(run.link, user_data, cfg.seed, run.device, handlers={})
    method = PSFL(run, transport)
    masks = magnitude_masks(method.global_weights, 0.6)
    weights = apply(method.global_weights, masks)
    x, y = user_data[0]
    ctx = UserContext(user=0, round=1, x=x, y=y, snr_db=10.0, state={}, seed=1)
    reply = method.user_train(ctx, Payload(weights, codec="sparse", meta={"pruned": True}))
    for name, mask in masks.items():
        assert torch.all(reply.tensors[name][mask == 0] == 0), name
        assert torch.count_nonzero(reply.tensors[name][mask == 1]) > 0.9 * mask.sum()
    assert any(prunable(k, v) for k, v in reply.tensors.items())
    assert "mentor" in ctx.state


def test_without_agp_sends_dense(plain_run):
    overrides, _, rows, tmp = plain_run
    _, ablated = psfl_run(overrides, tmp / "no-agp", ["psfl.agp=false", "rounds=1", *NO_FIGURES])
    g = [r for r in ablated if r["scope"] == "global" and r["round"] == 1][0]
    pruned = [r for r in rows if r["scope"] == "global" and r["round"] == 1][0]
    assert g["prune_ratio"] == 0.0
    assert g["downlink_bits"] > pruned["downlink_bits"]


def test_secure_aggregation_matches_plain_sum(plain_run):
    overrides, _, rows, tmp = plain_run
    _, secure = psfl_run(overrides, tmp / "secagg", ["psfl.secure_aggregation=true", "rounds=1", *NO_FIGURES])
    plain = [r for r in rows if r["scope"] == "global" and r["round"] == 1][0]
    sec = [r for r in secure if r["scope"] == "global" and r["round"] == 1][0]
    # the base station recovers the same weighted average (fixed point, 24 fractional bits)
    assert sec["psnr_db"] == pytest.approx(plain["psnr_db"], abs=1e-3)
    assert sec["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    # masked ring elements are incompressible: 64 bits each
    assert sec["uplink_bits"] > plain["uplink_bits"]


def test_dp_reports_growing_epsilon(plain_run):
    overrides, _, _, tmp = plain_run
    from semfl.methods.psfl.privacy import PrivacyAccountant

    # 2 of the 3 users per round: a fixed-size draw, which the accountant may not treat as Poisson
    # sampling at q = 2/3, so ε must be that of every round with q = 1
    _, rows = psfl_run(overrides, tmp / "dp", ["psfl.dp=true", "psfl.dp_noise_multiplier=1.0", "rounds=2",
                                               "train.participation=0.6", *NO_FIGURES])
    eps = [r["epsilon"] for r in rows if r["scope"] == "global" and r["round"] > 0]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    full = PrivacyAccountant(1.0, 1e-5, 1.0)
    full.step(2)
    assert eps[1] == pytest.approx(full.epsilon(), rel=1e-9)
    # a user's reply releases its privatised update only: no norm, training loss or test metrics
    users = [r for r in rows if r["scope"] == "user"]
    assert users and not any({"update_norm", "mentor_loss", "student_loss", "student_accuracy"} & set(r) for r in users)


def test_pretrain_cli_writes_loadable_mae_checkpoint(plain_run, capsys):
    overrides, _, _, tmp = plain_run
    out = tmp / "mentor0.pth"
    args = ["pretrain", "--user", "0", "--epochs", "2", "--out", str(out)]
    for o in overrides + ["method=psfl", "users=3"]:
        args += ["--set", o]
    assert main(args) == 0
    state = torch.load(out, weights_only=False)
    assert state["losses"][1] < state["losses"][0]
    assert "blocks.0.attn.qkv.weight" in state["model"]
    from semfl.wireless.channel import Channel
    from semfl.models import ImageSpec, build_model

    fresh = build_model(state["arch"], "tiny", ImageSpec(1, 28, 28, 10), Channel("awgn"))
    report = load_mae_checkpoint(fresh, out)
    assert "blocks.0.attn.qkv.weight" in report["loaded"]
    assert torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], state["model"]["blocks.0.attn.qkv.weight"])
