"""The sentence encoder's forward pass, defined once, and the ONNX graph built from it: embeddings without torch.

``refit drift`` embeds every window's texts with the base all-MiniLM-L6-v2.
On torch that meant importing torch (1.2-1.9 s of a check on 2 busy cores)
for a forward pass ONNX Runtime does in less CPU. ``encode`` is the forward
pass (BERT, mean pooling, L2 normalisation) written once over a small set of
operations; three classes supply them: ``GraphOps`` writes them down as ONNX
nodes, ``NumpyOps`` computes them to check a new graph, and ``TorchOps``
computes them where no graph can be built. The graph is assembled once from
the model's safetensors weights with ``onnx.helper`` (no torch: about a
second, where tracing it with torch took 7 s), checked against the numpy pass
on probe batches, and kept under a name derived from the encoder's
fingerprint; later checks open the file with ONNX Runtime alone. The graph
takes ``input_ids`` and ``attention_mask`` (int64, dynamic batch and length)
and returns the finished embeddings: pooling and normalisation are in the
graph. A unit test holds it to the torch pass and that to transformers.
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


def encode(ops, config: dict, input_ids, attention_mask):
    """The sentence embedding: BERT's last hidden states, mean-pooled over the mask, then L2-normalised.

    The one definition of the encoder's forward pass, as transformers'
    ``BertModel`` (post-layer-norm, exact GELU) and sentence-transformers'
    pooling compute it. ``ops`` does the arithmetic: ``NumpyOps`` and
    ``TorchOps`` compute it, ``GraphOps`` writes it down as ONNX nodes, so the
    graph, the numpy pass that checks it and the torch fallback cannot drift
    apart.
    """
    kept = ops.mask(attention_mask)
    blocked = ops.blocked(kept)
    hidden = ops.norm(ops.embeddings(input_ids), "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        at = f"encoder.layer.{layer}"
        query, key, value = (ops.dense(hidden, f"{at}.attention.self.{part}") for part in ("query", "key", "value"))
        context = ops.attention(query, key, value, blocked)
        hidden = ops.norm(ops.add(ops.dense(context, f"{at}.attention.output.dense"), hidden),
                          f"{at}.attention.output.LayerNorm")
        inner = ops.gelu(ops.dense(hidden, f"{at}.intermediate.dense"))
        hidden = ops.norm(ops.add(ops.dense(inner, f"{at}.output.dense"), hidden), f"{at}.output.LayerNorm")
    return ops.mean_pooled(hidden, kept)


def numpy_encode(weights: dict, config: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``encode`` in numpy (float32): what ``build`` checks a new graph against, on a few probe batches."""
    return encode(NumpyOps(weights, config), config, input_ids, attention_mask).astype(np.float32)


def torch_encode(weights: dict, config: dict, input_ids, attention_mask):
    """``encode`` in torch, on torch tensors: the fallback where no graph can be built."""
    return encode(TorchOps(weights, config), config, input_ids, attention_mask)


def encoder_graph(weights: dict, config: dict):
    """The ONNX model of ``encode``: ``input_ids``, ``attention_mask`` (int64, batch x sequence) -> embeddings.

    ``weights`` are the safetensors arrays by their BertModel names
    (``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight``, ...).
    ONNX Runtime fuses the plain ops (layer norm, GELU, attention) when it opens the file.
    """
    from onnx import TensorProto, helper

    ops = GraphOps(weights, config)
    encode(ops, config, *INPUTS)  # adds the nodes; the last one writes OUTPUT
    graph = helper.make_graph(
        ops.nodes, "sentence_encoder",
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"]) for name in INPUTS],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", config["hidden_size"]])],
        ops.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="refit")


