"""A rich progress display for runs: classifier training, rounds, users, latest metrics."""
from __future__ import annotations

import os

from rich.console import Console
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
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, disable=not enabled, transient=False)
        self.rounds_task = None
        self.users_task = None
        self.classifier_task_id = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def log(self, message: str) -> None:
        from semfl.runtimes.workers import in_worker

        if not self.enabled:
            return
        if in_worker():  # the console's lock may be held by a thread that did not survive the fork
            os.write(2, f"[worker {os.getpid()}] {message}\n".encode())
        else:
            self.progress.console.log(message)

    def classifier_task(self, samples: int):
        self.classifier_task_id = self.progress.add_task("classifier", total=None, info=f"{samples} images")

        def tick(n: int) -> None:
            self.progress.advance(self.classifier_task_id, n)
        return tick

    def classifier_done(self) -> None:
        if self.classifier_task_id is not None:
            self.progress.update(self.classifier_task_id, visible=False)

    def start_rounds(self, first: int) -> None:
        self.rounds_task = self.progress.add_task(f"{self.cfg.method} rounds", total=self.cfg.rounds,
                                                  completed=first - 1, info="")
        self.users_task = self.progress.add_task("users", total=self.cfg.users, info="")

    def start_round(self, round_: int, users: int) -> None:
        self.progress.reset(self.users_task, total=users, info=f"round {round_}")

    def user_done(self, user: int) -> None:
        if self.users_task is not None:
            self.progress.advance(self.users_task)

    def end_round(self, round_: int, row: dict) -> None:
        self.progress.update(self.rounds_task, completed=round_, info=summarise(row))
