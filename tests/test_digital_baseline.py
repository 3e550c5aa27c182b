"""The separation baseline: codec + 5G LDPC + QAM over semfl's channels, and the capacity bound."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from semfl.wireless.channel import Channel, seed_channels
from semfl.wireless import digital, image_codec, separation
from semfl.wireless.link_table import GAP_DB, MCS, TABLE, capacity_bits, choose_mcs


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Image-like test inputs: random 7x7 images upsampled to 28x28 (JPEG compresses them)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    return torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)


def toy_classifier() -> torch.nn.Module:
    """A seeded linear classifier of 28x28 images: scores that differ between reconstructions."""
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    torch.nn.init.normal_(classifier[1].weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return classifier


def _fixture_data(fmnist_root, shared_cache) -> list[str]:
    """`semfl baseline` options for the fixture dataset and a quickly trained, shared classifier."""
    sets = [f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "data.download=false",
            "classifier.epochs=3"]
    return [a for s in sets for a in ("--set", s)]


def test_header_stripping_round_trips_and_counts_the_headers():
    img = (smooth_images(1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for name in image_codec.available():
        codec = image_codec.ImageCodec(name)
        payload, file_bytes = codec.encode(img, 30)
        whole = np.asarray(Image.open(io.BytesIO(codec._file(img, 30))).convert("L")).reshape(img.shape)
        assert np.array_equal(codec.decode(payload, 30, img.shape), whole)
        assert file_bytes > len(payload)
    # JPEG: the stripped part is the same for any content of that size and quality
    codec = image_codec.ImageCodec("jpeg")
    other = (smooth_images(1, seed=5)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    (p1, f1), (p2, f2) = codec.encode(img, 30), codec.encode(other, 30)
    assert f1 - len(p1) == f2 - len(p2) == len(codec._jpeg_prefix(30, img.shape)) + 2


def test_bitstream_fields_round_trip_and_respect_the_budget():
    payload = bytes(range(40))
    bits = image_codec.to_bits(payload, 7, 400)
    assert len(bits) == 400
    assert image_codec.stream_bits(payload, 400) == image_codec.QUALITY_BITS + math.ceil(math.log2(51)) + 320
    assert image_codec.from_bits(bits, 400) == (7, payload)
    with pytest.raises(ValueError, match="do not fit"):
        image_codec.to_bits(payload, 7, 300)


def test_bits_per_image_never_exceed_the_channel_budget():
    enc = separation.EncodedSet(smooth_images(12))
    for channel_uses in (49, 131, 196, 2000, 9000):
        for mcs in TABLE:
            plan = digital.layout(channel_uses, mcs)
            if plan is None:
                continue
            assert plan.symbols <= channel_uses
            assert plan.info_bits * 5 >= plan.coded_bits  # 5G LDPC's lowest rate, 1/5
            assert plan.payload_bits + plan.blocks * plan.crc_bits <= channel_uses * mcs.bits_per_symbol * mcs.code_rate
            chosen = enc.choose(np.full(12, plan.payload_bits))
            for i, q in enumerate(chosen):
                if q >= 0:
                    assert image_codec.stream_bits(enc.payloads(q)[i], plan.payload_bits) <= plan.payload_bits


@pytest.mark.parametrize("channel_uses, mcs, crc", [(61, MCS(2, 1 / 5), 16),  # rounding would give k/n < 1/5
                                                    (2000, MCS(8, 5 / 6), 24)])  # blocks over 3824 bits: CRC24A
def test_the_lowest_rate_and_the_crc24_layouts_go_through_the_link(channel_uses, mcs, crc):
    plan = digital.layout(channel_uses, mcs)
    assert plan.crc_bits == crc and plan.info_bits * 5 >= plan.coded_bits
    bits = torch.randint(0, 2, (2, plan.payload_bits), generator=torch.Generator().manual_seed(0)).float()
    seed_channels(2)
    received, ok = digital.transmit(bits, plan, Channel("awgn"), 40.0)
    assert ok.all() and torch.equal(received, bits)


def test_capacity_bound_is_k_log2_1_plus_snr_and_monotone():
    assert capacity_bits(100, 10.0) == math.floor(100 * math.log2(11))  # 345
    values = [capacity_bits(196, s) for s in np.arange(-5, 30, 0.5)]
    assert all(b <= a for b, a in zip(values, values[1:])) and values[0] < values[-1]


def test_high_snr_bits_are_exact_and_psnr_is_the_codecs_own():
    images = smooth_images(16)
    enc = separation.EncodedSet(images)
    mcs = choose_mcs(40.0)
    seed_channels(1)
    plan = digital.layout(196, mcs)
    chosen = enc.choose(np.full(16, plan.payload_bits))
    assert (chosen >= 0).all()
    sent = torch.from_numpy(np.stack([image_codec.to_bits(enc.payloads(q)[i], q, plan.payload_bits)
                                      for i, q in enumerate(chosen)])).float()
    received, ok = digital.transmit(sent, plan, Channel("awgn"), 40.0)
    assert ok.all() and torch.equal(received, sent)
    recon, info = separation.send_digital(enc, 196, mcs, Channel("awgn"), 40.0, images.mean(0))
    assert info["lost"] == 0.0
    own = [np.asarray(Image.open(io.BytesIO(enc.codec._file(enc.u8[i], image_codec.QUALITIES[q])))) for i, q in enumerate(chosen)]
    own = torch.from_numpy(np.stack(own)).unsqueeze(1).float() / 255
    assert torch.equal(recon, own)
    # the mean of per-image PSNR, computed here in float64 from each image's own MSE
    mse = (own.double() - images.double()).square().mean(dim=(1, 2, 3))
    assert separation.quality(recon, images, torch.zeros(16), None)["psnr_db"] == pytest.approx(
        float((10 * torch.log10(1 / mse)).mean()), abs=1e-4)


def test_below_threshold_blocks_fail_and_the_fallback_is_used():
    images = smooth_images(16)
    enc = separation.EncodedSet(images)
    mcs = MCS(4, 3 / 4)
    fallback = images.mean(0)
    seed_channels(2)
    recon, info = separation.send_digital(enc, 196, mcs, Channel("awgn"), mcs.threshold_db - GAP_DB - 3, fallback)
    assert info["lost"] == 1.0
    assert torch.allclose(recon, fallback.expand_as(images), atol=0.5 / 255)


def bler(mcs: MCS, snr_db: float, blocks: int = 60, channel_uses: int = 196, seed: int = 0) -> float:
    plan = digital.layout(channel_uses, mcs)
    seed_channels(seed)
    bits = torch.randint(0, 2, (blocks, plan.payload_bits), generator=torch.Generator().manual_seed(seed)).float()
    _, ok = digital.transmit(bits, plan, Channel("awgn"), snr_db)
    return 1 - ok.float().mean().item()


@pytest.mark.parametrize("mcs", [MCS(2, 1 / 3), MCS(4, 1 / 2), MCS(6, 3 / 4)], ids=lambda m: m.name)
def test_mcs_table_thresholds_against_a_bler_simulation(mcs):
    """At its table threshold an entry decodes (BLER <= 10 %); at the Shannon limit it does not."""
    assert bler(mcs, mcs.threshold_db) <= 0.1
    assert bler(mcs, mcs.threshold_db - GAP_DB) >= 0.5


def test_table_picks_the_most_efficient_usable_entry():
    assert choose_mcs(-10.0) is None
    for snr in (0.0, 7.0, 12.5, 25.0):
        pick = choose_mcs(snr)
        assert pick.threshold_db <= snr
        assert all(m.threshold_db > snr for m in TABLE if m.efficiency > pick.efficiency)


def test_rayleigh_receiver_undoes_the_semantic_channel_with_or_without_its_equaliser():
    """Same draws, same received bits: the link uses semfl's Channel and inverts h (and the MMSE gain)."""
    mcs = MCS(4, 1 / 2)
    plan = digital.layout(196, mcs)
    bits = torch.randint(0, 2, (40, plan.payload_bits), generator=torch.Generator().manual_seed(3)).float()
    out = []
    for equalize in (True, False):
        seed_channels(4)
        out.append(digital.transmit(bits, plan, Channel("rayleigh", equalize=equalize), 12.0))
    assert torch.equal(out[0][1], out[1][1]) and torch.equal(out[0][0], out[1][0])
    assert 0 < out[0][1].float().mean() < 1  # deep fades lose some images at 12 dB, not all
    seed_channels(4)
    _, ok_awgn = digital.transmit(bits, plan, Channel("awgn"), 12.0)
    assert ok_awgn.all()


