"""``semfl bench``: how much the engine costs on top of the training it does.

Measures (each result records the machine: CPU model, cores, torch version, threads, load):

* **overhead ratio** = engine wall time for R rounds of FedAvg (and PSFL) with K users ÷ a plain
  centralised PyTorch loop doing the same forward/backward passes (same model, channel, batch
  size, number of samples and batches, same loss) on the same device in the same process.
  Engine time is the runner's round loop: participant sampling, seeding, the method's
  ``run_round`` (transport, per-user weight loading, link accounting of every payload with its
  codec, running aggregation, PSFL's pruning and sparse payloads), draining the link into
  per-user rows, and writing the round checkpoint. Evaluation is excluded from both (the engine
  runs with evaluation off; it is separate and configurable, ``eval.every``). The plain loop has
  one model and one optimiser (PSFL: one mentor and optimiser per user, kept in memory).
  Plain and engine runs are interleaved and each is repeated; the median is reported.
* **vs Flower**: the same FedAvg workload (model, data partition, local steps, rounds) run by
  ``benchmarks/flower_baseline.py`` in Flower's simulation engine (``flwr.simulation.run_simulation``,
  Ray backend) in a subprocess; speed-up = Flower time ÷ semfl time, both end to end (start,
  data, model, R rounds) and per round in steady state.
* **scaling**: round time and peak resident memory with 9, 27, 81 users at fixed data per user,
  each in a fresh subprocess.
* **vmap**: FedAvg rounds with ``train.vmap`` off and on.
* **precision**: FedAvg and PSFL rounds with ``train.precision`` fp32 and bf16 (autocast).
* **smoke**: ``semfl run configs/smoke.toml`` end to end, cold and warm classifier cache, 1 and 2
  threads (``semfl.experiments.bench_smoke``).
* **compute**: one local step on its own: FLOPs, time, convolution share, against a GEMM on the same
  device (``semfl.experiments.bench.compute``).

Results: ``<out>/bench-<device>[-quick].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from semfl.experiments.bench.report import markdown  # the result file's Markdown (also `semfl.bench.markdown`)
from semfl.experiments.bench.timing import sync
from semfl.experiments.bench_smoke import SMOKE_CONFIG, smoke_runs
from semfl.files import CHECKOUT, checkout_root

REPO = CHECKOUT  # children run in the checkout (configs/, benchmarks/), where relative paths resolve as in the docs
FLOWER_SCRIPT = "benchmarks/flower_baseline.py"  # Flower's own simulation of the same workload
PARTS = ("smoke", "overhead", "flower", "scaling", "scaling-psfl", "vmap", "precision", "workers", "psfl", "compute")


# ----------------------------------------------------------------------------- workloads
def workload(quick: bool, device: str, method: str = "fedavg", users: int | None = None,
             per_user: int | None = None, rounds: int | None = None, extra: list[str] | None = None) -> list[str]:
    """--set overrides of a benchmark run (fashion-mnist, CSC, AWGN at the link SNR, SGD)."""
    scale = "tiny" if quick else "cpu"
    users = users or (3 if quick else 9)
    per_user = per_user or (64 if quick else 256)
    rounds = rounds or (2 if quick else 3)
    sets = [f"method={method}", "dataset=fashion-mnist", f"scale={scale}", f"device={device}", f"users={users}",
            f"rounds={rounds}", "data.partition=iid", f"data.max_per_user={per_user}", "data.test_samples=100",
            "train.batch_size=32", "train.lr=0.05", "train.momentum=0.9", "train.local_epochs=1",
            "train.task_weight=0.1", "eval.every=1000000", "eval.grid_images=0", "eval.snr_sweep=[]",
            "train.vmap=off"]
    if quick:
        sets += ["classifier.epochs=1"]
    return sets + list(extra or []) + _EXTRA


_EXTRA: list[str] = []  # `semfl bench --set key=value`: applied to every workload (e.g. data.root)


def _context(overrides: list[str]):
    from semfl.config import load_config
    from semfl.protocol import seeding
    from semfl.runtimes.run import build_context

    cfg = load_config(None, overrides)
    seeding.enter(cfg.seed, "setup")
    run, user_data = build_context(cfg, None, log=lambda m: None)
    return cfg, run, user_data


def engine_rounds(cfg, run, user_data, ckpt_dir: Path) -> float:
    """Wall time of the runner's round loop (without evaluation) for cfg.rounds rounds."""
    from semfl.wireless.link import round_totals
    from semfl.methods import get_method
    from semfl.protocol import seeding
    from semfl.protocol.checkpoint import save_checkpoint
    from semfl.protocol.method import bind
    from semfl.runtimes.run import local_transport, participants

    run.link.transfers.clear()
    seeding.enter(cfg.seed, "init")
    # the runner's transport: the per-user state cap, spills and per-user checkpoint files
    transport = local_transport(cfg, run, user_data, ckpt_dir)
    method = bind(get_method(cfg.method), run, transport)
    sync(run.device)
    tic = time.perf_counter()
    for round_ in range(1, cfg.rounds + 1):
        users = participants(cfg, round_)
        transport.start_round(round_)
        seeding.enter(cfg.seed, round_, "server")
        method.run_round(round_, users)
        round_totals(run.link.drain(round_), cfg.link.eta)
        save_checkpoint(ckpt_dir / "state.pt", {"round": round_, "method": method.state_dict(),
                                                "transport": transport.state_dict()})
        transport.checkpoint_saved()
    sync(run.device)
    return time.perf_counter() - tic


