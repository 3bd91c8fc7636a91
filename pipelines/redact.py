"""Credentials out of anything printed or logged: a URI's password becomes ``***``.

MLflow accepts ``https://user:password@host`` tracking URIs (and SQLAlchemy URIs carry a
database password the same way), and this project prints its tracking URI in error lines, the
resolved configuration, MLflow parameters and the end-of-run hint. Every such place goes
through here, so a password never reaches a terminal, a log file or a tracking server.
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"
# scheme://user:password@ inside free text (an error message, a traceback line)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*):(?P<password>[^\s@/]*)@")


def mask_uri(uri: str | None) -> str | None:
    """``scheme://user:***@host:port/path`` for a URI with a password; anything else unchanged."""
    if not uri:
        return uri
    return _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", uri)


def mask_text(text: str) -> str:
    """Every URI password in ``text`` masked (the same rule as ``mask_uri``, anywhere in a string)."""
    return _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user info, user, password)``: for a client that sends credentials as a header instead."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), urllib.parse.unquote(parts.username or ""), \
        urllib.parse.unquote(parts.password or "")
