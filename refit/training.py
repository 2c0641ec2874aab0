"""Fine-tuning the classifier: the whole model (:func:`train`), or only what sits above its frozen layers.

:func:`train_upper` is what updates use: the frozen part's output is computed
once without gradients and cached, replay rows are pulled toward the starting
model's answers (distillation), and encoder states kept from serving can
stand in for the pass where every layer is frozen. Plain torch and peft, no
Prefect: the update stage, the benchmarks and the tests call the same code.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from peft import PeftModel

from refit.anatomy import (MAX_LENGTH, anatomy, batches_by_length, encode, head_fn, submodule, transformers_model,
                           upper_fn)
from refit.stopping import stop_if_requested, watch_sigterm

# One logger name for the classifier, whichever of its modules speaks: operators and tests filter on it.
log = logging.getLogger("refit.modeling")

CACHE_BATCH = 128  # rows per forward pass when caching a frozen encoder's output
STATE_PROBES = 8  # kept encoder states checked against this pass before any is used
STATE_TOLERANCE = 1e-5  # relative to the largest state: ONNX Runtime on merged weights against torch on LoRA
# The update policy counts frozen layers out of this depth (the packaged base's six); other depths are scaled.
POLICY_DEPTH = 6


@dataclass(frozen=True)
class TrainStats:
    examples_seen: int
    tokens_seen: int
    steps: int
    final_loss: float
    reused_states: int = 0  # rows whose kept encoder states stood in for the forward pass
    # With every layer frozen: the states the pass computed (row -> last layer's first-position state), to keep.
    computed_states: dict[int, np.ndarray] = field(default_factory=dict)


def _optimizer(model: PeftModel, learning_rate: float, total_steps: int):
    """AdamW over the trainable parameters, with a learning rate that decays linearly to zero over ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda step: max(0.0, 1.0 - step / max(1, total_steps)))
    return optimizer, scheduler


def _step(loss: torch.Tensor, optimizer, scheduler) -> None:
    stop_if_requested()  # a SIGTERM whose own exception was lost stops the run here, within one step
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


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
    watch_sigterm()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    input_ids = encode(model, tokenizer, texts)
    lengths = [len(ids) for ids in input_ids]
    labels = torch.tensor(list(label_ids), dtype=torch.long)
    total = math.ceil(len(texts) / batch_size) * epochs
    optimizer, scheduler = _optimizer(model, learning_rate, total)
    model.train()
    step, tokens, loss_value = 0, 0, float("nan")
    for _ in range(epochs):
        for batch in batches_by_length(lengths, batch_size, rng):
            features = tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")
            out = model(**features, labels=labels[batch])
            _step(out.loss, optimizer, scheduler)
            step += 1
            tokens += int(features["attention_mask"].sum())
            loss_value = float(out.loss.detach())
            if on_step is not None:
                on_step(step, total, loss_value)
    model.eval()
    return TrainStats(len(texts) * epochs, tokens, step, loss_value)


# --- training above frozen layers --------------------------------------------------------------------------------

def frozen_for(frozen_layers: int, layers: int, depth: int = POLICY_DEPTH) -> int:
    """The policy's frozen layers (counted out of ``depth``) for a model with ``layers`` layers.

    The update policy is written for the packaged six-layer base: 6 of 6
    frozen trains the head alone, 4 of 6 the top third. A 12-layer model
    keeps those shares (12 and 8 frozen); a 2-layer one 2 and 1.
    """
    if not 0 <= frozen_layers <= depth:
        raise ValueError(f"frozen_layers must be within 0..{depth}, not {frozen_layers}")
    return layers if frozen_layers == depth else min(layers, round(frozen_layers * layers / depth))


def _freeze_lower_layers(model: PeftModel, frozen_layers: int, depth: int) -> tuple[int, int]:
    """Leave the LoRA weights of the lowest layers out of training; returns (frozen layers, layers)."""
    layers = submodule(transformers_model(model), anatomy(model).layers)
    frozen = frozen_for(frozen_layers, len(layers), depth)
    for index, layer in enumerate(layers):
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.requires_grad = index >= frozen
    return frozen, len(layers)


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


class CachedBatch(NamedTuple):
    """One training batch: its rows and what a pass without gradients gave for them."""

    rows: list[int]
    hidden: torch.Tensor | None  # the frozen part's output; None: each step runs the whole model
    mask: torch.Tensor
    teacher: torch.Tensor  # the starting model's logits: the soft targets of distillation
    input_ids: torch.Tensor | None  # for the whole model's pass; None where kept states stand in


