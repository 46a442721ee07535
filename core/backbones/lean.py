"""A Llama-family backbone's MLP and RMSNorm with their derivatives written out, so that MAML's
graphs keep less.

MAML differentiates its support pass's backward once more (create_graph), and autograd, left to
itself, keeps every input of every elementwise operator of that backward too. Per layer, the
gated MLP `down(silu(gate(x)) * up(x))` keeps nine intermediate-width tensors in the support
pass (the gate's output, its silu, the up projection's output, and six for the backward), and
the two RMSNorms keep eight hidden-width ones. Here each is one autograd function that keeps its
inputs only, whose backward is another function that keeps the incoming gradient besides them,
with the second derivative written out: three and four. The forward runs the same operators on
the same inputs as transformers' modules (the same bits); the derivatives are the same
arithmetic, reassociated. `tests/test_lean.py` checks them against autograd's in float64.

Modules are swapped in when a backbone is frozen (`use_lean`), each only after it gives the
same output as the module it replaces on a random input. `stock_ops()` runs transformers' own
operators through them instead (the bench's reference implementations run so).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_stock = contextvars.ContextVar("stock_ops", default=False)


@contextlib.contextmanager
def stock_ops():
    """Inside (this thread): SwiGLU and RMSNorm run transformers' own operators, for autograd
    to differentiate as it does for anyone."""
    token = _stock.set(True)
    try:
        yield
    finally:
        _stock.reset(token)


def _lean(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs) and not _stock.get()


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
        return _silu_mul_grads(grad, g, u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g, grad_u):
        # autograd hands in zeros for an output whose gradient is not needed (materialized grads)
        return _silu_mul_second(*ctx.saved_tensors, grad_g, grad_u)


# The derivatives' arithmetic, as functions of tensors alone (scripts/fuse_gain.py compiles them)

def _silu_mul_grads(grad, g, u):
    return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


def _silu_mul_second(grad, g, u, grad_g, grad_u):
    s = torch.sigmoid(g)
    rest, gu = 1 - s, grad_g * u
    d1 = s * (1 + g * rest)  # silu'
    d2 = s * rest * (2 + g * (1 - 2 * s))  # silu''
    return gu * d1 + grad_u * g * s, grad * (gu * d2 + grad_u * d1), grad_g * grad * d1


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(g, u) if _lean(g, u) else F.silu(g) * u


def _rms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x in at least float32 (transformers: float32) and its rsqrt(mean(x²) + eps), with
    transformers' operators."""
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return h, torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class _RMSNorm(torch.autograd.Function):
    """w * (x * r), r = rsqrt(mean(x²) + eps) over the last dimension, in at least float32 (as
    transformers), for a weight that takes no gradient."""

    @staticmethod
    def forward(ctx, x, w, eps):
        h, r = _rms(x, eps)
        ctx.save_for_backward(x, w, r)
        return w * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w, r = ctx.saved_tensors
        return _RMSNormBackward.apply(gy, x, w, r), None, None


class _RMSNormBackward(torch.autograd.Function):
    """(gy, x) -> r * gh - r³/n * x * (x · gh), gh = gy * w; differentiable once more in gy and x
    (r is x's, as the formulas account for)."""

    @staticmethod
    def forward(ctx, gy, x, w, r):
        ctx.save_for_backward(gy, x, w, r)
        return _rms_grad(gy, x, w, r)

    @staticmethod
    @once_differentiable
    def backward(ctx, v):
        return *_rms_second(*ctx.saved_tensors, v), None, None


def _rms_grad(gy, x, w, r):
    gh, h = (gy * w).to(r.dtype), x.to(r.dtype)
    return (r * gh - r ** 3 / x.shape[-1] * h * (h * gh).sum(-1, keepdim=True)).to(x.dtype)


def _rms_second(gy, x, w, r, v):
    gh, h, v = (gy * w).to(r.dtype), x.to(r.dtype), v.to(r.dtype)
    n = x.shape[-1]
    r3n = r ** 3 / n
    vx, xg, vg = ((v * h).sum(-1, keepdim=True), (h * gh).sum(-1, keepdim=True),
                  (v * gh).sum(-1, keepdim=True))
    d_gh = r * v - r3n * h * vx
    d_x = (3 * r * r * r3n / n * vx * xg - r3n * vg) * h - r3n * (xg * v + vx * gh)
    return (w * d_gh.to(gy.dtype)), d_x.to(x.dtype)


class SwiGLU(nn.Module):
    """A Llama-family MLP's own three projections, run through silu_mul. Same parameter names,
    so state dicts and saved models are unchanged."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class RMSNorm(nn.Module):
    """A Llama-family RMSNorm's own weight and epsilon. A trained weight (fine-tuning) takes
    transformers' operators."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _lean(x) and not self.weight.requires_grad:
            return _RMSNorm.apply(x, self.weight, self.variance_epsilon)
        h, r = _rms(x, self.variance_epsilon)
        return self.weight * (h * r).to(x.dtype)


def _candidate(m: nn.Module) -> type | None:
    """Which lean module could stand in for `m`, by its parts (none for one already lean)."""
    if isinstance(m, (SwiGLU, RMSNorm)):
        return None
    name, children = type(m).__name__, {n for n, _ in m.named_children()}
    if (name.endswith("MLP") and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
            and children == {"gate_proj", "up_proj", "down_proj", "act_fn"}):
        return SwiGLU
    if (name.endswith("RMSNorm") and not children and isinstance(getattr(m, "variance_epsilon", None), float)
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1):
        return RMSNorm
    return None


def _stand_in(m: nn.Module) -> nn.Module | None:
    """The lean module for `m`, if it gives the same output on a random input (which rules out
    another forward written over the same parts, Gemma's 1 + weight for one)."""
    lean = _candidate(m)
    if lean is None:
        return None
    w = next(m.parameters())
    width = m.gate_proj.weight.shape[1] if lean is SwiGLU else w.shape[0]
    x = torch.randn(2, 3, width, dtype=w.dtype, device=w.device,  # not the global RNG's draws
                    generator=torch.Generator(w.device).manual_seed(0))
    new = lean(m)
    with torch.no_grad():
        return new if torch.equal(m(x), new(x)) else None


def use_lean(model: nn.Module) -> int:
    """Swaps every Llama-family MLP and RMSNorm in `model` for its lean module; returns how many."""
    found = [(parent, name, new) for parent in model.modules() for name, child in parent.named_children()
             if (new := _stand_in(child)) is not None]
    for parent, name, new in found:
        setattr(parent, name, new)
    return len(found)
