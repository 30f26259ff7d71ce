"""A record of the images that passed the load-time check, so a later load decodes only new ones.

Decoding every image of a large dataset takes minutes, and a resume, each job of a multirun and
an eval set that shares the training images would pay it again. `ImageCheckCache` keeps one JSON
file mapping each image's absolute path to its (size, mtime_ns, ctime_ns) as they were when it
passed. An image counts as checked only while all three are unchanged: a file edited, touched or
replaced is checked again (ctime catches a replacement given the old mtime back, since setting
the mtime sets the ctime). Only passes are recorded, so a failed image is checked every time and
a fixed one passes on the next load.

The file also names the check (`checker_id`: the rules' version, Pillow's, and PIL's
decompression-bomb limit); records made under another check are ignored. Concurrent loads (the
jobs of a multirun) each read the file once and write it back merged with what is on disk then,
through a temporary file renamed into place: no reader sees a half-written file, and at worst one
load's new records are lost to another's write (those images are checked again next time). A file
that cannot be read as this format is ignored with a warning, one that cannot be written is a
warning: neither fails a load.

Left out: pruning records of deleted images (about 100 bytes each), and git's "racily clean"
guard for filesystems whose timestamps are too coarse to tell two writes in one tick apart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

FORMAT = 1
"""The file's layout: {"format": 1, "checker": str, "images": {path: [size, mtime_ns, ctime_ns]}}."""

RULES_VERSION = 1
"""Bump when `gmai_rl.data.loader.image_problem` refuses something it used to accept."""

Signature = tuple[int, int, int]
"""(size, mtime_ns, ctime_ns) of a file."""

P = TypeVar("P")


def checker_id() -> str:
    """What decides a check's outcome besides the file: records made under another are void."""
    from PIL import Image, __version__

    return f"rules={RULES_VERSION},pillow={__version__},max_pixels={Image.MAX_IMAGE_PIXELS}"


def signature(path: str) -> Signature | None:
    """The file's (size, mtime_ns, ctime_ns), or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ImageCheckCache:
    """The images of `file` known to pass, and those this load found to pass (thread-safe)."""

    def __init__(self, file: str | os.PathLike[str]) -> None:
        self.file = Path(file).expanduser()
        self.checker = checker_id()
        self.known = self._read(warn=True)
        self.passed: dict[str, Signature] = {}
        """Images this load decoded and found good, not yet written."""
        self.hits = 0
        """Images taken as good from the file without decoding."""
        self.decoded = 0
        self._lock = threading.Lock()

    def check(self, path: str, check: Callable[[str], P | None]) -> P | None:
        """`check(path)` (None: the image is good), unless it passed before, unchanged since."""
        key = os.path.abspath(path)
        before = signature(path)
        if before is not None and self.known.get(key) == before:
            with self._lock:
                self.hits += 1
            return None
        problem = check(path)
        with self._lock:
            self.decoded += 1
        # Unchanged while it was decoded too: else the next load checks it again.
        if problem is None and before is not None and signature(path) == before:
            with self._lock:
                self.passed[key] = before
        return problem

    def save(self) -> None:
        """Add this load's passes to the file (merged with its current content); never raises."""
        if not self.passed:
            return
        merged = {**self._read(warn=False), **self.passed}
        document = {"format": FORMAT, "checker": self.checker, "images": merged}
        temporary = self.file.with_name(f".{self.file.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(document, separators=(",", ":")))
            os.replace(temporary, self.file)
        except OSError as error:
            log.warning(
                "cannot write the image check cache %s (%s): the next load checks these %d "
                "images again",
                self.file,
                error,
                len(self.passed),
            )
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return
        self.known.update(self.passed)
        self.passed = {}

    def _read(self, warn: bool) -> dict[str, Signature]:
        """The file's records for this checker; {} when absent, unreadable or of another check."""
        try:
            text = self.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            if warn:
                log.warning("ignoring the image check cache %s: %s", self.file, error)
            return {}
        try:
            document = json.loads(text)
            if document["format"] != FORMAT:
                raise ValueError(f"format {document['format']!r}, expected {FORMAT}")
            if document["checker"] != self.checker:
                return {}  # another Pillow or other rules: every image is checked again
            return {
                str(path): (int(size), int(mtime_ns), int(ctime_ns))
                for path, (size, mtime_ns, ctime_ns) in document["images"].items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            if warn:
                log.warning(
                    "ignoring the image check cache %s, which is not a cache file (%s: %s): "
                    "every image is checked, and the file is rewritten",
                    self.file,
                    type(error).__name__,
                    error,
                )
            return {}
