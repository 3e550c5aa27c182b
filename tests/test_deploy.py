"""A real Flower deployment on 127.0.0.1: SuperLink + 2 SuperNodes as processes (semfl deploy local),
2 rounds of PSFL, metrics and bits identical to the local transport; no process left behind. The
whole runs are slow (`make test-slow`); the default suite starts and stops the processes for real
and checks the rest in-process (each slow test's docstring names the fast one)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("flwr")
# these tests look for leftover Flower processes machine-wide, so they share one pytest worker
pytestmark = pytest.mark.xdist_group("flower-deployment")

from semfl.config import load_config  # noqa: E402
from semfl.runtimes.flower.deploy import LocalDeployment, make_node_key  # noqa: E402
from semfl.files import read_jsonl  # noqa: E402
from semfl.runtimes.run import Runner  # noqa: E402
from conftest import SHORT_RUN  # noqa: E402
from test_flower import assert_same_metrics  # noqa: E402


def flower_processes(work) -> list[str]:
    # -ww: whole command lines; without it ps may cut them to the terminal's width (COLUMNS, or 80),
    # which drops "flwr-serverapp" from behind a long venv path
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "<defunct>" not in line and (
        (str(work) in line and "flower-super" in line) or any(app in line for app in ("flwr-serverapp", "flwr-clientapp")))]


@pytest.fixture
def psfl_overrides(tiny_overrides):
    """PSFL, 2 users, 2 rounds of conftest's short runs (60 images each, 50 test images, no SNR sweep
    or grid): what these tests compare is metrics.jsonl, the run's end and its processes."""
    return tiny_overrides + SHORT_RUN + ["method=psfl", "users=2"]


@pytest.mark.slow
def test_real_loopback_deployment_matches_local_transport(psfl_overrides, tmp_path):
    """The whole deployment, end to end (minutes: every message starts a ClientApp process). In the
    default suite: the Flower adapter's equivalence with the local transport (real ClientApp/ServerApp
    code, messages through Flower's protobuf) is test_flower.py::test_flower_adapter_matches_local_transport[psfl],
    2 rounds and bit counts included; a node serving each message from a fresh process is
    test_halves.py::test_user_handlers_need_nothing_from_the_base_station; the processes started and
    stopped for real, test_deployment_stops_everything_when_interrupted; what execute does with the
    finished run (its status, the ServerApp's log, the report), test_deployment_checks_how_the_run_ended."""
    cfg = load_config(None, psfl_overrides)
    Runner(cfg, tmp_path / "local", show_progress=False, log=lambda m: None).execute()
    deployment = LocalDeployment(cfg, tmp_path / "deployed", timeout_s=480, log=lambda m: None)
    deployment.execute()
    local, deployed = read_jsonl(tmp_path / "local" / "metrics.jsonl"), read_jsonl(tmp_path / "deployed" / "metrics.jsonl")
    assert_same_metrics(local, deployed)
    assert (tmp_path / "deployed" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "deployed" / "deploy" / "logs").iterdir()) == [
        "serverapp.log", "superlink.log", "supernode-0.log", "supernode-1.log"]
    assert not flower_processes(tmp_path / "deployed")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_deployment_stops_everything_when_interrupted(psfl_overrides, tmp_path, stop):
    """Ctrl-C (or a SIGTERM: `kill`, a job scheduler) while waiting for the run, once the ServerApp
    runs: every SuperLink/SuperNode process, and the ServerApp/ClientApp processes Flower started
    detached, are stopped, and SIGTERM's own handler is back afterwards."""
    # a shell's background job starts with SIGINT ignored; Ctrl-C in a terminal uses Python's handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = load_config(None, psfl_overrides + ["rounds=50"])
    # generous limits: on a loaded 2-core CI machine the SuperLink has taken over a minute to start the ServerApp
    deployment = LocalDeployment(cfg, tmp_path / "run", timeout_s=400, log=lambda m: None)
    main_thread = threading.main_thread().ident
    started = threading.Event()
    original = deployment.wait

    def wait(run_id):
        started.set()
        return original(run_id)

    deployment.wait = wait

    apps: list[str] = []

    def interrupt():
        started.wait(300)
        deadline = time.monotonic() + 300
        while not apps and time.monotonic() < deadline:  # until the SuperLink has started the ServerApp
            apps.extend(line for line in flower_processes(tmp_path / "run") if "flwr-serverapp" in line)
            time.sleep(0.2)
        signal.pthread_kill(main_thread, stop)

    threading.Thread(target=interrupt, daemon=True).start()
    term_handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            deployment.execute()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) is term_handler
    logs = tmp_path / "run" / "deploy" / "logs"
    assert started.is_set() and apps, "no ServerApp process seen; the SuperLink's log ends:\n" + (
        (logs / "superlink.log").read_text()[-3000:] if (logs / "superlink.log").is_file() else "(none)")
    assert not deployment.processes
    deadline = time.monotonic() + 1  # what is gone within a second (the detached ServerApp too)
    while flower_processes(tmp_path / "run") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not flower_processes(tmp_path / "run")


