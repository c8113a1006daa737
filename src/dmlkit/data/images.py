"""Robust image decoding with OpenCV: grayscale, CMYK, 16-bit and alpha images are converted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)
_FLOAT_WARNED: list[str] = []  # the first float image outside 0..1 (warned once a process)


class UnreadableImageError(OSError):
    """An image file that is missing, empty, truncated or not an image."""


_UNDECODABLE = "not a decodable image (truncated or another format)"


def read_image_bytes(path: str | Path) -> bytes:
    """The file's bytes, or UnreadableImageError naming it (missing, unreadable, empty)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: image file not found") from None
    except OSError as exc:
        raise UnreadableImageError(f"{path}: cannot read: {exc}") from None
    if not data:
        raise UnreadableImageError(f"{path}: image file is empty (0 bytes)")
    return data


def image_problem(path: str | Path) -> str | None:
    """None when the image decodes, else what is wrong with it (the message `read_image` raises).

    JPEGs decode at 1/8 scale, gray (libjpeg's scaled decoding skips most of the inverse DCT): on a
    3 MP JPEG 6.6 ms against 10.5 ms for the full decode; OpenCV refuses a truncated JPEG either way.
    Other formats decode in full (OpenCV would decode, then resize them).
    """
    path = Path(path)
    try:
        data = read_image_bytes(path)
    except UnreadableImageError as exc:
        return str(exc)
    flag = cv2.IMREAD_REDUCED_GRAYSCALE_8 if data[:3] == b"\xff\xd8\xff" else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if image is None or image.size == 0:
        return f"{path}: {_UNDECODABLE}"
    return None


_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_ENDS = {_JPEG: b"\xff\xd9", _PNG: b"IEND\xaeB`\x82"}  # end-of-image marker, IEND chunk type and CRC


def image_header_problem(path: str | Path, first: int = 4096) -> str | None:
    """`image_problem`'s verdict at the cost of a header read for whole JPEG and PNG files: None when
    the file exists, is non-empty, its header gives an image size (a JPEG's frame header, a PNG's IHDR)
    and it ends with its format's end marker. A file that does not end so (truncated, or data appended
    after the image, as motion photos do) and other formats are decoded (`image_problem`). Reads the
    first `first` bytes and the last few; the rest only where EXIF data holds a JPEG's frame header
    further on."""
    try:
        with open(path, "rb") as handle:  # a str, not a Path per image: a third of the cost
            head = handle.read(first)
            if not head:
                return f"{path}: image file is empty (0 bytes)"
            magic = _JPEG if head[:3] == _JPEG else _PNG if head[:8] == _PNG else None
            if magic is None:
                return image_problem(path)
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - len(_ENDS[magic])))
            if handle.read() != _ENDS[magic]:
                return image_problem(path)
            if magic == _PNG:
                wide, high = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
                ok = len(head) >= 24 and head[12:16] == b"IHDR" and wide > 0 and high > 0
                return None if ok else f"{path}: PNG without a valid IHDR header"
            shape = jpeg_size(head)
            if shape is None and size > len(head):
                handle.seek(0)
                shape = jpeg_size(handle.read())
            return None if shape is not None and min(shape) > 0 else f"{path}: JPEG without a frame size in its header"
    except FileNotFoundError:
        return f"{path}: image file not found"
    except OSError as exc:
        return f"{path}: cannot read: {exc}"