@dataclass
class _FrozenPass:
    """Runs the frozen lowest layers once, without gradients, and counts the tokens it read.

    ``replays`` is filled by each run from its first forward batch: why the
    cached output cannot be run through the layers above and the head to give
    the model's own logits (None when it can).
    """

    model: PeftModel
    tokenizer: Any
    input_ids: list[list[int]]
    lengths: list[int]
    frozen: int
    all_frozen: bool
    upper: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    probes: set[int]
    tokens: int = 0
    keep_states: bool = False  # with every layer frozen: copy each row's state into ``states``
    states: dict[int, torch.Tensor] = field(default_factory=dict)

    def run(self, rows: list[int]) -> tuple[list[CachedBatch], str | None, dict[int, torch.Tensor]]:
        """The frozen part's output and the starting model's logits for ``rows``, in training batches.

        Returns the batches, why the cache cannot be replayed (None if it can)
        and the computed states of the probe rows among ``rows``.
        """
        cached, why_not, seen = [], None, {}
        with torch.no_grad():  # not inference_mode: the cached tensors feed autograd later
            # Large forward batches (cheaper per row), cut into training batches of similar lengths.
            for number, local in enumerate(batches_by_length([self.lengths[i] for i in rows],
                                                             max(self.batch_size, CACHE_BATCH), None)):
                big = [rows[j] for j in local]
                features = self.tokenizer.pad({"input_ids": [self.input_ids[i] for i in big]}, return_tensors="pt")
                out = self.model(**features, output_hidden_states=True)
                hidden = out.hidden_states[self.frozen]
                if self.all_frozen:
                    hidden = hidden[:, :1]  # every supported head reads position 0 only (checked below)
                if number == 0:
                    last = out.hidden_states[-1][:, : hidden.shape[1]]
                    why_not = _replay_fails(self.upper, self.head, hidden, features["attention_mask"], last,
                                            out.logits)
                self.tokens += int(features["attention_mask"].sum())
                seen |= {row: hidden[j, 0] for j, row in enumerate(big) if row in self.probes}
                if self.all_frozen and self.keep_states:  # copies: a view would hold the whole batch's output
                    self.states |= dict(zip(big, hidden[:, 0].clone().unbind()))
                for s in range(0, len(big), self.batch_size):
                    part = slice(s, s + self.batch_size)
                    cached.append(CachedBatch(big[part], None if why_not else hidden[part].clone(),
                                              features["attention_mask"][part], out.logits[part].clone(),
                                              features["input_ids"][part]))
        return cached, why_not, seen


def _reusable_states(known: Sequence[np.ndarray | None] | None, lengths: list[int],
                     all_frozen: bool) -> dict[int, np.ndarray]:
    """The rows whose kept states stand in for the pass, and those states.

    Only where they are what the pass would compute: every layer frozen, and
    texts that serving's truncation (where they were computed) left whole.
    """
    return {i: state for i, state in enumerate(known or ()) if state is not None and all_frozen
            and lengths[i] <= MAX_LENGTH}


