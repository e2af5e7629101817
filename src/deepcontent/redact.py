"""The one redaction path: everything that leaves the process goes through here.

Manifests, log lines, error messages, CLI output, ``submit`` commands and config errors are
passed through :func:`redact` (data) or :func:`redact_text` (text) before they are written or
printed. Three rules, applied together:

* the value of any mapping key that *looks secret* (``password``, ``secret``, ``token``,
  ``access_key``, ``credential``, ``private_key``, ``api_key``, ``auth``... in any spelling:
  ``s3.secret-access-key``, ``spark.hadoop.fs.s3a.secret.key``) becomes ``***``; so does
  ``key=value`` text with such a key;
* the password of a URL (``postgresql://user:pw@host``) becomes ``***``;
* every value registered with :func:`register_secret` (the S3 keys and catalog password the
  process resolved, from the config or the environment) is replaced wherever it appears, so a
  library that echoes one in an exception is caught too.

Key names that say *where* a secret is rather than what it is (``catalog_password_env``,
``credentials_file``, ``credentials_profile``) are kept.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["MASK", "RedactingArgumentParser", "RedactingFilter", "looks_secret", "redact", "redact_text",
           "register_secret"]

MASK = "***"

_SECRET_WORDS = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|credential|private[._-]?key|access[._-]?key|api[._-]?key|"
    r"auth(?:orization|entication)?(?![a-z])|session[._-]?key)", re.IGNORECASE)
# Keys that name where a secret comes from, not a secret: ``catalog_password_env``,
# ``credentials_file``, and Spark's Kubernetes secret references
# (``spark.kubernetes.driver.secretKeyRef.ENV=secret:key``, ``...driver.secrets.NAME=/mnt``).
_POINTERS = re.compile(r"([._-](env|file|path|profile|provider|type|mode|method|ttl|enabled))$|secretkeyref|"
                       r"\.secrets\.|secret[._-]?name", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:)(?P<password>[^\s@/]+)@")
# key=value, or "key": "value" (JSON), with a secret-looking key. A bare ``key: value`` is left
# alone: in prose ("refusing override X_SECRET_KEY: a secret...") it is not an assignment.
_KEY_VALUE = re.compile(
    r"""(?P<key>[A-Za-z0-9_.\-]*(?:pass(?:word|wd)?|secret|token|credential|private[._-]?key|access[._-]?key|"""
    r"""api[._-]?key|auth(?:orization|entication)?(?![a-z]))[A-Za-z0-9_.\-]*)(?P<sep>\s*=\s*["']?|["']\s*:\s*["']?)(?P<value>[^\s"',}&]+)""", re.IGNORECASE)

_KNOWN: set[str] = set()


def register_secret(value: object) -> None:
    """Remember a secret value so that :func:`redact_text` masks it wherever it appears
    (values shorter than 4 characters are ignored: masking them would garble text)."""
    if value is None:
        return
    text = str(value)
    if len(text) >= 4:
        _KNOWN.add(text)


def looks_secret(key: object) -> bool:
    """Whether a mapping key names a secret (``aws_secret_access_key``: yes;
    ``catalog_password_env``: no, it names an environment variable)."""
    k = str(key)
    return bool(_SECRET_WORDS.search(k)) and not _POINTERS.search(k)


def redact_text(text: str) -> str:
    """``text`` with URL passwords, secret-looking ``key=value`` values and every registered
    secret value replaced by ``***``."""
    if not text:
        return text
    for secret in sorted(_KNOWN, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)

    def mask(m: re.Match) -> str:
        if _POINTERS.search(m.group("key")) or m.group("value") == MASK:
            return m.group(0)
        return f"{m.group('key')}{m.group('sep')}{MASK}"

    return _KEY_VALUE.sub(mask, text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings, lists, scalars) with secret-looking keys' values masked and
    every string passed through :func:`redact_text`."""
    if isinstance(obj, dict):
        return {k: (MASK if looks_secret(k) and v not in (None, "", MASK) and not isinstance(v, (dict, list, bool))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's final message (and its traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it is
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class RedactingArgumentParser(__import__("argparse").ArgumentParser):
    """An ``ArgumentParser`` whose usage errors (which quote the offending arguments, overrides
    with secrets among them) go through :func:`redact_text`. Its sub-parsers are the same class."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.print_usage(__import__("sys").stderr)
        self.exit(2, f"{self.prog}: error: {redact_text(message)}\n")
