"""End-to-end codec behaviour through the public API (torch reference decoder)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import n2l
from n2l.decoder import backend_available
from n2l.encoder import MODES
from n2l.images import ImageError, to_tensor


def _blurred(img: np.ndarray, factor: int) -> np.ndarray:
    """Box-downsample then bilinear-upsample: what a network that learned only coarse colour gives."""
    h, w, _ = img.shape
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def test_round_trip_beats_flat_and_blurred(crop64, encoded64):
    decoded = n2l.decode(encoded64, device="cpu", backend="torch")
    assert decoded.shape == crop64.shape and decoded.dtype == np.uint8
    flat = np.broadcast_to(crop64.reshape(-1, 3).mean(0).round().astype(np.uint8), crop64.shape)
    quality = n2l.psnr(decoded, crop64)
    assert quality > n2l.psnr(flat, crop64) + 8
    assert quality > n2l.psnr(_blurred(crop64, 8), crop64) + 3
    assert quality > 24.0
    header = n2l.read_header(encoded64)
    assert 0.05 < header.bpp < 8.0
    assert header.config == n2l.preset("default")


def test_decoding_is_deterministic(encoded64):
    a = n2l.decode(encoded64, device="cpu", backend="torch")
    b = n2l.decode(encoded64, device="cpu", backend="torch")
    assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_quality_orders_rate(mode, quick_polish):
    rng = np.random.default_rng(3)
    img = np.asarray(Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((24, 24)))
    low = n2l.encode(img, quality=0, mode=mode, iterations=60, verbose=False)
    high = n2l.encode(img, quality=8, mode=mode, iterations=60, verbose=False)
    assert len(low) < len(high)


def test_default_mode_is_hybrid():
    """Hybrid (transmitted coarse latents) is the default: a third of pure's bits (RESULTS 7b)."""
    img = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert n2l.read_header(n2l.encode(img, iterations=5, verbose=False)).config.coded_scales > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (5, 3, 1), (9, 16)])
def test_odd_sizes_and_grayscale(shape, mode):
    rng = np.random.default_rng(sum(shape))
    img = (rng.random(shape) * 255).astype(np.uint8)
    buf = n2l.encode(img, quality=2, mode=mode, iterations=30, verbose=False)
    out = n2l.decode(buf, device="cpu", backend="torch")
    expected_channels = shape[2] if len(shape) == 3 else 1
    assert out.shape == (shape[0], shape[1], expected_channels)
    header = n2l.read_header(buf)
    assert (header.height, header.width, header.channels) == out.shape


def test_input_types_give_the_same_pixels(crop64, tmp_path):
    path = tmp_path / "crop.png"
    Image.fromarray(crop64).save(path)
    tensor = to_tensor(crop64)[0]  # [C, H, W]
    for source in (str(path), path, Image.fromarray(crop64), tensor):
        assert np.array_equal(n2l.load_image(source), crop64)


def test_mode_conversions_and_rejections(crop64):
    rgb = Image.fromarray(crop64)
    assert np.array_equal(n2l.load_image(rgb.convert("RGBA")), crop64)  # opaque alpha dropped
    palette = rgb.quantize(16)
    assert np.array_equal(n2l.load_image(palette), np.asarray(palette.convert("RGB")))
    assert n2l.load_image(rgb.convert("1")).shape == (64, 64, 1)
    transparent = rgb.convert("RGBA")
    transparent.putpixel((0, 0), (0, 0, 0, 10))
    with pytest.raises(ImageError, match="transparency"):
        n2l.load_image(transparent)
    with pytest.raises(ImageError, match="mode"):
        n2l.load_image(Image.new("I;16", (4, 4)))
    with pytest.raises(ImageError, match="mode"):
        n2l.load_image(rgb.convert("CMYK"))
    with pytest.raises(ImageError):
        n2l.load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageError):
        n2l.load_image(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ImageError):
        n2l.load_image(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError):
        n2l.encode(crop64, quality=9)
    for seed in (-1, 2**32):  # the header's seed is a u32: such a stream could not be read
        with pytest.raises(ValueError, match="seed must be"):
            n2l.encode(crop64, seed=seed, iterations=1, verbose=False)


