"""Prompt tuning the real SmolLM2-135M on real SMS spam (CrossFit rule: 16 shots per class, seed 100).

Slow (minutes on 2 cores) and needs the backbone fetched from PyPI once; CI runs it.
"""
import time

import pytest
import torch

from core.algorithms.pt import TrainConfig, train_prompt
from core.backbones import load
from core.backbones.soft_prompt import SoftPromptModel
from core.metrics import score
from core.prompts import export_peft, init_prompt
from core.tasks import get_split, packs
from tests.test_soft_prompt import fingerprint

pytestmark = [pytest.mark.slow, pytest.mark.real]


def accuracy(model, examples, info, prompt=None):
    predictions = model.predict(examples, info, prompt=prompt)
    return score("ACC", predictions, [list(e.outputs) for e in examples])


@pytest.fixture(scope="module")
def smollm2():
    load("smollm2-135m")  # fetch and convert once (first run only)
    seconds = []
    for _ in range(3):  # the best of 3: a load, not whatever else the machine was doing then
        start = time.perf_counter()
        backbone = load("smollm2-135m")
        seconds.append(time.perf_counter() - start)
    return backbone, min(seconds)


def test_the_converted_backbone_loads_in_well_under_a_second(smollm2):
    backbone, seconds = smollm2
    assert seconds < 1.0
    assert backbone.kind == "causal" and backbone.dim == 576
    assert sum(p.numel() for p in backbone.model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_prompt_tuning_learns_sms_spam_and_leaves_the_backbone_untouched(smollm2, tmp_path):
    backbone, _ = smollm2
    task = packs.load("sms_spam")
    split = get_split(task, 100)
    assert (len(split.train), len(split.dev)) == (32, 32)
    majority = max(sum(e.output == o for e in split.dev) for o in task.info.options) / len(split.dev)

    before = fingerprint(backbone.model)
    model = SoftPromptModel(backbone, init_prompt(backbone, 20, "vocab"))
    untrained = accuracy(model, split.dev, task.info)
    cfg = TrainConfig(batch_size=8, max_steps=40, eval_every=20, optimizer="adamw", weight_decay=0.0)
    result = train_prompt(model, split, task.info, model.prompt.detach().clone(), lr=0.01, cfg=cfg, test=False)
    trained = accuracy(model, split.dev, task.info, prompt=result.prompt)

    print(f"dev accuracy: majority {majority:.3f}, untrained {untrained:.3f}, trained {trained:.3f}")
    assert trained >= 0.75
    assert trained >= majority + 0.2 and trained >= untrained + 0.2
    assert fingerprint(backbone.model) == before

    # The trained prompt as a PEFT adapter gives the same logits on the real model.
    from peft import PeftModel

    adapter = export_peft(result.prompt, backbone, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(load("smollm2-135m").model, str(adapter))
    batch = model.encode([e.input for e in split.dev[:4]], [e.output for e in split.dev[:4]])
    with torch.no_grad():
        expected = model.answer_logits(batch, result.prompt)
        logits = peft_model(input_ids=batch.ids, attention_mask=batch.mask).logits
    got = logits[batch.answer_rows, batch.answer_pos + 20]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_gguf_file_itself_loads_and_matches_the_converted_copy(smollm2):
    from core.backbones.registry import REGISTRY
    from core.settings import settings

    converted, _ = smollm2
    entry = REGISTRY["smollm2-135m"]
    gguf = entry.dist.extract(entry.member, settings().cache_dir / "gguf" / entry.member.split("/")[-1])
    direct = load(str(gguf))  # de-quantises the GGUF file on the spot (~30 s)
    ids = converted.tokenizer("Is this SMS message spam or ham? Message: WIN a prize\nAnswer:",
                              return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(direct.model(ids).logits, converted.model(ids).logits, atol=0, rtol=0)
