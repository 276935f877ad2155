"""The n2l network: Gaussian Parameter Predictor (GPP) + upsampling + synthesis.

Data flow for an H x W image (scale s has size ceil(H/2^s) x ceil(W/2^s), s = 0 is full size):

    for s = M-1 (coarsest) down to 0:
        if s is coded (hybrid mode, s >= M - coded_scales):
            y_s = the transmitted latent (integers times a power-of-two step); no GPP, no noise
            continue
        u_s   = up2(y_{s+1})                       (absent at the coarsest scale)
        h     = relu(conv_kxk([z_s, u_s]))          GPP layer 0 ("gpp.s.0")
        p     = conv_1x1(h)                         GPP layer 1 ("gpp.s.1"), 2C channels
        mu_s  = u_s + p[:C],  sigma_s = softplus(p[C:])
        y_s   = mu_s + sigma_s * z_s                reparameterization
    x = concat_s(up_{2^s}(y_s))                     [M*C, H, W], bilinear or bicubic
                                                    (config.synth_upsampling)
    x = 1x1 convs with ReLU between ("synth.i"), the last one to RGB
    x = x + conv_3x3(x) for each residual layer    ("synth_res.r")

Convolutions pad by edge replication. Upsampling has align_corners=False semantics
(half-pixel centres, edge values repeated), see `upsample`; up2 is always bilinear.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .noise import noise_block, scale_shape

UPSAMPLING_KERNELS = ("bilinear", "bicubic")
CUBIC_A = -0.75  # the cubic convolution kernel's parameter (Keys 1981; torch's and OpenCV's bicubic)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one n2l network. Everything here is signalled in the bitstream."""

    n_scales: int = 7  # M: noise/latent scales, full size down to 1/2^(M-1)
    latent_channels: int = 4  # C: noise and latent channels per scale
    gpp_hidden: int = 12  # hidden width of every scale's GPP
    gpp_kernel: int = 3  # spatial kernel of GPP layer 0 (1 or 3) ...
    gpp_kernel_min_scale: int = 2  # ... at scales >= this one; finer scales use 1x1
    synth_hidden: tuple[int, ...] = (16,)  # hidden widths of the 1x1 synthesis layers
    synth_residual: int = 1  # number of 3x3 residual layers on the output after the 1x1 layers
    out_channels: int = 3  # 3 for RGB, 1 for grayscale images
    coded_scales: int = 0  # hybrid mode: the latents of this many coarsest scales are transmitted
    synth_upsampling: str = "bilinear"  # kernel that brings each latent to full size for the synthesis

    def __post_init__(self) -> None:
        object.__setattr__(self, "synth_hidden", tuple(int(h) for h in self.synth_hidden))
        limits = (
            (1 <= self.n_scales <= 12, "n_scales must be in 1..12"),
            (1 <= self.latent_channels <= 32, "latent_channels must be in 1..32"),
            (1 <= self.gpp_hidden <= 128, "gpp_hidden must be in 1..128"),
            (self.gpp_kernel in (1, 3), "gpp_kernel must be 1 or 3"),
            (0 <= self.gpp_kernel_min_scale <= 12, "gpp_kernel_min_scale must be in 0..12"),
            (len(self.synth_hidden) <= 8, "at most 8 synthesis hidden layers"),
            (all(1 <= h <= 255 for h in self.synth_hidden), "synth_hidden widths must be in 1..255"),
            (0 <= self.synth_residual <= 8, "synth_residual must be in 0..8"),
            (self.out_channels in (1, 3), "out_channels must be 1 or 3"),
            (0 <= self.coded_scales <= self.n_scales, "coded_scales must be in 0..n_scales"),
            (self.synth_upsampling in UPSAMPLING_KERNELS, f"synth_upsampling must be one of {UPSAMPLING_KERNELS}"),
        )
        for ok, message in limits:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message} (got {self})")

    def is_coded(self, scale: int) -> bool:
        """Whether scale `scale` is transmitted (hybrid mode) rather than generated from noise."""
        return scale >= self.n_scales - self.coded_scales

    @property
    def generated_scales(self) -> list[int]:
        """The scales produced by a GPP from noise, coarsest first."""
        return [s for s in reversed(range(self.n_scales)) if not self.is_coded(s)]

    @property
    def coded_scale_list(self) -> list[int]:
        """The transmitted scales, coarsest first (their order in the bitstream)."""
        return [s for s in reversed(range(self.n_scales)) if self.is_coded(s)]

    def gpp_kernel_at(self, scale: int) -> int:
        return self.gpp_kernel if scale >= self.gpp_kernel_min_scale else 1

    def gpp_in_channels(self, scale: int) -> int:
        """Noise, plus the upsampled coarser latent except at the coarsest scale."""
        c = self.latent_channels
        return c if scale == self.n_scales - 1 else 2 * c

    def layer_shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, in_channels, out_channels, kernel) of every convolution, in bitstream order."""
        c, g = self.latent_channels, self.gpp_hidden
        shapes = []
        for s in self.generated_scales:
            shapes.append((f"gpp.{s}.0", self.gpp_in_channels(s), g, self.gpp_kernel_at(s)))
            shapes.append((f"gpp.{s}.1", g, 2 * c, 1))
        widths = (self.n_scales * c, *self.synth_hidden, self.out_channels)
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            shapes.append((f"synth.{i}", cin, cout, 1))
        for r in range(self.synth_residual):
            shapes.append((f"synth_res.{r}", self.out_channels, self.out_channels, 3))
        return shapes

    def n_params(self) -> int:
        """Network parameters (the transmitted latents of hybrid mode not included)."""
        return sum(cout * (cin * k * k + 1) for _, cin, cout, k in self.layer_shapes())

    def coded_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """[C, h_s, w_s] of every transmitted latent, in bitstream order (coarsest first)."""
        return [(self.latent_channels, *scale_shape(height, width, s)) for s in self.coded_scale_list]

    def macs_per_pixel(self, height: int | None = None, width: int | None = None) -> float:
        """Multiply-accumulates per decoded pixel, counted exactly.

        Counts every convolution tap, 4 per bilinear sample and channel (16 per bicubic), and 1 per
        reparameterized latent element (biases and activations are free). With a size,
        scale areas are the real ceil(H/2^s) x ceil(W/2^s); without one, the asymptotic 4^-s.
        """
        c = self.latent_channels
        total = 0.0
        for s in range(self.n_scales):
            if height is None or width is None:
                area = 4.0**-s
            else:
                hs, ws = scale_shape(height, width, s)
                area = hs * ws / (height * width)
            if not self.is_coded(s):
                k = self.gpp_kernel_at(s)
                gpp = k * k * self.gpp_in_channels(s) * self.gpp_hidden + self.gpp_hidden * 2 * c
                up_coarser = 4 * c if s < self.n_scales - 1 else 0
                total += area * (gpp + c + up_coarser)
            taps = 16 if self.synth_upsampling == "bicubic" else 4
            total += taps * c if s > 0 else 0  # upsampling y_s to full size
        widths = (self.n_scales * c, *self.synth_hidden, self.out_channels)
        total += sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        total += 9 * self.out_channels**2 * self.synth_residual
        return total

    def summary(self) -> str:
        coded = f" ({self.coded_scales} coarsest coded)" if self.coded_scales else ""
        return (
            f"{self.n_scales} scales x {self.latent_channels} ch{coded}, "
            f"GPP hidden {self.gpp_hidden} ({self.gpp_kernel}x{self.gpp_kernel} from scale "
            f"{self.gpp_kernel_min_scale}), synthesis {list(self.synth_hidden)} "
            f"+ {self.synth_residual} residual 3x3, {self.synth_upsampling} upsampling; "
            f"{self.n_params()} parameters, {self.macs_per_pixel():.0f} MAC/pixel"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["synth_hidden"] = list(self.synth_hidden)
        return d


PRESETS: dict[str, ModelConfig] = {
    "fast": ModelConfig(latent_channels=2, gpp_hidden=8, gpp_kernel_min_scale=2, synth_hidden=(8,)),
    "default": ModelConfig(),
    "best": ModelConfig(
        latent_channels=6, gpp_hidden=16, gpp_kernel_min_scale=1, synth_hidden=(24, 16), synth_residual=2
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset (`fast`, `default`, `best`), optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Weights of the 4 taps floor(src) - 1 .. floor(src) + 2 at fraction t = src - floor(src)
    of the cubic convolution kernel with a = CUBIC_A (float64; exact for the fractions of a
    power-of-two factor)."""
    a = CUBIC_A

    def near(d: float) -> float:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: float) -> float:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=64)  # a few sizes per image; bounded for long-lived processes
