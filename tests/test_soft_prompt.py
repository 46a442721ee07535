"""SoftPromptModel on tiny random Llama and T5 backbones: what trains, what is scored, and that
the shortcuts (answer-only LM head, rows packed end to end, the prompt's KV cache shared by a batch, KV-cache greedy
decoding) give the plain model's numbers."""
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from core.algorithms.pt import RunResult, TrainConfig, best_of, train_prompt
from core.backbones.soft_prompt import SoftPromptModel, plan_packs
from core.prompts import init_prompt
from core.tasks.base import Example, Split, TaskInfo

SENTIMENT = TaskInfo("tiny_sentiment", "classification", "ACC", ("positive", "negative"))
TRAIN = [Example("the movie was good", ("positive",)), Example("the film was awful", ("negative",)),
         Example("a great film", ("positive",)), Example("a bad movie", ("negative",))]


class LargestFloat32(TorchDispatchMode):  # the most elements of any fp32 tensor an operator makes (not a view)
    most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and not func.is_view:
            self.most = max(self.most, out.numel())
        return out


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_only_the_prompt_trains_and_the_backbone_stays_bit_identical(tiny_backbone):
    before = fingerprint(tiny_backbone.model)
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 5, "vocab"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt"]
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    start = model.prompt.detach().clone()

    split = Split(train=TRAIN, dev=TRAIN, test=TRAIN, seed=100, k=2)
    cfg = TrainConfig(batch_size=4, max_steps=40, eval_every=20, optimizer="adamw", weight_decay=0.0)
    first = model.loss(TRAIN).item()
    train_prompt(model, split, SENTIMENT, start, lr=0.1, cfg=cfg)  # leaves the last prompt in place

    assert model.loss(TRAIN).item() < first * 0.7  # the loss really goes down
    assert not torch.equal(model.prompt.detach(), start)  # the prompt moved ...
    assert fingerprint(tiny_backbone.model) == before  # ... and not one backbone bit did


def test_a_nan_dev_score_beats_nothing_and_anything_beats_it(tiny_backbone, monkeypatch):
    # CrossFit's Pearson of constant predictions is NaN, as a fresh prompt's dev score may well be:
    # as in CrossFit, whose best starts below every score, the scores reached later still count.
    scripted = iter([float("nan"), 0.2, float("nan"), 0.5, 0.1])
    monkeypatch.setattr("core.algorithms.pt.evaluate", lambda *a, **k: next(scripted))
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 5, "vocab"))
    cfg = TrainConfig(batch_size=4, max_steps=4, eval_every=1, optimizer="adamw", weight_decay=0.0)
    run = train_prompt(model, Split(train=TRAIN, dev=TRAIN, test=[], seed=100, k=2), SENTIMENT,
                       model.prompt.detach().clone(), lr=0.1, cfg=cfg)
    assert (run.best_dev, run.best_step) == (0.5, 3)
    devs = [c["dev"] for c in run.curve if "dev" in c]
    assert math.isnan(devs[0]) and devs[1:] == [0.2, devs[2], 0.5, 0.1] and math.isnan(devs[2])
    runs = [RunResult(100, lr, dev, 0, None, 4, 1.0) for lr, dev in ((0.1, float("nan")), (0.3, 0.4), (1.0, 0.4))]
    assert best_of(runs).lr == 0.3  # the lr grid's choice: NaN the worst, ties to the first
    assert best_of(runs[:1]).lr == 0.1


def test_a_run_whose_loss_turns_nan_stops_there_and_keeps_its_best_dev(tiny_backbone, monkeypatch):
    # Once a step's loss is NaN (a learning rate too large for the grid), its gradient would make
    # the prompt NaN for every later step: the run stops instead of spending them.
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 5, "vocab"))
    calls, loss = [], model.loss

    def loss_turning_nan(batch):  # at the third step
        calls.append(batch)
        return loss(batch) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(model, "loss", loss_turning_nan)
    cfg = TrainConfig(batch_size=4, max_steps=8, eval_every=1, optimizer="adamw", weight_decay=0.0)
    events = []
    run = train_prompt(model, Split(train=TRAIN, dev=TRAIN, test=[], seed=100, k=2), SENTIMENT,
                       model.prompt.detach().clone(), lr=0.1, cfg=cfg, progress=events.append)
    assert run.steps == 3 and len(calls) == 3 and math.isnan(run.curve[-1]["loss"])
    assert events[-1]["diverged"] and events[-1]["best_dev"] == run.best_dev and run.best_step <= 2
    assert torch.isfinite(run.prompt).all() and torch.isfinite(model.prompt).all()  # the NaN step was never taken


def test_rank_classification_picks_the_most_likely_option_of_each_example(tiny_backbone):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 5, "random", seed=3))
    examples = TRAIN + [Example("what color is the sky ?", ("blue",), options=("blue", "red", "the film"))]
    predicted = model.predict(examples, SENTIMENT, batch_size=3)  # batches mix examples and options
    for example, choice in zip(examples, predicted):
        options = example.options or SENTIMENT.options
        with torch.no_grad():  # each option scored alone, unbatched
            alone = [model.sequence_logliks([example.input], [o]).item() for o in options]
        assert choice == options[max(range(len(options)), key=alone.__getitem__)]
    assert predicted[-1] in ("blue", "red", "the film")  # the example's own options, not the task's


