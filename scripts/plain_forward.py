"""bf16 training's attention forward two ways, taking turns in one process: SDPA's flash kernel
(blocked._MathBackward's forward, primer's default) against the same in plain operators
(blocked._plain, what bf16 ranking takes); the backward in plain operators both ways. The
bench's data, backbone and lengths in bf16 (bench.measure), after comparing the gradient each way.
Measured, not adopted (docs/performance.md, "Ranking's attention in bf16 in plain operators").

  .venv/bin/python scripts/plain_forward.py [fomaml,pt,maml] [bench options]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.figures import two_ways  # noqa: E402
from core.backbones import blocked  # noqa: E402

args = sys.argv[1:]
which = args.pop(0).split(",") if args and not args[0].startswith("-") else ["fomaml", "pt", "maml"]
s = setup(parse(["--parts", "meta", "--dtype", "bf16", *args]))
flash = blocked._MathBackward.forward


def plain(ctx, q, k, v, mask, scale):
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale = scale if scale is not None else q.shape[-1] ** -0.5
    return blocked._plain(q, k, v, mask, scale)


def way(forward, work):
    def run():
        blocked._MathBackward.forward = staticmethod(forward)
        try:
            return work()
        finally:
            blocked._MathBackward.forward = staticmethod(flash)
    return run


print(f"{s.model.backbone.device}, {s.dtypes[0]}, prompt {s.model.prompt.shape[0]}")
two_ways(s, which, {"plain forward": lambda work: way(plain, work), "flash kernel forward": lambda work: way(flash, work)})
