"""Arrays returned to clients as files (fal-ai/lora's debug latents), written as safetensors: a standard,
safe format (a JSON header and raw little-endian data; nothing executes on load, unlike pickles) that
`safetensors.numpy.load_file`, `safetensors.torch.load_file` and other languages read.

Written here by hand (the format is 8 bytes of header length, the header, the data) so the gateway needs
no safetensors or torch package; the tests read every file back with the safetensors library.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

SAFETENSORS_CONTENT_TYPE = "application/octet-stream"  # no registered type; what the HF hub serves
SAFETENSORS_EXTENSION = "safetensors"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """One safetensors file holding `tensors` (float32 / float16 / int64), with string `metadata`."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name, array in tensors.items():
        dtype = _DTYPES.get(array.dtype)
        if dtype is None:
            raise ValueError(f"{name}: dtype {array.dtype} is not one this writer handles ({list(_DTYPES)})")
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