def full_forward_logprobs(model: SoftPromptModel, example: Example) -> torch.Tensor:
    """The answer tokens' log-probs from one unpadded sequence through the plain HF forward."""
    batch = model.encode([example.input], [example.output])
    embeds, mask, P = model._with_prompt(batch, None)
    lm = model.backbone.model
    if model.causal:
        logits = lm(inputs_embeds=embeds, attention_mask=mask).logits[0]
        picked = logits[batch.answer_pos + P]
    else:
        picked = lm(inputs_embeds=embeds, attention_mask=mask, labels=batch.answer).logits[0]
    return torch.log_softmax(picked, -1).gather(1, batch.answer_ids[:, None]).squeeze(1)


# How a batch's rows run: packed end to end (all in one pack, or one pack per row), or padded
# (the prompt's KV cache shared by the rows, or the prompt concatenated in front of each).
LAYOUTS = {"packed, one pack": dict(PACK_TOKENS=10**6), "packed, a pack per row": dict(PACK_TOKENS=1),
           "padded, prompt KV cache shared": dict(PACK=False, PROMPT_CACHE_ROWS=1),
           "padded, prompt concatenated": dict(PACK=False, PROMPT_CACHE_ROWS=100)}


# The causal backbones: Llama, and Gemma 3, whose first layer sees only the last 4 positions (a
# sliding window shorter than most rows here, as Gemma-3-270M's 512 is shorter than a long row).
CAUSAL = {"llama": "causal", "gemma": "gemma"}


