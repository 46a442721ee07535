"""SwiGLU (core/backbones/swiglu.py): the Llama MLP's derivatives written out, the same as
autograd's, and what it saves MAML."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.algorithms.maml import maml_grad
from core.backbones import load
from core.backbones.soft_prompt import SoftPromptModel
from core.backbones.swiglu import SwiGLU, silu_mul, stock_mlp, use_swiglu
from core.prompts import init_prompt
from tests.test_meta_gradients import EPISODE


def test_silu_mul_has_autograds_first_and_second_derivatives():
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(3, 5, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(silu_mul, (g, u)) and torch.autograd.gradgradcheck(silu_mul, (g, u))

    def second(f, use_grad_g, use_grad_u):
        """A weighted first derivative (as MAML's support backward), differentiated again."""
        out = f(g, u)
        dg, du = torch.autograd.grad((out * torch.randn(out.shape, dtype=out.dtype, generator=gen.manual_seed(1))).sum(),
                                     (g, u), create_graph=True)
        return torch.autograd.grad(use_grad_g * (dg * dg.detach()).sum() + use_grad_u * (du ** 3).sum(), (g, u))

    for use in ((1, 1), (1, 0), (0, 1)):  # either first derivative alone, or both
        for ours, theirs in zip(second(silu_mul, *use), second(lambda g, u: F.silu(g) * u, *use)):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_llama_backbone_runs_swiglu_with_the_same_outputs_and_parameter_names(tiny_dir):
    from transformers import AutoModelForCausalLM

    ours = load(str(tiny_dir["causal"]), attn="eager").model
    stock = AutoModelForCausalLM.from_pretrained(tiny_dir["causal"], attn_implementation="eager").eval()
    assert sum(isinstance(m, SwiGLU) for m in ours.modules()) == stock.config.num_hidden_layers
    assert not any(isinstance(m, SwiGLU) for m in stock.modules())
    assert list(ours.state_dict()) == list(stock.state_dict())
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=0, atol=0)
    # T5's MLP is another one (wi/wo, ReLU): left as it is
    t5 = load(str(tiny_dir["seq2seq"]), attn="eager").model
    assert not any(isinstance(m, SwiGLU) for m in t5.modules())


def test_an_mlp_with_the_same_parts_but_another_forward_is_left_alone():
    class OtherMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):  # the activation on the other branch
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    model = nn.Sequential(OtherMLP())
    assert use_swiglu(model) == 0 and isinstance(model[0], OtherMLP)


def _wide_saved(model: SoftPromptModel, width: int, stock: bool) -> tuple[torch.Tensor, int]:
    """A MAML meta-gradient, and how many intermediate-width tensors its graphs kept."""
    kept = {}

    def pack(t):
        if t.shape and t.shape[-1] == width and not isinstance(t, nn.Parameter) and t.dim() == 3:
            kept[t.untyped_storage().data_ptr()] = t.shape
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), stock_mlp() if stock else torch.enable_grad():
        grad, _ = maml_grad(model, model.prompt.detach(), [EPISODE], 0.5, 1)
    return grad, len(kept)


def test_maml_gets_the_same_meta_gradient_keeping_fewer_wide_tensors(tiny_dir):
    # float64: at this inner learning rate fp32's own rounding moves the tiny model's meta-gradient
    # by ~2e-4 (relative), which would hide a wrong second derivative
    backbone = load(str(tiny_dir["causal"]), attn="eager", dtype=torch.float64)
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))  # the prompt stays fp32
    width, layers = backbone.model.config.intermediate_size, backbone.model.config.num_hidden_layers
    ours, n_ours = _wide_saved(model, width, stock=False)
    theirs, n_theirs = _wide_saved(model, width, stock=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    # per layer: the support pass keeps gate, up and the incoming gradient, the query pass gate
    # and up; autograd keeps 9 and 3
    assert n_ours == 5 * layers
    assert n_theirs == 12 * layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_tuning_grads_are_the_same_with_and_without_swiglu(tiny_dir, dtype):
    backbone = load(str(tiny_dir["causal"]), attn="eager", dtype=dtype)
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))

    def grad():
        model.zero_grad()
        model.loss(EPISODE.support).backward()
        return model.prompt.grad.clone()

    ours = grad()
    with stock_mlp():
        theirs = grad()
    # the same operators on the same inputs: the same bits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
