"""Sweeps, as in the papers' ablations: one spec, one field varied over values (source tasks,
steps, prompt length, shots, ...), every variant run as its own experiment; the ARG of each
method per value comes back as one table and one plot."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from core import names
from core.experiment import Checkpoints, NoCheckpoints, Progress, Results, run
from core.spec import JobSpec, SpecError, parse_spec


class _Prefixed:
    """Each variant keeps its checkpoints under its own key prefix in the shared store, except
    the keys starting with one of `shared`: those runs are the same in every variant."""

    def __init__(self, store: Checkpoints, prefix: str, shared: tuple[str, ...] = ()):
        self.store, self.prefix, self.shared = store, prefix, shared
        self.trusted = getattr(store, "trusted", False)

    def _key(self, key: str) -> str:
        return key if key.startswith(self.shared) else f"{self.prefix}/{key}"

    def load(self, key: str):
        return self.store.load(self._key(key))

    def save(self, key: str, state: dict) -> None:
        self.store.save(self._key(key), state)


# The PT and FT baselines never see the upstream phase: a sweep over an upstream field runs
# them once, in the first variant, and the others load them from the checkpoints.
BASELINES = tuple(f"downstream/{m}/" for m in names.BASELINES)


def variants(spec: JobSpec) -> list[tuple[object, JobSpec]]:
    """(value, spec with the field set to value) for every value; all validated up front, so a
    bad value fails before the first variant trains."""
    field, out = spec.sweep.field, []
    base = spec.model_dump(exclude={"sweep"}, exclude_none=True)
    for value in spec.sweep.values:
        data = copy.deepcopy(base)
        *parents, leaf = field.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        try:
            out.append((value, parse_spec(data)))
        except SpecError as e:
            raise SpecError(f"sweep value {value!r} for {field}: {e}") from None
    return out


@dataclass
class SweepResults:
    spec: JobSpec
    runs: list[tuple[object, Results]]

    def table(self) -> dict[str, list[float]]:
        """ARG (%) of each method, one entry per sweep value."""
        methods = [m for m in self.spec.methods if m != "pt"]
        return {m: [r.arg().get(m) for _, r in self.runs] for m in methods}  # None: it diverged there

    def to_dict(self) -> dict:
        return {"field": self.spec.sweep.field, "values": [v for v, _ in self.runs], "arg": self.table(),
                "runs": [r.to_dict() for _, r in self.runs]}


def run_sweep(spec: JobSpec, progress: Progress | None = None, checkpoints: Checkpoints | None = None) -> SweepResults:
    store, emit = checkpoints or NoCheckpoints(), progress or (lambda e: None)
    runs = []
    todo = variants(spec)
    shared = BASELINES if spec.sweep.field.startswith("upstream.") else ()
    for i, (value, variant) in enumerate(todo):
        relay = lambda e, i=i, value=value: emit(e | {"sweep": f"{i + 1}/{len(todo)}", "value": value})
        runs.append((value, run(variant, relay, _Prefixed(store, f"sweep{i}", shared), in_sweep=True)))
    return SweepResults(spec, runs)