def plain_fedavg(cfg, run, user_data) -> float:
    """A plain centralised loop: one model, one SGD optimiser, the same batches through the same
    forward (channel at each user's link SNR) / loss / backward / step."""
    import torch

    from semfl.experiments.bench.compute import local_step
    from semfl.methods.common import build_semantic_model
    from semfl.training import batches, make_optimizer

    model = build_semantic_model(run, cfg.model.arch)
    model.train()
    opt = make_optimizer(model.parameters(), cfg.train)
    gen = torch.Generator().manual_seed(0)
    sync(run.device)
    tic = time.perf_counter()
    for round_ in range(1, cfg.rounds + 1):
        for user, (x, y) in enumerate(user_data):
            snr = run.link.snr_db(round_, user)
            for _ in range(cfg.train.local_epochs):
                for idx in batches(len(x), cfg.train.batch_size, gen):
                    local_step(model, opt, x[idx], y[idx], snr, cfg, run)
    sync(run.device)
    return time.perf_counter() - tic


def plain_psfl(cfg, run, user_data) -> float:
    """Plain loop for PSFL: one student, one mentor (and its optimiser) per user held in memory,
    the same PLD steps (pld_step: both models forward/backward) over the same batches."""
    import torch

    from semfl.methods.common import build_semantic_model
    from semfl.methods.psfl.psfl import choose_mentors
    from semfl.methods.psfl.pld import pld_step
    from semfl.training import batches, make_optimizer

    student = build_semantic_model(run, cfg.model.arch)
    student_opt = make_optimizer(student.parameters(), cfg.train)
    run.classifier.eval()
    gen = torch.Generator().manual_seed(0)
    sync(run.device)
    tic = time.perf_counter()
    # the engine builds each user's mentor in round 1 too: timed on both sides
    mentor_archs = choose_mentors(run.user_sizes, cfg.table("psfl"), cfg.data.user_fraction)
    mentors = [build_semantic_model(run, a) for a in mentor_archs]
    mentor_opts = [make_optimizer(m.parameters(), cfg.train) for m in mentors]
    for round_ in range(1, cfg.rounds + 1):
        for user, (x, y) in enumerate(user_data):
            snr = run.link.snr_db(round_, user)
            mentors[user].train()
            student.train()
            for _ in range(cfg.train.local_epochs):
                for idx in batches(len(x), cfg.train.batch_size, gen):
                    pld_step(mentors[user], student, mentor_opts[user], student_opt, x[idx], y[idx],
                             run.classifier, snr, None, cfg.train.grad_clip, precision=cfg.train.precision)
    sync(run.device)
    return time.perf_counter() - tic


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn(*args)."""
    cpu = time.process_time()
    wall = fn(*args)
    return wall, time.process_time() - cpu


def overhead(quick: bool, device: str, method: str, repeats: int) -> dict:
    """Plain and engine runs interleaved, ``repeats`` times each. Reported: the ratio of medians,
    of minima (best of N: the usual estimator on a loaded machine, where other processes only
    ever add time) and of process CPU time (less sensitive to other processes on the cores)."""
    cfg, run, user_data = _context(workload(quick, device, method))
    plain_fn = plain_psfl if method == "psfl" else plain_fedavg
    plain, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if not quick:
            plain_fn(cfg, run, user_data)  # warm-up (allocator, Sionna blocks)
        for _ in range(repeats):
            plain.append(_timed(plain_fn, cfg, run, user_data))
            engine.append(_timed(engine_rounds, cfg, run, user_data, Path(tmp)))
    pw, ew = [w for w, _ in plain], [w for w, _ in engine]
    pc, ec = [c for _, c in plain], [c for _, c in engine]
    med = statistics.median
    return {"method": method, "users": cfg.users, "rounds": cfg.rounds, "samples_per_user": len(user_data[0][1]),
            "batch_size": cfg.train.batch_size, "scale": cfg.scale, "repeats": repeats,
            "plain_s": pw, "engine_s": ew, "plain_cpu_s": pc, "engine_cpu_s": ec,
            "plain_median_s": med(pw), "engine_median_s": med(ew), "overhead_ratio": med(ew) / med(pw),
            "overhead_ratio_min": min(ew) / min(pw), "overhead_ratio_cpu": med(ec) / med(pc)}


def setting_compare(quick: bool, device: str, repeats: int, key: str, values: tuple[str, str],
                    method: str = "fedavg") -> dict:
    """Engine rounds of one workload with ``key`` set to each of two values, side by side; the
    speed-up is the first value's median time ÷ the second's."""
    out: dict = {"method": method, "key": key}
    for value in values:
        cfg, run, user_data = _context(workload(quick, device, method, extra=[f"{key}={value}"]))
        with tempfile.TemporaryDirectory() as tmp:
            times = [engine_rounds(cfg, run, user_data, Path(tmp)) for _ in range(repeats)]
        out[value] = {"engine_s": times, "median_s": statistics.median(times),
                      "round_s": statistics.median(times) / cfg.rounds}
    out[f"speedup_{values[1]}_vs_{values[0]}"] = out[values[0]]["median_s"] / out[values[1]]["median_s"]
    return out


def compute_part(quick: bool, device: str) -> dict:
    from semfl.experiments.bench.compute import compute_profile

    return compute_profile(*_context(workload(quick, device, "fedavg")), variants=not quick)  # compiling takes ~10 s: not in the smoke run


def vmap_compare(quick: bool, device: str, repeats: int) -> dict:
    return setting_compare(quick, device, repeats, "train.vmap", ("off", "on"))


def precision_compare(quick: bool, device: str, repeats: int) -> list[dict]:
    """FedAvg and PSFL rounds in fp32 and with bf16 autocast (train.precision), and what bf16 does
    to the numbers: user 0's training loss per local epoch from the same start in both."""
    out = [setting_compare(quick, device, repeats, "train.precision", ("fp32", "bf16"), method)
           for method in ("fedavg", "psfl")]
    out[0]["epoch_losses"] = {p: local_losses(quick, device, p) for p in ("fp32", "bf16")}
    fp32, bf16 = out[0]["epoch_losses"]["fp32"], out[0]["epoch_losses"]["bf16"]
    out[0]["max_relative_loss_gap"] = max(abs(a - b) / a for a, b in zip(fp32, bf16))
    return out


