"""Policies: YAML files parsed into strict, frozen pydantic models.

A typo in a policy file is an error naming the field, never a silent default.
Each stage defines its own policy model beside its logic (``tasks/drift/policy.py``,
``tasks/gate.py`` ...); this module only loads and fingerprints them. The
files shipped with refit live in ``refit/policies/``; a path overrides them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from refit.errors import RefitError

POLICY_DIR = Path(__file__).resolve().parent / "policies"


class StrictModel(BaseModel):
    """Base for policies and scenarios: strict types, frozen, unknown keys rejected."""

    # NaN compares false with every threshold (a rule that never fires or never passes), so numbers must be finite.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)


M = TypeVar("M", bound=StrictModel)


def resolve(name_or_path: str | Path, directory: Path = POLICY_DIR, kind: str = "policy") -> Path:
    """A shipped file by name (``gate`` → ``refit/policies/gate.yaml``) or a path; errors call it ``kind``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RefitError(f"{kind} file {path} does not exist")
        return path
    shipped = directory / f"{name_or_path}.yaml"
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise RefitError(f"no {kind} named {name_or_path!r} in {directory} (known: {known})")
    return shipped


def chosen_policy(requested: str | None, pinned: str, kind: str, setting: str) -> str:
    """The policy a flow run uses: a name in ``refit/policies/``, or the file the operator pinned.

    A deployment run's parameters come from whoever may start it; a path
    there could point at a laxer policy anywhere on the worker, so only the
    worker's own setting (``setting``, from its environment) may name a file.

    Raises:
        RefitError: a path that is not the pinned one.
    """
    if requested in (None, "", pinned):
        return pinned
    if any(mark in requested for mark in ("/", "\\")) or requested.endswith((".yaml", ".yml")) or \
            requested.startswith("."):
        raise RefitError(f"{kind} policy {requested!r}: a run may only name a policy in refit/policies/ (such as "
                         f"{kind!r}); to use a file, pin it with {setting}")
    return requested


def load_yaml_model(model: type[M], path: Path) -> M:
    """Parse ``path`` into ``model``; errors name the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as exc:
        raise RefitError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except yaml.YAMLError as exc:
        raise RefitError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise RefitError(f"{path} is not valid YAML: nested too deeply") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(_key(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise RefitError(f"{path}: {' '.join(problems.split())}") from exc


def _key(part) -> str:
    """A location part as written in the file; quoted when it is empty or holds spaces or control characters."""
    text = str(part)
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def load_policy(model: type[M], name_or_path: str | Path) -> tuple[M, Path]:
    path = resolve(name_or_path)
    return load_yaml_model(model, path), path


def file_hash(path: Path) -> str:
    """Short SHA-256 of a file: the policy hash recorded on every run that used it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
