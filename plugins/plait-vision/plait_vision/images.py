"""Image parts of messages: where they point, opening and resizing them.

A message's ``content`` may be a list of parts (Axolotl's and OpenAI's shape)::

    {"type": "image", "path": "cats/1.jpg"}         a local file (relative: to the data file's folder, else the cwd)
    {"type": "image", "image": "cats/1.jpg"}        the same
    {"type": "image", "base64": "iVBORw0..."}       the bytes, base64-encoded (a data: URL prefix is accepted)
    {"type": "image"}                               filled from the row's ``images`` (or ``image``) column, in order

A reference is kept as a small dict (``{"path": absolute path}`` or
``{"base64": ...}``) in the prepared data; pixels are read from it when a
micro-batch is collated. URLs are refused: runs do not download.
"""

from __future__ import annotations

import base64
import binascii
import io
import os

#: keys of an image part that hold the image
SOURCE_KEYS = ("path", "image", "base64", "url", "image_url")


class ImageError(ValueError):
    """An image part that cannot be used; the message names the image."""


def is_image_part(part) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("image", "image_url")
                                       or (part.get("type") is None and "image" in part))


def reference(value, base_dir: str | None) -> dict:
    """A stored reference for an image value: a path or base64 text."""
    if isinstance(value, dict):  # {"url": ...} inside image_url, or a nested part
        value = value.get("url") or value.get("path") or value.get("base64")
    if not isinstance(value, str) or not value:
        raise ImageError(f"an image part holds {type(value).__name__} {str(value)[:40]!r}; give a local path or "
                         f"base64 text")
    if value.startswith("data:"):
        return {"base64": value.partition(",")[2]}
    if value.startswith(("http://", "https://")):
        raise ImageError(f"image {value!r} is a URL; Plait does not download images: save it and give its path")
    candidates = [value] if os.path.isabs(value) else [os.path.join(base_dir, value)] if base_dir else []
    candidates.append(os.path.abspath(value))
    for path in candidates:
        if os.path.isfile(path):
            return {"path": os.path.abspath(path)}
    if len(value) > 256 and "\n" not in value[:256]:
        return {"base64": value}  # long text that names no file: the bytes, base64-encoded (JPEG's start with /9j/)
    return {"path": os.path.abspath(candidates[0])}  # missing: reported with this path when opened


def part_reference(part: dict, base_dir: str | None) -> dict | None:
    """The reference of an image part, or ``None`` for a bare ``{"type": "image"}``."""
    if "base64" in part and part["base64"]:
        return {"base64": part["base64"]}
    for key in SOURCE_KEYS:
        if part.get(key):
            return reference(part[key], base_dir)
    return None


def describe(ref: dict) -> str:
    if "path" in ref:
        return ref["path"]
    return f"base64 data ({len(ref['base64'])} characters)"


def open_image(ref: dict, image_size=None, algorithm: str | None = None):
    """The RGB ``PIL.Image`` a reference points to, resized as configured.
    Raises :class:`ImageError` naming the image when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        if "path" in ref:
            source = ref["path"]
            if not os.path.isfile(source):
                raise ImageError(f"image file {source} does not exist")
        else:
            try:
                source = io.BytesIO(base64.b64decode(ref["base64"], validate=False))
            except (binascii.Error, ValueError) as exc:
                raise ImageError(f"image {describe(ref)} is not valid base64: {exc}") from None
        with Image.open(source) as opened:
            image = opened.convert("RGB")  # decodes the whole file: a truncated one fails here
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {describe(ref)} cannot be read: {type(exc).__name__}: {exc}") from None
    return resize(image, image_size, algorithm)


def resize(image, image_size, algorithm: str | None):
    """``image_size``: an int pads to a square keeping the aspect ratio; a
    ``(width, height)`` resizes to exactly that; ``None`` keeps the image."""
    if image_size is None:
        return image
    from PIL import Image, ImageOps

    method = getattr(Image.Resampling, (algorithm or "bilinear").upper())
    if isinstance(image_size, int):
        return ImageOps.pad(image, (image_size, image_size), method=method, color=(0, 0, 0))
    return image.resize(tuple(image_size), method)
