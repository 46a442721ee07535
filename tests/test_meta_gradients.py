"""primer's meta-gradients against `higher` (the MPT paper's tool) and a Reptile step by hand."""
import higher
import pytest
import torch

from core.algorithms.episodes import Episode
from core.algorithms.maml import fomaml_grad, maml_grad
from core.algorithms.reptile import reptile_grad
from core.backbones import load
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from core.tasks.base import Example

EPISODE = Episode("tiny", 100,
                  support=[Example("the movie was good", ("positive",)), Example("awful film", ("negative",))],
                  query=[Example("a great film", ("positive",)), Example("the film was bad", ("negative",))])


class PromptHolder(torch.nn.Module):
    """Only the prompt goes into higher: it cannot functionalize a transformers-5 Llama."""

    def __init__(self, prompt):
        super().__init__()
        self.prompt = torch.nn.Parameter(prompt.clone())

    def forward(self):
        return self.prompt


def higher_meta_grad(model, prompt, episode, inner_lr, inner_steps, first_order):
    """The MPT code's loop (run_maml_ddp_prompt.py / run_maml_ddp_prompt_fo.py) on a prompt holder."""
    holder = PromptHolder(prompt)
    inner_opt = torch.optim.SGD(holder.parameters(), lr=inner_lr)
    with higher.innerloop_ctx(holder, inner_opt, copy_initial_weights=False,
                              track_higher_grads=not first_order) as (fnet, diffopt):
        for _ in range(inner_steps):
            diffopt.step(model.loss(episode.support, fnet()))
        dev_loss = model.loss(episode.query, fnet())
        if first_order:
            (grad,) = torch.autograd.grad(dev_loss, list(fnet.parameters()))
            return grad
        dev_loss.backward()
    return holder.prompt.grad


@pytest.mark.parametrize("inner_lr, inner_steps", [(3e-5, 1), (0.5, 1), (0.3, 2)])
def test_maml_and_fomaml_meta_gradients_equal_higher(tiny_backbone, inner_lr, inner_steps):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 4, "random", seed=1))
    prompt = model.prompt.detach()
    for ours, first_order in ((maml_grad, False), (fomaml_grad, True)):
        got, _ = ours(model, prompt, [EPISODE], inner_lr, inner_steps)
        expected = higher_meta_grad(model, prompt, EPISODE, inner_lr, inner_steps, first_order)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_the_second_order_term_is_really_there(tiny_backbone):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 4, "random", seed=1))
    second, _ = maml_grad(model, model.prompt.detach(), [EPISODE], 0.5, 1)
    first, _ = fomaml_grad(model, model.prompt.detach(), [EPISODE], 0.5, 1)
    assert (second - first).norm() > 1e-3 * first.norm()  # else the equality test above proves little


def test_second_order_runs_through_sdpa_attention_on_cpu(tiny_dir):
    eager = load(str(tiny_dir["causal"]), attn="eager")
    sdpa = load(str(tiny_dir["causal"]), attn="sdpa")
    prompt = init_prompt(eager, 4, "random", seed=2)
    g_eager, _ = maml_grad(SoftPromptModel(eager, prompt), prompt, [EPISODE], 0.5, 1)
    g_sdpa, _ = maml_grad(SoftPromptModel(sdpa, prompt), prompt, [EPISODE], 0.5, 1)
    # Two attention kernels differ by float rounding only (the tiny model's large weights amplify it).
    assert (g_sdpa - g_eager).norm() <= 1e-4 * g_eager.norm()


class Quadratic:
    """A stand-in model whose loss on a batch is mean((prompt - target)^2), targets in the inputs."""

    def loss(self, batch, prompt):
        targets = torch.tensor([float(e.input) for e in batch])
        return ((prompt.sum() - targets) ** 2).mean()

    def group_losses(self, groups, prompts):
        return torch.stack([self.loss(g, p) for g, p in zip(groups, prompts)])


