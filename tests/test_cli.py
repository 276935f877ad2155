"""The command line: encode / decode / info, atomic outputs and one-line errors."""

import numpy as np
from PIL import Image

from n2l import bitstream
from n2l.cli import main


def test_encode_decode_info(tmp_path, capsys):
    src = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((12, 20, 3)) * 255).astype(np.uint8)).save(src)
    stream, out = tmp_path / "x.n2l", tmp_path / "out.png"
    assert main(["encode", str(src), "-o", str(stream), "-n", "20", "-q", "1", "--seed", "5", "--quiet"]) == 0
    assert "bpp" in capsys.readouterr().out and stream.stat().st_size > 20
    assert main(["decode", str(stream), "-o", str(out), "--device", "cpu", "--quiet"]) == 0
    assert Image.open(out).size == (20, 12)
    assert main(["info", str(stream)]) == 0
    info = capsys.readouterr().out
    assert "20x12" in info and "MAC/pixel" in info and "weights" in info and f"version {bitstream.VERSION}" in info
    assert "seed:     5" in info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png", "x.n2l"]  # no temp files


def test_errors_are_one_line_and_leave_no_output(tmp_path, capsys):
    bad = tmp_path / "bad.n2l"
    bad.write_bytes(b"N2L\x01garbage")
    out = tmp_path / "out.png"
    assert main(["decode", str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("n2l decode: error:") and "truncated" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["info", str(tmp_path / "missing.n2l")]) == 1
    assert "cannot read" in capsys.readouterr().err
    src = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(src)
    assert main(["encode", str(src), "-o", str(out), "-n", "2", "--seed", "-1", "--quiet"]) == 1
    assert "seed must be" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [bad, src]


def test_parse_size():
    from n2l.cli import parse_size

    assert [parse_size(t) for t in ("20KB", "20k", "1.5MB", "20000", "12KiB")] == [20000, 20000, 1500000, 20000, 12288]
