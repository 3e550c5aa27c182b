"""Batched users (torch.func.vmap): same result as training each user in turn, to float tolerance."""
from __future__ import annotations

import pytest
import torch

from semfl.methods.batched import supported, train_users_vmap
from semfl.wireless.channel import Channel
from semfl.config import ConfigError, TrainConfig, load_config
from semfl.models import ImageSpec, build_model
from semfl.protocol import seeding
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner
from semfl.training import load_weights, local_train, weights_of
from conftest import assert_kept, lines_before

SPEC = ImageSpec(1, 28, 28, 10)
SEEDS = [101, 202, 303]


def _setup(kind: str, arch: str = "csc"):
    torch.manual_seed(0)
    model = build_model(arch, "tiny", SPEC, Channel(kind))
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    sizes = [20, 16, 13]  # different sizes: padded last batches and users that run out of batches
    data = [(torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]
    return model, classifier, data


def _sequential(model, classifier, data, cfg, snrs, starts):
    out = []
    for k in range(len(data)):
        load_weights(model, starts[k])
        seeding.enter(SEEDS[k])  # what LocalTransport.send does before a user's handler
        loss = local_train(model, *data[k], cfg, snrs[k], classifier, seeding.generator(SEEDS[k], "batches"))
        out.append((weights_of(model), loss))
    return out


# the student (CSC) and the contenders' model (GSC-M, a ViT/MAE)
@pytest.mark.parametrize("kind, arch", [("awgn", "csc"), ("rayleigh", "csc"), ("awgn", "gsc-m")])
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # CPU attention has no vmap rule
def test_vmap_matches_sequential_local_train(kind, arch):
    model, classifier, data = _setup(kind, arch)
    cfg = TrainConfig(batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-4, task_weight=0.1, local_epochs=2)
    snrs = [0.0, 10.0, 20.0]
    w0 = weights_of(model)
    # different starting weights per user: the optimiser state and parameters are per user
    starts = [{n: v + 0.01 * k for n, v in w0.items()} for k in range(3)]
    seq = _sequential(model, classifier, data, cfg, snrs, starts)
    bat = train_users_vmap(model, starts, data, cfg, snrs, classifier,
                           [seeding.generator(s, "batches") for s in SEEDS], draw_seeds=SEEDS)
    assert len(bat) == 3
    for (ws, ls), (wb, lb), start in zip(seq, bat, starts):
        assert set(ws) == set(wb)
        for name in ws:
            torch.testing.assert_close(wb[name], ws[name], rtol=1e-4, atol=1e-5)
        assert lb == pytest.approx(ls, rel=1e-5)
        assert any(not torch.equal(ws[n], start[n]) for n in ws)  # it trained
    # the working model keeps its own channel afterwards
    assert isinstance(model.channel, Channel)


def test_vmap_is_deterministic_and_per_user():
    model, classifier, data = _setup("awgn")
    cfg = TrainConfig(batch_size=8, lr=0.05, momentum=0.9)
    w0 = weights_of(model)

    def once():
        return train_users_vmap(model, [w0] * 3, data, cfg, [5.0] * 3, classifier,
                                [seeding.generator(s, "batches") for s in SEEDS], draw_seeds=SEEDS)

    a, b = once(), once()
    for (wa, la), (wb, lb) in zip(a, b):
        assert la == lb
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
    # users differ (own data, own noise, own momentum)
    assert not torch.equal(a[0][0]["project.weight"], a[1][0]["project.weight"])


def test_supported_refuses_adam_and_batchnorm():
    model, _, _ = _setup("awgn")
    assert supported(model, TrainConfig()) is None
    assert "sgd" in supported(model, TrainConfig(optimizer="adam")).lower()
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    bn.channel = Channel("awgn")
    assert "BatchNorm" in supported(bn, TrainConfig())


def test_config_vmap_field():
    assert load_config(None, []).train.vmap == "auto"
    with pytest.raises(ConfigError, match="train.vmap"):
        load_config(None, ["train.vmap=maybe"])
    with pytest.raises(ConfigError, match="train.vmap"):
        load_config(None, ["train.vmap=on", "train.optimizer=adam"])


@pytest.mark.xdist_group("method-run-fedavg")
def test_fedavg_run_vmap_on_equals_off(method_run, tmp_path):
    """Whole runs through the local transport: send_batched charges the link as send does and the
    metrics agree (weights to float tolerance, so losses to ~1e-5). Off: FedAvg's short run (conftest's
    method_run, whose recording binds no batched handler: each user is trained in turn)."""
    overrides, off, _, _ = method_run("fedavg")
    out = tmp_path / "on"
    Runner(load_config(None, overrides + ["train.vmap=on"]), out, show_progress=False, log=lambda m: None).execute()
    on = read_jsonl(out / "metrics.jsonl")
    assert len(off) == len(on)
    for a, b in zip(off, on):
        assert set(a) == set(b)
        for key, value in a.items():
            if key == "wall_s":
                continue
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
            else:
                assert b[key] == value, key


def test_user_states_spill_to_disk_under_a_memory_cap(tmp_path):
    from semfl.runtimes.local import UserStates

    states = UserStates(4, cap_bytes=3 * 4000 + 100, spill_parent=tmp_path)  # room for 3 states of 4000 bytes
    for user in range(4):
        states[user]["mentor"] = torch.full((1000,), float(user))  # 4000 bytes each
        states.enforce(touched=[user], keep=[user])
    assert states.spills == 1 and states.in_memory_bytes() <= states.cap_bytes
    spilled = list(tmp_path.glob("state-spill-*/user-0.pt"))
    assert len(spilled) == 1  # the least recently used user went to disk, under the run dir
    assert torch.equal(states[0]["mentor"], torch.zeros(1000))  # read back transparently
    assert states.loads == 1 and not spilled[0].exists()
    states.enforce(touched=[0], keep=[0])
    assert states.spills == 2  # now user 1 (least recently used) went out
    assert sorted(states) == [0, 1, 2, 3] and len(states) == 4
    full = states.to_dict()
    assert [float(full[k]["mentor"][0]) for k in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_checkpoint_keeps_one_file_per_user_and_loads_lazily(tmp_path):
    from semfl.runtimes.local import UserStates

    states = UserStates(4, cap_bytes=2 * 4000 + 100, spill_parent=tmp_path / "run")  # 2 of 4 fit in memory
    for user in range(3):  # user 3 keeps an empty state
        states[user]["mentor"] = torch.full((1000,), float(user))
        states.enforce(touched=[user], keep=[user])
    assert states.spills == 1  # user 0 is on disk
    ckpt = tmp_path / "ckpt"
    manifest = states.write_files(ckpt, "r1")
    assert manifest == {0: "user-0-r1.pt", 1: "user-1-r1.pt", 2: "user-2-r1.pt", 3: None}
    assert states.loads == 0  # the spilled state was linked, not read back into memory

    states[2]["mentor"] += 10  # only user 2 changes before the next checkpoint
    again = states.write_files(ckpt, "r2")
    assert again == {0: "user-0-r1.pt", 1: "user-1-r1.pt", 2: "user-2-r2.pt", 3: None}
    UserStates.prune_files(ckpt, again)
    assert sorted(p.name for p in ckpt.iterdir()) == ["user-0-r1.pt", "user-1-r1.pt", "user-2-r2.pt"]

    resumed = UserStates(4, cap_bytes=2 * 4000 + 100)
    resumed.load_files(ckpt, again)
    assert resumed.in_memory_bytes() == 0 and resumed.loads == 0  # nothing read until looked up
    assert [float(resumed[k]["mentor"][0]) for k in range(3)] == [0.0, 1.0, 12.0] and resumed[3] == {}
    assert (ckpt / "user-0-r1.pt").is_file()  # reading a checkpoint file never deletes it
    (ckpt / "user-1-r1.pt").unlink()
    with pytest.raises(RuntimeError, match="user 1's state file .* is missing"):
        UserStates(4).load_files(ckpt, again)


def test_psfl_resume_from_per_user_checkpoint_files(tiny_overrides, tmp_path, monkeypatch):
    """Killed mid-round 2 under a tiny state cap, resumed: the uninterrupted run's metrics; the
    checkpoint holds the mentors as one file per user, not inside state.pt."""
    from semfl.runtimes.local import LocalTransport

    sets = tiny_overrides + ["rounds=2", "method=psfl", "engine.state_memory_mb=0.001", "eval.snr_sweep=[]",
                             "eval.grid_images=0", "data.max_per_user=40", "psfl.user_eval_samples=20"]

    def run(out, resume=False):
        Runner(load_config(None, sets), out, resume=resume, show_progress=False, log=lambda m: None).execute()
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(out / "metrics.jsonl")]

    reference = run(tmp_path / "full")
    files = sorted(p.name for p in (tmp_path / "full" / "checkpoint" / "users").iterdir())
    assert files == ["user-0-r2.pt", "user-1-r2.pt", "user-2-r2.pt"]  # round 1's files were pruned
    state = torch.load(tmp_path / "full" / "checkpoint" / "state.pt", weights_only=False)
    assert set(state["transport"]) == {"state_files"}

    original = LocalTransport.send

    def dying_send(self, users, kind, payload, on_reply=None):
        if self.round == 2:
            raise KeyboardInterrupt
        return original(self, users, kind, payload, on_reply)

    monkeypatch.setattr(LocalTransport, "send", dying_send)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(LocalTransport, "send", original)
    done = lines_before(tmp_path / "killed", 2)
    assert run(tmp_path / "killed", resume=True) == reference
    assert_kept(tmp_path / "killed", done)


@pytest.mark.slow
def test_transport_state_cap_keeps_psfl_like_state_working(tiny_overrides, tmp_path):
    """A run with a tiny cap gives the same metrics as one without (states round-trip through disk)."""
    rows = {}
    for cap in ("0", "0.001"):
        cfg = load_config(None, tiny_overrides + ["rounds=2", "method=psfl", f"engine.state_memory_mb={cap}",
                                                  "eval.snr_sweep=[]", "eval.grid_images=0", "data.max_per_user=40",
                                                  "data.sizes=[]"])
        out = tmp_path / f"cap{cap}"
        Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
        rows[cap] = [{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(out / "metrics.jsonl")]
    assert rows["0"] == rows["0.001"]


QUICK_PARTS = "overhead,vmap,precision,workers,scaling-psfl,compute"


def _check_quick_bench(out):
    """What ``semfl bench --quick --only QUICK_PARTS`` must write: every part's fields and Markdown section."""
    import json

    text = (out / "bench-cpu-quick.md").read_text()
    result = json.loads((out / "bench-cpu-quick.json").read_text())
    assert {"cpu", "cores", "torch", "device", "load_avg"} <= set(result["machine"])
    (fedavg,) = result["overhead"]
    assert fedavg["overhead_ratio"] > 0 and fedavg["plain_s"] and fedavg["engine_s"]
    assert result["vmap"]["on"]["median_s"] > 0
    assert [c["method"] for c in result["precision"]] == ["fedavg", "psfl"]
    assert all(c["bf16"]["median_s"] > 0 and c["speedup_bf16_vs_fp32"] > 0 for c in result["precision"])
    assert len(result["precision"][0]["epoch_losses"]["bf16"]) == 4
    assert 0 < result["precision"][0]["max_relative_loss_gap"] < 0.1
    assert "Training precision" in text
    assert [w["method"] for w in result["workers"]] == ["fedavg", "psfl"]
    for w in result["workers"]:
        assert [(v["threads"], v["workers"]) for v in w["settings"].values()] == [(1, 1), (w["cores"], 1), (w["cores"], w["cores"])]
        assert all(v["median_s"] > 0 for v in w["settings"].values()) and w["speedup_workers_vs_threads"] > 0
    assert "one worker process per core" in text
    assert "Overhead ratio" in text
    psfl = {(p["state_memory_mb"], p["users"]): p for p in result["scaling_psfl"]}
    assert set(psfl) == {(0, 3), (0, 9), (64, 3), (64, 9)}
    assert all(p["round_s"] > 0 and p["peak_rss_rounds_mb"] >= p["rss_before_rounds_mb"] for p in psfl.values())
    assert "Scaling with per-user state" in text
    compute = result["compute"]
    assert compute["flops_per_step"] > 0 and compute["step_s"] > 0 and 0 < compute["conv_time_share"] < 1
    assert compute["gflops"] == pytest.approx(compute["flops_per_step"] / compute["step_s"] / 1e9)
    assert "Compute of one local step" in text
    batching = compute["user_batching"]
    assert [(r["users"], r["batch_size"]) for r in batching] == [(1, 32), (3, 96)]
    assert batching[0]["speedup_per_sample"] == 1.0
    assert batching[1]["per_batch_s"] == pytest.approx(batching[1]["step_s"] / 3)
    assert "several users' batches at once" in text


@pytest.mark.slow
def test_bench_quick_smoke(fmnist_root, tmp_path):
    """The whole ``semfl bench --quick`` of these parts, children and all (~1-2 min on 2 cores). In
    the default suite: test_bench_quick_in_process (the same command and checks, each child's entry
    point, child_main, run in this process with the child's arguments on a smaller workload) and
    test_bench_child_process (bench._child: a real child, its environment, JSON line and errors)."""
    from semfl.cli import main

    out = tmp_path / "results"
    code = main(["bench", "--quick", "--only", QUICK_PARTS, "--repeats", "1", "--out", str(out),
                 "--set", f"data.root={fmnist_root}", "--set", "data.download=false",
                 "--set", f"classifier.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    _check_quick_bench(out)


@pytest.mark.slow
def test_bench_smoke_part_runs_the_smoke_config_from_any_folder(tmp_path, monkeypatch):
    """``semfl bench --only smoke``'s runs, started outside the checkout (~30 s): the smoke config is
    found in the checkout, and the warm run takes less CPU than the cold one, which trains the
    classifier. In the default suite: test_bench_child_process (the children's folder and paths)."""
    from semfl.experiments.bench_smoke import SMOKE_CONFIG, smoke_runs
    from semfl.files import checkout_root

    monkeypatch.chdir(tmp_path)
    rows = smoke_runs(checkout_root(SMOKE_CONFIG), threads=(1,))
    assert [(r["threads"], r["classifier"]) for r in rows] == [(1, "cold"), (1, "warm")]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    assert rows[1]["cpu_s"] < rows[0]["cpu_s"]


def test_bench_quick_in_process(fmnist_root, shared_cache, tmp_path, monkeypatch):
    """``semfl bench --quick`` of the same parts with the same checks as test_bench_quick_smoke, cheaper:
    one round of 32 samples per user and 20 test images (PSFL's users evaluate their mentor and student
    on them) (``--set``), fewer timing repeats of the compute step and a
    smaller GEMM, and each child's entry point (child_main: --scaling-point, --workers-point) run
    in this process with the arguments and thread count it would get."""
    import functools
    import json
    import time

    from semfl.cli import main
    from semfl.experiments.bench import bench, compute
    from semfl.runtimes.workers import usable_cpus

    children = []

    def in_process(argv, timeout, env_extra=None):
        assert argv[:2] == ["-m", "semfl.experiments.bench.bench"]
        children.append((argv[2], env_extra))
        threads = torch.get_num_threads()
        tic = time.perf_counter()
        try:
            point = json.loads(json.dumps(bench.child_main(argv[2:])))  # what the child would print
        finally:
            torch.set_num_threads(threads)  # workers_point sets this process's threads
        return {**point, "process_s": time.perf_counter() - tic}

    monkeypatch.setattr(bench, "_child", in_process)
    monkeypatch.setattr(compute, "GEMM_SIZE", 256)
    monkeypatch.setattr(compute, "compute_profile", functools.partial(compute.compute_profile, steps=2, blocks=2))
    monkeypatch.setattr(bench, "_EXTRA", [])  # bench() fills it from --set: not left to later tests
    out = tmp_path / "results"
    code = main(["bench", "--quick", "--only", QUICK_PARTS, "--repeats", "1", "--out", str(out),
                 "--set", f"data.root={fmnist_root}", "--set", "data.download=false",
                 "--set", f"classifier.cache_dir={shared_cache}", "--set", "rounds=1", "--set", "data.max_per_user=32", "--set", "data.test_samples=20"])
    assert json.loads((out / "bench-cpu-quick.json").read_text())["errors"] == {}
    assert code == 0
    _check_quick_bench(out)
    cores = {"OMP_NUM_THREADS": str(usable_cpus())}
    assert children == [("--workers-point", cores)] * 2 + [("--scaling-point", None)] * 4
    assert main(["bench", "--only", "nonsense"]) == 2


def test_bench_child_process():
    """bench._child: a child Python in the repository with the extra environment; its last stdout line
    is its JSON result, timed; a failing child's stderr is raised (here bench's own child entry point,
    given no measurement to make). The measurements' entry point itself: test_bench_quick_in_process."""
    from semfl.experiments.bench.bench import REPO, _child

    script = "import json, os; print('a log line'); print(json.dumps({'threads': os.environ['OMP_NUM_THREADS'], 'cwd': os.getcwd()}))"
    point = _child(["-c", script], 60, {"OMP_NUM_THREADS": "3"})
    assert point["threads"] == "3" and point["cwd"] == str(REPO) and point["process_s"] > 0
    # the children's folder is the checkout, where the smoke config and the Flower script are
    from semfl.experiments.bench_smoke import SMOKE_CONFIG
    from semfl.files import checkout_root

    from semfl.experiments.bench.bench import FLOWER_SCRIPT

    assert (REPO / SMOKE_CONFIG).is_file() and (REPO / FLOWER_SCRIPT).is_file()
    assert checkout_root(SMOKE_CONFIG) == REPO
    with pytest.raises(FileNotFoundError, match="nowhere.toml: not found beside this semfl.*needs a checkout"):
        checkout_root("configs/nowhere.toml")
    with pytest.raises(RuntimeError, match="(?s)failed \\(2\\).*one of --scaling-point, --workers-point, --end-to-end"):
        _child(["-m", "semfl.experiments.bench.bench"], 60)


def test_five_x_requirement_by_hand():
    from semfl.experiments.bench.compute import five_x_requirement

    compute = {"step_s": 0.08, "flops_per_step": 4.0e9, "gemm_gflops": 200.0}
    # Flower: 9 users, a 14.4 s round (1.6 s per client), a 0.6 s fit of 8 batches -> 1.0 s of engine
    point = {"batches_per_user": 8, "flower": {"steady_round_s": 14.4, "fit_s_median": 0.6, "users": 9}}
    need = five_x_requirement(compute, point)
    assert need["semfl_alone_step_s"] == pytest.approx(14.4 / 5 / 9 / 8)  # 40 ms
    assert need["semfl_alone_speedup_needed"] == pytest.approx(2.0)
    assert need["semfl_alone_fraction_of_gemm"] == pytest.approx(4.0 / 0.04 / 200)  # 100 GFLOP/s of 200
    # (fit' + 1.0) / fit' = 5  ->  fit' = 0.25 s  ->  31.25 ms per batch
    assert need["both_step_s"] == pytest.approx(0.25 / 8)
    assert need["both_speedup_needed"] == pytest.approx(0.08 / 0.03125)


def test_bench_flower_table_lists_every_workload():
    from semfl.experiments.bench.bench import markdown

    def point(per_user, flower_s, semfl_s, fit=None):
        return {"samples_per_user": per_user, "batches_per_user": -(-per_user // 32),
                "flower": {"process_s": flower_s, "steady_round_s": flower_s / 4, "flwr": "1.41.0", "fit_s_median": fit},
                "semfl": {"process_s": semfl_s, "round_s": semfl_s / 8},
                "speedup_end_to_end": flower_s / semfl_s, "speedup_per_round": (flower_s / 4) / (semfl_s / 8)}

    result = {"machine": {"device": "cpu", "cpu": "x", "cores": 2, "torch": "2", "torch_threads": 1,
                          "load_avg": [0.1], "time_utc": "t"}, "quick": False,
              "flower": {"points": [point(32, 40.0, 8.0), point(256, 60.0, 24.0, fit=0.6)]}}
    text = markdown(result)
    assert "Flower 1.41.0 simulation" in text
    assert "| 32 | 1 | 1 | 1 thread | 40.00 | 8.00 | **5.0×** | 10.00 | 1.00 | **10.0×** |  |" in text
    assert "| 256 | 8 | 1 | 1 thread | 60.00 | 24.00 | **2.5×** | 15.00 | 3.00 | **5.0×** | 0.600 |" in text
    two = [{**point(256, 50.0, 20.0), "cores": 2, "semfl_parallelism": "threads"},
           {**point(256, 50.0, 10.0), "cores": 2, "semfl_parallelism": "workers"}]
    text = markdown({**result, "flower": {"points": two}})
    assert "| 256 | 8 | 2 | 2 threads | 50.00 | 20.00 | **2.5×** |" in text
    assert "| 256 | 8 | 2 | 2 workers | 50.00 | 10.00 | **5.0×** |" in text
