"""Adding engine files to a finished bundle in place: files first, then the manifest, atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engines.runtime import manifest as mf

LOCK_NAME = ".medvlm.lock"


@contextlib.contextmanager
def bundle_lock(bundle_dir: Path) -> Iterator[None]:
    """Exclusive lock of a bundle's manifest, so two writers (e.g. plans Jobs of two GPU pools
    sharing a volume) never lose each other's entries."""
    with open(Path(bundle_dir) / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _place(src: Path, dst: Path) -> None:
    """Copy `src` next to `dst` under a temporary name, flush it, then rename it over `dst`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def amend_bundle(
    bundle_dir: Path,
    add: dict[str, tuple[Path, mf.FileEntry]],
    *,
    remove: Callable[[str, mf.FileEntry], bool] = lambda name, entry: False,
    build: Callable[[dict[str, Any]], None] = lambda record: None,
    precision_gate: mf.PrecisionGate | None = None,
) -> mf.Manifest:
    """Add (or replace) files of a bundle and rewrite its manifest.

    A reader sees either the old manifest with the old files or the new one with the new files:
    new files are renamed into place before the manifest that lists them, and a file is only
    deleted once the manifest no longer names it. The sha256 in each entry is recomputed from
    the placed file.

    Args:
        add: bundle-relative name -> (file to copy in, its entry; sha256 is filled in here).
        remove: entries of the current manifest to drop (called with name and entry).
        build: edits the manifest's build record in place.
        precision_gate: thresholds to record, if they changed.
    """
    root = Path(bundle_dir).resolve()
    with bundle_lock(root):
        current = mf.Manifest.read(root)
        files = {n: e for n, e in current.files.items() if not remove(n, e)}
        for name, (src, entry) in add.items():
            target = (root / name).resolve()
            if root not in target.parents or name == mf.MANIFEST_NAME:
                raise ValueError(f"cannot add {name!r} to a bundle")
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(Path(src), target)
            files[name] = dataclasses.replace(entry, sha256=mf.sha256_file(target))
        record = dict(current.build)
        build(record)
        updated = dataclasses.replace(
            current,
            files=dict(sorted(files.items())),
            build=record,
            precision_gate=precision_gate or current.precision_gate,
        )
        fd, tmp = tempfile.mkstemp(prefix=f".{mf.MANIFEST_NAME}.", dir=root)
        with os.fdopen(fd, "w") as out:
            out.write(updated.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / mf.MANIFEST_NAME)
        for name in set(current.files) - set(files) - set(add):
            (root / name).unlink(missing_ok=True)
    return updated
