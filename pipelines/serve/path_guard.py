"""What the registered model may read when a request names a file path instead of sending the image.

A served model answers clients, so a ``path`` column is a request to read a file on the server.
Off by default: paths are refused and the client sends the image's bytes (or pixels). An
operator who wants paths (images on a volume shared with the server) sets
``MSMAE_SERVE_PATH_ROOT`` to that folder; then a path is read only when it resolves, links
followed, to a regular file under the root of at most ``MSMAE_SERVE_MAX_BYTES`` bytes (default
64 MiB), opened non-blocking so a FIFO or device cannot hang a worker. Every refusal — missing,
outside the root, not a regular file, too large, unreadable — is the same row, so a client learns
nothing about which files exist.
"""

from __future__ import annotations

import os
import stat

from pipelines.data import images

PATH_ROOT_ENV = "MSMAE_SERVE_PATH_ROOT"
MAX_BYTES_ENV = "MSMAE_SERVE_MAX_BYTES"
DEFAULT_MAX_BYTES = 64 << 20
PATH_REFUSED = "path_refused"


def allowed_root() -> str | None:
    root = os.environ.get(PATH_ROOT_ENV, "").strip()
    return os.path.realpath(root) if root else None


def max_bytes() -> int:
    try:
        return max(1, int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)))
    except ValueError:
        return DEFAULT_MAX_BYTES


def refusal(root: str | None, cap: int) -> images.Rejected:
    if root is None:
        return images.Rejected(PATH_REFUSED, f"path input is off for this model: send the image itself (the 'image' column: bytes, "
                                             f"or pixels); an operator can allow paths under one folder with {PATH_ROOT_ENV}")
    return images.Rejected(PATH_REFUSED, f"only regular files of at most {cap} bytes under the allowed folder are read; "
                                         "send the image itself (the 'image' column) otherwise")


def read_path(path: str) -> bytes | images.Rejected:
    """The file's bytes, or the one refusal (the same whatever the reason)."""
    root, cap = allowed_root(), max_bytes()
    refused = refusal(root, cap)
    if root is None:
        return refused
    try:
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            return refused
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        return refused
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
            return refused
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return refused if total > cap else b"".join(chunks)
    except OSError:
        return refused
    finally:
        os.close(fd)
