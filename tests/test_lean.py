"""The lean MLP and RMSNorm (core/backbones/lean.py): derivatives written out, the same as
autograd's, and what they save MAML."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.algorithms.maml import maml_grad
from core.backbones import load
from core.backbones.lean import GatedMLP, RMSNorm, _RMSNorm, gated_mul, stock_ops, use_lean
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from tests.test_meta_gradients import EPISODE


def _stock_rms_norm(x, w):  # transformers' LlamaRMSNorm (Gemma3RMSNorm: w = 1 + weight), in float64 for a float64 input
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h


ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _second(f, inputs, gen, weights):
    """A weighted first derivative (as MAML's support backward), differentiated again."""
    out = f(*inputs)
    firsts = torch.autograd.grad((out * torch.randn(out.shape, dtype=out.dtype, generator=gen.manual_seed(1))).sum(),
                                 inputs, create_graph=True)
    return torch.autograd.grad(sum(c * (d * d.detach()).sum() + (d ** 3).sum() * c for c, d in zip(weights, firsts)),
                               inputs)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])  # Llama's SwiGLU, Gemma's GeGLU
def test_gated_mul_has_autograds_first_and_second_derivatives(act):
    gen = torch.Generator().manual_seed(0)
    g, u = (3 * torch.randn(3, 5, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    ours = lambda g, u: gated_mul(g, u, act)  # noqa: E731
    assert torch.autograd.gradcheck(ours, (g, u)) and torch.autograd.gradgradcheck(ours, (g, u))
    for use in ((1, 1), (1, 0), (0, 1)):  # either first derivative alone, or both
        for a, b in zip(_second(ours, (g, u), gen, use), _second(lambda g, u: ACTS[act](g) * u, (g, u), gen, use)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("late", [False, True])  # Llama's weight, Gemma's 1 + weight cast after it
def test_rms_norm_has_autograds_first_and_second_derivatives(late):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(5, dtype=torch.float64, generator=gen) + late
    norm = lambda x: _RMSNorm.apply(x, w, 1e-6, late)  # noqa: E731
    assert torch.autograd.gradcheck(norm, (x,)) and torch.autograd.gradgradcheck(norm, (x,))
    (ours,), (theirs,) = _second(norm, (x,), gen, (1,)), _second(lambda x: _stock_rms_norm(x, w), (x,), gen, (1,))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# Llama: SwiGLU, two norms per layer; Gemma: GeGLU, four norms of the hidden width per layer and
# one each for the queries and keys (per head), its norms' weight 1 + weight. stock_mlp: how many
# intermediate-width tensors autograd keeps per layer in MAML (SiLU's double backward keeps more)
KINDS = {"causal": {"act": "silu", "offset": False, "norms": 2, "head_norms": 0, "stock_mlp": 12},
         "gemma": {"act": "gelu_tanh", "offset": True, "norms": 4, "head_norms": 2, "stock_mlp": 8}}


@pytest.mark.parametrize("kind", KINDS)
def test_a_llama_or_gemma_backbone_runs_lean_modules_with_the_same_outputs_and_parameter_names(tiny_dir, kind):
    from transformers import AutoModelForCausalLM

    ours = load(str(tiny_dir[kind]), attn="eager").model
    stock = AutoModelForCausalLM.from_pretrained(tiny_dir[kind], attn_implementation="eager").eval()
    layers, k = stock.config.num_hidden_layers, KINDS[kind]
    assert [m.act for m in ours.modules() if isinstance(m, GatedMLP)] == [k["act"]] * layers
    norms = (k["norms"] + k["head_norms"]) * layers + 1  # and the final norm
    assert [m.offset for m in ours.modules() if isinstance(m, RMSNorm)] == [k["offset"]] * norms
    assert use_lean(ours) == 0  # a kept backbone frozen again for the next job: nothing left to swap
    assert not any(isinstance(m, (GatedMLP, RMSNorm)) for m in stock.modules())
    assert list(ours.state_dict()) == list(stock.state_dict())
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    with torch.no_grad():  # where no gradient is wanted the modules work in place: the same bits still
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours.to(torch.bfloat16)(ids).logits, stock.to(torch.bfloat16)(ids).logits, rtol=0, atol=0)
    # T5's MLP and layer norm are others: left as they are
    t5 = load(str(tiny_dir["seq2seq"]), attn="eager").model
    assert not any(isinstance(m, (GatedMLP, RMSNorm)) for m in t5.modules())


def test_modules_with_the_same_parts_but_another_forward_are_left_alone():
    class OtherMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):  # the activation on the other branch
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    class OtherRMSNorm(nn.Module):  # centred first, as a layer norm
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.randn(4)), 1e-6

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = nn.Sequential(OtherMLP(), OtherRMSNorm())
    assert use_lean(model) == 0 and isinstance(model[0], OtherMLP) and isinstance(model[1], OtherRMSNorm)


