"""Images in: files, folders of files, and dataset cells (PIL images, paths, `datasets`' {"bytes"/"path"}),
all as RGB with their EXIF rotation applied and a decompression-bomb guard."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ..errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF rotation applied; transparency composited on white (not on black, PIL's default); 16-bit
    and float greyscale scaled to 8 bits (PIL's own conversion clips them); CMYK and palettes converted.
    The original mode stays in `.info["source_mode"]`."""
    source = image.mode
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode.startswith(("I", "F")):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max() <= 1.0 else 65535.0 if values.max() > 255 else 255.0
        out = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    else:
        out = image.convert("RGB")
    out.info["source_mode"] = source
    return out


MAX_PIXELS = 100_000_000  # a decompression-bomb guard: 10k x 10k is plenty for any captioning model


def open_image(path: str | os.PathLike | io.BytesIO) -> Image.Image:
    try:
        with Image.open(path) as im:
            # The header alone gives the size: refuse a decompression bomb before decoding a byte of it.
            if im.width * im.height > MAX_PIXELS:
                raise DataError(
                    f"image {path} has {im.width}x{im.height} pixels, over the limit of {MAX_PIXELS:,} "
                    "(a decompression bomb?); shrink it"
                )
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read: {e}") from None


def expand_images(paths: list[str]) -> list[Path]:
    """Image files named directly, plus the images inside named folders (recursively, sorted)."""
    if not paths:
        raise DataError("no images given")
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise DataError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image {p} does not exist")
    return found


def as_image(value: Any, where: str) -> Image.Image:
    """A dataset cell as an RGB image: a PIL image, a path, or {"bytes"/"path"} as `datasets` stores them."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    if isinstance(value, str) and value.startswith("data:"):
        value = io.BytesIO(_data_uri(value, where))
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        return open_image(value)
    if isinstance(value, Image.Image):
        return to_rgb(value)
    raise DataError(f"{where}: expected an image, got {type(value).__name__}")


def _data_uri(uri: str, where: str) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URI (as OpenAI's chat format carries images)."""
    import base64
    import binascii

    head, _, body = uri.partition(",")
    if not head.endswith(";base64"):
        raise DataError(f"{where}: a data URI must be base64 (data:image/png;base64,...), got {head!r}")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as e:
        raise DataError(f"{where}: the data URI is not valid base64 ({e})") from None


def file_of(value: Any) -> str | None:
    """The file an image cell names: a path, or `datasets`' {"path": ...} (None for bytes alone)."""
    if isinstance(value, str):
        return None if value.startswith("data:") else value
    if isinstance(value, dict):
        return value.get("path")
    return None
