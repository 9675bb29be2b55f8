"""Files: output images and user uploads, stored under var/files and served at `/files/{name}`.

- Output images are encoded off the event loop, then stored (URL on the run host), or returned inline
  as data URIs (`sync_mode`). Encoding: JPEG quality 95 (what fal's lcm returns), or PNG at zlib
  level 1 (PIL's default level 6 costs about 3x the time for ~25 % smaller files).
- Uploads (storage.py) are streamed to a temporary file with a byte cap, then moved into place.
- Names are 128-bit random tokens plus a short extension: the URL is the capability, as on fal's CDN.
- A file may expire (X-Fal-Object-Lifecycle[-Preference] `expiration_duration_seconds`): its record
  in SQLite keeps the time, GET answers 404 from then on, and `sweep()` deletes it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import mimetypes
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ember.endpoints.common import StoredFile, StoredImage
from ember.gateway.db import Database

log = logging.getLogger(__name__)

_FORMATS = {"jpeg": ("image/jpeg", "jpg"), "png": ("image/png", "png")}
FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,12}$")
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png"}
# Types served inline; anything else is served as an attachment, so an uploaded HTML or SVG file can
# never run script in the gateway's origin (see also the CSP header in ops.file).
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "application/json",
                          "text/plain", "audio/mpeg", "audio/wav", "video/mp4", "application/octet-stream"})
_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")
PART_LIMIT = 128 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS files_expiring ON files (expires_at) WHERE expires_at IS NOT NULL;
"""


class FileTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Encoded:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


@dataclass(frozen=True)
class FileInfo:
    path: Path
    content_type: str


