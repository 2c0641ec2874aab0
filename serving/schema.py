"""What /predict accepts, checked by hand so every refusal names its problem.

FastAPI's automatic validation answers with a list of pydantic locations;
a client sending a 1 MB text or a number in the list should instead read one
sentence that says which text and what is wrong with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64
    max_text_chars: int = 2000

    @property
    def max_body_bytes(self) -> int:
        # Room for every text at the limit written as \uXXXX escapes, plus JSON punctuation.
        return max(4 << 20, self.max_texts * (self.max_text_chars * 6 + 8) + 1024)


class BadRequest(Exception):
    """A request refit will not answer: ``status`` (4xx) and a sentence naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def load_json(body: bytes):
    """The body as JSON, or a 400 naming the problem.

    ``json`` raises ValueError (not only JSONDecodeError) for a number of
    over 4,300 digits, and RecursionError for arrays nested too deeply: both
    are the client's mistake, not a 500.
    """
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(400, "malformed JSON: nested too deeply") from None


def valid_unicode(text: str) -> bool:
    """False for a string with a lone surrogate (JSON allows the escape; UTF-8, Parquet and tokenizers do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_texts(body: bytes, limits: Limits) -> list[str]:
    """The texts of a ``{"texts": [...]}`` body, or ``BadRequest`` naming what is wrong."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body is {len(body):,} bytes; the limit is {limits.max_body_bytes:,}")
    payload = load_json(body)
    if not isinstance(payload, dict) or "texts" not in payload:
        raise BadRequest(422, 'body must be a JSON object with a "texts" list, e.g. {"texts": ["book a flight"]}')
    unknown = sorted(set(payload) - {"texts"})
    if unknown:
        raise BadRequest(422, f"unknown field(s) {', '.join(map(repr, unknown))}: only \"texts\" is accepted")
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise BadRequest(422, f'"texts" must be a list of strings, not {type(texts).__name__}')
    if not texts:
        raise BadRequest(422, f'"texts" is empty: send 1 to {limits.max_texts} texts')
    if len(texts) > limits.max_texts:
        raise BadRequest(413, f'"texts" has {len(texts)} texts; the limit is {limits.max_texts} per request')
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(422, f"texts[{i}] is not a string (got {type(text).__name__})")
        if not text.strip():
            raise BadRequest(422, f"texts[{i}] is empty")
        if not valid_unicode(text):
            raise BadRequest(422, f"texts[{i}] is not valid Unicode (a lone surrogate escape such as \\ud800)")
        if len(text) > limits.max_text_chars:
            raise BadRequest(413, f"texts[{i}] is {len(text):,} characters; the limit is {limits.max_text_chars:,}")
    return texts
