"""One process at a time in a run directory or a sweep folder: a second one stops at once with an
error naming the owner's pid, and writes nothing there."""
import os
import subprocess
import sys
import textwrap

import pytest

from semfl.cli import main
from semfl.config import load_config
from semfl.experiments.sweep import load_sweep, run_sweep
from semfl.files import FolderBusy, folder_lock
from semfl.runtimes.run import Runner


def test_the_lock_names_its_owner_and_goes_with_the_process(tmp_path):
    held = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from semfl.files import folder_lock
        with folder_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy, match=rf"in use by another process \(pid {held.pid}\)"):
            with folder_lock(tmp_path):
                pass
    finally:
        held.kill()
        held.wait()
    with folder_lock(tmp_path):  # a killed owner leaves no stale lock
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_a_second_run_in_a_busy_run_directory_stops_and_writes_nothing(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["rounds=1"])
    with folder_lock(out):
        with pytest.raises(FolderBusy, match="run directory is in use"):
            Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
        code = main(["run", "--out", str(out), *sum((["--set", o] for o in tiny_overrides + ["rounds=1"]), [])])
        assert code == 2 and f"pid {os.getpid()}" in capsys.readouterr().err
    Runner(cfg, out, show_progress=False, log=lambda m: None).execute()  # free again: it runs
    assert (out / "metrics.jsonl").is_file()


def test_a_second_sweep_in_a_busy_folder_stops_before_touching_it(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('method = "fedavg"\nscale = "tiny"\n[sweep]\nname = "busy"\nseed = [0, 1]\n')
    out = tmp_path / "sweep"
    with folder_lock(out):
        with pytest.raises(FolderBusy, match="sweep folder is in use"):
            run_sweep(load_sweep(path), out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no sweep.json, no point started
