"""Decoding untrusted input images with limits (DESIGN.md "Security defaults").

The byte cap is applied before decoding (by the fetcher), the pixel cap before pixels are
allocated (Pillow reads only the header in `open`), and only the formats fal accepts are decoded.
Anything Pillow cannot decode is the caller's error (422), never a server fault.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats fal's image inputs accept.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
# 16.7 MP: well under Pillow's default bomb limit (89 MP), above any input an endpoint resizes from.
MAX_INPUT_PIXELS = 4096 * 4096


class ImageInputError(ValueError):
    def __init__(self, msg: str, kind: str = "invalid_image") -> None:
        super().__init__(msg)
        self.msg = msg
        self.kind = kind


def decode_image(data: bytes, *, mode: str = "RGB", max_pixels: int = MAX_INPUT_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 for mode RGB, (H, W) for mode L; EXIF orientation applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageInputError(
                    f"image format {image.format or 'unknown'} is not accepted "
                    f"(use one of {', '.join(sorted(ALLOWED_FORMATS))})"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageInputError(
                    f"image is {width}x{height}, more than {max_pixels} pixels", "image_too_large"
                )
            image.load()
            return np.asarray(ImageOps.exif_transpose(image).convert(mode))
    except ImageInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"cannot decode the image: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise ImageInputError(f"the image data is corrupt: {exc}") from exc