def local_losses(quick: bool, device: str, precision: str, epochs: int = 4) -> list[float]:
    """User 0's mean training loss in each of ``epochs`` local epochs from the same start."""
    import torch

    from semfl.methods.common import build_semantic_model
    from semfl.protocol import seeding
    from semfl.training import local_train

    cfg, run, user_data = _context(workload(quick, device, "fedavg",
                                            extra=[f"train.precision={precision}", "train.local_epochs=1"]))
    seeding.enter(cfg.seed, "init")
    model = build_semantic_model(run, cfg.model.arch)
    gen = torch.Generator().manual_seed(0)
    x, y = user_data[0]
    return [local_train(model, x, y, cfg.train, run.link.snr_db(1, 0), run.classifier, gen) for _ in range(epochs)]


def workers_compare(quick: bool, device: str, repeats: int) -> list[dict]:
    """FedAvg and PSFL rounds on every core, two ways: one process with torch's intra-op threads
    (engine.workers = 1) and one forked worker per core with one thread each (engine.workers = N);
    plus one thread, one process, as the single-core reference. Run in a child with N OpenMP
    threads, since the benchmark itself runs with OMP_NUM_THREADS=1."""
    from semfl.runtimes.workers import usable_cpus

    if not device.startswith("cpu"):
        raise RuntimeError("engine.workers forks processes, which CUDA does not survive: a CPU-only part")
    cores = usable_cpus()
    return [_child(["-m", "semfl.experiments.bench.bench", "--workers-point", "--repeats", str(repeats),
                    *sum((["--set", s] for s in workload(quick, device, method)), [])], 3600,
                   {"OMP_NUM_THREADS": str(cores)})
            for method in ("fedavg", "psfl")]


