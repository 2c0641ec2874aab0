"""The classifier: a base encoder with a LoRA adapter and its classification head.

Plain torch and peft, no Prefect, so that training, serving and the benchmarks
share one implementation. This module builds, loads and saves adapters,
predicts, and grows the head for new labels; the rest of the classifier lives
beside it and is importable from here as well:

- :mod:`refit.checkpoints`: the base checkpoint (where it is, its weights'
  hash, ``base.json``) and reading weights from safetensors only;
- :mod:`refit.anatomy`: where a model's parts sit, read from the model, so
  BERT, DistilBERT, RoBERTa/XLM-R, DeBERTa-v2 and MPNet checkpoints all work;
- :mod:`refit.training`: fine-tuning, whole or above frozen layers.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from refit.anatomy import (ATTENTION_PAIRS, MAX_LENGTH, Anatomy, anatomy, batches_by_length,  # noqa: F401
                           check_classifier_checkpoint, encode, head_fn, max_length, num_layers, trained_copy,
                           transformers_model, upper_fn)
from refit.checkpoints import (BASE_FILE, PICKLE_SUFFIXES, BaseRef, base_model_hash, base_model_path,  # noqa: F401
                               base_of, base_ref_for, configured_base, is_pickled, load_tokenizer,
                               packaged_base_path, require_safetensors, resolve_base, weight_files, weights_sha256,
                               write_base)
from refit.errors import RefitError
from refit.training import (CACHE_BATCH, POLICY_DEPTH, STATE_PROBES, STATE_TOLERANCE, TrainStats,  # noqa: F401
                            frozen_for, train, train_upper)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
HEAD_FILE = "head.json"  # which saved tensors are the logits layer (a grown head adds rows there)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROTOTYPE_TEXTS = 64  # examples per new label averaged into its prototype (more add cost, not direction)
BACKGROUND_TEXTS = 512  # rows of known labels whose mean features are the champion's "average input"

_head_fn = head_fn  # noqa: F401  (refit.runtime.encoder_states reads it under this name)


def _quiet() -> None:
    """Silence load reports about the new head: expected, and noise in every log."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


# --- building, loading and saving --------------------------------------------------------------------------------

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
    (adapter_dir / LABELS_FILE).write_text(json.dumps(model_labels(model)))
    base = getattr(model, "refit_base", None) or configured_base()
    write_base(adapter_dir, BaseRef(**(asdict(base) | {"model_type": anatomy(model).model_type})))
    (adapter_dir / HEAD_FILE).write_text(json.dumps({"head_out": anatomy(model).head_out}))
    return adapter_dir


# --- answering ---------------------------------------------------------------------------------------------------

def model_labels(model) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


@torch.inference_mode()
def predict_proba(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Class probabilities, batched by length to keep padding low."""
    model.eval()
    input_ids = encode(model, tokenizer, texts)
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for batch in batches_by_length([len(x) for x in input_ids], batch_size, None):
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


def _logits_layer(model) -> torch.nn.Linear:
    """The linear layer that produces the logits (the active copy under peft's modules_to_save wrapper)."""
    module = transformers_model(model)
    for part in anatomy(model).head_out.split("."):
        module = trained_copy(getattr(trained_copy(module), part))
    if not isinstance(module, torch.nn.Linear):
        raise RefitError(f"the logits layer of {type(transformers_model(model)).__name__} is a {type(module).__name__}")
    return module


@torch.inference_mode()
def head_features(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) per text: what the logits layer reads (the pooled vector), and what it answers."""
    model.eval()
    layer = _logits_layer(model)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _module, args, _out: seen.append(args[0].detach()))
    input_ids = encode(model, tokenizer, texts)
    features = np.zeros((len(texts), layer.in_features), dtype=np.float32)
    logits = np.zeros((len(texts), layer.out_features), dtype=np.float32)
    try:
        for batch in batches_by_length([len(x) for x in input_ids], batch_size, None):
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
    input_ids = encode(model, tokenizer, texts)
    out = np.zeros((len(texts), transformers_model(model).config.hidden_size), dtype=np.float32)
    for batch in batches_by_length([len(x) for x in input_ids], batch_size, None):
        features = tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")
        hidden = model(**features, output_hidden_states=True).hidden_states[-1]
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[batch] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy()
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# --- a head for new labels ---------------------------------------------------------------------------------------

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
