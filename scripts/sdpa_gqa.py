"""Would SDPA's own grouped-query attention pay? transformers' sdpa path copies each layer's
3 key/value heads out to the 9 query heads (repeat_kv: expand, then a copy) whenever a mask is
passed, and primer's packs always pass one; TRANSFORMERS_SDPA_FORCE_GQA=1, which transformers
reads at every call, hands `enable_gqa=True` to SDPA instead. primer's own meta-training and
prompt tuning on the bench's data, backbone and lengths, the two ways taking turns in one
process (bench.measure), after comparing the gradient each way.

  .venv/bin/python scripts/sdpa_gqa.py [fomaml,pt,maml] [bench options]
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.figures import two_ways  # noqa: E402

args = sys.argv[1:]
which = args.pop(0).split(",") if args and not args[0].startswith("-") else ["fomaml", "pt", "maml"]
s = setup(parse(["--parts", "meta", *args]))


def way(gqa: bool, work):
    def run():
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1" if gqa else "0"
        try:
            return work()
        finally:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "0"
    return run


print(f"{s.model.backbone.device}, {s.dtypes[0]}, prompt {s.model.prompt.shape[0]}, {torch.get_num_threads()} threads")
two_ways(s, which, {"SDPA's GQA": lambda work: way(True, work), "repeat_kv": lambda work: way(False, work)})
