"""Ahead-of-time compilation of the decode kernels for an NVIDIA target, without a GPU.

Triton's wheel bundles ptxas, so the whole GPU path (frontend, TTGIR passes, LLVM, PTX, SASS)
can be exercised on a CPU-only machine: `compile_kernels(config)` compiles every kernel
variant a config launches and reports PTX, register use and spills. Used by the tests to catch
GPU-only compile errors (the interpreter accepts things the compiler rejects, e.g. tl.dot with
K < 16) and to check that the noise multiply stays a lone `mul.rn.f32`.

Must run in a process where TRITON_INTERPRET is unset (jit functions are then compiled, not
interpreted): `python -m n2l.kernels.offline` prints a report for the presets.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from n2l.model import PRESETS, ModelConfig

from . import _triton as K


@dataclass
class Compiled:
    name: str
    ptx: str
    registers: int
    spill_bytes: int
    shared: int


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) reported by the bundled ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run(
            [ptxas, f"-arch={sm}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = proc.stdout + proc.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return regs, spills


def _compile(name: str, fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> Compiled:
    sig = dict(signature)
    for key in constexprs:
        sig[key] = "constexpr"
    # Like a real launch with torch allocations: pointers are 16-byte aligned, which lets
    # Triton vectorize the contiguous weight-row loads.
    attrs = {
        (fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = kernel.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, arch)
    return Compiled(name, ptx, regs, spills, kernel.metadata.shared)


def compile_kernels(config: ModelConfig, arch: int = 90) -> list[Compiled]:
    """Compile the noise kernel and every GPP/synthesis variant that `config` launches."""
    tiles = K.Tiles.default(config.synth_residual)
    c = config.latent_channels
    cp, gp, op = K._pow2(c), K._dot_width(config.gpp_hidden), K._pow2(config.out_channels)
    widths = tuple(K._dot_width(h) for h in config.synth_hidden) + (op,)
    out = [
        _compile(
            "noise",
            K._noise_kernel,
            {"out_ptr": "*fp32", "seed": "i32", "scale": "i32", "h": "i32", "w": "i32"},
            {"C": c, "BLOCK": tiles.noise_block, "EXACT_MUL": True},
            4,
            arch,
        )
    ]
    variants = {(config.gpp_kernel_at(s), s < config.n_scales - 1) for s in config.generated_scales}
    gpp_sig = {name: "*fp32" for name in ("lat_ptr", "w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr")}
    gpp_sig |= {"seed": "i32"} | {n: "i32" for n in ("scale", "out_off", "hs", "ws", "in_off", "h1", "w1")}
    for k, coarser in sorted(variants):
        out.append(
            _compile(
                f"gpp k={k} coarser={coarser}",
                K._gpp_kernel,
                gpp_sig,
                {
                    "C": c,
                    "CP": cp,
                    "GP": gp,
                    "K": k,
                    "COARSER": coarser,
                    "BH": tiles.gpp_bh,
                    "BW": tiles.gpp_bw,
                    "EXACT_MUL": True,
                },
                tiles.gpp_warps,
                arch,
            )
        )
    synth_sig = {n: "*fp32" for n in ("lat_ptr", "wf_ptr", "bf_ptr", "wd_ptr", "bd_ptr", "wr_ptr", "br_ptr")}
    synth_sig |= {"out_ptr": "*u8", "H": "i32", "W": "i32"}
    out.append(
        _compile(
            "synthesis",
            K._synth_kernel,
            synth_sig,
            {
                "M": config.n_scales,
                "C": c,
                "WIDTHS": widths,
                "CO": config.out_channels,
                "R": config.synth_residual,
                "TH": tiles.synth_th,
                "TW": tiles.synth_tw,
                "OUT_FLOAT": False,
            },
            tiles.synth_warps,
            arch,
        )
    )
    return out


def main() -> None:
    for name, config in PRESETS.items():
        for k in compile_kernels(config):
            print(
                f"{name:8s} {k.name:24s} regs {k.registers:4d}  spill {k.spill_bytes:6d} B  smem {k.shared:6d} B"
                f"  ld.global {k.ptx.count('ld.global'):5d}  fma {k.ptx.count('fma.rn.f32'):5d}",
                flush=True,
            )


if __name__ == "__main__":
    main()
