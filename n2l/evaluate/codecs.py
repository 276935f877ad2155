"""Codecs under evaluation: classical image codecs (quality sweeps) and the n2l adapter.

A codec is anything with ``name``, ``qualities``, ``settings`` (a JSON-able dict that enters
the cache key), ``versions`` (library -> version), ``encode(img, quality) -> bytes``,
``decode(buf) -> uint8 [H, W, 3]`` and ``info(buf, height, width) -> dict`` (extra columns,
e.g. MAC/pixel). Images are uint8 numpy arrays [H, W, 3].
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

import n2l

from ..encoder import DEFAULT_MODE, QUALITY_LAMBDAS, network_structures

ALL_QUALITIES = tuple(range(len(QUALITY_LAMBDAS)))  # n2l's default eval: every level of the ladder

CLASSICAL_CODECS = ("jpeg420", "jpeg444", "webp", "avif", "jxl", "hevc")
# Aliases accepted by --codecs: "jpeg" means both chroma subsamplings.
CODEC_ALIASES = {"jpeg": ("jpeg420", "jpeg444")}


class Codec(Protocol):
    name: str
    qualities: Sequence[float]
    settings: dict[str, Any]
    versions: dict[str, str]

    def encode(self, img: np.ndarray, quality: float) -> bytes: ...

    def decode(self, buf: bytes) -> np.ndarray: ...

    def info(self, buf: bytes, height: int, width: int) -> dict[str, Any]: ...


@dataclass
class FunctionCodec:
    """A codec made of two functions; used for the classical codecs and for test stand-ins."""

    name: str
    qualities: Sequence[float]
    encode_fn: Callable[[np.ndarray, float], bytes]
    decode_fn: Callable[[bytes], np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    quality_label: str = "quality"
    info_fn: Callable[[bytes, int, int], dict[str, Any]] | None = None

    def encode(self, img: np.ndarray, quality: float) -> bytes:
        return self.encode_fn(img, quality)

    def decode(self, buf: bytes) -> np.ndarray:
        return self.decode_fn(buf)

    def info(self, buf: bytes, height: int, width: int) -> dict[str, Any]:
        return self.info_fn(buf, height, width) if self.info_fn else {}


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def _pil_decode(buf: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(buf)) as im:
        return _as_rgb(np.asarray(im.convert("RGB")))


# ----------------------------------------------------------------------------- classical codecs


def _jpeg(subsampling: str) -> FunctionCodec:
    import PIL
    from PIL import Image, features

    sub = {"420": 2, "444": 0}[subsampling]

    def enc(img: np.ndarray, q: float) -> bytes:
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="JPEG", quality=int(q), subsampling=sub, optimize=True)
        return out.getvalue()

    return FunctionCodec(
        name=f"jpeg{subsampling}",
        qualities=(5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95),
        encode_fn=enc,
        decode_fn=_pil_decode,
        settings={"library": "Pillow", "subsampling": f"4:{subsampling[1]}:{subsampling[2]}", "optimize": True},
        versions={"Pillow": PIL.__version__, "libjpeg": str(features.version("jpg"))},
    )


def _webp() -> FunctionCodec:
    import PIL
    from PIL import Image, features

    if not features.check("webp"):
        raise ImportError("Pillow was built without WebP")

    def enc(img: np.ndarray, q: float) -> bytes:
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="WEBP", quality=int(q), method=6, lossless=False)
        return out.getvalue()

    return FunctionCodec(
        name="webp",
        qualities=(2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
        encode_fn=enc,
        decode_fn=_pil_decode,
        settings={"library": "Pillow", "method": 6, "lossless": False, "subsampling": "4:2:0 (WebP lossy)"},
        versions={"Pillow": PIL.__version__, "libwebp": str(features.version("webp"))},
    )


def _avif() -> FunctionCodec:
    """AVIF (AV1 intra) through imagecodecs/libavif, 4:4:4, else Pillow's AVIF plugin."""
    qualities = (5, 15, 25, 35, 45, 55, 65, 75, 85, 92, 97)
    try:
        import imagecodecs

        if not imagecodecs.AVIF.available:
            raise ImportError("imagecodecs built without AVIF")
        pf = imagecodecs.AVIF.PIXEL_FORMAT.YUV444

        def enc(img: np.ndarray, q: float) -> bytes:
            return bytes(imagecodecs.avif_encode(img, level=int(q), speed=6, pixelformat=pf, numthreads=1))

        def dec(buf: bytes) -> np.ndarray:
            return _as_rgb(imagecodecs.avif_decode(buf, numthreads=1))

        return FunctionCodec(
            name="avif",
            qualities=qualities,
            encode_fn=enc,
            decode_fn=dec,
            settings={"library": "imagecodecs", "speed": 6, "pixelformat": "yuv444", "numthreads": 1,
                      "note": "size includes the AVIF (HEIF) container"},
            versions={"imagecodecs": imagecodecs.__version__, "libavif": imagecodecs.avif_version()},
        )
    except (ImportError, AttributeError):
        import PIL
        from PIL import Image, features

        if not features.check("avif"):
            raise ImportError("neither imagecodecs nor Pillow can encode AVIF") from None

        def enc_pil(img: np.ndarray, q: float) -> bytes:
            out = io.BytesIO()
            Image.fromarray(img).save(out, format="AVIF", quality=int(q), speed=6, subsampling="4:4:4")
            return out.getvalue()

        return FunctionCodec(
            name="avif",
            qualities=qualities,
            encode_fn=enc_pil,
            decode_fn=_pil_decode,
            settings={"library": "Pillow", "speed": 6, "subsampling": "4:4:4",
                      "note": "size includes the AVIF (HEIF) container"},
            versions={"Pillow": PIL.__version__, "libavif": str(features.version("avif"))},
        )