def _rd_cost(img: np.ndarray, buf: bytes, quality: int) -> float:
    mse = np.mean((n2l.decode(buf, device="cpu").astype(np.float64) - img) ** 2) / 255**2
    return mse + n2l.encoder.quality_lambda(quality, "hybrid", img) * 8 * len(buf) / (img.shape[0] * img.shape[1])


def test_seed_candidates_keep_the_best_single_seed_stream(crop64, quick_polish):
    """seeds=2 runs both seeds' whole encodes side by side (one torch thread each) and keeps
    the lower RD cost: the same bytes as the better single-seed encode on one thread."""
    img = crop64[:32, :32]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        singles = [n2l.encode(img, 3, iterations=40, seed=s, verbose=False) for s in (7, 8)]
        torch.set_num_threads(2)
        both = n2l.encode(img, 3, iterations=40, seeds=2, seed=7, verbose=False)
        again = n2l.encode(img, 3, iterations=40, seeds=2, seed=7, verbose=False)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert singles[0] != singles[1]
    assert both == again  # the threads do not change the result
    assert both == min(singles, key=lambda b: _rd_cost(img, b, 3))


@pytest.mark.parametrize("crippled_first", [True, False])
def test_structure_trial_goes_on_with_the_cheaper_network(crop64, monkeypatch, crippled_first):
    """At a level with alternatives, the encoder trains each network briefly and goes on with
    the one whose quantized stream costs less, whichever its place: the same bytes as an encode
    of that network alone."""
    from dataclasses import replace

    from n2l import encoder

    img = crop64[:32, :32]
    good = encoder.HYBRID_CONFIGS[3]
    crippled = replace(good, synth_hidden=(1,), synth_residual=0)  # one hidden unit: a poor image
    first, second = (crippled, good) if crippled_first else (good, crippled)
    monkeypatch.setattr(encoder, "HYBRID_CONFIGS", (*encoder.HYBRID_CONFIGS[:3], first, second, *encoder.HYBRID_CONFIGS[5:]))
    monkeypatch.setitem(encoder.HYBRID_ALTERNATIVES, 3, (4,))
    assert [c for c, _ in encoder.network_structures(3)] == [first, second]
    chosen = n2l.encode(img, 3, iterations=150, verbose=False)
    assert n2l.read_header(chosen).config == replace(good, out_channels=3)
    assert chosen == n2l.encode(img, 3, iterations=150, config=good, verbose=False)


@pytest.mark.skipif(n2l.cpu.unavailable_reason() is not None, reason="training on the C++ core's kernels")
@pytest.mark.parametrize("mode", ["hybrid", "pure"])
def test_cpu_streams_do_not_depend_on_the_thread_count(crop64, mode, quick_polish):
    """With the C++ core, a CPU encode runs torch on one thread and the core's kernels (fixed
    bands, summed in order) on the others: the same bytes for any thread count."""
    img = crop64[:40, :24]
    threads = torch.get_num_threads()
    try:
        streams = []
        for n in (1, 3):
            torch.set_num_threads(n)
            streams.append(n2l.encode(img, 6, mode=mode, iterations=30, verbose=False))
    finally:
        torch.set_num_threads(threads)
    assert streams[0] == streams[1]


def test_seed_candidates_under_rate_control_stay_under_the_target(crop64, quick_polish):
    buf = n2l.encode(crop64[:32, :32], iterations=40, seeds=2, target_bytes=300, verbose=False)
    assert 0.5 * 300 <= len(buf) <= 300


def test_encoding_leaves_the_global_random_state_alone():
    img = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    n2l.encode(img, iterations=5, verbose=False)
    assert torch.equal(torch.rand(3), expected)


def test_rate_control_never_exceeds_the_target_size(crop64, quick_polish):
    target = 700
    buf = n2l.encode(crop64, mode="pure", target_bytes=target, iterations=60, verbose=False)
    assert len(buf) <= target
    assert len(buf) >= 0.5 * target  # the controller uses the budget, not a token stream
    with pytest.raises(ValueError, match="smallest stream"):
        n2l.encode(crop64, mode="pure", target_bytes=20, iterations=10, verbose=False)


