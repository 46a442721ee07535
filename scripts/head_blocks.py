"""Seconds for ranking's head at a batch's predicting positions: log_softmax over the vocabulary
read at one token per position, the head whole (the (N, V) logits, then their logsumexp 16 rows at
a time, as before 2026-12-07's sixth session) against the head by blocks of HEAD_WORDS words, each
block's logsumexp taken while it is in cache (SoftPromptModel._head_logprobs). The positions are
real: the backbone's last hidden states over the bench's test inputs. Median of 7 after a warm-up,
under the bench's allocator.

  .venv/bin/python scripts/head_blocks.py [backbone] [fp32|bf16]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import fixed_allocator, median_seconds as seconds  # noqa: E402

fixed_allocator()
backbone = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
dtype = sys.argv[2] if len(sys.argv) > 2 else "fp32"
s = setup(parse(["--parts", "eval", "--backbone", backbone, "--dtype", dtype]))
model, head = s.model, s.model.backbone.model.get_output_embeddings()
V, d = head.weight.shape
with torch.no_grad():
    batch = model.encode([e.input for e in s.test[:32]], None)
    out = s.model.backbone.model.base_model(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
    hidden = out[batch.mask.bool()][:256]
tokens = torch.randint(V, (256,), generator=torch.Generator().manual_seed(0))


def whole(h, rows, tok):  # before: the logits, then _token_logprobs
    return model._token_logprobs(model._head(h), tok, rows)


def blocks(words):
    def run(h, rows, tok):
        model.HEAD_WORDS = words
        return model._head_logprobs(h, tok, rows)
    return run


print(f"{backbone}, {dtype}: a head of {V:,} words x {d}\n")
print("| positions | whole | " + " | ".join(f"blocks of {w:,}" for w in (512, 1024, 2048, 4096)) + " |")
print("|---|---|---|---|---|---|")
with torch.no_grad():
    for n in (32, 64, 96, 256):
        h, rows = hidden[:n], torch.arange(n)
        reference = whole(h, rows, tokens[:n])
        cells = [seconds(whole, h, rows, tokens[:n])]
        for w in (512, 1024, 2048, 4096):
            torch.testing.assert_close(blocks(w)(h, rows, tokens[:n]), reference, rtol=1e-3, atol=1e-3 if dtype == "fp32" else 0.1)
            cells.append(seconds(blocks(w), h, rows, tokens[:n]))
        flop = 2 * n * V * d
        print(f"| {n} | " + " | ".join(f"{c * 1e3:.0f} ms ({flop / c / 1e9:.0f} GFLOP/s)" for c in cells) + " |", flush=True)
