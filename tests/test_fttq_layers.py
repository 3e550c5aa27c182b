"""FTTQ keeps full precision where data enters and leaves the model, found by data flow on every architecture."""
from __future__ import annotations

import pytest
import torch

from semfl.wireless.channel import Channel
from semfl.wireless.compress import ternary_layers
from semfl.methods.compression.fttq import io_layers
from semfl.models import ImageSpec, build_model

# by reading the models: the stem / first conv reads the image; the last decoder layer (GSC: MAE's
# decoder_pred, before unpatchify) writes it
EXPECTED = {"csc": ("stem.0.weight", "decoder.4.weight"), "jscc": ("encoder.0.weight", "decoder.6.weight"),
            "gsc-m": ("patch_embed.proj.weight", "decoder_pred.weight"),
            "gsc-l": ("patch_embed.proj.weight", "decoder_pred.weight"),
            "gsc-h": ("patch_embed.proj.weight", "decoder_pred.weight")}


def nearest_weight_to_output(model: torch.nn.Module, recon: torch.Tensor) -> str:
    """Cross-check by autograd: the weight matrix whose leaf is fewest backward steps from the output."""
    names = {id(p): n for n, p in model.named_parameters() if p.dim() >= 2 and n.endswith("weight")}
    frontier, seen = [recon.grad_fn], set()
    while frontier:
        found = sorted(names[id(f.variable)] for f in frontier if hasattr(f, "variable") and id(f.variable) in names)
        if found:
            assert len(found) == 1, found
            return found[0]
        nxt = []
        for node in frontier:
            for child, _ in getattr(node, "next_functions", ()):
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("no weight reaches the output")


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("channels", [1, 3])
def test_io_layers_are_the_layers_that_read_the_input_and_write_the_output(arch, channels):
    spec = ImageSpec(channels, 28 if channels == 1 else 32, 28 if channels == 1 else 32, 10)
    torch.manual_seed(0)
    model = build_model(arch, "tiny", spec, Channel("awgn"))
    first, last = io_layers(model, spec, "cpu")
    assert (first, last) == EXPECTED[arch]
    modules = dict(model.named_modules())
    images = torch.rand(2, channels, spec.height, spec.width)
    seen = []
    hook = modules[first.rpartition(".")[0]].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.eval()
    recon = model(images, torch.full((2,), 10.0)).recon
    hook.remove()
    assert torch.equal(seen[0], images)  # the first layer is handed the images themselves
    assert nearest_weight_to_output(model, recon) == last
    quantised = ternary_layers(dict(model.named_parameters()), (first, last))
    assert first not in quantised and last not in quantised and quantised


def test_io_layers_leave_the_random_state_and_mode_alone():
    spec = ImageSpec(1, 28, 28, 10)
    model = build_model("gsc-m", "tiny", spec, Channel("awgn"))
    model.train()
    torch.manual_seed(5)
    io_layers(model, spec, "cpu")
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3)) and model.training


def test_fttq_on_gsc_keeps_the_output_layer_dense(tiny_overrides):
    from conftest import local_method
    from semfl.methods.compression.fttq import FTTQ

    _, _, _, _, m = local_method(FTTQ, tiny_overrides + ["method=fttq", "model.arch=gsc-m"])
    assert "decoder_pred.weight" not in m.quantised and "patch_embed.proj.weight" not in m.quantised
    assert "codec.decoder.2.weight" in m.quantised  # the last registered weight, mid-model: ternary
    payload = m.payload(m.global_weights)
    assert payload.codec_of("decoder_pred.weight") == "dense"
    assert torch.unique(m.global_weights["codec.decoder.2.weight"]).numel() <= 3
