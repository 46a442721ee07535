"""A Llama- or Gemma-family backbone's gated MLP and RMSNorm with their derivatives written out,
so that MAML's graphs keep less.

MAML differentiates its support pass's backward once more (create_graph), and autograd, left to
itself, keeps every input of every elementwise operator of that backward too. Per layer, the
gated MLP `down(act(gate(x)) * up(x))` keeps nine intermediate-width tensors in the support
pass with Llama's SiLU (the gate's output, its silu, the up projection's output, and six for the
backward; five with Gemma's tanh GELU), and each RMSNorm keeps four hidden-width ones. Here each
is one autograd function that keeps its inputs only, whose backward is another function that
keeps the incoming gradient besides them, with the second derivative written out: three and
two. The forward runs the same operators on the same inputs as transformers' modules (the same
bits); the derivatives are the same arithmetic, reassociated. `tests/test_lean.py` checks them
against autograd's in float64. Where no gradient is wanted, the activation, the gate's product and
a norm's weight go into the tensors the module made itself (the same bits, fewer passes over
memory).

Modules are swapped in when a backbone is frozen (`use_lean`), each only after it gives the
same output as the module it replaces on a random input. `stock_ops()` runs transformers' own
operators through them instead (the bench's reference implementations run so).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

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


_read = contextvars.ContextVar("rows_read", default=None)


@contextlib.contextmanager
def rows_read(mlp: nn.Module | None, rows: torch.Tensor | None):
    """Inside (this thread): the GatedMLP `mlp` runs only the rows `rows` of its input (its
    leading dimensions flattened) and gives zeros for the others: a last layer whose outputs are
    read at a few positions only (rank classification's predicting ones, or the answer-predicting
    ones of a training loss). As it was for any other module, or with `rows` None."""
    token = _read.set((mlp, rows) if isinstance(mlp, GatedMLP) and rows is not None else None)
    try:
        yield
    finally:
        _read.reset(token)


def _inference() -> bool:
    """No gradient wanted, and primer's operators (not stock_ops): a module may work in place
    on the tensors it made itself, which gives the same bits with fewer passes over memory."""
    return not torch.is_grad_enabled() and not _stock.get()


def _lean(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs) and not _stock.get()


class _GatedMul(torch.autograd.Function):
    """act(g) * u, act silu (Llama's SwiGLU) or the tanh-approximated GELU (Gemma's GeGLU)."""

    @staticmethod
    def forward(ctx, g, u, act):
        ctx.save_for_backward(g, u)
        ctx.act = act
        return _ACTS[act](g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return *_GatedMulBackward.apply(grad, g, u, ctx.act), None


class _GatedMulBackward(torch.autograd.Function):
    """(grad, g, u) -> (grad * u * act'(g), grad * act(g)), differentiable once more."""

    @staticmethod
    def forward(ctx, grad, g, u, act):
        ctx.save_for_backward(grad, g, u)
        ctx.act = act
        return (_silu_mul_grads if act == "silu" else _gelu_mul_grads)(grad, g, u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g, grad_u):
        # autograd hands in zeros for an output whose gradient is not needed (materialized grads)
        second = _silu_mul_second if ctx.act == "silu" else _gelu_mul_second
        return *second(*ctx.saved_tensors, grad_g, grad_u), None


_ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}
_IN_PLACE = {"silu": lambda g: F.silu(g, inplace=True), "gelu_tanh": lambda g: torch.ops.aten.gelu_(g, approximate="tanh")}

# The derivatives' arithmetic, as functions of tensors alone (scripts/fuse_gain.py compiles them).
# First: autograd's own operators (the same bits). Second: with d1, d2 the activation's first and
# second derivatives at g, the vector-Jacobian product of (grad * u * d1, grad * act(g)) with
# (grad_g, grad_u), in grad, g and u.


def _silu_mul_grads(grad, g, u):
    return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


