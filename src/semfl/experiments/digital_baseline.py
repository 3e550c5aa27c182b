"""``semfl baseline digital`` and ``semfl baseline bench``: the separation baseline on its own.

``digital`` evaluates "JPEG + LDPC + QAM" (adapted and fixed design) and "JPEG at capacity" on a
dataset's evaluation subset (``data.test_samples``, the runs' own subset and frozen classifier) at
the given SNRs and k/n, prints a table and writes ``<out>/digital_baseline.json`` and
``snr_sweep.png``. ``bench`` times that sweep against a learned model's own SNR sweep
(``methods.common.snr_sweep``: the same test images, SNRs and classifier) on the same machine,
side by side, and reports the ratio (and each curve's sweep alone, from scratch, against the same learned
sweep, where the full sweep's time goes: link, source codec, scoring, and the floor that saving
work cannot go below, see :func:`_floor`); the model's weights do not change its cost, so it is
untrained.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from semfl.config import ConfigError, load_config


def _check(args) -> None:
    """The options' values, before anything is loaded or written (one line naming the option)."""
    import math

    bad = [f"--snr {snr}" for snr in args.snr if not math.isfinite(snr)]
    if args.design_snr is not None and not math.isfinite(args.design_snr):
        bad.append(f"--design-snr {args.design_snr}")
    if bad:
        raise ConfigError(f"{', '.join(bad)}: an SNR must be a finite number of dB")
    ratio = getattr(args, "ratio", 1.0)
    if not (math.isfinite(ratio) and ratio > 0):
        raise ConfigError(f"--ratio: must be a finite number > 0 (complex channel uses per source value), got {ratio}")
    if getattr(args, "repeats", 1) < 1:
        raise ConfigError(f"--repeats: must be at least 1, got {args.repeats}")
    archs = [("--arch", args.arch)] if hasattr(args, "arch") else []
    archs += [("--also", arch) for arch in getattr(args, "also", [])]
    if archs:
        from semfl.models.registry import available_archs

        known = available_archs()
        for option, arch in archs:
            if arch not in known:
                raise ConfigError(f"{option} {arch}: not a semantic model; known: {', '.join(known)}")


def _context(args, extra: list[str]):
    from semfl.runtimes.run import build_context

    sets = list(args.set) + [f"dataset={args.dataset}", f"scale={args.scale}", f"device={args.device}",
                             f"data.test_samples={args.samples}", "users=1", "data.partition=iid"] + extra
    cfg = load_config(None, sets)
    return build_context(cfg, None, log=lambda line: None, with_user_data=False)[0]


def _design(args, run) -> float:
    if args.design_snr is not None:
        return args.design_snr
    return (run.cfg.link.snr_min_db + run.cfg.link.snr_max_db) / 2


