"""docs/adding-a-method.md is complete: its example method, written into a temporary package that
declares it as a ``semfl.methods`` entry point, is found and run by ``semfl run`` with no change to semfl."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def _example_module() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (module,) = [b for b in blocks if "@register_method" in b]
    return module


def test_the_documented_method_runs_as_a_plugin(tmp_path, tiny_overrides, monkeypatch):
    package = tmp_path / "site" / "toy_semfl"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(_example_module())
    dist = tmp_path / "site" / "toy_semfl-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-semfl\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[semfl.methods]\ntoy = toy_semfl.toy\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    args = [a for o in tiny_overrides + ["method=toy-mean", "rounds=2", "toy.scale=1.0", "eval.snr_sweep=[]",
                                          "eval.grid_images=0"] for a in ("--set", o)]
    # a new process, as a user starts it: `import semfl.methods` finds the entry point by itself, and
    # the toy's own table check answers (only the plugin knows toy.scale)
    bad = subprocess.run([sys.executable, "-m", "semfl.cli", "run", "--out", str(tmp_path / "bad"),
                          *args, "--set", "toy.scale=-1"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "toy.scale: must be > 0" in bad.stderr, bad.stderr[-2000:]

    # the run itself in this process (no second torch import): the same discovery, load_plugins(), which
    # `import semfl.methods` calls, on registries restored after the test (no toy-mean left behind)
    import semfl.config
    import semfl.protocol.method
    from semfl.cli import main
    from semfl.methods import load_plugins

    for module, name in ((semfl.protocol.method, "_METHODS"), (semfl.config, "_METHOD_TABLES"),
                         (semfl.config, "_METHOD_READS")):
        monkeypatch.setattr(module, name, dict(getattr(module, name)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        assert "toy_semfl.toy" in load_plugins()
        assert main(["run", "--quiet", "--out", str(out), *args]) == 0
    finally:
        for name in ("toy_semfl.toy", "toy_semfl"):
            sys.modules.pop(name, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["scope"] == "global"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the averaged user mean is closer than zeros
    uplink = [r["uplink_bits"] for r in rows if r["scope"] == "link"]
    assert uplink and all(bits > 0 for bits in uplink)  # the transport charged the toy's replies