def _probe_rows(reuse: dict[int, np.ndarray]) -> set[int]:
    """Up to ``STATE_PROBES`` rows with kept states, spread over them, that the pass computes anyway to check them."""
    return set(sorted(reuse)[:: max(1, len(reuse) // STATE_PROBES)][:STATE_PROBES])


def _kept_state_batches(frozen_pass: _FrozenPass, reuse: dict[int, np.ndarray], why_not: str | None,
                        seen: dict[int, torch.Tensor]) -> tuple[list[CachedBatch], int]:
    """Training batches of the rows with kept states (not the probes), and how many of them used their states.

    The kept states stand in for the pass if the probes' computed states agree
    with them and the cache can be replayed; otherwise these rows run the pass
    too.
    """
    probes = sorted(frozen_pass.probes)
    mismatch = why_not or _states_differ(torch.from_numpy(np.stack([reuse[i] for i in probes])),
                                         torch.stack([seen[i] for i in probes]))
    kept = sorted((i for i in reuse if i not in frozen_pass.probes), key=lambda i: frozen_pass.lengths[i])
    if mismatch:
        log.info("kept encoder states not used (%s): computing %d rows", mismatch, len(kept))
        return frozen_pass.run(kept)[0], 0
    cached = []
    with torch.no_grad():
        for s in range(0, len(kept), frozen_pass.batch_size):
            batch = kept[s : s + frozen_pass.batch_size]
            hidden = torch.from_numpy(np.stack([reuse[i] for i in batch]))[:, None, :]
            cached.append(CachedBatch(batch, hidden, torch.ones(len(batch), 1, dtype=torch.long),
                                      frozen_pass.head(hidden), None))
    return cached, len(kept)


def _loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, soft: torch.Tensor,
          distill_weight: float, temperature: float) -> torch.Tensor:
    """Cross-entropy on the labels; on the rows marked ``soft``, mixed with distillation toward ``teacher``."""
    loss = torch.nn.functional.cross_entropy(logits, labels)
    if distill_weight > 0 and bool(soft.any()):
        log_student = torch.log_softmax(logits[soft] / temperature, dim=-1)
        target = torch.softmax(teacher[soft] / temperature, dim=-1)
        kl = torch.nn.functional.kl_div(log_student, target, reduction="batchmean") * temperature**2
        loss = (1 - distill_weight) * loss + distill_weight * kl
    return loss


def _fit_cached(frozen_pass: _FrozenPass, cached: list[CachedBatch], labels: torch.Tensor, soft: torch.Tensor, *,
                epochs: int, learning_rate: float, rng: random.Random, distill_weight: float, temperature: float,
                on_step: Callable[[int, int, float], None] | None) -> tuple[int, float, int]:
    """The epochs over the cached batches in a shuffled order; returns (steps, final loss, tokens the steps read)."""
    model, upper, head = frozen_pass.model, frozen_pass.upper, frozen_pass.head
    total = len(cached) * epochs
    optimizer, scheduler = _optimizer(model, learning_rate, total)
    model.train()
    step, tokens, loss_value = 0, 0, float("nan")
    for _ in range(epochs):
        for batch, hidden, mask, teacher, ids in rng.sample(cached, len(cached)):
            if hidden is None:
                logits = model(input_ids=ids, attention_mask=mask).logits
                tokens += int(mask.sum())
            else:
                if not frozen_pass.all_frozen:
                    tokens += int(mask.sum())
                logits = head(upper(hidden, mask))
            loss = _loss(logits, labels[batch], teacher, soft[batch], distill_weight, temperature)
            _step(loss, optimizer, scheduler)
            step += 1
            loss_value = float(loss.detach())
            if on_step is not None:
                on_step(step, total, loss_value)
    model.eval()
    return step, loss_value, tokens


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
    return_states: bool = False,
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
    with what was kept, or none is used. With every layer frozen and
    ``return_states``, the states the pass computed for the other rows are
    returned (``computed_states``), for the caller to keep beside them.
    """
    frozen, layers = _freeze_lower_layers(model, frozen_layers, depth)
    watch_sigterm()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    input_ids = encode(model, tokenizer, texts)
    lengths = [len(ids) for ids in input_ids]
    reuse = _reusable_states(known, lengths, frozen == layers)
    frozen_pass = _FrozenPass(model, tokenizer, input_ids, lengths, frozen, frozen == layers, upper_fn(model, frozen),
                              head_fn(model), batch_size, _probe_rows(reuse), keep_states=return_states)
    model.eval()
    cached, why_not, seen = frozen_pass.run([i for i in range(len(texts)) if i not in reuse or i in frozen_pass.probes])
    reused = 0
    if reuse:
        kept_batches, reused = _kept_state_batches(frozen_pass, reuse, why_not, seen)
        cached += kept_batches
    if why_not:
        log.info("%s: training the whole forward pass each step (%d of %d layers frozen): the cached layers cannot "
                 "be replayed (%s)", anatomy(model).model_type, frozen, layers, why_not)
    labels = torch.tensor(list(label_ids), dtype=torch.long)
    soft = torch.tensor(list(distill) if distill is not None else [False] * len(texts), dtype=torch.bool)
    steps, loss_value, step_tokens = _fit_cached(
        frozen_pass, cached, labels, soft, epochs=epochs, learning_rate=learning_rate, rng=rng,
        distill_weight=distill_weight, temperature=temperature, on_step=on_step)
    computed = {} if why_not else {i: state.numpy() for i, state in frozen_pass.states.items()
                                   if i not in reuse and lengths[i] <= MAX_LENGTH}
    return TrainStats(len(texts) * epochs, frozen_pass.tokens + step_tokens, steps, loss_value, reused, computed)
