"""Label set figures: Classify p50 with 5,000 vs 10 labels, gateway memory with 50,000 cached labels,
exact vs approximate FAISS search, and demo held-out accuracy with the shipped sets and ensembles.

    python -m bench.labelsets [--bundle bundles/demo-synthetic-1] [--rounds 200] [--out bench/out/labelsets]

Starts its own vision encoder, text encoder and gateway (demo bundle, ONNX Runtime CPU) with a
temporary label set directory: the shipped sets, their variants without synonyms and with the
plain template only, and synthetic sets of 10, 5,000 and 50,000 labels. Prints a markdown report and
writes results.json. Measures once; timings on shared machines vary by +-30 %, so compare the
ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import faiss
import grpc
import numpy as np
import yaml

from bench.accuracy import EVAL_SEED, png
from bench.procs import HOST, Server, free_port, service_env
from engines.build import synthetic
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "labelsets"
SIZES = (10, 5_000, 50_000)


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx2)\b", text)))
    return f"{model.group(1) if model else 'unknown CPU'}; {' '.join(flags) or 'no avx2/avx512'}"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def synthetic_labels(count: int) -> list[str]:
    """Distinct finding-like labels: the demo's phrases with a numbered qualifier."""
    phrases = [p for f in synthetic.FINDINGS for p in f.phrases]
    return [f"{phrases[i % len(phrases)]}, variant {i}" for i in range(count)]


def write_sets(directory: Path) -> None:
    """The shipped sets; their variants with the plain template only, without synonyms, or both;
    and synthetic sets of 10 and 5,000 labels."""
    for path in SHIPPED.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        shutil.copy(path, directory / path.name)
        plain = dict(data, name=data["name"] + "-plain", templates=["{}"],
                     labels=[{"name": x["name"], "code": x["code"]} for x in data["labels"]])
        templates = dict(data, name=data["name"] + "-templates",
                         labels=[{"name": x["name"], "code": x["code"]} for x in data["labels"]])
        synonyms = dict(data, name=data["name"] + "-synonyms", templates=["{}"])
        for variant in (plain, templates, synonyms):
            (directory / f"{variant['name']}.yaml").write_text(yaml.safe_dump(variant))
    for size in SIZES[:2]:
        (directory / f"size-{size}.yaml").write_text(yaml.safe_dump(
            {"name": f"size-{size}", "version": 1, "labels": synthetic_labels(size)}))


def wait_ready(stub, refs: list[str], timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        listed = stub.ListLabelSets(gateway_pb2.ListLabelSetsRequest(), timeout=10)
        ready = {f"{s.name}@{s.version}" for s in listed.label_sets if s.ready}
        if set(refs) <= ready:
            return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(f"label sets {refs} not ready after {timeout_s} s")


def latency(stub, images: list[bytes], rounds: int) -> dict[str, object]:
    """Classify p50 at concurrency 1, 10 vs 5,000 labels, in alternating pairs (top_k 5)."""
    times: dict[str, list[float]] = {"size-10": [], "size-5000": []}
    for ref in times:  # warm
        for data in images[:5]:
            stub.Classify(gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data), label_set=ref, top_k=5),
                          timeout=30)
    for i in range(rounds):
        data = images[i % len(images)]
        order = list(times) if i % 2 == 0 else list(reversed(times))
        for ref in order:
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data), label_set=ref, top_k=5)
            start = time.perf_counter()
            stub.Classify(request, timeout=30)
            times[ref].append(time.perf_counter() - start)
    p50 = {ref: 1000 * statistics.median(t) for ref, t in times.items()}
    return {"rounds": rounds, "p50_ms": p50, "ratio_5000_over_10": p50["size-5000"] / p50["size-10"]}


def memory(gateway: Server, stub, directory: Path) -> dict[str, object]:
    """Gateway RSS before and after 50,000 labels are cached, as a label set and ad hoc."""
    pid = gateway.proc.pid
    before = rss_mib(pid)
    (directory / "size-50000.yaml").write_text(yaml.safe_dump(
        {"name": "size-50000", "version": 1, "labels": synthetic_labels(50_000)}))
    took = wait_ready(stub, ["size-50000@1"], 900)
    after_set = rss_mib(pid)
    texts = [f"ad hoc label {i}" for i in range(50_000)]
    start = time.monotonic()
    for i in range(0, len(texts), 256):
        stub.EmbedTexts(types_pb2.EmbedTextsRequest(texts=texts[i:i + 256]), timeout=60)
    adhoc_s = time.monotonic() - start
    after_adhoc = rss_mib(pid)
    return {
        "rss_mib_before": before, "rss_mib_with_50000_label_set": after_set,
        "rss_mib_with_50000_more_ad_hoc": after_adhoc,
        "set_encode_s": took, "ad_hoc_encode_s": adhoc_s,
    }


