"""The reference trainer, ``python -m mmfast.train``: learning, exact resume, DDP equivalence, robustness, data.

Every run here is a tiny model (a few thousand samples at most) in this process through
``mmfast.train.main``, except the torchrun one, so the file stays well under two minutes on two busy
cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmfast.functional
from mmfast.train import checkpoint as ckpt_io
from mmfast.train import main, trainer
from mmfast.train.data import ShapesDataset
from mmfast.train.tokenizer import Tokenizer

# 32 x 32 images, 4 x 4 patches: an 8 x 8 grid, 4 x 4 windows (one plain, one shifted block), then two
# global blocks with ToMe (the second one uses proportional attention).
TINY = ["--image-size", "32", "--patch-size", "4", "--width", "48", "--depth", "4", "--heads", "2",
        "--window-size", "4", "--global-blocks", "2", "--tome-r", "6", "--text-width", "48", "--text-depth", "1",
        "--text-heads", "2", "--embed-dim", "48", "--threads", "1", "--progress", "none", "--no-memory",
        "--no-plot", "--log-every", "1"]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def run_main(args: list[str]) -> int:
    return main([*TINY, *args])


# ----------------------------------------------------------------------------------------------------
# learning


def test_learns_and_beats_chance(tmp_path):
    out = tmp_path / "run"
    code = run_main(["--steps", "40", "--batch-size", "64", "--lr", "2e-3", "--warmup", "4",
                     "--synthetic-train", "2560", "--synthetic-val", "100", "--eval-every", "40", "--out", str(out)])
    assert code == 0
    loss = [r["loss"] for r in records(out, "train")]
    assert len(loss) == 40
    assert sum(loss[-5:]) / 5 < loss[0] - 0.5, loss  # starts at ~log(64) = 4.16
    first, last = records(out, "eval")[0], records(out, "eval")[-1]
    assert first["step"] == 0 and last["step"] == 40 and last["n"] == 100
    chance = last["chance_r5"]
    assert chance == pytest.approx(0.05)
    for key in ("i2t_r5", "t2i_r5"):
        assert last[key] >= 3 * chance, last
    # the run folder
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["window_size"] == 4 and cfg["tome_r"] == 6 and cfg["context_length"] >= 5
    assert Tokenizer.load(out / "tokenizer.json").vocab_size > 260
    assert (out / "summary.json").is_file()
    assert ckpt_io.find_latest(out).name == "step_0000040.pt"


@pytest.mark.parametrize("shift", [True, False])
def test_model_calls_the_ops_dito_style(shift):
    from types import SimpleNamespace

    from mmfast.reference import tome
    from mmfast.reference.window_attention import window_attention
    from mmfast.train.model import FUSED_OPS, Ops, build_model

    calls = []

    def wa(q, k, v, **kw):
        calls.append(("window", tuple(q.shape), kw["window_size"], kw["shift_size"], tuple(kw["rel_pos_bias"].shape)))
        return window_attention(q, k, v, **kw)

    def bsm(metric, r, class_token=False):
        calls.append(("match", tuple(metric.shape), r, class_token))
        return tome.bipartite_soft_matching(metric, r, class_token=class_token)

    def wavg(merge, x, size):
        calls.append(("wavg", tuple(x.shape), None if size is None else tuple(size.shape)))
        return tome.merge_wavg(merge, x, size)

    cfg = SimpleNamespace(image_size=64, patch_size=8, width=32, depth=5, heads=2, mlp_ratio=2.0, window_size=4,
                          shift=shift, global_blocks=2, tome_r=8, text_width=32, text_depth=1, text_heads=2,
                          text_bidirectional=False, embed_dim=16, loss="clip")
    model = build_model(cfg, 300, 8, 0, 2, Ops("recording", wa, bsm, wavg))
    image_features, text_features, scale, bias = model(torch.randn(3, 3, 64, 64), torch.tensor([[1, 300 - 1, 2]] * 3))
    assert image_features.shape == text_features.shape == (3, 16) and bias is None
    assert scale.item() == pytest.approx(1 / 0.07)
    s = (2, 2) if shift else (0, 0)
    assert calls == [
        ("window", (3, 8, 8, 2, 16), (4, 4), (0, 0), (49, 2)),  # window blocks on the 8 x 8 grid
        ("window", (3, 8, 8, 2, 16), (4, 4), s, (49, 2)),  # shifted by half a window
        ("window", (3, 8, 8, 2, 16), (4, 4), (0, 0), (49, 2)),
        ("match", (3, 64, 16), 8, False), ("wavg", (3, 64, 32), None),  # global blocks: ToMe 64 -> 56
        ("match", (3, 56, 16), 8, False), ("wavg", (3, 56, 32), (3, 56, 1)),  # sizes from the first merge
    ]
    # the mmfast ops are mmfast.functional's wherever it has them (the reference is only a fallback)
    for name in ("window_attention", "bipartite_soft_matching", "merge_wavg"):
        if hasattr(mmfast.functional, name):
            assert getattr(FUSED_OPS, name) is getattr(mmfast.functional, name)


def test_proportional_attention():
    from mmfast.train.model import REFERENCE_OPS, GlobalBlock

    blk = GlobalBlock(8, 2, 2.0, 0, REFERENCE_OPS)
    x, size = torch.randn(2, 5, 8), torch.tensor([1.0, 2, 3, 1, 4]).expand(2, 5)[..., None]
    out, out_size = blk(x, size)
    q, k, v = blk.qkv(blk.norm1(x)).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-1, -2)) / 2 + size[:, None, None, :, 0].log()).softmax(-1)  # log(size) per key
    h = x + blk.proj((attn @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(out, h + blk.mlp(blk.norm2(h)))
    assert out_size is size


@pytest.mark.parametrize("causal", [True, False])
def test_text_tower_ignores_padding(causal):
    from mmfast.train.model import TextTransformer

    tok = Tokenizer(["red", "circle"])
    text = TextTransformer(vocab_size=tok.vocab_size, context_length=12, width=16, depth=2, heads=2, mlp_ratio=2.0,
                           embed_dim=8, causal=causal, pad_id=tok.pad_id, eos_id=tok.eos_id)
    short, long = tok(["a red circle", "red"], 7), tok(["a red circle", "red"], 12)
    assert short[0].tolist()[:6] == [tok.bos_id, tok.byte_offset + ord("a"), 260, 261, tok.eos_id, tok.pad_id]
    torch.testing.assert_close(text(short), text(long))
    assert tok(["red " * 20], 5)[0, -1] == tok.eos_id  # truncated rows keep their EOS


# ----------------------------------------------------------------------------------------------------
# resume


COMMON = ["--steps", "6", "--batch-size", "16", "--synthetic-train", "64", "--synthetic-val", "16",
          "--eval-every", "3", "--save-every", "2", "--keep-checkpoints", "5"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_main([*COMMON, "--out", str(out)]) == 0
    return out


def test_resume_from_checkpoint_is_exact(reference_run, tmp_path):
    full = losses(reference_run)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    mid = reference_run / "checkpoints" / "step_0000002.pt"
    out = tmp_path / "resumed"
    assert run_main([*COMMON, "--resume", str(mid), "--out", str(out)]) == 0
    resumed = losses(out)
    assert resumed == full  # steps 1-2 from the checkpoint's history, 3-6 recomputed: bitwise equal
    assert ckpt_io.load(out / "checkpoints" / "step_0000006.pt")["step"] == 6


def test_sigint_saves_and_resume_auto_continues_exactly(reference_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_step = trainer.optimizer_step

    def step_then_signal(run, loss):
        real_step(run, loss)
        if run.scheduler.last_epoch == 3:  # during step 3: the loop stops after step 4
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "optimizer_step", step_then_signal)
    handler = signal.getsignal(signal.SIGINT)
    assert run_main([*COMMON, "--out", str(out)]) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert ckpt_io.find_latest(out).name == "step_0000004.pt"
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handlers are removed
    assert run_main([*COMMON, "--out", str(out), "--resume", "auto"]) == 0
    assert losses(out) == losses(reference_run)


def test_resume_refuses_model_changes(reference_run, tmp_path, capsys):
    code = run_main([*COMMON, "--resume", str(reference_run), "--out", str(tmp_path / "x"), "--width", "64"])
    assert code == 2
    assert "--width 64 differs from the checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# robustness


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    real_loss = trainer.compute_loss
    calls = []

    def poisoned(run, images, tokens, labels=None):
        calls.append(1)
        loss = real_loss(run, images, tokens, labels)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(trainer, "compute_loss", poisoned)
    code = run_main([*COMMON, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "the loss is nan at step 5" in err and "step_0000004.pt" in err
    assert [p.name for _, p in ckpt_io.list_checkpoints(out)] == ["step_0000002.pt", "step_0000004.pt"]
    good = ckpt_io.load(out / "checkpoints" / "step_0000004.pt")
    assert good["step"] == 4
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert max(losses(out)) == 4  # nothing logged for the bad step


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--window-size", "3"], "--window-size 3 does not divide the 8 x 8 patch grid"),
    (["--window-size", "16"], "larger than the 8 x 8 patch grid"),
    (["--patch-size", "5"], "--patch-size 5 does not divide --image-size 32"),
    (["--global-blocks", "5"], "--global-blocks 5 exceeds --depth 4"),
    (["--tome-r", "40"], "--tome-r 40 exceeds half of the 64 image tokens"),
    (["--heads", "5"], "--width 48 is not divisible by --heads 5"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "200"], "--warmup 200 is longer than --steps 120"),
    (["--train-data", "/nonexistent/data.csv"], "/nonexistent/data.csv: no such file or folder"),
    (["--batch-size", "128", "--synthetic-train", "64"], "--synthetic-train 64 is smaller than --batch-size 128"),
])
def test_bad_config_is_reported_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert run_main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfast-train: error: ") and message in err, err
    assert not out.exists()


def test_batch_must_divide_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert run_main(["--batch-size", "18", "--out", str(tmp_path / "bad")]) == 2
    assert "--batch-size 18 is not divisible by the world size 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# data


def write_images(folder: Path, n: int) -> list[tuple[str, str]]:
    """``n`` procedural PNGs in ``folder``; returns (file name, caption)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(n, 48, seed=3)
    pixels = (ds.render(range(n)) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    out = []
    for i in range(n):
        name = f"img_{i:03d}.png"
        Image.fromarray(pixels[i]).save(folder / name)
        out.append((name, ds.captions[i]))
    return out


FILES = ["--steps", "2", "--batch-size", "8", "--eval-every", "2", "--val-fraction", "0.25"]


def test_csv_dataset(tmp_path):
    pairs = write_images(tmp_path / "images", 20)
    table = tmp_path / "train.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["title", "filepath"])
        for name, caption in pairs:
            w.writerow([caption + ", naïvely", f"images/{name}"])  # relative to the CSV's folder
    out = tmp_path / "run"
    assert run_main([*FILES, "--train-data", str(table), "--csv-separator", ",", "--out", str(out)]) == 0
    assert records(out, "eval")[-1]["n"] == 5  # 25 % of 20 held out
    tok = Tokenizer.load(out / "tokenizer.json")
    assert "naïvely" in tok.words
    assert tok.decode(tok.encode("a zyxw circle")) == "a zyxw circle"  # unknown word: byte fallback
    # the separator is detected when not given (tab here)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("filepath\ttitle\n" + "".join(f"images/{n}\t{c}\n" for n, c in pairs))
    assert run_main([*FILES, "--train-data", str(tsv), "--out", str(tmp_path / "run2")]) == 0


def test_csv_errors_name_the_file(tmp_path, capsys):
    pairs = write_images(tmp_path / "images", 12)
    bad_column = tmp_path / "cols.csv"
    bad_column.write_text("path,title\n" + "".join(f"images/{n},{c}\n" for n, c in pairs))
    assert run_main([*FILES, "--train-data", str(bad_column), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{bad_column}: missing column(s) ['filepath']" in err

    empty = tmp_path / "empty.csv"
    empty.write_text("filepath,title\n")
    assert run_main([*FILES, "--train-data", str(empty), "--out", str(tmp_path / "b")]) == 2
    assert f"{empty}: the CSV file has a header but no rows" in capsys.readouterr().err

    (tmp_path / "images" / pairs[0][0]).write_bytes(b"not a png")
    broken = tmp_path / "broken.csv"
    broken.write_text("filepath,title\n" + "".join(f"images/{n},{c}\n" for n, c in pairs))
    assert run_main([*FILES, "--batch-size", "12", "--val-data", str(broken), "--train-data", str(broken),
                     "--out", str(tmp_path / "c")]) == 2
    assert f"cannot read image {tmp_path / 'images' / pairs[0][0]}" in capsys.readouterr().err


def test_folder_dataset(tmp_path, capsys):
    folder = tmp_path / "data"
    for name, caption in write_images(folder, 16):
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    out = tmp_path / "run"
    assert run_main([*FILES, "--train-data", str(folder), "--out", str(out)]) == 0
    assert records(out, "eval")[-1]["n"] == 4
    (folder / "img_000.txt").unlink()
    assert run_main([*FILES, "--train-data", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert f"image {folder / 'img_000.png'} has no caption file img_000.txt" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# baseline side by side, SigLIP


def test_compare_siglip_against_baseline(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_main(["--compare", "3", "--loss", "siglip", "--batch-size", "16", "--synthetic-train", "64",
                     "--synthetic-val", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mmfast/baseline" in printed and "samples/s" in printed
    result = json.loads((out / "compare.json").read_text())
    assert len(result["mmfast"]["losses"]) == len(result["baseline"]["losses"]) == 3
    # same weights, same data: fused ops + mmfast.SigLipLoss vs references + open_clip's SigLipLoss
    assert result["max_abs_loss_diff"] < 1e-3
    assert result["mmfast"]["losses"][0] == pytest.approx(result["baseline"]["losses"][0], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.distributed
def test_torchrun_two_processes_match_one(tmp_path):
    args = [*TINY, "--steps", "4", "--batch-size", "16", "--synthetic-train", "64", "--synthetic-val", "8",
            "--eval-every", "4", "--group-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mmfast.train", *args, "--out", str(two)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one = tmp_path / "one"
    assert main([*args, "--out", str(one)]) == 0
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # Step 1 is the same function of the same weights and data; only float32 summation orders differ
    # (per-rank GEMMs of 8 rows instead of 16, the loss averaged over ranks, gradients averaged by DDP),
    # i.e. a few ulps (measured: <= 2e-7 relative over 8 steps). AdamW steps carry such differences
    # into the weights at the ~lr * 1e-6 level, so 1e-5 relative has a wide margin and still catches
    # any real bug (a wrong shard, a missing gather gradient or a gradient scaled by the world size
    # changes the loss by 1e-3 or more from step 2 on).
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)


def test_export_csv_roundtrip(tmp_path):
    from mmfast.train.data import load_csv
    from mmfast.train.export_csv import export

    path = export(tmp_path / "shapes", n=5, image_size=32, seed=3)
    ds = load_csv(path, 32)
    assert len(ds) == 5 and len(list((tmp_path / "shapes" / "images").glob("*.png"))) == 5
    images, captions = ds.batch([0, 4])
    assert images.shape == (2, 3, 32, 32) and all(captions)
