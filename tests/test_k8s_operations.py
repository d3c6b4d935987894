"""The Kubernetes manifests as operators meet them (docs/deploy.md): GPUs held, node drains,
rollout deadlines, alerts, autoscaling without Prometheus, traffic from outside, DNS, a second
namespace, pinned images and checkov. Renders come from test_k8s; variants (a component switched
on, images pinned) are rendered from a copy of k8s/ edited as the guide says."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import find_tool
from test_k8s import (
    DOCS,
    GPU,
    GREEN,
    K8S,
    KUBECTL,
    KUSTOMIZATIONS,
    ROOT,
    _doc_commands,
    _find,
    _kubernetes_validate,
    _option,
    _pods,
    _startup_budget,
    namespace_of,
    needs_kubectl,
    rendered,
)

PROMTOOL = find_tool("promtool")
needs_promtool = pytest.mark.needs_tool("promtool", install="apt-get install prometheus (Debian: promtool)")
CHECKOV = find_tool("checkov")  # make checkov: its own venv, linked into .venv/bin
needs_checkov = pytest.mark.needs_tool("checkov", install="make checkov (requirements/checkov.txt)")
# checkov's checks the committed renders fail on purpose, and why (docs/deploy.md, "Pinning the
# images"): digests exist only once a release is pushed, so the committed overlays keep tags and
# the guide pins digests after the push; with a digest the pull policy no longer decides which
# image runs, and Always would make every pod start depend on the registry.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "image digests: pinned after the push by scripts/pin_images.py, not in git",
    "CKV_K8S_15": "imagePullPolicy Always: moot once digests are pinned; IfNotPresent survives registry outages",
}
OVERLAY_COMPONENTS = {"text-on-gpu": "text-on-gpu", "link-local-dns": "link-local-dns"}


def render_variant(tmp_path: Path, path: str, edit: Callable[[Path], None]) -> list[dict]:
    """Render k8s/`path` from a copy of k8s/ that `edit` changed."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    edit(copy)
    proc = subprocess.run([KUBECTL, "kustomize", str(copy / path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def switch_on(component: str) -> Callable[[Path], None]:
    """The guide's switch: uncomment the component's line in the gpu overlay."""
    def edit(k8s: Path) -> None:
        overlay = k8s / "overlays/gpu/kustomization.yaml"
        text, count = re.subn(rf"(?m)^  # (- \.\./\.\./components/{component}\b)", r"  \1", overlay.read_text())
        assert count == 1, f"no commented line for {component} in the gpu overlay"
        overlay.write_text(text)
    return edit


def _min_replicas(docs: list[dict], deployment: str) -> int:
    """What keeps running at rest: KEDA's minReplicaCount, else the HPA's minReplicas, else replicas."""
    for kind, field in (("ScaledObject", "minReplicaCount"), ("HorizontalPodAutoscaler", "minReplicas")):
        for scaler in _find(docs, kind):
            if scaler["spec"]["scaleTargetRef"]["name"] == deployment:
                return int(scaler["spec"].get(field, 1))
    return int(next(d for d in _find(docs, "Deployment", deployment))["spec"].get("replicas", 1))


def _max_replicas(docs: list[dict], deployment: str) -> int:
    for kind, field in (("ScaledObject", "maxReplicaCount"), ("HorizontalPodAutoscaler", "maxReplicas")):
        for scaler in _find(docs, kind):
            if scaler["spec"]["scaleTargetRef"]["name"] == deployment:
                return int(scaler["spec"][field])
    return _min_replicas(docs, deployment)


def _gpus_per_pod(deployment: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0))
               for c in deployment["spec"]["template"]["spec"]["containers"])


def gpu_counts(docs: list[dict], plans_jobs: int) -> dict[str, int]:
    """GPUs the render holds at rest, during a rollout (one surge pod per GPU Deployment), at the
    autoscalers' maximum, and at the maximum while a rollout surges and a plans Job builds."""
    gpu_deployments = [d for d in _find(docs, "Deployment") if _gpus_per_pod(d)]
    rest = sum(_min_replicas(docs, d["metadata"]["name"]) * _gpus_per_pod(d) for d in gpu_deployments)
    surge = sum(int(d["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", 1)) * _gpus_per_pod(d)
                for d in gpu_deployments)
    top = sum(_max_replicas(docs, d["metadata"]["name"]) * _gpus_per_pod(d) for d in gpu_deployments)
    return {"at rest": rest, "rollout": rest + surge, "maximum": top, "maximum, rollout and plans": top + surge + plans_jobs}


@needs_kubectl
def test_the_gpu_overlay_holds_fewer_gpus_at_rest(tmp_path):
    # One plans Job builds at a time in a pool (each GPU model has its own Job and pool).
    before = gpu_counts(render_variant(tmp_path, "overlays/gpu", switch_on("text-on-gpu")), plans_jobs=1)
    after = gpu_counts(rendered("overlays/gpu"), plans_jobs=1)
    assert before["at rest"] == 4  # both towers on GPUs, 2 replicas each: the release before this one
    assert after["at rest"] < before["at rest"]
    assert after == {"at rest": 2, "rollout": 3, "maximum": 4, "maximum, rollout and plans": 6}, after
    # The guide's sizing table gives these figures (one plans Job runs per pool at a time).
    table = re.search(r"^\| GPUs .*?(?=^$)", DOCS.read_text(), re.S | re.M)
    assert table, "no sizing table (a row starting `| GPUs`) in docs/deploy.md"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in table.group(0).splitlines()[2:]}
    assert rows == {what: [str(before[what]), str(after[what])] for what in after}, rows


