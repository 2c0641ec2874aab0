"""Encoder states kept per encoder version, so an update that trains the head alone skips rows it has seen.

With every encoder layer frozen (the ladder's ``head`` rung), an update needs
one vector per training row: the last encoder layer's output at the first
position, which is what the classification head reads. The champion's own
logits for replay rows (its soft targets) follow from that vector through the
head. The forward pass that computes the vectors was about 80% of that rung's
CPU time, and half its rows are replay rows the champion has already been run
on: the cascade build runs each newly promoted version over the replay pool
and recent traffic, and its ONNX pass returns these states as a second output
of the same graph (``ServedModel.probabilities_and_states``).

They are kept under the encoder's fingerprint: a hash of the base weights and
of the adapter's encoder tensors (LoRA), not of the head. An update that trains
the head alone leaves the encoder as it was, so the next update finds them under
the same fingerprint; an update that trains encoder layers starts a new file.

The same states save the served model's own passes: a version whose encoder
is the one the states were kept for answers a kept text through its head
alone (``outputs_of``: the pooler and classifier, one matrix product each),
after a few probe texts run the whole pass and agree.

Layout: ``cache/model=<name>/encoder-states/<fingerprint>.npz`` (exact-text
hashes and float32 states), and ``index.json`` beside them: the fingerprints
in the order they were last written; only the newest ``KEEP_ENCODERS`` are kept. It is a cache: a missing or unreadable file costs
only the forward pass it would have saved, and ``modeling.train_upper``
checks a sample of the states against its own pass before it uses any.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from refit.store import update_object

log = logging.getLogger(__name__)

# The most rows one encoder version keeps (newest kept): 50,000 x 384 floats is 77 MB.
MAX_ROWS = 50_000
# Encoder versions kept per model, the most recently written: the champion's, and the one before for a rollback.
KEEP_ENCODERS = 3
# Part of the fingerprint: a change to what is stored (the state's position, the serving truncation) is a new file.
SCHEME = "last encoder layer, first position; float32; exact-text sha1"


def state_key(text: str) -> str:
    """The exact text's hash (not the leakage guard's normalised one: a cased model tells 'US' from 'us')."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(adapter_dir: Path) -> str:
    """The encoder an adapter runs: its base's weights hash, the LoRA tensors and their scaling; not the head."""
    from safetensors.numpy import load_file

    from refit import modeling

    adapter_dir = Path(adapter_dir)
    digest = hashlib.sha256(f"{SCHEME}; max length {modeling.MAX_LENGTH}; "
                            f"base {modeling.base_model_hash(adapter_dir)}".encode())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # peft keeps target_modules as a set, written in the saving process's string-hash order: sorted here, or the
    # same encoder would read as another one in every other process.
    shape = {k: config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora")}
    if isinstance(shape["target_modules"], list):
        shape["target_modules"] = sorted(map(str, shape["target_modules"]))
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    tensors = load_file(str(adapter_dir / modeling.ADAPTER_WEIGHTS))
    for name in sorted(tensors):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()[:32]


class EncoderStates:
    """The states kept for one model's encoder version in the object store."""

    def __init__(self, store, model_name: str, encoder: str | None = None, adapter_dir: Path | None = None):
        if (encoder is None) == (adapter_dir is None):
            raise ValueError("give the encoder's fingerprint or its adapter directory, not both")
        self.store, self.model_name, self._encoder, self.adapter_dir = store, model_name, encoder, adapter_dir

    @classmethod
    def of(cls, store, model_name: str, adapter_dir: Path) -> EncoderStates:
        """The states of ``adapter_dir``'s encoder; its fingerprint is read only when they are (inside the meter)."""
        return cls(store, model_name, adapter_dir=Path(adapter_dir))

    @cached_property
    def encoder(self) -> str:
        return self._encoder or fingerprint(self.adapter_dir)

    @property
    def prefix(self) -> str:
        return f"cache/model={self.model_name}/encoder-states/"

    @property
    def key(self) -> str:
        return f"{self.prefix}{self.encoder}.npz"

    def load(self) -> dict[str, np.ndarray]:
        """Text hash -> state; empty when nothing is kept or the file cannot be read (a cache miss, logged)."""
        try:
            return self._decode(self.store.get_bytes(self.key))
        except KeyError:
            return {}

    def _decode(self, data: bytes | None) -> dict[str, np.ndarray]:
        if data is None:
            return {}
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as kept:
                keys, states = kept["keys"], kept["states"]
            if states.ndim != 2 or len(keys) != len(states) or states.dtype != np.float32:
                raise ValueError(f"keys {keys.shape} and states {states.shape} {states.dtype} do not match")
        except Exception as exc:  # noqa: BLE001 - a cache: a bad file costs the forward pass, never the update
            log.warning("encoder states %s unreadable (%s: %s); computing them", self.key, type(exc).__name__, exc)
            return {}
        return dict(zip(keys.tolist(), states))

    def lookup(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Each text's kept state, or None."""
        kept = self.load()
        return [kept.get(state_key(text)) for text in texts]

    def save(self, texts: Sequence[str], states: np.ndarray) -> int:
        """Add ``states`` (texts x hidden) to what is kept, newest last; returns the rows kept.

        The file and the index are each updated by compare-and-swap, so two
        builds saving at once (a promotion and a hand-run adopt, say) both land.
        """
        states = np.asarray(states, dtype=np.float32)
        if len(texts) != len(states):
            raise ValueError(f"{len(texts)} texts but {len(states)} states")
        written = update_object(self.store, self.key, lambda data: self._merged(data, texts, states))
        self._prune()
        return len(self._decode(written))

    def keep(self, texts: Sequence[str], states: np.ndarray) -> int:
        """``save``, for callers to whom this is a cache: a failure is logged, never raised; returns the rows kept
        (0 when it failed). It costs the next pass over these texts its forward pass, nothing else."""
        try:
            return self.save(texts, states)
        except Exception:  # noqa: BLE001 - a cache
            log.exception("encoder states %s not kept", self.encoder)
            return 0

    def _merged(self, data: bytes | None, texts: Sequence[str], states: np.ndarray) -> bytes:
        width = states.shape[1] if states.ndim == 2 else 0
        kept = {k: v for k, v in self._decode(data).items() if v.shape == (width,)}
        for text, state in zip(texts, states):
            key = state_key(text)
            kept.pop(key, None)  # re-inserted last: it is the newest
            kept[key] = state
        keys = list(kept)[-MAX_ROWS:]
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys, dtype="<U40"),
                 states=np.stack([kept[k] for k in keys]) if keys else np.zeros((0, width), np.float32))
        return buffer.getvalue()

    def _prune(self) -> None:
        """Keep the newest ``KEEP_ENCODERS`` encoders' files; the others' states would never be read again."""
        dropped: list[str] = []

        def newest_first(data: bytes | None) -> bytes:
            try:
                order = json.loads(data) if data is not None else []
            except ValueError:
                order = []
            order = [e for e in order if isinstance(e, str) and e != self.encoder] + [self.encoder]
            dropped[:] = order[:-KEEP_ENCODERS]
            return json.dumps(order[-KEEP_ENCODERS:]).encode()

        update_object(self.store, f"{self.prefix}index.json", newest_first)
        for encoder in dropped:
            self.store.delete(f"{self.prefix}{encoder}.npz")