def test_sweep_is_repeatable_and_has_the_three_curves():
    images = smooth_images(8)
    labels = torch.zeros(8, dtype=torch.long)
    a = separation.sweep(images, labels, None, 0.25, [5.0, 20.0], design_snr=12.5)
    timings = {"link": 1.0}
    b = separation.sweep(images, labels, None, 0.25, [5.0, 20.0], design_snr=12.5, timings=timings)
    assert set(timings) == set(separation.STAGES) and timings["link"] > 1.0  # added to, not replaced
    assert all(seconds > 0 for seconds in timings.values())
    assert list(a) == ["JPEG + LDPC + QAM, adapted", "JPEG + LDPC + QAM, designed for 12.5 dB", "JPEG at capacity"]
    assert a == b
    cap = a["JPEG at capacity"]
    assert cap["psnr_db"][1] >= a["JPEG + LDPC + QAM, adapted"]["psnr_db"][1]
    for mode, label in zip(separation.MODES, a):  # a curve alone is the same curve
        assert separation.sweep(images, labels, None, 0.25, [5.0, 20.0], design_snr=12.5, modes=(mode,)) == {label: a[label]}
    with pytest.raises(ValueError, match="modes: \\['ideal'\\]"):
        separation.sweep(images, labels, None, 0.25, [5.0], modes=("ideal",))


