"""The cache is built once across processes (`core.fetch.once`): workers sharing a cache (a
machine's Celery processes, containers on one volume) meet on a job's first use of a backbone,
an archive or a task pack, and none may read half of it or throw away another's work."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from core.fetch import once

ROOT = Path(__file__).resolve().parents[1]


def run_all(code: str, n: int, *args: str) -> list[str]:
    """n processes running `code` at once; their stdout, each checked to exit 0."""
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


BUILD_SLOWLY = """
import os, sys, time
from pathlib import Path
from core.fetch import once

out, log = Path(sys.argv[1]), Path(sys.argv[2])

def build(tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    tmp.mkdir()
    for i in range(20):
        (tmp / f"part{i}").write_text(str(os.getpid()))
        time.sleep(0.02)

done = once(out, lambda p: (p / "part19").exists(), build)
print(sorted({p.read_text() for p in done.iterdir()}))
"""


def test_four_processes_build_a_directory_once_and_all_read_the_whole_of_it(tmp_path):
    out, log = tmp_path / "cache" / "thing", tmp_path / "builds.log"
    seen = run_all(BUILD_SLOWLY, 4, str(out), str(log))
    builders = log.read_text().split()
    assert len(builders) == 1  # the others waited for it and took its result
    assert seen == [str([builders[0]])] * 4  # every file from the one build, none half-written
    assert sorted(p.name for p in out.parent.iterdir()) == ["thing", "thing.lock"]  # no temporary left


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    out = tmp_path / "thing"

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        once(out, Path.exists, fails)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["thing.lock"]
    assert once(out, Path.exists, lambda tmp: tmp.write_text("whole")).read_text() == "whole"


def test_a_build_killed_half_way_is_cleared_and_a_stale_result_replaced(tmp_path):
    out = tmp_path / "thing"
    (tmp_path / "thing.part-x1y2" / "thing").mkdir(parents=True)  # what a killed build leaves
    (tmp_path / "thing.v2.part-a1b2").mkdir()  # another thing's build, maybe under way: not touched
    out.mkdir()
    (out / "old").write_text("a stale build")  # not `ready`: rebuilt, not mixed with the new one

    def build(tmp):
        tmp.mkdir()
        (tmp / "new").write_text("current")

    once(out, lambda p: (p / "new").exists(), build)
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing", "thing.lock", "thing.v2.part-a1b2"]


EXTRACT = """
import sys
from core.fetch import Distribution
from core.settings import settings

dist = Distribution("some-pack", "1.0", sys.argv[1], "some_pack-1.0-py3-none-any.whl")
print(dist.extract("some_pack/data.bin", settings().cache_dir / "members" / "data.bin").read_bytes().hex()[:16])
"""


def test_processes_extracting_one_member_at_once_all_get_it_whole(tmp_path, monkeypatch):
    """The real path: a checked archive in the cache, its member copied out by four processes."""
    data = bytes(range(256)) * 40_000  # 10 MB, copied in 1 MB chunks
    (tmp_path / "dists").mkdir()
    wheel = tmp_path / "dists" / "some_pack-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("some_pack/data.bin", data)
    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path))
    seen = run_all(EXTRACT, 4, hashlib.sha256(wheel.read_bytes()).hexdigest())
    assert seen == [data.hex()[:16]] * 4
    assert (tmp_path / "members" / "data.bin").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "members").iterdir()) == ["data.bin", "data.bin.lock"]
