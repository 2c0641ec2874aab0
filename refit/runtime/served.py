"""A registered version made ready to serve: adapter merged into the base, batched prediction.

Merging the LoRA weights into the base (peft ``merge_and_unload``) leaves a
plain transformers model: one matmul per layer instead of two, and no peft
wrappers on the hot path. Prediction sorts texts by length and pads each
batch only to its own longest text.

The forward pass runs on ONNX Runtime by default (``REFIT_SERVE_RUNTIME=onnx``):
the merged model is exported once per load and checked against torch on
probe texts before it answers anything; a version whose export disagrees is
served by torch instead. The export is the same fp32 model (probabilities
within 1e-6 of torch on the probes here), and one ``session.run`` call is the
whole pass, so Python's lock is free for HTTP while it runs; torch's eager
forward takes the lock back between operations, which on two cores held the
server to one core's worth of work.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refit import modeling
from refit.errors import RefitError
from refit.processes import side_by_side

log = logging.getLogger("refit.serving")
RUNTIMES = ("onnx", "torch")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("logits", "states")
# The most an exported model's probabilities may differ from torch's on the probe texts.
MAX_PROBABILITY_DIFF = 1e-4
MAX_PADDING = 0.05  # a bulk batch's padding, as a share of its texts' own tokens (``ServedModel._batches``)


@dataclass(frozen=True)
class ServedModel:
    """One version, merged and in eval mode. Immutable: a swap replaces the whole object."""

    version: int
    model: torch.nn.Module
    tokenizer: object
    labels: tuple[str, ...]
    batch_size: int = 32
    session: object | None = None  # an onnxruntime.InferenceSession: the pass runs there when set

    @property
    def runtime(self) -> str:
        return "onnx" if self.session is not None else "torch"

    def predict(self, texts: Sequence[str], workers: int = 1) -> tuple[list[str], np.ndarray]:
        """Label and its probability for each text, in the order given (``workers``: see ``probabilities_of``)."""
        labels: list[str] = [""] * len(texts)
        confidence = np.zeros(len(texts), dtype=np.float32)
        proba = self.probabilities_of(texts, workers)
        for i, row in enumerate(proba):
            best = int(row.argmax())
            labels[i], confidence[i] = self.labels[best], float(row[best])
        return labels, confidence

    def probabilities_of(self, texts: Sequence[str], workers: int = 1) -> np.ndarray:
        """Probabilities for any number of texts (in the order given), in batches of similar length.

        With ``workers`` > 1 and ONNX Runtime, that many batches run at once
        on the one session (its ``run`` is thread-safe and leaves Python's
        lock; each keeps its one intra-op thread). Every batch is tokenised
        first, in this thread: a fast tokenizer shared across threads can
        fail with "Already borrowed" (transformers#47085). For bulk scoring
        that measures nothing: cost and latency are metered with one worker.
        """
        return self._bulk(texts, workers, self._softmax_of)

    def probabilities_and_states(self, texts: Sequence[str], workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``probabilities_of`` and, from the same pass, each text's last-layer state at the first position.

        The states are what an update that trains the head alone starts from
        (``refit.runtime.encoder_states``): a pass the cascade build makes anyway
        leaves them for the next update, which then skips these texts'
        forward pass.
        """
        out = self._bulk(texts, workers, self._softmax_and_states_of)
        return out[:, : len(self.labels)], out[:, len(self.labels) :]

    def _bulk(self, texts: Sequence[str], workers: int, per_batch) -> np.ndarray:
        batches = self._batches(texts)
        features = [self._features([texts[i] for i in batch]) for batch in batches]
        results = side_by_side(per_batch, features, workers if self.session is not None else 1)
        width = results[0].shape[1] if results else len(self.labels)
        out = np.zeros((len(texts), width), dtype=np.float32)
        for batch, rows in zip(batches, results):
            out[batch] = rows
        return out

    def _batches(self, texts: Sequence[str]) -> list[list[int]]:
        """Text positions in batches of similar token length, each padded by at most ``MAX_PADDING``.

        At most ``batch_size`` texts a batch. A padded token costs as much of
        the encoder's pass as a real one: batches of 32 sorted by characters
        cost 22% more CPU per text on the default demo's judged texts
        (docs/benchmarks.md).
        """
        if not texts:
            return []
        pieces = self.tokenizer(list(texts), truncation=True, max_length=modeling.MAX_LENGTH)["input_ids"]
        lengths = [len(p) for p in pieces]
        batches: list[list[int]] = []
        tokens = 0
        for i in sorted(range(len(texts)), key=lambda i: lengths[i]):
            batch = batches[-1] if batches else []
            if not batch or len(batch) >= self.batch_size or \
                    (len(batch) + 1) * lengths[i] > (1 + MAX_PADDING) * (tokens + lengths[i]):
                batch, tokens = [], 0
                batches.append(batch)
            batch.append(i)
            tokens += lengths[i]
        return batches

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Softmax over the labels for one batch, padded to its longest text."""
        return self._softmax_of(self._features(texts))

    def _features(self, texts: Sequence[str]) -> dict:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=modeling.MAX_LENGTH,
                              return_tensors="np")

    def _softmax_of(self, features: dict) -> np.ndarray:
        return _softmax(self._run(features, OUTPUTS[:1])[0])

    def _softmax_and_states_of(self, features: dict) -> np.ndarray:
        logits, states = self._run(features, OUTPUTS)
        return np.concatenate([_softmax(logits), states], axis=1)

    def _run(self, features: dict, outputs: Sequence[str]) -> list[np.ndarray]:
        if self.session is None:
            with torch.inference_mode():
                out = self.model(**{k: torch.from_numpy(v) for k, v in features.items()},
                                 output_hidden_states="states" in outputs)
            return [out.logits.numpy(), *([_states(out).numpy()] if "states" in outputs else [])]
        return self.session.run(list(outputs), {i.name: features[i.name].astype(np.int64)
                                                for i in self.session.get_inputs()})


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def merged(adapter_dir: Path) -> torch.nn.Module:
    """The adapter folded into the base weights: a plain transformers classifier (safetensors only)."""
    model = modeling.load_model(modeling.require_safetensors(adapter_dir)).merge_and_unload()
    model.eval()
    return model


def _states(out) -> torch.Tensor:
    """The last encoder layer's output at the first position: what every supported head reads (``encoder_states``)."""
    return out.hidden_states[-1][:, 0]


class _Outputs(torch.nn.Module):
    """The classifier with positional inputs, returning its logits and its last layer's first-position states.

    What the exporter traces. Serving asks the session for ``logits`` only;
    bulk passes over the replay pool also take ``states`` (see
    ``refit.runtime.encoder_states``): the same pass, one more output.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)), output_hidden_states=True)
        return out.logits, _states(out)


def onnx_session(model: torch.nn.Module, tokenizer, threads: int):
    """Export the merged model (fp32, dynamic batch and length) and open an ONNX Runtime session on it."""
    import onnxruntime as ort

    dummy = tokenizer(["a short text", "and a somewhat longer one, so that the batch is padded"], padding=True,
                      return_tensors="pt")
    names = [name for name in INPUTS if name in dummy]
    # eval(): the exporter puts the wrapper's training flag back afterwards, and a new module is in training mode.
    wrapper = _Outputs(model, names).eval()
    with tempfile.TemporaryDirectory(prefix="refit-onnx-") as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        path = str(Path(directory) / "model.onnx")
        torch.onnx.export(wrapper, tuple(dummy[name] for name in names), path, input_names=names,
                          output_names=list(OUTPUTS), opset_version=17, do_constant_folding=True, dynamo=False,
                          dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names},
                                        **{name: {0: "batch"} for name in OUTPUTS}})
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: spinning takes the core the event loop needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def probe_batches(labels: Sequence[str], batch_size: int) -> list[list[str]]:
    """The batches an export is checked on, from the model's own label names: no data needed at load time.

    A text alone, a full batch of short texts, and a batch that pads short
    texts to the longest (label names run together 3, 12 and 40 at a time,
    the longest first so that any batch size keeps it): the shapes a trace
    can get wrong, on about a fifth of the texts of every label at every
    length.
    """
    words = [label.replace("_", " ") for label in labels]
    runs = {n: [" ".join(words[i : i + n]) for i in range(0, len(words), n)] for n in (3, 12, 40)}
    padded = runs[40][:1] + runs[3][:8] + runs[12][:4] + runs[40][1:2]
    return [words[:1], words[:batch_size], padded[: max(2, batch_size)]]


def check_vocabulary(model: torch.nn.Module, tokenizer, version: int) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embeddings: it belongs to another base.

    Every id past the embedding table fails inside the forward pass; ids that
    happen to fit give confident, wrong answers. Both come from pairing a
    version with a tokenizer other than its own base's.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise RefitError(f"v{version}: its tokenizer has {len(tokenizer)} ids but the model embeds {rows}; "
                         "the tokenizer is not the one of this version's base")


def from_adapter(adapter_dir: Path, version: int, batch_size: int = 32, tokenizer=None, runtime: str = "onnx",
                 threads: int = 1) -> ServedModel:
    """Merge, and for ``runtime="onnx"`` export and check against torch; torch serves if the check fails.

    ``tokenizer`` defaults to the one of the adapter's own base (an adopted
    model of another family brings its own vocabulary).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    model = merged(adapter_dir)
    tokenizer = tokenizer or modeling.load_tokenizer(adapter_dir)
    check_vocabulary(model, tokenizer, version)
    served = ServedModel(version, model, tokenizer, tuple(modeling.model_labels(model)), batch_size)
    if runtime == "torch":
        return served
    try:
        exported = ServedModel(version, model, tokenizer, served.labels, batch_size,
                               onnx_session(model, tokenizer, threads))
        diff = max(float(np.abs(exported.probabilities(batch) - served.probabilities(batch)).max())
                   for batch in probe_batches(served.labels, batch_size))
    except Exception as exc:  # any export or runtime failure (a shape the trace fixed, say): torch, and say why
        log.warning("v%d: ONNX export failed (%s: %s); serving with torch", version, type(exc).__name__, exc)
        return served
    if not np.isfinite(diff) or diff > MAX_PROBABILITY_DIFF:
        log.warning("v%d: the ONNX export differs from torch by %.2e in probability (limit %.0e); serving with torch",
                    version, diff, MAX_PROBABILITY_DIFF)
        return served
    log.info("v%d: serving on ONNX Runtime (%d threads); largest probability difference from torch %.1e",
             version, threads, diff)
    return exported