def encode_image(image: np.ndarray, fmt: str) -> Encoded:
    """(H, W, 3) uint8 -> JPEG or PNG bytes."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown image format {fmt!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    content_type, extension = _FORMATS[fmt]
    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if fmt == "jpeg":
        picture.save(buffer, format="JPEG", quality=95)
    else:
        picture.save(buffer, format="PNG", compress_level=1)
    return Encoded(buffer.getvalue(), content_type, extension, int(image.shape[1]), int(image.shape[0]))


def clean_content_type(value: str | None) -> str:
    """A syntactically plain `type/subtype` (parameters dropped), else application/octet-stream."""
    value = (value or "").split(";")[0].strip().lower()
    return value if _CONTENT_TYPE.match(value) else "application/octet-stream"


def extension_for(content_type: str, file_name: str | None = None) -> str:
    """A short, safe extension for a stored file: the upload's own, else the content type's, else bin."""
    if file_name and "." in file_name:
        ext = file_name.rsplit(".", 1)[1].lower()
        if re.fullmatch(r"[a-z0-9]{1,12}", ext):
            return ext
    guessed = mimetypes.guess_extension(content_type) or ".bin"
    return guessed.lstrip(".").lower() if re.fullmatch(r"\.[a-z0-9]{1,12}", guessed) else "bin"


def new_name(extension: str) -> str:
    return f"{secrets.token_urlsafe(16)}.{extension}"


class FileStore:
    def __init__(self, root: Path, base_url: str, db: Database | None = None, workers: int = 2) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")
        self.db = db
        self.root.mkdir(parents=True, exist_ok=True)
        self.parts_root = root / ".parts"
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="files")
        # name -> (content_type, expires_at) for files that have a record.
        self._records: dict[str, tuple[str, float | None]] = {}

    async def load(self) -> None:
        """Reads the file records (content types, expiry times) into memory."""
        if self.db is None:
            return
        await self.db.migrate(_SCHEMA)
        for row in await self.db.execute("SELECT name, content_type, expires_at FROM files"):
            self._records[row["name"]] = (row["content_type"], row["expires_at"])

    # -- output images -----------------------------------------------------------------------------

    def _save(self, image: np.ndarray, fmt: str) -> tuple[StoredImage, str]:
        encoded = encode_image(image, fmt)
        name = new_name(encoded.extension)
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(encoded.data)
        os.replace(tmp, self.root / name)
        stored = StoredImage(
            url=self.url_of(name), content_type=encoded.content_type, file_name=name,
            file_size=len(encoded.data), width=encoded.width, height=encoded.height,
        )
        return stored, name

    def _inline(self, image: np.ndarray, fmt: str) -> StoredImage:
        encoded = encode_image(image, fmt)
        payload = base64.b64encode(encoded.data).decode("ascii")
        return StoredImage(
            url=f"data:{encoded.content_type};base64,{payload}", content_type=encoded.content_type,
            file_name=new_name(encoded.extension), file_size=len(encoded.data),
            width=encoded.width, height=encoded.height,
        )

    async def save(self, image: np.ndarray, fmt: str, ttl: float | None = None) -> StoredImage:
        stored, name = await asyncio.get_running_loop().run_in_executor(self._executor, self._save, image, fmt)
        if ttl is not None:
            await self._record(name, stored.content_type, stored.file_size, ttl)
        return stored

    async def inline(self, image: np.ndarray, fmt: str) -> StoredImage:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._inline, image, fmt)

    def _save_file(self, data: bytes, content_type: str, extension: str) -> StoredFile:
        name = new_name(extension)
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
        return StoredFile(url=self.url_of(name), content_type=content_type, file_name=name, file_size=len(data))

    async def save_file(
        self, data: bytes, content_type: str, extension: str, ttl: float | None = None
    ) -> StoredFile:
        """Stores an output file that is not an image (already encoded) under a new name."""
        if not re.fullmatch(r"[a-z0-9]{1,12}", extension):
            raise ValueError(f"not a file extension we hand out: {extension!r}")
        stored = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._save_file, data, content_type, extension)
        # The record keeps the content type for GET (an unknown extension would guess another one).
        await self._record(stored.file_name, content_type, len(data), ttl)
        return stored

    async def inline_file(self, data: bytes, content_type: str, extension: str) -> StoredFile:
        """The file as a data URI (sync_mode), with the name it would have had."""
        encoded = await asyncio.get_running_loop().run_in_executor(self._executor, base64.b64encode, data)
        return StoredFile(url=f"data:{content_type};base64,{encoded.decode('ascii')}", content_type=content_type,
                          file_name=new_name(extension), file_size=len(data))

    def sink(self, sync_mode: bool, ttl: float | None = None) -> OutputSink:
        """What an endpoint's `to_output` stores its images and other files with."""
        return OutputSink(self, sync_mode, ttl)

    # -- uploads -----------------------------------------------------------------------------------

    async def _record(self, name: str, content_type: str, size: int, ttl: float | None) -> None:
        now = time.time()
        expires_at = now + ttl if ttl is not None else None
        self._records[name] = (content_type, expires_at)
        if self.db is not None:
            await self.db.execute(
                "INSERT OR REPLACE INTO files (name, content_type, size, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (name, content_type, size, now, expires_at))

    async def _spool(self, tmp: Path, chunks: AsyncIterator[bytes], limit: int, digest: Any = None) -> int:
        """Writes `chunks` to `tmp` on the file threads; FileTooLarge past `limit` bytes."""
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._executor, open, tmp, "wb")
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise FileTooLarge(f"the file is larger than {limit} bytes")
                if digest is not None:
                    digest.update(chunk)
                await loop.run_in_executor(self._executor, out.write, chunk)
        finally:
            await loop.run_in_executor(self._executor, out.close)
        return size

    async def write_stream(
        self, name: str, content_type: str, chunks: AsyncIterator[bytes], max_bytes: int, ttl: float | None,
    ) -> int:
        """Streams an upload into place as `name`; FileTooLarge past `max_bytes` (nothing kept)."""
        if not FILE_NAME.match(name):
            raise ValueError(f"not a file name we hand out: {name!r}")
        tmp = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            size = await self._spool(tmp, chunks, max_bytes)
            os.replace(tmp, self.root / name)
        finally:
            tmp.unlink(missing_ok=True)
        await self._record(name, content_type, size, ttl)
        return size

    def _part_dir(self, name: str) -> Path:
        return self.parts_root / name

    async def write_part(self, name: str, number: int, chunks: AsyncIterator[bytes]) -> str:
        """One part of a multipart upload; returns its ETag."""
        if not FILE_NAME.match(name) or not 1 <= number <= 10000:
            raise ValueError("bad part")
        directory = self._part_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = directory / f".{number}.{secrets.token_hex(4)}.tmp"
        try:
            await self._spool(tmp, chunks, PART_LIMIT, digest)
            etag = digest.hexdigest()[:32]
            os.replace(tmp, directory / f"{number:05d}")
            (directory / f"{number:05d}.etag").write_text(etag)
        finally:
            tmp.unlink(missing_ok=True)
        return etag

    def _assemble(self, name: str, parts: list[tuple[int, str]], max_bytes: int) -> int:
        directory = self._part_dir(name)
        sources = []
        for number, etag in parts:
            path = directory / f"{number:05d}"
            tag = directory / f"{number:05d}.etag"
            if not path.is_file() or not tag.is_file() or tag.read_text() != etag.strip('"'):
                raise ValueError(f"part {number} was not uploaded (or its etag differs)")
            sources.append(path)
        total = sum(p.stat().st_size for p in sources)
        if total > max_bytes:
            raise FileTooLarge(f"the file is larger than {max_bytes} bytes")
        tmp = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as out:
                for path in sources:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 1024 * 1024)
            os.replace(tmp, self.root / name)
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)
        return total

    async def complete_parts(
        self, name: str, parts: list[tuple[int, str]], content_type: str, max_bytes: int, ttl: float | None,
    ) -> int:
        if not FILE_NAME.match(name) or not parts:
            raise ValueError("no parts")
        ordered = sorted(parts)
        size = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._assemble, name, ordered, max_bytes)
        await self._record(name, content_type, size, ttl)
        return size

    # -- serving and expiry ------------------------------------------------------------------------

    def url_of(self, name: str, base_url: str | None = None) -> str:
        return f"{(base_url or self.base_url).rstrip('/')}/files/{name}"

    def info(self, name: str) -> FileInfo | None:
        """The stored file called `name`, or None (unknown, expired, or not a name we hand out)."""
        if not FILE_NAME.match(name):
            return None
        record = self._records.get(name)
        if record is not None and record[1] is not None and record[1] <= time.time():
            return None
        path = self.root / name
        if not path.is_file():
            return None
        if record is not None:
            content_type = record[0]
        else:
            content_type = CONTENT_TYPES.get(name.rsplit(".", 1)[1]) or mimetypes.guess_type(name)[0] or \
                "application/octet-stream"
        return FileInfo(path, content_type)

    def expires_at(self, name: str) -> float | None:
        record = self._records.get(name)
        return record[1] if record else None

    def path_of(self, name: str) -> Path | None:
        info = self.info(name)
        return info.path if info else None

    async def read(self, name: str, max_bytes: int) -> tuple[bytes, str] | None:
        """The file's bytes and content type (an input naming our own file URL), None if absent."""
        info = self.info(name)
        if info is None:
            return None
        if info.path.stat().st_size > max_bytes:
            raise FileTooLarge(f"the file is larger than {max_bytes} bytes")
        data = await asyncio.get_running_loop().run_in_executor(self._executor, info.path.read_bytes)
        return data, info.content_type

    async def sweep(self) -> int:
        """Deletes expired files (and multipart leftovers older than a day); returns how many."""
        now = time.time()
        expired = [n for n, (_, exp) in self._records.items() if exp is not None and exp <= now]
        for name in expired:
            (self.root / name).unlink(missing_ok=True)
            self._records.pop(name, None)
        if expired and self.db is not None:
            await self.db.transaction([("DELETE FROM files WHERE name = ?", (n,)) for n in expired])
        if self.parts_root.is_dir():
            for directory in self.parts_root.iterdir():
                if directory.stat().st_mtime < now - 86400:
                    shutil.rmtree(directory, ignore_errors=True)
        if expired:
            log.info("deleted %d expired file(s)", len(expired))
        return len(expired)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class OutputSink:
    """ember.endpoints.base.ImageSink over a FileStore: stored files (expiring after `ttl` seconds when set),
    or data URIs when `sync_mode`."""

    store: FileStore
    sync_mode: bool
    ttl: float | None = None

    async def __call__(self, image: np.ndarray, fmt: str, /) -> StoredImage:
        if self.sync_mode:
            return await self.store.inline(image, fmt)
        return await self.store.save(image, fmt, self.ttl)

    async def file(self, data: bytes, content_type: str, extension: str, /) -> StoredFile:
        if self.sync_mode:
            return await self.store.inline_file(data, content_type, extension)
        return await self.store.save_file(data, content_type, extension, self.ttl)
