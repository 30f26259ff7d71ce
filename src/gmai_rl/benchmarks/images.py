"""Benchmark images that arrive inside the data (base64 in a TSV, bytes in a parquet table),
written once to files so that every consumer (the image checks, the processor, a human looking at a
wrong answer) reads a plain image file.

`ImageStore` names each file by content: "<stem>-<sha256 prefix><ext>", where the stem is the row's
index when the format has one (VLMEvalKit TSVs) and the hash is taken over the base64 text itself
(or the raw bytes). A second load computes the hash, finds the file and neither decodes nor writes
anything; a changed row gets a new file instead of silently reusing a stale one. The extension is
sniffed from the first bytes (the file's content, not its name, decides how PIL reads it). Files are
written to a temporary name and renamed into place, so an interrupted load never leaves a truncated
file that a later load would take as done. The full pixel check is not done here: the loaders run
the training data's check (`gmai_rl.data.loader.image_problem`) on every file, recording passes in
`CHECKS_FILE` in the same folder so a re-load does not decode the pixels again either.

Where: `default_cache_dir` puts the folder beside what the user pointed at,
`<its folder>/.gmai_rl_images/<its name without suffix>/` (e.g. `/data/LMUData/.gmai_rl_images/
GMAI-MMBench_VAL/` for `/data/LMUData/GMAI-MMBench_VAL.tsv`): on the data's own file system, which
has room for the decoded copy, and found again by every user of the same data. A read-only data
folder needs an explicit `cache_dir`.

Unlike VLMEvalKit, which decodes to PIL, converts to RGB and re-saves, the bytes are written as
they came: the pixels the model sees are the dataset's, not a re-encoding of them.

Left out: pruning files of rows that changed (the old file stays), and locking between concurrent
first loads of one file (both write the same content under the same name; the rename is atomic).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import uuid
from pathlib import Path

from gmai_rl.data.records import UNREADABLE_IMAGE, RecordError

CACHE_FOLDER = ".gmai_rl_images"
CHECKS_FILE = "image_checks.json"
"""The record of images that passed the pixel check (`gmai_rl.data.image_checks`), per folder."""

_HASH_CHARS = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# (magic prefix, extension); WEBP is checked apart (RIFF....WEBP).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def default_cache_dir(source: Path) -> Path:
    """Where the images decoded from `source` (a file or a folder) go by default."""
    source = Path(os.path.abspath(source))
    stem = source.stem if source.is_file() else source.name
    return source.parent / CACHE_FOLDER / stem


class ImageStore:
    """Images decoded from base64 text or raw bytes, each written once into `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.written = 0
        """Files this store wrote (decoded) in this load."""
        self.reused = 0
        """Images found already written by an earlier load: neither decoded nor written."""
        self._ready = False

    def from_base64(self, text: str, stem: str) -> str:
        """The file holding the image whose base64 text is `text`; raises `RecordError`."""
        text = "".join(text.split())  # base64 ignores whitespace; the hash must too
        digest = hashlib.sha256(text.encode("ascii", errors="replace")).hexdigest()[:_HASH_CHARS]
        path = self._path(stem, digest, _sniff_extension(_decode_prefix(text)))
        if os.path.exists(path):
            self.reused += 1
            return path
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RecordError(
                UNREADABLE_IMAGE, f"the image is not valid base64 ({error}): {text[:40]!r}..."
            ) from None
        if not data:
            raise RecordError(UNREADABLE_IMAGE, "the image's base64 text decodes to no bytes")
        self._write(path, data)
        return path

    def from_bytes(self, data: bytes, stem: str = "") -> str:
        """The file holding the image `data` (encoded bytes, e.g. a PNG file's content)."""
        if not data:
            raise RecordError(UNREADABLE_IMAGE, "the image has no bytes")
        digest = hashlib.sha256(data).hexdigest()[:_HASH_CHARS]
        path = self._path(stem, digest, _sniff_extension(data))
        if os.path.exists(path):
            self.reused += 1
            return path
        self._write(path, data)
        return path

    def _path(self, stem: str, digest: str, extension: str) -> str:
        safe = _UNSAFE.sub("_", stem).strip("._")[:64]
        name = f"{safe}-{digest}{extension}" if safe else f"{digest}{extension}"
        return str(self.folder / name)

    def _write(self, path: str, data: bytes) -> None:
        if not self._ready:
            ensure_writable(self.folder)
            self._ready = True
        temporary = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self.written += 1


def ensure_writable(folder: Path) -> None:
    """Create `folder`; a folder that cannot be written is an error that says what to do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            f"cannot create the folder for decoded benchmark images {folder} ({error}): pass "
            "cache_dir= a writable folder"
        ) from None
    if not os.access(folder, os.W_OK):
        raise OSError(
            f"cannot write decoded benchmark images to {folder}: pass cache_dir= a writable folder"
        )


def _decode_prefix(text: str) -> bytes:
    """The first bytes that `text` encodes (enough to sniff the format), or b"" if unreadable."""
    try:
        return base64.b64decode(text[:24], validate=True)
    except (binascii.Error, ValueError):
        return b""


def _sniff_extension(data: bytes) -> str:
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"  # PIL reads by content; the check says whether it can
