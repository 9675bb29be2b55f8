"""The gateway's MediaLoader (ember.endpoints.base): what endpoints' translate code calls to read URL
inputs. One path for every endpoint and every URL field:

1. A URL naming one of the gateway's own files (`{any base we hand out}/files/{name}`: an output, or
   an upload through storage.py) is read from the file store: no network, and no public-address rule
   to trip over, since the gateway's own address is usually private. Only the exact origins the
   gateway advertises count, and only names it hands out, so this opens nothing else.
2. Anything else goes through the SSRF-safe fetcher (http(s) and data: only, public addresses only
   unless EMBER_FETCH_ALLOW says otherwise, pinned connect, per-hop redirect checks, byte and time
   limits).
3. Images are decoded with media.decode_image (formats and pixels limited) off the event loop;
   weights must be safetensors (weights.check_safetensors).

Every failure is an InputError at the field's `loc`, which the worker answers 422.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ember.endpoints.common import InputError, Loc, WeightsFile
from ember.gateway.checkpoints import CheckpointCache
from ember.gateway.fetcher import Fetcher, FetchError
from ember.gateway.files import FILE_NAME, FileStore, FileTooLarge
from ember.gateway.media import ImageInputError, decode_image
from ember.gateway.weights import check_safetensors

MAX_JSON_BYTES = 64 * 1024  # a model config.json (a ControlNet's is about 1 KiB)


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host.lower()}:{port}"


class GatewayMedia:
    def __init__(
        self, fetcher: Fetcher, files: FileStore, own_bases: tuple[str, ...], *, max_image_bytes: int,
        max_weights_bytes: int, checkpoints: CheckpointCache | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.files = files
        self.checkpoints = checkpoints
        self._own_origins = frozenset(o for o in (_origin(b) for b in own_bases) if o)
        self.max_image_bytes = max_image_bytes
        self.max_weights_bytes = max_weights_bytes

    def own_file(self, url: str) -> str | None:
        """The file name if `url` is one of our own file URLs, else None."""
        origin = _origin(url)
        if origin is None or origin not in self._own_origins:
            return None
        parts = urlsplit(url)
        segments = parts.path.split("/")
        if len(segments) != 3 or segments[1] != "files" or parts.query or parts.fragment:
            return None
        return segments[2] if FILE_NAME.match(segments[2]) else None

    async def read(self, url: str, loc: Loc, max_bytes: int) -> tuple[bytes, str]:
        """The bytes and content type `url` names."""
        name = self.own_file(url)
        try:
            if name is not None:
                found = await self.files.read(name, max_bytes)
                if found is None:
                    raise InputError(loc, "the file this URL names does not exist or has expired", "url_fetch_error")
                return found
            fetched = await self.fetcher.fetch(url, max_bytes=max_bytes)
            return fetched.data, fetched.content_type
        except FetchError as exc:
            raise InputError(loc, exc.msg, exc.kind) from None
        except FileTooLarge as exc:
            raise InputError(loc, str(exc), "file_too_large") from None

    async def image(self, url: str, loc: Loc, *, mode: str = "RGB") -> np.ndarray:
        data, _ = await self.read(url, loc, self.max_image_bytes)
        try:
            return await asyncio.to_thread(decode_image, data, mode=mode)
        except ImageInputError as exc:
            raise InputError(loc, exc.msg, exc.kind) from None

    async def checkpoint(self, url: str, loc: Loc, *, kind: str = "model") -> str:
        """A single-file model checkpoint streamed to the shared checkpoint directory (ember.gateway.checkpoints):
        its absolute path, named by its sha256. `kind` "unet": UNet weights only (CheckpointCache.fetch)."""
        if self.checkpoints is None:
            raise InputError(loc, "this gateway does not fetch model checkpoints", "not_supported")
        path = await self.checkpoints.fetch(url, loc, own_name=self.own_file(url), kind=kind)
        return str(path)

    async def json(self, url: str, loc: Loc) -> dict[str, Any]:
        data, _ = await self.read(url, loc, MAX_JSON_BYTES)
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InputError(
                loc, "this URL does not hold a JSON document (a config.json)", "invalid_json"
            ) from None
        if not isinstance(value, dict):
            raise InputError(loc, "a config.json holds a JSON object", "invalid_json")
        return value

    async def weights(self, url: str, loc: Loc) -> WeightsFile:
        data, _ = await self.read(url, loc, self.max_weights_bytes)
        return await asyncio.to_thread(check_safetensors, data, loc, self.max_weights_bytes)

    async def model_pack(self, url: str, loc: Loc) -> str:
        """An InsightFace model pack .zip streamed to the shared checkpoint directory like a checkpoint
        (hundreds of MB: never in memory, never in a Triton tensor), its central directory checked: its path."""
        return await self.checkpoint(url, loc, kind="pack")
