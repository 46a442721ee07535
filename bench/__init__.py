"""Benchmarks of primer against the MPT paper's loop and PEFT (see bench/__main__.py)."""