# Inputs that all begin with the same words, as a task's template makes them (SHARE_PREFIX).
TEMPLATE = "is the movie good ? answer positive or negative . message : "
TEMPLATES = {"own words": "", "a shared template": TEMPLATE}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_answer_only_head_on_a_batch_equals_the_full_forward(tiny_backbone, layout, template):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3, "random"))
    for name, value in LAYOUTS[layout].items():
        setattr(model, name, value)
    examples = [Example(TEMPLATES[template] + text, answer) for text, answer in (
        ("the movie was good and the film was great", ("positive",)), ("awful", ("a bad movie",)),
        ("what color is the sky ?", ("blue",)))]
    batch = model.encode([e.input for e in examples], [e.output for e in examples])
    assert batch.mask.sum(1).unique().numel() == 3  # three lengths: real padding in play
    together = model.answer_logprobs(batch)
    alone = torch.cat([full_forward_logprobs(model, e) for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The prompt's KV cache, run once and copied to every row, passes the same gradient back
    # to the prompt as the plain forward of [prompt; input] per example.
    (ours,) = torch.autograd.grad(together.sum(), model.prompt)
    (plain,) = torch.autograd.grad(alone.sum(), model.prompt)
    assert plain.norm() > 0
    # relative to the whole gradient: the tiny Llama's is large (norm ~80), and fp32 kernels that
    # sum in another order (one CPU to the next) move its smallest elements by more than 1e-5
    assert (ours - plain).norm() < 2e-5 * plain.norm()


def test_packs_are_few_even_and_hold_every_row_once():
    # 8 rows of 10 tokens and one prompt of 4: 84 tokens, 2 packs of at most 50, 44 tokens each.
    packs = plan_packs([10] * 8, [0] * 8, 4, 50)
    assert [[(g, len(rows)) for g, rows in pack] for pack in packs] == [[(0, 4)], [(0, 4)]]
    # Rows of three groups, longer and shorter; a row longer than the cap gets a pack of its own.
    sizes, owner = [30, 5, 12, 7, 90, 3, 18, 11, 6], [0, 0, 0, 1, 1, 1, 2, 2, 2]
    packs = plan_packs(sizes, owner, 8, 60)
    placed = sorted(r for pack in packs for _, rows in pack for r in rows)
    assert placed == list(range(len(sizes)))
    for pack in packs:
        assert all(owner[r] == g for g, rows in pack for r in rows)
        length = sum(8 + sum(sizes[r] for r in rows) for _, rows in pack)
        assert length <= 60 or sum(len(rows) for _, rows in pack) == 1
    assert plan_packs([5], [0], 0, 1) == [[(0, [0])]]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("pack_tokens", [10**6, 20, 1])
@pytest.mark.parametrize("arch", CAUSAL)
def test_groups_packed_together_give_each_group_its_own_loss(tiny_dir, arch, pack_tokens, template):
    """Three groups under three prompts, packed (some packs holding several groups, some groups
    split across packs): each group's loss and gradient are those of the group alone, padded."""
    from core.backbones import load

    backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random"))
    own = TEMPLATES[template]
    groups = [[Example(own + e.input, e.outputs) for e in g] for g in (
        TRAIN[:3], TRAIN[3:] + [Example("what color is the sky ?", ("blue",))], TRAIN[1:2])]
    prompts = torch.stack([init_prompt(model.backbone, 3, "random", seed=i) for i in range(3)]).requires_grad_(True)
    model.PACK_TOKENS = pack_tokens
    packed = model.group_losses(groups, prompts)
    (g_packed,) = torch.autograd.grad(packed.sum(), prompts)
    model.PACK = False
    alone = torch.stack([model.loss(g, p) for g, p in zip(groups, prompts)])
    (g_alone,) = torch.autograd.grad(alone.sum(), prompts)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_packed, g_alone, atol=1e-5, rtol=1e-4)
    assert g_alone[2].norm() > 0


@pytest.mark.parametrize("arch", CAUSAL)
def test_rows_sharing_a_template_run_it_once_per_pack(tiny_dir, arch):
    """The tokens the rows of a group begin with run once per pack, and the loss and the
    gradient are those of every row running its own: rows with other words after the template,
    one that is the start of another, one without the template (another task's, say), and the
    same input twice (all but its last token shared)."""
    from core.backbones import load

    backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random"))
    fed, run = [], model._run_packs
    model._run_packs = lambda packs, *a, **k: fed.append(sum(len(s.tokens) for p in packs for s in p)) or run(packs, *a, **k)
    template = len(model._tokens(TEMPLATE, False)) - 2  # less the cue, "\nAnswer:"
    for texts, shared, sharing in (([TEMPLATE + "awful", TEMPLATE + "awful movie", "the film was good",
                                     TEMPLATE + "the film was good"], template, 3),
                                   ([TEMPLATE + "awful"] * 2, len(model._tokens(TEMPLATE + "awful", False)) - 1, 2)):
        examples = [Example(t, (a,)) for t, a in zip(texts, ("negative", "positive", "positive", "negative"))]
        results = []
        for share in (True, False):
            fed.clear()
            model.SHARE_PREFIX = share
            loss = model.loss(examples)
            results.append((loss, *torch.autograd.grad(loss, model.prompt), fed[0]))
        (loss, grad, n), (loss_own, grad_own, n_own) = results
        torch.testing.assert_close(loss, loss_own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grad_own, atol=1e-5, rtol=1e-4)
        assert n == n_own - (sharing - 1) * shared and shared > 0
    # Rank classification: the inputs' shared prefix goes into the prompt's KV cache, fed once.
    inputs, scores = [TEMPLATE + "awful", TEMPLATE + "the film was good", "hello"], []
    for share in (True, False):
        fed.clear()
        model.SHARE_PREFIX = share
        with torch.no_grad():
            scores.append((torch.cat(model.option_logliks(inputs, [("positive", "negative")] * 3)), fed[0]))
    torch.testing.assert_close(scores[0][0], scores[1][0], atol=1e-5, rtol=1e-5)
    assert scores[0][1] == scores[1][1] - 2 * template


@pytest.mark.parametrize("kind", ["causal", "gemma", "seq2seq"])
def test_an_input_past_max_input_tokens_loses_its_middle_not_its_template_or_end(tiny_dir, kind):
    """Past max_input_tokens an input keeps its first half (its template, the question and its
    label words) and its last (the end of the text, then a causal LM's answer cue or a seq2seq
    tokenizer's </s>); shorter ones are whole; rows so cut still share their template. With
    truncation "left" it keeps its last max_input_tokens (primer's causal rule before)."""
    from core.backbones import load
    from core.backbones.soft_prompt import CAUSAL_ANSWER_CUE

    backbone = load(str(tiny_dir[kind]), attn="sdpa")
    whole = SoftPromptModel(backbone, init_prompt(backbone, 3, "random"), max_input_tokens=10**4)
    n = 2 * len(whole._tokens(TEMPLATE, False)) + 2
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random"), max_input_tokens=n)
    left = SoftPromptModel(backbone, init_prompt(backbone, 3, "random"), max_input_tokens=n, truncation="left")
    texts = [TEMPLATE + "the film was " + " and ".join([word] * 30) + " at the end" for word in ("long", "slow")]
    for text in texts:
        full, ids = whole._tokens(text, False), model._tokens(text, False)
        assert len(full) > n and ids == full[: n // 2] + full[len(full) - (n - n // 2):]
        end = backbone.tokenizer(CAUSAL_ANSWER_CUE, add_special_tokens=False).input_ids if model.causal else [backbone.tokenizer.eos_token_id]
        assert ids[-len(end):] == end and left._tokens(text, False) == full[-n:]
    assert model._tokens(TEMPLATE + "awful", False) == whole._tokens(TEMPLATE + "awful", False)
    if model.causal:
        seqs = [model._tokens(t, False) for t in texts]
        rows, shared = model._template(seqs, [len(x) - 1 for x in seqs])
        assert rows == {0, 1} and shared >= len(whole._tokens(TEMPLATE, False)) - len(end)


def test_packing_without_a_prompt_fine_tuning(tiny_dir):
    from core.backbones import load

    backbone = load(str(tiny_dir["causal"]), attn="sdpa")
    model = SoftPromptModel(backbone, torch.zeros(0, backbone.dim), allow_empty=True)
    packed = model.loss(TRAIN)
    model.PACK = False
    torch.testing.assert_close(packed, model.loss(TRAIN), atol=1e-5, rtol=1e-5)


def test_one_prompt_per_example_equals_shared_prompts(tiny_backbone):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3, "random"))
    other = init_prompt(tiny_backbone, 3, "random", seed=7)
    batch = model.encode(["the movie was good", "awful"], ["positive", "negative"])
    per_example = model.answer_logprobs(batch, torch.stack([model.prompt.detach(), other]))
    first = model.answer_logprobs(model.encode(["the movie was good"], ["positive"]))
    second = model.answer_logprobs(model.encode(["awful"], ["negative"]), other)
    torch.testing.assert_close(per_example, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_rows", [1, 100], ids=["prompt KV cache shared", "prompt concatenated"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_cached_greedy_decoding_equals_transformers_generate(tiny_dir, arch, cache_rows):
    from core.backbones import load

    backbone = load(str(tiny_dir[CAUSAL[arch]]))
    model = SoftPromptModel(backbone, init_prompt(backbone, 4, "vocab"), max_answer_tokens=6)
    model.PROMPT_CACHE_ROWS = cache_rows
    examples = [Example("what color is the sky ?", ("blue",)), Example("hello", ("friend",)),
                Example("the capital of france is", ("paris",))]
    ours = model.generate(examples)
    for example, text in zip(examples, ours):
        embeds, mask, _ = model._with_prompt(model.encode([example.input], None), None)
        ids = backbone.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                                      do_sample=False, eos_token_id=backbone.tokenizer.eos_token_id,
                                      pad_token_id=backbone.tokenizer.pad_token_id)
        assert text == backbone.tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    assert all(ours)  # a random model emits words here; empty strings would make this vacuous


