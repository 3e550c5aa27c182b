"""semfl.load: a run's trained models reproduce the run's own evaluation, for every method family."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import semfl
from semfl.protocol import seeding
from semfl.files import read_jsonl
from semfl.protocol.checkpoint import save_checkpoint
from semfl.runtimes.run import RunError
from semfl.training import evaluate_semantic

# these tests (and tests/test_docs_use_model.py) read finished_run's runs: one worker makes each once
pytestmark = pytest.mark.xdist_group("finished-runs")


def rows_of(run_dir: Path, round_: int, scope: str = "global") -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] == round_ and r["scope"] == scope]


def replay_global(codec, round_: int) -> dict:
    """The runner's evaluation of round_ (same seed stream), on the loaded model."""
    seeding.enter(codec.cfg.seed, round_, "eval")
    run = codec.run
    return evaluate_semantic(codec.model, codec.classifier, run.test_x, run.test_y, codec.cfg.eval.snr_db,
                             codec.cfg.eval.batch_size)


@pytest.mark.parametrize("method", ["fedavg", "fedsfr"])
def test_global_model_reproduces_the_runs_final_evaluation(finished_run, method):
    run_dir = finished_run(method)
    codec = semfl.load(run_dir)
    assert codec.name == "global" and codec.round == 2 and codec.kind == "images"
    row = rows_of(run_dir, 2)[0]
    replay = replay_global(codec, 2)
    for key in ("psnr_db", "ssim", "accuracy", "loss"):
        assert replay[key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), key
    summary = codec.summary()
    assert summary["method"] == method and summary["final_metrics"]["psnr_db"] == row["psnr_db"]
    assert summary["parameters"] == sum(p.numel() for p in codec.model.parameters()) > 0
    assert summary["training_config"]["train"]["lr"] == 0.05


def test_an_earlier_round_loads_its_own_weights(finished_run):
    run_dir = finished_run("fedavg")
    first = semfl.load(run_dir, round=1)
    assert first.round == 1
    assert replay_global(first, 1)["psnr_db"] == pytest.approx(rows_of(run_dir, 1)[0]["psnr_db"], rel=1e-6)
    with pytest.raises(RunError, match=r"round: .* no checkpoint of round 7 \(it has rounds \[1, 2\]"):
        semfl.load(run_dir, round=7)


def test_transmit_is_encode_channel_decode_with_hand_checked_numbers(finished_run):
    codec = semfl.load(finished_run("fedavg"))
    x, y = codec.test_images(6)
    # tiny CSC on 28x28: 7x7 tokens x 2 complex symbols each, over 784 pixels
    assert codec.channel_uses == 98 and codec.channel_uses_per_pixel == 98 / 784
    symbols = codec.encode(x)
    assert symbols.is_complex() and symbols.shape == (6, 98)
    assert torch.allclose((symbols.abs() ** 2).mean(1), torch.ones(6), atol=1e-5)  # unit mean power per image
    t = codec.transmit(x, 5.0, labels=y, seed=3)
    seeding.enter(3, "transmit", repr(5.0))
    with torch.no_grad():
        forward = codec.model(x, torch.full((6,), 5.0)).recon
    assert torch.equal(t.reconstruction, forward)
    mse = ((t.reconstruction - x) ** 2).flatten(1).mean(1)
    assert torch.allclose(t.psnr_db, 10 * torch.log10(1 / mse), atol=1e-4)
    predictions = codec.classifier(t.reconstruction).argmax(1)
    assert t.accuracy == pytest.approx(float((predictions == y).float().mean()))
    assert codec.transmit(x, 5.0, seed=3).psnr_db.tolist() == t.psnr_db.tolist()  # the seed fixes the noise
    quiet = codec.transmit(x, 40.0, seed=3).mean_psnr_db
    loud = codec.transmit(x, -10.0, seed=3).mean_psnr_db
    assert quiet > loud
    faded = codec.transmit(x, 5.0, kind="rayleigh", seed=3)
    assert faded.channel == "rayleigh" and not torch.equal(faded.reconstruction, t.reconstruction)


def test_psfl_student_and_each_users_mentor(finished_run):
    from semfl.methods.common import build_semantic_model
    from semfl.methods.psfl.psfl import choose_mentors

    run_dir = finished_run("psfl")
    student = semfl.load(run_dir)
    assert student.models == ["global", "mentor:0", "mentor:1", "mentor:2"]
    assert replay_global(student, 2)["psnr_db"] == pytest.approx(rows_of(run_dir, 2)[0]["psnr_db"], rel=1e-6)
    arches = choose_mentors(student.run.user_sizes, student.cfg.table("psfl"))
    for user in range(3):
        mentor = semfl.load(run_dir, f"mentor:{user}")
        assert type(mentor.model).__name__ == "GSC"
        held = torch.load(run_dir / "checkpoint" / "users" / f"user-{user}-r2.pt", weights_only=True)["mentor"]
        weights = dict(mentor.model.named_parameters())
        assert all(torch.equal(weights[k], v) for k, v in held.items())
        expected = build_semantic_model(mentor.run, arches[user])  # the architecture the run gave the user
        assert [p.shape for p in expected.parameters()] == [p.shape for p in mentor.model.parameters()]
        assert mentor.summary()["model"] == f"mentor:{user}"
    x, _ = student.test_images(4)
    assert math.isfinite(semfl.load(run_dir, "mentor:0").transmit(x, 10.0, seed=1).mean_psnr_db)


