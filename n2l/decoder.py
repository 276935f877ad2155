"""Decoding: bitstream -> network -> pixels, through one of three interchangeable backends.

- ``torch``: the reference (n2l/model.py), any torch device.
- ``triton``: fused GPU kernels (kernels/, installed as ``n2l.kernels``).
- ``cpu``: the compiled C++ core (``n2l.cpu``).

``auto`` picks triton on a CUDA device, else the C++ core, else torch.
"""

from __future__ import annotations

import importlib
from functools import cache

import numpy as np
import torch

from . import bitstream
from .bitstream import FormatError
from .model import N2LModel, Weights, to_uint8
from .weights import decode_tensors, dequantize

BACKENDS = ("auto", "torch", "triton", "cpu")


@cache
def _backend_module(name: str):
    """The module of an optional backend, or the reason it cannot be used (a string)."""
    module_name = {"triton": "n2l.kernels", "cpu": "n2l.cpu"}[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"{module_name} cannot be imported ({e})"
    reason = module.unavailable_reason()
    return reason if reason else module


def backend_available(name: str) -> bool:
    """Whether a backend (`torch`, `triton` or `cpu`) can run here."""
    return name == "torch" or not isinstance(_backend_module(name), str)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `auto` to a concrete backend and check that the requested one can run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and backend_available("triton"):
            return "triton"
        if device.type == "cpu" and backend_available("cpu"):
            return "cpu"
        return "torch"
    if backend != "torch":
        module = _backend_module(backend)
        if isinstance(module, str):
            raise RuntimeError(f"backend {backend!r} is not available: {module}")
        if backend == "triton" and device.type != "cuda" and not module.interpreted():
            raise RuntimeError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
        if backend == "cpu" and device.type != "cpu":
            raise RuntimeError("backend 'cpu' decodes on the CPU; pass device='cpu'")
    return backend


def reconstruct(
    net: N2LModel | Weights,
    seed: int,
    height: int,
    width: int,
    backend: str = "torch",
    threads: int | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Run a network to uint8 pixels [H, W, C]. The torch backend needs an N2LModel (on its
    device); the others also take bare Weights, and triton runs on `device` (default: the
    tensors' device)."""
    if backend == "torch":
        # cuDNN would use TF32 on Ampere+ by default: the reference must stay exact float32.
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            image = net(net.noise(seed, height, width))
            return to_uint8(image).cpu().numpy()
    module = _backend_module(backend)
    if backend == "triton":
        return module.decode_triton(net, seed, height, width, device=device).cpu().numpy()
    return module.decode_cpu(net, seed, height, width, threads=threads)


def _dequantized(buf: bytes) -> tuple[bitstream.Header, torch.Tensor, list[tuple[int, ...]]]:
    """Parse a bitstream: its header, every tensor dequantized into one flat float32 CPU tensor
    (bitstream order), and their shapes."""
    header, payload = bitstream.read(buf)
    shapes = bitstream.tensor_shapes(header.config, header.height, header.width)
    try:
        qs = decode_tensors(payload, list(header.codes), shapes)
    except Exception as e:  # constriction rejects payloads that cannot be decoded
        raise FormatError(f"corrupted weight payload: {e}") from None
    # In numpy: one small op per tensor is several times cheaper than in torch.
    flat = np.concatenate([dequantize(q, code.exponent).reshape(-1) for q, code in zip(qs, header.codes)])
    return header, torch.from_numpy(flat), shapes


def load_weights(buf: bytes) -> tuple[bitstream.Header, Weights]:
    """Parse a bitstream into its dequantized float32 tensors on the CPU (no nn.Module built)."""
    header, flat, shapes = _dequantized(buf)
    return header, Weights.from_flat(header.config, flat, shapes)


def load_model(buf: bytes, device: torch.device | str = "cpu") -> tuple[bitstream.Header, N2LModel]:
    """Parse a bitstream and rebuild its network with dequantized float32 weights."""
    header, flat, _ = _dequantized(buf)
    model = N2LModel(header.config, header.height, header.width)
    # One upload (not one per tensor): the parameters become views of it.
    torch.nn.utils.vector_to_parameters(flat.to(device), model.parameters())
    return header, model.eval()


def decode(
    buf: bytes, device: torch.device | str | None = None, backend: str = "auto", threads: int | None = None
) -> np.ndarray:
    """Decode an n2l bitstream to uint8 pixels [H, W, C] (C = 3 for RGB, 1 for grayscale).

    `device` defaults to CUDA when available, else CPU; `backend` is one of auto, torch,
    triton, cpu (see module docstring); `threads` limits the C++ core's threads.
    Raises FormatError (a ValueError) for invalid bitstreams.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    if backend == "torch":
        header, net = load_model(buf, device)
    else:  # the kernels read packed copies of the weights: no nn.Module needed
        header, net = load_weights(buf)
    return reconstruct(net, header.seed, header.height, header.width, backend, threads, device)
