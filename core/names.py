"""The names a spec may use, kept free of torch so that the API can check a spec without
loading it (DESIGN.md: the API never imports torch). The registries that implement them
(core.algorithms.upstream.ALGORITHMS, core.prompts.INITS, ...) are tested to match."""

ALGORITHM_NAMES = ("maml", "fomaml", "reptile", "mtl", "metapt", "ppt")
INIT_NAMES = ("vocab", "task_name", "random", "text", "file")
OPTIMIZERS = ("adafactor", "adamw")
BASELINES = ("pt", "ft")  # the methods that never see the upstream phase: prompt tuning and fine-tuning
MAX_PROMPT_TOKENS = 512