def test_bench_times_the_three_curves_and_each_alone_against_the_learned_sweep(fmnist_root, shared_cache, tmp_path,
                                                                               monkeypatch):
    import json

    from semfl.cli import main
    from semfl.methods import common

    swept, snr_sweep = [], common.snr_sweep  # which model each timed learned sweep ran
    monkeypatch.setattr(common, "snr_sweep", lambda run, models: swept.append(
        {label: type(m).__name__ for label, m in models.items()}) or snr_sweep(run, models))

    args = ["baseline", "bench", "--scale", "tiny", "--samples", "24", "--snr", "0", "20", "--repeats", "1",
            "--also", "gsc-m", "--out", str(tmp_path)] + _fixture_data(fmnist_root, shared_cache)
    assert main(args) == 0
    result = json.loads((tmp_path / "digital-bench-cpu.json").read_text())
    row = result["repeats"][0]
    stages = {"digital_link_s", "digital_codec_s", "digital_scoring_s"}
    floor = {"undecodable_snr_db", "undecodable_link_s", "floor_s"}
    assert set(row) == {"learned_s", "learned_gsc-m_s", "digital_s", "adapted_alone_s", "designed_alone_s",
                        "capacity_alone_s"} | stages | floor
    assert [list(s.items()) for s in swept] == [[("csc", "CSC")], [("gsc-m", "GSC")]]
    also = result["also"]["gsc-m"]  # a second learned model timed beside it, and both together
    assert also["learned_sweep_s"] == row["learned_gsc-m_s"] and also["ratio"] == result["ratio"]
    assert also["digital_over_learned"] == pytest.approx(row["digital_s"] / row["learned_gsc-m_s"])
    assert result["all_learned_sweep_s"] == pytest.approx(row["learned_s"] + row["learned_gsc-m_s"])
    assert result["digital_over_all_learned"] == pytest.approx(row["digital_s"] / result["all_learned_sweep_s"])
    undecodable = row.pop("undecodable_snr_db")
    assert undecodable == [0.0]  # the fixed design (12.5 dB) loses every image at 0 dB, none at 20 dB
    assert row["floor_s"] == pytest.approx(row["digital_scoring_s"] + row["undecodable_link_s"])
    assert all(seconds > 0 for seconds in row.values())
    assert sum(row[k] for k in stages) <= row["digital_s"]  # timed inside the sweep, one after the other
    assert result["digital_stage_s"] == {k[len("digital_"):-2]: row[k] for k in stages}
    assert result["digital_over_learned"] == pytest.approx(row["digital_s"] / row["learned_s"])
    assert result["curve_alone_over_learned"]["designed"] == pytest.approx(row["designed_alone_s"] / row["learned_s"])


