"""Export the two towers of an open_clip model to single-file ONNX graphs with dynamic batch/sequence axes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx
import torch

from engines.runtime.manifest import TEXT_INPUT, TEXT_OUTPUT, VISION_INPUT, VISION_OUTPUT

log = logging.getLogger(__name__)

OPSET = 18
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
EXPORTER = "torch.onnx dynamo"


class VisionTower(torch.nn.Module):
    """images [N, 3, H, W] float32 (normalized) -> image_embeds [N, D] float32, not L2-normalized."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=False)  # [N, D]


class TextTower(torch.nn.Module):
    """input_ids [N, L] int64 (padded with the pad id) -> text_embeds [N, D] float32, not L2-normalized.

    open_clip's HF text tower derives the attention mask from the pad id, so the
    graph needs no mask input and trailing padding may be trimmed by the caller.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=False)  # [N, D]


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    dynamic: dict[int, object],
    names: tuple[str, str],
    path: Path,
) -> None:
    """Export `module(example)` to a single ONNX file (no external data) and log the time it took."""
    start = time.perf_counter()
    input_name, output_name = names
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes={input_name: dynamic},
            external_data=False,
            # The onnxscript optimizer constant-folds timm's antialiased bicubic pos-embed resize
            # differently from torch (max abs diff 0.06 on test_vit); ONNX Runtime folds it correctly.
            optimize=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    _drop_stack_traces(path)
    seconds, megabytes = time.perf_counter() - start, path.stat().st_size / 1e6
    log.info("exported %s in %.1f s (%.1f MB)", path.name, seconds, megabytes)


def _drop_stack_traces(path: Path) -> None:
    """Remove the Python stack trace the exporter records on every node: it names files of the
    build's checkout and environment, so the same weights built in another folder would give
    other bytes, hence another bundle id, and the engine file would carry the build machine's
    paths. The other node metadata (module names and scopes) stays."""
    model = onnx.load(str(path))
    for node in _nodes([model.graph.node, *(f.node for f in model.functions)]):
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def _nodes(node_lists):
    """Every node of these node lists and of the subgraphs inside them (If, Loop, Scan)."""
    for nodes in node_lists:
        for node in nodes:
            yield node
            for attribute in node.attribute:
                yield from _nodes([g.node for g in (attribute.g, *attribute.graphs) if g.node])


def export_vision(model: torch.nn.Module, path: Path, *, image_size: int) -> None:
    """Export the image tower: `images` float32 [N, 3, image_size, image_size] -> `image_embeds` [N, D]."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    # Batch 2, not 1, so that the exporter does not specialise the axis to a constant.
    example = torch.zeros(2, 3, image_size, image_size)  # [2, 3, H, W]
    _export(VisionTower(model).eval(), example, {0: batch}, (VISION_INPUT, VISION_OUTPUT), path)


def export_text(model: torch.nn.Module, path: Path, *, context_length: int, pad_id: int) -> None:
    """Export the text tower: `input_ids` int64 [N, L], 1 <= L <= context_length -> `text_embeds` [N, D]."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=context_length)
    example = torch.full((2, context_length), pad_id, dtype=torch.int64)  # [2, L]
    example[:, : min(4, context_length)] = pad_id + 1  # a few real tokens so the mask is not all padding
    _export(TextTower(model).eval(), example, {0: batch, 1: seq}, (TEXT_INPUT, TEXT_OUTPUT), path)
