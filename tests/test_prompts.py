"""Prompt init strategies, safetensors save/load, and the PEFT adapter export."""
import json

import pytest
import torch

from core.backbones.soft_prompt import MAX_PROMPT_TOKENS, SoftPromptModel
from core.prompts import INITS, TOP_VOCAB, export_peft, init_prompt, load_prompt, save_prompt


def embedded_vocabulary(backbone):
    """Every token as the backbone's first layer sees it: through the embedding module, which
    scales the table in Gemma (by sqrt(d)), and which the prompt stands in for."""
    with torch.no_grad():
        return backbone.embed(torch.arange(backbone.model.get_input_embeddings().num_embeddings)).float()


def embedding_rows(backbone, prompt):
    """For each prompt vector, the vocabulary ids whose embedding it equals exactly."""
    table = embedded_vocabulary(backbone)
    return [torch.nonzero((table == row).all(1)).flatten().tolist() for row in prompt]


def test_vocab_init_samples_ordinary_tokens_from_the_top_of_the_vocabulary(tiny_backbone):
    prompt = init_prompt(tiny_backbone, 12, "vocab", seed=5)
    special = set(tiny_backbone.tokenizer.all_special_ids)
    for ids in embedding_rows(tiny_backbone, prompt):
        assert ids and ids[0] < TOP_VOCAB + len(special) and ids[0] not in special
    assert torch.equal(prompt, init_prompt(tiny_backbone, 12, "vocab", seed=5))  # seeded
    assert not torch.equal(prompt, init_prompt(tiny_backbone, 12, "vocab", seed=6))


def test_task_name_init_starts_with_the_task_name_words(tiny_backbone):
    prompt = init_prompt(tiny_backbone, 6, "task_name", task="movie_sentiment-spam")
    words = tiny_backbone.tokenizer("movie sentiment spam", add_special_tokens=False).input_ids
    assert [ids[0] for ids in embedding_rows(tiny_backbone, prompt[: len(words)])] == words
    assert prompt.shape == (6, tiny_backbone.dim)


def test_text_init_repeats_the_text_to_the_prompt_length(tiny_backbone):
    prompt = init_prompt(tiny_backbone, 5, "text", text="hello friend")
    ids = tiny_backbone.tokenizer("hello friend", add_special_tokens=False).input_ids
    assert [r[0] for r in embedding_rows(tiny_backbone, prompt)] == (ids * 3)[:5]


def test_random_init_is_scaled_like_the_vocabulary(tiny_backbone):
    prompt = init_prompt(tiny_backbone, 200, "random")
    std = embedded_vocabulary(tiny_backbone).std().item()
    assert prompt.std().item() == pytest.approx(std, rel=0.15)


def test_save_load_round_trip_and_file_init(tiny_backbone, tmp_path):
    prompt = init_prompt(tiny_backbone, 4, "random")
    path = save_prompt(prompt, tmp_path / "p.safetensors", backbone="tiny", task="spam")
    loaded, meta = load_prompt(path)
    assert torch.equal(loaded, prompt) and meta == {"backbone": "tiny", "task": "spam"}
    assert torch.equal(init_prompt(tiny_backbone, 4, "file", path=str(path)), prompt)
    with pytest.raises(ValueError, match=r"holds a \(4, 32\) prompt; this run needs \(5, 32\)"):
        init_prompt(tiny_backbone, 5, "file", path=str(path))


def test_load_prompt_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not a primer prompt: it holds \\['weight'\\]"):
        load_prompt(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("n", [0, -3, MAX_PROMPT_TOKENS + 1])
def test_prompt_length_out_of_bounds_is_a_clear_error(tiny_backbone, n):
    with pytest.raises(ValueError, match=f"prompt length must be an integer from 1 to {MAX_PROMPT_TOKENS}, got {n}"):
        init_prompt(tiny_backbone, n)


def test_unknown_init_names_the_accepted_ones(tiny_backbone):
    with pytest.raises(ValueError, match="unknown prompt init 'zeros'; accepted: " + ", ".join(INITS)):
        init_prompt(tiny_backbone, 4, "zeros")


def test_peft_adapter_loads_in_peft_and_gives_the_same_logits(tiny_backbone, tmp_path):
    from peft import PeftModel

    from core.backbones import load

    prompt = init_prompt(tiny_backbone, 6, "random", seed=2)
    ours = SoftPromptModel(tiny_backbone, prompt)
    adapter = export_peft(prompt, tiny_backbone, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 6

    fresh = load(tiny_backbone.name, attn="eager").model  # PEFT wraps its own copy
    peft_model = PeftModel.from_pretrained(fresh, str(adapter))
    torch.testing.assert_close(peft_model.get_prompt(1)[0], prompt)

    text, answer = "the movie was good", "great film"
    batch = ours.encode([text], [answer])
    with torch.no_grad():
        expected = ours.answer_logits(batch)
        if tiny_backbone.kind == "causal":
            # PEFT takes the whole token sequence; its logits cover the prompt positions too.
            logits = peft_model(input_ids=batch.ids, attention_mask=batch.mask).logits[0]
            logits = logits[batch.answer_pos + 6]
        else:
            logits = peft_model(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.answer).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
