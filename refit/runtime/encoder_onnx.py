"""A sentence encoder built once as an ONNX graph and run on ONNX Runtime: embeddings without importing torch.

``refit drift`` embeds every window's texts with the base all-MiniLM-L6-v2.
On torch that meant importing torch (1.2-1.9 s of a check on 2 busy cores)
for a forward pass ONNX Runtime does in less CPU. The graph is assembled
once from the model's safetensors weights with ``onnx.helper`` (no torch:
about a second, where tracing it with torch took 7 s), checked against a
numpy pass on probe batches, and kept under a name derived from the
encoder's fingerprint; later checks open the file with ONNX Runtime alone.
The graph takes ``input_ids`` and ``attention_mask`` (int64, dynamic batch and
length) and returns the finished embeddings: pooling and normalisation are in
the graph. A unit test holds it to the torch pass and that to transformers.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embeddings"
OPSET = 17
# Part of the file's name: a change to how the graph is made gives a new file rather than reusing an old one.
EXPORT_SCHEME = f"built from the weights by onnx.helper, opset {OPSET}, inputs {','.join(INPUTS)}, output {OUTPUT}"
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


def build(weights: dict, config: dict, path: Path, probes: Sequence[Sequence[Sequence[int]]], threads: int = 1):
    """Write the BERT encoder's graph from its weights to ``path``, once it agrees with ``numpy_encode`` on ``probes``.

    The graph is assembled op by op with ``onnx.helper`` (opset 17): the
    embeddings, each layer's attention and feed-forward block (post-layer-norm,
    exact GELU), mean pooling over the attention mask and L2 normalisation, as
    transformers' ``BertModel`` and sentence-transformers compute them. No
    torch is imported: building and checking it takes about a second where
    tracing it with torch took 7 s, most of a first ``refit drift``.

    The file is written beside ``path`` under a temporary name and moved into
    place only after every probe batch (token-id rows; batches of several
    sizes and lengths, so the dynamic axes are exercised) embeds within
    ``MAX_DIFF`` of ``numpy_encode``: a reader never sees a partial or wrong
    file, and two processes building at once each move a whole one.

    Returns:
        The ONNX Runtime session on the file (``open_session``) and the
        largest difference from ``numpy_encode`` on the probes.

    Raises:
        ValueError: the graph disagrees with numpy (nothing is kept).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = encoder_graph(weights, config)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(model.SerializeToString())
        session = open_session(Path(partial), threads)
        diff = 0.0
        for batch in probes:
            ids, mask = padded(batch)
            diff = max(diff, float(np.abs(run(session, ids, mask) - numpy_encode(weights, config, ids, mask)).max()))
        if not np.isfinite(diff) or diff > MAX_DIFF:
            raise ValueError(f"the ONNX graph differs from numpy by {diff:.2e} (limit {MAX_DIFF:.0e})")
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
    return session, diff


