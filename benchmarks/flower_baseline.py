"""The FedAvg workload of `semfl bench`, run by Flower's simulation engine (the baseline).

Same model (semfl's CSC at the config's scale, same channel), same data partition (semfl's
prepare_data), same frozen classifier and loss, same local steps (semfl.training.local_train with
the same TrainConfig, batch size and per-user link SNR), same number of users and rounds. What
differs is the engine: a Flower ClientApp (NumPyClient) / ServerApp (flwr FedAvg strategy) run by
``flwr.simulation.run_simulation`` on the Ray backend, with NumPy (de)serialisation of the model
at every round, as a Flower user would write it. Evaluation is off (fraction_evaluate = 0).

    python benchmarks/flower_baseline.py --json --set users=9 --set scale=cpu ...

Prints one JSON line: total_s (run_simulation wall time), round_s per round (from the strategy's
aggregate_fit timestamps), steady_round_s (median of rounds 2..R: Ray start-up excluded),
fit_s_median (one client's fit in rounds 2..R, timed inside the ClientApp).
Each simulated client gets ``--client-cpus`` CPUs (default 1) and torch threads = that number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

_STATE: dict = {}


def _setup(overrides: list[str]):
    """Config, run context and user data (built once per process: Ray actors reuse it)."""
    key = tuple(overrides)
    if _STATE.get("key") != key:
        from semfl.config import load_config
        from semfl.protocol import seeding
        from semfl.runtimes.run import build_context

        cfg = load_config(None, overrides)
        seeding.enter(cfg.seed, "setup")
        run, user_data = build_context(cfg, None, log=lambda m: None)
        _STATE.update(key=key, cfg=cfg, run=run, user_data=user_data)
    return _STATE["cfg"], _STATE["run"], _STATE["user_data"]


def make_apps(overrides: list[str], client_cpus: int, marks: list[float], fit_log: str):
    import numpy as np
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    class SemanticClient(NumPyClient):
        def __init__(self, user: int):
            torch.set_num_threads(client_cpus)
            from semfl.methods.common import build_semantic_model

            self.cfg, self.run, self.user_data = _setup(overrides)
            self.user = user
            if "model" not in _STATE:
                _STATE["model"] = build_semantic_model(self.run, self.cfg.model.arch)
            self.model = _STATE["model"]

        def get_parameters(self, config):
            return [p.detach().cpu().numpy() for p in self.model.parameters()]

        def fit(self, parameters, config):
            from semfl.protocol import seeding
            from semfl.training import local_train

            started = time.perf_counter()
            with torch.no_grad():
                for p, a in zip(self.model.parameters(), parameters):
                    p.copy_(torch.from_numpy(np.asarray(a)))
            rnd = int(config.get("round", 1))
            x, y = self.user_data[self.user]
            seed = seeding.derive_seed(self.cfg.seed, rnd, self.user, "train")
            seeding.enter(seed)
            loss = local_train(self.model, x, y, self.cfg.train, self.run.link.snr_db(rnd, self.user),
                               self.run.classifier, seeding.generator(seed, "batches"))
            reply = self.get_parameters({})
            with open(fit_log, "a") as log:  # the client's own time (actors are other processes)
                log.write(f"{rnd} {time.perf_counter() - started}\n")
            return reply, len(y), {"loss": float(loss)}

    def client_fn(context: Context):
        return SemanticClient(int(context.node_config["partition-id"])).to_client()

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            marks.append(time.perf_counter())
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client failures: {failures[:1]}")
            return out

    def server_fn(context: Context):
        cfg, run, _ = _setup(overrides)
        from semfl.methods.common import build_semantic_model
        from semfl.protocol import seeding

        seeding.enter(cfg.seed, "init")
        model = build_semantic_model(run, cfg.model.arch)
        initial = ndarrays_to_parameters([p.detach().cpu().numpy() for p in model.parameters()])
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.users,
                               min_available_clients=cfg.users, initial_parameters=initial,
                               on_fit_config_fn=lambda r: {"round": r})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.rounds))

    return ClientApp(client_fn=client_fn), ServerApp(server_fn=server_fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="semfl config overrides")
    ap.add_argument("--client-cpus", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from semfl.config import load_config

    cfg = load_config(None, args.set)
    import flwr
    from flwr.simulation import run_simulation

    marks: list[float] = []
    fit_log = tempfile.NamedTemporaryFile(prefix="flower-fit-", suffix=".txt", delete=False).name
    client_app, server_app = make_apps(args.set, args.client_cpus, marks, fit_log)
    ncpu = int(os.environ.get("SEMFL_BENCH_RAY_CPUS", str(args.client_cpus)))
    backend = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": ncpu, "include_dashboard": False, "log_to_driver": False}}
    tic = time.perf_counter()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.users, backend_config=backend)
        total = time.perf_counter() - tic
        fits = [float(line.split()[1]) for line in Path(fit_log).read_text().splitlines() if not line.startswith("1 ")]
    finally:
        os.unlink(fit_log)
    if len(marks) != cfg.rounds:
        raise SystemExit(f"flower_baseline: expected {cfg.rounds} rounds, saw {len(marks)} (a client failed?)")
    rounds = [b - a for a, b in zip(marks, marks[1:])]
    result = {"total_s": total, "first_round_end_s": marks[0] - tic, "round_s": rounds,
              "steady_round_s": statistics.median(rounds) if rounds else marks[0] - tic,
              # a client's fit (weights in, local_train, weights out) in rounds 2..R: the rest of
              # Flower's round is the engine between fits
              "fit_s_median": statistics.median(fits) if fits else None,
              "users": cfg.users, "rounds": cfg.rounds, "client_cpus": args.client_cpus, "ray_cpus": ncpu,
              "flwr": getattr(flwr, "__version__", "")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
