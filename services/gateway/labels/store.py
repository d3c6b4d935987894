"""Label set embeddings on disk: one FAISS index file per (text tower, set content), SQLite metadata.

Layout of the data directory:

    embeddings.sqlite3        one row per stored index: its key, what it was computed by,
                              its file name and the sha256 of that file
    <sha256>.faiss            a serialized faiss.IndexFlatIP of the set's label embeddings
    lock                      held (flock) by the one gateway process using the directory

Writes are atomic: the index is written to a temporary file, fsynced, renamed to the name of its
own sha256 and the directory fsynced; only then is the row committed (SQLite's journal makes
that atomic), and only after the commit is the file the row used to name removed. A process
killed at any moment leaves either the old row with its file or the new row with its file.
Every load checks the file's sha256 against the row: a file that fails is never served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import structlog

log = structlog.get_logger("medvlm.gateway")

SCHEMA = """
CREATE TABLE IF NOT EXISTS indexes (
    key TEXT PRIMARY KEY,
    text_tower TEXT NOT NULL,
    label_set TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    count INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS text_towers (
    bundle_id TEXT PRIMARY KEY,
    text_tower TEXT NOT NULL
);
"""
SUFFIX = ".faiss"
TEMP_PREFIX = ".tmp-"


class StoreBusy(RuntimeError):
    """Another process holds the data directory."""


def index_key(text_tower: str, content_sha256: str) -> str:
    """Key of a set's embeddings: the text tower that computed them (bundle id, precision, engine)
    and the set's content (templates, labels, synonyms)."""
    return hashlib.sha256(f"{text_tower}\n{content_sha256}".encode()).hexdigest()



def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Stored:
    """What a row says about an index file."""

    key: str
    file: str
    sha256: str
    count: int
    dim: int


class EmbeddingStore:
    """FAISS index files with SQLite metadata in one directory, used by one process at a time.

    Methods block on disk; call them off the event loop. They are safe to call from several
    threads (one lock serializes them).
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / "lock", "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            raise StoreBusy(f"data directory {self.directory.name!r} is in use by another process") from exc
        self._mutex = threading.Lock()
        self._db = sqlite3.connect(self.directory / "embeddings.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._sweep()

    def close(self) -> None:
        with self._mutex:
            self._db.close()
            self._lock_file.close()

    def _sweep(self) -> None:
        """Remove temporary files and index files no row names (left by a killed writer)."""
        named = {row[0] for row in self._db.execute("SELECT file FROM indexes")}
        for path in self.directory.iterdir():
            if path.name.startswith(TEMP_PREFIX) or (path.suffix == SUFFIX and path.name not in named):
                with contextlib.suppress(OSError):
                    path.unlink()

    def row(self, key: str) -> Stored | None:
        with self._mutex:
            found = self._db.execute(
                "SELECT key, file, sha256, count, dim FROM indexes WHERE key = ?", (key,)).fetchone()
        return Stored(*found) if found else None

    def load(self, key: str) -> np.ndarray | None:
        """The stored [N, D] embeddings of a key, or None when absent or failing its checksum
        (then the row is dropped, so the caller rebuilds it)."""
        stored = self.row(key)
        if stored is None:
            return None
        path = self.directory / stored.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("embeddings_unreadable", file=stored.file, reason=exc.strerror)
            self._drop(stored)
            return None
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            log.error("embeddings_checksum_failed", file=stored.file)
            self._drop(stored)
            return None
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if (index.ntotal, index.d) != (stored.count, stored.dim):
            log.error("embeddings_shape_mismatch", file=stored.file)
            self._drop(stored)
            return None
        return index.reconstruct_n(0, index.ntotal)  # [N, D]

    def save(self, key: str, text_tower: str, label_set: str, content_sha256: str, vectors: np.ndarray) -> Stored:
        """Write [N, D] embeddings under a key, atomically; replaces what the key held."""
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        data = faiss.serialize_index(index).tobytes()
        digest = hashlib.sha256(data).hexdigest()
        name = digest + SUFFIX
        with self._mutex:
            temp = self.directory / f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}"
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.directory / name)
            _fsync_dir(self.directory)
            old = self._db.execute("SELECT file FROM indexes WHERE key = ?", (key,)).fetchone()
            self._db.execute(
                "INSERT OR REPLACE INTO indexes (key, text_tower, label_set, content_sha256, file, sha256, count,"
                " dim, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, text_tower, label_set, content_sha256, name, digest, len(vectors), vectors.shape[1],
                 time.time()),
            )
            if old is not None and old[0] != name:
                self._unlink_unused(old[0])
        return Stored(key, name, digest, len(vectors), vectors.shape[1])

    def _drop(self, stored: Stored) -> None:
        with self._mutex:
            self._db.execute("DELETE FROM indexes WHERE key = ? AND file = ?", (stored.key, stored.file))
            self._unlink_unused(stored.file)

    def _unlink_unused(self, file: str) -> None:
        if self._db.execute("SELECT 1 FROM indexes WHERE file = ?", (file,)).fetchone() is None:
            with contextlib.suppress(OSError):
                (self.directory / file).unlink()

    def remember_text_tower(self, bundle_id: str, text_tower: str) -> None:
        """Record the text tower last verified for a bundle."""
        with self._mutex:
            self._db.execute("INSERT OR REPLACE INTO text_towers (bundle_id, text_tower) VALUES (?, ?)",
                             (bundle_id, text_tower))

    def text_tower(self, bundle_id: str) -> str | None:
        """The text tower last verified for a bundle, if any."""
        with self._mutex:
            found = self._db.execute("SELECT text_tower FROM text_towers WHERE bundle_id = ?",
                                     (bundle_id,)).fetchone()
        return found[0] if found else None
