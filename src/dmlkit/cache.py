"""The stage cache: content keys, atomic artifact directories, manifests and locks.

A stage's artifact lives in ``artifacts/<experiment>/<stage>/<key>/``. The key hashes what the
stage reads: its config slice (canonical JSON, so YAML key order does not matter), fingerprints
of the input files, and what its upstream stages produced (each manifest's ``output``: a digest of
the files the next stages read, so a forced recompute that changed them invalidates everything
after it, and one that reproduced them byte for byte does not). The stage writes into ``<key>.partial/`` and
renames it into place once ``manifest.json`` is written, so an interrupted run never leaves a
directory that looks complete. ``<key>.lock`` (an flock) keeps two runs of the same stage apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_LENGTH = 16


class CacheLockedError(RuntimeError):
    """Another process is computing the same artifact."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(
    stage: str,
    config_slice: Any,
    upstream: dict[str, str] | None = None,
    fingerprints: dict[str, str] | None = None,
    version: int = 1,
) -> str:
    """Hash of everything a stage's output depends on (order-independent for mappings)."""
    payload = {
        "stage": stage,
        "version": version,
        "config": config_slice,
        "upstream": upstream or {},
        "inputs": fingerprints or {},
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def file_fingerprint(path: str | Path, content: bool = True) -> str:
    """Content hash of a (CSV) file, or its size and mtime when content=False."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not content:
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:KEY_LENGTH]


def files_fingerprint(paths: Iterable[str]) -> str:
    """Cheap fingerprint of many files (images): each path's size and mtime, in the given order.

    A replaced or touched file changes it; its content is not read (2.3 µs per file here, docs/runs.md).
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return digest.hexdigest()[:KEY_LENGTH]


def files_content_fingerprint(paths: Iterable[str], threads: int = 1) -> str:
    """Fingerprint of many files by their bytes (folds.fingerprint: content): an image edited in
    place with its size and mtime kept changes it. Reads every file (in `threads` threads)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = pool.map(lambda path: file_fingerprint(path), paths, chunksize=64)
        digest = hashlib.sha256()
        for path, one in zip(paths, digests, strict=True):
            digest.update(f"{path}\t{one}\n".encode())
    return digest.hexdigest()[:KEY_LENGTH]


def output_names(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    """The files of ``folder`` matching ``patterns`` (the manifest aside), in name order."""
    names = sorted({p.name for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file()})
    return [n for n in names if n not in (MANIFEST, MANIFEST + ".tmp")]


def output_digest(folder: Path, patterns: tuple[str, ...]) -> str:
    """Content hash of the files in ``folder`` matching ``patterns`` (names and bytes, name order)."""
    digest = hashlib.sha256()
    for name in output_names(folder, patterns):
        digest.update(f"{name}\t{file_fingerprint(Path(folder) / name)}\n".encode())
    return digest.hexdigest()[:KEY_LENGTH]


def file_check(path: Path) -> dict:
    """What reuse checks a file against: its size and a CRC-32 of its bytes (3.7 GB/s here, about
    three times as fast as numpy reads the same array back: docs/runs.md, 'The cache')."""
    crc = 0
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return {"bytes": Path(path).stat().st_size, "crc32": f"{crc:08x}"}


VERIFIED = ".verified"  # per artifact: each output file's size and mtime when its bytes were last checked


def _stats(folder: Path, names: list[str]) -> dict[str, list[int]]:
    stats = {n: (folder / n).stat() for n in names}  # one stat per file
    return {n: [st.st_size, st.st_mtime_ns] for n, st in stats.items()}


RACY_NS = 2_000_000_000  # a file modified this close to its check may change again within one mtime tick


def stamp_verified(folder: Path, names: list[str]) -> None:
    """Record that these files' bytes are as the manifest says, by their size and mtime (best effort:
    a read-only artifact folder is checked in full each run). A file whose mtime is within RACY_NS of
    now is left out (the filesystem's coarse clock could give a same-size rewrite the same mtime):
    it is checked in full once more, later."""
    stamped_at = time.time_ns()
    stats = {n: st for n, st in _stats(folder, names).items() if st[1] < stamped_at - RACY_NS}
    with contextlib.suppress(OSError):
        tmp = folder / (VERIFIED + ".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, folder / VERIFIED)


def damage(folder: Path, manifest: dict, patterns: tuple[str, ...]) -> str | None:
    """None when the artifact's output files are as its manifest recorded them; else what differs,
    naming the file. Sizes are compared on every reuse; bytes (`file_check`) only of a file whose
    size or mtime moved since it was last checked (`.verified`): a rewritten file, even of the same
    size, is read again, an untouched one costs a stat. An artifact written before per-file checks
    is checked against its manifest's output digest; one before digests is taken as is."""
    names = output_names(folder, patterns)
    now = _stats(folder, names)
    try:
        checked = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        checked = {}
    changed = [n for n in names if checked.get(n) != now[n]]
    recorded = manifest.get("files")
    if recorded is not None:
        for name in sorted(set(recorded) | set(names)):
            if name not in names:
                return f"{name} is missing"
            if name not in recorded:
                return f"{name} is not in its manifest"
            if now[name][0] != recorded[name]["bytes"]:
                return f"{name} has {now[name][0]} bytes, its manifest {recorded[name]['bytes']}"
        for name in changed:
            if file_check(folder / name)["crc32"] != recorded[name]["crc32"]:
                return f"{name}: its bytes differ from those its manifest recorded"
    elif changed and manifest.get("output") and output_digest(folder, patterns) != manifest["output"]:
        return f"its files ({', '.join(names) or 'none'}) differ from its manifest's output digest"
    if changed:
        stamp_verified(folder, names)
    return None


def move_aside(folder: Path) -> Path:
    """A damaged artifact renamed `<key>.broken-<n>` (kept for a look, removed by `clean`)."""
    n = 1
    while folder.with_name(f"{folder.name}.broken-{n}").exists():
        n += 1
    target = folder.with_name(f"{folder.name}.broken-{n}")
    os.replace(folder, target)
    return target


def produced(art: Artifact) -> str:
    """What downstream keys hash for this artifact: its output digest (its key for artifacts
    written before manifests recorded one)."""
    return art.manifest.get("output") or art.key


def listing_fingerprint(paths: list[str]) -> str:
    """Hash of a list of file paths (order-independent) — the set of images a stage reads."""
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:KEY_LENGTH]


