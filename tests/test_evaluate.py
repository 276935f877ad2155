"""`n2l eval`: measurements, files and their schema, resumability, codec availability."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from n2l.evaluate import add_eval_arguments, evaluate, main, run_eval
from n2l.evaluate import codecs as codecs_mod
from n2l.evaluate.anchors import Anchor, coolchic_curves, is_full_kodak, load_kodak_anchors
from n2l.evaluate.codecs import FunctionCodec, classical_codecs, parse_codec_names
from n2l.evaluate.report import dataset_curve, published_bd_table, read_tsv
from n2l.evaluate.runner import ROW_FIELDS, center_crop, ms_ssim_rgb, psnr_mse

DATA = Path(__file__).parent / "data"
IMAGES = [DATA / "eval_kodim05_32.png", DATA / "eval_kodim23_32.png"]
try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
SCHEMA_KEYS = {"bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time"}


def _jpeg_standin(name: str = "n2l", qualities=(20, 80)) -> FunctionCodec:
    """A stand-in codec (JPEG 4:4:4) with n2l's interface, for the fast tests."""

    def enc(img: np.ndarray, q: float) -> bytes:
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="JPEG", quality=int(q), subsampling=0)
        return out.getvalue()

    def dec(buf: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(buf)).convert("RGB"))

    return FunctionCodec(name, qualities, enc, dec, settings={"standin": True},
                         versions={"standin": "1"}, info_fn=lambda buf, h, w: {"macs_per_pixel": 123.0})


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _check_outputs(out: Path, codec_names: list[str], n_rows: int) -> None:
    rows = _read_tsv(out / "results.tsv")
    assert len(rows) == n_rows
    assert list(rows[0]) == list(ROW_FIELDS)
    for r in rows:
        assert float(r["bpp"]) == pytest.approx(8 * int(r["bytes"]) / (int(r["width"]) * int(r["height"])))
        assert math.isfinite(float(r["psnr"])) and float(r["psnr"]) > 5
        assert r["ms_ssim"] == "nan" and "ms-ssim" in r["note"]  # 32x32 is too small for MS-SSIM
    for name in codec_names:
        doc = json.loads((out / "json" / f"{name}.json").read_text())
        assert doc["name"] == name and isinstance(doc["description"], str)
        assert SCHEMA_KEYS <= set(doc["results"])
        n = len(doc["results"]["bpp"])
        assert n >= 2 and all(len(doc["results"][k]) == n for k in SCHEMA_KEYS)
        assert doc["results"]["bpp"] == sorted(doc["results"]["bpp"])
        assert all(v is None for v in doc["results"]["ms-ssim-rgb"])  # NaN -> null
    bd = json.loads((out / "bd_rate.json").read_text())
    assert {d["anchor"] for d in bd["dataset"]} == set(codec_names) - {"n2l"}
    assert len(bd["per_image"]) == len(IMAGES) * (len(codec_names) - 1)
    run = json.loads((out / "run.json").read_text())
    assert set(run["codecs"]) == set(codec_names) and run["n_images"] == len(IMAGES)
    summary = (out / "summary.md").read_text()
    assert "BD-rate" in summary and "PSNR (mean MSE)" in summary and "not the full uncropped Kodak" in summary
    if HAVE_MATPLOTLIB:
        assert (out / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_read_tsv(out / "bd_rate_per_image.tsv")) == len(bd["per_image"])


