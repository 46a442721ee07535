"""The gated MLP of Llama-family backbones, `down(silu(gate(x)) * up(x))`, with a gradient that
keeps less for MAML.

Autograd, left to itself, keeps three of the MLP's wide (intermediate-size) tensors per layer
for the backward: the gate's output, its silu and the up projection's output. When MAML's
support backward is itself differentiated (create_graph), that backward's own elementwise ops
keep six more. Here the product is one autograd function that keeps the gate and up outputs,
and its backward is another that keeps only the incoming gradient besides them, with the
second derivative written out: three wide tensors per layer instead of nine, the same
arithmetic up to rounding. `tests/test_backbones.py` checks it against autograd's first and
second derivatives in float64.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _SiluMul(torch.autograd.Function):
    """silu(g) * u."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return _SiluMulBackward.apply(grad, g, u)


class _SiluMulBackward(torch.autograd.Function):
    """(grad, g, u) -> (grad * u * silu'(g), grad * silu(g)), differentiable once more."""

    @staticmethod
    def forward(ctx, grad, g, u):
        ctx.save_for_backward(grad, g, u)
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g, grad_u):
        grad, g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        d1 = s * (1 + g * (1 - s))  # silu'
        d2 = s * (1 - s) * (2 + g * (1 - 2 * s))  # silu''
        # autograd hands in zeros for an output whose gradient is not needed (materialized grads)
        return grad_g * u * d1 + grad_u * g * s, grad * (grad_g * u * d2 + grad_u * d1), grad_g * grad * d1


_stock = contextvars.ContextVar("stock_mlp", default=False)


@contextlib.contextmanager
def stock_mlp():
    """Inside (this thread): SwiGLU runs transformers' own ops, for autograd to differentiate as
    it does for anyone (the bench's reference implementations run so)."""
    token = _stock.set(True)
    try:
        yield
    finally:
        _stock.reset(token)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad) and not _stock.get():
        return _SiluMul.apply(g, u)
    return F.silu(g) * u


class SwiGLU(nn.Module):
    """A Llama-family MLP's own three projections, run through silu_mul. Same parameter names,
    so state dicts and saved models are unchanged."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu(m: nn.Module) -> bool:
    """A SiLU-gated MLP by its parts, and the same outputs as SwiGLU on a random input, which
    rules out any other forward written over the same parts."""
    if not (type(m).__name__.endswith("MLP") and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
            and {name for name, _ in m.named_children()} == {"gate_proj", "up_proj", "down_proj", "act_fn"}):
        return False
    w = m.gate_proj.weight
    x = torch.randn(2, 3, w.shape[1], dtype=w.dtype, device=w.device,  # not the global RNG's draws
                    generator=torch.Generator(w.device).manual_seed(0))
    with torch.no_grad():
        return torch.equal(m(x), SwiGLU(m)(x))


def use_swiglu(model: nn.Module) -> int:
    """Replaces every Llama-family SiLU-gated MLP in `model` by SwiGLU; returns how many."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if _is_swiglu(child)]
    for parent, name, child in found:
        setattr(parent, name, SwiGLU(child))
    return len(found)
