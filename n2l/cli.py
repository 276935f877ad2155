"""Command line: n2l encode | decode | info | eval | demo."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import bitstream, decoder
from .encoder import DEFAULT_MODE, MODES, QUALITY_LAMBDAS, encode
from .images import ImageError, atomic_write, load_image, psnr, save_image
from .model import PRESETS
from .weights import decode_tensors, tensor_bits

SAMPLE_IMAGE = Path(__file__).parent / "data" / "sample.png"


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {path!r}: {e.strerror}") from None


def parse_size(text: str) -> int:
    """'20KB', '20k', '1.5MB', '12KiB' or '20000' -> bytes (KB = 1000 bytes, KiB = 1024)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKmM]?)(i?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 20KB, 20000)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * {"": 1, "k": base, "m": base**2}[prefix.lower()])


def _encode_and_report(image, args: argparse.Namespace) -> tuple[bytes, np.ndarray]:
    """Encode, decode back with the reference, and print bpp, PSNR and time."""
    original = load_image(image)
    target_bytes = args.target_size
    if args.target_bpp is not None:
        target_bytes = int(args.target_bpp * original.shape[0] * original.shape[1] / 8)
    started = time.perf_counter()
    buf = encode(
        original, quality=args.quality, mode=args.mode, preset=args.preset, lmbda=args.lmbda, iterations=args.iterations,
        seeds=args.seeds, seed=args.seed, device=args.device, target_bytes=target_bytes, target_psnr=args.target_psnr,
        verbose=not args.quiet,
    )
    elapsed = time.perf_counter() - started
    decoded = decoder.decode(buf, device=args.device)
    header = bitstream.read_header(buf)
    print(f"{header.width}x{header.height}: {len(buf)} bytes, {header.bpp:.4f} bpp, "
          f"PSNR {psnr(decoded, original):.2f} dB, encoded in {elapsed:.1f} s "
          f"({header.config.macs_per_pixel(header.height, header.width):.0f} MAC/pixel)")
    return buf, decoded


def cmd_encode(args: argparse.Namespace) -> int:
    buf, _ = _encode_and_report(args.input, args)
    atomic_write(args.output, buf)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    pixels = decoder.decode(_read_bytes(args.input), device=args.device, backend=args.backend,
                            threads=args.threads)
    save_image(pixels, args.output)
    if not args.quiet:
        print(f"decoded {pixels.shape[1]}x{pixels.shape[0]} in {time.perf_counter() - started:.3f} s "
              f"-> {args.output}")
    return 0


def _bytes_by_part(header: bitstream.Header, payload: bytes) -> str:
    """Where the bytes of a stream go: header (and CRC), weights, each transmitted latent."""
    cfg = header.config
    qs = decode_tensors(payload, list(header.codes), bitstream.tensor_shapes(cfg, header.height, header.width))
    bits = [tensor_bits(q, code) for q, code in zip(qs, header.codes)]
    sizes = [len(payload) * b / max(sum(bits), 1) for b in bits]  # shares of the one ANS stream
    n = 2 * len(cfg.layer_shapes())
    parts = [f"header and CRC {header.n_bytes - len(payload)} B", f"weights {sum(sizes[:n]):.0f} B"]
    parts += [f"latent of scale {s} {b:.0f} B" for s, b in zip(cfg.coded_scale_list, sizes[n:])]
    return ", ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    buf = _read_bytes(args.input)
    header, payload = bitstream.read(buf)
    cfg = header.config
    print(f"format:   n2l version {buf[3]}")
    print(f"size:     {header.width}x{header.height}, {'RGB' if header.channels == 3 else 'grayscale'}")
    print(f"bytes:    {header.n_bytes} ({header.bpp:.4f} bpp): {_bytes_by_part(header, payload)}")
    print(f"seed:     {header.seed}")
    print(f"network:  {cfg.summary()}")
    print(f"decode:   {cfg.macs_per_pixel(header.height, header.width):.1f} MAC/pixel at this size")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Encode and decode the bundled sample image (or a given one) and print bpp/PSNR."""
    image = args.input or SAMPLE_IMAGE
    buf, decoded = _encode_and_report(image, args)
    if args.output:
        atomic_write(args.output, buf)
        save_image(decoded, Path(args.output).with_suffix(".png"))
    return 0


def _add_encode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quality", "-q", type=int, default=4, choices=range(9), metavar="Q",
                   help="0 (smallest) .. 8 (best); picks lambda and, without --preset, the architecture")
    p.add_argument("--lambda", dest="lmbda", type=float, default=None,
                   help=f"rate-distortion lambda, overrides --quality's ({QUALITY_LAMBDAS[0]:.0e}.."
                        f"{QUALITY_LAMBDAS[-1]:.0e})")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="hybrid (default): coarse latents transmitted, about a third of pure's bits; "
                        "pure: every latent generated from seeded noise (the paper's design)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="architecture (decode cost)")
    p.add_argument("--iterations", "-n", type=int, default=None,
                   help="training iterations (default 2000 pure; hybrid 24000, 18000 from quality 5)")
    p.add_argument("--seeds", type=int, default=1,
                   help="whole encodes with this many noise seeds side by side on the CPU threads, keeping "
                        "the lowest RD cost (2: 1.24x the time on 2 cores, bench/RESULTS.md 7q)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed (0..2^32-1) of the encode (with --seeds: of the first one); another moves "
                        "the RD cost by about 1.5-3%% (bench/RESULTS.md 8i)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-size", type=parse_size, default=None, metavar="SIZE",
                        help="largest stream not above SIZE (e.g. 20KB), within 3%%; overrides --quality")
    target.add_argument("--target-bpp", type=float, default=None, help="the same, in bits per pixel")
    target.add_argument("--target-psnr", type=float, default=None, metavar="DB",
                        help="smallest stream reaching this PSNR (within 0.1 dB)")
    p.add_argument("--device", default="cpu", help="torch device for encoding (cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="n2l", description="n2l: overfitted image codec, no latent codes")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="encode an image into an .n2l bitstream")
    p.add_argument("input", help="image file (PNG, PPM, JPEG, ...)")
    p.add_argument("-o", "--output", required=True, help="output .n2l file")
    _add_encode_options(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode an .n2l bitstream to an image")
    p.add_argument("input", help=".n2l file")
    p.add_argument("-o", "--output", required=True, help="output image (format from extension; PNG default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=decoder.BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="threads of the C++ core")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("info", help="print the header of an .n2l bitstream")
    p.add_argument("input", help=".n2l file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="encode + decode the bundled sample image, print bpp and PSNR")
    p.add_argument("input", nargs="?", default=None, help="image (default: bundled 128x128 Kodak crop)")
    p.add_argument("-o", "--output", default=None, help="also write the .n2l (and decoded .png)")
    _add_encode_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="rate-distortion evaluation against classical codecs")
    from .evaluate import add_eval_arguments, run_eval

    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:  # FormatError and ImageError are ValueErrors
        print(f"n2l {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"n2l {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
