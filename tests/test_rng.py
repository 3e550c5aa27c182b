"""semfl.rng.manual_seed: torch.manual_seed's CPU stream without the accelerators' lazy seeding."""
import pytest
import torch

from semfl import rng
from semfl.protocol import seeding


def test_gives_torch_manual_seeds_cpu_stream():
    torch.manual_seed(1234)
    expected = (torch.rand(5), torch.randn(3, 2), torch.randint(0, 100, (4,)))
    torch.rand(7)  # move the generator on: the reseed must bring it back
    rng.manual_seed(1234)
    got = (torch.rand(5), torch.randn(3, 2), torch.randint(0, 100, (4,)))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_without_an_accelerator_skips_the_lazy_accelerator_seeding(monkeypatch):
    """The per-call cost it removes: torch.manual_seed queues a seed (with a formatted stack trace)
    for every accelerator backend; a seeding for each user and round must not."""
    if rng._has_accelerator():
        pytest.skip("this machine has an accelerator: torch.manual_seed is used as is")
    def refuse(seed):
        raise AssertionError("accelerator seeding called on a machine without one")
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    monkeypatch.setattr(torch.xpu, "manual_seed_all", refuse)
    seeding.enter(0, "round", 1)  # a unit of work's seeding, as every method does
    rng.manual_seed(3)
    with pytest.raises(AssertionError, match="accelerator seeding"):
        torch.manual_seed(3)  # what the helper replaces does call it


def test_with_an_accelerator_seeds_it_as_torch_does(monkeypatch):
    calls = []
    monkeypatch.setattr(rng, "_has_accelerator", lambda: True)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(seed))
    rng.manual_seed(42)
    assert calls == [42]
