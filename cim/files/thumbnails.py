"""Image checks and thumbnails with Pillow, run on the file thread pool.

Receivers show images as thumbnails and fetch the full file only when asked (design:
图片只显示缩略图), so every image gets a small JPEG or PNG when its upload completes.
Image decoders are the classic way to make a server spend memory it does not have:
the declared pixel count is checked before any pixel is decoded, and Pillow's own
decompression-bomb guard is set to the same limit.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

# Declared types we decode; the decoded format decides the type we serve.
DECODABLE = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
}
MIME_BY_FORMAT = {fmt: mime for mime, fmt in DECODABLE.items()}
THUMBNAIL_MIME = {"jpeg": "image/jpeg", "png": "image/png"}

# EXIF orientations 5-8 turn the picture by 90 degrees.
_TRANSPOSED = frozenset((5, 6, 7, 8))
_EXIF_ORIENTATION = 0x0112


class ImageRefused(Exception):
    """An upload declared as an image that must not be stored."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    mime: str
    width: int
    height: int
    thumbnail: str
    """The thumbnail's format: "jpeg" or "png"."""


def set_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's process-wide bomb guard agree with ``[files] max_image_pixels``.

    Pillow warns between the limit and twice the limit, and raises above; the
    explicit check in ``make_thumbnail`` refuses everything over the limit anyway,
    so the warning would only be noise in the log.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def make_thumbnail(
    source: str,
    destination: Callable[[str], str],
    declared_mime: str,
    longest_side: int,
    max_pixels: int,
) -> ImageInfo | None:
    """Check an uploaded image and write its thumbnail to ``destination(format)``.

    Returns None for anything not declared as a decodable image type (it is stored
    as a plain file). Blocking: call it on the file pool.
    """
    expected = DECODABLE.get(declared_mime)
    if expected is None:
        return None
    try:
        with Image.open(source, formats=list(DECODABLE.values())) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRefused(
                    "image_too_large",
                    f"the image has {width}x{height} pixels; at most {max_pixels} are accepted",
                )
            fmt = image.format or expected
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            # JPEG can decode at 1/2, 1/4 or 1/8 scale: far less memory and time.
            image.draft("RGB", (longest_side, longest_side))
            image.load()
            upright = ImageOps.exif_transpose(image)
            thumbnail_format = _write_thumbnail(upright, destination, longest_side)
    except Image.DecompressionBombError:
        raise ImageRefused(
            "image_too_large", f"the image has more than {max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageRefused(
            "bad_image", f"the file is not a {declared_mime} image this server can read"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ImageRefused("bad_image", "the image is damaged or truncated") from None
    if orientation in _TRANSPOSED:
        width, height = height, width
    return ImageInfo(MIME_BY_FORMAT.get(fmt, declared_mime), width, height, thumbnail_format)


def _write_thumbnail(
    image: Image.Image, destination: Callable[[str], str], longest_side: int
) -> str:
    image.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    options: dict[str, Any]
    if has_alpha:
        image, fmt, options = image.convert("RGBA"), "png", {"optimize": True}
    else:
        image, fmt, options = image.convert("RGB"), "jpeg", {"quality": 85}
    path = destination(fmt)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".thumb-")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=fmt.upper(), **options)
        os.replace(temporary, path)
    except BaseException:
        _unlink(temporary)
        raise
    return fmt


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