def _jxl() -> FunctionCodec:
    """JPEG XL through imagecodecs/libjxl; the sweep is over the butteraugli distance."""
    import imagecodecs

    if not imagecodecs.JPEGXL.available:
        raise ImportError("imagecodecs built without JPEG XL")

    def enc(img: np.ndarray, distance: float) -> bytes:
        return bytes(imagecodecs.jpegxl_encode(img, distance=float(distance), effort=7, numthreads=1))

    def dec(buf: bytes) -> np.ndarray:
        return _as_rgb(imagecodecs.jpegxl_decode(buf, numthreads=1))

    return FunctionCodec(
        name="jxl",
        qualities=(25.0, 16.0, 11.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.6, 0.3),
        encode_fn=enc,
        decode_fn=dec,
        settings={"library": "imagecodecs", "effort": 7, "sweep": "distance (lower = better)", "numthreads": 1},
        versions={"imagecodecs": imagecodecs.__version__, "libjxl": imagecodecs.jpegxl_version()},
        quality_label="distance",
    )


def _hevc() -> FunctionCodec:
    """HEVC intra (x265) in a HEIF container through pillow-heif, 4:4:4 like BPG 4:4:4."""
    import pillow_heif

    info = pillow_heif.libheif_info()
    if "x265" not in str(info.get("encoders", info.get("HEIF", ""))):
        raise ImportError(f"pillow-heif has no x265 encoder ({info})")

    def enc(img: np.ndarray, q: float) -> bytes:
        h, w = img.shape[:2]
        heif = pillow_heif.from_bytes(mode="RGB", size=(w, h), data=np.ascontiguousarray(img).tobytes())
        out = io.BytesIO()
        heif.save(out, format="HEIF", quality=int(q), chroma=444, save_nclx_profile=True)
        return out.getvalue()

    def dec(buf: bytes) -> np.ndarray:
        heif = pillow_heif.open_heif(io.BytesIO(buf), convert_hdr_to_8bit=True)
        return _as_rgb(np.asarray(heif))

    return FunctionCodec(
        name="hevc",
        qualities=(2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80),
        encode_fn=enc,
        decode_fn=dec,
        settings={"library": "pillow-heif", "encoder": "x265", "chroma": "4:4:4",
                  "note": "size includes the HEIF container"},
        versions={"pillow-heif": pillow_heif.__version__, "libheif": str(info.get("libheif")),
                  "x265": str(info.get("HEIF"))},
    )


_FACTORIES: dict[str, Callable[[], FunctionCodec]] = {
    "jpeg420": lambda: _jpeg("420"),
    "jpeg444": lambda: _jpeg("444"),
    "webp": _webp,
    "avif": _avif,
    "jxl": _jxl,
    "hevc": _hevc,
}


