"""SoftPromptModel on tiny random Llama and T5 backbones: what trains, what is scored, and that
the shortcuts (answer-only LM head, the prompt's KV cache shared by a batch, KV-cache greedy
decoding) give the plain model's numbers."""
import hashlib

import pytest
import torch

from core.algorithms.pt import TrainConfig, train_prompt
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from core.tasks.base import Example, Split, TaskInfo

SENTIMENT = TaskInfo("tiny_sentiment", "classification", "ACC", ("positive", "negative"))
TRAIN = [Example("the movie was good", ("positive",)), Example("the film was awful", ("negative",)),
         Example("a great film", ("positive",)), Example("a bad movie", ("negative",))]


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


@pytest.mark.parametrize("cache_rows", [1, 100], ids=["prompt KV cache shared", "prompt concatenated"])
def test_answer_only_head_on_a_padded_batch_equals_the_full_forward(tiny_backbone, cache_rows):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3, "random"))
    model.PROMPT_CACHE_ROWS = cache_rows
    examples = [Example("the movie was good and the film was great", ("positive",)),
                Example("awful", ("a bad movie",)), Example("what color is the sky ?", ("blue",))]
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
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)


def test_one_prompt_per_example_equals_shared_prompts(tiny_backbone):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3, "random"))
    other = init_prompt(tiny_backbone, 3, "random", seed=7)
    batch = model.encode(["the movie was good", "awful"], ["positive", "negative"])
    per_example = model.answer_logprobs(batch, torch.stack([model.prompt.detach(), other]))
    first = model.answer_logprobs(model.encode(["the movie was good"], ["positive"]))
    second = model.answer_logprobs(model.encode(["awful"], ["negative"]), other)
    torch.testing.assert_close(per_example, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_rows", [1, 100], ids=["prompt KV cache shared", "prompt concatenated"])
def test_cached_greedy_decoding_equals_transformers_generate(tiny_dir, cache_rows):
    from core.backbones import load

    backbone = load(str(tiny_dir["causal"]))
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


@pytest.mark.parametrize("cache_rows", [1, 100], ids=["prompt KV cache shared", "prompt concatenated"])
def test_option_scores_with_a_shared_prefix_cache_equal_full_sequences(tiny_backbone, cache_rows):
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3, "random", seed=4))
    model.PROMPT_CACHE_ROWS = cache_rows
    inputs = ["the movie was good and great", "awful", "what color is the sky ?"]
    options = [("positive", "negative"), ("a bad movie", "great", "the film"), ("blue",)]
    shared = model.option_logliks(inputs, options)
    for text, opts, scores in zip(inputs, options, shared):
        alone = torch.stack([model.sequence_logliks([text], [o])[0] for o in opts]).detach()
        torch.testing.assert_close(scores, alone, atol=1e-4, rtol=1e-5)