def test_classification_without_options_is_a_clear_error(tiny_backbone):
    from core.tasks.base import TaskError

    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 2))
    with pytest.raises(TaskError, match="no_opts.*option set"):
        model.predict(TRAIN[:1], TaskInfo("no_opts", "classification", "ACC", None))


def test_prompt_width_must_match_the_backbone(tiny_backbone):
    with pytest.raises(ValueError, match="width 7 .* 32 dimensions"):
        SoftPromptModel(tiny_backbone, torch.zeros(4, 7))


# How options are scored: packed with their inputs (all in one pack, or an input and its options
# per pack), or as continuations of each input's KV cache, copied per option (with the prompt's
# own KV cache shared, or the prompt concatenated in front of each input).
# Packed, the attention runs an input and its options a row of a padded batch, over one pack or
# over packs of one input each (core/backbones/blocked.py), or over the whole square of each
# pack. LOGPROB_ELEMENTS=1: the logsumexp one row at a time.
OPTION_LAYOUTS = {"packed, one pack, by units": dict(LOGPROB_ELEMENTS=1),
                  "packed, an input per pack, by units": dict(BLOCKED_PACK_TOKENS=1),
                  "packed, one pack, the whole square": dict(BLOCKED=False, PACK_TOKENS=10**6),
                  "packed, an input per pack, the whole square": dict(BLOCKED=False, PACK_TOKENS=1),
                  "input cache, prompt KV cache shared": dict(PACK=False, PROMPT_CACHE_ROWS=1),
                  "input cache, prompt concatenated": dict(PACK=False, PROMPT_CACHE_ROWS=100)}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("prompt_length", [3, 0], ids=["prompt", "no prompt"])
@pytest.mark.parametrize("layout", OPTION_LAYOUTS)
@pytest.mark.parametrize("arch", CAUSAL)
def test_option_scores_equal_each_option_through_the_plain_forward(tiny_dir, arch, layout, prompt_length, template):
    from core.backbones import load

    backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa")
    init = init_prompt(backbone, 3, "random", seed=4) if prompt_length else torch.zeros(0, backbone.dim)
    model = SoftPromptModel(backbone, init, allow_empty=True)
    for name, value in OPTION_LAYOUTS[layout].items():
        setattr(model, name, value)
    # the last one without the template (another task's, say)
    inputs = [TEMPLATES[template] + t for t in ("the movie was good and great", "awful", "what color is the sky ?")] + ["hello"]
    options = [("positive", "negative"), ("a bad movie", "great", "the film"), ("blue",), ("friend", "you see")]
    with torch.no_grad():
        scored = model.option_logliks(inputs, options)
        for text, opts, scores in zip(inputs, options, scored):
            alone = torch.stack([full_forward_logprobs(model, Example(text, (o,))).sum() for o in opts])
            torch.testing.assert_close(scores, alone, atol=1e-4, rtol=1e-5)