def parse_codec_names(spec: str | Sequence[str]) -> list[str]:
    """`jpeg,webp` -> ["jpeg420", "jpeg444", "webp"]; "none" or "" -> []; unknown names raise."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (s.strip().lower() for s in items):
        if item in ("", "none"):
            continue
        if item == "all":
            expanded: Sequence[str] = CLASSICAL_CODECS
        else:
            expanded = CODEC_ALIASES.get(item, (item,))
        for name in expanded:
            if name not in _FACTORIES:
                raise ValueError(f"unknown codec {item!r}; choose from jpeg, {', '.join(CLASSICAL_CODECS)}")
            if name not in names:
                names.append(name)
    return names


def classical_codecs(names: Sequence[str]) -> tuple[list[FunctionCodec], dict[str, str]]:
    """The requested codecs that work here, and {name: reason} for those skipped (with a warning)."""
    codecs, skipped = [], {}
    probe = np.zeros((16, 16, 3), np.uint8)
    probe[4:12, 4:12] = 200
    for name in names:
        try:
            codec = _FACTORIES[name]()
            codec.decode(codec.encode(probe, codec.qualities[len(codec.qualities) // 2]))
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            skipped[name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"codec {name} is unavailable and skipped: {skipped[name]}", stacklevel=2)
            continue
        codecs.append(codec)
    return codecs, skipped


# ----------------------------------------------------------------------------- n2l


class N2LCodec:
    """n2l through its public API: n2l.encode / n2l.decode / n2l.read_header.

    It holds only plain settings, so it pickles: `n2l eval --jobs N` sends it to worker processes.
    """

    name = "n2l"
    quality_label = "quality"

    def __init__(
        self,
        qualities: Sequence[int] = ALL_QUALITIES,
        *,
        mode: str = DEFAULT_MODE,
        preset: str | None = None,
        iterations: int | None = None,
        lmbda: float | None = None,
        seeds: int = 1,
        seed: int = 0,
        device: str = "cpu",
        backend: str = "auto",
    ) -> None:
        self.qualities = tuple(int(q) for q in qualities)
        self.device = device
        self.backend = backend
        self._kwargs = {"mode": mode, "preset": preset, "iterations": iterations, "lmbda": lmbda, "seeds": seeds,
                        "seed": seed}
        # Everything that changes the bitstream; the device is recorded per row but not keyed.
        training = getattr(n2l, "TrainingConfig", None)
        training_defaults = dict(vars(training())) if training is not None else {}
        encoder = getattr(n2l, "encoder", None)
        for name, table in (("iterations", "DEFAULT_ITERATIONS"), ("lr", "DEFAULT_LR"),
                            ("coarse_latent_rate", "DEFAULT_COARSE_LATENT_RATE")):
            defaults = getattr(encoder, table, {})
            if mode in defaults:  # what this mode really trains with by default, per quality
                training_defaults[name] = defaults[mode]
        # The networks tried per quality and their iterations, as a digest (the full list would swamp the report).
        structures = json.dumps([[(asdict(c), n) for c, n in network_structures(q, mode, preset)] for q in ALL_QUALITIES])
        # How a quality level sets lambda (in hybrid mode scaled per image: `n2l.encoder.quality_lambda`).
        lambda_rule = {"lambdas": getattr(encoder, "QUALITY_LAMBDAS", None)}
        if mode == "hybrid" and hasattr(encoder, "HYBRID_REFERENCE_TEXTURE"):
            lambda_rule.update(reference_texture=encoder.HYBRID_REFERENCE_TEXTURE, psnr_fit=encoder.HYBRID_PSNR_FIT,
                               texture_range=encoder.HYBRID_FIT_TEXTURE)
        self.settings = {**self._kwargs, "training_defaults": training_defaults, "lambda_rule": lambda_rule,
                         "structures_sha256": hashlib.sha256(structures.encode()).hexdigest()[:16],
                         "n2l_version": getattr(n2l, "__version__", "unknown")}
        self.versions = {"n2l": str(getattr(n2l, "__version__", "unknown")), "torch": _torch_version()}

    def encode(self, img: np.ndarray, quality: float) -> bytes:
        return bytes(n2l.encode(img, int(quality), device=self.device, verbose=False, **self._kwargs))

    def decode(self, buf: bytes) -> np.ndarray:
        return _as_rgb(n2l.decode(buf, device=self.device, backend=self.backend))

    def info(self, buf: bytes, height: int, width: int) -> dict[str, Any]:
        header = n2l.read_header(buf)
        try:
            macs = header.config.macs_per_pixel(height, width)
        except TypeError:
            macs = header.config.macs_per_pixel()
        return {"macs_per_pixel": float(macs), "seed": int(header.seed), "device": self.device}


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover
        return "absent"


def nan_if_none(x: Any) -> float:
    return math.nan if x is None else float(x)
