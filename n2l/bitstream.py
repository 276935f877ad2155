"""The n2l bitstream: header, seed, per-tensor coding parameters, coded weights, CRC32.

Version 8 (docs/FORMAT.md): magic "N2L" | version u8 | header fields packed as bits, most
significant first (u(n): n-bit unsigned; eg(k): Exp-Golomb of order k; se(k): eg(k) of a signed
difference from a prediction), zero-padded to a byte:

    u15 width-1 | u15 height-1 | u1 rgb | eg0 n_scales-1 | eg0 latent_channels-1
    | eg0 gpp_hidden-1 | u1 gpp_kernel==3 | eg0 gpp_kernel_min_scale | eg0 synth_residual
    | eg0 n_synth_hidden | u8 synth_hidden-1 each | eg0 coded_scales | u1 bicubic synthesis
      upsampling | eg0 seed
    | per layer tensor: eg2 max_abs, and unless it is 0: se exponent, se scale_code (predicted
      from max_abs)
    | per coded latent: eg1 max_abs, and unless it is 0: eg exponent, u2 depth-1, se scale_code
      of the first pass (predicted from max_abs), then for each of the 2 x depth others: se
      scale_code (predicted by the previous pass's), eg slope, the weight (u1 whether 16, else u4)

then the payload (the rest, a multiple of 4 bytes) | crc32 u32 (of every byte before it).

The tensors are each layer's weight then bias, then (hybrid mode) the coded latents, coarsest
first. Older streams are still read: version 7 has fixed-width coding parameters (u5 exponent
first, then max_abs; u8 scale_code+64; u5 weight), version 6 has no upsampling bit (bilinear), version 5
has no depth field either (depth 1), version 4 has version 5's fields byte-aligned (u8, i8
and LEB128 varints, with an explicit payload length); version 3 codes latents in two checkerboard passes (fields per latent: exponent u8, scale_code
i8, max_abs varint, pred_scale_code i8, alpha u8), version 2 has fixed-width fields where
version 3 has varints (seed and payload_len u32, max_abs u16), version 1 also lacks
coded_scales (pure mode).

Every field is validated before anything is allocated or decoded; any problem raises
FormatError with a message that says what was expected and what was found.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .model import ModelConfig
from .weights import (
    MAX_ABS,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_SLOPE,
    SCALE_CODE_RANGE,
    WEIGHT_ONE,
    LatentCode,
    PassCode,
    TensorCode,
)

MAGIC = b"N2L"
VERSION = 8
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
MAX_SIDE = 32768
MAX_PIXELS = 1 << 28  # 16384 x 16384
MAX_CODED_ELEMENTS = 1 << 26  # transmitted latent values (256 MiB as int32)
MAX_SEED = 2**32 - 1  # the noise seed is a u32
_FIXED_V1 = struct.Struct("<3sBHHB7B")  # magic .. n_synth_hidden
_FIXED = struct.Struct("<3sBHHB8B")  # magic .. coded_scales
_U8, _I8, _U16, _U32 = (struct.Struct(f) for f in ("<B", "<b", "<H", "<I"))
MAX_VARINT_BYTES = 5  # enough for any u32
_SCALE_CODE_MIN = SCALE_CODE_RANGE[0]  # versions 5-7 store scale codes as u8 offsets from it
_MAX_EG_ZEROS = 32  # longest Exp-Golomb prefix of a valid field (any u32 needs fewer)
# Version 8 codes each coding parameter as the difference from a prediction, in an Exp-Golomb
# code of the order that suits its spread (chosen on two quality-0 streams of bench/RESULTS.md 7v's
# eval and the test streams; a byte either way at most).
TENSOR_EXPONENT_GUESS, TENSOR_EXPONENT_ORDER = 6, 1
TENSOR_SCALE_OFFSET, TENSOR_SCALE_ORDER = -12, 3  # scale_code - (scale_guess(max_abs) + offset)
LATENT_EXPONENT_ORDER = 0  # the exponent itself (latent steps are coarse)
LATENT_SCALE_OFFSET, LATENT_SCALE_ORDER = -23, 3
PASS_SCALE_ORDER = 3  # a predicted pass's scale_code minus the previous pass's
SLOPE_ORDER = 1


def scale_guess(max_abs: int) -> int:
    """8 x log2(max_abs), interpolated linearly between powers of two and floored (integers
    only): the version-8 prediction of a Laplace scale code from the largest magnitude."""
    n = max_abs.bit_length()
    return 8 * (n - 1) + ((max_abs << 3) >> (n - 1)) - 8


def latent_header_bits(code: LatentCode) -> int:
    """Header bits of a latent's pass models (scale codes, slopes, weights) in version 8."""
    w = _BitWriter()
    _write_pass_models(w, code)
    return w.n


