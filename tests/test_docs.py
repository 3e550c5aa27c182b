"""The documentation works as written: every `semfl ...` command in a code block of README.md and
docs/ parses (runs are validated with --dry-run, config show runs, sweeps expand), every configs/...
path named exists and loads, and every relative link (and #anchor) resolves."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from semfl.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMAND_DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK_DOCS = COMMAND_DOCS + [REPO / "REPRODUCTION.md", REPO / "BENCHMARKS.md", REPO / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CONFIG_PATH = re.compile(r"(?<![\w/.])configs/[\w./*-]+\.toml")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def commands() -> list[tuple[str, list[str], str]]:
    """(where, argv, expected error) of every `semfl` command line in a fenced code block (a leading
    `$ ` is dropped); a command followed by a `semfl: error: ...` line is documented to fail so."""
    found = []
    for doc in COMMAND_DOCS:
        for block in FENCE.findall(doc.read_text()):
            lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()] + [""]
            for line, after in zip(lines, lines[1:]):
                line = line.removeprefix("$ ")
                if not line.startswith("semfl ") or "<" in line:
                    continue
                argv = shlex.split(line, comments=True)[1:]
                found.append((f"{_rel(doc)}: {line}", argv, after if after.startswith("semfl: error:") else ""))
    return found


def config_paths() -> list[tuple[str, str]]:
    return sorted({(_rel(doc), m) for doc in COMMAND_DOCS for m in CONFIG_PATH.findall(doc.read_text())})


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_docs_name_commands_and_configs():
    # the scan itself: a regex that silently matched nothing would pass every check below
    names = {argv[0] for _, argv, _ in commands() if argv}
    assert {"run", "config", "sweep", "models", "data", "report", "compare", "deploy", "pretrain"} <= names
    assert ("README.md", "configs/smoke.toml") in config_paths()


@pytest.mark.parametrize("where,argv,error", commands(), ids=[w for w, _, _ in commands()])
def test_documented_command_parses_and_validates(where, argv, error, capsys):
    if error:  # documented to fail: exactly that one line, exit status 2
        assert main([*argv, "--dry-run"] if argv[0] == "run" else argv) == 2, where
        assert capsys.readouterr().err.strip() == error, where
        return
    parser = build_parser()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()) as err:
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version exit 0; a parse error exits 2
        assert exc.code == 0, f"{where}: {err.getvalue()}"
        assert stdout.getvalue().startswith(("usage: semfl", "semfl ")), where
        return
    if args.command == "run":
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main([*argv, "--dry-run"]) == 0, where
        assert out.getvalue().startswith("would run: method "), where
    elif args.command == "config":
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(argv) == 0, where
        assert out.getvalue().startswith("method "), where
    elif args.command == "sweep":
        from semfl.experiments.sweep import load_sweep

        sweep = load_sweep(REPO / args.config, args.set)
        assert sweep.points and all(p.config() for p in sweep.points), where
    elif args.command in ("pretrain", "deploy"):
        from semfl.config import load_config

        load_config(REPO / args.config, args.set)


@pytest.mark.parametrize("where,path", config_paths(), ids=[f"{w}: {p}" for w, p in config_paths()])
def test_documented_config_exists_and_loads(where, path):
    from semfl.config import load_config
    from semfl.experiments.sweep import load_sweep

    matches = sorted(REPO.glob(path)) if "*" in path else [REPO / path]
    assert matches and all(m.is_file() for m in matches), f"{where}: {path} does not exist"
    for config in matches:
        if config.parent.name == "claims":  # a paper's claims file: checked as one
            from semfl.experiments.claims import load_claims

            assert load_claims(config).claims, f"{where}: {config}"
        elif "sweep" in tomllib.loads(config.read_text()):
            assert all(p.config() for p in load_sweep(config).points), f"{where}: {config}"
        else:
            load_config(config)


@pytest.mark.parametrize("doc", LINK_DOCS, ids=[_rel(d) for d in LINK_DOCS])
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            assert target.startswith(("https://", "http://", "mailto:")), f"{_rel(doc)}: {target}"
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{_rel(doc)}: link {target} points nowhere"
        assert resolved.is_relative_to(REPO), f"{_rel(doc)}: link {target} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{_rel(doc)}: no heading #{anchor} in {path or _rel(doc)}"


def test_no_link_or_description_points_outside_the_repository():
    for doc in [*LINK_DOCS, REPO / "pyproject.toml"]:
        assert "../shared" not in doc.read_text(), f"{_rel(doc)} names ../shared, which a clone does not have"


def test_readme_fits_on_two_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 120


def test_every_make_target_the_docs_name_is_in_the_makefile():
    """`make X` in README.md, docs/, REPRODUCTION.md or BENCHMARKS.md names a target the Makefile has."""
    targets = set(re.findall(r"^([\w-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))
    named = set()
    for doc in LINK_DOCS:  # `make X` anywhere in a code block, or in inline code
        text = doc.read_text()
        blocks = "\n".join(FENCE.findall(text))
        found = re.findall(r"\bmake ([a-z][\w-]*)", blocks) + re.findall(r"`make ([a-z][\w-]*)", FENCE.sub("", text))
        named |= {(_rel(doc), t) for t in found}
    assert {"run", "test", "test-slow", "coverage"} <= {t for _, t in named}
    missing = sorted((where, t) for where, t in named if t not in targets)
    assert not missing, f"make targets named in the docs but missing from the Makefile: {missing}"