def workers_point(overrides: list[str], repeats: int) -> dict:
    import torch

    from semfl.runtimes.workers import usable_cpus

    cores = usable_cpus()
    settings = {"1 thread": (1, 1), f"{cores} threads": (cores, 1), f"{cores} workers": (cores, cores)}
    out: dict = {"cores": cores, "settings": {}}
    for label, (threads, workers) in settings.items():
        torch.set_num_threads(threads)
        cfg, run, user_data = _context(overrides + [f"engine.workers={workers}"])
        with tempfile.TemporaryDirectory() as tmp:
            times = [engine_rounds(cfg, run, user_data, Path(tmp)) for _ in range(repeats)]
        out["settings"][label] = {"threads": threads, "workers": workers, "engine_s": times,
                                  "median_s": statistics.median(times), "round_s": statistics.median(times) / cfg.rounds}
    out["method"] = cfg.method
    single, by_threads, by_workers = (v["median_s"] for v in out["settings"].values())
    out.update(speedup_threads=single / by_threads, speedup_workers=single / by_workers,
               speedup_workers_vs_threads=by_threads / by_workers)
    return out


# ----------------------------------------------------------------------------- subprocess points
def _child(argv: list[str], timeout: float, env_extra: dict[str, str] | None = None) -> dict:
    """Run a Python child; its last stdout line is JSON. Adds process_s: the child's wall time."""
    env = {**os.environ, **(env_extra or {})}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO if (REPO / "pyproject.toml").is_file() else None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - tic
    return out


def scaling_point(overrides: list[str]) -> dict:
    """One scaling measurement in this (fresh) process: round time and peak RSS."""
    import threading

    cfg, run, user_data = _context(overrides)
    data_mb = sum(x.element_size() * x.numel() + y.element_size() * y.numel() for x, y in user_data) / 2 ** 20
    rss_before = _rss_mb()
    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:  # the process's peak RSS *during the rounds* (ru_maxrss is dominated by setup)
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        wall = engine_rounds(cfg, run, user_data, Path(tmp))
    done.set()
    sampler.join()
    return {"users": cfg.users, "rounds": cfg.rounds, "round_s": wall / cfg.rounds,
            "round_s_per_user": wall / cfg.rounds / cfg.users, "rss_before_rounds_mb": rss_before,
            "peak_rss_rounds_mb": peak[0], "rss_growth_rounds_mb": peak[0] - rss_before,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "user_data_mb": data_mb}


