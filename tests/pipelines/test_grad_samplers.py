"""fedsilo's per-sample gradient samplers (pipelines.grad_samplers) against plain autograd, one sample at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule

import pipelines.grad_samplers as samplers

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _per_sample_by_autograd(layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: each sample's gradient from its own backward pass."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layer.named_parameters()}
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i:i + 1]) * target[i:i + 1]).sum().backward()
        for name, p in layer.named_parameters():
            grads[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def _per_sample_by_hooks(layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    model = GradSampleModule(layer, batch_first=True, loss_reduction="sum")
    (model(x) * target).sum().backward()
    # Opacus' functorch fallback (the path these samplers replace) leaves its vmapped function on the layer.
    assert not hasattr(layer, "ft_compute_sample_grad")
    return {name: p.grad_sample.detach() for name, p in layer.named_parameters()}


TRANSPOSED = [
    ("3d, UNet's up-sampling", nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1), (5, 4, 6, 5, 4)),
    ("3d, stride 1, no bias", nn.ConvTranspose3d(2, 3, 3, stride=1, padding=1, bias=False), (3, 2, 4, 4, 4)),
    ("3d, groups and dilation", nn.ConvTranspose3d(4, 6, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1), groups=2), (2, 4, 4, 3, 5)),
    ("2d, UNet's up-sampling", nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1, output_padding=1), (4, 8, 7, 6)),
    ("2d, kernel 2 stride 2", nn.ConvTranspose2d(3, 5, 2, stride=2), (3, 3, 5, 5)),
    ("1d transposed", nn.ConvTranspose1d(3, 4, 5, stride=3, padding=2, output_padding=1), (4, 3, 9)),
    ("1d, output padding above the stride", nn.ConvTranspose1d(2, 3, 3, stride=1, dilation=2, output_padding=1), (3, 2, 7)),
    ("2d, output padding at the stride", nn.ConvTranspose2d(2, 3, 3, stride=2, dilation=3, padding=1, output_padding=2), (2, 2, 5, 4)),
]


CONVOLUTIONS = [
    ("3d, UNet's down-sampling", nn.Conv3d(1, 8, 3, stride=2, padding=1), (5, 1, 8, 7, 6)),
    ("3d, UNet's bottom", nn.Conv3d(4, 6, 3, stride=1, padding=1), (3, 4, 5, 5, 5)),
    ("3d, groups, dilation, no bias", nn.Conv3d(4, 6, (3, 2, 3), stride=(2, 1, 1), padding=(2, 0, 1), dilation=(2, 1, 1), groups=2, bias=False),
     (2, 4, 7, 5, 6)),
    ("2d, UNet's down-sampling", nn.Conv2d(3, 8, 3, stride=2, padding=1), (4, 3, 9, 8)),
    ("2d, padding 'same'", nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 6, 6)),
    ("2d, padding 'valid'", nn.Conv2d(3, 4, 3, padding="valid"), (2, 3, 6, 6)),
    ("3d, reflect padding", nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 4, 6)),
    ("2d, replicate padding, stride", nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), padding_mode="replicate"), (3, 2, 7, 6)),
    ("1d, circular padding, 'same'", nn.Conv1d(2, 3, 5, padding="same", padding_mode="circular"), (3, 2, 9)),
    ("1d conv", nn.Conv1d(3, 4, 5, stride=2, padding=2), (4, 3, 11)),
]


@pytest.mark.parametrize("name, layer, shape", TRANSPOSED + CONVOLUTIONS, ids=[c[0] for c in TRANSPOSED + CONVOLUTIONS])
def test_per_sample_gradients_of_convolutions_match_autograd(name, layer, shape):
    torch.manual_seed(2)
    x = torch.randn(shape)
    target = torch.randn(layer(x).shape)
    expected = _per_sample_by_autograd(layer, x, target)
    got = _per_sample_by_hooks(layer, x, target)
    assert set(got) == set(expected)
    for param in expected:
        assert got[param].shape == expected[param].shape
        torch.testing.assert_close(got[param], expected[param], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer, shape", [(nn.Conv3d(2, 3, 3, padding=1), (0, 2, 4, 4, 4)),
                                          (nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1), (0, 2, 4, 4, 4)),
                                          (nn.PReLU(), (0, 2, 4, 4))])
def test_an_empty_batch_gets_zero_gradients(layer, shape):
    """Poisson sampling can draw an empty batch; Opacus' own samplers answer it with zeros, so do these."""
    sampler = {nn.Conv3d: samplers.compute_conv_grad_sample, nn.ConvTranspose3d: samplers.compute_conv_transpose_grad_sample,
               nn.PReLU: samplers.compute_prelu_grad_sample}[type(layer)]
    x = torch.zeros(shape)
    out = layer(x)
    got = sampler(layer, [x], torch.zeros_like(out))
    assert set(got) == {p for p in layer.parameters()}
    assert all(g.shape == (1, *p.shape) and not g.any() for p, g in got.items())


@pytest.mark.parametrize("num_parameters, shape", [(1, (4, 3, 5, 5, 5)), (3, (4, 3, 6, 5))])
def test_prelu_per_sample_gradients_match_autograd(num_parameters, shape):
    torch.manual_seed(1)
    layer = nn.PReLU(num_parameters=num_parameters, init=0.2)
    x = torch.randn(shape)
    target = torch.randn(shape)
    torch.testing.assert_close(_per_sample_by_hooks(layer, x, target)["weight"], _per_sample_by_autograd(layer, x, target)["weight"],
                               rtol=1e-4, atol=1e-5)


def test_the_samplers_are_what_opacus_hooks_mode_uses():
    from opacus.grad_sample.grad_sample_module import GradSampleModule as GSM

    assert GSM.GRAD_SAMPLERS[nn.ConvTranspose3d] is samplers.compute_conv_transpose_grad_sample
    assert GSM.GRAD_SAMPLERS[nn.Conv3d] is samplers.compute_conv_grad_sample
    assert GSM.GRAD_SAMPLERS[nn.PReLU] is samplers.compute_prelu_grad_sample


def test_a_network_built_for_a_plan_comes_with_the_samplers_registered():
    """The modes in pipelines.networks were chosen with these samplers: building a network registers them (in a fresh
    interpreter, where nothing else has imported them)."""
    import subprocess
    import sys

    code = ("import torch.nn as nn\n"
            "from opacus.grad_sample.grad_sample_module import GradSampleModule as GSM\n"
            "assert GSM.GRAD_SAMPLERS.get(nn.ConvTranspose3d) is None\n"
            "from pipelines.networks import build_network\n"
            "from pipelines.plan import parse_plan\n"
            "build_network(parse_plan({'name': 't', 'task': 'seg3d', 'model': {'network': 'UNet', 'args': {'channels': [4, 8], 'strides': [2]}}}))\n"
            "sampler = GSM.GRAD_SAMPLERS.get(nn.ConvTranspose3d)\n"
            "assert sampler is not None and sampler.__module__ == 'pipelines.grad_samplers', sampler\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
