"""Single-file model checkpoints named by URL (fal-ai/lora `model_name`; UNet-only files: `unet_name` and
the IC-Light offsets of `ic_light_model_url`; single-file ControlNets: `controlnets[].path`; InsightFace
model pack .zips: `ip_adapter[].insight_face_model_path`): streamed to disk, never held in memory or sent
through a Triton tensor (they are GBs, a pack hundreds of MB).

The URL goes through the SSRF-safe fetcher (or, for the gateway's own file URLs such as fal storage
uploads, is copied from the file store) chunk by chunk into a temporary file under
`<EMBER_LORA_MODEL_ROOT>/checkpoints/`, hashed on the way. It is then checked as safetensors from its
header alone (pickles and malformed layouts refused, as for every weight file), its family read from the
tensor names (SD1.5 and SDXL bases pass; SD 2.x and SDXL refiners refused by name; UNet-only files: UNet
key names required, ember.specs.checkpoint_keys.unet_file_layout; ControlNets: ControlNet key names,
controlnet_file_family), and renamed to `<sha256>.safetensors`: the
same content arriving from any URL is stored once, and the Triton side (which shares the directory) keys
its conversion and export caches by that digest. The Triton model receives the file's path as MODEL_NAME.

Each request asks for its URL again (the content behind a URL may change), but conditionally: when the
last answer for that URL carried an ETag or Last-Modified, the request sends If-None-Match /
If-Modified-Since, and a 304 reuses the stored file without moving a byte (a 6.5 GB SDXL checkpoint named
on every request is downloaded once). Servers without validators are downloaded again, as before. What is
cached by content is the expensive part on the Triton side: conversion, export, and the resident model.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.endpoints.common import InputError, Loc
from ember.gateway.fetcher import Fetcher, FetchError
from ember.gateway.weights import check_model_pack, check_safetensors_file
from ember.specs.checkpoint_keys import checkpoint_family, controlnet_file_family, refusal, unet_file_layout

SUBDIR = "checkpoints"
MAX_KNOWN_URLS = 256  # URLs whose last answer's validators are kept (least recently used leave)


@dataclass(frozen=True)
class _Known:
    """What the last full answer for a URL was: its validators and the file it was stored as."""

    etag: str | None
    last_modified: str | None
    target: Path


class CheckpointCache:
    def __init__(
        self, fetcher: Fetcher, files: Any, directory: Path, *, max_bytes: int, timeout_s: float
    ) -> None:
        self.fetcher = fetcher
        self.files = files  # the gateway's FileStore (own file URLs), or None
        self.directory = directory
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._known: OrderedDict[str, _Known] = OrderedDict()

    async def fetch(self, url: str, loc: Loc, own_name: str | None = None, kind: str = "model") -> Path:
        """The checked checkpoint `url` names, as `<directory>/<sha256>.safetensors`; InputError at `loc`.
        `kind`: "model" (a full SD checkpoint, family checked) or "unet" (UNet weights only: a single-file
        UNet or an IC-Light offset file, in diffusers or LDM key names) or "controlnet" (a single-file
        ControlNet, SD1.5 or SDXL, in diffusers or original key names) or "pack" (an InsightFace model pack
        .zip of ONNX files, stored as `<sha256>.zip`)."""
        if kind not in ("model", "unet", "controlnet", "pack"):
            raise ValueError(f"unknown checkpoint kind {kind!r}")
        suffix = ".zip" if kind == "pack" else ".safetensors"
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=self.directory)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:

                def sink(chunk: bytes) -> None:  # chunks of the HTTP body (~64 KiB): written as they come
                    digest.update(chunk)
                    out.write(chunk)

                fetched = None
                if own_name is not None:
                    await asyncio.to_thread(self._copy_own, own_name, out, digest, loc)
                else:
                    known = self._known.get(url)
                    if known is not None and not known.target.is_file():
                        known = None  # the stored copy was removed: ask unconditionally
                    try:
                        fetched = await self.fetcher.stream(
                            url,
                            sink,
                            max_bytes=self.max_bytes,
                            timeout_s=self.timeout_s,
                            etag=known.etag if known else None,
                            last_modified=known.last_modified if known else None,
                        )
                    except FetchError as exc:
                        raise InputError(loc, exc.msg, exc.kind) from None
                    if fetched.not_modified and known is not None:  # 304: the stored copy is current
                        self._known.move_to_end(url)
                        await asyncio.to_thread(self._check, known.target, loc, kind, self.max_bytes)
                        return known.target
            target = self.directory / f"{digest.hexdigest()}{suffix}"
            if not target.is_file():
                await asyncio.to_thread(self._check, tmp, loc, kind, self.max_bytes)
                os.replace(tmp, target)
            else:  # cheap: the header (a zip's central directory) only
                await asyncio.to_thread(self._check, target, loc, kind, self.max_bytes)
            if fetched is not None and (fetched.etag or fetched.last_modified):
                self._known[url] = _Known(fetched.etag, fetched.last_modified, target)
                self._known.move_to_end(url)
                while len(self._known) > MAX_KNOWN_URLS:
                    self._known.popitem(last=False)
            return target
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_own(self, name: str, out: Any, digest: Any, loc: Loc) -> None:
        path = self.files.path_of(name) if self.files is not None else None
        if path is None or not Path(path).is_file():
            raise InputError(loc, "the file this URL names does not exist or has expired", "url_fetch_error")
        if Path(path).stat().st_size > self.max_bytes:
            raise InputError(loc, f"the checkpoint is larger than {self.max_bytes} bytes", "file_too_large")
        with open(path, "rb") as src:
            while block := src.read(1 << 22):
                digest.update(block)
                out.write(block)

    @staticmethod
    def _check(path: Path, loc: Loc, kind: str = "model", max_bytes: int = 0) -> None:
        if kind == "pack":
            check_model_pack(path, loc, max_bytes)
            return
        weights = check_safetensors_file(path, loc)
        if kind == "controlnet":
            try:
                controlnet_file_family(weights.tensors)
            except ValueError as exc:
                raise InputError(loc, str(exc), "invalid_weights") from None
            return
        if kind == "unet":
            try:
                unet_file_layout(weights.tensors)
            except ValueError as exc:
                raise InputError(loc, str(exc), "invalid_weights") from None
            return
        try:
            family = checkpoint_family(weights.tensors)
        except ValueError as exc:
            raise InputError(loc, str(exc), "invalid_weights") from None
        message = refusal(family, "this checkpoint")
        if message is not None:
            raise InputError(loc, message, "not_supported")
