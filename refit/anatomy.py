"""What a sequence classifier is made of, read from the model rather than assumed, and how texts go in.

What BERT code used to hard-wire (the ``.bert`` attribute, six layers,
``query``/``value`` targets, the pooler, 64 tokens) is read from the model
itself (:func:`anatomy`), so BERT, DistilBERT, RoBERTa/XLM-R, DeBERTa-v2 and
MPNet checkpoints all work. :func:`head_fn` and :func:`upper_fn` are the
parts above a layer as functions of its hidden states, for training on
cached states and for answering from kept ones. :func:`encode` and
:func:`batches_by_length` are how every pass cuts texts into token ids and
batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from refit.checkpoints import weight_files
from refit.errors import RefitError

# The longest input when neither the model nor its tokenizer says (see max_length); kept for callers.
MAX_LENGTH = 64
# A tokenizer's model_max_length above this is transformers' "no limit" sentinel, not a limit.
_NO_LIMIT = 1_000_000
# LoRA targets: the attention query and value projections, named per family (BERT, RoBERTa, XLM-R, ELECTRA;
# DistilBERT; DeBERTa-v2; MPNet; others that use q_proj/v_proj). The first pair found in a layer is used.
ATTENTION_PAIRS = (("query", "value"), ("q_lin", "v_lin"), ("query_proj", "value_proj"), ("q", "v"),
                   ("q_proj", "v_proj"))


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


def transformers_model(model) -> torch.nn.Module:
    """The transformers classifier itself: under a PeftModel, its base model."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def submodule(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def trained_copy(module):
    """A peft ModulesToSaveWrapper's trained copy, else the module itself."""
    copies = getattr(module, "modules_to_save", None)
    return copies["default"] if isinstance(copies, torch.nn.ModuleDict) and "default" in copies else module


def anatomy(model) -> Anatomy:
    """The parts of a transformers sequence classifier (or a PeftModel over one)."""
    inner = transformers_model(model)
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
    out = trained_copy(classifier)
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
    from transformers import AutoConfig
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


# --- the parts above a layer, as functions of its hidden states --------------------------------------------------

def head_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the classifier does to the last hidden states to get logits, by the head the model has.

    DistilBERT: pre-classifier, ReLU, dropout and classifier on position 0;
    BERT and DeBERTa-v2: pooler, dropout and classifier; RoBERTa, XLM-R and
    MPNet: their classification head module, which reads position 0 itself.
    ``train_upper`` checks it against the model's own logits before using it.
    """
    inner = transformers_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    dropout = getattr(inner, "dropout", None) or torch.nn.Identity()
    if getattr(inner, "pre_classifier", None) is not None:
        return lambda hidden: inner.classifier(dropout(torch.relu(inner.pre_classifier(hidden[:, 0]))))
    pooler = getattr(inner, "pooler", None) or getattr(backbone, "pooler", None)
    if pooler is not None:
        return lambda hidden: inner.classifier(dropout(pooler(hidden)))
    return lambda hidden: inner.classifier(hidden)


def upper_fn(model, first: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The encoder layers above the lowest ``first``: hidden states in, the last layer's hidden states out.

    Calls each layer as BERT, RoBERTa, XLM-R and DistilBERT layers are called
    (hidden states and a bidirectional mask). DeBERTa-v2 and MPNet layers
    also need relative positions; for them the check in ``train_upper``
    fails and training runs the whole model instead.
    """
    from transformers.masking_utils import create_bidirectional_mask

    parts = anatomy(model)
    inner = transformers_model(model)
    layers = submodule(inner, parts.layers)
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


# --- texts in ----------------------------------------------------------------------------------------------------

def encode(model, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids, cut to the longest input the model takes (:func:`max_length`)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length(model, tokenizer))["input_ids"]


def batches_by_length(lengths: Sequence[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
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
