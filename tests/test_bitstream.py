"""Bitstream: golden file, round trip, and bad input of every kind -> FormatError only."""

import dataclasses
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import n2l
from n2l import bitstream
from n2l.bitstream import FormatError

GOLDEN = Path(__file__).parent / "data" / "golden.n2l"


def test_synthesis_upsampling_round_trip(tiny_stream):
    """Version 7's upsampling bit: a bicubic network's header reads back bicubic; version 6
    streams (no such bit) read as bilinear."""
    header, payload = bitstream.read(tiny_stream)
    config = dataclasses.replace(header.config, synth_upsampling="bicubic")
    again = bitstream.read(bitstream.write(dataclasses.replace(header, config=config), payload))[0]
    assert again.config == config
    assert bitstream.read(_bit_header(_fields(n_scales=1, codes=[("u", 5, 0), ("eg", 2, 0)] * 8)))[0].config.synth_upsampling == "bilinear"


def test_header_round_trip(tiny_stream):
    header, payload = bitstream.read(tiny_stream)
    assert (header.width, header.height, header.channels) == (12, 10, 3)
    assert header.config == n2l.preset("fast", out_channels=3)
    assert header.n_bytes == len(tiny_stream)
    assert bitstream.write(header, payload) == tiny_stream
    assert header.bpp == pytest.approx(8 * len(tiny_stream) / 120)