def test_ranking_attention_runs_in_one_call_an_input_and_its_options_a_row(tiny_dir, monkeypatch):
    """One pack of many inputs: each layer's attention is one SDPA call over a batch with a row
    per input (its tokens, then its options'), padded to the longest, each row over the cache's
    keys and its own: no call takes the pack's (S, C + S) square. The scores are checked against
    the plain forward above."""
    from core.backbones import blocked, load

    backbone = load(str(tiny_dir["causal"]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
    calls = []  # (rows, queries, keys) of each SDPA call

    def spy(q, k, v, **kw):
        calls.append((q.shape[0], q.shape[2], k.shape[2]))
        return F.scaled_dot_product_attention(q, k, v, **kw)

    monkeypatch.setattr(blocked, "F", SimpleNamespace(scaled_dot_product_attention=spy, pad=F.pad))
    texts = ("the movie was good and great", "awful", "what color is the sky ?", "a fine film")
    inputs = [TEMPLATE + t for t in texts] * 3
    with torch.no_grad():
        model.option_logliks(inputs, [("positive", "negative")] * 12)
    template = len(model._tokens(TEMPLATE, False)) - 2  # less the cue, "\nAnswer:"
    longest = max(len(model._tokens(TEMPLATE + t, False)) for t in texts) - template + 2  # + an option token each
    C = 3 + template  # the prompt and the template, in the cache
    assert calls == [(12, longest, C + longest)] * backbone.model.config.num_hidden_layers
    # BLOCKED off: no call goes through the units
    calls.clear()
    model.BLOCKED = False
    with torch.no_grad():
        model.option_logliks(inputs, [("positive", "negative")] * 12)
    assert calls == []


@pytest.mark.parametrize("arch", CAUSAL)
def test_ranking_runs_the_last_layers_mlp_at_its_predicting_positions_only(tiny_dir, arch):
    """Only the predicting positions' last hidden states are read (an input's last token, each
    option's fed tokens), so the last layer's MLP runs those rows alone; every other layer runs
    them all. A loss reads only its answer-predicting positions, so the same holds for it. The
    scores and losses are checked against the plain forward above."""
    from core.backbones import lean, load

    backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
    layers = backbone.model.base_model.layers
    assert all(isinstance(layer.mlp, lean.GatedMLP) for layer in layers)
    rows = {}  # layer -> rows its MLP ran
    for i, layer in enumerate(layers):
        run = layer.mlp._rows
        layer.mlp._rows = lambda x, i=i, run=run: rows.setdefault(i, []).append(x.reshape(-1, x.shape[-1]).shape[0]) or run(x)
    inputs = [TEMPLATE + t for t in ("the movie was good and great", "awful", "what color is the sky ?")]
    options = [("positive", "negative"), ("a bad movie", "great"), ("blue",)]
    with torch.no_grad():
        model.option_logliks(inputs, options)
    fed = sum(len(model._tokens(o, True)) - 1 for opts in options for o in opts)  # an option's tokens but its EOS
    predicting = len(inputs) + fed  # each input's last token, each option's fed tokens
    template = len(model._tokens(TEMPLATE, False)) - 2
    S = sum(len(model._tokens(t, False)) - template for t in inputs) + fed
    # the last forward is the pack's (the one before it, the prompt's and template's states)
    assert rows[len(layers) - 1][-1] == predicting < S
    assert all(rows[i][-1] == S for i in range(len(layers) - 1))
    rows.clear()
    model.loss(TRAIN)
    answers = len(model.encode([e.input for e in TRAIN], [e.output for e in TRAIN]).answer_ids)
    assert rows[len(layers) - 1][-1] == answers < rows[0][-1]  # a loss: its answer tokens' predictors
    assert len({rows[i][-1] for i in range(len(layers) - 1)}) == 1


def test_an_mlp_told_the_rows_read_runs_them_alone(tiny_dir):
    from core.backbones import lean, load

    backbone = load(str(tiny_dir["causal"]))
    mlp, first = backbone.model.base_model.layers[-1].mlp, backbone.model.base_model.layers[0].mlp
    x = torch.randn(2, 5, backbone.dim)
    rows = torch.tensor([1, 6, 9])
    with torch.no_grad():
        with lean.rows_read(mlp, rows):
            out, other = mlp(x).reshape(10, -1), first(x)  # the first layer's was not told: all of its rows
        whole = mlp(x).reshape(10, -1)
        torch.testing.assert_close(out[rows], whole[rows])
        assert not out[[0, 2, 3, 4, 5, 7, 8]].any() and whole.abs().sum(1).min() > 0
        torch.testing.assert_close(other, first(x))


def test_ranking_runs_the_prompt_and_template_once_for_all_its_batches(tiny_dir):
    from core.backbones import load

    backbone = load(str(tiny_dir["causal"]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
    inputs = [TEMPLATE + t for t in ("the movie was good and great", "awful", "what color is the sky ?", "a fine film")]
    inputs += ["hello", TEMPLATE]  # one without the template, one that is the template alone
    examples = [Example(t, ("positive",)) for t in inputs]
    options = [("positive", "negative")] * len(inputs)
    states, run = [], model._prompt_states
    model._prompt_states = lambda p: states.append(len(p)) or run(p)
    template = len(model._tokens(TEMPLATE, False)) - 2  # less the cue, "\nAnswer:"
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # rank's batches
    batches = [order[b : b + 2] for b in range(0, len(inputs), 2)]
    with torch.no_grad():
        best = model.rank(examples, options, batch_size=2)
        assert states == [3 + template]  # once, the prompt and the template
        states.clear()
        alone = [model.option_logliks([inputs[i] for i in b], [options[i] for i in b]) for b in batches]
        assert len(states) == len(batches)  # each batch its own, where no prefix is given
        prefix = model._option_prefix([model._tokens(t, False) for t in inputs], None)
        shared = [model.option_logliks([inputs[i] for i in b], [options[i] for i in b], prefix=prefix) for b in batches]
    for b, ours, theirs in zip(batches, shared, alone):
        for i, scores, own in zip(b, ours, theirs):
            torch.testing.assert_close(scores, own, atol=1e-5, rtol=1e-5)
            assert best[i] == options[i][int(own.argmax())]
    # the head over the predicting positions of as many batches as make HEAD_ROWS: a batch of 2
    # inputs has 6 (each input's last, each option's one fed token), so batches 1-2, then 3
    heads, head = [], model._head_logprobs
    model._head_logprobs = lambda h, *a: heads.append(len(h)) or head(h, *a)
    model.HEAD_ROWS = 7
    with torch.no_grad():
        assert model.rank(examples, options, batch_size=2) == best
        together = model.option_logliks([inputs[i] for i in order], [options[i] for i in order], batch_size=2)
    assert heads == [12, 6, 12, 6]
    for ours, theirs in zip(together, [s for a in alone for s in a]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("arch", CAUSAL)
def test_ranking_scores_leave_out_only_the_log_normalizer_an_inputs_options_share(tiny_dir, arch):
    """rank's scores (relative): each option's log-likelihood less its input's last position's
    logsumexp, a constant of the input, so the order is the same; that position's head runs over
    the options' first words only, the full vocabulary at the options' own positions alone."""
    from core.backbones import load

    backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
    inputs = [TEMPLATE + t for t in ("the movie was good and great", "awful", "what color is the sky ?")] + ["hello"]
    options = [("positive", "negative"), ("a bad movie", "great", "the film"), ("blue",), ("friend", "you see")]
    heads, run = [], model._head_logprobs  # (positions, those normalized) of each call
    model._head_logprobs = lambda h, tokens, rows, normalized=None: heads.append(
        (len(h), len(h) if normalized is None else int(normalized.sum()))) or run(h, tokens, rows, normalized)
    with torch.no_grad():
        exact = model.option_logliks(inputs, options)
        relative = model.option_logliks(inputs, options, relative=True)
    fed = sum(len(model._tokens(o, True)) - 1 for opts in options for o in opts)  # the options' own positions
    assert heads == [(len(inputs) + fed, len(inputs) + fed), (len(inputs) + fed, fed)]
    for ours, theirs in zip(relative, exact):
        shift = ours - theirs
        torch.testing.assert_close(shift, shift[:1].expand_as(shift), atol=1e-5, rtol=1e-5)
        assert shift[0] > 0  # a logsumexp over the vocabulary left out
        assert int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("cap", [None, 3.0], ids=["no softcap", "softcap"])
def test_head_log_probs_without_autograd_run_the_head_by_blocks_of_words(tiny_dir, cap):
    from core.backbones import load

    backbone = load(str(tiny_dir["causal"]), attn="sdpa")
    backbone.model.config.final_logit_softcapping = cap
    head = backbone.model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(head.weight.shape[0], generator=torch.Generator().manual_seed(1)))
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
    model.HEAD_WORDS = 7  # not a divisor of the vocabulary: a short last block
    V = head.weight.shape[0]
    assert V % 7
    hidden = torch.randn(5, backbone.dim, generator=torch.Generator().manual_seed(0))
    rows, tokens = torch.tensor([0, 0, 3, 4, 4, 2]), torch.tensor([7, V - 1, 0, 12, 7, 5])
    logits = model._head(hidden)
    expected = torch.log_softmax(logits, -1)[rows, tokens]
    with torch.no_grad(), LargestFloat32() as seen:
        got = model._head_logprobs(hidden, tokens, rows)
        assert seen.most < 5 * V  # never the (5, V) logits
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        normalized = torch.tensor([True, False, True, True, False])
        partial = model._head_logprobs(hidden, tokens, rows, normalized)
    torch.testing.assert_close(partial, torch.where(normalized[rows], expected, logits[rows, tokens]), rtol=1e-6, atol=1e-6)
    with torch.enable_grad():  # with autograd, the same, differentiable
        h = hidden.clone().requires_grad_()
        model._head_logprobs(h, tokens, rows, normalized).sum().backward()
    assert h.grad is not None and h.grad[1].abs().sum() == 0  # row 1 is not read



def test_a_packs_forward_keeps_only_the_prompts_keys_and_values_in_its_cache(tiny_dir):
    """Ranking's forward hands each layer the prompt's keys and values followed by the pack's,
    and its cache keeps the prompt's alone: no layer's states are held until the forward ends."""
    from core.backbones import load

    backbone = load(str(tiny_dir["causal"]), attn="sdpa")
    model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
    caches, make = [], model._prompt_cache
    model._prompt_cache = lambda *a, **kw: caches.append(make(*a, **kw)) or caches[-1]
    with torch.no_grad():
        scores = model.option_logliks(["the movie was good", "awful"], [("positive", "negative")] * 2)
    assert len(caches) == 1 and [layer.keys.shape[2] for layer in caches[0].layers] == [3] * backbone.model.config.num_hidden_layers
    keys, values = caches[0].update(torch.ones(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), 0)
    assert keys.shape[2] == values.shape[2] == 5 and caches[0].layers[0].keys.shape[2] == 3
    assert all(torch.isfinite(s).all() for s in scores)


def test_units_and_blocks_of_a_pack():
    from core.backbones.blocked import plan, units

    # one pack of 6 tokens after a cache of 2: segments [0, 1, 2], [3, 4] and [5], causal within;
    # token 5 also sees tokens 3 and 4 (an option seeing its input)
    allowed = torch.zeros(1, 6, 8, dtype=torch.bool)
    allowed[0, :, :2] = True
    for a, b in ((0, 3), (3, 5), (5, 6)):
        for q in range(a, b):
            allowed[0, q, 2 + a : 2 + q + 1] = True
    allowed[0, 5, 5:7] = True
    u = units(allowed, 2, [(0, 0, 3), (0, 3, 6)])
    assert u.rows.tolist() == [[0, 1, 2], [3, 4, 5]] and u.real.all()
    with pytest.raises(ValueError, match="outside its unit"):
        units(allowed, 2, [(0, 0, 3), (0, 3, 5), (0, 5, 6)])  # token 5 sees 3 and 4, in another unit
    # two packs: units of different lengths, padded with their last row; the second pack's padding row in none
    two = torch.cat([allowed, allowed])
    two[1, 5] = False
    u = units(two, 2, [(0, 0, 3), (0, 3, 6), (1, 0, 3), (1, 3, 5)])
    assert u.rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 10]]
    assert u.real.tolist()[3] == [True, True, False]
    assert u.back.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]  # each row's place in the padded rows
    # blocks (no cache): a start that a later row sees across is left out
    groups = torch.ones(6, 6, dtype=torch.bool).tril()
    groups[3:, :3] = False
    assert plan(groups[None], [0, 3]).spans == ((0, 3), (3, 6))
    assert plan(groups[None], [0, 2, 3]).spans == ((0, 3), (3, 6))
    assert plan(torch.stack([groups, groups.roll((1, 1), (0, 1))]), [0, 3]).spans == ((0, 6),)  # the second pack's group starts at 4


def _attention_inputs(dtype):
    """Queries of 6 heads over 2 key/value heads, under a block mask, and a gradient for the output."""
    g = torch.Generator().manual_seed(0)
    B, H, KH, S, D = 2, 6, 2, 9, 8
    q, g_out = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, KH, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    allowed[5:, 1:4] = False  # a later segment does not see an earlier one
    mask = torch.zeros(1, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)], mask, g_out.to(dtype)


