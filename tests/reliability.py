"""What the hardening tests did, counted as they ran it, for docs/reliability.md.

A test calls `count(section, what, n)` for what it sent or injected and `note(section, what,
value)` for an outcome (jobs lost, 5xx seen, seconds). At the end of a run in which every
section was filled and every test passed, tests/conftest.py writes the tables to
docs/reliability.md, so the figures there are always those of the last full green run.
"""
from __future__ import annotations

import platform
import time
from collections import defaultdict

SECTIONS = {
    "load": "Load: concurrent submissions and a steady read load (tests/test_hardening.py)",
    "faults": "Faults injected into running jobs (tests/test_hardening.py)",
    "hostile": "Hostile input (tests/test_hostile.py)",
    "security": "Security (tests/test_hostile.py, tests/test_api.py)",
    "integrity": "Integrity (tests/test_store.py, tests/test_hostile.py)",
}
FIGURES: dict[str, dict[str, object]] = defaultdict(dict)


def count(section: str, what: str, n: int = 1) -> None:
    assert section in SECTIONS, section
    FIGURES[section][what] = FIGURES[section].get(what, 0) + n


def note(section: str, what: str, value: object) -> None:
    assert section in SECTIONS, section
    FIGURES[section][what] = value


def finished(n: int, same: int = 0) -> None:
    """n jobs of a fault test submitted and seen to finish (the test asserted it), `same` of them
    with the prompts and scores of the undisturbed run."""
    count("faults", "jobs submitted", n)
    count("faults", "jobs finished (succeeded, or cancelled as asked)", n)
    if same:
        count("faults", "jobs whose prompts and scores equal the undisturbed run's, bit for bit", same)


def complete() -> bool:
    return all(FIGURES.get(s) for s in SECTIONS)


def render(seconds: float) -> str:
    lines = ["# Reliability", "",
             "Written by the test suite (`make test`; tests/reliability.py, tests/conftest.py) at the end of its "
             "last full green run: every figure below was counted by the tests as they ran, against real "
             "uvicorn, Celery worker, Postgres and Redis processes on loopback. Do not edit by hand.", "",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
             f"Python {platform.python_version()}, suite {seconds / 60:.1f} min.", ""]
    for section, title in SECTIONS.items():
        lines += [f"## {title}", "", "| what | figure |", "|---|---|"]
        figures = dict(FIGURES[section])
        if "jobs submitted" in figures:  # what the section's tests submitted and did not see finish
            figures["jobs lost"] = figures["jobs submitted"] - figures["jobs finished (succeeded, or cancelled as asked)"]
        for what, value in figures.items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"| {what} | {shown} |")
        lines.append("")
    return "\n".join(lines)
