"""primer's own meta-training and prompt tuning with the CPU attention's backward two ways: the
flash kernel's forward and a backward in plain operators (blocked._MathBackward, what bf16 takes
by default), against SDPA's own backward (blocked.PLAIN_ATTENTION = ()). The bench's data, backbone
and lengths, the two ways taking turns in one process (bench.measure), after comparing the
gradient each way.

  .venv/bin/python scripts/math_backward.py [fomaml,pt,maml] [bench options, e.g. --dtype bf16]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.figures import two_ways  # noqa: E402
from core.backbones import blocked  # noqa: E402

args = sys.argv[1:]
which = args.pop(0).split(",") if args and not args[0].startswith("-") else ["fomaml", "pt", "maml"]
s = setup(parse(["--parts", "meta", *args]))
dtype = s.model.backbone.model.get_input_embeddings().weight.dtype


def way(dtypes: tuple, work):
    def run():
        default, blocked.PLAIN_ATTENTION = blocked.PLAIN_ATTENTION, dtypes
        try:
            return work()
        finally:
            blocked.PLAIN_ATTENTION = default
    return run


print(f"{s.model.backbone.device}, {s.dtypes[0]}, prompt {s.model.prompt.shape[0]}, {torch.get_num_threads()} threads")
two_ways(s, which, {"_MathBackward": lambda work: way((dtype,), work), "SDPA's backward": lambda work: way((), work)})
