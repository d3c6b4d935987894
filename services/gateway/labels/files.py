"""Label set files: versioned vocabularies of findings declared as YAML or JSON files in a directory.

A file declares one set:

    name: chest-findings          # [a-z0-9][a-z0-9._-]*, at most 64 characters
    version: 1                    # positive integer; name@version never changes once served
    description: Findings of the chest worklist
    templates: ["{}", "a chest radiograph showing {}"]   # optional, default ["{}"]
    labels:
      - name: left pleural effusion
        code: "60046008"          # optional: SNOMED CT, RadLex, ...
        synonyms: [fluid in the left pleural space]      # optional
      - cardiomegaly              # a plain string is a label without code or synonyms

Parsing is strict: an unknown field, a duplicate label, a template without exactly one "{}"
or too many labels refuses the whole file with a message naming the file and the field.

Labels sent in a request become a transient set (`transient_set`): no name, one template, no synonyms,
scored exactly as a served set is.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from services.domain import InvalidInput

PLACEHOLDER = "{}"
DEFAULT_TEMPLATE = PLACEHOLDER  # the label alone
MAX_LABELS = 100_000
MAX_TEMPLATES = 64
MAX_SYNONYMS = 64
MAX_CODE_CHARS = 128
MAX_DESCRIPTION_CHARS = 4096
MAX_FILE_BYTES = 64 << 20
SUFFIXES = (".yaml", ".yml", ".json")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SET_FIELDS = {"name", "version", "description", "templates", "labels"}
_LABEL_FIELDS = {"name", "code", "synonyms"}


class LabelSetError(InvalidInput):
    """A label set file that cannot be served; the message names the file and the field."""

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


def apply_template(template: str, label: str) -> str:
    """Plain replacement of "{}", never str.format(): labels may contain braces."""
    return template.replace(PLACEHOLDER, label)


@dataclasses.dataclass(frozen=True)
class Label:
    """One finding of a set: its name, optional code and synonyms."""

    name: str
    code: str = ""
    synonyms: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The name and its synonyms: every text prompted for this label."""
        return (self.name, *self.synonyms)


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """One immutable version of a vocabulary, or the labels of one request (`transient`)."""

    name: str
    version: int
    description: str
    templates: tuple[str, ...]
    labels: tuple[Label, ...]
    file: str = ""  # where it was read from (a file name, not a path)

    @property
    def transient(self) -> bool:
        """Labels sent in a request rather than a served set."""
        return not self.name

    @property
    def ref(self) -> str:
        """"name@version"; "" for a transient set."""
        return f"{self.name}@{self.version}" if self.name else ""

    @functools.cached_property
    def content_sha256(self) -> str:
        """Digest of everything that shapes the embeddings and the answers (not the description)."""
        body = {
            "templates": list(self.templates),
            "labels": [[label.name, label.code, list(label.synonyms)] for label in self.labels],
        }
        return hashlib.sha256(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def prompts(self) -> tuple[list[str], list[int]]:
        """Every prompt (each name and synonym in each template) and the label index of each."""
        texts: list[str] = []
        owner: list[int] = []
        for i, label in enumerate(self.labels):
            for name in label.names:
                for template in self.templates:
                    texts.append(apply_template(template, name))
                    owner.append(i)
        return texts, owner


def transient_set(labels: Sequence[str], template: str) -> LabelSet:
    """Checked labels of a request in a checked template, as a set: no name, no codes or synonyms."""
    return LabelSet("", 0, "", (template,), tuple(Label(name) for name in labels))


def _text(file: str, field: str, value: object, max_chars: int, *, blank_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise LabelSetError(file, f"{field}: must be a string, got {type(value).__name__}")
    if not blank_ok and not value.strip():
        raise LabelSetError(file, f"{field}: is blank")
    if len(value) > max_chars:
        raise LabelSetError(file, f"{field}: has {len(value)} characters, over the limit of {max_chars}")
    return value


def _list(file: str, field: str, value: object) -> list:
    if not isinstance(value, list):
        raise LabelSetError(file, f"{field}: must be a list, got {type(value).__name__}")
    return value


def _unknown(file: str, where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise LabelSetError(file, f"{where}unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def parse(file: str, data: object, max_text_chars: int) -> LabelSet:
    """A LabelSet from a decoded file, or LabelSetError naming the file and the field."""
    if not isinstance(data, dict):
        raise LabelSetError(file, "the file must hold one mapping (name, version, labels, ...)")
    _unknown(file, "", data, _SET_FIELDS)
    for required in ("name", "version", "labels"):
        if required not in data:
            raise LabelSetError(file, f"{required}: missing")
    name = _text(file, "name", data["name"], 64)
    if not _NAME.match(name):
        raise LabelSetError(file, "name: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LabelSetError(file, "version: must be a positive integer")
    description = _text(file, "description", data.get("description", ""), MAX_DESCRIPTION_CHARS, blank_ok=True)

    raw_templates = _list(file, "templates", data.get("templates", [PLACEHOLDER]))
    if not 1 <= len(raw_templates) <= MAX_TEMPLATES:
        raise LabelSetError(file, f"templates: between 1 and {MAX_TEMPLATES} required, got {len(raw_templates)}")
    templates = []
    for i, template in enumerate(raw_templates):
        template = _text(file, f"templates[{i}]", template, max_text_chars)
        if template.count(PLACEHOLDER) != 1:
            raise LabelSetError(file, f'templates[{i}]: must contain exactly one "{{}}"')
        if template in templates:
            raise LabelSetError(file, f"templates[{i}]: duplicate of templates[{templates.index(template)}]")
        templates.append(template)
    extra = max(len(t) for t in templates) - len(PLACEHOLDER)

    raw_labels = _list(file, "labels", data["labels"])
    if len(raw_labels) > MAX_LABELS:
        raise LabelSetError(file, f"labels: {len(raw_labels)} labels, over the limit of {MAX_LABELS}")
    if len(raw_labels) < 2:
        raise LabelSetError(file, f"labels: at least 2 required, got {len(raw_labels)}")
    labels: list[Label] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw_labels):
        where = f"labels[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise LabelSetError(file, f"{where}: must be a string or a mapping with name, code, synonyms")
        _unknown(file, f"{where}: ", item, _LABEL_FIELDS)
        if "name" not in item:
            raise LabelSetError(file, f"{where}.name: missing")
        label_name = _text(file, f"{where}.name", item["name"], max_text_chars - extra)
        code = item.get("code", "")
        if isinstance(code, int) and not isinstance(code, bool):
            code = str(code)  # an unquoted numeric code (SNOMED CT ids are digits)
        code = _text(file, f"{where}.code", code, MAX_CODE_CHARS, blank_ok=True)
        raw_synonyms = _list(file, f"{where}.synonyms", item.get("synonyms", []))
        if len(raw_synonyms) > MAX_SYNONYMS:
            raise LabelSetError(file, f"{where}.synonyms: over the limit of {MAX_SYNONYMS}")
        synonyms = tuple(
            _text(file, f"{where}.synonyms[{j}]", s, max_text_chars - extra) for j, s in enumerate(raw_synonyms)
        )
        if label_name in seen:
            raise LabelSetError(file, f"{where}.name: duplicate of labels[{seen[label_name]}]")
        seen[label_name] = i
        if len(set(synonyms)) != len(synonyms) or label_name in synonyms:
            raise LabelSetError(file, f"{where}.synonyms: repeats a name")
        labels.append(Label(label_name, code, synonyms))
    return LabelSet(name, version, description, tuple(templates), tuple(labels), file)


def read_file(path: Path, max_text_chars: int) -> LabelSet:
    """Read and parse one set file (YAML, or JSON, which YAML reads too)."""
    file = path.name
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LabelSetError(file, f"{size} bytes, over the limit of {MAX_FILE_BYTES}")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LabelSetError(file, "not UTF-8 text") from exc
    except OSError as exc:
        raise LabelSetError(file, f"cannot be read ({exc.strerror})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else (
            f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "")
        raise LabelSetError(file, f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}{where}") from exc
    return parse(file, data, max_text_chars)


def set_files(directory: Path) -> list[Path]:
    """The set files of a directory, by name; hidden entries (a ConfigMap's ..data) are skipped."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file())


def signature(directory: Path) -> tuple:
    """Changes whenever a set file is added, removed or rewritten (including a ConfigMap's
    symlink swap, which changes the files the names resolve to)."""
    out = []
    for path in set_files(directory):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Refused:
    """A file that was not served, and why."""

    file: str
    problem: str


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """The sets served, by ref, and the files refused."""

    sets: dict[str, LabelSet]
    refused: tuple[Refused, ...]

    def resolve(self, ref: str) -> LabelSet:
        """A set by "name@version", or by "name" (its newest version)."""
        if "@" in ref:
            found = self.sets.get(ref)
        else:
            versions = [s for s in self.sets.values() if s.name == ref]
            found = max(versions, key=lambda s: s.version) if versions else None
        if found is None:
            raise InvalidInput("unknown label set (see ListLabelSets)")
        return found


EMPTY = Catalogue({}, ())


def load(directory: Path, previous: Catalogue, max_text_chars: int) -> Catalogue:
    """Read every file of the directory into a new catalogue.

    A file that fails keeps serving what it served before (its set from `previous`); a set whose
    name@version is already served with other content is refused (versions are immutable); two
    files declaring the same name@version: the first by file name wins. Files removed from the
    directory stop serving their sets.
    """
    by_file = {s.file: s for s in previous.sets.values()}
    sets: dict[str, LabelSet] = {}
    refused: list[Refused] = []
    for path in set_files(directory):
        try:
            found = read_file(path, max_text_chars)
            before = previous.sets.get(found.ref)
            if before is not None and before.content_sha256 != found.content_sha256:
                raise LabelSetError(path.name, f"{found.ref} is already served with other content; "
                                               "a changed set needs a new version")
            if found.ref in sets:
                raise LabelSetError(path.name, f"{found.ref} is also declared by {sets[found.ref].file}")
        except LabelSetError as exc:
            refused.append(Refused(exc.file, exc.problem))
            kept = by_file.get(path.name)
            if kept is not None and kept.ref not in sets:
                sets[kept.ref] = kept
            continue
        sets[found.ref] = found
    return Catalogue(dict(sorted(sets.items())), tuple(refused))


def changed(before: Catalogue, after: Catalogue) -> Iterable[str]:
    """Refs of sets added by `after`."""
    return [ref for ref in after.sets if ref not in before.sets]