def _silu_mul_second(grad, g, u, grad_g, grad_u):
    s = torch.sigmoid(g)
    a, rest = g * s, 1 - s  # silu(g), 1 - s
    d1 = torch.addcmul(s, a, rest)  # s (1 + g (1 - s))
    sr = s * rest
    d2 = torch.addcmul(2 * sr, sr, torch.add(g, a, alpha=-2))  # s (1 - s) (2 + g (1 - 2 s))
    return _gated_second(grad, a, d1, d2, u, grad_g, grad_u)


def _gelu_mul_grads(grad, g, u):
    return torch.ops.aten.gelu_backward(grad * u, g, approximate="tanh"), grad * F.gelu(g, approximate="tanh")


_K, _C = math.sqrt(2 / math.pi), 0.044715  # gelu(g) = g/2 (1 + tanh(K (g + C g³)))


def _gelu_mul_second(grad, g, u, grad_g, grad_u):
    t = torch.tanh(_K * (g + _C * g ** 3))
    dz, sech2 = _K * (1 + 3 * _C * g * g), 1 - t * t  # the tanh argument's derivative, tanh'
    d1 = 0.5 * (1 + t) + 0.5 * g * sech2 * dz
    d2 = sech2 * (dz + g * (3 * _K * _C * g - t * dz * dz))
    return _gated_second(grad, 0.5 * g * (1 + t), d1, d2, u, grad_g, grad_u)


def _gated_second(grad, a, d1, d2, u, grad_g, grad_u):
    gu = grad_g * u
    return gu * d1 + grad_u * a, grad * (gu * d2 + grad_u * d1), grad_g * grad * d1


