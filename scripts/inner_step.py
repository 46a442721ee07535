"""How far one inner SGD step moves a prompt, relative to the prompt itself (docs/study.md).

  .venv/bin/python scripts/inner_step.py [--backbone smollm2-135m] [--tasks sms_spam,...] [--lrs 3e-5,0.03,0.3]

For each task: the loss gradient of a vocabulary-initialized prompt on one inner batch of its
train split, its norm per prompt token, and ||lr * grad|| / ||prompt|| for each inner lr.
"""
import argparse

import torch

from core import backbones
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from core.spec import TaskRef
from core.tasks import get_split, load_task

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--backbone", default="smollm2-135m")
p.add_argument("--tasks", default="sms_spam,disaster_tweets,sarcasm_headlines,trec_coarse,tweet_sentiment_crowdflower")
p.add_argument("--lrs", default="3e-5,0.03,0.3")
p.add_argument("--prompt-length", type=int, default=10)
p.add_argument("--batch", type=int, default=2, help="the inner batch (MAML's: 2)")
args = p.parse_args()

backbone = backbones.freeze(backbones.load(args.backbone))
model = SoftPromptModel(backbone, init_prompt(backbone, args.prompt_length, "vocab", seed=0), max_input_tokens=64)
lrs = [float(x) for x in args.lrs.split(",")]
print("| task | prompt norm per token | gradient norm per token | " + " | ".join(f"step / prompt at lr {lr:g}" for lr in lrs) + " |")
print("|---|---|---|" + "---|" * len(lrs))
for name in args.tasks.split(","):
    split = get_split(load_task(TaskRef(name=name)), 100)
    prompt = model.prompt.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.loss(split.train[:args.batch], prompt=prompt), prompt)
    moves = [f"{lr * grad.norm().item() / prompt.norm().item():.2g}" for lr in lrs]
    print(f"| {name} | {prompt.norm(dim=-1).mean().item():.2f} | {grad.norm(dim=-1).mean().item():.2f} | "
          + " | ".join(moves) + " |")