def test_finefed_pairs_reproduce_the_runs_pair_rows(finished_run):
    from semfl.methods.finefed import whole_set_psnr_db

    run_dir = finished_run("finefed")
    fed = semfl.load(run_dir)
    assert fed.models == ["global", "pair:0-1", "pair:0-2", "pair:1-2", "pair:1-0", "pair:2-0", "pair:2-1"]
    receivers = {0: [1, 2], 1: [2, 0], 2: [0, 1]}
    pairs = {(i, j): semfl.load(run_dir, f"pair:{i}-{j}") for i in receivers for j in receivers[i]}
    seeding.enter(fed.cfg.seed, 2, "eval")  # the runner's order: the federated model, then every pair
    run = fed.run
    federated = evaluate_semantic(fed.model, fed.classifier, run.test_x, run.test_y, 10.0, 500)
    users = {row["user"]: row for row in rows_of(run_dir, 2, "user")}
    for i, js in receivers.items():
        results = [evaluate_semantic(pairs[i, j].model, fed.classifier, run.test_x, run.test_y, 10.0, 500) for j in js]
        assert sum(r["psnr_db"] for r in results) / 2 == pytest.approx(users[i]["psnr_db"], rel=1e-6)
    assert rows_of(run_dir, 2)[0]["federated_psnr_batch_db"] == pytest.approx(whole_set_psnr_db(federated["mse"]), rel=1e-6)


def test_fedcl_gives_class_predictions_and_reproduces_user_accuracy(finished_run):
    from semfl.methods.split.common import eval_snr, evaluate_split, user_test_set

    run_dir = finished_run("fedcl")
    codecs = [semfl.load(run_dir, f"user:{k}") for k in range(3)]
    assert semfl.load(run_dir).name == "user:0"  # no global model: the first user's
    x, y = codecs[0].test_images(5)
    t = codecs[0].transmit(x, 10.0, labels=y, seed=0)
    assert t.kind == "classes" and t.reconstruction is None and t.psnr_db is None
    assert "class predictions" in t.note and t.predictions.shape == (5,)
    assert t.accuracy == pytest.approx(float((t.predictions == y).float().mean()))
    assert codecs[0].channel_uses == 32  # FedCL's 64 reals = 32 complex symbols
    seeding.enter(codecs[0].cfg.seed, 2, "eval")
    users = {row["user"]: row for row in rows_of(run_dir, 2, "user")}
    for k, codec in enumerate(codecs):
        m = codec.model
        result = evaluate_split(m.encoder, m.head, m.channel, *user_test_set(codec.run, k), eval_snr(codec.cfg), 500)
        assert result["accuracy"] == pytest.approx(users[k]["accuracy"], rel=1e-6)


def test_a_flower_deployments_users_state_is_read_from_the_nodes(finished_run, tmp_path):
    from semfl.config import dump_config, load_config
    from semfl.runtimes.flower.node import UserStateStore, run_key

    local = finished_run("psfl")
    run_dir = tmp_path / "flower-run"
    shutil.copytree(local, run_dir)
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    state["transport"] = {}  # what the Flower transport checkpoints: users' states live on their nodes
    save_checkpoint(run_dir / "checkpoint" / "state.pt", state)
    shutil.rmtree(run_dir / "checkpoint" / "users")
    nodes = tmp_path / "node-state"
    key = run_key(dump_config(load_config(run_dir / "config.toml")), str(run_dir.resolve()))
    for user in range(3):
        held = torch.load(local / "checkpoint" / "users" / f"user-{user}-r2.pt", weights_only=True)
        UserStateStore(nodes / key / f"user-{user}").save(2, held)  # as a node keeps it
    with pytest.raises(RunError, match="lives on its Flower node"):
        semfl.load(run_dir, "mentor:1", node_state_dir=tmp_path / "elsewhere")
    mentor = semfl.load(run_dir, "mentor:1", node_state_dir=nodes)
    original = semfl.load(local, "mentor:1")
    assert all(torch.equal(a, b) for a, b in zip(mentor.model.parameters(), original.model.parameters()))


def test_bad_requests_name_what_is_wrong(finished_run, tmp_path):
    run_dir = finished_run("fedavg")
    with pytest.raises(RunError, match=r"model: 'mentor:0' is not a model of this fedavg run \(its models: global\)"):
        semfl.load(run_dir, "mentor:0")
    with pytest.raises(RunError, match="is not a run directory"):
        semfl.load(tmp_path)
    codec = semfl.load(run_dir)
    with pytest.raises(ValueError, match=r"images: the model takes \(B, 1, 28, 28\) images, got shape \(2, 3, 28, 28\)"):
        codec.encode(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        codec.encode(torch.full((1, 1, 28, 28), 255.0))


class Payload:  # not a tensor, not a plain container: torch's weights_only loader refuses it
    pass


def test_checkpoints_are_read_with_weights_only(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run("fedavg"), run_dir)
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    state["extra"] = Payload()
    torch.save(state, run_dir / "checkpoint" / "state.pt")
    with pytest.raises(RuntimeError, match="is unreadable"):
        semfl.load(run_dir)


def test_import_semfl_stays_light():
    code = "import sys, semfl; assert 'torch' not in sys.modules; assert callable(semfl.load); assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(Path(semfl.__file__).parents[1])})
