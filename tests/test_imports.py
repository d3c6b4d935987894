"""Imports flow one way: the services on top; imaging, the client and the page below them, importing
no service code; the engine runtime never imports the build half.

Read from the source (every import statement, those inside functions too), so a lazy import is
caught as well as a top-level one. tests/test_selection.py checks the runtime half the other way
as well, by importing it in a fresh process; tests/test_wheel.py runs the page's preview from the
installed wheel, where services/ and engines/ do not exist.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (package folder, module prefixes it must never import, why)
RULES = [
    ("medvlm/imaging", ("services", "engines", "medvlm.client", "medvlm.web"),
     "imaging is below the services, the engines' manifest, the client and the page"),
    ("medvlm/web", ("services", "engines"), "the page ships in the wheel, which holds no service or engine code"),
    ("medvlm/client", ("services", "engines"), "the client ships in the wheel, which holds no service or engine code"),
    ("engines/runtime", ("engines.build", "services"), "a serving image installs without torch"),
    ("services/domain.py", ("services", "engines", "medvlm.client", "medvlm.web"),
     "the domain module (priority, deadlines, errors) is what every service speaks, so it is below them all"),
    ("services/plumbing", ("services.gateway", "services.vision", "services.text", "services.encoder"),
     "server plumbing serves all three services and knows none of them"),
    ("services/security", ("services.gateway", "services.vision", "services.text", "services.encoder"),
     "security serves all three services and knows none of them"),
    ("services/encoder", ("services.gateway", "services.vision", "services.text"),
     "the encoder runtime is below the two encoders and never the gateway's"),
    ("services/gateway", ("services.encoder", "services.vision", "services.text"),
     "the gateway speaks to the encoders over gRPC only; priority and deadlines are in services.domain"),
    ("services", ("devtools", "bench", "tests", "scripts"), "nothing that serves imports development tools"),
    ("engines", ("devtools",), "nothing that serves or builds imports development tools"),
]
# Modules outside the vision service that may import one of its modules: bench measures the
# encoder's own preparer. Decoding itself is medvlm.imaging, for everyone.
VISION_IMPORTS_ALLOWED = {"bench": {"services.vision.encoder"}}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in one file; `from a import b` gives a.b as well as a."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def names(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def files(folder: str) -> list[Path]:
    """The Python files of a package folder, or the one file a rule names."""
    path = ROOT / folder
    return [path] if path.suffix == ".py" else list(path.rglob("*.py"))


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted(files(folder)):
        out += [f"{path.relative_to(ROOT)}:{line} imports {module}"
                for line, module in imports(path) if names(module, forbidden)]
    return sorted(set(out))


@pytest.mark.parametrize(("folder", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_package_imports_nothing_above_it(folder, forbidden, why):
    assert files(folder) and all(p.exists() for p in files(folder)), folder
    assert violations(folder, forbidden) == [], why


def test_only_bench_imports_the_vision_service_and_only_its_preparer():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "gen", "tests", ".cache") or rel.parts[:2] == ("services", "vision"):
            continue
        allowed = VISION_IMPORTS_ALLOWED.get(rel.parts[0], set())
        found += [f"{rel}:{line} imports {module}" for line, module in imports(path)
                  if names(module, ("services.vision",)) and module not in allowed
                  and not any(module.startswith(a + ".") for a in allowed)]
    assert sorted(set(found)) == []


def test_the_check_sees_lazy_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "import os\n\ndef f():\n    from services.vision import preprocess\n    import engines.build.bundle\n")
    got = [module for _, module in imports(tmp_path / "pkg" / "m.py")]
    assert names(got[1], ("services",)) and "services.vision.preprocess" in got and "engines.build.bundle" in got
    assert not names("servicesx", ("services",)) and names("engines.build", ("engines.build",))
