"""Why the bench makes the LM head's input contiguous around PEFT's `generate`
(bench/reference.py, `contiguous_head`): the head over a batch's last positions, as `generate`
asks for them (hidden[:, -1:, :], a strided 3-D view, logits_to_keep=1), against the same rows
contiguous, in bf16 and float32, for each registered backbone's head shape. Random weights:
only the shapes and strides matter. Seconds, the median of 3 runs after one warm-up.

  .venv/bin/python scripts/bf16_head.py [rows] [positions]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.measure import median_seconds  # noqa: E402

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 32
POSITIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 60
HEADS = {"smollm2-135m": (49152, 576), "gemma3-270m": (262144, 640)}


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ROWS} rows of {POSITIONS} positions\n")
print("| backbone | head | dtype | hidden[:, -1:, :] (strided) | contiguous | strided ÷ contiguous |")
print("|---|---|---|---|---|---|")
for name, (vocab, dim) in HEADS.items():
    w32 = torch.randn(vocab, dim) / dim**0.5
    h32 = torch.randn(ROWS, POSITIONS, dim)
    for dtype in (torch.bfloat16, torch.float32):
        w, h = w32.to(dtype), h32.to(dtype)
        strided, dense = (median_seconds(torch.nn.functional.linear, x, w, runs=3) for x in (h[:, -1:, :], h[:, -1:, :].contiguous()))
        print(f"| {name} | {vocab} × {dim} | {str(dtype)[6:]} | {strided:.4f} | {dense:.4f} | {strided / dense:.0f}× |", flush=True)