def test_hybrid_mode_round_trip(crop64, quick_polish):
    """Hybrid mode: transmitted coarse latents; every backend here decodes the same stream."""
    config = n2l.preset("fast", coded_scales=3)
    buf = n2l.encode(crop64, quality=4, config=config, iterations=300, verbose=False)
    header = n2l.read_header(buf)
    assert header.config.coded_scales == 3 and len(header.codes) == 2 * len(config.layer_shapes()) + 3
    decoded = n2l.decode(buf, device="cpu", backend="torch")
    flat = np.broadcast_to(crop64.reshape(-1, 3).mean(0).round().astype(np.uint8), crop64.shape)
    assert n2l.psnr(decoded, crop64) > n2l.psnr(flat, crop64) + 6
    if backend_available("cpu"):
        cpu = n2l.decode(buf, device="cpu", backend="cpu")
        assert np.abs(cpu.astype(int) - decoded.astype(int)).max() <= 1


def test_hybrid_rate_control_never_exceeds_the_target_size(crop64, quick_polish):
    buf = n2l.encode(crop64, mode="hybrid", target_bytes=600, iterations=100, verbose=False)
    assert len(buf) <= 600 and n2l.read_header(buf).config.coded_scales > 0


def test_rate_control_after_a_structure_trial_stays_under_the_target(crop64, quick_polish):
    from n2l import encoder

    target = round(encoder.typical_hybrid_rd(crop64)[4][0] * 64 * 64 / 8)  # level 4's typical size
    assert len(encoder.network_structures(encoder._quality_for_target("hybrid", crop64, target, None))) > 1
    buf = n2l.encode(crop64, target_bytes=target, iterations=100, verbose=False)
    assert 0.8 * target <= len(buf) <= target


@pytest.mark.filterwarnings("ignore:target PSNR")  # 60 iterations do not reach it
@pytest.mark.parametrize("size_target", [True, False])
def test_rate_control_moves_up_the_ladder_to_the_network_of_the_level_its_lambda_reaches(crop64, monkeypatch,
                                                                                       size_target, quick_polish):
    """A first probe that moves lambda far up the ladder (toward more bits) makes training start
    over with the networks of the level it reaches (here level 6's, from level 4's two candidates);
    one that moves it far down starts over with the same network."""
    from n2l import encoder

    first_probe = encoder._LambdaControl.probe
    biases, destination = [], {}

    def probe(control, n):
        if control.probed:
            return first_probe(control, n)
        biases.append(control.first_probe_bias)
        control.probed.append((math.log(control.t.lmbda), 0.0))
        control.t.lmbda = encoder.QUALITY_LAMBDAS[destination["level"]] * 1.2
        return True

    monkeypatch.setattr(encoder._LambdaControl, "probe", probe)
    bpp, psnr = encoder.typical_hybrid_rd(crop64)[4]
    target = {"target_bytes": round(bpp * 64 * 64 / 8)} if size_target else {"target_psnr": psnr - 0.5}
    assert encoder._quality_for_target("hybrid", crop64, target.get("target_bytes"), target.get("target_psnr")) == 4
    level_4 = {config for config, _ in encoder.network_structures(4)}
    for level, expected in ((6, {encoder.HYBRID_CONFIGS[6]}), (2, level_4)):
        destination["level"] = level
        buf = n2l.encode(crop64, iterations=60, verbose=False, **target)
        assert n2l.read_header(buf).config in expected
    assert encoder.HYBRID_CONFIGS[2] not in level_4
    # with a network given, it keeps that one
    buf = n2l.encode(crop64, iterations=60, verbose=False, config=encoder.HYBRID_CONFIGS[4], **target)
    assert n2l.read_header(buf).config == encoder.HYBRID_CONFIGS[4]
    # the first probe's typical bias is discounted for the ladder's own level 4 only
    ladder = math.log(encoder.FIRST_PROBE_OVERSIZE[4]) if size_target else encoder.FIRST_PROBE_PSNR_OFFSET[4]
    assert biases == [pytest.approx(ladder)] * 2 + [0.0] and ladder != 0


