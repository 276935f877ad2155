"""Image input/output and metrics.

Accepted inputs: a path (anything Pillow reads), a PIL image, a uint8 numpy array
[H, W], [H, W, 1] or [H, W, 3], or a float tensor [C, H, W] (C = 1 or 3) in [0, 1].
Conversions, all lossless: palette images are expanded to RGB (or L for gray palettes);
bilevel '1' images become L; RGBA / LA / PA images whose alpha is fully opaque drop it.
Rejected with ImageError: images with real transparency, 16-bit or float images, and
other modes (CMYK, YCbCr, ...) — convert them first.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


class ImageError(ValueError):
    """The input cannot be coded by n2l (unsupported mode, bit depth, shape or value range)."""


def _from_pil(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise ImageError(f"{img.mode} image has transparency; n2l codes no alpha channel "
                             "(flatten it onto a background first)")
        img = img.convert("L" if img.mode == "LA" else "RGB")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("RGB", "L"):
        raise ImageError(f"unsupported image mode {img.mode!r}: n2l codes 8-bit RGB or grayscale "
                         "(16-bit, float and CMYK images must be converted first)")
    return np.asarray(img)


def load_image(image: ImageLike) -> np.ndarray:
    """Any accepted input -> uint8 array [H, W, C] with C = 1 or 3."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as img:
                img.load()
                array = _from_pil(img)
        except (OSError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot read image {os.fspath(image)!r}: {e}") from None
    elif isinstance(image, Image.Image):
        array = _from_pil(image)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
            raise ImageError(f"tensor images must be float [C, H, W] with C = 1 or 3, got "
                             f"{image.dtype} {tuple(image.shape)}")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ImageError("tensor images must hold finite values in [0, 1]")
        array = (image.detach().cpu().float() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8, got {image.dtype}")
        array = image
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3) or 0 in array.shape:
        raise ImageError(f"expected an image of shape [H, W], [H, W, 1] or [H, W, 3], got {array.shape}")
    return np.ascontiguousarray(array)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] -> float32 [1, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (MSE over all channels); inf if identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_image(array: np.ndarray, path: str | os.PathLike) -> None:
    """Save uint8 [H, W, C] atomically; the format follows the file extension (PNG by default)."""
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    ext = Path(path).suffix.lower().lstrip(".")
    fmt = Image.registered_extensions().get(f".{ext}", "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    atomic_write(path, buf.getvalue())