def test_evaluate_standin_files_schema_and_resume(tmp_path):
    codecs, skipped = classical_codecs(["jpeg420", "webp"])
    assert not skipped
    all_codecs = [_jpeg_standin(), *codecs]
    n_rows = len(IMAGES) * sum(len(c.qualities) for c in all_codecs)
    result = evaluate(IMAGES, all_codecs, tmp_path, quiet=True)
    _check_outputs(tmp_path, ["n2l", "jpeg420", "webp"], n_rows)
    # JPEG 4:4:4 at q20/80 lies inside the JPEG 4:2:0 sweep: the BD-rate must be defined.
    jpeg_bd = next(d for d in result["bd"]["dataset"] if d["anchor"] == "jpeg420")
    assert 0 < jpeg_bd["bd_rate_pct_mean_psnr"] < 300  # 4:4:4, unoptimized tables: more bits
    n2l_curve = result["curves"]["n2l"]
    assert n2l_curve["macs_per_pixel"] == [123.0, 123.0]
    assert n2l_curve["psnr_of_mean_mse"][0] <= n2l_curve["psnr"][0] + 1e-9  # Jensen
    assert len(Path(tmp_path / "bitstreams").glob("*.n2l").__iter__().__next__().read_bytes()) > 0
    # results.tsv reads back to the same curve (bench/compare_runs.py works from it).
    rows = [r for r in read_tsv(tmp_path / "results.tsv") if r["codec"] == "n2l"]
    again = dataset_curve(rows, sorted({r["image"] for r in rows}))
    assert again["bpp"] == pytest.approx(n2l_curve["bpp"]) and again["psnr"] == pytest.approx(n2l_curve["psnr"])

    # Interrupted-run simulation: drop half the cache; a rerun only measures the missing points.
    cache = tmp_path / "cache.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == n_rows
    cache.write_text("\n".join(lines[: n_rows // 2]) + "\n")
    calls = []
    counting = _jpeg_standin()
    orig = counting.encode_fn
    counting.encode_fn = lambda img, q: calls.append(q) or orig(img, q)
    evaluate(IMAGES, [counting, *codecs], tmp_path, quiet=True)
    assert len(cache.read_text().splitlines()) == n_rows
    assert len(calls) == sum(1 for line in lines[n_rows // 2 :] if '"codec": "n2l"' in line)
    calls.clear()
    evaluate(IMAGES, [counting, *codecs], tmp_path, quiet=True)
    assert calls == []  # everything cached
    # A changed setting is a different cache key.
    counting.settings = {"standin": False}
    evaluate(IMAGES, [counting, *codecs], tmp_path, quiet=True)
    assert len(calls) == len(IMAGES) * 2


def test_eval_cli_with_real_n2l(tmp_path, quick_polish):
    """The real codec through the real bitstream: 2 crops x 2 qualities, few iterations."""
    import n2l

    out = tmp_path / "out"
    rc = main([*map(str, IMAGES), "--qualities", "2,6", "--iterations", "30", "--mode", "pure", "--codecs", "jpeg",
               "--seed", "3", "-o", str(out), "--quiet"])
    assert rc == 0
    _check_outputs(out, ["n2l", "jpeg420", "jpeg444"], len(IMAGES) * (2 + 12 + 12))
    rows = [r for r in _read_tsv(out / "results.tsv") if r["codec"] == "n2l"]
    assert sorted({r["quality"] for r in rows}) == ["2", "6"]
    for r in rows:
        path = out / "bitstreams" / f"{r['image']}_q{r['quality']}.n2l"
        buf = path.read_bytes()
        assert len(buf) == int(r["bytes"])
        header = n2l.read_header(buf)
        assert (header.width, header.height, header.seed, r["seed"]) == (32, 32, 3, "3")
        assert float(r["macs_per_pixel"]) == pytest.approx(header.config.macs_per_pixel(32, 32))
        rec = n2l.decode(buf, device="cpu")
        ref = np.asarray(Image.open(DATA / f"{r['image']}.png").convert("RGB"))
        assert float(r["psnr"]) == pytest.approx(psnr_mse(ref, rec)[0], abs=1e-4)
    # Higher quality -> more bytes, on every image.
    for name in {r["image"] for r in rows}:
        by_q = {r["quality"]: int(r["bytes"]) for r in rows if r["image"] == name}
        assert by_q["6"] > by_q["2"]


def test_eval_jobs_measure_n2l_in_worker_processes(tmp_path, monkeypatch):
    """--jobs 2: n2l's points come from two worker processes, in order, with the bytes an
    encode in this process writes (the stream does not depend on the process or its threads)."""
    import n2l
    from n2l.evaluate import runner

    pools = []

    class RecordingPool(runner.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(runner, "ProcessPoolExecutor", RecordingPool)
    out = tmp_path / "out"
    rc = main([*map(str, IMAGES), "--qualities", "5", "--iterations", "20", "--codecs", "jpeg",
               "--jobs", "2", "-o", str(out), "--quiet"])
    assert rc == 0
    rows = _read_tsv(out / "results.tsv")
    assert [(r["codec"], r["image"]) for r in rows if r["codec"] == "n2l"] == [("n2l", p.stem) for p in IMAGES]
    for r in (r for r in rows if r["codec"] == "n2l"):
        img = np.asarray(Image.open(DATA / f"{r['image']}.png").convert("RGB"))
        buf = n2l.encode(img, 5, iterations=20, verbose=False)
        assert (out / "bitstreams" / f"{r['image']}_q{r['quality']}.n2l").read_bytes() == buf
    assert pools == [2] and json.loads((out / "run.json").read_text())["jobs"] == 2
    assert main([*map(str, IMAGES), "--jobs", "0", "-o", str(out), "--quiet"]) == 2


def test_n2l_cache_key_follows_the_networks_tried(monkeypatch):
    """A change of the networks a level tries (not only of its training) re-keys n2l's rows."""
    from n2l import encoder
    from n2l.evaluate.codecs import N2LCodec

    before = N2LCodec().settings
    assert N2LCodec().settings == before
    monkeypatch.setitem(encoder.HYBRID_ALTERNATIVES, 2, (5,))
    assert N2LCodec().settings != before


def test_unavailable_codec_is_skipped_with_warning(monkeypatch, tmp_path):
    def broken():
        raise ImportError("no such library here")

    monkeypatch.setitem(codecs_mod._FACTORIES, "avif", broken)
    with pytest.warns(UserWarning, match="avif is unavailable"):
        codecs, skipped = classical_codecs(["jpeg420", "avif"])
    assert [c.name for c in codecs] == ["jpeg420"] and "no such library" in skipped["avif"]

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(IMAGES[0]), "--codecs", "avif,webp", "--no-n2l", "-o", str(tmp_path), "-q"])
    assert run_eval(args) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert list(run["codecs"]) == ["webp"] and "avif" in run["skipped_codecs"]
    assert "avif | skipped" in (tmp_path / "summary.md").read_text()


def test_parse_codec_names():
    assert parse_codec_names("jpeg,webp") == ["jpeg420", "jpeg444", "webp"]
    assert parse_codec_names("none") == []
    with pytest.raises(ValueError):
        parse_codec_names("jpeg2000x")


def test_metrics_and_crop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (200, 180, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)
    psnr, mse = psnr_mse(a, b)
    assert mse == pytest.approx(np.mean((a.astype(float) - b) ** 2))
    assert psnr == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr_mse(a, a)[0] == math.inf
    try:
        import pytorch_msssim  # noqa: F401
    except ImportError:
        assert math.isnan(ms_ssim_rgb(a, b)[0])
    else:
        value, note = ms_ssim_rgb(a, b)
        assert 0.9 < value < 1 and note == ""
        assert ms_ssim_rgb(a, a)[0] == pytest.approx(1.0, abs=1e-5)
    value, note = ms_ssim_rgb(a[:64, :64], b[:64, :64])
    assert math.isnan(value) and "161" in note
    c = center_crop(a, 64)
    assert c.shape == (64, 64, 3) and np.array_equal(c, a[68:132, 58:122])


def test_kodak_detection_and_published_table(tmp_path):
    names = [f"kodim{i:02d}" for i in range(1, 25)]
    assert is_full_kodak(names, None)
    assert not is_full_kodak(names, 256) and not is_full_kodak(names[:8], None)
    anchors, notes = load_kodak_anchors(tmp_path / "missing")
    assert anchors == [] and "not found" in notes[0]
    curve = {"bpp": [0.2, 0.5, 1.0], "psnr": [30.0, 33.0, 36.0], "psnr_of_mean_mse": [29.0, 32.0, 35.0]}
    same = Anchor("same", [0.2, 0.5, 1.0], [30.0, 33.0, 36.0], "mean per-image PSNR", "test")
    cheaper = Anchor("cheaper", [0.18, 0.45, 0.9], [29.0, 32.0, 35.0], "PSNR of mean MSE", "test")
    table, _ = published_bd_table(curve, [same, cheaper])
    assert table[0]["bd_rate_pct"] == pytest.approx(0.0, abs=1e-9)
    assert table[1]["bd_rate_pct"] == pytest.approx(100 / 0.9 - 100, abs=1e-6)  # uses psnr_of_mean_mse


def test_coolchic_curves_conventions(tmp_path):
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("lmbda\tseq_name\tn_pixels\tloss\tpsnr_db\trate_bpp\n"
                   "0.001\ta\t1\t0\t30.0\t0.4\n0.001\tb\t1\t0\t40.0\t0.6\n"
                   "0.004\ta\t1\t0\t28.0\t0.2\n0.004\tb\t1\t0\t36.0\t0.3\n")
    cc = coolchic_curves(tsv)
    assert cc["lmbda"] == [0.004, 0.001] and cc["bpp"] == pytest.approx([0.25, 0.5])
    assert cc["psnr_mean"] == pytest.approx([32.0, 35.0])
    mse = (10 ** (-3.0) + 10 ** (-4.0)) / 2 * 255**2
    assert cc["psnr_of_mean_mse"][1] == pytest.approx(10 * math.log10(255**2 / mse))


def test_published_anchors_when_present():
    """Against the shared published curves, only where this checkout has them (users' clones do not)."""
    anchors, notes = load_kodak_anchors()
    if not anchors:
        pytest.skip("; ".join(notes))
    names = {a.name for a in anchors}
    assert {"VTM (VVC intra)", "C3", "ELIC (paper)", "Cool-chic 5.0.1"} <= names
    cc = next(a for a in anchors if a.name == "Cool-chic 5.0.1" and a.convention == "PSNR of mean MSE")
    # Cool-chic's README: lambda 1e-3 -> 0.482 bpp / 34.23 dB (PSNR of mean MSE).
    assert any(abs(b - 0.482) < 1e-3 and abs(p - 34.23) < 0.01 for b, p in zip(cc.bpp, cc.psnr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vtm = next(a for a in anchors if a.name.startswith("VTM"))
        table, _ = published_bd_table({"bpp": vtm.bpp, "psnr": vtm.psnr, "psnr_of_mean_mse": vtm.psnr}, [vtm])
    assert table[0]["bd_rate_pct"] == pytest.approx(0.0, abs=1e-9)


def test_quality_parsing_and_bad_arguments(tmp_path):
    from n2l.evaluate import _qualities, add_eval_arguments

    assert _qualities(["0,2", "4"]) == [0, 2, 4] and _qualities(["0-8"]) == list(range(9))
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    defaults = parser.parse_args(["image.png", "-o", str(tmp_path)])
    assert _qualities(defaults.qualities) == list(range(9))  # the whole ladder, as RESULTS 8m measures it
    with pytest.raises(argparse.ArgumentTypeError):
        _qualities(["9"])
    assert main([str(IMAGES[0]), "--qualities", "12", "-o", str(tmp_path), "-q"]) == 2
    assert main([str(IMAGES[0]), "--preset", "nope", "-o", str(tmp_path), "-q"]) == 2
    assert main([str(IMAGES[0]), "--codecs", "bmp", "-o", str(tmp_path), "-q"]) == 2