def test_starting_over_trains_only_what_is_left_of_the_main_phase(crop64, monkeypatch, quick_polish):
    """After the first probe starts training over, the new run's schedule is shortened by the
    steps already spent: the main phase takes as many steps in all as a plain encode's."""
    from n2l import encoder

    first_probe, step, noisy_steps = encoder._LambdaControl.probe, encoder._Trainer.step, []

    def counting_step(trainer, lr, params=None):
        noisy_steps.append(params is None)  # the main phase's steps; fine-tuning passes rounded weights
        return step(trainer, lr, params)

    def probe(control, n):
        if control.probed:
            return first_probe(control, n)
        control.probed.append((math.log(control.t.lmbda), 0.0))
        control.t.lmbda *= 0.3
        return True

    monkeypatch.setattr(encoder._Trainer, "step", counting_step)
    monkeypatch.setattr(encoder._LambdaControl, "probe", probe)
    n2l.encode(crop64, config=encoder.HYBRID_CONFIGS[2], iterations=100, target_bytes=2000, verbose=False)
    n_main = encoder._schedule(encoder.TrainingConfig(iterations=100))[0]
    assert sum(noisy_steps) == n_main


@pytest.fixture(scope="module")
def hybrid_quantizer(crop64):
    """A briefly trained hybrid network, quantized at its searched steps."""
    from n2l.encoder import HYBRID_CONFIGS, TrainingConfig, _learned_exponents, _Quantizer, _Trainer
    config = HYBRID_CONFIGS[3]
    trainer = _Trainer(config, 0, to_tensor(crop64), 2e-3, TrainingConfig())
    for _ in range(300):
        trainer.step(1e-2)
    quantizer = _Quantizer(trainer)
    return quantizer, quantizer.search(_learned_exponents(trainer), passes=2, reach=4), (64, 64, config)


@pytest.mark.parametrize(("kind", "offset"), [("bytes", 1.06), ("bytes", 0.94), ("psnr", 0.4), ("psnr", -0.3)])
def test_latent_refinement_lands_between_the_steps(crop64, hybrid_quantizer, kind, offset):
    """Rate control's fine knob: from a stream 6% over or under a size target (or 0.4 dB above,
    0.3 dB below a PSNR target), moving latent values one at a time lands in the band, and the
    stream decodes to the measured quality."""
    from n2l.encoder import _bitstream, _psnr_from_mse, _trim
    quantizer, exponents, header = hybrid_quantizer
    size = len(_bitstream(quantizer, exponents, *header))
    psnr = _psnr_from_mse(quantizer.measure(exponents)[0])
    target_bytes = round(size / offset) if kind == "bytes" else None
    target_psnr = psnr - offset if kind == "psnr" else None
    trimmed = _trim(quantizer, exponents, header, target_bytes, target_psnr)
    assert trimmed is not None
    buf = _bitstream(trimmed, exponents, *header)
    reached = n2l.psnr(n2l.decode(buf, device="cpu", backend="torch"), crop64)
    assert reached == pytest.approx(_psnr_from_mse(trimmed.measure(exponents)[0]), abs=1e-6)
    if kind == "bytes":
        assert 0.97 * target_bytes <= len(buf) <= target_bytes
        assert (reached > psnr) == (target_bytes > size)  # bits spent buy quality
    else:
        assert target_psnr <= reached <= target_psnr + 0.1
        assert (len(buf) < size) == (target_psnr < psnr)


