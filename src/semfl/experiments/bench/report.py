"""The Markdown table of a ``semfl bench`` result (``bench-<device>.md``): one section per part."""
from __future__ import annotations

from semfl.experiments.bench.timing import table


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# semfl bench ({m['device']}{', quick' if result['quick'] else ''})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"device {m['device']}; load average at start {m['load_avg'][0]:.2f}, at end "
             f"{result.get('load_avg_end', [0])[0]:.2f}; {m['time_utc']}.", ""]
    if result.get("smoke"):
        from semfl.experiments.bench_smoke import markdown_lines as smoke_lines

        lines += smoke_lines(result["smoke"])
    if result.get("overhead"):
        nan = float("nan")
        lines += table("Overhead ratio (engine ÷ plain loop, same forward/backward work)",
                       ["method", "users", "rounds", "samples/user", "repeats", "plain, median (s)", "engine, median (s)",
                        "ratio of medians", "ratio of minima", "ratio of CPU time"],
                       [f"| {o['method']} | {o['users']} | {o['rounds']} | {o['samples_per_user']} | {o.get('repeats', '')} | "
                        f"{o['plain_median_s']:.2f} | {o['engine_median_s']:.2f} | {o['overhead_ratio']:.3f} | "
                        f"{o.get('overhead_ratio_min', nan):.3f} | **{o.get('overhead_ratio_cpu', nan):.3f}** |"
                        for o in result["overhead"]])
        lines += ["", "Wall-clock ratios swing with other processes' load; the CPU-time ratio (this process's "
                  "CPU seconds) is the steadier estimate on a shared machine."]
        lines.append("")
    if result.get("flower"):
        points = result["flower"].get("points") or [{"samples_per_user": "", "batches_per_user": "",
                                                     **result["flower"]}]  # an older single-point result
        flwr_version = points[0]["flower"].get("flwr", "")
        rows = []
        for f in points:
            cores = f.get("cores", 1)
            parallelism = f.get("semfl_parallelism", "threads" if cores > 1 else "")  # older results: threads
            uses = {"threads": f"{cores} threads", "workers": f"{cores} workers"}.get(parallelism, "1 thread")
            rows.append(f"| {f['samples_per_user']} | {f['batches_per_user']} | {cores} | {uses} | "
                        f"{f['flower']['process_s']:.2f} | "
                        f"{f['semfl']['process_s']:.2f} | **{f['speedup_end_to_end']:.1f}×** | "
                        f"{f['flower']['steady_round_s']:.2f} | {f['semfl']['round_s']:.2f} | "
                        f"**{f['speedup_per_round']:.1f}×** | {_fmt(f['flower'].get('fit_s_median'), '.3f')} |")
        lines += table(f"semfl vs Flower {flwr_version} simulation (same FedAvg workload)",
                       ["samples/user", "batches/user/round", "cores per engine", "semfl uses", "Flower end to end (s)",
                        "semfl end to end (s)", "**speed-up end to end**", "Flower round (s)", "semfl round (s)",
                        "**speed-up per round**", "Flower client fit (s)"], rows) + [""]
    if result.get("scaling"):
        lines += table("Scaling (FedAvg, fixed data per user)",
                       ["users", "round (s)", "round / user (s)", "RSS before rounds (MB)", "peak RSS in rounds (MB)",
                        "growth in rounds (MB)", "users' data (MB)"],
                       [f"| {s['users']} | {s['round_s']:.2f} | {s['round_s_per_user']:.3f} | {s['rss_before_rounds_mb']:.0f} | "
                        f"{s['peak_rss_rounds_mb']:.0f} | {s['rss_growth_rounds_mb']:.1f} | {s['user_data_mb']:.1f} |"
                        for s in result["scaling"]]) + [""]
    if result.get("scaling_psfl"):
        lines += table("Scaling with per-user state (PSFL: a mentor and its optimiser per user)",
                       ["users", "state cap (MB)", "round (s)", "round / user (s)", "RSS before rounds (MB)",
                        "peak RSS in rounds (MB)", "growth in rounds (MB)"],
                       [f"| {s['users']} | {s['state_memory_mb'] or 'none'} | {s['round_s']:.2f} | {s['round_s_per_user']:.3f} | "
                        f"{s['rss_before_rounds_mb']:.0f} | {s['peak_rss_rounds_mb']:.0f} | {s['rss_growth_rounds_mb']:.1f} |"
                        for s in result["scaling_psfl"]]) + [""]
    if result.get("vmap"):
        v = result["vmap"]
        lines += table("Batched users (torch.func.vmap), FedAvg", ["train.vmap", "rounds (s)", "per round (s)"],
                       [f"| off | {v['off']['median_s']:.2f} | {v['off']['round_s']:.2f} |",
                        f"| on | {v['on']['median_s']:.2f} | {v['on']['round_s']:.2f} |",
                        f"| speed-up on/off | {v['speedup_on_vs_off']:.2f}× | |"]) + [""]
    if result.get("precision"):
        lines += table("Training precision (train.precision: fp32 vs bf16 autocast)",
                       ["method", "fp32 rounds (s)", "bf16 rounds (s)", "**speed-up bf16/fp32**"],
                       [f"| {c['method']} | {c['fp32']['median_s']:.2f} | {c['bf16']['median_s']:.2f} | "
                        f"**{c['speedup_bf16_vs_fp32']:.2f}×** |" for c in result["precision"]])
        losses = result["precision"][0].get("epoch_losses")
        if losses:
            lines += ["", "FedAvg, user 0 from the same start, training loss per local epoch: fp32 "
                      + ", ".join(f"{v:.4f}" for v in losses["fp32"]) + "; bf16 "
                      + ", ".join(f"{v:.4f}" for v in losses["bf16"])
                      + f" (largest relative gap {result['precision'][0]['max_relative_loss_gap']:.2%})."]
        lines.append("")
    if result.get("workers"):
        cores = result["workers"][0]["cores"]
        labels = list(result["workers"][0]["settings"])
        lines += table(f"Every core: intra-op threads vs one worker process per core (engine.workers), {cores} cores",
                       ["method", *(f"{k}: rounds (s)" for k in labels), "threads speed-up", "workers speed-up",
                        "**workers ÷ threads**"],
                       [f"| {w['method']} | " + " | ".join(f"{w['settings'][k]['median_s']:.2f}" for k in labels)
                        + f" | {w['speedup_threads']:.2f}× | {w['speedup_workers']:.2f}× | "
                          f"**{w['speedup_workers_vs_threads']:.2f}×** |" for w in result["workers"]]) + [""]
    if result.get("compute"):
        from semfl.experiments.bench.compute import markdown_lines

        lines += markdown_lines(result)
    if result.get("measured"):
        lines += ["Load average (1 min) when each part started / ended: " + "; ".join(
            f"{k} {v['load_avg_start'][0]:.2f} / {v.get('load_avg_end', [float('nan')])[0]:.2f} ({v['time_utc']})"
            for k, v in result["measured"].items()) + ".", ""]
    if result.get("errors"):
        lines += ["## Not measured", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()] + [""]
    return "\n".join(lines)
