"""Images from untrusted clients: decoded and checked here, never trusted by name, content type or URL.

The server fetches nothing: an `http(s)` image URL is refused (fetching it would let any client make the
server reach into its own network). The pixel count is read from the header and checked before a single
pixel is decoded, so a small file that expands to gigapixels (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..data.images import to_rgb

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class UploadError(ValueError):
    """A client's image is unusable; `status` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int, what: str = "the image") -> Image.Image:
    """RGB image from uploaded bytes, or an UploadError saying what is wrong with them."""
    if not data:
        raise UploadError(400, f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit, raises) about huge images; ours is the limit that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UploadError(413, f"{what} has too many pixels (limit {max_pixels:,})") from None
    except (UnidentifiedImageError, OSError):
        raise UploadError(400, f"{what} is not an image (send {', '.join(FORMATS)} bytes)") from None
    if im.format not in FORMATS:
        raise UploadError(400, f"{what} is {im.format}; send one of {', '.join(FORMATS)}")
    if im.width * im.height > max_pixels:
        raise UploadError(
            413,
            f"{what} is {im.width}x{im.height} = {im.width * im.height:,} pixels, over the limit of "
            f"{max_pixels:,}; send a smaller image",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
        return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UploadError(400, f"{what} cannot be decoded (truncated or corrupt {im.format}: {e})") from None


def bytes_from_url(url: str) -> bytes:
    """The bytes of a `data:` URI; any other URL is refused (this server fetches nothing)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise UploadError(
            400,
            "image_url is a web address, and this server does not fetch URLs: send the image bytes instead, "
            "as a data URI (data:image/jpeg;base64,...)",
        )
    if scheme != "data":
        raise UploadError(400, "image_url must be a data URI (data:image/png;base64,...)")
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise UploadError(400, "image_url data URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, "image_url data URI holds invalid base64") from None
