"""Prompt initialization strategies, save/load as safetensors, and export as a PEFT adapter."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from core.backbones.load import Backbone
from core.backbones.soft_prompt import check_prompt_length
from core.errors import UserError

TOP_VOCAB = 5000  # Lester et al. / the MPT paper: sample from the 5,000 most common tokens


def _vocab_ids(backbone: Backbone, n: int, generator: torch.Generator) -> torch.Tensor:
    # BPE and SentencePiece vocabularies are built most-frequent-first, so the first ids after
    # the special tokens are the most common ones; that is the paper's "top-5000" pool.
    special = set(backbone.tokenizer.all_special_ids)
    pool = [i for i in range(min(TOP_VOCAB + len(special), backbone.model.get_input_embeddings().num_embeddings))
            if i not in special][:TOP_VOCAB]
    pick = torch.randint(len(pool), (n,), generator=generator)
    return torch.tensor(pool)[pick]


def _embed(backbone: Backbone, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=backbone.device)
    with torch.no_grad():
        return backbone.embed(ids).float().cpu()


def init_vocab(backbone: Backbone, n: int, g: torch.Generator, **_) -> torch.Tensor:
    return _embed(backbone, _vocab_ids(backbone, n, g))


def init_task_name(backbone: Backbone, n: int, g: torch.Generator, task: str = "", **_) -> torch.Tensor:
    """The MPT code's init: the task name's word tokens first, vocabulary samples for the rest."""
    words = " ".join(w for w in re.split(r"[\s_\-/]+", task) if w)
    ids = backbone.tokenizer(words, add_special_tokens=False).input_ids[:n] if words else []
    rest = _vocab_ids(backbone, n - len(ids), g).tolist()
    return _embed(backbone, list(ids) + rest)


def init_random(backbone: Backbone, n: int, g: torch.Generator, **_) -> torch.Tensor:
    # Scaled like the vocabulary as the backbone sees it, so that its inputs have a familiar
    # size: after the embedding module, which in Gemma multiplies the table by sqrt(d).
    table = backbone.model.get_input_embeddings().weight
    probe = torch.arange(min(256, table.shape[0]))
    scale = _embed(backbone, probe).std() / table[probe].detach().float().cpu().std()
    return torch.randn(n, backbone.dim, generator=g) * table.float().std().item() * scale.item()


def init_text(backbone: Backbone, n: int, g: torch.Generator, text: str = "", **_) -> torch.Tensor:
    """PEFT's TEXT init: the text's tokens, repeated or cut to length n."""
    ids = backbone.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise UserError("prompt init 'text' needs a non-empty 'text'")
    return _embed(backbone, (ids * (n // len(ids) + 1))[:n])


def init_file(backbone: Backbone, n: int, g: torch.Generator, path: str = "", **_) -> torch.Tensor:
    prompt = load_prompt(path)[0]
    if tuple(prompt.shape) != (n, backbone.dim):
        raise UserError(f"prompt file {path} holds a {tuple(prompt.shape)} prompt; "
                        f"this run needs ({n}, {backbone.dim})")
    return prompt


INITS: dict[str, Callable[..., torch.Tensor]] = {
    "vocab": init_vocab,
    "task_name": init_task_name,
    "random": init_random,
    "text": init_text,
    "file": init_file,
}


def init_prompt(backbone: Backbone, n: int, strategy: str = "vocab", seed: int = 0, **options) -> torch.Tensor:
    check_prompt_length(n)
    if strategy not in INITS:
        raise UserError(f"unknown prompt init {strategy!r}; accepted: {', '.join(INITS)}")
    g = torch.Generator().manual_seed(seed)
    return INITS[strategy](backbone, n, g, **options)


def save_prompt(prompt: torch.Tensor, path: str | Path, **metadata) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompt": prompt.detach().float().cpu().contiguous()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})
    return path


def prompt_bytes(prompt: torch.Tensor, **metadata) -> bytes:
    """The safetensors file of `save_prompt`, as bytes (what the store keeps and serves)."""
    from safetensors.torch import save

    return save({"prompt": prompt.detach().float().cpu().contiguous()}, metadata={k: str(v) for k, v in metadata.items()})


def prompt_from_bytes(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    tensors = load(data)
    if list(tensors) != ["prompt"]:
        raise UserError(f"not a primer prompt: it holds {list(tensors)}, expected one tensor 'prompt'")
    return tensors["prompt"]


def load_prompt(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
    if keys != ["prompt"]:
        raise UserError(f"{path} is not a primer prompt: it holds {keys}, expected one tensor 'prompt'")
    return load_file(str(path))["prompt"], meta


def export_peft(prompt: torch.Tensor, backbone: Backbone, directory: str | Path,
                base_model: str | None = None) -> Path:
    """A PEFT prompt-tuning adapter that `PeftModel.from_pretrained(base, directory)` loads as is.

    Seq2seq models get the prompt in the encoder only (num_transformer_submodules=1), exactly
    where primer puts it, so the two models give the same logits.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = prompt.shape[0]
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if backbone.kind == "seq2seq" else "CAUSAL_LM",
        "num_virtual_tokens": n,
        "token_dim": backbone.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(backbone.model.config, "num_attention_heads", None),
        "num_layers": getattr(backbone.model.config, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": base_model or backbone.name,
        "inference_mode": True,
        "revision": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({"prompt_embeddings": prompt.detach().float().cpu().contiguous()},
              str(directory / "adapter_model.safetensors"))
    return directory
