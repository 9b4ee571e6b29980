"""Local input paths: confinement to the allowed roots. Pure Python (no torch), so a service can
check a submitted path where it accepts it, and the worker again right before it reads."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import InvalidInputError

__all__ = ["check_confined"]


def check_confined(
    path: str | Path, roots: Iterable[str | Path], *, max_entries: int = 10_000
) -> Path:
    """The real path of ``path``, after checking that it and everything under it stay inside
    ``roots`` once symlinks are resolved; :class:`InvalidInputError` otherwise.

    ``path`` must resolve inside one of ``roots`` (themselves resolved). When it is a directory,
    every entry under it, recursively, must too: a file or folder whose real path leaves the
    roots (``tokenizer.json -> /etc/passwd``), a broken link, or anything that is neither a
    regular file nor a directory (a FIFO would block the reader, a device never ends) is refused,
    naming the entry relative to ``path``, never where it points. Linked folders that stay inside
    are followed once each (loops end). More than ``max_entries`` entries is refused too. A path
    that does not exist is returned as is (the loader reports it). Pure: the caller passes the
    roots (e.g. a service's configured local roots).

    This narrows, but cannot close, the window between the check and the read: whoever can
    write under the roots can still swap a file afterwards; roots must not be writable by the
    users whose jobs read them.
    """
    real_roots = [Path(os.path.realpath(root)) for root in roots]

    def inside(real: Path) -> bool:
        return any(real.is_relative_to(root) for root in real_roots)

    given = str(path)
    real = Path(os.path.realpath(path))
    if not inside(real):
        raise InvalidInputError(f"{given!r} is not under an allowed local root")
    try:
        top = os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise InvalidInputError(f"{given!r} cannot be read: {exc.strerror}") from None
    if stat.S_ISREG(top.st_mode):
        return real
    if not stat.S_ISDIR(top.st_mode):
        raise InvalidInputError(f"{given!r} is not a regular file or directory")

    seen = {real}
    pending: list[tuple[Path, str]] = [(real, "")]
    count = 0
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise InvalidInputError(
                f"{given!r}: {prefix or '.'} cannot be listed: {exc.strerror}"
            ) from None
        for entry in entries:
            count += 1
            if count > max_entries:
                raise InvalidInputError(
                    f"{given!r} holds more than {max_entries} files; pass the model folder itself"
                )
            rel = prefix + entry.name
            target = Path(os.path.realpath(entry.path))
            if not inside(target):
                raise InvalidInputError(
                    f"{given!r}: {rel!r} resolves outside the allowed local roots"
                )
            try:
                mode = os.stat(target).st_mode
            except OSError:
                raise InvalidInputError(f"{given!r}: {rel!r} is a broken link") from None
            if stat.S_ISDIR(mode):
                if target not in seen:
                    seen.add(target)
                    pending.append((target, rel + "/"))
            elif not stat.S_ISREG(mode):
                raise InvalidInputError(f"{given!r}: {rel!r} is not a regular file or directory")
    return real
