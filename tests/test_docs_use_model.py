"""docs/use-a-trained-model.md's worked example runs as written, on a tiny PSFL run."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semfl.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "use-a-trained-model.md"
RUN = "runs/quickstart-psfl-s0"
pytestmark = pytest.mark.xdist_group("finished-runs")  # finished_run("psfl"), which tests/test_codec_api.py reads too


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_documented_example_runs(finished_run, tmp_path, monkeypatch, capsys):
    run_dir = finished_run("psfl")
    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()
    shutil.copytree(run_dir, RUN)  # the tiny run where `make run` puts the quickstart
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save("photo.jpg")
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("semfl ")]
    assert len(commands) == 3
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    assert Path(RUN, "transmit", "transmit.png").is_file()
    numbers = json.loads(Path(RUN, "transmit", "transmit.json").read_text())
    assert [r["snr_db"] for r in numbers["results"]] == [0.0, 10.0, 20.0] and numbers["model"] == "global"
    photo = json.loads(Path("transmit-photo", "transmit.json").read_text())
    assert photo["model"] == "mentor:0" and photo["channel"] == "rayleigh"
    notes = capsys.readouterr().out
    assert "note: photo.jpg: centre-cropped 80x60 -> 60x60" in notes and "note: photo.jpg: resized 60x60 -> 28x28" in notes
    assert {p.name for p in Path("exported").iterdir()} == {"encoder.pt2", "decoder.pt2", "card.json"}
    (code,) = blocks("python")
    exec(compile(code, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert "['global', 'mentor:0', 'mentor:1', 'mentor:2']" in printed
    assert re.search(r"^10 dB: PSNR \d+\.\d\d dB, SSIM -?\d\.\d{3}, accuracy \d\.\d\d$", printed, flags=re.M)
    assert "mentor 0: GSC" in printed