@needs_kubectl
def test_text_on_cpu_by_default_and_the_switch_back(tmp_path):
    def tower(docs: list[dict], name: str) -> tuple[int, str | None, str]:
        deployment = _find(docs, "Deployment", name)[0]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        engine = next((e["value"] for e in container.get("env", []) if e["name"] == "MEDVLM_ENGINE"), None)
        return _gpus_per_pod(deployment), engine, container["image"].rsplit("/", 1)[-1].split(":")[0]

    default = rendered("overlays/gpu")
    assert tower(default, "medvlm-vision") == (1, "tensorrt", "medvlm-vision-gpu")
    assert tower(default, "medvlm-text") == (0, None, "medvlm-text")  # the CPU image, settings' engine
    back = render_variant(tmp_path, "overlays/gpu", switch_on("text-on-gpu"))
    assert tower(back, "medvlm-text") == (1, "tensorrt", "medvlm-text-gpu")
    assert tower(back, "medvlm-vision") == tower(default, "medvlm-vision")


def _promtool_parses(tmp_path: Path, expressions: dict[str, str]) -> str:
    """promtool's complaints about PromQL expressions checked as recording rules ("" when none)."""
    rules = {"groups": [{"name": "check", "rules": [{"record": f"check:{i}", "expr": e}
                                                    for i, e in enumerate(expressions.values())]}]}
    path = tmp_path / "expressions.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def _guide_rollout_timeouts() -> list[int]:
    found = []
    for command in _doc_commands():
        if command[:1] == ["kubectl"] and "rollout" in command and "status" in command:
            timeout = _option(command, "--timeout")
            found.append(int(timeout[:-1]) * {"s": 1, "m": 60, "h": 3600}[timeout[-1]] if timeout else 0)
    return found


