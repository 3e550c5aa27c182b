"""eval.sweep_channels: the final SNR sweep repeated on other channel kinds (FedSFR Fig 4)."""
from __future__ import annotations

import json

import pytest

from semfl.config import ConfigError, load_config
from semfl.runtimes.run import Runner


def test_unknown_sweep_channel_is_named(tiny_overrides):
    with pytest.raises(ConfigError, match="eval.sweep_channels: unknown channel 'fading'"):
        load_config(None, tiny_overrides + ["eval.sweep_channels=['rayleigh', 'fading']"])


def test_sweep_on_other_channels(tiny_overrides, tmp_path):
    sets = tiny_overrides + ["data.max_per_user=0", "method=fedavg", "rounds=2", "model.arch=jscc", "train.optimizer=adam", "train.lr=0.003",
                             "train.local_epochs=2", "eval.grid_images=0", "eval.snr_sweep=[0.0, 5.0]",
                             "eval.sweep_channels=['awgn', 'rayleigh']"]
    run_dir = tmp_path / "run"
    Runner(load_config(None, sets), run_dir, show_progress=False, log=lambda m: None).execute()
    models = json.loads((run_dir / "snr_sweep.json").read_text())["models"]
    assert set(models) == {"fedavg", "fedavg (awgn)", "fedavg (rayleigh)"}
    # seeded per SNR point: the model on its own channel kind again gives exactly the same numbers
    assert models["fedavg (awgn)"] == models["fedavg"]
    # an AWGN-trained model loses quality in Rayleigh fading (deep fades), even with equalisation
    faded, own = models["fedavg (rayleigh)"], models["fedavg"]
    assert all(a - f > 0.1 for f, a in zip(faded["psnr_db"], own["psnr_db"])), (faded, own)
    assert all(f < a for f, a in zip(faded["ssim"], own["ssim"])), (faded, own)


def test_only_the_other_channel_curves_are_dashed(monkeypatch, tmp_path):
    """A model label that itself ends in ')' (PSFL's 'student (CSC)') stays solid."""
    from semfl.report import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    values = {"psnr_db": [10.0, 12.0], "accuracy": [0.5, 0.6]}
    sweep = {"student (CSC)": values, "student (CSC) (rayleigh)": values}
    plots.snr_sweep(sweep, [0.0, 10.0], tmp_path / "s.png", dashed={"student (CSC) (rayleigh)"})
    styles = {line.get_label(): line.get_linestyle() for line in figures[0].axes[0].get_lines()}
    assert styles == {"student (CSC)": "-", "student (CSC) (rayleigh)": "--"}
