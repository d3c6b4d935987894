"""Adding engine files to a finished bundle in place: files first, then the index that lists them, atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from engines.runtime import derived
from engines.runtime import manifest as mf
from engines.runtime.bundle import BundleError
from engines.runtime.signature import SIGNATURE_NAME

LOCK_NAME = ".medvlm.lock"


@contextlib.contextmanager
def bundle_lock(bundle_dir: Path) -> Iterator[None]:
    """Exclusive lock of a bundle's indexes (manifest.json, derived.json, manifest.sig), so two
    writers (e.g. plans Jobs of two GPU pools sharing a volume) never lose each other's entries."""
    with open(Path(bundle_dir) / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write beside `path` under a temporary name with `write`, flush it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    _replace(path, lambda out: out.write(text.encode()))


def _place(src: Path, dst: Path) -> None:
    """Replace `dst` with a copy of `src`, atomically."""
    with open(src, "rb") as inp:
        _replace(dst, lambda out: shutil.copyfileobj(inp, out, 1 << 20))


def amend_bundle(
    bundle_dir: Path,
    add: dict[str, tuple[Path, mf.FileEntry]],
    *,
    remove: Callable[[str, mf.FileEntry], bool] = lambda name, entry: False,
    build: Callable[[dict[str, Any]], None] = lambda record: None,
    precision_gate: mf.PrecisionGate | None = None,
) -> Path:
    """Add (or replace) files of a finished bundle and record them; returns the index written.

    The one rule for files added after the build: an unsigned bundle's manifest.json is rewritten
    (to be signed afterwards); a signed bundle (manifest.sig present) keeps manifest.json and
    manifest.sig byte for byte, and the files go to derived.json (engines/runtime/derived.py),
    where they are served only if they reproduce the signed golden outputs.

    A reader sees either the old index with the old files or the new one with the new files:
    new files are renamed into place before the index that lists them, and a file is only
    deleted once the index no longer names it. The sha256 in each entry is recomputed from the
    placed file. Raises BundleError, having written nothing, for a file the bundle cannot take.

    Args:
        add: bundle-relative name -> (file to copy in, its entry; sha256 is filled in here).
        remove: entries of the index being amended to drop (called with name and entry); the
            signed files of a signed bundle are never removed.
        build: edits the build record of the index being amended in place.
        precision_gate: thresholds to record, if they changed (a signed bundle's are signed).
    """
    root = Path(bundle_dir).resolve()
    with bundle_lock(root):
        current = mf.Manifest.read(root)
        index = derived.DerivedIndex.read(root)
        signed = (root / SIGNATURE_NAME).is_file()
        if signed and precision_gate not in (None, current.precision_gate):
            raise BundleError(f"bundle {root.name} is signed: its precision gate cannot change after signing")
        amended = index.files if signed else current.files
        for name, (_, entry) in add.items():
            reason = derived.refusal(root, current, name, entry) if signed else _unsigned_refusal(root, index, name)
            if reason is not None:
                raise BundleError(f"cannot add {name!r} to bundle {root.name}: {reason}")
        files = {n: e for n, e in amended.items() if not remove(n, e)}
        for name, (src, entry) in add.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(Path(src), target)
            files[name] = dataclasses.replace(entry, sha256=mf.sha256_file(target))
        files = dict(sorted(files.items()))
        if signed:
            record = dict(index.build)
            build(record)
            written, text = root / derived.DERIVED_NAME, derived.DerivedIndex(files=files, build=record).to_json()
        else:
            record = dict(current.build)
            build(record)
            updated = dataclasses.replace(current, files=files, build=record,
                                          precision_gate=precision_gate or current.precision_gate)
            written, text = root / mf.MANIFEST_NAME, updated.to_json()
        write_atomically(written, text)
        for name in set(amended) - set(files):
            (root / name).unlink(missing_ok=True)
    return written


def _unsigned_refusal(root: Path, index: derived.DerivedIndex, name: str) -> str | None:
    """Why `name` cannot be added to an unsigned bundle's manifest (None: it can)."""
    target = mf.inside(root, name)
    if target is None:
        return "outside the bundle"
    if target in {(root / n).resolve() for n in (*derived.RESERVED_NAMES, *index.files)}:
        return f"that name is the bundle's own index, or a file of its {derived.DERIVED_NAME}"
    return None
