"""Secrets never printed, stored or logged: URIs with their passwords masked, environments with keys masked.

Secrets come from the environment only (STYLE.md, item 3). What refit
prints (``refit stack status --json``, ``refit stack env``, log lines, error
messages) or writes to disk (``stack.json``) passes through these helpers, so
a password in a tracking URI or an AWS key in the caller's shell never lands
in a terminal scroll-back, a CI log or a file someone attaches to a ticket.
"""

from __future__ import annotations

import re

MASK = "***"
# Environment names whose values are secrets: credentials, passwords, tokens, keys.
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY)",
                          re.IGNORECASE)
# user:password@ or a lone token@ inside any URI-looking text (also where urlsplit cannot parse the whole
# string). A password may hold an unescaped "/"; a lone user part cannot, so a path's "@" is not taken for one.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*)(?P<password>:[^@\s]*?)?@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|secret|access_key|sig|signature|"
                           r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)(?P<value>[^&#\s]*)",
                           re.IGNORECASE)


def mask_uri(uri: str | None) -> str | None:
    """``uri`` with any password (``user:password@``) and secret query values replaced by ``***``.

    ``postgresql://refit:hunter2@db:5432/mlflow`` becomes
    ``postgresql://refit:***@db:5432/mlflow``, ``https://ghp_x@host`` becomes
    ``https://***@host``; a URI without secrets comes back
    unchanged. Works on text that merely contains URIs (an error message), too.
    """
    if not uri:
        return uri
    masked = _USERINFO.sub(_masked_userinfo, uri)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", masked)


def _masked_userinfo(match: re.Match) -> str:
    """``user:***@`` where a password follows the user; ``***@`` for a lone token (``https://TOKEN@host``)."""
    if match["password"] is None:
        return f"{match['scheme']}{MASK}@" if match["user"] else match[0]
    return f"{match['scheme']}{match['user']}:{MASK}@"


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret (``AWS_SECRET_ACCESS_KEY``, ...)."""
    return bool(_SECRET_NAME.search(name))


def mask_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of ``env`` with secret values replaced by ``***`` and passwords in URI values masked."""
    return {key: MASK if is_secret_name(key) and value else (mask_uri(value) if isinstance(value, str) else value)
            for key, value in env.items()}