def accuracy(stub, per_class: int) -> dict[str, object]:
    """Held-out top-1 per variant, each image against the set of its modality, through the gateway."""
    images, labels = synthetic.generate(EVAL_SEED, per_class * synthetic.NUM_CLASSES)
    names = {"chest": "chest-findings", "derm": "skin-findings", "fundus": "fundus-findings"}
    variants = {"plain": "-plain", "templates": "-templates", "synonyms": "-synonyms", "templates+synonyms": ""}
    results: dict[str, dict[str, float]] = {}
    pngs = [png(image) for image in images]
    for variant, suffix in variants.items():
        correct: dict[str, list[bool]] = {m: [] for m in names}
        for data, label in zip(pngs, labels, strict=True):
            finding = synthetic.FINDINGS[int(label)]
            reply = stub.Classify(gateway_pb2.ClassifyRequest(
                image=types_pb2.Image(data=data), label_set=names[finding.modality] + suffix, top_k=1), timeout=60)
            correct[finding.modality].append(reply.top[0].code == f"demo:{finding.key}")
        every = [c for values in correct.values() for c in values]
        results[variant] = {m: 100 * float(np.mean(v)) for m, v in correct.items()} | {"all": 100 * float(np.mean(every))}
    return {"per_class": per_class, "images": len(labels), "top1_percent": results}


def search_costs(dims: Sequence[int], sizes: Sequence[int], queries: int = 50) -> list[dict[str, object]]:
    """One-query search time of an exact flat index vs HNSW, and HNSW's recall@5, in process, on
    one thread as the gateway runs them."""
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for dim in dims:
        for size in sizes:
            base = rng.normal(size=(size, dim)).astype(np.float32)
            base /= np.linalg.norm(base, axis=1, keepdims=True)
            query = base[rng.integers(size, size=queries)] + 0.1 * rng.normal(size=(queries, dim)).astype(np.float32)
            query /= np.linalg.norm(query, axis=1, keepdims=True)
            flat = faiss.IndexFlatIP(dim)
            flat.add(base)
            start = time.monotonic()
            hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.add(base)
            build_s = time.monotonic() - start
            hnsw.hnsw.efSearch = 64

            def timed(index):
                found, took = [], []
                for q in query:
                    t = time.perf_counter()
                    _, ids = index.search(q[None], 5)
                    took.append(time.perf_counter() - t)
                    found.append(ids[0])
                return 1000 * statistics.median(took), np.array(found)

            flat_ms, exact = timed(flat)
            hnsw_ms, approx = timed(hnsw)
            every = np.empty(size, dtype=np.float32)
            t = time.perf_counter()
            for q in query:  # the softmax normaliser needs every cosine (the gateway's kernel)
                faiss.fvec_inner_products_ny(faiss.swig_ptr(every), faiss.swig_ptr(q), flat.get_xb(), dim, size)
            gemv_ms = 1000 * (time.perf_counter() - t) / queries
            recall = float(np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact, strict=True)]))
            rows.append({"dim": dim, "labels": size, "flat_ms": flat_ms, "all_cosines_ms": gemv_ms,
                         "hnsw_ms": hnsw_ms, "hnsw_recall_at_5": recall, "hnsw_build_s": build_s})
            del base, flat, hnsw
    return rows


def save(out: Path, results: dict[str, object]) -> None:
    """results.json after every phase, so a run cut short keeps what it measured."""
    (out / "results.json").write_text(json.dumps(results, indent=2))