_REDUCED = {  # OpenCV decodes JPEGs at 1/2, 1/4, 1/8 scale (libjpeg's scaled IDCT): far less work
    (3, 2): cv2.IMREAD_REDUCED_COLOR_2,
    (3, 4): cv2.IMREAD_REDUCED_COLOR_4,
    (3, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (1, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (1, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header (a few bytes read: no decode), or None."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG from its header; None for other formats or an unreadable header."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    size = jpeg_size(data)
    return None if size is None or min(size) == 0 else size


def jpeg_orientation(data: bytes) -> int:
    """A JPEG's EXIF orientation (1–8, from the APP1 segment before its frame header); 1 where there
    is none or it cannot be read. A few header bytes are parsed, nothing is decoded."""
    if data[:3] != _JPEG:
        return 1
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xDA or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return 1  # the frame (or scan) begins: EXIF comes before it
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10 : i + 2 + length])
        i += 2 + length
    return 1


def png_orientation(data: bytes) -> int:
    """A PNG's EXIF orientation (1–8, its eXIf chunk: a TIFF block as in a JPEG's APP1); 1 where
    there is none. Chunk headers are read, nothing is decoded."""
    if data[:8] != _PNG:
        return 1
    i = 8
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        if kind == b"eXIf":
            return _tiff_orientation(data[i + 8 : i + 8 + length])
        if kind == b"IEND":
            return 1
        i += 12 + length
    return 1


def orientation(data: bytes) -> int:
    """The EXIF orientation a JPEG or PNG carries (1: none), as `cv2.imread` shows a JPEG."""
    return jpeg_orientation(data) if data[:3] == _JPEG else png_orientation(data)


def _tiff_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of the first image directory of EXIF's TIFF block; 1 where absent or malformed."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    directory = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[directory : directory + 2], order) if directory + 2 <= len(tiff) else 0
    for n in range(count):
        entry = directory + 2 + 12 * n
        if entry + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels (H×W×C) as EXIF `orientation` says to show them, as `cv2.imread` does:
    2 mirrored, 3 turned 180°, 4 flipped, 5 transposed, 6 turned 90° clockwise, 7 transversed,
    8 turned 90° counter-clockwise."""
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: a.transpose(1, 0, 2)[::-1],
    }.get(orientation)
    return image if turned is None else np.ascontiguousarray(turned(image))


def oriented_jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """`jpeg_shape` of the image as shown: height and width swapped for orientations 5–8."""
    shape = jpeg_shape(data)
    return shape[::-1] if shape is not None and jpeg_orientation(data) >= 5 else shape


def jpeg_reduction(data: bytes, min_side: int) -> int:
    """The largest of 8, 4, 2 by which this JPEG can be decoded with its shorter side still ≥
    `min_side`; 1 for other formats, small images, or when the header cannot be read."""
    size = jpeg_shape(data)
    if size is None:
        return 1
    return next((k for k in (8, 4, 2) if min(size) // k >= min_side), 1)


def to_uint8(image: np.ndarray, path: str | Path = "") -> np.ndarray:
    """8 bits from a wider sample type, scaled by the type's range (the same for every image):
    16-bit by 65535 (a PNG holding 12-bit data scales it up to 16 bits, per the PNG spec). Never by
    an integer image's own maximum, which would brighten dark images and darken 12-bit ones.

    Float images have no range in their type: 0..1 (the convention) is scaled by 255, 0..255 kept,
    anything else stretched from its own minimum to its maximum, with a warning (once a process)."""
    if np.issubdtype(image.dtype, np.floating):
        values = np.nan_to_num(image.astype(np.float32))
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        else:
            if not _FLOAT_WARNED:
                _FLOAT_WARNED.append(str(path))
                log.warning(
                    "%s: a float image with values in [%g, %g], not 0..1: %s (the first; other such images alike)",
                    path,
                    low,
                    high,
                    "taken as 0..255" if low >= 0.0 and high <= 255.0 else "stretched from its minimum to its maximum",
                )
            in_bytes = low >= 0.0 and high <= 255.0
            scaled = values if in_bytes else (values - low) * (255.0 / max(high - low, 1e-12))
    else:
        scaled = image.astype(np.float32) * (255.0 / np.iinfo(image.dtype).max)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_image(path: str | Path, channels: int = 3, min_side: int | None = None) -> np.ndarray:
    """Decode to uint8 HxWx3 RGB (channels=3) or HxWx1 gray (channels=1), or raise naming the file.
    A JPEG's (or PNG's eXIf) EXIF orientation is applied, as `cv2.imread` does for a JPEG (a phone
    photo stored sideways is shown upright).

    `min_side`: the pipeline needs no more than this many pixels on the shorter side, so a JPEG at
    least twice that size is decoded at 1/2, 1/4 or 1/8 scale."""
    return decode_image(read_image_bytes(path), path, channels, min_side)


def decode_image(data: bytes, path: str | Path, channels: int = 3, min_side: int | None = None) -> np.ndarray:
    """`read_image` on bytes already read from `path` (named in errors)."""
    return apply_orientation(_decode_stored(data, path, channels, min_side), orientation(data))


def _decode_stored(data: bytes, path: str | Path, channels: int, min_side: int | None) -> np.ndarray:
    """The pixels as stored (EXIF orientation not applied), converted to uint8 RGB or gray."""
    path = Path(path)
    reduction = jpeg_reduction(data, min_side) if min_side else 1
    if reduction > 1:
        flag = _REDUCED[(1 if channels == 1 else 3, reduction)] | cv2.IMREAD_IGNORE_ORIENTATION
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if image is not None and image.size:
            image = image[..., None] if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            return image
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise UnreadableImageError(f"{path}: {_UNDECODABLE}")
    if image.dtype != np.uint8:
        image = to_uint8(image, path)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 4:  # alpha: composite on white, as a viewer shows it
        alpha = image[..., 3:4].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if channels == 1:
        if image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[..., None]
        return image
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
