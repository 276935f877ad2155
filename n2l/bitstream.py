"""The n2l bitstream: header, seed, per-tensor coding parameters, coded weights, CRC32.

Layout (little-endian; varint = unsigned LEB128, 7 bits per byte, low bits first; see
docs/FORMAT.md):

    magic "N2L" | version u8 | width u16 | height u16 | channels u8
    | n_scales u8 | latent_channels u8 | gpp_hidden u8 | gpp_kernel u8 | gpp_kernel_min_scale u8
    | synth_residual u8 | n_synth_hidden u8 | coded_scales u8 | synth_hidden u8 * n_synth_hidden
    | seed varint | per layer tensor: exponent u8, scale_code i8, max_abs varint
    | per coded latent: exponent u8, max_abs varint, and unless max_abs is 0: scale_code i8 of
      pass A, then for passes B and C: scale_code i8, slope u8, weight u8
    | payload_len varint | payload | crc32 u32 (of every byte before it)

The tensors are each layer's weight then bias, then (hybrid mode) the coded latents, coarsest
first. Older streams are still read: version 3 codes latents in two checkerboard passes
(fields per latent: exponent u8, scale_code i8, max_abs varint, pred_scale_code i8, alpha u8),
version 2 has fixed-width fields where version 3 has varints (seed and payload_len u32, max_abs
u16), version 1 also lacks coded_scales (pure mode).

Every field is validated before anything is allocated or decoded; any problem raises
FormatError with a message that says what was expected and what was found.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .model import ModelConfig
from .weights import MAX_EXPONENT, MAX_SLOPE, SCALE_CODE_RANGE, WEIGHT_ONE, LatentCode, PassCode, TensorCode

MAGIC = b"N2L"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MAX_SIDE = 32768
MAX_PIXELS = 1 << 28  # 16384 x 16384
MAX_CODED_ELEMENTS = 1 << 26  # transmitted latent values (256 MiB as int32)
_FIXED_V1 = struct.Struct("<3sBHHB7B")  # magic .. n_synth_hidden
_FIXED = struct.Struct("<3sBHHB8B")  # magic .. coded_scales
_U8, _I8, _U16, _U32 = (struct.Struct(f) for f in ("<B", "<b", "<H", "<I"))
MAX_VARINT_BYTES = 5  # enough for any u32


def varint(n: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low bits first, high bit set on all but the last."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class FormatError(ValueError):
    """The bytes are not a valid n2l bitstream (truncated, corrupted, or unsupported)."""


@dataclass(frozen=True)
class Header:
    """Everything in an n2l bitstream except the coded weights."""

    width: int
    height: int
    config: ModelConfig
    seed: int
    codes: tuple[TensorCode, ...]
    n_bytes: int = 0  # size of the whole bitstream (0 until written or read)

    @property
    def channels(self) -> int:
        return self.config.out_channels

    @property
    def bpp(self) -> float:
        """Bits per pixel of the whole bitstream, header included."""
        return 8 * self.n_bytes / (self.width * self.height)


def tensor_shapes(config: ModelConfig, height: int, width: int) -> list[tuple[int, ...]]:
    """Shape of every coded tensor, in bitstream order (layer weights and biases, latents)."""
    shapes: list[tuple[int, ...]] = []
    for _, cin, cout, k in config.layer_shapes():
        shapes += [(cout, cin, k, k), (cout,)]
    return shapes + config.coded_shapes(height, width)


def write(header: Header, payload: bytes) -> bytes:
    """Serialize a header and its payload into a complete bitstream (current version)."""
    cfg = header.config
    out = bytearray(
        _FIXED.pack(
            MAGIC, VERSION, header.width, header.height, cfg.out_channels,
            cfg.n_scales, cfg.latent_channels, cfg.gpp_hidden, cfg.gpp_kernel,
            cfg.gpp_kernel_min_scale, cfg.synth_residual, len(cfg.synth_hidden), cfg.coded_scales,
        )
    )
    out += bytes(cfg.synth_hidden)
    out += varint(header.seed)
    for code in header.codes:
        if not isinstance(code, LatentCode):
            out += _U8.pack(code.exponent) + _I8.pack(code.scale_code) + varint(code.max_abs)
            continue
        if code.max_abs and len(code.passes) != 3:
            raise ValueError("latents coded in two checkerboard passes (format 1-3) cannot be written as version 4")
        out += _U8.pack(code.exponent) + varint(code.max_abs)
        if code.max_abs:
            a, *predicted = code.passes
            out += _I8.pack(a.scale_code)
            for pc in predicted:
                out += _I8.pack(pc.scale_code) + _U8.pack(pc.slope) + _U8.pack(pc.weight)
    out += varint(len(payload)) + payload
    out += _U32.pack(zlib.crc32(out))
    return bytes(out)


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise FormatError(f"truncated bitstream: {what} needs {n} bytes at offset {self.pos}, "
                              f"only {len(self.buf) - self.pos} left")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def one(self, fmt: struct.Struct, what: str) -> int:
        return self.unpack(fmt, what)[0]

    def varint(self, what: str, limit: int) -> int:
        value = 0
        for i in range(MAX_VARINT_BYTES):
            (byte,) = self.take(1, what)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                _check(value <= limit, f"{what} {value} out of range (at most {limit})")
                return value
        raise FormatError(f"{what}: varint longer than {MAX_VARINT_BYTES} bytes")

    def unsigned(self, version: int, fmt: struct.Struct, what: str) -> int:
        """A fixed-width field of versions 1-2 that version 3 writes as a varint."""
        return self.one(fmt, what) if version < 3 else self.varint(what, 256 ** fmt.size - 1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FormatError(message)


def read(buf: bytes) -> tuple[Header, bytes]:
    """Parse and validate a bitstream; returns the header and the coded payload."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    r = _Reader(buf)
    magic = r.take(3, "magic")
    _check(magic == MAGIC, f"not an n2l bitstream: magic {magic!r}, expected {MAGIC!r}")
    version = r.one(_U8, "version")
    _check(version in READABLE_VERSIONS,
           f"unsupported n2l format version {version} (this decoder reads {READABLE_VERSIONS})")
    r.pos = 0
    (_, _, width, height, channels, n_scales, latent_channels, gpp_hidden, gpp_kernel,
     gpp_kernel_min_scale, synth_residual, n_hidden, *coded) = r.unpack(_FIXED_V1 if version == 1 else _FIXED, "header")
    coded_scales = coded[0] if coded else 0
    _check(1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE,
           f"image size {width}x{height} out of range (1..{MAX_SIDE} per side)")
    _check(width * height <= MAX_PIXELS, f"image size {width}x{height} exceeds {MAX_PIXELS} pixels")
    _check(channels in (1, 3), f"unsupported channel count {channels} (expected 1 or 3)")
    _check(n_hidden <= 8, f"{n_hidden} synthesis hidden layers (at most 8)")
    synth_hidden = tuple(r.take(n_hidden, "synthesis widths"))
    try:
        config = ModelConfig(
            n_scales=n_scales, latent_channels=latent_channels, gpp_hidden=gpp_hidden,
            gpp_kernel=gpp_kernel, gpp_kernel_min_scale=gpp_kernel_min_scale,
            synth_hidden=synth_hidden, synth_residual=synth_residual, out_channels=channels,
            coded_scales=coded_scales,
        )
    except ValueError as e:
        raise FormatError(str(e)) from None
    n_coded = sum(c * h * w for c, h, w in config.coded_shapes(height, width))
    _check(n_coded <= MAX_CODED_ELEMENTS,
           f"{n_coded} transmitted latent values exceed this decoder's limit of {MAX_CODED_ELEMENTS}")
    seed = r.unsigned(version, _U32, "seed")
    codes = []
    lo, hi = SCALE_CODE_RANGE
    n_layer_tensors = 2 * len(config.layer_shapes())
    for i in range(n_layer_tensors + config.coded_scales):
        what = f"coding parameters of tensor {i}"
        if i < n_layer_tensors:
            exponent, scale_code = r.one(_U8, what), r.one(_I8, what)
            codes.append(TensorCode(exponent, scale_code, r.unsigned(version, _U16, f"tensor {i}: max_abs")))
            passes = [PassCode(scale_code)]
        elif version < 4:
            exponent, scale_code = r.one(_U8, what), r.one(_I8, what)
            max_abs = r.unsigned(version, _U16, f"tensor {i}: max_abs")
            pred_scale_code, alpha = r.one(_I8, what), r.one(_U8, what)
            passes = [PassCode(scale_code), PassCode(pred_scale_code, 0, alpha)]
            codes.append(LatentCode(exponent, max_abs, tuple(passes)))
        else:
            exponent, max_abs = r.one(_U8, what), r.unsigned(version, _U16, f"tensor {i}: max_abs")
            passes = [PassCode(0), PassCode(0), PassCode(0)]
            if max_abs:
                passes = [PassCode(r.one(_I8, what))]
                passes += [PassCode(r.one(_I8, what), r.one(_U8, what), r.one(_U8, what)) for _ in range(2)]
            codes.append(LatentCode(exponent, max_abs, tuple(passes)))
        _check(exponent <= MAX_EXPONENT, f"tensor {i}: step exponent {exponent} > {MAX_EXPONENT}")
        for pc in passes:
            _check(lo <= pc.scale_code <= hi, f"tensor {i}: Laplace scale code {pc.scale_code} outside {lo}..{hi}")
            _check(pc.slope <= MAX_SLOPE, f"tensor {i}: context slope {pc.slope} > {MAX_SLOPE}")
            _check(pc.weight <= WEIGHT_ONE, f"tensor {i}: prediction weight {pc.weight} > {WEIGHT_ONE}")
    payload_len = r.unsigned(version, _U32, "payload length")
    _check(payload_len % 4 == 0, f"payload length {payload_len} is not a multiple of 4")
    remaining = len(buf) - r.pos
    _check(payload_len + 4 <= remaining,
           f"truncated bitstream: payload of {payload_len} bytes + 4-byte CRC, only {remaining} bytes left")
    _check(payload_len + 4 == remaining,
           f"{remaining - payload_len - 4} unexpected bytes after the end of the bitstream")
    payload = r.take(payload_len, "payload")
    crc = r.one(_U32, "CRC32")
    actual = zlib.crc32(buf[: r.pos - 4])
    _check(crc == actual, f"checksum mismatch (stored {crc:08x}, computed {actual:08x}): corrupted bitstream")
    header = Header(width, height, config, seed, tuple(codes), n_bytes=len(buf))
    return header, payload


def read_header(buf: bytes) -> Header:
    """Validate a bitstream and return its header (size, architecture, seed, bpp)."""
    return read(buf)[0]
