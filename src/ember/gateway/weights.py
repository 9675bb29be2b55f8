"""User weight files (LoRA, textual-inversion embeddings, ControlNet): safetensors only.

A pickle (`.bin`, `.pt`, `.ckpt`: a zip of pickles or a raw pickle stream) runs code when it is
loaded, so it is refused by sniffing its first bytes, whatever its name or content type says. A
safetensors file is checked before anything loads it: the header length, the header JSON, every
tensor's dtype, shape and byte range (inside the data section, matching dtype x shape, contiguous,
no overlaps), so a hostile header cannot make a loader read out of bounds or allocate wildly.
Format: https://github.com/huggingface/safetensors#format.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from pathlib import Path

from ember.endpoints.common import InputError, Loc, TensorInfo, WeightsFile

ONLY_SAFETENSORS = "only .safetensors weights are accepted"
# safetensors' own reader refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
MAX_TENSORS = 200_000
MAX_DIMS = 8

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# (magic prefix, what it is): formats people send as weights that must never be loaded.
_REFUSED: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth/.ckpt checkpoint holds pickles)"),
    (b"\x80\x02", "a Python pickle"),
    (b"\x80\x03", "a Python pickle"),
    (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"),
    (b"GGUF", "a GGUF file"),
    (b"\x89HDF", "an HDF5 file"),
)


def _refuse(loc: Loc, why: str) -> InputError:
    return InputError(loc, f"{ONLY_SAFETENSORS}: {why}", "invalid_weights")


def check_safetensors(data: bytes, loc: Loc, max_bytes: int | None = None) -> WeightsFile:
    """The parsed, checked safetensors file; InputError (422 at `loc`) for anything else."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InputError(loc, f"the weights file is larger than {max_bytes} bytes", "file_too_large")
    tensors, metadata = _check_layout(data, len(data), loc)
    return WeightsFile(data=data, tensors=tensors, metadata=metadata)


def check_safetensors_file(path: Path, loc: Loc) -> WeightsFile:
    """The same checks on a file on disk (a multi-GB checkpoint): only its header is read. The returned
    WeightsFile carries no data; the file stays where it is."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8 and not any(head.startswith(magic) for magic, _ in _REFUSED):
            (header_len,) = struct.unpack("<Q", head)
            head += f.read(min(header_len, MAX_HEADER_BYTES + 1))
    tensors, metadata = _check_layout(head, size, loc)
    return WeightsFile(data=b"", tensors=tensors, metadata=metadata)


def _check_layout(data: bytes, size: int, loc: Loc) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """`data`: the file's first bytes (at least its 8-byte length and header); `size`: the whole file's."""
    for magic, what in _REFUSED:
        if data.startswith(magic):
            raise _refuse(loc, f"this file is {what}")
    if size < 8 or len(data) < 8:
        raise _refuse(loc, "the file is too short to be safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > min(size, len(data)):
        raise _refuse(loc, "the header length does not fit the file (not a safetensors file, or truncated)")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(loc, "the header is not JSON (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise _refuse(loc, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _refuse(loc, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _refuse(loc, f"more than {MAX_TENSORS} tensors")
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor(name, entry, data_len, loc)
    # The byte ranges must tile the data section exactly: no gaps, no overlaps, nothing after.
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            raise _refuse(loc, "tensor byte ranges overlap or leave gaps")
        position = info.end
    if position != data_len:
        raise _refuse(loc, "the data section does not match the tensors the header lists")
    return tensors, dict(metadata)


def _tensor(name: str, entry: object, data_len: int, loc: Loc) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _refuse(loc, f"tensor {name!r}: not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _refuse(loc, f"tensor {name!r}: unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _refuse(loc, f"tensor {name!r}: bad shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _refuse(loc, f"tensor {name!r}: bad data_offsets")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise _refuse(loc, f"tensor {name!r}: data_offsets outside the file")
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _refuse(loc, f"tensor {name!r}: {end - start} bytes do not hold {dtype} x {shape}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)


def check_model_pack(source: Path | bytes, loc: Loc, max_bytes: int) -> None:
    """A zip (a path or its bytes) whose .onnx members exist and unpack to at most 2 x max_bytes (no zip
    bombs); the Triton side unpacks only those, flattened (ember.pipeline.face_analysis.unpack)."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".onnx") and not m.is_dir()]
    except (zipfile.BadZipFile, OSError):
        raise InputError(loc, "this URL does not hold a .zip model pack", "invalid_archive") from None
    if not members:
        raise InputError(
            loc, "the .zip holds no .onnx model files (an InsightFace pack has them)", "invalid_archive"
        )
    if sum(m.file_size for m in members) > 2 * max_bytes:
        raise InputError(
            loc, f"the pack's ONNX files unpack to more than {2 * max_bytes} bytes", "file_too_large"
        )
