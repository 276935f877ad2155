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
    Version 4 codes latents in three passes, so it cannot be written again without re-coding."""
    golden = GOLDEN.with_name("golden_hybrid.n2l")
    buf = golden.read_bytes()
    header, payload = bitstream.read(buf)
    assert buf[3] == 2 and header.config.coded_scales == 6
    assert any(c.max_abs and len(c.passes) == 2 and c.passes[1].weight for c in header.codes[-6:])
    with pytest.raises(ValueError, match="two checkerboard passes"):
        bitstream.write(header, payload)
    pixels = n2l.decode(buf, device="cpu", backend="torch")
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == golden.with_suffix(".sha256").read_text().split()[0]


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
    for n in range(0, len(payload), 4):  # shortened payload, consistent length field
        shortened = body[: start - len(bitstream.varint(len(payload)))] + bitstream.varint(n) + payload[:n]
        _decode_or_format_error(_with_crc(shortened))


@pytest.mark.parametrize(
    "offset,value,message",
    [
        (0, b"X", "magic"),
        (3, b"\x05", "version"),
        (4, b"\x00\x00", "size"),  # width 0
        (6, b"\xff\xff", "size"),  # height 65535
        (8, b"\x02", "channel"),
        (9, b"\x00", "n_scales"),
        (12, b"\x05", "gpp_kernel"),
        (15, b"\x09", "hidden"),
        (16, b"\x08", "coded_scales"),  # more coded scales than the 7 scales
    ],
)
def test_bad_header_fields(tiny_stream, offset, value, message):
    body = bytearray(tiny_stream[:-4])
    body[offset : offset + len(value)] = value
    with pytest.raises(FormatError, match=message):
        bitstream.read(_with_crc(bytes(body)))


def test_absurd_dimensions_rejected_before_allocation(tiny_stream):
    body = bytearray(tiny_stream[:-4])
    body[4:8] = struct.pack("<HH", 32768, 32768)  # 1 Gpixel: above MAX_PIXELS
    with pytest.raises(FormatError, match="exceeds"):
        bitstream.read(_with_crc(bytes(body)))


def test_absurd_coded_latents_rejected_before_allocation(tiny_stream):
    body = bytearray(tiny_stream[:-4])
    body[4:8] = struct.pack("<HH", 16384, 4096)  # allowed size ...
    body[16] = 7  # ... but every latent transmitted: over 10^8 values
    with pytest.raises(FormatError, match="latent values exceed"):
        bitstream.read(_with_crc(bytes(body)))


def test_trailing_garbage_and_wrong_types(tiny_stream):
    with pytest.raises(FormatError):
        bitstream.read(tiny_stream + b"\x00")
    with pytest.raises(FormatError):
        bitstream.read(b"")
    with pytest.raises(TypeError):
        bitstream.read("N2L")  # type: ignore[arg-type]
