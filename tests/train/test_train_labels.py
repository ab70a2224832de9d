"""The trainer's ``--labels``: what each kind gives a batch, a labelled run (CLIP and SigLIP) that
trains and differs from the unlabelled one, and the option combinations that are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfast.train import main
from mmfast.train.data import SHAPES, DataError, ImageTextFiles, ShapesDataset, batch_labels

TINY = ["--image-size", "32", "--patch-size", "4", "--width", "32", "--depth", "2", "--heads", "2",
        "--window-size", "4", "--global-blocks", "1", "--tome-r", "4", "--text-width", "32", "--text-depth", "1",
        "--text-heads", "2", "--embed-dim", "32", "--threads", "1", "--progress", "none", "--no-memory",
        "--no-plot", "--log-every", "1", "--steps", "4", "--batch-size", "32", "--synthetic-train", "96",
        "--synthetic-val", "16", "--eval-every", "4"]


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


def test_caption_labels_group_identical_captions():
    ds = ShapesDataset(400, 32, seed=1, two_group_prob=0.0)  # one group a scene: 180 distinct captions
    idx = torch.arange(400)
    labels = batch_labels(ds, idx, "caption")
    assert labels.dtype == torch.int64 and labels.shape == (400,)
    caps = ds.captions
    for i in range(0, 400, 7):
        for j in range(0, 400, 11):
            assert (labels[i] == labels[j]) == (caps[i] == caps[j])
    assert len(set(caps)) < 400  # duplicates exist, so the labels group some samples
    assert torch.equal(batch_labels(ds, idx[5:9], "caption"), labels[5:9])  # the same for any subset
    assert batch_labels(ds, idx, "none") is None


def test_class_labels_are_the_first_groups_shape_and_colour():
    ds = ShapesDataset(50, 32, seed=2, two_group_prob=0.0)
    labels = batch_labels(ds, torch.arange(50), "class")
    # one group a scene: "<count> <size> <colour> <shape>(s)": the class is the caption minus count and size
    for i in range(50):
        for j in range(50):
            ci, cj = ds.captions[i].split()[2:], ds.captions[j].split()[2:]
            shape_i, shape_j = (next(s for s in SHAPES if w.startswith(s)) for w in (ci[1], cj[1]))
            same = ci[0] == cj[0] and shape_i == shape_j
            assert (labels[i] == labels[j]) == same, (ds.captions[i], ds.captions[j])
    files = ImageTextFiles([Path("a.png")], ["a caption"], 32, "x.csv")
    with pytest.raises(DataError, match="--labels class needs the procedural dataset"):
        batch_labels(files, [0], "class")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_labelled_run_passes_the_labels_to_the_loss(tmp_path, loss, monkeypatch):
    import mmfast

    cls = mmfast.ClipLoss if loss == "clip" else mmfast.SigLipLoss
    real, seen = cls.forward, []

    def spy(self, *args, labels=None, **kwargs):
        seen.append(labels)
        return real(self, *args, labels=labels, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    common = [*TINY, "--loss", loss, "--synthetic-two-group-prob", "0", "--warmup", "1", "--lr", "5e-3"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert seen and all(lab is None for lab in seen)
    seen.clear()
    assert main([*common, "--labels", "caption", "--out", str(tmp_path / "lab")]) == 0
    assert len(seen) == 4 and all(lab.dtype == torch.int64 and lab.shape == (32,) for lab in seen)
    assert any(len(set(lab.tolist())) < 32 for lab in seen)  # identical captions share a label
    lab = _losses(tmp_path / "lab")
    assert len(lab) == 4 and all(v == v for v in lab)
    # (the two runs' losses agree to ~1e-6 here: the untrained towers' features are nearly equal, so
    # every logit is about the same and both losses are about log B; the experiment in docs/labels.md
    # is where they part)
    cfg = json.loads((tmp_path / "lab" / "config.json").read_text())
    assert cfg["labels"] == "caption" and cfg["synthetic_two_group_prob"] == 0.0


@pytest.mark.parametrize("args,message", [
    (["--labels", "caption", "--baseline"], "the baseline (open_clip's loss) takes no labels"),
    (["--labels", "class", "--train-data", "."], "--labels class needs the procedural dataset"),
    (["--synthetic-two-group-prob", "1.5"], "--synthetic-two-group-prob must be in [0, 1]"),
])
def test_refused_combinations(tmp_path, capsys, args, message):
    assert main([*TINY, *args, "--out", str(tmp_path / "bad")]) == 2
    assert message in capsys.readouterr().err


def test_labels_experiment_tool_writes_its_outputs(tmp_path):
    from mmfast.train import labels_experiment

    model = ["--image-size", "32", "--patch-size", "4", "--width", "32", "--depth", "2", "--heads", "2",
             "--window-size", "4", "--global-blocks", "1", "--tome-r", "4", "--text-width", "32", "--text-depth",
             "1", "--text-heads", "2", "--embed-dim", "32", "--threads", "1", "--synthetic-train", "256"]
    assert labels_experiment.main(["--out", str(tmp_path), "--seeds", "0", "--steps", "2", "--batch-size", "16",
                                   "--loss", "clip", *model]) == 0
    data = json.loads((tmp_path / "labels_experiment_clip_caption.json").read_text())
    assert set(data["runs"]) == {"no labels", "labels=caption"}
    assert all(len(evals) >= 2 for arm in data["runs"].values() for evals in arm.values())
    assert (tmp_path / "labels_experiment_clip_caption.png").stat().st_size > 0
    assert "| labels=caption | 0 |" in (tmp_path / "labels_experiment_clip_caption.md").read_text()
