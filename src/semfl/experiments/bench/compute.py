"""``semfl bench --only compute``: how close one local training step is to the hardware.

The Flower comparison is bounded by the clients' compute, which both engines share (see
BENCHMARKS.md). This part measures that compute on its own: one local step of the benchmark
workload (forward through the channel, loss, backward, SGD step on one batch), its floating-point
operations counted by ``torch.utils.flop_counter``, its time, the share of that time spent in
convolution kernels (torch.profiler), and — as the machine's reference — the speed of a large
single-precision matrix product on the same threads and device.
"""
from __future__ import annotations

import statistics
import time

from semfl.experiments.bench.timing import sync, table

GEMM_SIZE = 2048  # square fp32 matmul: the best case for these cores' vector units


def local_step(model, opt, images, labels, snr_db: float, cfg, run) -> None:
    """One FedAvg local step of the plain loop: ``local_train``'s step without its bookkeeping (the
    CSC has no auxiliary loss, and the benchmark does not clip gradients)."""
    from semfl.training import autocast, reconstruction_loss, snr_tensor

    with autocast(cfg.train.precision, images.device):
        out = model(images, snr_tensor(snr_db, len(images), images.device))
        loss, _ = reconstruction_loss(out.recon, images, labels, run.classifier, cfg.train.task_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def fresh_step(cfg, run, images, labels, snr_db: float, memory_format=None, compiled: bool = False):
    """(model, step): a new semantic model and optimiser, and one local step of them on this batch."""
    import torch

    from semfl.methods.common import build_semantic_model
    from semfl.training import make_optimizer

    memory_format = memory_format or torch.contiguous_format
    model = build_semantic_model(run, cfg.model.arch).to(memory_format=memory_format)
    model.train()
    opt = make_optimizer(model.parameters(), cfg.train)
    forward = torch.compile(model) if compiled else model
    batch = images.contiguous(memory_format=memory_format)
    return model, lambda: local_step(forward, opt, batch, labels, snr_db, cfg, run)


def gemm_gflops(device, repeats: int = 5) -> float:
    """Best of ``repeats`` fp32 GEMMs of GEMM_SIZE², in GFLOP/s."""
    import torch

    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * GEMM_SIZE ** 3 / best / 1e9


def _median_step_s(step, device, steps: int, blocks: int) -> float:
    for _ in range(3):  # warm-up: allocator, kernel selection (and compilation)
        step()
    block_s = []
    for _ in range(blocks):
        sync(device)
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        block_s.append((time.perf_counter() - tic) / steps)
    return statistics.median(block_s)


def compute_profile(cfg, run, user_data, steps: int = 10, blocks: int = 5, variants: bool = True) -> dict:
    """FLOPs, time and convolution share of one local step of ``cfg``'s workload on user 0's
    first batch; the GEMM reference on the same device; and (``variants``) the same step with
    the model and images in channels_last memory format and with the model ``torch.compile``d,
    the two generic ways to make the same arithmetic faster."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    x, y = user_data[0]
    images, labels = x[:cfg.train.batch_size], y[:cfg.train.batch_size]
    snr = run.link.snr_db(1, 0)

    model, step = fresh_step(cfg, run, images, labels, snr)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    step_s = _median_step_s(step, run.device, steps, blocks)
    on_gpu = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    # the kernels' own time: CPU time on a CPU, the GPU's time on a GPU (CPU time there is launches)
    kernel_time = (lambda e: getattr(e, "self_device_time_total", 0)) if on_gpu else (lambda e: e.self_cpu_time_total)
    events = prof.key_averages()
    total = sum(kernel_time(e) for e in events)
    conv = sum(kernel_time(e) for e in events if "conv" in e.key.lower())
    gemm = gemm_gflops(run.device)
    achieved = flops / step_s / 1e9
    out = {"batch_size": len(images), "parameters": sum(p.numel() for p in model.parameters()),
           "flops_per_step": flops, "step_s": step_s, "gflops": achieved,
           "conv_time_share": conv / total if total else None, "gemm_size": GEMM_SIZE,
           "gemm_gflops": gemm, "fraction_of_gemm": achieved / gemm, "threads": torch.get_num_threads()}
    out["user_batching"] = user_batching(cfg, run, user_data, snr, steps=max(2, steps // 2), blocks=3)
    if variants:
        out["variants"] = {}
        for name, kwargs in (("channels_last", {"memory_format": torch.channels_last}), ("torch.compile", {"compiled": True})):
            tic = time.perf_counter()
            variant_s = _median_step_s(fresh_step(cfg, run, images, labels, snr, **kwargs)[1], run.device, steps, blocks)
            out["variants"][name] = {"step_s": variant_s, "speedup": step_s / variant_s,
                                     "with_warmup_s": time.perf_counter() - tic}
    return out


def user_batching(cfg, run, user_data, snr: float, steps: int, blocks: int) -> list[dict]:
    """The step on the first batches of k users concatenated into one batch of k·B, for k = 1, 3
    and every user, as time per B samples.

    This is the best case for any engine that trains users together (vmap turns their different
    weights into grouped convolutions, which cannot beat one model on the same images): how much
    faster per sample the same work gets when the kernels see a larger batch."""
    import torch

    batch = cfg.train.batch_size
    rows = []
    for k in sorted({1, min(3, len(user_data)), len(user_data)}):
        images = torch.cat([user_data[u][0][:batch] for u in range(k)])
        labels = torch.cat([user_data[u][1][:batch] for u in range(k)])
        step_s = _median_step_s(fresh_step(cfg, run, images, labels, snr)[1], run.device, steps, blocks)
        rows.append({"users": k, "batch_size": len(images), "step_s": step_s, "per_batch_s": step_s * batch / len(images)})
    for row in rows:
        row["speedup_per_sample"] = rows[0]["per_batch_s"] / row["per_batch_s"]
    return rows


def five_x_requirement(compute: dict, flower_point: dict) -> dict:
    """What a 5× speed-up over Flower at this Flower point would need from one local step.

    Two readings. *semfl alone faster* (e.g. batching users, which a Flower client cannot do):
    semfl's round must be Flower's round ÷ 5. *Both faster* (a faster model or kernels, which
    Flower's clients would use too): Flower keeps its per-client engine cost, so the step must
    shrink until (fit + cost) ÷ fit = 5."""
    batches, users = flower_point["batches_per_user"], flower_point["flower"]["users"]
    flower_round = flower_point["flower"]["steady_round_s"]
    fit = flower_point["flower"].get("fit_s_median")
    out = {"batches_per_user": batches, "semfl_alone_step_s": flower_round / 5 / users / batches}
    if fit:
        engine_cost = flower_round / users - fit  # Flower's time per client beyond its fit
        out["both_step_s"] = engine_cost / 4 / batches
    for key in ("semfl_alone", "both"):
        if f"{key}_step_s" in out:
            out[f"{key}_speedup_needed"] = compute["step_s"] / out[f"{key}_step_s"]
            out[f"{key}_fraction_of_gemm"] = compute["flops_per_step"] / out[f"{key}_step_s"] / 1e9 / compute["gemm_gflops"]
    return out


def markdown_lines(result: dict) -> list[str]:
    c = result["compute"]
    share = "" if c.get("conv_time_share") is None else f"{c['conv_time_share']:.0%}"
    lines = table("Compute of one local step (the part both engines share)",
                  ["batch", "parameters", "GFLOP per step", "step (ms)", "achieved GFLOP/s", "share of time in convolutions",
                   f"fp32 GEMM {c['gemm_size']}² (GFLOP/s)", "**achieved ÷ GEMM**"],
                  [f"| {c['batch_size']} | {c['parameters']:,} | {c['flops_per_step'] / 1e9:.2f} | {c['step_s'] * 1e3:.1f} | "
                   f"{c['gflops']:.1f} | {share} | {c['gemm_gflops']:.1f} | **{c['fraction_of_gemm']:.0%}** |"]) + [""]
    if c.get("variants"):
        lines += ["The same step made faster without changing its arithmetic: " + "; ".join(
            f"{name} {v['step_s'] * 1e3:.1f} ms (**{v['speedup']:.2f}×**)" for name, v in c["variants"].items()) + ".", ""]
    if c.get("user_batching"):
        lines += table("One step on several users' batches at once (the best case for training users together)",
                       ["users", "batch", "step (ms)", f"time per {c['batch_size']} samples (ms)", "**speed-up per sample**"],
                       [f"| {r['users']} | {r['batch_size']} | {r['step_s'] * 1e3:.1f} | {r['per_batch_s'] * 1e3:.1f} | "
                        f"**{r['speedup_per_sample']:.2f}×** |" for r in c["user_batching"]]) + [""]
    points = (result.get("flower") or {}).get("points") or []
    single = [p for p in points if p.get("cores", 1) == 1 and p.get("batches_per_user", 0) >= 8]
    if single:
        need = five_x_requirement(c, single[-1])
        lines += [f"5× over Flower at {need['batches_per_user']} batches per client-round would need one step at "
                  f"≤ {need['semfl_alone_step_s'] * 1e3:.1f} ms if only semfl's step got faster "
                  f"({need['semfl_alone_speedup_needed']:.2f}× the measured step, "
                  f"{need['semfl_alone_fraction_of_gemm']:.0%} of the GEMM rate)"
                  + (f", or ≤ {need['both_step_s'] * 1e3:.1f} ms if Flower's clients got the same faster step "
                     f"({need['both_speedup_needed']:.2f}×, {need['both_fraction_of_gemm']:.0%} of the GEMM rate)"
                     if "both_step_s" in need else "") + "."
                  + (f" Training all {c['user_batching'][-1]['users']} users as one batch would make a step at best "
                     f"{c['user_batching'][-1]['speedup_per_sample']:.2f}× faster per sample (the table above)."
                     if c.get("user_batching") else ""), ""]
    return lines