def _signed(v: int) -> int:
    """The non-negative code of a signed difference: 0, 1, -1, 2, -2 ... -> 0, 1, 2, 3, 4 ..."""
    return 2 * v - 1 if v > 0 else -2 * v


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


class _BitWriter:
    """Bits, most significant first (the header of versions 5-8)."""

    def __init__(self) -> None:
        self.value, self.n = 0, 0

    def u(self, bits: int, v: int) -> None:
        """v in `bits` bits."""
        if not 0 <= v < 1 << bits:
            raise ValueError(f"{v} does not fit in {bits} bits")
        self.value, self.n = self.value << bits | v, self.n + bits

    def eg(self, k: int, v: int) -> None:
        """Exp-Golomb code of order k of v >= 0: the bits of v + 2^k, after as many zeros as
        they have bits beyond k + 1."""
        v += 1 << k
        self.u(2 * v.bit_length() - k - 1, v)

    def se(self, k: int, v: int) -> None:
        """A signed integer as eg(k) of its code 0, 1, -1, 2, -2 -> 0, 1, 2, 3, 4 ..."""
        self.eg(k, _signed(v))

    def to_bytes(self) -> bytes:
        """Zero bits pad the last byte."""
        pad = -self.n % 8
        return (self.value << pad).to_bytes((self.n + pad) // 8, "big")


def _write_pass_models(w: _BitWriter, code: LatentCode) -> None:
    """A coded latent's pass models: the first pass's scale code, then each other pass's."""
    first, *predicted = code.passes
    w.se(LATENT_SCALE_ORDER, first.scale_code - scale_guess(code.max_abs) - LATENT_SCALE_OFFSET)
    for before, pc in zip(code.passes, predicted):
        w.se(PASS_SCALE_ORDER, pc.scale_code - before.scale_code)
        w.eg(SLOPE_ORDER, pc.slope)
        w.u(1, pc.weight == WEIGHT_ONE)
        if pc.weight != WEIGHT_ONE:
            w.u(4, pc.weight)


def write(header: Header, payload: bytes) -> bytes:
    """Serialize a header and its payload into a complete bitstream (current version)."""
    cfg = header.config
    w = _BitWriter()
    w.u(15, header.width - 1)
    w.u(15, header.height - 1)
    w.u(1, cfg.out_channels == 3)
    w.eg(0, cfg.n_scales - 1)
    w.eg(0, cfg.latent_channels - 1)
    w.eg(0, cfg.gpp_hidden - 1)
    w.u(1, cfg.gpp_kernel == 3)
    w.eg(0, cfg.gpp_kernel_min_scale)
    w.eg(0, cfg.synth_residual)
    w.eg(0, len(cfg.synth_hidden))
    for width in cfg.synth_hidden:
        w.u(8, width - 1)
    w.eg(0, cfg.coded_scales)
    w.u(1, cfg.synth_upsampling == "bicubic")
    w.eg(0, header.seed)
    for code in header.codes:
        if not isinstance(code, LatentCode):
            w.eg(2, code.max_abs)
            if code.max_abs:
                w.se(TENSOR_EXPONENT_ORDER, code.exponent - TENSOR_EXPONENT_GUESS)
                w.se(TENSOR_SCALE_ORDER, code.scale_code - scale_guess(code.max_abs) - TENSOR_SCALE_OFFSET)
            continue
        if code.max_abs and not 1 <= code.depth <= MAX_DEPTH:
            raise ValueError(f"latents coded in {len(code.passes)} passes cannot be written as version {VERSION}")
        w.eg(1, code.max_abs)
        if code.max_abs:
            w.eg(LATENT_EXPONENT_ORDER, code.exponent)
            w.u(2, code.depth - 1)
            _write_pass_models(w, code)
    out = MAGIC + _U8.pack(VERSION) + w.to_bytes() + payload
    return out + _U32.pack(zlib.crc32(out))


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


class _BitReader:
    """Reads what _BitWriter wrote, from byte `pos` of `buf`; FormatError past the end."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.bit = buf, 8 * pos

    def u(self, bits: int, what: str) -> int:
        if self.bit + bits > 8 * len(self.buf):
            raise FormatError(f"truncated bitstream: {what} needs {bits} bits at bit {self.bit}, "
                              f"only {8 * len(self.buf) - self.bit} left")
        first, last = self.bit >> 3, (self.bit + bits + 7) >> 3
        chunk = int.from_bytes(self.buf[first:last], "big") >> (8 * last - self.bit - bits)
        self.bit += bits
        return chunk & ((1 << bits) - 1)

    def eg(self, k: int, what: str, limit: int) -> int:
        zeros = 0
        while not self.u(1, what):
            zeros += 1
            _check(zeros <= _MAX_EG_ZEROS, f"{what}: Exp-Golomb prefix longer than {_MAX_EG_ZEROS} bits")
        value = (1 << (zeros + k) | self.u(zeros + k, what)) - (1 << k)
        _check(value <= limit, f"{what} {value} out of range (at most {limit})")
        return value

    def se(self, k: int, what: str) -> int:
        """A signed difference written by `_BitWriter.se`; the caller validates the sum."""
        v = self.eg(k, what, 2**16)
        return (v + 1) // 2 if v % 2 else -(v // 2)

    def byte_align(self) -> int:
        """Skip the zero padding to the next byte; returns that byte's offset."""
        pad = -self.bit % 8
        _check(self.u(pad, "padding") == 0, "nonzero padding bits after the header")
        return self.bit >> 3


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FormatError(message)


def _config(width: int, height: int, channels: int, synth_hidden: tuple[int, ...], **fields: int | str) -> ModelConfig:
    """The architecture from header fields, validated (sizes before anything is allocated)."""
    _check(1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE,
           f"image size {width}x{height} out of range (1..{MAX_SIDE} per side)")
    _check(width * height <= MAX_PIXELS, f"image size {width}x{height} exceeds {MAX_PIXELS} pixels")
    _check(channels in (1, 3), f"unsupported channel count {channels} (expected 1 or 3)")
    _check(len(synth_hidden) <= 8, f"{len(synth_hidden)} synthesis hidden layers (at most 8)")
    try:
        config = ModelConfig(synth_hidden=synth_hidden, out_channels=channels, **fields)
    except ValueError as e:
        raise FormatError(str(e)) from None
    n_coded = sum(c * h * w for c, h, w in config.coded_shapes(height, width))
    _check(n_coded <= MAX_CODED_ELEMENTS,
           f"{n_coded} transmitted latent values exceed this decoder's limit of {MAX_CODED_ELEMENTS}")
    return config


_ZERO_TENSOR, _ZERO_LATENT = TensorCode(0, 0, 0), LatentCode(0, 0, (PassCode(0),) * 3)  # codes of all-zero tensors


def _read_byte_header(r: _Reader, version: int) -> tuple[int, int, ModelConfig, int, list]:
    """Versions 1-4: byte-aligned fields; `r` ends at the payload."""
    r.pos = 0
    (_, _, width, height, channels, n_scales, latent_channels, gpp_hidden, gpp_kernel,
     gpp_kernel_min_scale, synth_residual, n_hidden, *coded) = r.unpack(_FIXED_V1 if version == 1 else _FIXED, "header")
    _check(n_hidden <= 8, f"{n_hidden} synthesis hidden layers (at most 8)")
    config = _config(
        width, height, channels, tuple(r.take(n_hidden, "synthesis widths")), n_scales=n_scales,
        latent_channels=latent_channels, gpp_hidden=gpp_hidden, gpp_kernel=gpp_kernel,
        gpp_kernel_min_scale=gpp_kernel_min_scale, synth_residual=synth_residual,
        coded_scales=coded[0] if coded else 0,
    )
    seed = r.unsigned(version, _U32, "seed")
    codes = []
    n_layer_tensors = 2 * len(config.layer_shapes())
    for i in range(n_layer_tensors + config.coded_scales):
        what = f"coding parameters of tensor {i}"
        if i < n_layer_tensors:
            exponent, scale_code = r.one(_U8, what), r.one(_I8, what)
            codes.append(TensorCode(exponent, scale_code, r.unsigned(version, _U16, f"tensor {i}: max_abs")))
        elif version < 4:
            exponent, scale_code = r.one(_U8, what), r.one(_I8, what)
            max_abs = r.unsigned(version, _U16, f"tensor {i}: max_abs")
            pred_scale_code, alpha = r.one(_I8, what), r.one(_U8, what)
            codes.append(LatentCode(exponent, max_abs, (PassCode(scale_code), PassCode(pred_scale_code, 0, alpha))))
        else:
            exponent, max_abs = r.one(_U8, what), r.unsigned(version, _U16, f"tensor {i}: max_abs")
            passes = [PassCode(0), PassCode(0), PassCode(0)]
            if max_abs:
                passes = [PassCode(r.one(_I8, what))]
                passes += [PassCode(r.one(_I8, what), r.one(_U8, what), r.one(_U8, what)) for _ in range(2)]
            codes.append(LatentCode(exponent, max_abs, tuple(passes)))
        _check_code(i, codes[-1])
        if not codes[-1].max_abs:  # a zero tensor's other fields carry nothing
            codes[-1] = _ZERO_TENSOR if i < n_layer_tensors else _ZERO_LATENT
    payload_len = r.unsigned(version, _U32, "payload length")
    remaining = len(r.buf) - r.pos
    _check(payload_len + 4 <= remaining,
           f"truncated bitstream: payload of {payload_len} bytes + 4-byte CRC, only {remaining} bytes left")
    _check(payload_len + 4 == remaining,
           f"{remaining - payload_len - 4} unexpected bytes after the end of the bitstream")
    return width, height, config, seed, codes


def _read_bit_header(r: _Reader, version: int) -> tuple[int, int, ModelConfig, int, list]:
    """Versions 5-8: bit-packed fields (docs/FORMAT.md); `r` ends at the payload."""
    b = _BitReader(r.buf[: max(r.pos, len(r.buf) - 4)], r.pos)  # the header ends before the CRC
    width, height = b.u(15, "width") + 1, b.u(15, "height") + 1
    channels = 3 if b.u(1, "channels") else 1
    fields = dict(
        n_scales=b.eg(0, "n_scales", 255) + 1, latent_channels=b.eg(0, "latent_channels", 255) + 1,
        gpp_hidden=b.eg(0, "gpp_hidden", 255) + 1, gpp_kernel=3 if b.u(1, "gpp_kernel") else 1,
        gpp_kernel_min_scale=b.eg(0, "gpp_kernel_min_scale", 255), synth_residual=b.eg(0, "synth_residual", 255),
    )
    n_hidden = b.eg(0, "number of synthesis hidden layers", 8)
    synth_hidden = tuple(b.u(8, "synthesis width") + 1 for _ in range(n_hidden))
    fields["coded_scales"] = b.eg(0, "coded_scales", 255)
    if version >= 7:
        fields["synth_upsampling"] = "bicubic" if b.u(1, "synthesis upsampling") else "bilinear"
    config = _config(width, height, channels, synth_hidden, **fields)
    seed = b.eg(0, "seed", MAX_SEED)
    codes = []
    n_layer_tensors = 2 * len(config.layer_shapes())
    read_code = _read_code_v8 if version >= 8 else _read_code_v5
    for i in range(n_layer_tensors + config.coded_scales):
        codes.append(read_code(b, i, i < n_layer_tensors, version))
        _check_code(i, codes[-1])
    r.pos = b.byte_align()
    payload_len = len(r.buf) - 4 - r.pos
    _check(payload_len >= 0, "truncated bitstream: no room for the 4-byte CRC after the header")
    return width, height, config, seed, codes


def _read_code_v8(b: _BitReader, i: int, layer: bool, version: int) -> TensorCode | LatentCode:
    what = f"coding parameters of tensor {i}"
    if layer:
        max_abs = b.eg(2, f"tensor {i}: max_abs", MAX_ABS)
        if not max_abs:
            return _ZERO_TENSOR
        exponent = b.se(TENSOR_EXPONENT_ORDER, what) + TENSOR_EXPONENT_GUESS
        return TensorCode(exponent, b.se(TENSOR_SCALE_ORDER, what) + scale_guess(max_abs) + TENSOR_SCALE_OFFSET, max_abs)
    max_abs = b.eg(1, f"tensor {i}: max_abs", MAX_ABS)
    if not max_abs:
        return _ZERO_LATENT
    exponent = b.eg(LATENT_EXPONENT_ORDER, f"tensor {i}: exponent", MAX_EXPONENT)
    depth = b.u(2, what) + 1
    passes = [PassCode(b.se(LATENT_SCALE_ORDER, what) + scale_guess(max_abs) + LATENT_SCALE_OFFSET)]
    for _ in range(2 * depth):
        scale_code = passes[-1].scale_code + b.se(PASS_SCALE_ORDER, what)
        slope = b.eg(SLOPE_ORDER, f"tensor {i}: slope", MAX_SLOPE)
        passes.append(PassCode(scale_code, slope, WEIGHT_ONE if b.u(1, what) else b.u(4, what)))
    return LatentCode(exponent, max_abs, tuple(passes))


def _read_code_v5(b: _BitReader, i: int, layer: bool, version: int) -> TensorCode | LatentCode:
    """Versions 5-7: fixed-width exponents, scale codes and weights."""
    what = f"coding parameters of tensor {i}"
    exponent = b.u(5, what)
    _check(exponent <= MAX_EXPONENT, f"tensor {i}: step exponent {exponent} outside 0..{MAX_EXPONENT}")
    if layer:
        max_abs = b.eg(2, f"tensor {i}: max_abs", MAX_ABS)
        return TensorCode(exponent, b.u(8, what) + _SCALE_CODE_MIN, max_abs) if max_abs else _ZERO_TENSOR
    max_abs = b.eg(1, f"tensor {i}: max_abs", MAX_ABS)
    if not max_abs:
        return _ZERO_LATENT
    depth = b.u(2, what) + 1 if version >= 6 else 1
    passes = [PassCode(b.u(8, what) + _SCALE_CODE_MIN)]
    passes += [PassCode(b.u(8, what) + _SCALE_CODE_MIN, b.eg(1, f"tensor {i}: slope", MAX_SLOPE),
                        b.u(5, what)) for _ in range(2 * depth)]  # fmt: skip
    return LatentCode(exponent, max_abs, tuple(passes))


def _check_code(i: int, code: TensorCode | LatentCode) -> None:
    lo, hi = SCALE_CODE_RANGE
    _check(0 <= code.exponent <= MAX_EXPONENT, f"tensor {i}: step exponent {code.exponent} outside 0..{MAX_EXPONENT}")
    for pc in code.passes if isinstance(code, LatentCode) else [PassCode(code.scale_code)]:
        _check(lo <= pc.scale_code <= hi, f"tensor {i}: Laplace scale code {pc.scale_code} outside {lo}..{hi}")
        _check(pc.slope <= MAX_SLOPE, f"tensor {i}: context slope {pc.slope} > {MAX_SLOPE}")
        _check(pc.weight <= WEIGHT_ONE, f"tensor {i}: prediction weight {pc.weight} > {WEIGHT_ONE}")


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
    width, height, config, seed, codes = _read_byte_header(r, version) if version < 5 else _read_bit_header(r, version)
    payload = r.take(len(buf) - 4 - r.pos, "payload")
    _check(len(payload) % 4 == 0, f"payload length {len(payload)} is not a multiple of 4")
    crc = r.one(_U32, "CRC32")
    actual = zlib.crc32(buf[: r.pos - 4])
    _check(crc == actual, f"checksum mismatch (stored {crc:08x}, computed {actual:08x}): corrupted bitstream")
    header = Header(width, height, config, seed, tuple(codes), n_bytes=len(buf))
    return header, payload


def read_header(buf: bytes) -> Header:
    """Validate a bitstream and return its header (size, architecture, seed, bpp)."""
    return read(buf)[0]
