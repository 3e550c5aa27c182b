"""The progress display of a run: classifier training, rounds, users, latest metrics.

A rich display in a terminal; plain lines at a steady interval (semfl.progress) when the output
is a file, so a batch job's log never goes silent.
"""
from __future__ import annotations

import os

from rich.console import Console

from semfl.progress import Bar, display
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SHOWN = ("loss", "accuracy", "psnr_db", "ssim", "prune_ratio", "uplink_energy_j")


def summarise(row: dict) -> str:
    parts = []
    for key in SHOWN:
        if key in row and isinstance(row[key], (int, float)):
            parts.append(f"{key}={row[key]:.4g}")
    return " ".join(parts)


class RunProgress:
    def __init__(self, cfg, enabled: bool = True):
        self.cfg = cfg
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, disable=not enabled or self.plain, transient=False)
        self.rounds_task = None
        self.users_task = None
        self.classifier_bar: Bar | None = None
        self.rounds_bar: Bar | None = None
        self.users_bar: Bar | None = None
        self._display = display(None if not enabled else "plain" if self.plain else self.progress)

    def __enter__(self):
        self.progress.__enter__()
        self._display.__enter__()
        return self

    def __exit__(self, *exc):
        for bar in (self.users_bar, self.rounds_bar):
            if bar is not None:
                bar.close()
        self._display.__exit__(*exc)
        return self.progress.__exit__(*exc)

    def log(self, message: str) -> None:
        from semfl.runtimes.workers import in_worker

        if not self.enabled:
            return
        if in_worker():  # the console's lock may be held by a thread that did not survive the fork
            os.write(2, f"[worker {os.getpid()}] {message}\n".encode())
        elif self.plain:
            Bar("", None, stream=self.console.file)._line(message)
        else:
            self.progress.console.log(message)

    def classifier_task(self, samples: int, epochs: int):
        """A tick(images) for training the classifier: epochs x samples images in all. The bar
        appears at the first tick, so a cached classifier shows none."""
        self.classifier_bar = Bar("classifier", samples * epochs, unit="images", estimate=True)
        return self.classifier_bar.advance

    def classifier_done(self) -> None:
        if self.classifier_bar is not None:
            self.classifier_bar.close()

    def start_rounds(self, first: int) -> None:
        if self.plain:  # a line per interval, with the first round's estimate of the whole run
            self.rounds_bar = Bar(f"{self.cfg.method} rounds", self.cfg.rounds, unit="rounds", estimate=True,
                                  completed=first - 1)
            self.rounds_bar.start()
            return
        self.rounds_task = self.progress.add_task(f"{self.cfg.method} rounds", total=self.cfg.rounds,
                                                  completed=first - 1, info="")
        self.users_task = self.progress.add_task("users", total=self.cfg.users, info="")

    def start_round(self, round_: int, users: int) -> None:
        if self.plain:
            self.users_bar = Bar(f"round {round_}: users", users, unit="users", announce=False)
            return
        if self.users_task is not None:
            self.progress.reset(self.users_task, total=users, info=f"round {round_}")

    def user_done(self, user: int) -> None:
        if self.users_bar is not None:
            self.users_bar.advance()
        elif self.users_task is not None:
            self.progress.advance(self.users_task)

    def end_round(self, round_: int, row: dict) -> None:
        if self.rounds_bar is not None:
            self.users_bar = None
            self.rounds_bar.info = summarise(row)
            self.rounds_bar.advance()
            return
        if self.rounds_task is not None:
            self.progress.update(self.rounds_task, completed=round_, info=summarise(row))


def paper_on_cpu(cfg, dataset, epochs: int) -> str:
    """What a paper-scale run on a CPU is about to train, said before it starts (the bars then
    estimate how long each part takes on this device from its first steps)."""
    import torch

    from semfl.wireless.channel import make_channel
    from semfl.models import build_model
    from semfl.models.classifier import CLASSIFIER_PRESETS

    with torch.device("meta"):  # parameter counts without allocating the model
        model = build_model(cfg.model.arch, cfg.scale, dataset.spec, make_channel(cfg.channel),
                            semantic_dim=cfg.model.semantic_dim, symbols_per_token=cfg.model.symbols_per_token)
    params = sum(p.numel() for p in model.parameters())
    depth = cfg.classifier.depth or CLASSIFIER_PRESETS[cfg.scale].depth
    return (f"paper scale on a CPU: this trains the ResNet-{depth} classifier ({epochs} epochs x "
            f"{len(dataset.train_y)} images, unless cached), then {cfg.rounds} rounds of {cfg.method} with "
            f"{cfg.users} users on {cfg.model.arch} ({params / 1e6:.1f} M parameters)"
            + (", each user with a GSC mentor of 112-658 M parameters" if cfg.method == "psfl" else "")
            + "; expect hours to days. "
            "Each bar estimates its whole from its first steps; scale = \"cpu\" takes minutes")
