"""``python -m mmfast.bench.dist_memory``: per-rank peak memory of the distributed ClipLoss against the
world size, measured in real gloo processes and set beside the scaling model's replay."""

from __future__ import annotations

import csv

import pytest

from mmfast.bench import dist_memory


@pytest.mark.distributed
def test_dist_memory_measures_every_scheme_and_writes_its_table(tmp_path, capsys):
    rc = dist_memory.main(["--worlds", "2,4", "--batch", "64", "--dim", "64",
                           "--schemes", "open_clip,ring:2,gather:4", "--out", str(tmp_path), "--timeout", "300"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "dist_memory.csv")))
    # gather:4 does not run at W=2 (4 does not divide 2)
    assert [(r["scheme"], int(r["world"])) for r in rows] == [
        ("open_clip", 2), ("ring:2", 2), ("open_clip", 4), ("ring:2", 4), ("gather:4", 4)]
    for r in rows:  # the replay of mmfast's allocations against the profiler
        measured, predicted = int(r["measured_bytes"]), int(r["predicted_bytes"])
        assert measured > 0
        if r["scheme"] != "open_clip":
            assert 1 / 1.3 <= predicted / measured <= 1.3, r
    ring4 = next(r for r in rows if r["scheme"] == "ring:2" and r["world"] == "4")
    oc4 = next(r for r in rows if r["scheme"] == "open_clip" and r["world"] == "4")
    want = int(oc4["measured_bytes"]) / int(ring4["measured_bytes"])
    assert float(ring4["open_clip_over_this"]) == pytest.approx(want, rel=0.01)
    assert (tmp_path / "dist_memory.png").stat().st_size > 1000
    assert "| ring:2 | 4 |" in (tmp_path / "dist_memory.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--schemes", "ring"], "--schemes"),
    (["--schemes", "bogus:2"], "--schemes"),
    (["--schemes", "ring:0"], "--schemes"),
    (["--worlds", "1"], "--worlds"),
])
def test_dist_memory_rejects_bad_arguments(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        dist_memory.main([*args, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
