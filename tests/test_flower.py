"""The Flower transport in-process (LoopbackGrid: real ClientApp/ServerApp code and Flower messages
through protobuf, no Ray, no servers): wire format, equivalence with the local transport for every
method, node failures, resume, and the node's state store."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from semfl.wireless.codecs import Payload  # noqa: E402
from semfl.config import load_config  # noqa: E402
from conftest import SHORT_RUN, assert_kept, lines_before, method_group  # noqa: E402
from semfl.methods import available_methods  # noqa: E402
from semfl.files import read_jsonl  # noqa: E402
from flower_loopback import LoopbackGrid  # noqa: E402
from semfl.runtimes.flower.node import UserStateStore, make_client_app  # noqa: E402
from semfl.runtimes.flower.server import FlowerTransport, flower_transport, resolve_run_config  # noqa: E402
from semfl.runtimes.run import Runner  # noqa: E402
from semfl.runtimes.flower.wire import FETCH_STATE, HELLO, kind_of, message_type, payload_to_record, record_to_payload  # noqa: E402

CLIENT_APP = make_client_app()
VOLATILE = ("wall_s", "missing_users")


@pytest.fixture
def flower_overrides(tiny_overrides, tmp_path, monkeypatch):
    """Short runs (conftest's SHORT_RUN: 3 users, 2 rounds, 60 images each, 50 test images, a
    one-SNR final sweep)."""
    monkeypatch.setenv("SEMFL_NODE_STATE_DIR", str(tmp_path / "nodes"))
    return tiny_overrides + SHORT_RUN


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def run_local(overrides, out):
    Runner(load_config(None, overrides), out, show_progress=False, log=lambda m: None).execute()
    return read_jsonl(out / "metrics.jsonl")


def run_flower(overrides, out, grid=None, resume=False):
    cfg = load_config(None, overrides)
    grid = grid or LoopbackGrid(CLIENT_APP, [{"user": k} for k in range(cfg.users)])
    Runner(cfg, out, resume=resume, show_progress=False, log=lambda m: None,
           transport=flower_transport(grid, log=lambda m: None)).execute()
    return read_jsonl(out / "metrics.jsonl")


def sweep_points(run_dir) -> dict:
    """snr_sweep.json as {(model, metric, SNR): value} ({} when the run wrote none)."""
    path = run_dir / "snr_sweep.json"
    if not path.is_file():
        return {}
    sweep = json.loads(path.read_text())
    return {(label, metric, snr): value for label, curves in sweep["models"].items()
            for metric, values in curves.items() for snr, value in zip(sweep["snr_db"], values)}


def assert_same_metrics(a, b, rel=1e-6):
    assert len(a) == len(b)
    for x, y in zip(stable(a), stable(b)):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-9), (x.get("scope"), x.get("round"), key)
            else:
                assert x[key] == y[key], (x.get("scope"), x.get("round"), key)


# ---------------------------------------------------------------- wire format
def test_payload_round_trip_is_lossless_and_keeps_bits():
    tensors = {"w": torch.randn(4, 3), "idx": torch.tensor([1, 5], dtype=torch.int64),
               "codes": torch.tensor([-1, 0, 1], dtype=torch.int8), "mask": torch.tensor([True, False])}
    payload = Payload(tensors, codec="sparse", meta={"num_samples": 17, "loss": 0.123456789, "pruned": True,
                                                      "participants": [0, 2]}, codecs={"codes": "ternary"})
    back, header = record_to_payload(payload_to_record(payload, {"user": 2, "round": 3}))
    assert header == {"user": 2, "round": 3}
    assert back.codec == "sparse" and back.codecs == {"codes": "ternary"} and back.meta == payload.meta
    for k, v in tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v)
    assert back.bits() == payload.bits()


def test_metadata_must_be_plain():
    with pytest.raises(TypeError, match="JSON-serialisable"):
        payload_to_record(Payload(meta={"x": object()}), {})


def test_message_types():
    assert message_type("train") == "train" and message_type("step") == "query"
    assert message_type(HELLO) == f"query.{HELLO}"
    assert kind_of("query", {"kind": "step"}) == "step" and kind_of("evaluate", {}) == "evaluate"
    assert kind_of(f"query.{FETCH_STATE}", {}) == FETCH_STATE
    with pytest.raises(ValueError, match="identifier"):
        message_type("train:batched")
    with pytest.raises(ValueError, match="name its request kind"):
        kind_of("query", {})


def test_client_app_serves_any_request_kind():
    """No list of kinds to keep: every method kind routes to the generic query handler."""
    registered = set(CLIENT_APP._registered_funcs)
    assert registered == {"train.default", "evaluate.default", "query.default", f"query.{HELLO}",
                          f"query.{FETCH_STATE}"}
    for kind in ("train", "evaluate", "step", "personalise", "features", "some_new_kind"):
        full = message_type(kind)
        assert (full if "." in full else f"{full}.default") in registered


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("method", method_group(sorted(available_methods())))
def test_flower_adapter_matches_local_transport(method, method_run, flower_overrides, tmp_path):
    """The method's short run (3 users, 2 rounds) on Flower against the same run on the local
    transport (conftest's method_run, whose user calls tests/test_halves.py replays)."""
    overrides, local, _, local_dir = method_run(method)
    flower = run_flower(overrides, tmp_path / "flower")
    assert_same_metrics(local, flower)  # link rows included: per user and round, bits compared exactly
    bits = lambda rows: [(r["round"], r["user"], r["uplink_bits"], r["downlink_bits"]) for r in rows if r["scope"] == "link"]  # noqa: E731
    assert bits(local) == bits(flower) and all(up > 0 for _, _, up, _ in bits(flower))
    # the final SNR sweep tests the final models, users' models fetched from their nodes included
    local_sweep, flower_sweep = sweep_points(local_dir), sweep_points(tmp_path / "flower")
    assert flower_sweep.keys() == local_sweep.keys()
    assert flower_sweep == pytest.approx(local_sweep, rel=1e-6, abs=1e-9, nan_ok=True)


def test_psfl_with_secure_aggregation_and_dp_matches(flower_overrides, tmp_path):
    overrides = flower_overrides + ["method=psfl", "psfl.secure_aggregation=true", "psfl.dp=true"]
    local, flower = run_local(overrides, tmp_path / "local"), run_flower(overrides, tmp_path / "flower")
    assert_same_metrics(local, flower)
    # the protocol's messages are in the link rows, the same bits on both transports: per user and
    # round, 2 public keys, an encrypted pair of shares for each other user (nonce, tag, header and
    # two 52-byte Shamir shares), the masked update (64 bits an entry), the sample count, and one
    # b-share per survivor
    from semfl.protocol.checkpoint import load_checkpoint
    entries = sum(v.numel() for v in load_checkpoint(tmp_path / "flower" / "checkpoint/state.pt")["method"]["global_weights"].values())
    users = load_config(None, overrides).users
    expected = 2 * 32 * 8 + (users - 1) * (12 + 16 + 20 + 104) * 8 + 64 * entries + 32 + users * 52 * 8
    for rows in (local, flower):
        assert [r["uplink_bits"] for r in rows if r["scope"] == "link"] == [expected] * (2 * users)


def test_secure_aggregation_recovers_a_node_killed_mid_round_and_skips_when_too_few_remain(flower_overrides, tmp_path):
    overrides = flower_overrides + ["method=psfl", "psfl.secure_aggregation=true", "rounds=3"]
    cfg = load_config(None, overrides)  # 3 users: threshold t = 2
    grid = LoopbackGrid(CLIENT_APP, [{"user": k} for k in range(cfg.users)])
    original = FlowerTransport.send
    kills = {(2, "train"): [1], (3, "secagg_shares"): [0]}  # round 2: user 1 after sharing; round 3: user 0 too

    def send(self, users, kind, payload, on_reply=None):
        for user in kills.get((self.round, kind), []):
            grid.kill(self.node_of[user])
        return original(self, users, kind, payload, on_reply)

    FlowerTransport.send = send
    try:
        rows = run_flower(overrides, tmp_path / "run", grid=grid)
    finally:
        FlowerTransport.send = original
    globals_ = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert globals_[1]["secagg_dropped"] == [] and "secagg_skipped" not in globals_[1]
    assert globals_[2]["secagg_dropped"] == [1] and globals_[2]["missing_users"] == [1]
    assert globals_[3]["secagg_skipped"] == "share distribution: 1 of 3 users answered, threshold t = 2"
    assert all(r["psnr_db"] > 0 for r in globals_.values())


# ---------------------------------------------------------------- faults and resume
@pytest.mark.parametrize("method", ["fedavg", "psfl", "fedproto", "fedcl"])
def test_dead_node_is_logged_and_training_goes_on(method, flower_overrides, tmp_path):
    overrides = flower_overrides + [f"method={method}", "rounds=3"]
    cfg = load_config(None, overrides)
    grid = LoopbackGrid(CLIENT_APP, [{"user": k} for k in range(cfg.users)])
    original = FlowerTransport.send

    def send(self, users, kind, payload, on_reply=None):
        if self.round == 2:
            grid.kill(self.node_of[1])  # user 1's node dies before round 2
        return original(self, users, kind, payload, on_reply)

    FlowerTransport.send = send
    try:
        rows = run_flower(overrides, tmp_path / "run", grid=grid)
    finally:
        FlowerTransport.send = original
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert glob[1]["missing_users"] == [] and glob[2]["missing_users"] == [1] and glob[3]["missing_users"] == [1]
    assert glob[3]["accuracy"] is not None
    uplinks = {(r["round"], r["user"]) for r in rows if r["scope"] == "link" and r["uplink_bits"] > 0}
    assert (1, 1) in uplinks and (2, 1) not in uplinks and (2, 0) in uplinks


def test_no_node_answering_stops_the_run(flower_overrides, tmp_path):
    from semfl.runtimes.run import RunError

    overrides = flower_overrides + ["method=fedavg"]
    cfg = load_config(None, overrides)
    grid = LoopbackGrid(CLIENT_APP, [{"user": k} for k in range(cfg.users)])
    original = FlowerTransport.send

    def send(self, users, kind, payload, on_reply=None):
        for node in self.node_of.values():
            grid.kill(node)
        return original(self, users, kind, payload, on_reply)

    FlowerTransport.send = send
    try:
        with pytest.raises(RunError, match="no user answered"):
            run_flower(overrides, tmp_path / "run", grid=grid)
    finally:
        FlowerTransport.send = original


def test_every_node_failing_names_the_users_and_the_cause(flower_overrides, tmp_path):
    """A deterministic failure (every node's data-root is wrong) must surface in the error, not
    only in the log, and resuming alone is not offered as the cure."""
    from semfl.runtimes.run import RunError

    overrides = flower_overrides + ["method=fedavg"]
    cfg = load_config(None, overrides)
    grid = LoopbackGrid(CLIENT_APP, [{"user": k, "data-root": str(tmp_path / "missing")} for k in range(cfg.users)])
    with pytest.raises(RunError, match=r"no user answered.*user 0's node failed on 'train': DataError") as err:
        run_flower(overrides, tmp_path / "run", grid=grid)
    assert "Fix that, then continue the run with --resume" in str(err.value)


def test_missing_node_at_start_is_named(flower_overrides, tmp_path):
    overrides = flower_overrides + ["method=fedavg", "engine.connect_timeout_s=0.5"]
    grid = LoopbackGrid(CLIENT_APP, [{"user": 0}, {"user": 2}])
    with pytest.raises(RuntimeError, match=r"no node for users \[1\]"):
        run_flower(overrides, tmp_path / "run", grid=grid)


@pytest.mark.xdist_group("method-run-psfl")
def test_resume_after_base_station_crash_matches(method_run, flower_overrides, tmp_path):
    """The base station dies in round 2 (of 2) after some users trained; the resumed run redoes round
    2 from the users' round-1 state on their nodes and gives the uninterrupted run's metrics and final
    sweep, users' models fetched from their nodes included. The uninterrupted run: PSFL's short run
    (conftest's method_run), which test_flower_adapter_matches_local_transport[psfl] checks is the
    uninterrupted Flower run's."""
    overrides, reference, _, reference_dir = method_run("psfl")
    assert load_config(None, overrides).rounds == 2
    original = FlowerTransport.send

    def crash(self, users, kind, payload, on_reply=None):
        if self.round == 2:
            original(self, users, kind, payload, None)  # users train and save round-2 state ...
            raise KeyboardInterrupt  # ... and the base station dies before aggregating
        return original(self, users, kind, payload, on_reply)

    FlowerTransport.send = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            run_flower(overrides, tmp_path / "crashed")
    finally:
        FlowerTransport.send = original
    done = lines_before(tmp_path / "crashed", 2)
    resumed = run_flower(overrides, tmp_path / "crashed", resume=True)
    assert_kept(tmp_path / "crashed", done)
    assert_same_metrics(reference, resumed)
    resumed_sweep = sweep_points(tmp_path / "crashed")
    assert resumed_sweep and resumed_sweep.keys() == sweep_points(reference_dir).keys()
    assert resumed_sweep == pytest.approx(sweep_points(reference_dir), rel=1e-6, abs=1e-9, nan_ok=True)


def test_node_rejects_a_message_for_another_user(flower_overrides, tmp_path):
    cfg = load_config(None, flower_overrides + ["method=fedavg"])
    grid = LoopbackGrid(CLIENT_APP, [{"user": k} for k in range(cfg.users)])
    from semfl.wireless.link import Link

    transport = FlowerTransport(grid, cfg, Link(cfg.link, cfg.users, cfg.seed), tmp_path, log=lambda m: None)
    transport.node_of[0], transport.node_of[1] = transport.node_of[1], transport.node_of[0]
    logged = []
    transport.log = logged.append
    assert transport.send([0], "train", Payload()) == {}
    assert any("reached the node of user" in m for m in logged)


# ---------------------------------------------------------------- node state
def test_state_store_restarts_a_round_from_the_previous_one(tmp_path):
    store = UserStateStore(tmp_path / "u0")
    assert store.load(1, 0) == {}
    store.save(1, {"v": 1})
    store.save(2, {"v": 2})  # an attempt at round 2 ...
    assert store.load(2, 0) == {"v": 1}  # ... redone from round 1's state: round 2's file is dropped
    store.save(2, {"v": 20})
    assert store.load(2, 1) == {"v": 20}  # a later message of the same round continues it
    store.save(3, {"v": 3})
    store.save(4, {"v": 4})
    assert sorted(p.name for p in (tmp_path / "u0").iterdir()) == ["round-3.pt", "round-4.pt"]
    assert store.latest(3) == {"v": 3}


def test_state_store_keeps_a_skipping_users_last_state(tmp_path):
    """A user absent from rounds 2-3 (participation < 1) trains again in round 4; the base station
    crashes in round 4 and resumes it: the redone round must start from round 1's state again."""
    store = UserStateStore(tmp_path / "u2")
    store.save(1, {"mentor": "trained in round 1"})
    assert store.load(4, 0) == {"mentor": "trained in round 1"}
    store.save(4, {"mentor": "trained in round 4"})
    assert sorted(p.name for p in (tmp_path / "u2").iterdir()) == ["round-1.pt", "round-4.pt"]
    assert store.load(4, 0) == {"mentor": "trained in round 1"}  # the resumed attempt


def test_run_config_resolution(tmp_path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text('method = "psfl"\nusers = 4\n')
    cfg, out, resume = resolve_run_config({"config": str(cfg_path), "set": "rounds=2; seed=3", "out": str(tmp_path / "o")})
    assert (cfg.method, cfg.users, cfg.rounds, cfg.seed, out, resume) == ("psfl", 4, 2, 3, (tmp_path / "o").resolve(), False)
    cfg, _, _ = resolve_run_config({"config-toml": 'method = "stc"\n', "resume": True})
    assert cfg.method == "stc"
    from semfl.config import ConfigError

    with pytest.raises(ConfigError, match="config"):
        resolve_run_config({})