@dataclass(frozen=True)
class Outputs:
    """A served model's probabilities and states for some texts, in their order."""

    probabilities: np.ndarray  # (texts, labels)
    states: np.ndarray  # (texts, hidden)
    reused: int = 0  # texts whose kept state stood in for the forward pass
    why_not: str = ""  # why kept states were not used, when there were some


def outputs_of(model, texts: Sequence[str], kept: dict[str, np.ndarray] | None = None,
               workers: int = 1) -> Outputs:
    """``model.probabilities_and_states(texts)``, with kept states standing in for the pass where there are some.

    ``kept`` (text hash -> state, ``EncoderStates.load``) must be the states
    of ``model``'s own encoder: they were kept under its fingerprint. A text
    with a kept state is answered by the model's head on it. A few such
    texts (``modeling.STATE_PROBES``) run the whole pass first; unless their
    states agree with the kept ones (``modeling.STATE_TOLERANCE``, as
    training checks them) and the head's probabilities with the pass's
    (within what serving allows between ONNX Runtime and torch), every text
    runs the whole pass.
    """
    from refit.modeling import STATE_PROBES, STATE_TOLERANCE
    from refit.runtime.served import MAX_PROBABILITY_DIFF

    texts = list(texts)
    known = {i: state for i, state in ((i, (kept or {}).get(state_key(t))) for i, t in enumerate(texts))
             if state is not None}
    probes = sorted(known)[:: max(1, len(known) // STATE_PROBES)][:STATE_PROBES]
    probe_set = set(probes)
    rest = [i for i in sorted(known) if i not in probe_set]
    run = [i for i in range(len(texts)) if i not in known or i in probe_set]
    proba, states = _pass(model, [texts[i] for i in run], workers)
    if not rest:
        return _placed(len(texts), run, proba, states)
    at = {i: row for row, i in enumerate(run)}
    mine, theirs = np.stack([known[i] for i in probes]), states[[at[i] for i in probes]]
    why = (_differs(mine, theirs, "kept states", STATE_TOLERANCE * max(1.0, float(np.abs(theirs).max())))
           or _differs(head_probabilities(model, mine), proba[[at[i] for i in probes]],
                       "probabilities from kept states", MAX_PROBABILITY_DIFF))
    if why:
        log.info("kept encoder states not used (%s): running the other %d texts too", why, len(rest))
        more_proba, more_states = _pass(model, [texts[i] for i in rest], workers)
        placed = _placed(len(texts), run + rest, np.concatenate([proba, more_proba]),
                         np.concatenate([states, more_states]))
        return Outputs(placed.probabilities, placed.states, 0, why)
    kept_states = np.stack([known[i] for i in rest]).astype(np.float32)
    placed = _placed(len(texts), run + rest, np.concatenate([proba, head_probabilities(model, kept_states)]),
                     np.concatenate([states, kept_states]))
    return Outputs(placed.probabilities, placed.states, len(rest))


def head_probabilities(model, states: np.ndarray) -> np.ndarray:
    """What a served model's head answers for last-layer first-position ``states``: its probabilities.

    The head is the merged model's own (pooler or pre-classifier, then the
    classifier), run in torch: a matrix product or two per text.
    """
    import torch

    from refit import modeling

    head = modeling._head_fn(model.model)
    with torch.inference_mode():
        logits = head(torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))[:, None, :]).float().numpy()
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _pass(model, texts: list[str], workers: int) -> tuple[np.ndarray, np.ndarray]:
    if not texts:
        return np.zeros((0, len(model.labels)), np.float32), np.zeros((0, 0), np.float32)
    proba, states = model.probabilities_and_states(texts, workers=workers)
    return np.asarray(proba, dtype=np.float32), np.asarray(states, dtype=np.float32)


def _placed(count: int, order: list[int], proba: np.ndarray, states: np.ndarray) -> Outputs:
    """Rows computed in ``order`` put back in the texts' order."""
    if order == list(range(count)):
        return Outputs(proba, states)
    out_proba = np.zeros((count, proba.shape[1]), np.float32)
    out_states = np.zeros((count, states.shape[1]), np.float32)
    out_proba[order], out_states[order] = proba, states
    return Outputs(out_proba, out_states)


def _differs(mine: np.ndarray, theirs: np.ndarray, what: str, limit: float) -> str:
    if mine.shape != theirs.shape:
        return f"{what} of shape {mine.shape}, not {theirs.shape}"
    diff = float(np.abs(mine - theirs).max()) if mine.size else 0.0
    return "" if diff <= limit else f"{what} differ by {diff:.2e} (limit {limit:.1e})"
