"""A backbone directory with a real model's architecture and tokenizer but freshly initialised
weights (seed 0), for timing where the weights cannot travel: the device machines take 64 MiB
per call and SmolLM2-135M's smallest file (Q4_1 GGUF) is 98 MB. Every timed figure of the
bench does the same work whatever the weights hold (fixed shapes; generation stops after the
label's token count), so rates and memory match the real model's; accuracies do not.

  python scripts/random_backbone.py SRC OUT   # SRC: config.json and the tokenizer's files
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(out)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, out / f.name)
print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random (seed 0)")
