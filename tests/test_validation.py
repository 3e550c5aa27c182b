"""Every user reply is checked before aggregation: malformed or non-finite replies are rejected and
logged, the run goes on; a model that still becomes non-finite stops the run, checkpoint intact."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from poisoning import poisoned, scaled, with_nan
from semfl.wireless.codecs import Payload
from semfl.config import load_config
from semfl.protocol.validation import ReplyCheck, nonfinite_entries
from semfl.protocol.checkpoint import load_checkpoint
from semfl.files import read_jsonl
from semfl.runtimes.run import CHECKPOINT, Runner, RunError

LIKE = {"w": torch.empty(2, 3, device="meta"), "b": torch.empty(3, device="meta")}


def check() -> ReplyCheck:
    return ReplyCheck(lambda kind: LIKE if kind == "train" else None, user_sizes=[10, 20])


def good(**meta) -> Payload:
    return Payload({"w": torch.ones(2, 3), "b": torch.zeros(3)}, meta={"num_samples": 10, **meta})


@pytest.mark.parametrize("reply, reason", [
    (Payload({"w": torch.ones(2, 3)}, meta={"num_samples": 1}), "missing b"),
    (Payload({"w": torch.ones(2, 3), "b": torch.zeros(3), "x": torch.zeros(1)}), "unexpected x"),
    (Payload({"w": torch.ones(3, 2), "b": torch.zeros(3)}), "tensor w has shape (3, 2), expected (2, 3)"),
    (Payload({"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.zeros(3)}), "dtype torch.float64"),
    (Payload({"w": torch.full((2, 3), float("inf")), "b": torch.zeros(3)}), "tensor w has 6 non-finite values"),
    (good(loss=float("nan")), "metadata loss is nan"),
    (Payload({"w": torch.ones(2, 3), "b": torch.zeros(3)}, meta={"num_samples": 11}), "exceeds the user's 10 samples"),
    (Payload({"w": torch.ones(2, 3), "b": torch.zeros(3)}, meta={"num_samples": -1}), "is not a sample count"),
    (good(extra=list(range(2000))), "metadata holds 2001 values"),
    (Payload({"w": torch.ones(2, 3), "b": torch.zeros(3)}, codec="nonsense"), "unknown codec 'nonsense'"),
    ("weights", "not a payload"),
])
def test_reply_check_names_the_problem(reply, reason):
    problem = check().problem(0, "train", reply)
    assert problem is not None and reason in problem, problem


def test_reply_check_accepts_sound_replies_and_any_names_without_expectation():
    assert check().problem(0, "train", good(loss=0.5)) is None
    assert check().problem(1, "train", Payload(good().tensors, meta={"num_samples": 20})) is None
    assert check().problem(0, "features", Payload({"anything": torch.ones(4)})) is None
    assert check().problem(0, "features", Payload({"anything": torch.tensor([float("nan")])})) is not None


def test_nonfinite_entries_walks_nested_state():
    state = {"global": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "n": 3,
             "list": [torch.tensor([float("inf")]), torch.tensor([1], dtype=torch.int64)]}
    assert nonfinite_entries(state) == ["global/b", "list[0]"]


def _cfg(fmnist_root: Path, cache: Path, rounds: int):
    return load_config(None, ["log.figures=false", f"data.root={fmnist_root}", f"classifier.cache_dir={cache}", "scale=tiny",
                              "users=5", f"rounds={rounds}", "data.download=false", "data.test_samples=100",
                              "eval.grid_images=0", "eval.snr_sweep=[]", "classifier.epochs=3", "train.lr=0.05",
                              "data.max_per_user=48"])


def _globals(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["scope"] == "global"]


def test_nan_reply_is_rejected_logged_and_the_run_goes_on(fmnist_root, shared_cache, tmp_path):
    logs: list[str] = []
    out = tmp_path / "nan"
    Runner(_cfg(fmnist_root, shared_cache, 2), out, show_progress=False, log=logs.append,
           transport=poisoned(2, with_nan)).execute()
    rows = _globals(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert [r["user"] for r in row["rejected_users"]] == [2]
        assert "non-finite" in row["rejected_users"][0]["reason"]
        assert math.isfinite(row["loss"]) and math.isfinite(row["psnr_db"])
    assert sum("rejected user 2's 'train' reply" in line for line in logs) == 2
    # the rejected reply's bits were still sent on the air: charged to user 2's uplink
    links = [r for r in read_jsonl(out / "metrics.jsonl") if r["scope"] == "link" and r["round"] == 1]
    assert len({r["uplink_bits"] for r in links}) == 1 and len(links) == 5


def test_scaled_reply_making_the_model_nonfinite_stops_the_run_and_keeps_the_checkpoint(fmnist_root, shared_cache, tmp_path):
    out = tmp_path / "x1e4"
    with pytest.raises(RunError, match=r"round 2: the global model became non-finite .* checkpoint of round 1"):
        Runner(_cfg(fmnist_root, shared_cache, 3), out, show_progress=False, log=lambda m: None,
               transport=poisoned(2, scaled(1e4))).execute()
    assert load_checkpoint(out / CHECKPOINT)["round"] == 1
    assert [r["round"] for r in _globals(out)] == [0, 1]  # no metrics of the broken round
    # the checkpoint is good: once the attacker is gone the run resumes from it and finishes
    Runner(_cfg(fmnist_root, shared_cache, 3), out, resume=True, show_progress=False, log=lambda m: None).execute()
    rows = _globals(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
