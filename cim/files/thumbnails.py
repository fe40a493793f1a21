"""Image checks and thumbnails with Pillow, under one memory budget for all of them.

Receivers show images as thumbnails and fetch the full file only when asked (design:
图片只显示缩略图), so every image gets a small JPEG or PNG when its upload completes.
Image decoders are the classic way to make a server spend memory it does not have:
a 12 KB PNG can declare 100 million pixels. So:

- the declared pixel count is checked before any pixel is decoded, and Pillow's own
  decompression-bomb guard is set to the same limit;
- the memory decoding will take is estimated from the header (``estimate``): the
  decoded size (a JPEG is decoded at 1/2, 1/4 or 1/8 scale with Pillow's ``draft``),
  the whole-image coefficient buffer of a progressive JPEG, libwebp's own copy, and
  a fixed allowance for the rest;
- the decoded image is then reduced strip by strip (``Image.reduce`` on a few
  megabytes at a time), so nothing beyond the decoded image itself is ever as large
  as the picture;
- all thumbnailing of a node shares one budget (``[files] thumbnail_memory``,
  ``ThumbnailBudget``): an image waits until its estimate fits beside the ones being
  made, so eight large images at once take turns instead of multiplying memory, and
  an image whose estimate alone exceeds the budget is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from twisted.internet.defer import Deferred

from cim.backends.threads import ThreadPoolRunner

__all__ = [
    "DECODABLE",
    "THUMBNAIL_MIME",
    "DecodeEstimate",
    "ImageInfo",
    "ImageRefused",
    "ThumbnailBudget",
    "Thumbnailer",
    "estimate",
    "make_thumbnail",
    "set_pixel_limit",
]

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

_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# EXIF orientations 5-8 turn the picture by 90 degrees.
_TRANSPOSED = frozenset((5, 6, 7, 8))

STRIP_BYTES = 4 << 20
"""How much of the decoded image is converted and reduced at a time."""

OVERHEAD = 24 << 20
"""What a thumbnail costs besides its decoded image: strips, the reduced copy, the
decoder's and encoder's buffers."""

_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
"""Pillow's storage per pixel; every other mode (RGB included) takes four bytes."""


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


@dataclass(frozen=True)
class DecodeEstimate:
    """What making an image's thumbnail will cost, read from its header."""

    format: str
    width: int
    height: int
    memory: int
    """Bytes, at most, that decoding and reducing it will hold at once."""


def set_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's process-wide bomb guard agree with ``[files] max_image_pixels``.

    Pillow warns between the limit and twice the limit, and raises above; the
    explicit check in ``estimate`` refuses everything over the limit anyway, so the
    warning would only be noise in the log.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextlib.contextmanager
def _opened(source: str, declared_mime: str, max_pixels: int) -> Any:
    """The image, its header read, nothing decoded; refusals as ``ImageRefused``."""
    try:
        with Image.open(source, formats=list(DECODABLE.values())) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRefused(
                    "image_too_large",
                    f"the image has {width}x{height} pixels; at most {max_pixels} are accepted",
                )
            yield image
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


def _decode_memory(image: Image.Image, longest_side: int) -> int:
    """Bytes decoding ``image`` will hold, from its header (drafts a JPEG first)."""
    width, height = image.size
    fmt = image.format or ""
    if fmt == "JPEG":
        image.draft("RGB", (longest_side, longest_side))
    decoded_w, decoded_h = image.size
    memory = decoded_w * decoded_h * _BYTES_PER_PIXEL.get(image.mode, 4)
    if fmt == "JPEG" and image.info.get("progressive"):
        # libjpeg keeps every DCT coefficient (2 bytes each) of a progressive image
        # until the last scan, whatever the output scale.
        memory += _coefficient_bytes(image, width, height)
    elif fmt == "WEBP":
        # libwebp decodes into two RGBA canvases of its own, and Pillow copies the
        # frame once more before it becomes the image.
        memory += 3 * width * height * 4
    return memory + OVERHEAD