class NumpyOps:
    """``encode``'s arithmetic in numpy, float32 throughout."""

    def __init__(self, weights: dict, config: dict):
        self.w = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]

    def mask(self, attention_mask: np.ndarray) -> np.ndarray:
        return attention_mask.astype(np.float32)

    def blocked(self, kept: np.ndarray) -> np.ndarray:
        return ((1.0 - kept) * np.finfo(np.float32).min)[:, None, None, :]

    def embeddings(self, input_ids: np.ndarray) -> np.ndarray:
        w = self.w
        return (w["embeddings.word_embeddings.weight"][input_ids]
                + w["embeddings.position_embeddings.weight"][:input_ids.shape[1]]
                + w["embeddings.token_type_embeddings.weight"][0])

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(variance + self.eps) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def dense(self, x: np.ndarray, name: str) -> np.ndarray:
        # as 2-D BLAS products: numpy's stacked matmul on a transposed view took 13 s here
        flat = x.reshape(-1, x.shape[-1]) @ np.ascontiguousarray(self.w[f"{name}.weight"].T)
        return flat.reshape(*x.shape[:-1], -1) + self.w[f"{name}.bias"]

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x + y

    def attention(self, query: np.ndarray, key: np.ndarray, value: np.ndarray, blocked: np.ndarray) -> np.ndarray:
        batch, length, hidden_size = query.shape
        size = hidden_size // self.heads

        def split(x):
            return x.reshape(batch, length, self.heads, size).transpose(0, 2, 1, 3)

        scores = split(query) @ split(key).transpose(0, 1, 3, 2) / np.float32(size ** 0.5) + blocked
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores = scores / scores.sum(-1, keepdims=True)
        return (scores @ split(value)).transpose(0, 2, 1, 3).reshape(batch, length, hidden_size)

    def gelu(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import erf

        return x * (0.5 * (1.0 + erf(x / np.float32(2 ** 0.5))))

    def mean_pooled(self, hidden: np.ndarray, kept: np.ndarray) -> np.ndarray:
        pooled = (hidden * kept[:, :, None]).sum(1) / np.maximum(kept.sum(1, keepdims=True), 1.0)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class TorchOps:
    """``encode``'s arithmetic in torch (``torch.nn.functional``), on the weights' dtype."""

    def __init__(self, weights: dict, config: dict):
        self.w = weights
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]

    def mask(self, attention_mask):
        return attention_mask.to(self.w["embeddings.word_embeddings.weight"].dtype)

    def blocked(self, kept):
        import torch

        return (1.0 - kept[:, None, None, :]) * torch.finfo(kept.dtype).min

    def embeddings(self, input_ids):
        w = self.w
        return (w["embeddings.word_embeddings.weight"][input_ids]
                + w["embeddings.position_embeddings.weight"][:input_ids.shape[1]]
                + w["embeddings.token_type_embeddings.weight"][0])

    def norm(self, x, name: str):
        from torch.nn.functional import layer_norm

        return layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def dense(self, x, name: str):
        from torch.nn.functional import linear

        return linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def add(self, x, y):
        return x + y

    def attention(self, query, key, value, blocked):
        from torch.nn.functional import softmax

        batch, length, hidden_size = query.shape
        size = hidden_size // self.heads

        def split(x):
            return x.view(batch, length, self.heads, size).transpose(1, 2)

        scores = softmax(split(query) @ split(key).transpose(-1, -2) / size ** 0.5 + blocked, dim=-1)
        return (scores @ split(value)).transpose(1, 2).reshape(batch, length, hidden_size)

    def gelu(self, x):
        from torch.nn.functional import gelu

        return gelu(x)

    def mean_pooled(self, hidden, kept):
        from torch.nn.functional import normalize

        kept = kept.unsqueeze(-1)
        return normalize((hidden * kept).sum(1) / kept.sum(1).clamp(min=1), dim=-1)