def test_reptile_pseudo_gradient_by_hand():
    # p = 1, lr = 0.25. Step 1 on target 3: grad 2(1-3) = -4, p' = 2.
    # Step 2 on target 5: grad 2(2-5) = -6, p'' = 3.5. Pseudo-gradient (1 - 3.5) / 0.25 = -10.
    episode = Episode("q", 100, support=[Example("3", ("",)), Example("5", ("",))], query=[])
    grad, (last_loss,) = reptile_grad(Quadratic(), torch.tensor([[1.0]]), [episode], inner_lr=0.25, inner_steps=2)
    assert grad.tolist() == [[-10.0]]
    assert last_loss == 9.0  # (2 - 5)^2, the loss of the second inner step


OTHER = Episode("tiny", 13,
                support=[Example("a dull, long and joyless story about nothing", ("negative",)),
                         Example("loved it", ("positive",))],
                query=[Example("brilliant", ("positive",)), Example("the worst film of the whole year so far", ("negative",))])


@pytest.mark.parametrize("algorithm", [maml_grad, fomaml_grad, reptile_grad])
def test_episodes_batched_in_one_forward_give_the_sum_of_their_own_gradients(tiny_backbone, algorithm):
    """Two episodes of different lengths (so rows are padded) side by side, one prompt copy each:
    the summed gradient and each episode's loss are those of the episodes one at a time."""
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 4, "random", seed=1))
    prompt = model.prompt.detach()
    alone = [algorithm(model, prompt, [e], 0.5, 2) for e in (EPISODE, OTHER)]
    together, losses = algorithm(model, prompt, [EPISODE, OTHER], 0.5, 2)
    summed = alone[0][0] + alone[1][0]
    # float rounding only: other matrix shapes (the tiny model's large weights amplify it)
    assert (together - summed).norm() <= 1e-4 * summed.norm()
    assert losses == pytest.approx([alone[0][1][0], alone[1][1][0]], rel=1e-5)
    assert (alone[0][0] - alone[1][0]).norm() > 0.1 * alone[0][0].norm()  # the two really differ


@pytest.mark.parametrize("kind,algorithm", [("causal", "maml"), ("causal", "fomaml"), ("causal", "reptile"),
                                            ("seq2seq", "maml")])
def test_episodes_in_parallel_threads_give_the_gradient_of_one_at_a_time(tiny_dir, kind, algorithm):
    """The meta-batch's episodes in two threads, one core each: the same summed gradient and
    losses as one at a time, every time, and the process's threads and attention kernels as
    they were. sdpa attention: the kernel choice is process-wide, and MAML's double backward
    needs the math kernel in both threads until both are done."""
    from core.algorithms.upstream import UpstreamConfig, meta_grad

    backbone = load(str(tiny_dir[kind]))
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))
    prompt = model.prompt.detach()

    def cfg(parallel):
        return UpstreamConfig(algorithm, inner_lr=0.5, inner_steps=2, meta_batch=2, parallel_episodes=parallel,
                              batch_episodes=None if parallel else False).resolved()

    threads, kernels = torch.get_num_threads(), torch.backends.cuda.flash_sdp_enabled()
    torch.set_num_threads(2)
    try:
        alone, alone_losses = meta_grad(model, prompt, [EPISODE, OTHER], cfg(False))
        for _ in range(3):
            together, losses = meta_grad(model, prompt, [EPISODE, OTHER], cfg(True))
            # one thread's sums, not two's: at inner lr 0.5 the tiny model amplifies fp32's rounding of
            # the other thread count's sums to 1.03e-4 (FoMAML, on an EPYC without AVX-512), and the
            # second episode's loss to 1.08e-5 (FoMAML, on an EPYC with AVX-512; so at d06d073 too)
            assert (together - alone).norm() <= 1e-3 * alone.norm()
            assert losses == pytest.approx(alone_losses, rel=1e-4)
            assert torch.get_num_threads() == 2 and torch.backends.cuda.flash_sdp_enabled() == kernels
    finally:
        torch.set_num_threads(threads)