def _attention_grads(attention, dtype):
    (q, k, v), mask, g_out = _attention_inputs(dtype)
    attention(q, k, v, mask).backward(g_out)
    return [x.grad.double() for x in (q, k, v)]


def test_attention_backward_in_plain_operators_gives_sdpas_gradients():
    """blocked._MathBackward (bf16 training on a CPU): the flash kernel's forward, the backward
    in plain operators, grouped key heads as they are: SDPA's own gradients in float64, and in
    bf16 no further from those than SDPA's own bf16 backward is."""
    from core.backbones.blocked import _MathBackward

    sdpa = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    ours = lambda q, k, v, m: _MathBackward.apply(q, k, v, m, None)
    exact = _attention_grads(sdpa, torch.float64)
    for a, b in zip(_attention_grads(ours, torch.float64), exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (q, k, v), mask, _ = _attention_inputs(torch.float64)
    assert torch.autograd.gradgradcheck(lambda q, k, v: ours(q, k, v, mask), (q, k, v))  # MAML differentiates it again
    error = lambda grads: max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, exact))
    ours_bf16, sdpa_bf16 = error(_attention_grads(ours, torch.bfloat16)), error(_attention_grads(sdpa, torch.bfloat16))
    assert 0 < ours_bf16 < max(2 * sdpa_bf16, 1e-2)


