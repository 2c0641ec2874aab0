"""A reference's embeddings kept beside it, so the next process's check reads them instead of embedding again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.drift.encoder import EMBEDDING_MAX_LENGTH, EMBEDDING_SCHEME, _embedded, encoder_fingerprint

EMBEDDINGS_SUFFIX = ".embeddings.npz"


def embeddings_sidecar(reference_path: Path) -> Path:
    """Where a reference file's embeddings are kept: beside it, ``reference.parquet.embeddings.npz``."""
    return reference_path.with_name(reference_path.name + EMBEDDINGS_SUFFIX)


def texts_fingerprint(texts) -> str:
    """The set of texts a reference holds, order and repeats aside."""
    import hashlib

    digest = hashlib.sha256()
    for text in sorted(set(map(str, texts))):
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def reuse_reference_embeddings(payload: bytes | None, reference_texts) -> str:
    """Make the vectors saved with a reference known to ``sentence_embeddings``, if they still fit it.

    ``payload`` is what ``reference_embeddings_payload`` wrote (a file's or an
    object's bytes, ``None`` when there is none). Vectors are used only when
    they were made by this encoder for this reference's set of texts, so a
    changed reference or model is embedded afresh, never mixed with old vectors.

    Returns:
        ``read``, ``missing``, ``stale`` (another encoder or reference) or
        ``unreadable``.
    """
    import io
    import json
    import zipfile

    if payload is None:
        return "missing"
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as saved:
            meta = json.loads(saved["meta"].tobytes().decode("utf-8"))
            texts = json.loads(saved["texts"].tobytes().decode("utf-8"))
            vectors = saved["vectors"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return "unreadable"
    if (meta.get("encoder") != encoder_fingerprint() or meta.get("reference") != texts_fingerprint(reference_texts)
            or vectors.ndim != 2 or len(vectors) != len(texts) or vectors.dtype != np.float32):
        return "stale"
    _embedded.update(zip(texts, vectors))
    return "read"


def reference_embeddings_payload(reference_texts, already: bytes | None = None) -> bytes | None:
    """The vectors of those of a reference's texts this process embedded, to keep beside the reference.

    A check embeds only the reference rows it samples, so these are what the
    next check of the same reference needs. ``None`` when there is nothing
    to add to ``already`` (the payload read before the check).
    """
    import io
    import json
    import zipfile

    texts = [t for t in dict.fromkeys(map(str, reference_texts)) if t in _embedded]
    if not texts:
        return None
    if already is not None:
        try:
            with np.load(io.BytesIO(already), allow_pickle=False) as saved:
                known = json.loads(saved["texts"].tobytes().decode("utf-8"))
            if set(texts) <= set(known):
                return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    meta = {"encoder": encoder_fingerprint(), "reference": texts_fingerprint(reference_texts), "rows": len(texts),
            "scheme": EMBEDDING_SCHEME, "max_tokens": EMBEDDING_MAX_LENGTH}
    out = io.BytesIO()
    np.savez(out, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             texts=np.frombuffer(json.dumps(texts).encode("utf-8"), dtype=np.uint8),
             vectors=np.stack([_embedded[t] for t in texts]).astype(np.float32))
    return out.getvalue()