def test_how_a_meta_batch_runs_by_default_and_when_asked(tiny_dir):
    """By default on a CPU a meta-batch runs 2 episodes per forward (at most twice one episode's
    memory, however long the meta-batch); MTL, whose meta-batch is one batch, one; parallel
    threads only when asked, up to one per core."""
    from core.algorithms.upstream import UpstreamConfig, episode_threads, episodes_per_forward

    backbone = load(str(tiny_dir["causal"]))
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))
    way = lambda algorithm, **kw: (episodes_per_forward(model, c := UpstreamConfig(algorithm, **kw).resolved()),
                                   episode_threads(model, c))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for algorithm, default in [("maml", 2), ("metapt", 2), ("fomaml", 2), ("reptile", 2), ("mtl", 1)]:
            assert way(algorithm) == (default, 1), algorithm
            assert way(algorithm, parallel_episodes=True) == (1, 2 if algorithm != "mtl" else 1)  # mtl: meta-batch 1
            assert way(algorithm, batch_episodes=False) == (1, 1)
        assert way("maml", meta_batch=5) == (2, 1)
        assert way("fomaml", batch_episodes=True, meta_batch=5) == (5, 1)  # asked: the whole meta-batch
        assert way("maml", parallel_episodes=True, batch_episodes=True) == (2, 1)
        assert way("maml", parallel_episodes=True, meta_batch=4) == (1, 2)
        torch.set_num_threads(8)
        assert way("maml", meta_batch=16) == (2, 1)
        assert way("maml", parallel_episodes=True, meta_batch=16) == (1, 8)
        torch.set_num_threads(1)
        assert way("maml", parallel_episodes=True) == (1, 1)
    finally:
        torch.set_num_threads(threads)


def test_a_meta_batch_in_chunks_of_two_gives_the_gradient_of_one_at_a_time(tiny_dir):
    """MAML's default on a CPU: three episodes as 2 in one forward, then 1."""
    from core.algorithms.upstream import UpstreamConfig, meta_grad

    backbone = load(str(tiny_dir["causal"]))
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))
    prompt = model.prompt.detach()
    drawn = [EPISODE, OTHER, OTHER]
    cfg = lambda batch: UpstreamConfig("maml", inner_lr=0.5, inner_steps=2, meta_batch=3, batch_episodes=batch).resolved()
    alone, alone_losses = meta_grad(model, prompt, drawn, cfg(False))
    chunked, losses = meta_grad(model, prompt, drawn, cfg(None))
    assert (chunked - alone).norm() <= 1e-4 * alone.norm()
    assert losses == pytest.approx(alone_losses, rel=1e-5)


def test_episodes_in_one_forward_run_their_attention_a_block_per_episode(tiny_dir, monkeypatch):
    """sdpa on a CPU: no episode's rows see another's tokens, so each layer's attention runs one
    block per episode over that episode's keys only, in every pass of MAML (the support's, which
    is differentiated twice, and the query's), the episodes in one pack however short PACK_TOKENS
    (no prompt runs twice); the meta-gradient is that of the whole square of packs of PACK_TOKENS."""
    import torch.nn.functional as F
    from types import SimpleNamespace

    from core.backbones import blocked

    backbone = load(str(tiny_dir["causal"]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "random", seed=1))
    prompt = model.prompt.detach()
    calls = []  # (queries, keys) of each SDPA call in a block

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return F.scaled_dot_product_attention(q, k, v, **kw)

    monkeypatch.setattr(blocked, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    model.PACK_TOKENS = 1  # a pack per row, were the attention not by blocks
    blocks, losses = maml_grad(model, prompt, [EPISODE, OTHER], 0.5, 1)
    layers = backbone.model.config.num_hidden_layers
    assert len(calls) == 2 * 2 * layers  # two passes (support, query), two episodes each
    assert all(q == k for q, k in calls)  # a block's keys: its own episode's, up to its last query
    support = calls[:2]
    assert 4 + sum(len(model._tokens(e.input, False)) for e in EPISODE.support) <= support[0][0]  # the prompt and its rows
    calls.clear()
    model.BLOCKED = False
    square, square_losses = maml_grad(model, prompt, [EPISODE, OTHER], 0.5, 1)
    assert calls == []
    # float rounding only: other shapes (the tiny model's large weights amplify it, as above)
    assert (blocks - square).norm() <= 1e-4 * square.norm() and losses == pytest.approx(square_losses, rel=1e-5)
