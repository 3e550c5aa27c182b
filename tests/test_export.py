"""semfl export / semfl transmit: exported programs match the live model bit for bit; the CLI reads
PNG/JPEG, converts them with notes, refuses what it cannot use, and writes a grid and the numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import semfl
from semfl.cli import main
from semfl.experiments.export import DecoderProgram, EncoderProgram


@pytest.mark.parametrize("method,model", [("fedavg", "global"), ("fedsfr", "global"), ("fedcl", "user:1"),
                                          ("psfl", "mentor:0")])
def test_exported_programs_are_bit_identical_to_the_live_model(finished_run, tmp_path, method, model):
    run_dir = finished_run(method)
    assert main(["export", str(run_dir), "--model", model, "--out", str(tmp_path)]) == 0
    codec = semfl.load(run_dir, model)
    encoder = torch.export.load(tmp_path / "encoder.pt2").module()
    decoder = torch.export.load(tmp_path / "decoder.pt2").module()
    for batch in (1, 5):  # the batch dimension is dynamic
        x, _ = codec.test_images(batch)
        with torch.no_grad():
            sent = encoder(x)
            assert torch.equal(sent, EncoderProgram(codec.model)(x))
            assert torch.equal(torch.view_as_complex(sent), codec.encode(x))
            received = torch.view_as_real(codec.channel(codec.encode(x), 5.0))
            assert torch.equal(decoder(received), DecoderProgram(codec.model)(received))
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["encoder"]["input"] == {"shape": ["batch", 1, 28, 28], "dtype": "float32", "range": [0.0, 1.0]}
    assert card["channel_uses"] == codec.channel_uses and card["trained_snr_db"] == [0.0, 25.0]
    assert card["final_metrics"] == codec.final_metrics() and card["model"] == model
    if codec.kind == "classes":
        assert card["decoder"]["output"]["meaning"] == "class logits"
    if method == "fedsfr":  # digital: every symbol sent is a 256-QAM codeword
        assert torch.cdist(sent.reshape(-1, 2), codec.model.codebook).min(1).values.max() < 1e-6
        assert "256-QAM codewords" in card["encoder"]["output"]["meaning"]
    else:
        assert (sent.pow(2).sum(-1).mean(1) - 1).abs().max() < 1e-5  # power normalisation is inside


def write_image(path, size, mode="RGB", fmt=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)
    return path


def test_transmit_cli_converts_images_and_writes_grid_and_numbers(finished_run, tmp_path, capsys):
    from semfl.experiments.transmit import read_images

    run_dir = finished_run("fedavg")
    png = write_image(tmp_path / "wide.png", (56, 28))
    jpg = write_image(tmp_path / "gray.jpg", (28, 28), mode="L", fmt="JPEG")
    out = tmp_path / "out"
    assert main(["transmit", str(run_dir), str(png), str(jpg), "--snr", "0,20", "--out", str(out), "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "note: wide.png: converted RGB -> L" in printed
    assert "note: wide.png: centre-cropped 56x28 -> 28x28" in printed and "gray.jpg" not in printed.split("awgn")[0]
    report = json.loads((out / "transmit.json").read_text())
    assert [r["snr_db"] for r in report["results"]] == [0.0, 20.0] and (out / "transmit.png").is_file()
    images, _ = read_images([str(png), str(jpg)], (1, 28, 28))
    expected = Image.open(png).convert("L").crop((14, 0, 42, 28))
    assert torch.equal(images[0, 0], torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255))
    codec = semfl.load(run_dir)
    for result in report["results"]:
        again = codec.transmit(images, result["snr_db"], seed=4)
        assert result["psnr_db"] == pytest.approx(again.mean_psnr_db, rel=1e-6)
        assert result["ssim_per_image"] == pytest.approx(again.ssim.tolist(), rel=1e-6)
        assert result["channel_uses_per_pixel"] == 0.125


def test_transmit_cli_test_images_give_accuracy(finished_run, tmp_path, capsys):
    run_dir = finished_run("fedavg")
    assert main(["transmit", str(run_dir), "--test", "4", "--snr", "10", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "transmit.json").read_text())["results"][0]
    assert 0 <= result["accuracy"] <= 1 and len(result["psnr_db_per_image"]) == 4
    assert main(["transmit", str(finished_run("fedcl")), "--test", "3", "--snr", "10", "--out", str(tmp_path / "cl")]) == 0
    assert "class predictions" in capsys.readouterr().out
    assert not (tmp_path / "cl" / "transmit.png").exists()


@pytest.mark.parametrize("make,message", [
    (lambda p: write_image(p / "small.png", (20, 40)), "small.png is 20x40, smaller than the model's 28x28 input"),
    (lambda p: write_image(p / "anim.gif", (28, 28), fmt="GIF"), "anim.gif is a GIF image; expected PNG or JPEG"),
    (lambda p: (p / "notes.png").write_text("not an image") and p / "notes.png", "notes.png is not an image"),
])
def test_transmit_cli_refuses_unusable_images_in_one_line(finished_run, tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["transmit", str(finished_run("fedavg")), str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("semfl: error: IMAGES:")


def test_transmit_cli_bad_snr_list_exits_2(finished_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["transmit", str(finished_run("fedavg")), "--test", "2", "--snr", "0,loud"])
    assert exit_.value.code == 2 and "comma-separated SNRs" in capsys.readouterr().err