@pytest.mark.parametrize("arch", CAUSAL)
def test_bf16_training_attention_takes_the_backward_in_plain_operators(tiny_dir, monkeypatch, arch):
    """In bf16 on a CPU, a loss's attention goes through _MathBackward in every layer, and its
    prompt gradient is SDPA's own (PLAIN_ATTENTION = ()) up to bf16's rounding; ranking (no
    gradient) and float32 do not go there. Taken in float64, it gives SDPA's gradients,
    MAML's meta-gradient among them (its support pass's backward differentiated again, where
    SDPA takes the math kernel)."""
    from core.algorithms.episodes import Episode
    from core.algorithms.maml import maml_grad
    from core.backbones import blocked, load

    calls = []
    plain = blocked._MathBackward.apply
    monkeypatch.setattr(blocked._MathBackward, "apply", lambda *a: calls.append(a[0].shape) or plain(*a))
    layers = load(str(tiny_dir[CAUSAL[arch]])).model.config.num_hidden_layers
    episodes = [Episode("tiny", 0, TRAIN[:2], TRAIN[2:]), Episode("tiny", 1, TRAIN[2:], TRAIN[:2])]

    def grads(model: SoftPromptModel, dtypes: tuple, maml: bool = False) -> torch.Tensor:
        monkeypatch.setattr(blocked, "PLAIN_ATTENTION", dtypes)
        calls.clear()
        if maml:
            return maml_grad(model, model.prompt.detach(), episodes, inner_lr=0.1, inner_steps=1)[0]
        prompt = torch.nn.Parameter(model.prompt.detach().clone())
        model.loss(TRAIN, prompt).backward()
        return prompt.grad

    def model(dtype: torch.dtype) -> SoftPromptModel:
        backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa", dtype=dtype)
        return SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))

    bf16 = model(torch.bfloat16)
    theirs = grads(bf16, ())
    assert calls == []
    ours = grads(bf16, (torch.bfloat16,))
    assert len(calls) == layers
    assert 0 < ((ours - theirs).norm() / theirs.norm()).item() < 0.05  # rounded differently, not another gradient
    calls.clear()
    with torch.no_grad():
        bf16.option_logliks([e.input for e in TRAIN], [SENTIMENT.options] * len(TRAIN))
    assert calls == []
    grads(model(torch.float32), (torch.bfloat16,))
    assert calls == []
    fp64 = model(torch.float64)
    torch.testing.assert_close(grads(fp64, (torch.float64,)), grads(fp64, ()), rtol=1e-9, atol=1e-12)
    theirs = grads(fp64, (), maml=True)
    ours = grads(fp64, (torch.float64,), maml=True)
    assert len(calls) == 2 * 2 * layers  # the support pass, then the query pass; in each a block per episode (one pack)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_attention_in_plain_operators_gives_sdpas_output():
    """blocked._plain (bf16 ranking on a CPU): SDPA's output over grouped key heads in float64,
    and in bf16 no more than 3 times as far from float64's as SDPA's own flash kernel is (it
    rounds the softmax to bf16 before the values: about twice)."""
    from core.backbones.blocked import _plain

    def out(attention, dtype):
        (q, k, v), mask, _ = _attention_inputs(dtype)
        with torch.no_grad():
            return attention(q, k, v, mask).double()

    sdpa = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    ours = lambda q, k, v, m: _plain(q, k, v, m, None)
    exact = out(sdpa, torch.float64)
    torch.testing.assert_close(out(ours, torch.float64), exact, rtol=1e-12, atol=1e-12)
    error = lambda attention: ((out(attention, torch.bfloat16) - exact).norm() / exact.norm()).item()
    assert 0 < error(ours) < max(3 * error(sdpa), 1e-3)


