"""Per-sample gradients for the layers of MONAI's UNet, faster on CPU than Opacus' own: convolutions, transposed
convolutions and PReLU.

Measured on the demo's UNet (channels 8/16/32, 32^3, batch 8, 2 CPU threads; cProfile and torch.profiler):

- Opacus ships no sampler for ``ConvTranspose*d`` or ``PReLU``, so its hooks mode falls back to functorch for them:
  every backward pass runs the layer's forward again under ``vmap``. That was 30 of a DP step's 99 ms.
- Its ``Conv*d`` sampler unfolds each input (im2col; Goodfellow 2015, "Efficient Per-Example Gradient
  Computations", arXiv:1510.01799) and contracts it with ``einsum``; the unfold's copy was a quarter of the step.
  One grouped convolution over the batch (Rochette, Manoel & Tramel 2019, "Efficient Per-Example Gradient
  Computations in Convolutional Neural Networks", arXiv:1912.06015: the batch folded into the channels, one
  group per sample, ``torch.nn.grad.conv*d_weight``) gives the same gradients 2.5 to 3.2 times faster at the
  UNet's shapes.

A transposed convolution is the adjoint of a convolution (Dumoulin & Visin 2016, arXiv:1603.07285, section 4),
so its weight gradient is the forward convolution's with input and output gradient swapped::

    dL/dW[i, o, k] = sum_p x[i, p] * g[o, p * stride + k * dilation - padding]

(``output_padding`` and ``output_size`` only change how many trailing output positions there are).

The samplers are registered through Opacus' own extension point (``opacus.grad_sample.register_grad_sampler``),
which the hooks and ghost-clipping modes consult; functorch mode does not. Importing this module registers them;
``pipelines.networks.make_private_compatible`` does, so every network ``build_network`` returns has them. Each is checked against plain
autograd, one sample at a time, in tests/pipelines/test_grad_samplers.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

_WEIGHT_GRAD = {1: conv1d_weight, 2: conv2d_weight, 3: conv3d_weight}


def per_sample_conv_weight(inputs: torch.Tensor, grad_outputs: torch.Tensor, kernel_size: tuple[int, ...], *,
                           stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """Each sample's weight gradient of the convolution that maps ``inputs`` (N, C_in, *) to outputs whose gradient is
    ``grad_outputs`` (N, C_out, *): shape (N, C_out, C_in / groups, *kernel_size), from one convolution with N * groups
    groups."""
    n, c_in = inputs.shape[:2]
    c_out = grad_outputs.shape[1]
    weight_grad = _WEIGHT_GRAD[inputs.dim() - 2]
    grad = weight_grad(inputs.reshape(1, n * c_in, *inputs.shape[2:]), (n * c_out, c_in // groups, *kernel_size),
                       grad_outputs.reshape(1, n * c_out, *grad_outputs.shape[2:]), stride=stride, padding=padding,
                       dilation=dilation, groups=n * groups)
    return grad.view(n, c_out, c_in // groups, *kernel_size)


def _empty(layer: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """An empty batch (Poisson sampling can draw one): zero gradients, as Opacus' own samplers return."""
    return {p: torch.zeros_like(p).unsqueeze(0) for p in layer.parameters(recurse=False) if p.requires_grad}


def _padded_input(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A convolution's input and the padding to convolve it with. Zero padding given as numbers stays the
    convolution's own; "same"/"valid" and reflect, replicate or circular padding are applied here, as the layer's
    forward applies them (Opacus' own sampler zero-pads whatever the mode, which gives wrong gradients for those)."""
    if not isinstance(layer.padding, str) and layer.padding_mode == "zeros":
        return x, layer.padding
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0,) * (x.dim() - 2)


def _adjoint_input(layer: nn.modules.conv._ConvTransposeNd, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """A transposed convolution's output gradient laid out for the adjoint convolution, to run with no padding:
    ``padding`` zeros in front, then cut (or zero-extended) to (L_in - 1) * stride + dilation * (kernel - 1) + 1
    positions per dimension, the ones the input reaches. ``output_padding`` (or ``output_size``) changes how many
    trailing positions the output has, not which ones an input reaches."""
    spans = [(length - 1) * s + d * (k - 1) + 1 for length, s, d, k in zip(x.shape[2:], layer.stride, layer.dilation, layer.kernel_size)]
    pads: list[int] = []
    for size, span, p in zip(reversed(backprops.shape[2:]), reversed(spans), reversed(layer.padding)):
        pads += [p, max(0, span - size - p)]
    padded = F.pad(backprops, pads)
    return padded[(..., *(slice(0, span) for span in spans))]


def _conv_grad_sample(layer: nn.modules.conv._ConvNd, activations: list[torch.Tensor], backprops: torch.Tensor, *,
                      transposed: bool) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:
        return _empty(layer)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if transposed:  # the adjoint: the output gradient is the input, the layer's input the output gradient
            inputs, grad_outputs, padding = _adjoint_input(layer, x, backprops), x, (0,) * (x.dim() - 2)
        else:
            (inputs, padding), grad_outputs = _padded_input(layer, x), backprops
        ret[layer.weight] = per_sample_conv_weight(inputs, grad_outputs, layer.kernel_size, stride=layer.stride, padding=padding,
                                                   dilation=layer.dilation, groups=layer.groups)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return ret


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def compute_conv_grad_sample(layer: nn.modules.conv._ConvNd, activations: list[torch.Tensor],
                             backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``Conv{1,2,3}d``: one grouped convolution over the batch."""
    return _conv_grad_sample(layer, activations, backprops, transposed=False)


@register_grad_sampler([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d])
def compute_conv_transpose_grad_sample(layer: nn.modules.conv._ConvTransposeNd, activations: list[torch.Tensor],
                                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``ConvTranspose{1,2,3}d``: the adjoint convolution's, output gradient as its input."""
    return _conv_grad_sample(layer, activations, backprops, transposed=True)


@register_grad_sampler(nn.PReLU)
def compute_prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``PReLU``'s slopes: y = max(0, x) + a * min(0, x), so dy/da = min(0, x), summed over
    every position a slope covers (all of them for one slope; its channel for one slope per channel)."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:
        return _empty(layer)
    if not layer.weight.requires_grad:
        return {}
    product = backprops * x.clamp(max=0)
    if layer.num_parameters == 1:
        return {layer.weight: product.reshape(n, -1).sum(dim=1, keepdim=True)}
    return {layer.weight: product.reshape(n, layer.num_parameters, -1).sum(dim=2)}