def _interpolation_matrix(size: int, factor: int, out: int, kernel: str, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    """[out, size] matrix of 1-D upsampling by `factor` (see `upsample`), built in float64."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd later
        m = torch.zeros(out, size, dtype=torch.float64)
        for i in range(out):
            src = (i + 0.5) / factor - 0.5
            if kernel == "bilinear":
                src = max(src, 0.0)
                lo = math.floor(src)
                taps = ((lo, 1 - (src - lo)), (lo + 1, src - lo))
            else:
                lo = math.floor(src)
                taps = zip(range(lo - 1, lo + 3), cubic_weights(src - lo))
            for j, weight in taps:
                m[i, min(max(j, 0), size - 1)] += weight
        return m.to(device, dtype)


MATRIX_UPSAMPLE_MAX_INPUT = 128 * 128  # larger inputs: the dense matrices would cost too much


def upsample(x: torch.Tensor, factor: int, height: int, width: int, kernel: str = "bilinear") -> torch.Tensor:
    """Upsampling of [B, C, h, w] by an integer factor, cropped to [B, C, height, width].

    Source coordinate of output index i: src = (i + 0.5) / factor - 0.5 (half-pixel centres).
    Bilinear: src clamped to >= 0, taps floor(src) and floor(src) + 1 with weights 1 - t and
    t (t = src - floor(src)). Bicubic: taps floor(src) - 1 .. floor(src) + 2 weighted by
    `cubic_weights(t)`. Taps past an edge read the edge value (torch's bilinear and bicubic
    with align_corners=False and an explicit scale factor). With a power-of-two factor every
    coordinate and weight is exact. Small inputs (the coarse latents) go through two matrix
    products, rows then columns: several times faster to train through than F.interpolate on
    CPU, and the same function up to float rounding.
    """
    h, w = x.shape[-2:]
    if factor == 1:
        return x[..., :height, :width]
    if h * w > MATRIX_UPSAMPLE_MAX_INPUT:
        return F.interpolate(x, scale_factor=factor, mode=kernel, align_corners=False)[..., :height, :width]
    rows = _interpolation_matrix(h, factor, min(height, h * factor), kernel, x.device, x.dtype)
    cols = _interpolation_matrix(w, factor, min(width, w * factor), kernel, x.device, x.dtype)
    return rows @ x @ cols.T


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Convolution with edge-replication padding. 1x1 layers are one 2-D matrix product with
    the batch joined to the pixels (a view for batch 1): much faster than mkldnn for these few
    channels on CPU, backward included."""
    k = conv.kernel_size[0]
    if k > 1:
        return conv(F.pad(x, (k // 2,) * 4, mode="replicate"))
    b, _, h, w = x.shape
    out = torch.addmm(conv.bias[:, None], conv.weight.flatten(1), x.transpose(0, 1).reshape(-1, b * h * w))
    return out.view(-1, b, h, w).transpose(0, 1)


class N2LModel(nn.Module):
    """The decoder network of one image; the reference implementation of n2l decoding.

    In hybrid mode (config.coded_scales > 0) the transmitted latents are parameters too, so
    the image size must be given. `named_parameters()` lists every coded tensor in bitstream
    order: each convolution's weight then bias, then the coded latents, coarsest first.
    """

    def __init__(self, config: ModelConfig, height: int | None = None, width: int | None = None):
        super().__init__()
        self.config = config
        self.convs = nn.ModuleDict()
        for name, cin, cout, k in config.layer_shapes():
            self.convs[name.replace(".", "_")] = nn.Conv2d(cin, cout, k)
        for r in range(config.synth_residual):  # residual layers start as the identity
            conv = self.layer(f"synth_res.{r}")
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        if config.coded_scales and (height is None or width is None):
            raise ValueError("a hybrid-mode model (coded_scales > 0) needs the image height and width")
        shapes = config.coded_shapes(height, width) if config.coded_scales else []
        self.coded = nn.ParameterList([nn.Parameter(torch.zeros(1, *shape)) for shape in shapes])

    def layer(self, name: str) -> nn.Conv2d:
        return self.convs[name.replace(".", "_")]

    def conv(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Convolution `name` (edge-replication padding) applied to x."""
        return _conv(x, self.layer(name))

    def pointwise(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The 1x1 convolutions `names` applied in turn, with ReLU between them."""
        for i, name in enumerate(names):
            x = self.conv(x, name) if i == 0 else self.conv(torch.relu(x), name)
        return x

    def upsample(self, x: torch.Tensor, factor: int, height: int, width: int, kernel: str = "bilinear") -> torch.Tensor:
        """See `upsample`."""
        return upsample(x, factor, height, width, kernel)

    def named_layers(self) -> list[tuple[str, nn.Conv2d]]:
        """Convolutions in bitstream order (see ModelConfig.layer_shapes)."""
        return [(name, self.layer(name)) for name, *_ in self.config.layer_shapes()]

    def coded_latent(self, scale: int) -> torch.Tensor:
        """The transmitted latent of a coded scale, [1, C, h_s, w_s]."""
        return self.coded[self.config.n_scales - 1 - scale]

    def weights(self) -> Weights:
        """Its tensors (detached views), for the C++ and Triton backends."""
        return Weights.from_tensors(self.config, [p.detach() for p in self.parameters()])

    def latents(self, noise: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """GPP + reparameterization: noise pyramid -> latents y_s, lists of [B, C, h_s, w_s].

        Coded scales take their transmitted latent and ignore their noise entry (may be None)."""
        cfg = self.config
        c = cfg.latent_channels
        ys: list[torch.Tensor] = [None] * cfg.n_scales  # type: ignore[list-item]
        for s in reversed(range(cfg.n_scales)):
            if cfg.is_coded(s):
                ys[s] = self.coded_latent(s)
                continue
            z = noise[s]
            if s == cfg.n_scales - 1:
                u, x = 0.0, z
            else:
                u = self.upsample(ys[s + 1], 2, z.shape[-2], z.shape[-1])
                x = torch.cat([z, u], dim=1)
            if cfg.gpp_kernel_at(s) == 1:
                p = self.pointwise(x, [f"gpp.{s}.0", f"gpp.{s}.1"])
            else:
                p = self.conv(torch.relu(self.conv(x, f"gpp.{s}.0")), f"gpp.{s}.1")
            mu, sigma = u + p[:, :c], F.softplus(p[:, c:])
            ys[s] = mu + sigma * z
        return ys

    def synthesis(self, ys: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Latents -> image [B, out_channels, H, W] (not clamped)."""
        kernel = self.config.synth_upsampling
        x = torch.cat([self.upsample(y, 1 << s, height, width, kernel) for s, y in enumerate(ys)], dim=1)
        x = self.pointwise(x, [f"synth.{i}" for i in range(len(self.config.synth_hidden) + 1)])
        for r in range(self.config.synth_residual):
            x = x + self.conv(x, f"synth_res.{r}")
        return x

    def forward(self, noise: list[torch.Tensor | None]) -> torch.Tensor:
        """Noise pyramid (finest first, [B, C, h_s, w_s], None at coded scales) -> image
        [B, out_channels, H, W], not clamped."""
        ys = self.latents(noise)
        return self.synthesis(ys, *ys[0].shape[-2:])

    def noise(self, seed: int, height: int, width: int) -> list[torch.Tensor | None]:
        """The noise pyramid this model decodes from: [1, C, h_s, w_s] per scale, None where coded."""
        device = next(self.parameters()).device
        cfg = self.config
        return [
            None if cfg.is_coded(s) else noise_block(seed, s, cfg.latent_channels, 0, 0,
                                                     *scale_shape(height, width, s), device=device)[None]
            for s in range(cfg.n_scales)
        ]


@dataclass(frozen=True, eq=False)
class Weights:
    """The tensors of one decoder network without an nn.Module: what the C++ and Triton backends
    read. Building an N2LModel costs about 0.5 ms of Python, a quarter of the C++ core's whole
    256x256 decode."""

    config: ModelConfig
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (weight [out, in, k, k], bias [out])
    coded: list[torch.Tensor]  # transmitted latents [1, C, h_s, w_s], coarsest first

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: list[torch.Tensor]) -> Weights:
        """From every coded tensor in bitstream order (see N2LModel)."""
        names = [name for name, *_ in config.layer_shapes()]
        layers = {name: (tensors[2 * i], tensors[2 * i + 1]) for i, name in enumerate(names)}
        return cls(config, layers, [t.reshape(1, *t.shape[-3:]) for t in tensors[2 * len(names) :]])

    @classmethod
    def from_flat(cls, config: ModelConfig, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> Weights:
        """Views of one flat tensor that holds every coded tensor in bitstream order."""
        views = flat.split([math.prod(shape) for shape in shapes])
        return cls.from_tensors(config, [v.view(shape) for v, shape in zip(views, shapes)])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor in bitstream order."""
        return [t for pair in self.layers.values() for t in pair] + self.coded

    def cpu(self) -> Weights:
        """Float32 copies on the CPU, made in one device-to-host transfer (not one per tensor)."""
        tensors = self.tensors()
        if all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors):
            return self
        flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to("cpu", torch.float32)
        return Weights.from_flat(self.config, flat, [t.shape for t in tensors])

    def coded_latent(self, scale: int) -> torch.Tensor:
        """The transmitted latent of a coded scale, [1, C, h_s, w_s]."""
        return self.coded[self.config.n_scales - 1 - scale]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] float in [0, 1] -> [H, W, C] uint8 of the first image (round half to even)."""
    return (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