def test_terminate_and_hangup_stop_the_deployment_unless_ignored_or_already_stopping():
    """The signal handling of `semfl deploy local` on its own: SIGTERM (and SIGHUP) become the
    KeyboardInterrupt that stops every process; a SIGHUP ignored by `nohup` stays ignored; once the
    processes are being stopped, a signal is ignored so it cannot cut that short; the handlers are
    put back afterwards."""
    from semfl.runtimes.flower.deploy import _terminate_as_interrupt

    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with pytest.raises(KeyboardInterrupt, match=sig.name):
                with _terminate_as_interrupt():
                    os.kill(os.getpid(), sig)
                    time.sleep(5)
            assert signal.getsignal(sig) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
        with _terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        with _terminate_as_interrupt() as stopping:
            stopping()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_deployment_checks_how_the_run_ended(psfl_overrides, tmp_path, monkeypatch):
    """execute once the Flower run has ended, with the processes and the `flwr` CLI stood in for (the
    real deployment: test_real_loopback_deployment_matches_local_transport, slow): a completed run that
    wrote its report gives its directory, with the ServerApp's log kept; a run that ended otherwise, or
    wrote no report, is a DeployError that says where to look."""
    import subprocess as sp

    from semfl.runtimes.flower.deploy import DeployError

    import json

    from semfl.runtimes.flower import deploy

    cfg = load_config(None, psfl_overrides)
    statuses: list[str] = []

    def flwr(self, *args, timeout=None):  # `flwr ls` answers with the next status, `flwr log` with a log
        if args[0] == "ls":
            out = "warning: a banner first\n" + json.dumps({"success": True, "runs": [{"run-id": args[2], "status": statuses.pop(0)}]})
        else:
            out = f"log of {' '.join(args)}"
        return sp.CompletedProcess(args, 0, stdout=out, stderr="")

    monkeypatch.setattr(LocalDeployment, "start_superlink", lambda self: 1)
    monkeypatch.setattr(LocalDeployment, "start_supernodes", lambda self, port: None)
    monkeypatch.setattr(LocalDeployment, "submit", lambda self: "7")
    monkeypatch.setattr(LocalDeployment, "flwr", flwr)
    monkeypatch.setattr(deploy.time, "sleep", lambda s: None)

    statuses[:] = ["running", "finished:completed", "finished:completed"]  # polled until it finishes
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.html").write_text("<html></html>")
    assert LocalDeployment(cfg, tmp_path / "done", log=lambda m: None).execute() == (tmp_path / "done").resolve()
    assert (tmp_path / "done" / "deploy" / "logs" / "serverapp.log").read_text() == "log of log 7 deploy --show"
    with pytest.raises(DeployError, match="wrote no report"):
        LocalDeployment(cfg, tmp_path / "no-report", log=lambda m: None).execute()
    assert not statuses
    statuses[:] = ["finished:failed"]
    with pytest.raises(DeployError, match=r"run 7 ended as finished:failed; see the ServerApp's log .*serverapp\.log"):
        LocalDeployment(cfg, tmp_path / "failed", log=lambda m: None).execute()
    assert (tmp_path / "failed" / "deploy" / "logs" / "serverapp.log").is_file()


