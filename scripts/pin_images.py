"""Pin every image of k8s/components/images to the digest the registry holds for it.

    python3 scripts/pin_images.py image-digests.txt [--images k8s/components/images/kustomization.yaml]

Each line of the file is an image as `docker inspect --format '{{index .RepoDigests 0}}'` prints
it after the push, `registry.example.com/medvlm/medvlm-gateway@sha256:<64 hex digits>`. Every
image the kustomization names must get a digest (a release that runs some images by tag is not
pinned); the tags stay beside the digests for people, the digests decide what the kubelet pulls.
The committed kustomization keeps tags only: digests exist once the images are pushed
(docs/deploy.md, "Pinning the images").
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "k8s" / "components" / "images" / "kustomization.yaml"
PINNED = re.compile(r"(?P<repo>[\w.:/-]+)@(?P<digest>sha256:[0-9a-f]{64})")


def read_digests(text: str) -> dict[str, str]:
    """Repository -> digest, from `repo@sha256:...` lines (blank lines and # comments skipped)."""
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PINNED.fullmatch(line)
        if match is None:
            raise ValueError(f"line {number} is not REPOSITORY@sha256:<64 hex digits>: {line!r}")
        digests[match["repo"]] = match["digest"]
    return digests


def pin(kustomization: str, digests: dict[str, str]) -> str:
    """The kustomization with a `digest:` line (added or replaced) in every `images:` entry."""
    entries = re.split(r"(?m)^(?=  - name: )", kustomization)
    unpinned, used = [], set()
    for i, entry in enumerate(entries):
        name = re.search(r"^    newName: (\S+)$", entry, re.M)
        if not entry.startswith("  - name: ") or name is None:
            continue
        repo = name.group(1)
        if repo not in digests:
            unpinned.append(repo)
            continue
        used.add(repo)
        entry = re.sub(r"(?m)^    digest: .*\n", "", entry)
        entries[i] = re.sub(r"(?m)^(    newName: .*\n(?:    newTag: .*\n)?)", rf"\g<1>    digest: {digests[repo]}\n", entry,
                            count=1)
    if unpinned:
        raise ValueError(f"no digest for {', '.join(unpinned)}: every image must be pinned")
    if set(digests) - used:
        raise ValueError(f"digests for images the kustomization does not name: {', '.join(sorted(set(digests) - used))}")
    return "".join(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("digests", type=Path, help="file of REPOSITORY@sha256:... lines, one per image")
    parser.add_argument("--images", type=Path, default=IMAGES, help="the images kustomization to pin")
    args = parser.parse_args(argv)
    try:
        pinned = pin(args.images.read_text(), read_digests(args.digests.read_text()))
    except (OSError, ValueError) as exc:
        print(f"pin_images: {exc}", file=sys.stderr)
        return 1
    args.images.write_text(pinned)
    print(f"pin_images: pinned every image of {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