@pytest.mark.parametrize("arch", CAUSAL)
def test_bf16_ranking_attention_runs_in_plain_operators(tiny_dir, monkeypatch, arch):
    """In bf16 on a CPU, ranking's attention (no gradient, units of few rows) goes through
    blocked._plain in every layer, and its scores are SDPA's up to bf16's rounding; where a
    block's scores take more than PLAIN_BYTES, and in float32, it does not go there. Taken in
    float64, the scores are SDPA's. In bf16, they are about as far from those as SDPA's own bf16
    scores (at most 1.5 times)."""
    from core.backbones import blocked, load

    calls = []
    plain = blocked._plain
    monkeypatch.setattr(blocked, "_plain", lambda *a: calls.append(a[0].shape[:3].numel() * a[1].shape[2] * 2) or plain(*a))
    layers = load(str(tiny_dir[CAUSAL[arch]])).model.config.num_hidden_layers
    inputs, options = [e.input for e in TRAIN], [SENTIMENT.options] * len(TRAIN)

    def scores(dtype: torch.dtype, dtypes: tuple, limit: int = blocked.PLAIN_BYTES) -> torch.Tensor:
        backbone = load(str(tiny_dir[CAUSAL[arch]]), attn="sdpa", dtype=dtype)
        model = SoftPromptModel(backbone, init_prompt(backbone, 3, "random", seed=4))
        monkeypatch.setattr(blocked, "PLAIN_ATTENTION", dtypes)
        monkeypatch.setattr(blocked, "PLAIN_BYTES", limit)
        calls.clear()
        with torch.no_grad():
            return torch.cat(model.option_logliks(inputs, options, relative=True)).double()

    exact = scores(torch.float64, ())
    assert calls == []
    ours = scores(torch.float64, (torch.float64,))
    assert len(calls) == layers
    torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-10)
    theirs = scores(torch.bfloat16, ())
    assert calls == []
    ours = scores(torch.bfloat16, (torch.bfloat16,))
    assert len(calls) == layers
    error = lambda x: (x - exact).abs().mean().item()  # noqa: E731
    assert 0 < error(ours) < 1.5 * error(theirs)  # rounded differently, not other scores
    largest = max(calls)  # a block's scores in bytes: every layer's the same
    scores(torch.bfloat16, (torch.bfloat16,), limit=largest)
    assert len(calls) == layers
    scores(torch.bfloat16, (torch.bfloat16,), limit=largest - 1)
    assert calls == []
    scores(torch.float32, (torch.bfloat16,))
    assert calls == []


def test_answer_log_probs_without_autograd_take_fp32_a_few_rows_at_a_time():
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(6, 50, generator=gen)).to(torch.bfloat16)  # a bf16 backbone's head
    rows, tokens = torch.tensor([0, 0, 3, 5, 5]), torch.tensor([7, 49, 0, 12, 7])
    expected = torch.log_softmax(logits.float(), -1)[rows, tokens]
    model = SimpleNamespace(LOGPROB_ELEMENTS=100)  # 2 rows of 50 words at a time
    with torch.no_grad(), LargestFloat32() as seen:
        got = SoftPromptModel._token_logprobs(model, logits, tokens, rows)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert seen.most == 100  # never the (6, 50) logits in fp32
    with torch.no_grad():  # row i's token i + 1
        own = SoftPromptModel._token_logprobs(model, logits, torch.tensor([1, 2, 3, 4, 5, 6]))
    torch.testing.assert_close(own, torch.log_softmax(logits.float(), -1)[range(6), range(1, 7)], rtol=0, atol=1e-5)
    trained = logits.float().requires_grad_()  # with autograd: the log-softmax, differentiable
    SoftPromptModel._token_logprobs(model, trained, tokens, rows).sum().backward()
    assert trained.grad is not None and trained.grad[1].abs().sum() == 0  # row 1 is not read