def test_step_bisection_moves_up_when_every_stream_in_its_range_is_too_large(hybrid_quantizer):
    """Rate control's step bisection spans lambda x e^(+-4); when the probes left lambda so low
    that every stream in that span is over a size target, it moves the span up instead of
    reporting the target unreachable."""
    from n2l.encoder import _bitstream, _rate_control
    quantizer, exponents, header = hybrid_quantizer
    lmbda, target = quantizer.lmbda, round(0.9 * len(_bitstream(quantizer, exponents, *header)))
    try:
        quantizer.lmbda = lmbda * 1e-4
        found, _, _ = _rate_control(quantizer, exponents, header, target, None)
    finally:
        quantizer.lmbda = lmbda
    assert found is not None and len(_bitstream(quantizer, found, *header)) <= target


def test_refinement_lowers_the_rd_cost(hybrid_quantizer):
    """RDOQ of the latents at the encode's lambda: the refined network costs less than the
    plain rounding (this short training leaves moves that pay); nothing `keep` refuses is kept."""
    from n2l.encoder import _refine
    quantizer, exponents, _ = hybrid_quantizer
    assert _refine(quantizer, exponents).cost(exponents) < quantizer.cost(exponents)
    assert _refine(quantizer, exponents, keep=lambda q: False) is quantizer  # rate control's band


def test_weight_refinement_lowers_the_rd_cost_and_writes_its_integers(crop64, hybrid_quantizer):
    """Per-weight RDOQ: some weight integers move, the real cost goes down, and the stream
    decodes to the MSE the refinement measured; nothing `keep` refuses is kept."""
    from n2l.encoder import _bitstream, _refine_weights
    quantizer, exponents, header = hybrid_quantizer
    refined = _refine_weights(quantizer, exponents)
    assert refined.cost(exponents) < quantizer.cost(exponents)
    moved = [name for name, e in zip(quantizer.float_params, exponents) if not name.startswith("coded.")
             and (refined.tensor(name, e)[0] != quantizer.tensor(name, e)[0]).any()]
    assert moved
    decoded = n2l.decode(_bitstream(refined, exponents, *header), device="cpu", backend="torch")
    mse = np.mean((decoded.astype(np.float64) - crop64) ** 2) / 255**2
    assert mse == pytest.approx(refined.measure(exponents)[0], rel=1e-4)
    assert _refine_weights(quantizer, exponents, keep=lambda q: False) is quantizer


def test_polish_alternates_refinements_for_a_lower_cost(hybrid_quantizer):
    """The exact refinement of the coarse latents lowers the cost on its own; the whole polish
    (latents by estimate, weights, coarse latents, again) ends below the latent refinement alone."""
    from n2l.encoder import _polish, _refine, _refine_coarse_latents
    quantizer, exponents, _ = hybrid_quantizer
    assert _refine_coarse_latents(quantizer, exponents).cost(exponents) < quantizer.cost(exponents)
    assert _refine_coarse_latents(quantizer, exponents, keep=lambda q: False) is quantizer
    assert _polish(quantizer, exponents).cost(exponents) < _refine(quantizer, exponents).cost(exponents)


def test_targets_start_at_the_level_typical_of_the_image(crop64):
    """Size targets start at the level whose typical size for this image is nearest, PSNR
    targets at the first whose typical PSNR reaches them: a hybrid network that generates its
    full-resolution latent saturates in PSNR, so a target above its level's typical PSNR must
    start at a level that transmits that latent. More texture means more bits at each level."""
    from n2l.encoder import HYBRID_CONFIGS, _quality_for_target, texture, typical_hybrid_rd
    typical = typical_hybrid_rd(crop64)
    assert all(b0 < b1 and p0 < p1 for (b0, p0), (b1, p1) in zip(typical, typical[1:]))
    for target in (20.0, 29.0, 32.0, 36.0, 99.0):
        q = _quality_for_target("hybrid", crop64, None, target)
        assert typical[q][1] >= target or q == 8
        assert q == 0 or typical[q - 1][1] < target
    assert HYBRID_CONFIGS[_quality_for_target("hybrid", crop64, None, typical[4][1] + 0.5)].coded_scales == 7
    for q, (bpp, _) in enumerate(typical):
        assert _quality_for_target("hybrid", crop64, round(bpp * 64 * 64 / 8), None) == q
    flat = np.full_like(crop64, 128)
    noise = np.random.default_rng(0).integers(0, 256, crop64.shape, dtype=np.uint8)
    assert texture(flat) == 1.0 and texture(crop64) > 10 and texture(noise) > 1000
    assert typical_hybrid_rd(flat)[4][0] < typical[4][0] < typical_hybrid_rd(noise)[4][0]
    for extreme in (flat, noise):  # beyond the fitted textures: the fit's ends, still monotone
        rd = typical_hybrid_rd(extreme)
        assert all(b0 < b1 and p0 < p1 for (b0, p0), (b1, p1) in zip(rd, rd[1:]))
    assert texture(crop64[:1, :1]) == 1.0  # too small to measure