def package_versions(
    names: tuple[str, ...] = (
        "torch",
        "timm",
        "faiss-gpu",
        "albumentations",
        "numpy",
        "pandas",
        "scikit-learn",
        "opencv-python-headless",
    ),
) -> dict:
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    versions["python"] = platform.python_version()
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass
class Artifact:
    """One stage output directory. Use ``open_artifact`` to create or reuse it."""

    stage: str
    key: str
    path: Path
    reused: bool
    manifest: dict = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.path / name


def artifact_dir(root: Path, experiment: str, stage: str, key: str) -> Path:
    return Path(root) / experiment / stage / key


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path / MANIFEST}: unreadable manifest ({exc})") from None


@contextlib.contextmanager
def stage_lock(final: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock for computing ``final``; raises if another run holds it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.with_name(final.name + ".lock")
    handle = lock_path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise CacheLockedError(
                    f"{final}: another run is computing this artifact right now (lock {lock_path}); "
                    "wait for it to finish or stop it"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class StageWriter:
    """Context for computing one artifact: a ``partial`` directory renamed into place at the end.

    ``resumable`` keeps an existing partial directory (training checkpoints) instead of clearing it;
    ``outputs`` are the file patterns whose content the manifest's ``output`` digest covers.
    """

    def __init__(
        self,
        final: Path,
        stage: str,
        key: str,
        manifest: dict,
        resumable: bool = False,
        outputs: tuple[str, ...] = ("*",),
    ):
        self.final = final
        self.stage = stage
        self.key = key
        self.partial = final.with_name(final.name + ".partial")
        self.manifest = manifest
        self.resumable = resumable
        self.outputs = outputs
        self.started = time.time()

    def begin(self) -> Path:
        if self.partial.exists() and not self.resumable:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def commit(self, extra: dict | None = None) -> Artifact:
        manifest = dict(self.manifest)
        manifest.update(extra or {})
        manifest["output"] = output_digest(self.partial, self.outputs)
        names = output_names(self.partial, self.outputs)
        manifest["files"] = {n: file_check(self.partial / n) for n in names}
        stamp_verified(self.partial, names)
        manifest["wall_time_s"] = round(time.time() - self.started, 3)
        manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp = self.partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.partial / MANIFEST)
        if self.final.exists():  # a forced recompute replaces the old artifact
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        return Artifact(self.stage, self.key, self.final, reused=False, manifest=manifest)


def build_manifest(
    stage: str,
    key: str,
    config_slice: Any,
    upstream: dict[str, str],
    fingerprints: dict[str, str],
    version: int | None = None,
) -> dict:
    return {
        "stage": stage,
        "key": key,
        "version": version,
        "config": config_slice,
        "upstream": upstream,
        "inputs": fingerprints,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
    }
