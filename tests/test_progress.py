"""No silent waits: long steps write plain progress lines at a steady interval when the output is
not a terminal, and a paper-scale run on a CPU says up front what it will train."""
from __future__ import annotations

import io
from types import SimpleNamespace

import torch

from semfl import progress
from semfl.config import load_config
from semfl.runtimes.progress import paper_on_cpu
from semfl.runtimes.run import Runner


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines_of(stream: io.StringIO) -> list[str]:
    return [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]


def test_plain_lines_come_at_the_interval_with_total_and_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setenv("SEMFL_PROGRESS_INTERVAL", "30")
    out = io.StringIO()
    with progress.bar("classifier", 100, unit="images", stream=out, estimate=True) as bar:
        for _ in range(10):  # 10 images every 10 s
            clock.now += 10
            bar.advance(10)
    assert lines_of(out) == [
        "classifier: started (100 images)",
        "classifier: the first 10 images took 0:00:10: about 0:01:40 for all 100 on this device",
        "classifier: 40/100 images (40%), 0:00:40 elapsed, ETA 0:01:00",
        "classifier: 70/100 images (70%), 0:01:10 elapsed, ETA 0:00:30",
        "classifier: done, 100 images in 0:01:40",
    ]


def test_a_resumed_count_and_quiet_runs(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setenv("SEMFL_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    bar = progress.bar("rounds", 10, unit="rounds", stream=out, completed=6, announce=False)
    clock.now += 60
    bar.advance()
    bar.info = "psnr_db=20"
    clock.now += 60
    bar.advance()
    bar.close()
    # the ETA counts only the rounds run in this process: 2 in 120 s, 2 to go
    assert lines_of(out) == ["rounds: 7/10 rounds (70%), 0:01:00 elapsed, ETA 0:03:00",
                             "rounds: 8/10 rounds (80%), 0:02:00 elapsed, ETA 0:02:00 psnr_db=20"]
    quiet = io.StringIO()
    with progress.display(None):
        with progress.bar("classifier", 5, stream=quiet) as silent:
            silent.advance(5)
    assert quiet.getvalue() == ""


def test_a_run_logged_to_a_file_writes_progress_of_every_long_step(tiny_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEMFL_PROGRESS_INTERVAL", "0")  # every step; 30 s in real use
    # a cache of its own: the classifier must train here, not come from the session's shared cache
    cfg = load_config(None, tiny_overrides + ["data.max_per_user=60", f"classifier.cache_dir={tmp_path / 'cache'}"])
    Runner(cfg, tmp_path / "run", show_progress=True).execute()
    err = [line.split("] ", 1)[-1] for line in capsys.readouterr().err.splitlines()]
    text = "\n".join(err)
    assert "classifier: started (2400 images)" in err  # 3 epochs x 800 images: a total, so an ETA
    assert any(line.startswith("classifier: 1312/2400 images (55%)") and "ETA" in line for line in err)
    assert "fedavg rounds: started (3 rounds)" in err
    assert "fedavg rounds: the first 1 rounds took" in text and "for all 3 on this device" in text
    assert any(line.startswith("fedavg rounds: 2/3 rounds (67%)") and "psnr_db=" in line for line in err)
    assert any(line.startswith("round 1: users: 1/3 users") for line in err)
    assert "SNR sweep: done, 2 points" in text and "figures: done, 2 figures" in text


def test_paper_scale_on_a_cpu_says_what_it_will_train():
    from semfl.models.base import ImageSpec

    cfg = load_config(None, ["scale=paper", "method=psfl", "rounds=100", "users=9"])
    dataset = SimpleNamespace(spec=ImageSpec(1, 28, 28, 10), train_y=torch.zeros(60000))
    text = paper_on_cpu(cfg, dataset, epochs=30)
    assert text.startswith("paper scale on a CPU: this trains the ResNet-101 classifier (30 epochs x 60000 images")
    assert "then 100 rounds of psfl with 9 users on csc (54.8 M parameters), each user with a GSC mentor" in text