def cmd_digital(args) -> int:
    from semfl.report import plots
    from semfl.files import atomic_text
    from semfl.wireless import separation

    _check(args)
    run = _context(args, [])
    start = time.perf_counter()
    curves = separation.sweep(run.test_x, run.test_y, run.classifier, args.ratio, args.snr, kind=args.channel,
                              design_snr=_design(args, run), codec=args.codec, seed=run.cfg.seed,
                              fallback=run.data.train_x.mean(0).to(run.test_x.device))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    atomic_text(out / "digital_baseline.json", json.dumps(
        {"dataset": args.dataset, "ratio": args.ratio, "channel": args.channel, "snr_db": args.snr,
         "test_samples": len(run.test_x), "seconds": seconds, "curves": curves}, indent=1))
    plots.snr_sweep(curves, args.snr, out / "snr_sweep.png", dotted=set(curves))
    print(f"{len(run.test_x)} {args.dataset} test images, k/n = {args.ratio:g} "
          f"({curves[next(iter(curves))]['channel_uses'][0]} channel uses), {args.channel}, {seconds:.1f} s")
    for label, values in curves.items():
        print(label)
        for i, snr in enumerate(args.snr):
            mcs = values.get("mcs", [None] * len(args.snr))[i]
            print(f"  {snr:5.1f} dB  PSNR {values['psnr_db'][i]:5.2f}  SSIM {values['ssim'][i]:.3f}  "
                  f"acc {values['accuracy'][i]:.3f}  lost {values['lost'][i]:.3f}  bits {values['bits_per_image'][i]:7.1f}"
                  f" (with headers {values['bits_with_headers'][i]:7.1f})" + (f"  {mcs}" if mcs else ""))
    print(f"written: {out / 'digital_baseline.json'}, {out / 'snr_sweep.png'}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from semfl.methods.common import build_semantic_model, channel_uses_ratio, snr_sweep
    from semfl.files import atomic_text
    from semfl.wireless import separation

    _check(args)
    run = _context(args, [f"eval.snr_sweep={json.dumps(args.snr)}", f"model.arch={args.arch}"])
    torch.manual_seed(0)
    model = build_semantic_model(run, args.arch)
    ratio = channel_uses_ratio(model, run.test_x)
    others = {arch: build_semantic_model(run, arch) for arch in args.also}  # timed beside it, e.g. PSFL's mentors
    rows = []
    design, codec = _design(args, run), run.cfg.eval.digital_codec
    sweep = functools.partial(separation.sweep, run.test_x, run.test_y, run.classifier, ratio, design_snr=design,
                              codec=codec, seed=run.cfg.seed, batch_size=run.cfg.eval.batch_size)
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        t0 = time.perf_counter()
        snr_sweep(run, {args.arch: model})
        t1 = time.perf_counter()
        stages = {}
        curves = sweep(args.snr, timings=stages)
        row = {"learned_s": t1 - t0, "digital_s": time.perf_counter() - t1,
               **{f"digital_{stage}_s": stages[stage] for stage in separation.STAGES}}
        for arch, other in others.items():
            t = time.perf_counter()
            snr_sweep(run, {arch: other})
            row[f"learned_{arch}_s"] = time.perf_counter() - t
        for mode in separation.MODES:  # each curve alone, from scratch (no codec cache shared)
            t = time.perf_counter()
            sweep(args.snr, modes=(mode,))
            row[f"{mode}_alone_s"] = time.perf_counter() - t
        row.update(_floor(sweep, curves[separation.curve_labels(codec, design)["designed"]], args.snr,
                          stages["scoring"]))
        rows.append(row)

    def median(key):
        return sorted(r[key] for r in rows)[len(rows) // 2]

    learned, digital = median("learned_s"), median("digital_s")
    alone = {mode: median(f"{mode}_alone_s") for mode in separation.MODES}
    stages = {stage: median(f"digital_{stage}_s") for stage in separation.STAGES}
    floor = median("floor_s")
    also = {arch: median(f"learned_{arch}_s") for arch in others}
    result = {"dataset": args.dataset, "arch": args.arch, "scale": args.scale, "device": args.device,
              "test_samples": len(run.test_x), "snr_db": args.snr, "ratio": ratio, "repeats": rows,
              "learned_sweep_s": learned, "digital_sweep_s": digital, "digital_over_learned": digital / learned,
              "curve_alone_over_learned": {mode: t / learned for mode, t in alone.items()},
              "digital_stage_s": stages, "digital_stage_over_learned": {k: t / learned for k, t in stages.items()},
              "undecodable_snr_db": rows[-1]["undecodable_snr_db"], "floor_s": floor, "floor_over_learned": floor / learned,
              "also": {arch: {"ratio": channel_uses_ratio(other, run.test_x), "learned_sweep_s": also[arch],
                              "digital_over_learned": digital / also[arch]} for arch, other in others.items()},
              "torch_threads": torch.get_num_threads(), "load_avg_1min_at_end": os.getloadavg()[0],
              "cpu_count": os.cpu_count()}
    if others:  # a run's report sweeps all its models (PSFL: the student and its mentors) and the baseline once
        together = learned + sum(also.values())
        result.update(all_learned_sweep_s=together, digital_over_all_learned=digital / together)
    atomic_text(Path(args.out) / f"digital-bench-{args.device}.json", json.dumps(result, indent=1))
    print(f"{len(run.test_x)} images x {len(args.snr)} SNRs, {args.arch} ({args.scale}, k/n={ratio:.3g}) on {args.device}: "
          f"learned sweep {learned:.1f} s, digital baseline (3 curves) {digital:.1f} s, ratio {digital / learned:.1f}x")
    for arch, entry in result["also"].items():
        print(f"beside {arch} (k/n={entry['ratio']:.3g}): its learned sweep {entry['learned_sweep_s']:.1f} s, "
              f"ratio {entry['digital_over_learned']:.1f}x")
    if others:
        print(f"beside all {1 + len(others)} learned sweeps together ({result['all_learned_sweep_s']:.1f} s, as in a "
              f"report that sweeps them all): ratio {result['digital_over_all_learned']:.2f}x")
    print("each curve alone: " + ", ".join(f"{mode} {t:.1f} s ({t / learned:.1f}x)" for mode, t in alone.items()))
    print("the digital sweep's stages: " + ", ".join(f"{stage} {t:.1f} s ({t / learned:.2f}x)" for stage, t in stages.items())
          + " (link: CRC, LDPC, QAM, channel, demapping, decoding; codec: JPEG choice, coding, bitstream;"
          " scoring: PSNR, SSIM, classifier)")
    print(f"its floor without faster kernels: {floor:.1f} s ({floor / learned:.1f}x): the scoring, and the fixed design's"
          f" link at {', '.join(f'{snr:g}' for snr in rows[-1]['undecodable_snr_db']) or 'no'} dB, where no image"
          " decodes (every block runs all its BP iterations to find that it fails)")
    return 0


def _floor(sweep, designed: dict, snrs: list[float], scoring_s: float) -> dict:
    """The sweep's work that no saving of work can remove: scoring each distinct reconstruction
    (with the learned sweep's own metric code, once per image and quality), plus the fixed design's
    link at the SNRs where it loses every image (no block stops early: each runs all its BP
    iterations before its CRC fails). Only faster kernels (a GPU) or a decoder that gives other
    results go below it. That link is timed by sweeping the designed curve alone at those SNRs
    (the same seeded draws as in the full sweep)."""
    undecodable = [snr for snr, lost in zip(snrs, designed["lost"]) if lost == 1.0]
    link = {}
    if undecodable:
        sweep(undecodable, modes=("designed",), timings=link)
    return {"undecodable_snr_db": undecodable, "undecodable_link_s": link.get("link", 0.0),
            "floor_s": scoring_s + link.get("link", 0.0)}


def register(sub) -> None:
    p = sub.add_parser("baseline", help="classical baselines: the separation (JPEG + 5G LDPC + QAM) scheme")
    kinds = p.add_subparsers(dest="baseline", required=True)
    for name, func, help_ in (("digital", cmd_digital, "the digital baseline's SNR sweep on a dataset"),
                              ("bench", cmd_bench, "time the digital baseline's sweep against a learned model's")):
        q = kinds.add_parser(name, help=help_)
        q.add_argument("--dataset", default="fashion-mnist", help="dataset whose test images are sent")
        q.add_argument("--snr", type=float, nargs="+", default=[0.0, 5.0, 10.0, 15.0, 20.0, 25.0], help="SNRs (dB)")
        q.add_argument("--design-snr", type=float, help="SNR of the fixed design (default: middle of the link range)")
        q.add_argument("--samples", type=int, default=2000, help="test images (the runs' data.test_samples)")
        q.add_argument("--scale", choices=["tiny", "cpu", "paper"], default="cpu", help="the frozen classifier's")
        q.add_argument("--device", default="cpu", help="cpu or cuda (the LDPC decoder runs there)")
        q.add_argument("--out", default="runs/digital-baseline", help="folder for the JSON and figure")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
        q.set_defaults(func=func)
        if name == "digital":
            q.add_argument("--ratio", type=float, required=True, help="k/n: complex channel uses per source value")
            q.add_argument("--channel", choices=["awgn", "rayleigh"], default="awgn", help="channel kind")
            q.add_argument("--codec", choices=["jpeg", "webp"], default="jpeg", help="source codec")
        else:
            q.add_argument("--arch", default="csc", help="the learned model timed beside it (its k/n is the baseline's)")
            q.add_argument("--also", nargs="+", default=[], metavar="ARCH",
                           help="more learned models whose sweeps are timed beside it, e.g. PSFL's mentors: gsc-m gsc-l gsc-h")
            q.add_argument("--repeats", type=int, default=3, help="repeats of each timed sweep (median reported)")
