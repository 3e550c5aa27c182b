"""What every bench section shares: waiting for the device, and a Markdown table section."""
from __future__ import annotations


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()



def table(title: str, headers: list[str], rows: list[str]) -> list[str]:
    """A section: its heading, then a Markdown table of the already formatted ``rows``."""
    return [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *rows]
