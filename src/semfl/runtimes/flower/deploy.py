"""`semfl deploy local`: a real Flower deployment on this machine.

Starts a SuperLink and one SuperNode per user as separate processes on 127.0.0.1, submits the
config as a Flower run (`flwr run` against that SuperLink), waits for it, and stops every process
it started, also on Ctrl-C, SIGTERM, SIGHUP or failure. Optional TLS (certificates from scripts/flower-certs.sh or
generated here) and SuperNode authentication (one EC key pair per node, registered with the
SuperLink). Logs, Flower's home, certificates and keys go under <out>/deploy/.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from semfl.config import Config, ConfigError, dump_config
from semfl.files import CHECKOUT
from semfl.runtimes.run import RunError


class DeployError(RunError):
    pass


def app_dir() -> Path:
    """The repository holding pyproject.toml with [tool.flwr.app] (semfl installed editable)."""
    root = CHECKOUT
    if not (root / "pyproject.toml").is_file() or "[tool.flwr.app]" not in (root / "pyproject.toml").read_text():
        raise DeployError(f"semfl deploy needs the semfl repository as the Flower App (no pyproject.toml with "
                          f"[tool.flwr.app] at {root}); install semfl from a clone with `pip install -e .`")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {process.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeployError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout:g} s; see {log}")


def make_certificates(folder: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost (scripts/flower-certs.sh)."""
    script = app_dir() / "scripts" / "flower-certs.sh"
    result = subprocess.run(["bash", str(script), str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        raise DeployError(f"making TLS certificates failed: {result.stderr.strip()[-500:]}")
    return folder


def make_node_key(folder: Path, user: int) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication, both in OpenSSH format (as `ssh-keygen -t ecdsa -b 384`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"node-{user}.key", folder / f"node-{user}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


@dataclass
class LocalDeployment:
    cfg: Config
    out: Path
    resume: bool = False
    tls: bool = False
    auth: bool = False
    timeout_s: float = 3600.0
    log: callable = print
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def __post_init__(self):
        self.out = Path(self.out).resolve()
        self.work = self.out / "deploy"
        self.bin = Path(sys.executable).parent
        self.env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                        FLWR_HOME=str(self.work / "flwr-home"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        SEMFL_NODE_STATE_DIR=str(self.work / "node-state"), PYTHONUNBUFFERED="1")

    # ------------------------------------------------------------------ processes
    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log_path = self.work / "logs" / f"{name}.log"
        handle = open(log_path, "ab")
        process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                   start_new_session=True)  # its own process group: stopped with its children
        handle.close()
        self.processes.append((name, process))
        return process

    def stop_all(self) -> None:
        # Flower starts ServerApp/ClientApp processes detached (their own sessions): find them first
        detached = [pid for pid in _descendants([p.pid for _, p in self.processes]) if _pgid(pid) not in
                    {p.pid for _, p in self.processes}]
        for _, process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for pid in detached:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        groups = [process.pid for _, process in self.processes] + [-pid for pid in detached]
        while groups and time.monotonic() < deadline:  # the groups include ServerApp/ClientApp children
            for _, process in self.processes:
                process.poll()  # reap
            groups = [g for g in groups if _group_alive(g)]
            time.sleep(0.2)
        for group in groups:
            try:
                os.kill(-group, signal.SIGKILL) if group < 0 else os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _, process in self.processes:
            process.wait()
        self.processes.clear()

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "flwr"), *args], capture_output=True, text=True, env=self.env,
                              cwd=self.work, timeout=timeout)

    # ------------------------------------------------------------------ steps
    def start_superlink(self) -> int:
        port = free_port()
        args = [str(self.bin / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                "--database", str(self.work / "superlink.db")]
        if self.tls:
            certs = self.work / "certs"
            args += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                     "--ssl-keyfile", str(certs / "server.key")]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--enable-supernode-auth"]
        process = self.start("superlink", args)
        wait_for_port(port, 60, process, self.work / "logs" / "superlink.log")
        self.write_flower_config(port)
        return port

    def write_flower_config(self, port: int) -> None:
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "deploy"', "", "[superlink.deploy]", f'address = "127.0.0.1:{port}"']
        lines += [f'root-certificates = "{self.work / "certs" / "ca.crt"}"'] if self.tls else ["insecure = true"]
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def start_supernodes(self, port: int) -> None:
        for user in range(self.cfg.users):
            args = [str(self.bin / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                    "--port", str(free_port()), "--isolation", "subprocess",
                    "--node-config", f'user={user} state-dir="{self.work / "node-state"}"']
            args += ["--root-certificates", str(self.work / "certs" / "ca.crt")] if self.tls else ["--insecure"]
            if self.auth:
                private, public = make_node_key(self.work / "keys", user)
                registered = self.flwr("supernode", "register", str(public), "deploy", timeout=60)
                if registered.returncode != 0:
                    raise DeployError(f"registering user {user}'s SuperNode key failed: "
                                      f"{(registered.stdout + registered.stderr).strip()[-500:]}")
                args += ["--auth-supernode-private-key", str(private)]
            self.start(f"supernode-{user}", args)

    def submit(self) -> str:
        overrides = self.work / "run-config.toml"
        overrides.write_text(f"config-toml = {json.dumps(dump_config(self.cfg))}\nout = {json.dumps(str(self.out))}\n"
                             f"resume = {'true' if self.resume else 'false'}\nset = \"\"\n")
        result = self.flwr("run", str(app_dir()), "deploy", "--run-config", str(overrides), "--format", "json",
                           timeout=300)
        try:
            reply = json.loads(result.stdout[result.stdout.index("{"):])
        except ValueError:
            reply = {}
        if result.returncode != 0 or not reply.get("success", False):
            raise DeployError(f"flwr run failed: {(result.stdout + result.stderr).strip()[-800:]}")
        return str(reply["run-id"])

    def status(self, run_id: str) -> str:
        result = self.flwr("ls", "--run-id", run_id, "--format", "json", timeout=60)
        try:
            runs = json.loads(result.stdout[result.stdout.index("{"):]).get("runs", [])
        except ValueError:
            return "unknown"
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def wait(self, run_id: str) -> str:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if name == "superlink" and process.poll() is not None:
                    raise DeployError(f"the SuperLink died (exit {process.returncode}); rerun with --resume "
                                      f"to continue from the last checkpoint in {self.out}")
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2)
        raise DeployError(f"the run did not finish within {self.timeout_s:g} s")

    def save_run_log(self, run_id: str) -> None:
        """The ServerApp's log (its errors included), kept before the SuperLink that holds it stops."""
        try:
            result = self.flwr("log", run_id, "deploy", "--show", timeout=60)
            (self.work / "logs" / "serverapp.log").write_text(result.stdout + result.stderr)
        except subprocess.TimeoutExpired:
            pass

    def execute(self) -> Path:
        if not self.resume and (self.out / "metrics.jsonl").exists():
            raise DeployError(f"--out: {self.out} already holds a run; pass --resume to continue it or choose another --out")
        for sub in ("logs", "keys"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        if (self.work / "superlink.db").exists():
            (self.work / "superlink.db").unlink()  # a fresh SuperLink; the run itself resumes from its checkpoint
        if self.tls:
            make_certificates(self.work / "certs")
        with _terminate_as_interrupt() as stopping:
            try:
                port = self.start_superlink()
                self.start_supernodes(port)
                self.log(f"SuperLink on 127.0.0.1:{port}{' (TLS)' if self.tls else ''}, {self.cfg.users} SuperNodes"
                         f"{' (authenticated)' if self.auth else ''}; logs in {self.work / 'logs'}")
                run_id = self.submit()
                self.log(f"flower run {run_id} submitted; waiting for it to finish")
                status = self.wait(run_id)
                self.save_run_log(run_id)
                if status != "finished:completed":
                    raise DeployError(f"run {run_id} ended as {status}; see the ServerApp's log "
                                      f"{self.work / 'logs' / 'serverapp.log'} and the others beside it")
            finally:
                stopping()  # from here a signal is ignored, so it cannot cut the stopping short
                self.stop_all()
        if not (self.out / "report.html").exists():
            raise DeployError(f"the run finished but wrote no report in {self.out}")
        return self.out



@contextmanager
def _terminate_as_interrupt():
    """SIGTERM and SIGHUP (``kill``, a closed terminal, a job scheduler stopping the job) end the
    deployment as Ctrl-C does, through the code that stops every Flower process it started; by
    default they would end Python at once and leave those processes running. A signal that is
    ignored already (SIGHUP under ``nohup``) stays ignored. Yields ``stopping()``: call it before
    stopping the processes; later signals are then ignored, so none can cut the stopping short."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    state = {"stopping": False}

    def interrupt(signum, frame):
        if not state["stopping"]:
            state["stopping"] = True
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig, handler in previous.items():
        if handler is signal.SIG_DFL:
            signal.signal(sig, interrupt)
    try:
        yield lambda: state.update(stopping=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_deploy_local(args) -> int:
    from semfl.config import load_config

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(f"--timeout: must be a finite number of seconds > 0, got {args.timeout}")
    cfg = load_config(args.config, list(args.set) + [f"users={args.users}"])
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{cfg.method}-s{cfg.seed}-flower"
    if args.resume and not (out / "config.toml").is_file():  # checked before any Flower process starts
        raise ConfigError(f"--resume: {out} has no config.toml to resume")
    run_dir = LocalDeployment(cfg, out, resume=args.resume, tls=args.tls, auth=args.auth,
                              timeout_s=args.timeout).execute()
    print(f"run directory: {run_dir}\nreport: {run_dir / 'report.html'}")
    return 0


def _descendants(roots: list[int]) -> list[int]:
    """Every living descendant of the processes `roots` (from `ps`, as no psutil is assumed)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for pid, ppid in zip(table[::2], table[1::2]):
        children.setdefault(int(ppid), []).append(int(pid))
    found, stack = [], list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def _group_alive(group: int) -> bool:
    """A process group (group > 0) or a single process (-pid) still exists."""
    try:
        if group < 0:
            os.kill(-group, 0)
        else:
            os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