def operations_problems(renders: dict[str, list[dict]], tmp_path: Path) -> list[str]:
    """Every operations rule of docs/deploy.md over the renders; an empty list means all hold."""
    problems = []
    for path in ("overlays/cpu", "overlays/gpu"):
        docs = renders[path]
        for pdb in _find(docs, "PodDisruptionBudget"):
            if pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
                problems.append(f"{path} PodDisruptionBudget/{pdb['metadata']['name']}: NotReady pods block drains "
                                "(unhealthyPodEvictionPolicy is not AlwaysAllow)")
        timeouts = _guide_rollout_timeouts()
        for deployment in _find(docs, "Deployment"):
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            deadline = deployment["spec"].get("progressDeadlineSeconds", 600)
            needed = max([_startup_budget(container), *timeouts])
            if deadline <= needed:
                problems.append(f"{path} Deployment/{deployment['metadata']['name']}: progressDeadlineSeconds "
                                f"{deadline} not above the startup probe and the guide's rollout timeout ({needed} s)")
        for scaler in _find(docs, "ScaledObject"):
            at = f"{path} ScaledObject/{scaler['metadata']['name']}"
            if not scaler["spec"].get("fallback", {}).get("replicas"):
                problems.append(f"{at}: no fallback for an unreachable Prometheus")
            problems += [f"{at}: trigger {t.get('name')} is {t.get('metricType', 'AverageValue')}, which KEDA's "
                         "fallback does not cover" for t in scaler["spec"]["triggers"]
                         if t.get("metricType", "AverageValue") != "AverageValue"]
    rules = {r["alert"]: r["expr"] for doc in _find(renders["monitoring"], "PrometheusRule")
             for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for alert, needs in (("MedvlmNeverReady", "kube_deployment_status_replicas_unavailable"),
                         ("MedvlmEncoderDown", "medvlm_encoder_up")):
        if needs not in rules.get(alert, ""):
            problems.append(f"k8s/monitoring: no alert {alert} on {needs}")
    queries = {f"{s['metadata']['name']}/{t['name']}": t["metadata"]["query"]
               for s in _find(renders["overlays/gpu"], "ScaledObject") for t in s["spec"]["triggers"]}
    complaint = _promtool_parses(tmp_path, {**rules, **queries})
    if complaint:
        problems.append(f"PromQL that Prometheus refuses: {complaint.strip()}")
    edge = renders["examples/gateway-api"]
    routes = _find(edge, "GRPCRoute")
    if not routes or any(r["apiVersion"] != "gateway.networking.k8s.io/v1" for r in routes) or not any(
            b.get("name") == "medvlm-gateway" for r in routes for rule in r["spec"]["rules"]
            for b in rule.get("backendRefs", [])):
        problems.append("examples/gateway-api: no gateway.networking.k8s.io/v1 GRPCRoute to the gateway")
    gateway_tls = _find(renders["overlays/gpu"], "Certificate", "medvlm-gateway-tls")[0]["spec"]
    for policy in _find(edge, "BackendTLSPolicy") or [None]:
        validation = (policy or {}).get("spec", {}).get("validation", {})
        if policy is None or validation.get("hostname") not in gateway_tls["dnsNames"] or not validation.get(
                "caCertificateRefs"):
            problems.append("examples/gateway-api: no BackendTLSPolicy checking the gateway's certificate "
                            "(a hostname on it, the internal CA)")
    for listener in (li for g in _find(edge, "Gateway") for li in g["spec"]["listeners"]):
        refs = {r["name"] for r in listener.get("tls", {}).get("certificateRefs", [])}
        if gateway_tls["secretName"] in refs:
            problems.append("examples/gateway-api: the edge reuses the Secret cert-manager owns for the gateway")
    ingresses = [f"{p}: Ingress/{d['metadata']['name']}" for p, docs in renders.items() for d in docs
                 if d["kind"] == "Ingress"]
    problems += [f"{i}: ingress-nginx is retired; use the Gateway API example" for i in ingresses]
    return problems


@pytest.fixture(scope="module")
def all_renders() -> dict[str, list[dict]]:
    return {path: rendered(path) for path in KUSTOMIZATIONS}


@needs_kubectl
@needs_promtool
def test_operations(all_renders, tmp_path):
    assert operations_problems(all_renders, tmp_path) == []


def _rule(renders: dict, name: str) -> dict:
    return next(r for d in _find(renders["monitoring"], "PrometheusRule") for g in d["spec"]["groups"]
                for r in g["rules"] if r.get("alert") == name)


OPERATIONS_BREAKAGES: dict[str, tuple[Callable[[dict], object], str]] = {
    "PDB blocks drains": (lambda r: _find(r["overlays/gpu"], "PodDisruptionBudget")[0]["spec"].pop(
        "unhealthyPodEvictionPolicy"), "NotReady pods block drains"),
    "short progress deadline": (lambda r: _find(r["overlays/gpu"], "Deployment", "medvlm-vision")[0]["spec"].update(
        progressDeadlineSeconds=600), "progressDeadlineSeconds 600 not above"),
    "no fallback": (lambda r: _find(r["overlays/gpu"], "ScaledObject")[0]["spec"].pop("fallback"), "no fallback"),
    "a Value trigger": (lambda r: _find(r["overlays/gpu"], "ScaledObject")[0]["spec"]["triggers"][1].update(
        metricType="Value"), "fallback does not cover"),
    "no never-ready alert": (lambda r: _rule(r, "MedvlmNeverReady").update(alert="Other"), "no alert MedvlmNeverReady"),
    "broken PromQL": (lambda r: _rule(r, "MedvlmEncoderDown").update(expr="min by (pod (medvlm_encoder_up) == 0"),
                      "PromQL that Prometheus refuses"),
    "edge without backend TLS": (lambda r: r["examples/gateway-api"].remove(
        _find(r["examples/gateway-api"], "BackendTLSPolicy")[0]), "no BackendTLSPolicy"),
    "edge reuses the gateway's Secret": (lambda r: _find(r["examples/gateway-api"], "Gateway")[0]["spec"]["listeners"][0][
        "tls"]["certificateRefs"][0].update(name="medvlm-gateway-tls"), "reuses the Secret"),
    "an Ingress": (lambda r: r["examples/gateway-api"].append(
        {"kind": "Ingress", "apiVersion": "networking.k8s.io/v1", "metadata": {"name": "old"}}), "ingress-nginx is retired"),
}


@needs_kubectl
@needs_promtool
@pytest.mark.parametrize("breakage", OPERATIONS_BREAKAGES)
def test_operations_check_catches(breakage, all_renders, tmp_path):
    renders = {p: rendered(p) for p in all_renders}  # fresh copies: the breakages change them
    change, expected = OPERATIONS_BREAKAGES[breakage]
    change(renders)
    problems = operations_problems(renders, tmp_path)
    assert any(expected in p for p in problems), problems


@needs_kubectl
def test_link_local_dns_component_allows_port_53_only(tmp_path):
    docs = render_variant(tmp_path, "overlays/gpu", switch_on("link-local-dns"))
    (policy,) = _find(docs, "NetworkPolicy", "allow-link-local-dns")
    kv = _kubernetes_validate()
    for version in ("1.30", "1.34"):
        kv.validate(policy, version, strict=True)
    assert policy["metadata"]["namespace"] == "medvlm" and policy["spec"]["podSelector"] == {}
    (rule,) = policy["spec"]["egress"]
    assert {p["ipBlock"]["cidr"] for p in rule["to"]} == {"169.254.20.10/32", "169.254.169.254/32"}
    # Port 53 alone: 169.254.169.254:80 is the metadata server, which hands out node credentials.
    assert sorted((p["protocol"], p["port"]) for p in rule["ports"]) == [("TCP", 53), ("UDP", 53)]
    assert len(docs) == len(rendered("overlays/gpu")) + 1


# Where a namespace is named inside a string: DNS names (x.NAMESPACE, x.NAMESPACE.svc...), SPIFFE
# ids (/ns/NAMESPACE/) and PromQL label matchers (namespace="NAMESPACE").
# Each folder of k8s/examples/green and the kustomization it puts into the namespace medvlm-green.
BLUE_OF = {"gpu": "overlays/gpu", "plans": "overlays/gpu/plans", "smoke": "overlays/gpu/smoke",
           "volume": "volume", "bundle-loader": "bundle-loader", "monitoring": "monitoring"}
NAMED_NAMESPACE = r"(?:\.{ns}(?=$|[.:])|/ns/{ns}/|namespace=\"{ns}\")"


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


@needs_kubectl
@pytest.mark.parametrize("path", [p for p in KUSTOMIZATIONS if p.startswith(GREEN)])
def test_a_second_namespace_leaves_no_trace_of_the_first(path):
    blue = rendered(BLUE_OF[path.removeprefix(GREEN)])
    green = rendered(path)
    old, new = (re.compile(NAMED_NAMESPACE.format(ns=re.escape(n))) for n in ("medvlm", "medvlm-green"))
    left = [s for d in green for s in _strings(d) if old.search(s)]
    assert left == []  # mTLS (certificates, SPIFFE ids), the gateway's targets, KEDA's queries
    assert sum(bool(new.search(s)) for d in green for s in _strings(d)) == sum(
        bool(old.search(s)) for d in blue for s in _strings(d))
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in green} == {namespace_of(path)}