class GraphOps:
    """``encode``'s arithmetic written down as ONNX nodes: each method adds nodes and returns its output's name.

    The weights become initializers under their own names (a dense layer's
    matrix transposed once, as ``<name>.weight.T``); the last node writes the
    graph's output, ``OUTPUT``.
    """

    def __init__(self, weights: dict, config: dict):
        self.weights, self.heads = weights, config["num_attention_heads"]
        self.hidden_size, self.eps = config["hidden_size"], float(config["layer_norm_eps"])
        self.nodes: list = []
        self.initializers: list = []
        self._names = itertools.count()
        size = self.hidden_size // self.heads
        self._split = self.const(np.array([0, 0, self.heads, size], np.int64))  # batch, sequence, heads, size
        self._merge = self.const(np.array([0, 0, self.hidden_size], np.int64))
        self._scale = self.const(np.float32(size ** 0.5))

    def const(self, array, name: str | None = None) -> str:
        from onnx import numpy_helper

        name = name or f"c{next(self._names)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, kind: str, *inputs: str, out: str | None = None, **attributes) -> str:
        from onnx import helper

        out = out or f"t{next(self._names)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attributes))
        return out

    def weight(self, name: str) -> str:
        return self.const(np.ascontiguousarray(self.weights[name], dtype=np.float32), name)

    def mask(self, attention_mask: str) -> str:
        from onnx import TensorProto

        return self.op("Cast", attention_mask, to=TensorProto.FLOAT)  # batch x sequence, 1.0 on real tokens

    def blocked(self, kept: str) -> str:
        blocked = self.op("Mul", self.op("Sub", self.const(np.float32(1.0)), kept),
                          self.const(np.float32(np.finfo(np.float32).min)))
        return self.op("Unsqueeze", blocked, self.const(np.array([1, 2], np.int64)))

    def embeddings(self, input_ids: str) -> str:
        length = self.op("Gather", self.op("Shape", input_ids), self.const(np.int64(1)), axis=0)
        positions = self.op("Range", self.const(np.int64(0)), length, self.const(np.int64(1)))
        words = self.op("Add", self.op("Gather", self.weight("embeddings.word_embeddings.weight"), input_ids, axis=0),
                        self.op("Gather", self.weight("embeddings.position_embeddings.weight"), positions, axis=0))
        token_type = np.asarray(self.weights["embeddings.token_type_embeddings.weight"][0], dtype=np.float32)
        return self.op("Add", words, self.const(token_type))

    def norm(self, x: str, name: str) -> str:
        return self.op("LayerNormalization", x, self.weight(f"{name}.weight"), self.weight(f"{name}.bias"),
                       axis=-1, epsilon=self.eps)

    def dense(self, x: str, name: str) -> str:
        transposed = self.const(np.ascontiguousarray(np.asarray(self.weights[f"{name}.weight"], dtype=np.float32).T),
                                f"{name}.weight.T")
        return self.op("Add", self.op("MatMul", x, transposed), self.weight(f"{name}.bias"))

    def add(self, x: str, y: str) -> str:
        return self.op("Add", x, y)

    def attention(self, query: str, key: str, value: str, blocked: str) -> str:
        def heads_of(x: str, perm: list[int]) -> str:
            return self.op("Transpose", self.op("Reshape", x, self._split), perm=perm)

        query, key, value = heads_of(query, [0, 2, 1, 3]), heads_of(key, [0, 2, 3, 1]), heads_of(value, [0, 2, 1, 3])
        scores = self.op("Div", self.op("MatMul", query, key), self._scale)
        scores = self.op("Softmax", self.op("Add", scores, blocked), axis=-1)
        context = self.op("Transpose", self.op("MatMul", scores, value), perm=[0, 2, 1, 3])
        return self.op("Reshape", context, self._merge)

    def gelu(self, x: str) -> str:
        erf = self.op("Erf", self.op("Div", x, self.const(np.float32(2 ** 0.5))))
        return self.op("Mul", self.op("Mul", x, self.op("Add", erf, self.const(np.float32(1.0)))),
                       self.const(np.float32(0.5)))

    def mean_pooled(self, hidden: str, kept: str) -> str:
        weights_of_tokens = self.op("Unsqueeze", kept, self.const(np.array([2], np.int64)))
        tokens_axis = self.const(np.array([1], np.int64))
        summed = self.op("ReduceSum", self.op("Mul", hidden, weights_of_tokens), tokens_axis, keepdims=0)
        counted = self.op("Max", self.op("ReduceSum", weights_of_tokens, tokens_axis, keepdims=0),
                          self.const(np.float32(1.0)))
        pooled = self.op("Div", summed, counted)
        squares = self.op("ReduceSum", self.op("Mul", pooled, pooled), self.const(np.array([-1], np.int64)), keepdims=1)
        length = self.op("Max", self.op("Sqrt", squares), self.const(np.float32(1e-12)))
        return self.op("Div", pooled, length, out=OUTPUT)
