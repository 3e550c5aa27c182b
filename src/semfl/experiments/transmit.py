"""`semfl transmit` and `semfl export`: send images through a run's trained model; ship it.

    semfl transmit RUN_DIR IMAGES... --snr 0,5,10 [--channel awgn|rayleigh] [--model global] [--out DIR]
    semfl transmit RUN_DIR --test 8 --snr 0,10,20
    semfl export RUN_DIR --out DIR [--model global]

transmit writes ``transmit.png`` (originals, then one row of reconstructions per SNR with PSNR /
SSIM captions) and ``transmit.json`` (every number). Heavy imports happen inside the commands.
"""
from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_FORMATS = ("PNG", "JPEG")


def snr_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated SNRs in dB such as 0,5,10, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one SNR")
    return values


def read_images(paths: list[str], shape: tuple[int, int, int]):
    """PNG/JPEG files -> (N, C, H, W) float tensor in [0, 1] of the model's shape, and notes on what
    was changed to get there (centre crop to the model's aspect ratio, resize, colour conversion)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from semfl.runtimes.run import RunError

    channels, height, width = shape
    images, notes = [], []
    for name in paths:
        path = Path(name)
        try:
            with Image.open(path) as handle:
                kind = handle.format
                image = handle.copy()
        except FileNotFoundError:
            raise RunError(f"IMAGES: {path} does not exist") from None
        except (UnidentifiedImageError, OSError):
            raise RunError(f"IMAGES: {path} is not an image (expected PNG or JPEG)") from None
        if kind not in IMAGE_FORMATS:
            raise RunError(f"IMAGES: {path} is a {kind} image; expected PNG or JPEG")
        w, h = image.size
        if w < width or h < height:
            raise RunError(f"IMAGES: {path} is {w}x{h}, smaller than the model's {width}x{height} input "
                           "(enlarging would invent the detail the model is meant to carry)")
        mode = "L" if channels == 1 else "RGB"
        if image.mode != mode:
            notes.append(f"{path.name}: converted {image.mode} -> {mode}")
            image = image.convert(mode)
        target = width / height
        if abs(w / h - target) > 1e-6:  # centre crop to the model's aspect ratio, then resize
            cw, ch = (round(h * target), h) if w / h > target else (w, round(w / target))
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
            notes.append(f"{path.name}: centre-cropped {w}x{h} -> {cw}x{ch}")
            w, h = cw, ch
        if (w, h) != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
            notes.append(f"{path.name}: resized {w}x{h} -> {width}x{height} (Lanczos)")
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        images.append(torch.from_numpy(np.ascontiguousarray(array)))
    return torch.stack(images), notes


def cmd_transmit(args) -> int:
    import json

    from semfl.experiments.codec import load
    from semfl.report import plots
    from semfl.files import atomic_text
    from semfl.runtimes.run import RunError

    if bool(args.images) == bool(args.test):
        raise RunError("transmit: give IMAGES or --test N (not both)")
    codec = load(args.run_dir, args.model, args.round, device=args.device, node_state_dir=args.node_state_dir)
    notes = []
    if args.test:
        if args.test < 1:
            raise RunError(f"--test: must be >= 1, got {args.test}")
        images, labels = codec.test_images(args.test)
        names = [f"test[{i}]" for i in range(len(images))]
    else:
        images, notes = read_images(args.images, codec.input_shape)
        labels, names = None, [str(p) for p in args.images]
    for note in notes:
        print(f"note: {note}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "transmit"
    channel = args.channel or codec.cfg.channel.kind
    results, rows = [], []
    from semfl.progress import bar

    with bar("transmit", total=len(args.snr), unit="SNRs") as progress:
        for snr in args.snr:
            t = codec.transmit(images, snr, kind=channel, labels=labels, seed=args.seed)
            results.append(t)
            if t.kind == "images":
                captions = [f"{p:.1f}dB/{s:.3f}" for p, s in zip(t.psnr_db.clamp(max=100).tolist(), t.ssim.tolist())]
                rows.append((f"{snr:g} dB", t.reconstruction, captions))
            progress.advance()
    if results[0].note:
        print(f"note: {results[0].note}")
    for t in results:
        quality = (f"PSNR {t.mean_psnr_db:.2f} dB  SSIM {t.mean_ssim:.4f}" if t.kind == "images"
                   else f"predictions {t.predictions.tolist()}")
        accuracy = "" if t.accuracy is None else f"  accuracy {t.accuracy:.3f}"
        print(f"{channel} {t.snr_db:g} dB: {quality}{accuracy}")
    report = {"run_dir": str(args.run_dir), "method": codec.cfg.method, "model": codec.name, "round": codec.round,
              "channel": channel, "channel_uses_per_pixel": codec.channel_uses_per_pixel, "images": names,
              "notes": notes, "results": [t.to_dict() for t in results]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_text(out / "transmit.json", json.dumps(report, indent=1))
    print(f"numbers: {out / 'transmit.json'}")
    if rows:
        plots.image_grid(images, rows, out / "transmit.png")
        print(f"grid: {out / 'transmit.png'}")
    return 0


def cmd_export(args) -> int:
    from semfl.experiments.codec import load
    from semfl.experiments.export import export_codec

    codec = load(args.run_dir, args.model, args.round)
    paths = export_codec(codec, args.out)
    print(f"{codec.cfg.method} {codec.name} (round {codec.round}): encoder {paths['encoder']}, "
          f"decoder {paths['decoder']}, card {paths['card']}")
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (semfl run, sweep point or Flower deployment)")
    parser.add_argument("--model", help="global (default), user:K, mentor:K, pair:I-J ... (the run's models)")
    parser.add_argument("--round", type=int, help="a round with a checkpoint (default: the last)")


def register(sub) -> None:
    p = sub.add_parser("transmit", help="send images through a run's trained model at given SNRs")
    _model_arguments(p)
    p.add_argument("images", nargs="*", help="PNG or JPEG files (resized/converted to the model's input)")
    p.add_argument("--test", type=int, default=0, metavar="N", help="the first N images of the run's test set")
    p.add_argument("--snr", type=snr_list, default=[0.0, 10.0, 20.0], help="SNRs in dB, comma-separated")
    p.add_argument("--channel", choices=["awgn", "rayleigh"], help="default: the run's channel")
    p.add_argument("--out", help="folder for transmit.png and transmit.json (default RUN_DIR/transmit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the channel's noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--node-state-dir", help="a Flower deployment's node state-dir (for user models)")
    p.set_defaults(func=cmd_transmit)

    e = sub.add_parser("export", help="export a run's encoder and decoder as torch.export programs")
    _model_arguments(e)
    e.add_argument("--out", required=True, help="folder for encoder.pt2, decoder.pt2 and card.json")
    e.set_defaults(func=cmd_export)