def _rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; falls back to the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PSFL_STATE_CAP_MB = 64  # the cap of the PSFL scaling part (each user's mentor + optimiser: 3-16 MB at cpu scale)
# (samples per user: 1-2 to 8 local batches, cores each engine may use); the 2-core point gives Ray
# 2 CPUs (two 1-thread clients at a time) and semfl 2 torch threads: each engine uses the whole machine
FLOWER_POINTS = {False: ((32, 1), (64, 1), (256, 1), (256, 2)), True: ((16, 1), (64, 1))}


def flower_compare(quick: bool, device: str, semfl_repeats: int, timeout: float) -> dict:
    """The same FedAvg workload in Flower's simulation and in semfl, for several amounts of local work
    per client (the speed-up is (compute + engine cost) / (compute + semfl cost): it shrinks as the
    per-client compute, which both must do, grows)."""
    points = []
    for per_user, cores in FLOWER_POINTS[quick]:
        sets = workload(quick, device, "fedavg", per_user=per_user)
        flat = sum((["--set", s] for s in sets), [])
        env = {"OMP_NUM_THREADS": str(cores), "SEMFL_BENCH_RAY_CPUS": str(cores)}
        flower = _child([str(checkout_root(FLOWER_SCRIPT) / FLOWER_SCRIPT), "--json", *flat], timeout, env)
        # semfl end to end in a fresh process too (import, data, classifier from cache, model, R rounds)
        semfl = _child(["-m", "semfl.experiments.bench.bench", "--end-to-end", *flat], timeout, env)
        # with several cores semfl runs both ways: intra-op threads, and one worker process per core
        variants = [("threads" if cores > 1 else "1 thread", semfl)]
        if cores > 1:
            variants.append(("workers", _child(["-m", "semfl.experiments.bench.bench", "--end-to-end", *flat, "--set",
                                                f"engine.workers={cores}"], timeout, env)))
        for parallelism, run in variants:
            points.append({"samples_per_user": per_user, "batches_per_user": -(-per_user // 32), "cores": cores,
                           "semfl_parallelism": parallelism, "flower": flower, "semfl": run,
                           "speedup_end_to_end": flower["process_s"] / run["process_s"],
                           "speedup_per_round": flower["steady_round_s"] / run["round_s"]})
    return {"points": points}


def end_to_end(overrides: list[str]) -> dict:
    """semfl's side of the Flower comparison, run in a fresh process (the parent times the process)."""
    cfg, run, user_data = _context(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        wall = engine_rounds(cfg, run, user_data, Path(tmp))
    return {"rounds_s": wall, "round_s": wall / cfg.rounds}


# ----------------------------------------------------------------------------- report
def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": device, "load_avg": list(os.getloadavg()),
            "platform": platform.platform(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import flwr

        info["flwr"] = flwr.__version__ if hasattr(flwr, "__version__") else ""
    except Exception:  # pragma: no cover
        pass
    return info


def bench(device: str = "cpu", quick: bool = False, out: Path = Path("benchmarks/results"),
          parts: tuple[str, ...] = PARTS, repeats: int = 3,
          log=print, sets: list[str] | None = None, merge: bool = False) -> dict:
    import torch

    _EXTRA[:] = list(sets or [])

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("semfl bench: --device cuda requested but CUDA is not available")
    out = Path(out)
    stem = f"bench-{device.split(':')[0]}{'-quick' if quick else ''}"
    result: dict = {"machine": machine(device), "quick": quick, "errors": {}, "overhead": [],
                    "workload": workload(quick, device, "fedavg"), "measured": {}}
    if merge and (out / f"{stem}.json").is_file():  # a partial rerun (--only) replaces just its parts
        result = json.loads((out / f"{stem}.json").read_text())
        result.setdefault("measured", {})
        for name in parts:
            result["errors"].pop(name, None)
            if name in ("overhead", "psfl"):
                method = "fedavg" if name == "overhead" else "psfl"
                result["overhead"] = [o for o in result.get("overhead", []) if o["method"] != method]
    steps = {
        "smoke": lambda: result.__setitem__("smoke", smoke_runs(checkout_root(SMOKE_CONFIG))),
        "overhead": lambda: result["overhead"].append(overhead(quick, device, "fedavg", repeats)),
        "psfl": lambda: result["overhead"].append(overhead(quick, device, "psfl", max(1, repeats - 1))),
        "vmap": lambda: result.__setitem__("vmap", vmap_compare(quick, device, max(1, repeats - 1))),
        "precision": lambda: result.__setitem__("precision", precision_compare(quick, device, max(1, repeats - 1))),
        "workers": lambda: result.__setitem__("workers", workers_compare(quick, device, max(1, repeats - 1))),
        "compute": lambda: result.__setitem__("compute", compute_part(quick, device)),
        "flower": lambda: result.__setitem__("flower", flower_compare(quick, device, repeats, 600 if quick else 1800)),
        "scaling": lambda: result.__setitem__("scaling", [
            _child(["-m", "semfl.experiments.bench.bench", "--scaling-point",
                    *sum((["--set", s] for s in workload(quick, device, "fedavg", users=k,
                                                          per_user=32 if quick else 64, rounds=2)), [])], 1800)
            for k in ((3, 9) if quick else (9, 27, 81))]),
        "scaling-psfl": lambda: result.__setitem__("scaling_psfl", [
            {"state_memory_mb": cap, **_child(["-m", "semfl.experiments.bench.bench", "--scaling-point", *sum(
                (["--set", s] for s in workload(quick, device, "psfl", users=k, per_user=16 if quick else 32, rounds=2,
                                                extra=[f"engine.state_memory_mb={cap}"])), [])], 1800)}
            for cap in (0, PSFL_STATE_CAP_MB) for k in ((3, 9) if quick else (9, 27, 81))]),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in parts:
        log(f"bench: {name} ...")
        result["measured"][name] = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "load_avg_start": list(os.getloadavg())}
        tic = time.perf_counter()
        try:
            steps[name]()
        except Exception as exc:  # record and go on: one failing part should not lose the others
            result["errors"][name] = f"{type(exc).__name__}: {str(exc)[-800:]}"
        result.setdefault("part_s", {})[name] = time.perf_counter() - tic
        result["measured"][name]["load_avg_end"] = list(os.getloadavg())
        result["load_avg_end"] = list(os.getloadavg())
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))  # after every part: nothing is lost
        (out / f"{stem}.md").write_text(markdown(result))
        log(f"bench: {name} done in {time.perf_counter() - tic:.0f} s (load {os.getloadavg()[0]:.2f})")
    log(f"bench: wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return result


def cmd_bench(args) -> int:
    cpu_only = ("workers",)  # forked workers: machines without a GPU
    parts = tuple(args.only.split(",")) if args.only else \
        tuple(p for p in PARTS if args.device == "cpu" or p not in cpu_only)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"semfl: error: --only: unknown part {unknown[0]!r} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"semfl: error: --repeats: must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    if args.device != "cpu" and not args.device.startswith("cuda"):
        print(f"semfl: error: --device: expected cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
        return 2
    result = bench(args.device, args.quick, Path(args.out), parts, args.repeats, sets=args.set, merge=bool(args.only))
    print(markdown(result))
    return 0 if not result["errors"] else 1


def child_main(argv: list[str]) -> dict:
    """The subprocess entry points used by bench() (``python -m semfl.experiments.bench.bench``): one
    measurement in this process, as the dict the child prints as its last stdout line (JSON)."""
    ap = argparse.ArgumentParser(prog="python -m semfl.experiments.bench.bench")
    ap.add_argument("--scaling-point", action="store_true")
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--workers-point", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args(argv)
    if a.scaling_point:
        return scaling_point(a.set)
    if a.workers_point:
        return workers_point(a.set, a.repeats)
    if a.end_to_end:
        return end_to_end(a.set)
    ap.error("one of --scaling-point, --workers-point, --end-to-end is needed")


if __name__ == "__main__":
    print(json.dumps(child_main(sys.argv[1:])))