def encoder_graph(weights: dict, config: dict):
    """The ONNX model of ``numpy_encode``: ``input_ids``, ``attention_mask`` (int64, batch x sequence) -> embeddings.

    ``weights`` are the safetensors arrays by their BertModel names
    (``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight``, ...).
    ONNX Runtime fuses the plain ops (layer norm, GELU, attention) when it opens the file.
    """
    from onnx import TensorProto, helper, numpy_helper

    hidden_size, heads = config["hidden_size"], config["num_attention_heads"]
    eps, size = float(config["layer_norm_eps"]), hidden_size // heads
    nodes, initializers = [], []
    counter = itertools.count()

    def const(array, name=None) -> str:
        name = name or f"c{next(counter)}"
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(kind: str, *inputs: str, **attributes) -> str:
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(kind, list(inputs), [out], **attributes))
        return out

    def weight(name: str) -> str:
        return const(np.ascontiguousarray(weights[name], dtype=np.float32), name)

    def norm(x: str, name: str) -> str:
        return op("LayerNormalization", x, weight(f"{name}.weight"), weight(f"{name}.bias"), axis=-1, epsilon=eps)

    def dense(x: str, name: str) -> str:
        transposed = const(np.ascontiguousarray(np.asarray(weights[f"{name}.weight"], dtype=np.float32).T),
                           f"{name}.weight.T")
        return op("Add", op("MatMul", x, transposed), weight(f"{name}.bias"))

    ids, mask = INPUTS
    length = op("Gather", op("Shape", ids), const(np.int64(1)), axis=0)
    positions = op("Range", const(np.int64(0)), length, const(np.int64(1)))
    hidden = op("Add", op("Gather", weight("embeddings.word_embeddings.weight"), ids, axis=0),
                op("Gather", weight("embeddings.position_embeddings.weight"), positions, axis=0))
    hidden = norm(op("Add", hidden, const(np.asarray(weights["embeddings.token_type_embeddings.weight"][0],
                                                           dtype=np.float32))), "embeddings.LayerNorm")
    kept = op("Cast", mask, to=TensorProto.FLOAT)  # batch x sequence, 1.0 on real tokens
    blocked = op("Unsqueeze", op("Mul", op("Sub", const(np.float32(1.0)), kept),
                                 const(np.float32(np.finfo(np.float32).min))), const(np.array([1, 2], np.int64)))
    split = const(np.array([0, 0, heads, size], np.int64))
    merge = const(np.array([0, 0, hidden_size], np.int64))
    scale = const(np.float32(size ** 0.5))
    for layer in range(config["num_hidden_layers"]):
        at = f"encoder.layer.{layer}"

        def heads_of(part: str, perm: list[int]) -> str:
            return op("Transpose", op("Reshape", dense(hidden, f"{at}.attention.self.{part}"), split), perm=perm)

        query, key, value = (heads_of("query", [0, 2, 1, 3]), heads_of("key", [0, 2, 3, 1]),
                             heads_of("value", [0, 2, 1, 3]))
        scores = op("Softmax", op("Add", op("Div", op("MatMul", query, key), scale), blocked), axis=-1)
        context = op("Reshape", op("Transpose", op("MatMul", scores, value), perm=[0, 2, 1, 3]), merge)
        hidden = norm(op("Add", dense(context, f"{at}.attention.output.dense"), hidden),
                      f"{at}.attention.output.LayerNorm")
        inner = dense(hidden, f"{at}.intermediate.dense")
        inner = op("Mul", op("Mul", inner, op("Add", op("Erf", op("Div", inner, const(np.float32(2 ** 0.5)))),
                                               const(np.float32(1.0)))), const(np.float32(0.5)))
        hidden = norm(op("Add", dense(inner, f"{at}.output.dense"), hidden), f"{at}.output.LayerNorm")
    weights_of_tokens = op("Unsqueeze", kept, const(np.array([2], np.int64)))
    summed = op("ReduceSum", op("Mul", hidden, weights_of_tokens), const(np.array([1], np.int64)), keepdims=0)
    counted = op("Max", op("ReduceSum", weights_of_tokens, const(np.array([1], np.int64)), keepdims=0),
                 const(np.float32(1.0)))
    pooled = op("Div", summed, counted)
    length_of = op("Max", op("Sqrt", op("ReduceSum", op("Mul", pooled, pooled), const(np.array([-1], np.int64)),
                                        keepdims=1)), const(np.float32(1e-12)))
    nodes.append(helper.make_node("Div", [pooled, length_of], [OUTPUT]))
    graph = helper.make_graph(
        nodes, "sentence_encoder",
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"]) for name in INPUTS],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", hidden_size])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="refit")


def numpy_encode(weights: dict, config: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The same embedding in numpy (float32): what ``build`` checks a new graph against, on a few probe batches."""
    from scipy.special import erf

    hidden_size, heads = config["hidden_size"], config["num_attention_heads"]
    eps, size = config["layer_norm_eps"], hidden_size // heads
    batch, length = input_ids.shape
    w = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}

    def norm(x, name):
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(variance + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def dense(x, name):  # as 2-D BLAS products: numpy's stacked matmul on a transposed view took 13 s here
        flat = x.reshape(-1, x.shape[-1]) @ np.ascontiguousarray(w[f"{name}.weight"].T)
        return flat.reshape(*x.shape[:-1], -1) + w[f"{name}.bias"]

    def softmax(x):
        x = np.exp(x - x.max(-1, keepdims=True))
        return x / x.sum(-1, keepdims=True)

    hidden = (w["embeddings.word_embeddings.weight"][input_ids] + w["embeddings.position_embeddings.weight"][:length]
              + w["embeddings.token_type_embeddings.weight"][0])
    hidden = norm(hidden, "embeddings.LayerNorm")
    kept = attention_mask.astype(np.float32)
    blocked = ((1.0 - kept) * np.finfo(np.float32).min)[:, None, None, :]
    for layer in range(config["num_hidden_layers"]):
        at = f"encoder.layer.{layer}"

        def split(x):
            return x.reshape(batch, length, heads, size).transpose(0, 2, 1, 3)

        query, key, value = (split(dense(hidden, f"{at}.attention.self.{part}")) for part in ("query", "key", "value"))
        scores = softmax(query @ key.transpose(0, 1, 3, 2) / np.float32(size ** 0.5) + blocked)
        context = (scores @ value).transpose(0, 2, 1, 3).reshape(batch, length, hidden_size)
        hidden = norm(dense(context, f"{at}.attention.output.dense") + hidden, f"{at}.attention.output.LayerNorm")
        inner = dense(hidden, f"{at}.intermediate.dense")
        inner = inner * (0.5 * (1.0 + erf(inner / np.float32(2 ** 0.5))))
        hidden = norm(dense(inner, f"{at}.output.dense") + hidden, f"{at}.output.LayerNorm")
    pooled = (hidden * kept[:, :, None]).sum(1) / np.maximum(kept.sum(1, keepdims=True), 1.0)
    return (pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
