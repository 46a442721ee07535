"""Tiny randomly initialised backbones with a word-level tokenizer, saved as local model
directories, so the causal and seq2seq paths run in seconds with no download at all."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a is was movie film good bad great awful spam ham message free win call now "
         "hello friend see you lunch yes no positive negative answer question what color sky "
         "blue red capital france paris").split()


def tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [":", "?", ".", ",", "!"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "seq2seq":  # T5's tokenizer ends every sequence with </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save(kind: str, directory: Path, seed: int = 0) -> Path:
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    tok = tokenizer(kind)
    torch.manual_seed(seed)
    if kind == "causal":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True,
                             initializer_range=0.5)  # big enough weights for confident outputs
        model = LlamaForCausalLM(config)
    elif kind == "gemma":  # a sliding-window layer whose window (4 tokens) is shorter than most rows, then a global one
        config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                                  query_pre_attn_scalar=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True,
                                  initializer_range=0.3)
        model = Gemma3ForCausalLM(config)
    else:
        config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
                          initializer_factor=1.0)
        model = T5ForConditionalGeneration(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