def test_existing_run_needs_resume(psfl_overrides, tmp_path):
    from semfl.runtimes.flower.deploy import DeployError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(DeployError, match="--resume"):
        LocalDeployment(load_config(None, psfl_overrides), tmp_path / "run").execute()


def test_node_keys_are_openssh_p384(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    private, public = make_node_key(tmp_path, 3)
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert oct(os.stat(private).st_mode & 0o777) == "0o600"


def test_certificate_script_signs_a_server_certificate(tmp_path, monkeypatch):
    from semfl.runtimes.flower.deploy import make_certificates

    monkeypatch.setenv("SEMFL_CERT_RSA_BITS", "2048")  # the script's 4096-bit keys take seconds to find
    folder = make_certificates(tmp_path / "certs")
    for key in ("ca.key", "server.key"):
        text = subprocess.run(["openssl", "rsa", "-in", str(folder / key), "-noout", "-text"],
                              capture_output=True, text=True).stdout
        assert "(2048 bit" in text, text[:200]
    check = subprocess.run(["openssl", "verify", "-CAfile", str(folder / "ca.crt"), str(folder / "server.pem")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    san = subprocess.run(["openssl", "x509", "-in", str(folder / "server.pem"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True).stdout
    assert "127.0.0.1" in san and "localhost" in san


@pytest.mark.slow
def test_real_node_death_mid_run_is_survived(psfl_overrides, tmp_path):
    """Kill user 1's SuperNode (its whole process group) after round 1: round 2 finishes with user 0,
    user 1 is listed in missing_users, and the run completes. (A message costs a fresh process on a
    SuperNode, seconds under load, hence the generous reply timeout.)"""
    from semfl.files import read_jsonl as rows_of

    cfg = load_config(None, psfl_overrides + ["rounds=2", "engine.reply_timeout_s=120"])
    out = tmp_path / "run"
    deployment = LocalDeployment(cfg, out, timeout_s=900, log=lambda m: None)

    def killer():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            path = out / "metrics.jsonl"
            if path.exists() and any(r.get("scope") == "global" and r["round"] == 1 for r in rows_of(path)):
                node = dict(deployment.processes)["supernode-1"]
                os.killpg(node.pid, signal.SIGKILL)
                return
            time.sleep(0.5)

    threading.Thread(target=killer, daemon=True).start()
    deployment.execute()
    glob = {r["round"]: r for r in rows_of(out / "metrics.jsonl") if r["scope"] == "global"}
    assert glob[1]["missing_users"] == [] and glob[2]["missing_users"] == [1]
    assert set(glob) == {0, 1, 2}
    assert "serverapp.log" in {p.name for p in (out / "deploy" / "logs").iterdir()}


@pytest.mark.slow
def test_secure_aggregation_survives_a_supernode_killed_mid_round(tiny_overrides, tmp_path):
    """PSFL with secure aggregation on a real deployment of 3 SuperNodes (threshold t = 2): user 1's
    SuperNode is killed in round 2 when it receives the train request (so after it has shared its
    secrets), before its masked update arrives. The survivors' shares unmask the sum without it; the run completes."""
    from semfl.files import read_jsonl as rows_of

    cfg = load_config(None, tiny_overrides + ["method=psfl", "users=3", "rounds=2", "psfl.secure_aggregation=true",
                                              "engine.reply_timeout_s=300", "engine.connect_timeout_s=900"])
    out = tmp_path / "run"
    deployment = LocalDeployment(cfg, out, timeout_s=1500, log=lambda m: None)
    killed = threading.Event()

    def train_received() -> bool:  # user 1's SuperNode took round 2's train request: it has shared its secrets
        log = out / "deploy" / "logs" / "supernode-1.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "ROUND 2]" in text and "Receiving: train message" in text[text.index("ROUND 2]"):]

    def killer():
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and not killed.is_set():
            if train_received():
                os.killpg(dict(deployment.processes)["supernode-1"].pid, signal.SIGKILL)
                killed.set()
            time.sleep(0.05)

    threading.Thread(target=killer, daemon=True).start()
    deployment.execute()
    assert killed.is_set()
    glob = {r["round"]: r for r in rows_of(out / "metrics.jsonl") if r["scope"] == "global"}
    assert glob[1]["secagg_dropped"] == [] and glob[1]["missing_users"] == []
    assert glob[2]["secagg_dropped"] == [1] and 1 in glob[2]["missing_users"] and "secagg_skipped" not in glob[2]
    assert set(glob) == {0, 1, 2} and glob[2]["psnr_db"] > 0


@pytest.mark.slow
def test_tls_and_auth_keep_intruders_out_and_the_run_undisturbed(psfl_overrides, tmp_path):
    """`semfl deploy local --tls --auth` with three intruding SuperNodes that each claim user 0 and
    each lack exactly one thing: a registered key, trust in the deployment's CA, or TLS at all.
    None of them gets in (had one connected, the base station would see two nodes serving user 0
    and stop); the authorised users' run matches the local transport. Measured: the unregistered-key
    and other-CA nodes log "Connection attempt failed" until stopped; the plain-text one is refused
    by flower-supernode itself (exit code 303: an auth key needs TLS), so it never reaches the
    SuperLink; plain-text clients without a key against TLS alone: the next test."""
    from semfl.runtimes.flower.deploy import free_port, make_certificates

    cfg = load_config(None, psfl_overrides + ["rounds=1", "engine.connect_timeout_s=900"])
    Runner(cfg, tmp_path / "local", show_progress=False, log=lambda m: None).execute()
    out = tmp_path / "deployed"

    class WithIntruders(LocalDeployment):
        def start_supernodes(self, port: int) -> None:
            super().start_supernodes(port)
            registered, public = make_node_key(self.work / "keys", 7)
            assert self.flwr("supernode", "register", str(public), "deploy", timeout=60).returncode == 0
            (self.work / "intruder-keys").mkdir(exist_ok=True)
            unregistered, _ = make_node_key(self.work / "intruder-keys", 8)
            other_ca = make_certificates(self.work / "other-ca") / "ca.crt"
            ca = self.work / "certs" / "ca.crt"
            for name, extra in (("unregistered-key", ["--root-certificates", str(ca), "--auth-supernode-private-key", str(unregistered)]),
                                ("other-ca", ["--root-certificates", str(other_ca), "--auth-supernode-private-key", str(registered)]),
                                ("plain-text", ["--insecure", "--auth-supernode-private-key", str(registered)])):
                self.start(f"intruder-{name}", [str(self.bin / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                                "--port", str(free_port()), "--isolation", "subprocess", "--node-config",
                                                f'user=0 state-dir="{self.work / "intruder-state"}"', *extra])
            time.sleep(5)  # give the intruders time to try before the run discovers its nodes

    WithIntruders(cfg, out, tls=True, auth=True, timeout_s=1500, log=lambda m: None).execute()
    local, deployed = read_jsonl(tmp_path / "local" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert_same_metrics(local, deployed)
    logs = {p.name: p.read_text(errors="replace") for p in (out / "deploy" / "logs").glob("intruder-*.log")}
    assert sorted(logs) == ["intruder-other-ca.log", "intruder-plain-text.log", "intruder-unregistered-key.log"]
    print({name: text[-600:] for name, text in logs.items()})  # shown with -s: what each intruder was told
    assert not (out / "deploy" / "intruder-state").exists()  # no intruder ever served a message
    assert not flower_processes(out)


@pytest.mark.slow
def test_tls_keeps_plain_text_clients_out_and_the_run_undisturbed(psfl_overrides, tmp_path):
    """`semfl deploy local --tls` (no --auth: TLS alone is on trial) and three plain-text clients of
    its SuperLink: a SuperNode started with --insecure and no key, claiming user 0 (had it connected,
    the base station would see two nodes serving user 0 and stop the run); the `flwr` CLI with
    `insecure = true`; and a bare HTTP request. None gets through, while the same CLI and request over
    TLS with the deployment's CA do (the controls), and the authorised users' run matches the local
    transport. Measured: the SuperNode logs "Connection attempt failed" until stopped, the CLI says
    "Connection to the SuperLink is unavailable", the HTTP request is cut off without a response
    (RemoteDisconnected), and the SuperLink's access log has no line for any of them."""
    import ssl
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    from semfl.runtimes.flower.deploy import free_port

    cfg = load_config(None, psfl_overrides + ["rounds=1", "engine.connect_timeout_s=900"])
    Runner(cfg, tmp_path / "local", show_progress=False, log=lambda m: None).execute()
    out = tmp_path / "deployed"
    probes: dict[str, object] = {}

    def request(url: str, context=None):
        try:
            with urllib.request.urlopen(url, timeout=30, context=context) as reply:
                return reply.status
        except urllib.error.HTTPError as error:  # an HTTP answer: the request got through
            return error.code
        except (HTTPException, OSError) as error:
            return f"{type(error).__name__}: {error}"

    class WithPlainTextClients(LocalDeployment):
        def start_supernodes(self, port: int) -> None:
            super().start_supernodes(port)
            self.start("intruder-plain-text", [
                str(self.bin / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                "--isolation", "subprocess", "--insecure",
                "--node-config", f'user=0 state-dir="{self.work / "intruder-state"}"'])
            home = self.work / "flwr-home-plain-text"
            home.mkdir()
            (home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                              f'address = "127.0.0.1:{port}"\ninsecure = true\n')
            plain = subprocess.run([str(self.bin / "flwr"), "ls", "--format", "json"], capture_output=True, text=True,
                                   env=dict(self.env, FLWR_HOME=str(home)), cwd=self.work, timeout=120)
            probes["cli plain"] = plain.stdout + plain.stderr
            tls = self.flwr("ls", "--format", "json", timeout=120)
            probes["cli tls"] = tls.stdout + tls.stderr
            probes["http plain"] = request(f"http://127.0.0.1:{port}/")
            ca = ssl.create_default_context(cafile=str(self.work / "certs" / "ca.crt"))
            probes["http tls"] = request(f"https://127.0.0.1:{port}/", ca)
            time.sleep(5)  # give the plain-text SuperNode time to try before the run discovers its nodes

    WithPlainTextClients(cfg, out, tls=True, timeout_s=1500, log=lambda m: None).execute()
    print(probes)  # shown with -s
    local, deployed = read_jsonl(tmp_path / "local" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert_same_metrics(local, deployed)
    logs = out / "deploy" / "logs"
    node_log = (logs / "intruder-plain-text.log").read_text(errors="replace")
    assert "Starting insecure channel" in node_log and "Connection attempt failed" in node_log, node_log[-2000:]
    assert not (out / "deploy" / "intruder-state").exists()  # it never served a message
    assert '"success": false' in probes["cli plain"] and "unavailable" in probes["cli plain"], probes["cli plain"]
    assert '"success": true' in probes["cli tls"], probes["cli tls"]  # the control: over TLS the same CLI gets in
    assert isinstance(probes["http plain"], str), probes["http plain"]  # a connection error, not an HTTP status
    assert probes["http tls"] == 404, probes["http tls"]  # the control: over TLS the request reaches the app
    access = [line for line in (logs / "superlink.log").read_text(errors="replace").splitlines() if "uvicorn.access" in line]
    assert any('"GET / HTTP/1.1" 404' in line for line in access)  # the TLS request, and only it, is logged
    assert sum('"GET / HTTP/1.1"' in line for line in access) == 1, access
    assert not flower_processes(out)
