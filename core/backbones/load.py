"""Load a frozen language model and its tokenizer: a registered name, a local directory, a
GGUF file, or a hub model. `trust_remote_code` is never enabled: a backbone runs only code
that ships with transformers."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.backbones.registry import REGISTRY, cached_dir
from core.backbones.lean import use_lean
from core.errors import UserError


class BackboneError(UserError):
    """The backbone name or files are not usable; the message says what is accepted."""


@dataclass
class Backbone:
    name: str
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "causal" or "seq2seq"

    @property
    def dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # Through the model's own embedding module: Gemma, for one, scales inside it.
        return self.model.get_input_embeddings()(ids)


# A spec's `precision` -> the backbone's dtype.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_HUB_ID = re.compile(r"^(hf:)?[\w.-]+/[\w.-]+$|^hf:[\w.-]+$")


def accepted() -> str:
    return (f"a registered backbone ({', '.join(sorted(REGISTRY))}), a local model directory, "
            "a .gguf file, or a hub model as 'org/name' or 'hf:name'")


def locate(name: str, build: bool = True) -> tuple[str | Path, str | None]:
    """Where the backbone `name` is: (its directory or hub id, its .gguf file's name or None);
    BackboneError naming what is accepted if `name` is none of those. A registered backbone's
    directory is converted on its first use; with build=False the name is only checked."""
    if not name or not isinstance(name, str):
        raise BackboneError(f"backbone name is empty; expected {accepted()}")
    path = Path(name).expanduser()
    if name in REGISTRY:
        return (cached_dir(name) if build else name), None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneError(f"backbone directory {path} has no config.json; expected {accepted()}")
        return path, None
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.exists():
        raise BackboneError(f"backbone file {path} is not a .gguf file; expected {accepted()}")
    if _HUB_ID.match(name):
        return name.removeprefix("hf:"), None
    raise BackboneError(f"unknown backbone {name!r}; expected {accepted()}")


def load(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
         attn: str = "sdpa") -> Backbone:
    source, gguf = locate(name)
    try:
        return _from_pretrained(name, source, gguf, dtype, device, attn)
    except (OSError, ValueError) as e:  # hub unreachable, missing weights, unreadable or broken files
        raise BackboneError(f"could not load backbone {name!r}: {e}; expected {accepted()}") from e


def _from_pretrained(name, source, gguf, dtype, device, attn) -> Backbone:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoTokenizer)

    kw = dict(trust_remote_code=False, **({"gguf_file": gguf} if gguf else {}))
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    config = AutoConfig.from_pretrained(source, **kw)
    kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=dtype, attn_implementation=attn, **kw).to(device)
    return freeze(Backbone(name=name, model=model, tokenizer=tokenizer, kind=kind))


# A worker process keeps the last backbone it loaded for the next job that asks for the same one:
# loading one is most of a short job's wait (docs/performance.md, queueing delay).
_kept: tuple[tuple, Backbone] | None = None


def _files(name: str) -> tuple:
    """What a backbone's files look like now: a kept copy of a directory that has changed
    since (a new upload under the same path) is not handed out again."""
    path = Path(name).expanduser()
    if name in REGISTRY:
        path = cached_dir(name)
    elif path.is_file():
        path = path.parent
    elif not path.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))


def load_kept(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", attn: str = "sdpa") -> Backbone:
    """load(), keeping the result for the next call with the same arguments and files.

    One backbone at a time (a GPU worker holds one model); a different one replaces it. The
    backbone is frozen and every method leaves it as it found it (fine-tuning trains a copy),
    so handing the same object to the next job is safe; freeze() runs again all the same."""
    global _kept
    key = (name, dtype, str(device), attn, _files(name))
    if _kept is None or _kept[0] != key:
        _kept = None  # the old model is released before the new one is loaded
        _kept = (key, load(name, dtype=dtype, device=device, attn=attn))
    return freeze(_kept[1])


# The unary operators ATen hands to MKL's vector math library (VML) for contiguous float and double
# tensors (libtorch_cpu's *_vml_cpu kernels that call vms*/vmd*): the rotary embeddings' cos and
# sin in every forward, and the rest.
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
           "tan", "tanh", "trunc")


@functools.cache
def warm_vml() -> None:
    """Call every VML operator once, on this thread, before any two threads can first call it at
    once. MKL 2024.2 (torch's wheels) picks each VML function's kernel on its first call, and
    concurrent first calls can run one thread's share with the low-accuracy kernel (errors
    ~1000 ulp; pytorch/pytorch#188792). Without this, a worker's first job made exactly such
    first calls: MAML's two episode threads, each in its first forward (cos and sin of the
    rotary embeddings, then exp). A 1e-4 error in one episode's first cos/sin moves its step-1
    loss by -2.1e-3 on the service test's spec (scripts/vml_first_calls.py), as much as in the
    rare served MAML run that differed from the same spec run in-process (-2.1e-3, in that
    episode alone). Later calls get the same kernels as before, so results keep their bits."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(x)


def freeze(backbone: Backbone) -> Backbone:
    """Frozen: no backbone weight takes a gradient; eval mode, so no dropout noise either; a Llama-
    or Gemma-family MLP and RMSNorm keep less for MAML's second-order gradient (core/backbones/lean.py).
    Before anything runs on it, this process's VML kernels are chosen on one thread (warm_vml)."""
    warm_vml()
    use_lean(backbone.model)
    backbone.model.requires_grad_(False)
    backbone.model.eval()
    tok = backbone.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return backbone