def _wide_saved(model: SoftPromptModel, widths: tuple[int, int], stock: bool) -> tuple[torch.Tensor, list[int]]:
    """A MAML meta-gradient, and how many tensors of each width its graphs kept."""
    weights = {p.untyped_storage().data_ptr() for p in model.backbone.model.parameters()}
    kept = {}

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] in widths and t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.shape[-1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), stock_ops() if stock else torch.enable_grad():
        grad, _ = maml_grad(model, model.prompt.detach(), [EPISODE], 0.5, 1)
    return grad, [list(kept.values()).count(w) for w in widths]


@pytest.mark.parametrize("kind", KINDS)
def test_maml_gets_the_same_meta_gradient_keeping_fewer_wide_tensors(tiny_dir, kind):
    # float64 (swapped in fp32, where the lean modules match transformers' bit for bit, then
    # converted): at this inner learning rate fp32's own rounding moves the tiny model's
    # meta-gradient by ~2e-4 (relative), which would hide a wrong second derivative
    backbone = load(str(tiny_dir[kind]), attn="eager")
    backbone.model.double()
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))  # the prompt stays fp32
    config = backbone.model.config
    widths, layers = (config.intermediate_size, config.hidden_size), config.num_hidden_layers
    ours, n_ours = _wide_saved(model, widths, stock=False)
    theirs, n_theirs = _wide_saved(model, widths, stock=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    # per layer, the MLP's width: the support pass keeps gate, up and the incoming gradient, the
    # query pass gate and up; autograd keeps 9 (SiLU) or 5 (GELU), and 3 (the last layer's lean
    # MLP keeps them at the answer-predicting rows alone, flattened: counted at any rank)
    assert n_ours[0] == 5 * layers and n_theirs[0] == KINDS[kind]["stock_mlp"] * layers
    # the hidden width: each norm keeps its input and, in the support pass, the incoming
    # gradient; autograd keeps two more per norm there (those of each layer and the final one;
    # the queries' and keys' norms, per head, are not counted here)
    assert n_theirs[1] - n_ours[1] == 2 * (KINDS[kind]["norms"] * layers + 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_tuning_grads_are_the_same_with_and_without_lean_modules(tiny_dir, dtype, kind):
    backbone = load(str(tiny_dir[kind]), attn="eager", dtype=dtype)
    layers = backbone.model.config.num_hidden_layers  # every MLP lean in bf16 too, and the norms
    assert sum(isinstance(m, GatedMLP) for m in backbone.model.modules()) == layers
    assert sum(isinstance(m, RMSNorm) for m in backbone.model.modules()) == (KINDS[kind]["norms"] + KINDS[kind]["head_norms"]) * layers + 1
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))

    def grad():
        model.zero_grad()
        model.loss(EPISODE.support).backward()
        return model.prompt.grad.clone()

    ours = grad()
    with stock_ops():
        theirs = grad()
    # the MLP's first derivative runs autograd's operators; RMSNorm's is reassociated
    torch.testing.assert_close(ours, theirs, **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}))


def test_fine_tuning_trains_the_norms_weights_through_transformers_operators(tiny_dir):
    backbone = load(str(tiny_dir["causal"]), attn="eager")
    norm = next(m for m in backbone.model.modules() if isinstance(m, RMSNorm))
    norm.weight.requires_grad_(True)
    x = torch.randn(2, 3, norm.weight.shape[0], requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    norm.weight.requires_grad_(False)