def _coefficient_bytes(image: Image.Image, width: int, height: int) -> int:
    """A progressive JPEG's coefficient buffer: each component at its sampling."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    most_h = max(layer[1] for layer in layers) or 1
    most_v = max(layer[2] for layer in layers) or 1
    total = 0
    for _, h_sampling, v_sampling, _ in layers:
        blocks_wide = math.ceil(width * h_sampling / most_h / 8)
        blocks_high = math.ceil(height * v_sampling / most_v / 8)
        total += blocks_wide * blocks_high * 64 * 2
    return total


def estimate(
    source: str, declared_mime: str, longest_side: int, max_pixels: int
) -> DecodeEstimate | None:
    """What thumbnailing ``source`` will cost, or None if it is no decodable image type.

    Blocking (it reads the header): call it on the file pool.
    """
    if declared_mime not in DECODABLE:
        return None
    with _opened(source, declared_mime, max_pixels) as image:
        width, height = image.size
        fmt = image.format or DECODABLE[declared_mime]
        return DecodeEstimate(fmt, width, height, _decode_memory(image, longest_side))


def make_thumbnail(
    source: str,
    destination: Callable[[str], str],
    declared_mime: str,
    longest_side: int,
    max_pixels: int,
) -> ImageInfo | None:
    """Check an uploaded image and write its thumbnail to ``destination(format)``.

    Returns None for anything not declared as a decodable image type (it is stored
    as a plain file). Blocking: call it on the file pool, within the budget of its
    ``estimate`` (``Thumbnailer`` does both).
    """
    expected = DECODABLE.get(declared_mime)
    if expected is None:
        return None
    with _opened(source, declared_mime, max_pixels) as image:
        width, height = image.size
        fmt = image.format or expected
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        alpha = _has_alpha(image)
        _decode_memory(image, longest_side)  # the same draft as the estimate
        image.load()
        small = _reduced(image, longest_side, "RGBA" if alpha else "RGB")
    # The decoded image is released here; what follows works on the small copy.
    small.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    transpose = _ORIENTATIONS.get(orientation)
    if transpose is not None:
        small = small.transpose(transpose)
    thumbnail_format = _write_thumbnail(small, destination, alpha)
    if orientation in _TRANSPOSED:
        width, height = height, width
    return ImageInfo(MIME_BY_FORMAT.get(fmt, declared_mime), width, height, thumbnail_format)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _reduced(image: Image.Image, longest_side: int, mode: str) -> Image.Image:
    """``image`` in ``mode``, shrunk by a whole factor to about twice ``longest_side``.

    Done a strip of rows at a time, so the only full-size allocation is the decoded
    image itself: converting (a palette image to RGB, say) or premultiplying alpha
    (which ``Image.reduce`` does for RGBA) a whole 100-megapixel image would double it.
    """
    width, height = image.size
    factor = max(1, int(max(width, height) / longest_side / 2))
    if factor == 1:
        return image.convert(mode)
    reduced = Image.new(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    rows = max(factor, STRIP_BYTES // (width * 4) // factor * factor)
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        if strip.mode != mode:
            strip = strip.convert(mode)
        reduced.paste(strip.reduce(factor), (0, top // factor))
    return reduced


def _write_thumbnail(image: Image.Image, destination: Callable[[str], str], alpha: bool) -> str:
    options: dict[str, Any]
    if alpha:
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


class ThumbnailBudget:
    """Bytes of thumbnailing memory, handed out first come, first served.

    Used on the reactor thread: waiting costs no thread of the file pool. A large
    image at the head of the line is not overtaken by small ones behind it, so it
    cannot starve.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self.peak = 0
        self.waited = 0
        """How many acquisitions had to wait for room."""
        self._line: deque[tuple[int, Deferred[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def acquire(self, amount: int) -> Deferred[None]:
        """Fires once ``amount`` is held; ``amount`` must not exceed ``total``."""
        if amount > self.total:
            raise ValueError(f"{amount} bytes exceed the budget of {self.total}")
        granted: Deferred[None] = Deferred(lambda d: self._withdraw(d))
        self._line.append((amount, granted))
        self._grant()
        if not granted.called:
            self.waited += 1
        return granted

    def release(self, amount: int) -> None:
        self.in_use -= amount
        self._grant()

    def _grant(self) -> None:
        while self._line and self.in_use + self._line[0][0] <= self.total:
            amount, granted = self._line.popleft()
            self.in_use += amount
            self.peak = max(self.peak, self.in_use)
            granted.callback(None)

    def _withdraw(self, cancelled: Deferred[None]) -> None:
        self._line = deque(entry for entry in self._line if entry[1] is not cancelled)
        self._grant()


class Thumbnailer:
    """Makes thumbnails on the file pool, each once its estimate fits in the budget."""

    def __init__(
        self,
        work: ThreadPoolRunner,
        budget: ThumbnailBudget,
        longest_side: int,
        max_pixels: int,
    ) -> None:
        self.work = work
        self.budget = budget
        self.longest_side = longest_side
        self.max_pixels = max_pixels

    def snapshot(self) -> dict[str, int]:
        """For /health: the budget, what is held now, the most held at once, the line."""
        budget = self.budget
        return {
            "memory_budget": budget.total,
            "memory_in_use": budget.in_use,
            "memory_peak": budget.peak,
            "waiting": budget.waiting,
            "waited": budget.waited,
        }

    async def make(
        self, source: str, destination: Callable[[str], str], declared_mime: str
    ) -> ImageInfo | None:
        """``make_thumbnail``, within the budget; raises ``ImageRefused``."""
        side, pixels = self.longest_side, self.max_pixels
        cost = await self.work.run(lambda: estimate(source, declared_mime, side, pixels))
        if cost is None:
            return None
        if cost.memory > self.budget.total:
            raise ImageRefused(
                "image_too_large",
                f"a thumbnail of this {cost.width}x{cost.height} {cost.format} image needs "
                f"{cost.memory >> 20} MiB; the server allows {self.budget.total >> 20} MiB",
            )
        await self.budget.acquire(cost.memory)
        try:
            return await self.work.run(
                lambda: make_thumbnail(source, destination, declared_mime, side, pixels)
            )
        finally:
            self.budget.release(cost.memory)