def _checkov(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHECKOV, "--quiet", "--compact", "--skip-download", "--framework", "kubernetes",
                           "-f", str(path), *args], capture_output=True, text=True, timeout=300)


@needs_kubectl
@needs_checkov
def test_checkov_passes_but_the_justified_skips(tmp_path):
    failed = {}
    for path in (p for p in KUSTOMIZATIONS if p != "base"):  # base is no deployment: no images
        docs = rendered(path)
        if not KUSTOMIZATIONS[path]["serving"]:
            # Applied beside an overlay, into the namespace whose policies (default deny) it holds.
            overlay = f"{GREEN}gpu" if path.startswith(GREEN) else "overlays/gpu"
            docs += _find(rendered(overlay), "NetworkPolicy")
        out = tmp_path / (path.replace("/", "_") + ".yaml")
        out.write_text(yaml.safe_dump_all(docs))
        proc = _checkov(out, "--skip-check", ",".join(CHECKOV_SKIPS))
        if proc.returncode != 0:
            failed[path] = proc.stdout[-2000:] + proc.stderr[-1000:]
    assert failed == {}
    text = DOCS.read_text()
    assert all(check in text for check in CHECKOV_SKIPS), "docs/deploy.md does not justify every skip"


@needs_kubectl
@needs_checkov
def test_pinned_digests_pass_the_digest_check(tmp_path):
    digests = tmp_path / "image-digests.txt"
    images = yaml.safe_load((K8S / "components/images/kustomization.yaml").read_text())["images"]
    digests.write_text("".join(f"{i['newName']}@sha256:{n:064x}\n" for n, i in enumerate(images, 1)))

    def pinned(k8s: Path) -> None:
        proc = subprocess.run(["python3", str(ROOT / "scripts/pin_images.py"), str(digests),
                               "--images", str(k8s / "components/images/kustomization.yaml")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr

    for path in ("overlays/gpu", "overlays/cpu"):
        tags = tmp_path / f"{path.replace('/', '_')}-tags.yaml"
        tags.write_text(yaml.safe_dump_all(rendered(path)))
        assert _checkov(tags, "--check", "CKV_K8S_43").returncode != 0  # the check can fail
        docs = render_variant(tmp_path / path.replace("/", "_"), path, pinned)
        assert all("@sha256:" in c["image"] for _, pod in _pods(docs) for c in pod["spec"]["containers"])
        out = tmp_path / f"{path.replace('/', '_')}-pinned.yaml"
        out.write_text(yaml.safe_dump_all(docs))
        proc = _checkov(out, "--check", "CKV_K8S_43")
        assert proc.returncode == 0, proc.stdout[-2000:]


def test_pin_images_refuses_a_partial_or_malformed_list(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pin_images", ROOT / "scripts/pin_images.py")
    pin_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin_images)
    text = (K8S / "components/images/kustomization.yaml").read_text()
    repos = re.findall(r"newName: (\S+)", text)
    full = {r: f"sha256:{'a' * 64}" for r in repos}
    pinned = pin_images.pin(text, full)
    assert pinned.count(f"digest: sha256:{'a' * 64}") == len(repos)
    assert pin_images.pin(pinned, full) == pinned  # pinning again replaces, never duplicates
    with pytest.raises(ValueError, match="every image must be pinned"):
        pin_images.pin(text, dict(list(full.items())[1:]))
    with pytest.raises(ValueError, match="does not name"):
        pin_images.pin(text, {**full, "registry.example.com/other": f"sha256:{'b' * 64}"})
    with pytest.raises(ValueError, match="line 1"):
        pin_images.read_digests("registry.example.com/medvlm/medvlm-gateway:0.1.0\n")
