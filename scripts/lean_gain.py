"""What the lean modules (core/backbones/lean.py: the gated MLP's and RMSNorm's derivatives
written out) cost or save primer's own meta-training and prompt tuning, against transformers'
own operators differentiated by autograd (the code before them). On the bench's data, backbone
and lengths, the two ways taking turns in one process (bench.measure), after comparing the
gradient each way. The switch is process-wide, so that MAML's episodes in parallel threads
take it too.

  .venv/bin/python scripts/lean_gain.py [maml,fomaml,reptile,pt] [bench options: --backbone gemma3-270m ...]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.figures import two_ways  # noqa: E402
from core.backbones import lean  # noqa: E402

args = sys.argv[1:]
which = args.pop(0).split(",") if args and not args[0].startswith("-") else ["maml", "fomaml", "reptile", "pt"]
s = setup(parse(["--parts", "meta", *args]))
lean_ops = lean._lean


def way(on: bool, work):
    def run():
        lean._lean = lean_ops if on else (lambda *inputs: False)
        try:
            return work()
        finally:
            lean._lean = lean_ops
    return run


print(f"{s.model.backbone.device}, {s.dtypes[0]}, prompt {s.model.prompt.shape[0]}, {torch.get_num_threads()} threads, "
      f"{sum(isinstance(m, (lean.GatedMLP, lean.RMSNorm)) for m in s.model.backbone.model.modules())} lean modules")
two_ways(s, which, {"lean": lambda work: way(True, work), "transformers' operators": lambda work: way(False, work)})