def test_a_hybrid_level_prices_a_decibel_per_image(crop64, monkeypatch):
    """A hybrid level's lambda is scaled by the MSE the image typically reaches there (the same
    dB per bit for every image): textured images train at a higher lambda, smooth ones at a
    lower; an image of the reference texture at the level's own. Pure mode, an explicit lambda
    and rate control's starting lambda keep the level's own."""
    from n2l import encoder
    flat = np.full_like(crop64, 128)
    noise = np.random.default_rng(0).integers(0, 256, crop64.shape, dtype=np.uint8)
    for q in range(9):
        smooth, textured = (encoder.quality_lambda(q, "hybrid", a) / encoder.QUALITY_LAMBDAS[q] for a in (flat, noise))
        assert smooth < 1 < textured
        gap = encoder.typical_hybrid_rd(flat)[q][1] - encoder.typical_hybrid_rd(noise)[q][1]  # dB
        assert textured / smooth == pytest.approx(10 ** (gap / 10))  # the ratio of their typical MSEs
        assert encoder.quality_lambda(q, "pure", noise) == encoder.QUALITY_LAMBDAS[q]
    monkeypatch.setattr(encoder, "texture", lambda array: encoder.HYBRID_REFERENCE_TEXTURE)
    assert encoder.quality_lambda(4, "hybrid", noise) == pytest.approx(encoder.QUALITY_LAMBDAS[4])
    monkeypatch.undo()
    lam = {rc: encoder._resolve(4, None, None, None, "hybrid", noise, rate_control=rc)[0] for rc in (False, True)}
    assert lam == {False: encoder.quality_lambda(4, "hybrid", noise), True: encoder.QUALITY_LAMBDAS[4]}
    assert encoder._resolve(4, None, 1e-3, None, "hybrid", noise, rate_control=False)[0] == 1e-3


@pytest.mark.parametrize(
    ("found_size", "beyond_size", "target_bytes", "start"),
    [
        (5000, 6100, 6000, "beyond"),  # 2% over beats 17% under: the fine-tuning shrinks it
        (5800, 8000, 6000, "found"),  # already near the goal from below
        (5000, None, 6000, "found"),  # nothing over the target
        (5000, 6100, None, "found"),  # PSNR targets keep the stream that reaches them
    ],
)
def test_controlled_fine_tuning_restarts_nearer_the_goal(monkeypatch, found_size, beyond_size, target_bytes, start):
    from n2l import encoder

    sizes = {"found": found_size, "beyond": beyond_size}
    monkeypatch.setattr(encoder, "_bitstream", lambda quantizer, exponents, *header: bytes(sizes[exponents[0]]))
    beyond = ["beyond"] if beyond_size else None
    assert encoder._restart(None, ["found"], beyond, (), target_bytes) == [start]