@pytest.mark.parametrize("channel", ["awgn", "rayleigh"])
def test_baseline_digital_command_writes_the_three_curves_and_their_figure(fmnist_root, shared_cache, tmp_path,
                                                                           capsys, channel):
    """`semfl baseline digital` alone: the three curves at the given k/n and SNRs, the fixed design
    at the middle of the link's SNR range (12.5 dB) with one MCS throughout and a cliff below it,
    the adapted MCS rising with the SNR, the JSON and the figure written, a table printed."""
    import json

    from semfl.cli import main

    out = tmp_path / channel
    args = ["baseline", "digital", "--scale", "tiny", "--samples", "24", "--ratio", "0.25", "--snr", "0", "10", "25",
            "--channel", channel, "--out", str(out)] + _fixture_data(fmnist_root, shared_cache)
    assert main(args) == 0
    doc = json.loads((out / "digital_baseline.json").read_text())
    assert (out / "snr_sweep.png").stat().st_size > 0
    assert (doc["ratio"], doc["channel"], doc["snr_db"], doc["test_samples"]) == (0.25, channel, [0, 10, 25], 24)
    adapted, designed, capacity = (doc["curves"][label] for label in separation.curve_labels("jpeg", 12.5).values())
    assert all(len(values) == 3 for curve in (adapted, designed, capacity) for values in curve.values())
    assert designed["mcs"] == [choose_mcs(12.5).name] * 3 and designed["lost"][0] == 1.0
    assert designed["psnr_db"][2] > designed["psnr_db"][0] and designed["lost"][2] < 1.0  # the cliff
    assert adapted["mcs"][1:] == [choose_mcs(10).name, choose_mcs(25).name]  # the adapted MCS per SNR
    assert choose_mcs(25).efficiency > choose_mcs(10).efficiency
    assert capacity["payload_bits"][0] < capacity["payload_bits"][2]
    printed = capsys.readouterr().out
    assert f"24 fashion-mnist test images, k/n = 0.25 (196 channel uses), {channel}" in printed
    assert "JPEG + LDPC + QAM, designed for 12.5 dB" in printed and f"written: {out / 'digital_baseline.json'}" in printed


def test_a_runs_snr_sweep_carries_the_baseline_at_the_models_ratio(tiny_overrides, tmp_path):
    import json

    from semfl.config import load_config
    from semfl.runtimes.run import Runner

    sets = tiny_overrides + ["method=fedavg", "rounds=1", "eval.grid_images=0", "eval.snr_sweep=[0.0, 20.0]",
                             "eval.digital_baseline=true", "data.test_samples=40"]
    run_dir = tmp_path / "run"
    Runner(load_config(None, sets), run_dir, show_progress=False, log=lambda m: None).execute()
    models = json.loads((run_dir / "snr_sweep.json").read_text())["models"]
    assert list(models) == ["fedavg", "JPEG + LDPC + QAM, adapted", "JPEG + LDPC + QAM, designed for 12.5 dB",
                            "JPEG at capacity"]
    adapted = models["JPEG + LDPC + QAM, adapted"]
    assert adapted["channel_uses"] == [98, 98]  # the tiny CSC's own 98 symbols for 784 pixels (k/n = 1/8)
    assert adapted["lost"][0] == 1.0 and adapted["psnr_db"][1] > adapted["psnr_db"][0]
    assert set(models["fedavg"]) >= {"psnr_db", "accuracy", "ssim"} and set(adapted) >= {"psnr_db", "accuracy", "ssim"}
    report = (run_dir / "report.html").read_text()
    table = report[report.index("<h2>SNR sweep"):]
    assert all(label in table for label in models)  # the report's sweep table has every curve