def _assert_rewrites_to_current_version(buf: bytes) -> bytes:
    header, payload = bitstream.read(buf)
    again = bitstream.write(header, payload)
    assert again[3] == bitstream.VERSION
    assert bitstream.read(again) == (dataclasses.replace(header, n_bytes=len(again)), payload)
    assert bitstream.write(*bitstream.read(again)) == again
    return again


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**32 - 1])
def test_varint_round_trip(n):
    encoded = bitstream.varint(n)
    assert len(encoded) == max(1, (n.bit_length() + 6) // 7)
    r = bitstream._Reader(encoded)
    assert r.varint("value", 2**32 - 1) == n and r.pos == len(encoded)


def test_overlong_or_out_of_range_varints_rejected():
    with pytest.raises(FormatError, match="longer than"):
        bitstream._Reader(b"\x80" * 6).varint("seed", 2**32 - 1)
    with pytest.raises(FormatError, match="max_abs 65536 out of range"):
        bitstream._Reader(bitstream.varint(65536)).varint("max_abs", 65535)


def test_golden_file():
    """A committed version-1 stream must keep parsing and decoding to the same pixels; written
    again it becomes a current-version stream with the same content."""
    buf = GOLDEN.read_bytes()
    header, payload = bitstream.read(buf)
    assert buf[3] == 1 and (header.width, header.height, header.seed) == (16, 16, 0)
    assert header.config.coded_scales == 0
    _assert_rewrites_to_current_version(buf)
    pixels = n2l.decode(buf, device="cpu", backend="torch")
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == (GOLDEN.with_suffix(".sha256")).read_text().split()[0]


def test_golden_hybrid_file():
    """A committed version-2 hybrid stream (latents in two checkerboard passes) keeps its pixels.
    Versions 4-6 code latents in 1 + 2 x depth passes, so it cannot be written again without
    re-coding."""
    golden = GOLDEN.with_name("golden_hybrid.n2l")
    buf = golden.read_bytes()
    header, payload = bitstream.read(buf)
    assert buf[3] == 2 and header.config.coded_scales == 6
    assert any(c.max_abs and len(c.passes) == 2 and c.passes[1].weight for c in header.codes[-6:])
    with pytest.raises(ValueError, match="coded in 2 passes"):
        bitstream.write(header, payload)
    pixels = n2l.decode(buf, device="cpu", backend="torch")
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == golden.with_suffix(".sha256").read_text().split()[0]


@pytest.mark.parametrize("version,growth", [(4, -40), (5, -5), (7, -10)])
def test_golden_hybrid_files_of_earlier_versions(version, growth):
    """Committed hybrid streams of versions 4 (byte-aligned header), 5 (bit-packed, no depth
    field) and 7 (fixed-width coding parameters), with the same tensors, written again as the
    current version: the same tensors and payload, the same pixels, and a smaller header
    (version 8 predicts the coding parameters; version 5 lacks a 2-bit depth per coded latent)."""
    buf = GOLDEN.with_name(f"golden_v{version}_hybrid.n2l").read_bytes()
    assert buf[3] == version
    again = _assert_rewrites_to_current_version(buf)
    assert len(again) - len(buf) <= growth
    np.testing.assert_array_equal(n2l.decode(again, device="cpu", backend="torch"),
                                  n2l.decode(buf, device="cpu", backend="torch"))


def test_golden_v6_deep_passes_file():
    """A committed version-6 stream of the same integers as the version-4 one, every latent
    coded at depth 3 (7 passes): pins the geometry of the deeper passes (docs/FORMAT.md)."""
    buf = GOLDEN.with_name("golden_v6_depth3_hybrid.n2l").read_bytes()
    header, _ = bitstream.read(buf)
    assert buf[3] == 6 and all(c.depth == 3 for c in header.codes[-6:])
    np.testing.assert_array_equal(n2l.decode(buf, device="cpu", backend="torch"),
                                  n2l.decode(GOLDEN.with_name("golden_v4_hybrid.n2l").read_bytes(), device="cpu", backend="torch"))


def _decode_or_format_error(buf: bytes) -> None:
    try:
        n2l.decode(buf, device="cpu", backend="torch")
    except FormatError:
        pass


def test_every_truncation_is_a_format_error(tiny_stream):
    for n in range(len(tiny_stream)):
        with pytest.raises(FormatError):
            n2l.decode(tiny_stream[:n], device="cpu", backend="torch")


def test_random_bit_flips_are_caught(tiny_stream):
    rng = np.random.default_rng(1)
    for _ in range(300):
        buf = bytearray(tiny_stream)
        pos = int(rng.integers(len(buf)))
        buf[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(FormatError):
            n2l.decode(bytes(buf), device="cpu", backend="torch")


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupted_payload_with_valid_crc_never_crashes(tiny_stream):
    """An adversary can fix the CRC: the decoder must still fail cleanly or decode something."""
    rng = np.random.default_rng(2)
    body = tiny_stream[:-4]
    header, payload = bitstream.read(tiny_stream)
    start = len(body) - len(payload)
    for _ in range(30):
        junk = rng.integers(0, 256, len(payload), dtype=np.uint8).tobytes()
        _decode_or_format_error(_with_crc(body[:start] + junk))
    for n in range(0, len(payload), 4):  # shortened payload
        _decode_or_format_error(_with_crc(body[: start + n]))


def _bit_header(fields: list[tuple[str, int, int]], version: int = 6) -> bytes:
    """A bit-packed header of `version` from (kind, k or bits, value) fields ("u", "eg" or "se"), padded, with a CRC:
    bytes the writer refuses to produce."""
    w = bitstream._BitWriter()
    for kind, n, value in fields:
        getattr(w, kind)(n, value)
    return _with_crc(bitstream.MAGIC + bytes([version]) + w.to_bytes())


def _fields(width=12, height=10, n_scales=7, hidden=(8,), coded=0, codes=(), version=6) -> list[tuple[str, int, int]]:
    """Header fields (docs/FORMAT.md) of an RGB image, 2 latent channels, GPP 8 wide with 3x3
    kernels from scale 2, no residual layers, bilinear upsampling (from version 7) and seed 0;
    then `codes`."""
    return [
        ("u", 15, width - 1), ("u", 15, height - 1), ("u", 1, 1),
        ("eg", 0, n_scales - 1), ("eg", 0, 1), ("eg", 0, 7), ("u", 1, 1),
        ("eg", 0, 2), ("eg", 0, 0), ("eg", 0, len(hidden)), *(("u", 8, h - 1) for h in hidden),
        ("eg", 0, coded), *((("u", 1, 0),) if version >= 7 else ()), ("eg", 0, 0), *codes,
    ]  # fmt: skip


def test_helper_header_is_valid_up_to_its_codes():
    """The hand-built header of the tests below parses up to its (absent) codes, so each of
    those tests breaks exactly one field."""
    with pytest.raises(FormatError, match="truncated bitstream: coding parameters of tensor"):
        bitstream.read(_bit_header(_fields()))


@pytest.mark.parametrize(
    "fields,version,message",
    [
        (_fields(), bitstream.VERSION + 1, "version"),
        (_fields(width=32768, height=32768), 6, "exceeds"),
        (_fields(n_scales=13), 6, "n_scales"),
        (_fields(hidden=(8,) * 9), 6, "hidden layers 9 out of range"),
        (_fields(coded=8), 6, "coded_scales"),
        (_fields(codes=[("u", 5, 25), ("eg", 2, 0)]), 6, "exponent 25"),
        (_fields(codes=[("u", 5, 3), ("eg", 2, 65536)]), 6, "max_abs 65536 out of range"),
        (_fields(codes=[("u", 5, 3)] + [("u", 1, 0)] * 40), 6, "prefix longer than"),
        (_fields(width=16384, height=4096, coded=7), 6, "latent values exceed"),  # 10^8 values
    ],
)
def test_bad_header_fields(fields, version, message):
    """Every field is checked before anything is allocated."""
    with pytest.raises(FormatError, match=message):
        bitstream.read(_bit_header(fields, version))


def test_bad_latent_fields():
    """Slope and prediction weight of a coded latent (every scale coded: no GPP layers)."""
    cfg = n2l.ModelConfig(n_scales=7, latent_channels=2, gpp_hidden=8, gpp_kernel=3, gpp_kernel_min_scale=2,
                          synth_residual=0, synth_hidden=(8,), out_channels=3, coded_scales=7)
    layers = [("u", 5, 0), ("eg", 2, 0)] * 2 * len(cfg.layer_shapes())  # all-zero tensors
    base = _fields(coded=7, codes=layers)
    latent = [("u", 5, 0), ("eg", 1, 3), ("u", 2, 0), ("u", 8, 64), ("u", 8, 64)]  # e, max_abs, depth 1, 2 scale codes
    with pytest.raises(FormatError, match="slope 33 out of range"):
        bitstream.read(_bit_header(base + latent + [("eg", 1, 33)]))
    with pytest.raises(FormatError, match="prediction weight 17"):
        bitstream.read(_bit_header(base + latent + [("eg", 1, 2), ("u", 5, 17), ("u", 8, 64), ("eg", 1, 0), ("u", 5, 0)]))


@pytest.mark.parametrize("code,message", [
    ([("eg", 2, 3), ("se", 1, -7), ("se", 3, 0)], "step exponent -1 outside"),  # the guess is 6
    ([("eg", 2, 3), ("se", 1, 19), ("se", 3, 0)], "step exponent 25 outside"),
    ([("eg", 2, 3), ("se", 1, 0), ("se", 3, 200)], "scale code 200 outside"),  # the guess from max_abs 3 is 12 - 12
])
def test_bad_version8_coding_parameters(code, message):
    """Version 8 codes exponents and scale codes as differences from predictions: their sums
    are range-checked like the fixed-width fields of earlier versions."""
    with pytest.raises(FormatError, match=message):
        bitstream.read(_bit_header(_fields(codes=code, version=8), 8))


def test_nonzero_padding_rejected(tiny_stream):
    """The zero bits that pad the header to a byte are checked (a set one is corruption)."""
    _, payload = bitstream.read(tiny_stream)
    last = len(tiny_stream) - 4 - len(payload) - 1  # the header's last byte holds the padding
    messages = set()
    for bit in range(8):
        body = bytearray(tiny_stream[:-4])
        body[last] ^= 1 << bit
        try:
            bitstream.read(_with_crc(bytes(body)))
        except FormatError as e:
            messages.add("padding" in str(e))
    assert True in messages


def test_trailing_garbage_and_wrong_types(tiny_stream):
    with pytest.raises(FormatError):
        bitstream.read(tiny_stream + b"\x00")
    with pytest.raises(FormatError):
        bitstream.read(b"")
    with pytest.raises(TypeError):
        bitstream.read("N2L")  # type: ignore[arg-type]
