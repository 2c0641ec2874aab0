"""A sentence encoder exported once to ONNX and run on ONNX Runtime: embeddings without importing torch.

``refit drift`` embeds every window's texts with the base all-MiniLM-L6-v2.
On torch that meant importing torch (1.2-1.9 s of a check on 2 busy cores)
for a forward pass ONNX Runtime does in less CPU. The export is made once
(that needs torch), checked against the torch pass on probe batches, and
kept under a name derived from the encoder's fingerprint; later checks open
the file with ONNX Runtime alone. The graph takes ``input_ids`` and
``attention_mask`` (int64, dynamic batch and length) and returns the finished
embeddings: pooling and normalisation are in the graph, traced from the same
torch code that computes them eagerly.

Nothing here imports torch at module level: ``export`` imports it when called.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embeddings"
OPSET = 17
# Part of the file's name: a change to how the graph is made gives a new file rather than reusing an old one.
EXPORT_SCHEME = f"torchscript trace, opset {OPSET}, inputs {','.join(INPUTS)}, output {OUTPUT}"
# The most an exported embedding may differ from torch's (unit vectors; 2.4e-7 measured on CLINC150 texts).
MAX_DIFF = 1e-5


def encoder_file(cache_dir: Path, fingerprint: str) -> Path:
    """Where the export of the encoder with this fingerprint is kept."""
    key = hashlib.sha256(f"{fingerprint}; {EXPORT_SCHEME}".encode()).hexdigest()
    return Path(cache_dir) / f"{key}.onnx"


def open_session(path: Path, threads: int = 1):
    """An ONNX Runtime session on ``path``: ``threads`` intra-op threads, one inter-op, no spinning.

    Idle threads sleep instead of spinning for a core: on a busy machine a
    spinning thread takes CPU time the other processes need.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def padded(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded with 0 to the longest row, and the attention mask (1 on real tokens)."""
    longest = max(len(row) for row in rows)
    ids = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def run(session, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Embeddings of one padded batch."""
    return session.run([OUTPUT], {INPUTS[0]: ids, INPUTS[1]: mask})[0]


def export(encode: Callable, path: Path, probes: Sequence[Sequence[Sequence[int]]], threads: int = 1) -> float:
    """Trace ``encode(input_ids, attention_mask)`` to ONNX at ``path``, once it agrees with torch on ``probes``.

    The file is written beside ``path`` under a temporary name and moved into
    place only after every probe batch (token-id rows; batches of several
    sizes and lengths, so the dynamic axes are exercised) embeds within
    ``MAX_DIFF`` of ``encode`` itself: a reader never sees a partial or
    wrong export, and two processes exporting at once each move a whole file.

    Returns:
        The largest difference from torch on the probes.

    Raises:
        ValueError: the export disagrees with torch (nothing is kept).
    """
    import torch

    class Traced(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return encode(input_ids, attention_mask)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = tuple(torch.from_numpy(a) for a in padded([[101, 2054, 102], [101, 2054, 2003, 2026, 102]]))
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(Traced().eval(), dummy, partial, input_names=list(INPUTS), output_names=[OUTPUT],
                              opset_version=OPSET, do_constant_folding=True, dynamo=False,
                              dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in INPUTS},
                                            OUTPUT: {0: "batch"}})
        session = open_session(Path(partial), threads)
        diff = 0.0
        with torch.no_grad():
            for batch in probes:
                ids, mask = padded(batch)
                expected = encode(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
                diff = max(diff, float(np.abs(run(session, ids, mask) - expected).max()))
        if not np.isfinite(diff) or diff > MAX_DIFF:
            raise ValueError(f"the ONNX export differs from torch by {diff:.2e} (limit {MAX_DIFF:.0e})")
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
    return diff