def report(results: dict[str, object]) -> str:
    lines = [f"CPU: {results['cpu']}; FAISS on 1 thread; bundle {results['bundle_id']}", ""]
    lat = results["latency"]
    lines += ["| Classify p50, concurrency 1, top_k 5 | ms |", "|---|---:|"]
    lines += [f"| {ref} labels | {ms:.2f} |" for ref, ms in lat["p50_ms"].items()]
    lines += [f"| ratio 5,000 / 10 | {lat['ratio_5000_over_10']:.2f}x |", ""]
    mem = results["memory"]
    lines += ["| gateway RSS | MiB |", "|---|---:|",
              f"| with the small sets | {mem['rss_mib_before']:.0f} |",
              f"| + a 50,000-label set | {mem['rss_mib_with_50000_label_set']:.0f} |",
              f"| + 50,000 ad hoc labels | {mem['rss_mib_with_50000_more_ad_hoc']:.0f} |"]
    if "restart" in results:
        restart = results["restart"]
        lines += [f"| restarted, text encoder stopped, {restart['sets_ready_at_serving']} of {restart['sets']} sets "
                  f"(50,000-label one included) from disk | {restart['rss_mib_with_every_set_from_disk']:.0f} |", "",
                  f"Restarted gateway: SERVING after {restart['serving_s']:.1f} s; Classify p50 with the "
                  f"50,000-label set {restart['classify_50000_p50_ms']:.1f} ms."]
    lines += [""]
    acc = results["accuracy"]
    lines += [f"Held-out top-1 ({acc['images']} images, seed {EVAL_SEED}), each image against its modality's set:", "",
              "| variant | chest | skin | fundus | all |", "|---|---:|---:|---:|---:|"]
    for variant, row in acc["top1_percent"].items():
        lines.append(f"| {variant} | {row['chest']:.1f} % | {row['derm']:.1f} % | {row['fundus']:.1f} % | "
                     f"**{row['all']:.1f} %** |")
    lines += ["", "| dim | labels | exact search ms | every cosine ms | HNSW ms | HNSW recall@5 | HNSW build s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["search"]:
        lines.append(f"| {row['dim']} | {row['labels']:,} | {row['flat_ms']:.3f} | {row['all_cosines_ms']:.3f} | "
                     f"{row['hnsw_ms']:.3f} | {row['hnsw_recall_at_5']:.2f} | {row['hnsw_build_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: newest bundles/demo-*)")
    parser.add_argument("--rounds", type=int, default=200, help="Classify pairs for the latency figure")
    parser.add_argument("--per-class", type=int, default=25, help="held-out images per class")
    parser.add_argument("--search-sizes", default="1000,10000,50000", help="label counts of the search table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "labelsets")
    args = parser.parse_args(argv)
    bundle = args.bundle or sorted((ROOT / "bundles").glob("demo-*/manifest.json"))[-1].parent
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medvlm-labelsets-"))
    sets = work / "labelsets"
    sets.mkdir()
    write_sets(sets)
    env = service_env(ROOT)
    ports = {name: free_port() for name in ("vision", "text", "gateway")}
    common = ["--host", HOST, "--no-metrics"]
    servers: list[Server] = []
    try:
        for name in ("vision", "text"):
            server = Server(name, [sys.executable, "-m", f"services.{name}", *common, "--port", str(ports[name]),
                                   "--bundle", str(bundle)], cwd=ROOT, env=env, log_dir=work)
            servers.append(server)
            server.wait_serving(f"{HOST}:{ports[name]}", 300)

        def start_gateway(name: str) -> Server:
            server = Server(name, [
                sys.executable, "-m", "services.gateway", *common, "--port", str(ports["gateway"]),
                "--vision-target", f"{HOST}:{ports['vision']}", "--text-target", f"{HOST}:{ports['text']}",
                "--label-sets-dir", str(sets), "--data-dir", str(work / "data"), "--label-sets-poll-s", "1",
                "--downstream-timeout-s", "60"], cwd=ROOT, env=env, log_dir=work)
            servers.append(server)
            server.wait_serving(f"{HOST}:{ports['gateway']}", 300)
            return server

        gateway = start_gateway("gateway")
        with grpc.insecure_channel(f"{HOST}:{ports['gateway']}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            info = stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=10).model
            refs = [f"{s.name}@{s.version}" for s in
                    stub.ListLabelSets(gateway_pb2.ListLabelSetsRequest(), timeout=10).label_sets]
            wait_ready(stub, refs, 900)
            images = [png(synthetic.sample(EVAL_SEED + 1, i).image) for i in range(14)]
            results: dict[str, object] = {"cpu": cpu_flags(), "faiss_threads_in_gateway": 1,
                                          "bundle_id": info.bundle_id}
            results["latency"] = latency(stub, images, args.rounds)
            save(args.out, results)
            results["accuracy"] = accuracy(stub, args.per_class)
            save(args.out, results)
            results["memory"] = memory(gateway, stub, sets)
            save(args.out, results)
        # a restart with the text encoder stopped: every set from disk, steady-state memory
        for server in (gateway, servers[1]):
            server.stop()
            servers.remove(server)
        start = time.monotonic()
        gateway = start_gateway("gateway-restarted")
        results["restart"] = {"serving_s": time.monotonic() - start, "text_encoder": "stopped"}
        with grpc.insecure_channel(f"{HOST}:{ports['gateway']}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            listed = stub.ListLabelSets(gateway_pb2.ListLabelSetsRequest(), timeout=10).label_sets
            results["restart"]["sets_ready_at_serving"] = sum(s.ready for s in listed)
            results["restart"]["sets"] = len(listed)
            results["restart"]["rss_mib_with_every_set_from_disk"] = rss_mib(gateway.proc.pid)
            latency_50000 = []
            for i in range(40):
                request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=images[i % len(images)]),
                                                      label_set="size-50000", top_k=5)
                t = time.perf_counter()
                stub.Classify(request, timeout=30)
                latency_50000.append(time.perf_counter() - t)
            results["restart"]["classify_50000_p50_ms"] = 1000 * statistics.median(latency_50000[5:])
            save(args.out, results)
        for server in servers:
            server.stop()
        servers = []
        sizes = [int(s) for s in args.search_sizes.split(",") if s]
        results["search"] = search_costs((info.embed_dim, 512), sizes)
    finally:
        for server in servers:
            server.stop()
    save(args.out, results)
    text = report(results)
    (args.out / "README.md").write_text(text + "\n")
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