def gated_mul(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    return _GatedMul.apply(g, u, act) if _lean(g, u) else _ACTS[act](g) * u


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (transformers: float32)."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _rms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x in at least float32 and its rsqrt(mean(x²) + eps), with transformers' operators."""
    h = _wide(x)
    return h, torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _weighted(w: torch.Tensor, normed: torch.Tensor, dtype: torch.dtype, late: bool, own: bool = False) -> torch.Tensor:
    """The weight times the normed input, cast to `dtype` before the product or, `late`, after it;
    `own`: `normed` is the caller's own and no gradient is wanted, so the product goes into it."""
    if own and w.dtype == (normed.dtype if late else dtype):
        return normed.mul_(w).to(dtype) if late else normed.to(dtype).mul_(w)
    return (w * normed).to(dtype) if late else w * normed.to(dtype)


class _RMSNorm(torch.autograd.Function):
    """w * (x * r), r = rsqrt(mean(x²) + eps) over the last dimension, in at least float32 (as
    transformers), for a weight that takes no gradient. Cast to x's dtype before the weight
    (Llama) or, `late`, after it (Gemma, whose w is 1 + its weight in float32)."""

    @staticmethod
    def forward(ctx, x, w, eps, late=False):
        h, r = _rms(x, eps)
        ctx.save_for_backward(x, w, r)
        return _weighted(w, h * r, x.dtype, late)

    @staticmethod
    def backward(ctx, gy):
        x, w, r = ctx.saved_tensors
        return _RMSNormBackward.apply(gy, x, w, r), None, None, None


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
    c = r ** 3 / x.shape[-1] * (h * gh).sum(-1, keepdim=True)  # per row
    return torch.addcmul(r * gh, h, c, value=-1).to(x.dtype)


def _rms_second(gy, x, w, r, v):
    gh, h, v = (gy * w).to(r.dtype), x.to(r.dtype), v.to(r.dtype)
    n = x.shape[-1]
    r3n = r ** 3 / n
    vx, xg, vg = ((v * h).sum(-1, keepdim=True), (h * gh).sum(-1, keepdim=True),
                  (v * gh).sum(-1, keepdim=True))
    # per row: r3n, vx, xg, vg; so a row's wide terms are h, v and gh, each scaled once
    d_gh = torch.addcmul(r * v, h, r3n * vx, value=-1)
    d_x = torch.addcmul((3 * r * r * r3n / n * vx * xg - r3n * vg) * h, r3n, torch.addcmul(xg * v, vx, gh), value=-1)
    return (w * d_gh.to(gy.dtype)).to(gy.dtype), d_x.to(x.dtype)


class GatedMLP(nn.Module):
    """A gated MLP's own three projections, `down(act(gate(x)) * up(x))`, run through gated_mul:
    Llama's SwiGLU (silu) or Gemma's GeGLU (tanh GELU). Same parameter names, so state dicts
    and saved models are unchanged."""

    def __init__(self, mlp: nn.Module, act: str):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = _read.get()
        if read is None or read[0] is not self:
            return self._rows(x)
        flat = x.reshape(-1, x.shape[-1])
        return flat.new_zeros(flat.shape).index_copy(0, read[1], self._rows(flat[read[1]])).view_as(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if _inference():  # g is this call's own: the activation and the product go into it
            return self.down_proj(_IN_PLACE[self.act](g).mul_(u))
        return self.down_proj(gated_mul(g, u, self.act))


class RMSNorm(nn.Module):
    """An RMSNorm's own weight and epsilon: Llama's `weight * norm(x)`, or with `offset` Gemma's
    `(1 + weight) * norm(x)`, cast after the weight. A trained weight (fine-tuning) takes
    transformers' operators."""

    def __init__(self, norm: nn.Module, offset: bool = False):
        super().__init__()
        self.weight, self.offset = norm.weight, offset
        self.variance_epsilon = _eps(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = 1.0 + _wide(self.weight) if self.offset else self.weight
        if _lean(x) and not self.weight.requires_grad:
            return _RMSNorm.apply(x, w, self.variance_epsilon, self.offset)
        h, r = _rms(x, self.variance_epsilon)
        return _weighted(w, h * r, x.dtype, self.offset, own=_inference())


def _eps(norm: nn.Module) -> float | None:
    """A norm's epsilon: Llama's `variance_epsilon`, Gemma's `eps`."""
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


_ACT_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def _candidates(m: nn.Module) -> list[nn.Module]:
    """The lean modules that could stand in for `m`, by its parts (none for one already lean)."""
    if isinstance(m, (GatedMLP, RMSNorm)):
        return []
    name, children = type(m).__name__, {n for n, _ in m.named_children()}
    act = _ACT_NAMES.get(type(getattr(m, "act_fn", None)).__name__)
    if (name.endswith("MLP") and act
            and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
            and children == {"gate_proj", "up_proj", "down_proj", "act_fn"}):
        return [GatedMLP(m, act)]
    if (name.endswith("RMSNorm") and not children and isinstance(_eps(m), float)
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1):
        return [RMSNorm(m), RMSNorm(m, offset=True)]
    return []


def _stand_in(m: nn.Module) -> nn.Module | None:
    """The lean module for `m` that gives the same output on a random input (which rules out
    another forward written over the same parts, and tells Gemma's 1 + weight from Llama's)."""
    for new in _candidates(m):
        w = next(m.parameters())
        width = m.gate_proj.weight.shape[1] if isinstance(new, GatedMLP) else w.shape[0]
        x = torch.randn(2, 3, width, dtype=w.dtype, device=w.device,  # not the global RNG's draws
                        generator=torch.Generator(w.device).manual_seed(0))
        with torch.no_grad():
            if torch.equal(m(x), new(x)):
                return new
    return None


def use_lean(model: nn.Module) -> int:
    """Swaps every Llama- or Gemma-family MLP and RMSNorm in `model` for its lean module; returns
    how many."""
    found = [(parent, name, new) for parent in model.modules() for name, child in parent.named_children()
             if (new := _stand_in(child)) is not None]
    for parent, name, new in found:
        setattr(parent, name, new)
    return len(found)