def test_rate_control_probes_set_lambda_from_the_fine_tuned_stream(crop64, monkeypatch):
    """A probe runs the quantization-aware phase on a copy (the network is untouched) and moves
    lambda by the typical slope (a far move restarts the main phase), the second probe by the
    secant through both, reading the finished stream."""
    from n2l import encoder
    config = encoder.HYBRID_CONFIGS[0]
    trainer = encoder._Trainer(config, 0, to_tensor(crop64), 2e-2, encoder.TrainingConfig())
    for _ in range(30):
        trainer.step(1e-2)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    control = encoder._LambdaControl(trainer, (64, 64, config), 10**6, None)
    first, second = (round(100 * f) for f in control.PROBE_AT)
    assert not control.needs_probe(first - 1, 100) and control.needs_probe(first, 100)
    assert control.probe(30)  # moved far: start over
    assert all(torch.equal(before[n], p) for n, p in trainer.params.items())
    assert trainer.lmbda == pytest.approx(2e-2 / 16)  # a huge target: the largest move down
    assert not control.needs_probe(second - 1, 100) and control.needs_probe(second, 100)
    # The second probe: sizes e^8 at lambda 1e-2 and e^7 at lambda 4e-2, a secant of -1 / ln 4.
    control.probed = [(math.log(1e-2), 8.0)]
    trainer.lmbda = 4e-2
    finished = []  # the `full` argument of each `_finish` call
    monkeypatch.setattr(encoder, "_finish", lambda q, exponents, full: finished.append(full) or (q, exponents))
    monkeypatch.setattr(control, "_reading", lambda *a: 7.0)
    control.target_bytes = round(math.exp(6.0) / control.SIZE_GOAL)
    assert not control.probe(1)  # only the first probe restarts
    assert finished == [False]  # it read the stream after the latents' RDOQ
    assert trainer.lmbda == pytest.approx(4e-2 * 4, rel=1e-2)  # the goal is one more e down: lambda x4
    assert not control.needs_probe(99, 100)


def test_rate_control_discounts_the_first_probes_bias(crop64, monkeypatch):
    """The first probe's reading is corrected by its typical bias (a young network's stream is
    larger than the plain stream at the same lambda); the second is taken as read."""
    from n2l import encoder
    config = encoder.HYBRID_CONFIGS[0]
    trainer = encoder._Trainer(config, 0, to_tensor(crop64), 1e-2, encoder.TrainingConfig())
    target = round(math.exp(8.0) / encoder._LambdaControl.SIZE_GOAL)
    control = encoder._LambdaControl(trainer, (64, 64, config), target, None, first_probe_bias=0.5)
    monkeypatch.setattr(encoder, "_finish", lambda quantizer, exponents, full: (quantizer, exponents))
    monkeypatch.setattr(control, "_reading", lambda *a: 8.5)
    assert not control.probe(1)
    assert control.probed[-1][1] == pytest.approx(8.0) and trainer.lmbda == pytest.approx(1e-2, rel=1e-3)
    control.probe(1)
    assert control.probed[-1][1] == 8.5 and trainer.lmbda > 2e-2  # 0.5 over the goal: lambda x2.3


@pytest.mark.parametrize(("upsampling", "reach"), [("bilinear", 1), ("bicubic", 2)])
def test_latent_footprints_bound_what_a_value_changes(upsampling, reach):
    """The footprints' geometry: at the kernel's reach, a coded value changes no output pixel
    outside its footprint (the refinement ranks moves at reach 1, bicubic's main lobe)."""
    from n2l.encoder import _Refinement
    from n2l.model import ModelConfig, N2LModel

    cfg = ModelConfig(n_scales=4, latent_channels=1, coded_scales=3, gpp_hidden=4, synth_hidden=(6,),
                      synth_residual=1, synth_upsampling=upsampling)
    torch.manual_seed(0)
    model = N2LModel(cfg, 29, 35)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    noise = model.noise(0, 29, 35)
    with torch.no_grad():
        base = model(noise)
        for k, latent in enumerate(model.coded):
            name = f"coded.{k}"
            boxes = _Refinement._footprints(cfg, name, tuple(latent.shape[1:]), (29, 35), reach)
            for v in (0, latent.numel() // 2, latent.numel() - 1):
                value = latent.view(-1)[v].item()
                latent.view(-1)[v] = value + 1.0
                changed = (model(noise) - base).abs().amax(dim=(0, 1)) > 0
                latent.view(-1)[v] = value  # restored exactly (- 1.0 could round)
                r0, r1, c0, c1 = boxes[:, v]
                inside = torch.zeros_like(changed)
                inside[r0:r1, c0:c1] = True
                assert changed.any() and not (changed & ~inside).any(), (name, v)