@pytest.mark.parametrize("args, named", [
    (["digital", "--ratio", "0"], "--ratio: must be a finite number > 0"),
    (["digital", "--ratio", "inf"], "--ratio: must be a finite number > 0"),
    (["digital", "--ratio", "0.25", "--snr", "5", "inf"], "--snr inf: an SNR must be a finite"),
    (["digital", "--ratio", "0.25", "--snr", "nan"], "--snr nan: an SNR must be a finite"),
    (["digital", "--ratio", "0.25", "--design-snr", "nan"], "--design-snr nan: an SNR must be a finite"),
    (["bench", "--arch", "resnet"], "--arch resnet: not a semantic model; known: csc"),
    (["bench", "--also", "gsc-m", "gsc-xl"], "--also gsc-xl: not a semantic model"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1")])
def test_cli_names_a_bad_option_before_loading_anything(capsys, tmp_path, args, named):
    from semfl.cli import main

    assert main(["baseline", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fast_decoder_and_demapper_are_bitwise_sionnas():
    """The faster decoder and demapper (semfl.wireless.sionna_fast) give Sionna's exact outputs,
    and resuming the decoder from its state equals decoding with all iterations at once."""
    from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder
    from sionna.phy.mapping import Demapper

    from semfl.wireless import sionna_fast
    from semfl.wireless.sionna_fast import FastLDPC5GDecoder, demap_maxlog

    g = torch.Generator().manual_seed(0)
    for k, n, m in ((60, 196, 2), (294, 392, 4)):
        enc = LDPC5GEncoder(k, n, num_bits_per_symbol=m)
        ref = LDPC5GDecoder(enc, hard_out=True, num_iter=12, return_state=True)
        fast = FastLDPC5GDecoder(enc, hard_out=True, num_iter=12, return_state=True)
        c = enc(torch.randint(0, 2, (48, k), generator=g).float())
        for sigma in (0.5, 1.2):  # converging and failing blocks
            llr = (2 * c - 1) * 2 / sigma ** 2 + torch.randn(c.shape, generator=g) * 2 / sigma
            (xr, sr), (xf, sf) = ref(llr), fast(llr)
            assert torch.equal(xr, xf) and torch.equal(sr, sf)
            x4, s4 = fast(llr, num_iter=4)
            assert torch.equal(fast(llr, num_iter=8, msg_v2c=s4)[0], xf)
    from sionna.phy.fec.ldpc.decoding import cn_update_phi as sionna_cn, vn_update_sum as sionna_vn

    from semfl.wireless.sionna_fast import cn_update_phi, vn_update_sum

    mask = (torch.rand(7, 9, generator=g) < 0.6).float()
    msg = torch.randn(5, 7, 9, generator=g) * 12 * mask  # past the clipping, with padding and exact zeros
    msg[0, 0], llr = 0.0, torch.randn(5, 7, generator=g) * 30
    for clip in (None, 20.0):  # bit patterns equal, -0.0 included
        assert torch.equal(cn_update_phi(msg, mask, clip).view(torch.int32), sionna_cn(msg, mask, clip).view(torch.int32))
        ours, theirs = vn_update_sum(msg.clone(), mask, llr, clip), sionna_vn(msg, mask, llr, clip)
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(ours, theirs))
    for m in (2, 4, 6, 8):
        demapper = Demapper("maxlog", "qam", m)
        y = torch.complex(torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g))
        no = torch.rand(6, 50, generator=g) + 1e-3
        assert torch.equal(demap_maxlog(demapper, y, no), demapper(y, no))
        with pytest.MonkeyPatch.context() as patch:  # in chunks of 7 symbols, across the rows
            patch.setattr(sionna_fast, "DEMAP_SLOTS", 7 * 2 ** m)
            chunks, demap_flat = [], sionna_fast._demap_flat
            patch.setattr(sionna_fast, "_demap_flat", lambda *a: chunks.append(len(a[-2])) or demap_flat(*a))
            assert torch.equal(demap_maxlog(demapper, y, no), demapper(y, no))
            assert chunks == [7] * 42 + [6]  # 300 symbols


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_early_termination_stops_each_block_at_its_first_valid_codeword_with_sionnas_bits(monkeypatch, chunk_rows):
    """decode_until_valid == Sionna's own decoder run for t iterations, where t is the first
    iteration whose decision is a codeword (re-encoding its information bits gives its coded bits)
    and passes the CRC; blocks that never stop get Sionna's decision at the last iteration. With
    ``chunk_rows`` the blocks go through in chunks of 7, across the fast, slow and failing groups."""
    from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
    from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder

    from semfl.wireless import sionna_fast
    from semfl.wireless.sionna_fast import FastLDPC5GDecoder

    chunks = []
    if chunk_rows:
        decode_chunk = FastLDPC5GDecoder._decode_chunk
        monkeypatch.setattr(FastLDPC5GDecoder, "_decode_chunk",
                            lambda self, llr, *a: chunks.append(len(llr)) or decode_chunk(self, llr, *a))

    g, last = torch.Generator().manual_seed(1), 10
    for k, n, m in ((60, 196, 2), (294, 392, 4)):
        crc_enc = CRCEncoder("CRC16")
        crc_dec, enc = CRCDecoder(crc_enc), LDPC5GEncoder(k, n, num_bits_per_symbol=m)
        c = enc(crc_enc(torch.randint(0, 2, (90, k - 16), generator=g).float()))
        sigma = torch.tensor([0.6, 0.9, 1.3]).repeat_interleave(30).unsqueeze(1)  # fast, slow, failing
        llr = (2 * c - 1) * 2 / sigma ** 2 + torch.randn(c.shape, generator=g) * 2 / sigma
        dec = FastLDPC5GDecoder(enc, hard_out=True)
        if chunk_rows:
            monkeypatch.setattr(sionna_fast, "CHUNK_SLOTS", dec._vn_mask.numel() * chunk_rows)
        bits, ok = dec.decode_until_valid(llr, crc_dec, last)
        assert chunks == ([7] * 12 + [6] if chunk_rows else [])
        chunks.clear()
        want_bits, want_ok = torch.zeros_like(bits), torch.zeros_like(ok)
        stopped = torch.zeros(len(llr), dtype=torch.bool)
        for t in range(1, last + 1):
            info = LDPC5GDecoder(enc, hard_out=True, num_iter=t)(llr)
            word = LDPC5GDecoder(enc, hard_out=True, num_iter=t, return_infobits=False)(llr)
            payload, crc_ok = crc_dec(info)
            crc_ok = crc_ok.reshape(-1)
            stop = ~stopped & (crc_ok & (enc(info) == word).all(1) if t < last else True)
            want_bits[stop], want_ok[stop] = payload[stop], crc_ok[stop]
            stopped |= stop
        assert torch.equal(bits, want_bits) and torch.equal(ok, want_ok)
        assert 0 < int(ok.sum()) < len(ok)  # the case covers decoded and failed blocks


def test_codeword_check_accepts_a_codeword_and_rejects_one_flipped_bit():
    from sionna.phy.fec.ldpc import LDPC5GEncoder

    from semfl.wireless.sionna_fast import FastLDPC5GDecoder

    enc = LDPC5GEncoder(294, 392, num_bits_per_symbol=4)
    dec = FastLDPC5GDecoder(enc, hard_out=True)
    u = torch.randint(0, 2, (4, 294), generator=torch.Generator().manual_seed(2)).float()
    logits = 20.0 * (2 * enc(u) - 1)  # Sionna's logits: positive = bit 1
    logits[1, 7] *= -1  # one transmitted bit flipped
    llr = dec._mother_llrs(logits).clamp(-dec._llr_max, dec._llr_max) * -1.0  # positive = bit 0
    llr[:, :2 * enc.z] = 20.0 * (1 - 2 * u[:, :2 * enc.z])  # the punctured systematic bits, as BP settles them
    assert dec._codewords(llr).tolist() == [True, False, True, True]


def test_rows_not_needed_are_not_decoded_and_the_others_are_unchanged():
    mcs = MCS(4, 1 / 2)
    plan = digital.layout(98, mcs)
    bits = torch.randint(0, 2, (30, plan.payload_bits), generator=torch.Generator().manual_seed(5)).float()
    need = torch.arange(30) % 3 != 0
    seed_channels(6)
    full = digital.transmit(bits, plan, Channel("awgn"), 9.0)
    seed_channels(6)
    part = digital.transmit(bits, plan, Channel("awgn"), 9.0, need=need)
    assert torch.equal(part[0][need], full[0][need]) and torch.equal(part[1][need], full[1][need])
    assert not part[1][~need].any() and not part[0][~need].any()


def test_a_corrupt_stream_that_passes_the_crc_is_decoded_as_received_and_scored_apart():
    """A block whose errors slip past its CRC: the image is decoded from the bits received (not
    taken from the cache of its own payload), marked OTHER, and scored on its own; the cache of
    that quality still holds the genuine image's scores afterwards."""
    images = smooth_images(6)
    labels = torch.arange(6) % 10
    classifier = toy_classifier()
    enc, qi = separation.EncodedSet(images), 5
    genuine = [(qi, p) for p in enc.payloads(qi)]
    corrupt = bytearray(genuine[1][1])
    corrupt[len(corrupt) // 2] ^= 0x10  # one bit flipped in the entropy-coded data
    streams = genuine[:1] + [(qi, bytes(corrupt))] + genuine[2:]
    chosen, ok, fallback = np.full(6, qi), np.ones(6, dtype=bool), images.mean(0)
    recon, lost, source = separation._reconstruct(enc, chosen, streams, ok, fallback)
    assert lost == 0 and list(source) == [qi, separation.OTHER, qi, qi, qi, qi]
    assert not np.array_equal((recon[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), enc.own(qi, 1))
    assert np.array_equal((recon[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), enc.decoded(qi, bytes(corrupt)))
    scored = separation.quality(recon, images, labels, classifier, 500, enc, source)
    assert scored == separation.quality(recon, images, labels, classifier)
    clean, _, clean_source = separation._reconstruct(enc, chosen, genuine, ok, fallback)
    assert list(clean_source) == [qi] * 6  # the genuine image 1 was not cached as the corrupt one
    assert separation.quality(clean, images, labels, classifier, 500, enc, clean_source) == \
        separation.quality(clean, images, labels, classifier)


def test_cached_scores_equal_scoring_each_reconstruction_directly():
    """quality() with the images' sources (cached SSIM and classifier verdicts) equals quality() on
    the reconstructions alone, also the second time, when every score comes from the cache."""
    images = smooth_images(24)
    labels = torch.arange(24) % 10
    classifier = toy_classifier()
    enc = separation.EncodedSet(images)
    for snr in (10.0, 30.0, 10.0):  # some lost (fallback) at 10 dB, none at 30 dB; then all cached
        seed_channels(7)
        recon, info, source = separation.send_digital(enc, 196, MCS(4, 3 / 4), Channel("awgn"), snr, images.mean(0),
                                                      with_source=True)
        assert 0 < info["lost"] < 1 if snr == 10.0 else info["lost"] == 0  # a mix of fallbacks and decoded images
        assert separation.quality(recon, images, labels, classifier, 500, enc, source) == \
            separation.quality(recon, images, labels, classifier)
    recon, _, source = separation.send_at_capacity(enc, 98, Channel("awgn"), 12.0, images.mean(0), with_source=True)
    assert separation.quality(recon, images, labels, classifier, 7, enc, source) == \
        separation.quality(recon, images, labels, classifier)
