"""mmfast.integrations.open_clip_train: open_clip's own trainer with mmfast's loss, ToMe and window attention.

The end-to-end tests train a tiny randomly initialised CLIP (no download) on 32 generated images
through ``open_clip_train`` itself, once plainly and once through the launcher, and compare the
per-step losses open_clip logs. They run in fp32 (``--precision fp32``): open_clip's default
``amp`` makes the features fp16 on CPU and mmfast returns the loss in the features' dtype, so the
logged values would only agree to fp16 rounding (about 1e-3).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("open_clip_train.main", reason="needs open-clip-torch with open_clip_train")
pytest.importorskip("pandas", reason="open_clip_train's CSV dataset needs pandas")

import open_clip  # noqa: E402

import mmfast  # noqa: E402
from mmfast.integrations import open_clip_train as M  # noqa: E402

TIMEOUT = 120
# 5 significant digits are logged; fp32 losses of the same math agree to ~1e-6 relative (different
# summation order), so they may differ by one unit in the last logged digit at a rounding boundary.
REL_TOL, ABS_TOL = 2e-4, 1e-4
LOSS_RE = re.compile(r"Train Epoch: \d+ .* Loss: ([-+0-9.eE]+|nan|inf) \(")

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@dataclass
class Assets:
    csv: Path
    model_dir: Path  # local-dir:<model_dir>/open_clip_config.json
    config_dir: Path  # mmfast-tiny.json for --mmfast-model-config


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    from PIL import Image

    root = tmp_path_factory.mktemp("oc_assets")
    (root / "img").mkdir()
    gen = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "white"]
    rows = ["filepath,title"]
    for i in range(32):
        c = i % 4
        img = torch.randint(0, 80, (32, 32, 3), generator=gen, dtype=torch.uint8)
        if c < 3:
            img[..., c] += 150
        else:
            img += 150
        path = root / "img" / f"{i}.png"
        Image.fromarray(img.numpy()).save(path)
        rows.append(f"{path},a {colours[c]} square number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "model").mkdir()
    (root / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    (root / "configs").mkdir()
    (root / "configs" / "mmfast-tiny.json").write_text(json.dumps(TINY))
    return Assets(root / "train.csv", root / "model", root / "configs")


def _train_args(a: Assets, *extra: str, epochs: int = 1, batch_size: int = 8) -> list[str]:
    # no --logs: torchrun rejects it as an abbreviation of its own --logs-specs; runs use cwd/logs/
    return ["--train-data", str(a.csv), "--dataset-type", "csv", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--csv-separator", ",", "--model", f"local-dir:{a.model_dir}",
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--workers", "0", "--device", "cpu",
            "--seed", "0", "--lr", "1e-3", "--warmup", "0", "--log-every-n-steps", "1", "--precision", "fp32",
            "--report-to", "", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_all(cmds: dict[str, list[str]], cwd: Path, timeout: float = TIMEOUT) -> dict[str, SimpleNamespace]:
    """Run the commands concurrently; name -> (returncode, output, seconds)."""
    procs, t0 = {}, time.perf_counter()
    for name, cmd in cmds.items():
        out = open(cwd / f"{name}.stdout", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True), out)
    res = {}
    try:
        for name, (p, out) in procs.items():
            p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            out.close()
            res[name] = SimpleNamespace(rc=p.returncode, out=(cwd / f"{name}.stdout").read_text(),
                                        seconds=time.perf_counter() - t0)
    finally:
        for p, out in procs.values():
            if p.poll() is None:  # timed out: kill its process group (torchrun and its ranks)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            out.close()
    return res


def _check_ok(res: dict[str, SimpleNamespace]) -> None:
    for name, r in res.items():
        assert r.rc == 0, f"{name} failed (rc {r.rc}):\n{r.out[-4000:]}"


def _log(cwd: Path, name: str) -> str:
    return (cwd / "logs" / name / "out.log").read_text()


def _losses(cwd: Path, name: str) -> list[float]:
    return [float(v) for v in LOSS_RE.findall(_log(cwd, name))]


def _assert_same_losses(ref: list[float], got: list[float], steps: int) -> None:
    assert len(ref) == len(got) == steps, (ref, got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL), (i, ref, got)


LAUNCHER = [sys.executable, "-m", "mmfast.integrations.open_clip_train"]
OPEN_CLIP = [sys.executable, "-m", "open_clip_train.main"]


@pytest.fixture(scope="module")
def single_runs(assets, tmp_path_factory):
    """open_clip's trainer, the launcher (same seed), and the launcher with ToMe + SigLIP, concurrently."""
    cwd = tmp_path_factory.mktemp("oc_runs")
    args = _train_args(assets, epochs=2)
    tome = _train_args(assets, "--siglip", "--mmfast-model-config", str(assets.config_dir), "--mmfast-tome-r", "2")
    tome[tome.index("--model") + 1] = "mmfast-tiny"
    res = _run_all({"plain": OPEN_CLIP + args + ["--name", "plain"],
                    "mmfast": LAUNCHER + args + ["--name", "mmfast"],
                    "tome": LAUNCHER + tome + ["--name", "tome"]}, cwd)
    return cwd, res


def test_launcher_matches_open_clip_loss(single_runs):
    cwd, res = single_runs
    _check_ok({k: res[k] for k in ("plain", "mmfast")})
    _assert_same_losses(_losses(cwd, "plain"), _losses(cwd, "mmfast"), steps=8)
    log = _log(cwd, "mmfast")
    assert ("mmfast: using mmfast.ClipLoss (local_loss=False, gather_with_grad=False, group_size=1, impl=auto, "
            "world_size=1)") in log
    assert "mmfast" not in _log(cwd, "plain")
    # the patches add nothing to the model: the checkpoint is a plain open_clip one
    ours = torch.load(cwd / "logs" / "mmfast" / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    ref = torch.load(cwd / "logs" / "plain" / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    assert ours["state_dict"].keys() == ref["state_dict"].keys()


def test_tome_siglip_through_launcher(single_runs):
    cwd, res = single_runs
    _check_ok({"tome": res["tome"]})
    log = _log(cwd, "tome")
    losses = _losses(cwd, "tome")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert "mmfast: using mmfast.SigLipLoss (dist_impl=bidir, group_size=1, impl=auto, world_size=1)" in log
    m = re.search(r"mmfast: ToMe r=2 \(tokens 17 -> 13\) on the vision tower; visual forward throughput "
                  r"\(batch 8, fp32, cpu\): ([0-9.]+) -> ([0-9.]+) images/s \(x([0-9.]+)\)", log)
    assert m is not None, log[-3000:]
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    # the model in the checkpoint is open_clip's own (ToMe adds no parameter)
    ckpt = torch.load(cwd / "logs" / "tome" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    open_clip.model.CLIP(**TINY, init_logit_bias=-10.0).load_state_dict(ckpt["state_dict"], strict=True)


@pytest.mark.distributed
def test_torchrun_matches_open_clip_loss(assets, tmp_path):
    """2 gloo ranks, --local-loss --gather-with-grad, group size 1 (two gather groups of one rank).

    open_clip_train itself cannot run DDP on CPU (it passes device_ids=[cpu], which torch rejects),
    so the reference run goes through a 6-line shim that drops device_ids and changes nothing else.
    """
    shim = tmp_path / "open_clip_ref.py"
    shim.write_text(
        "import sys\nimport torch\n\n_DDP = torch.nn.parallel.DistributedDataParallel\n\n\n"
        "class DDP(_DDP):\n    def __init__(self, module, device_ids=None, *args, **kwargs):\n"
        "        super().__init__(module, None, *args, **kwargs)\n\n\n"
        "torch.nn.parallel.DistributedDataParallel = DDP\n"
        "from open_clip_train.main import main  # noqa: E402\n\nmain(sys.argv[1:])\n")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = _train_args(assets, "--local-loss", "--gather-with-grad", "--dist-backend", "gloo", epochs=2,
                       batch_size=4)
    res = _run_all({"dplain": run + [str(shim)] + args + ["--name", "dplain"],
                    "dmmfast": run + ["-m", "mmfast.integrations.open_clip_train"] + args
                    + ["--mmfast-group-size", "1", "--name", "dmmfast"]}, tmp_path)
    _check_ok(res)
    _assert_same_losses(_losses(tmp_path, "dplain"), _losses(tmp_path, "dmmfast"), steps=8)
    log = _log(tmp_path, "dmmfast")
    assert ("mmfast: using mmfast.ClipLoss (local_loss=True, gather_with_grad=True, group_size=1, impl=auto, "
            "world_size=2)") in log
    assert "mmfast: DistributedDataParallel on CPU with device_ids=None" in log


# ------------------------------------------------------------------------------------------------
# bad flags: reported before anything is built


def _bad(assets: Assets, logs: Path, *extra: str) -> list[str]:
    return _train_args(assets, *extra) + ["--logs", str(logs), "--name", "bad"]


BAD = [
    (("--mmfast-group-size", "2"), "group_size=2 must divide the world size 1"),
    (("--mmfast-group-size", "0"), "--mmfast-group-size must be a positive integer"),
    (("--mmfast-group-size", "two"), "--mmfast-group-size expects an integer"),
    (("--mmfast-group-size",), "--mmfast-group-size expects a value"),
    (("--mmfast-tome-r", "--seed", "1"), "--mmfast-tome-r expects a value"),
    (("--mmfast-tome-r", "-2"), "--mmfast-tome-r must be >= 0"),
    (("--mmfast-tome-r=",), "--mmfast-tome-r expects a value"),
    (("--mmfast-window-attention",), "--mmfast-window-attention does not apply to model"),
    (("--mmfast-window-attention=1",), "--mmfast-window-attention takes no value"),
    (("--mmfast-impl", "fast"), "--mmfast-impl must be one of auto, cpp, triton, reference"),
    (("--mmfast-gruop-size", "2"), "unknown flag --mmfast-gruop-size"),
    (("--mmfast-loss", "open_clip", "--mmfast-group-size", "1"), "cannot be used with --mmfast-loss open_clip"),
    (("--siglip", "--loss-dist-impl", "ring"), "--loss-dist-impl must be one of bidir, shift, reduce, gather"),
    (("--horovod",), "--horovod is not supported by mmfast's losses"),
    (("--distill-model", "ViT-B-32", "--distill-pretrained", "openai"), "DistillClipLoss"),
    (("--mmfast-tome-r", "2", "--torchscript"), "cannot patch a TorchScript model"),
    (("--mmfast-model-config", "/nonexistent/x.json"), "no such file or folder"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_flags_fail_before_training(assets, extra, message, tmp_path, capsys, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    import open_clip_train.main as oc_main

    monkeypatch.setattr(oc_main, "main", lambda *a: pytest.fail("open_clip_train's main was started"))
    create = M._require_open_clip().create_model_and_transforms
    assert M.main(_bad(assets, tmp_path / "logs", *extra)) == 2
    err = capsys.readouterr().err
    assert "mmfast-open-clip-train: error:" in err and message in err, err
    assert not (tmp_path / "logs").exists()  # open_clip's main never started
    assert M._require_open_clip().create_model_and_transforms is create
    assert not M.unpatch_loss_factory()  # nothing left patched


def test_group_size_must_divide_torchrun_world(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert M.main(_bad(assets, tmp_path / "logs", "--local-loss", "--mmfast-group-size", "3")) == 2
    assert "group_size=3 must divide the world size 4" in capsys.readouterr().err


def test_bad_flag_subprocess_exits_quickly(assets, tmp_path):
    t0 = time.perf_counter()
    p = subprocess.run(LAUNCHER + _train_args(assets, "--mmfast-tome-r", "-1", "--name", "bad"), cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2, p.stderr
    assert "mmfast-open-clip-train: error: --mmfast-tome-r must be >= 0 (tokens merged per block), got -1" in p.stderr
    assert not (tmp_path / "logs").exists()  # open_clip never started
    assert time.perf_counter() - t0 < 60


def test_split_argv_passes_everything_else_through():
    opts, rest = M.split_argv(["--batch-size", "8", "--mmfast-group-size=4", "--lr", "1e-3", "--mmfast-tome-r",
                               "3", "--mmfast-window-attention", "--mmfast-impl", "reference", "--siglip"])
    assert rest == ["--batch-size", "8", "--lr", "1e-3", "--siglip"]
    assert (opts.group_size, opts.tome_r, opts.window_attention, opts.impl) == (4, 3, True, "reference")


def test_help_lists_mmfast_and_open_clip_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        M.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--mmfast-group-size" in out and "--train-data" in out


# ------------------------------------------------------------------------------------------------
# Python API


def _oc_args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, loss_dist_impl=None, local_loss=False,
                gather_with_grad=False, rank=0, world_size=1, horovod=False)
    return SimpleNamespace(**{**base, **kw})


def test_patch_loss_factory_builds_mmfast_losses():
    import open_clip.factory
    import open_clip_train.main as oc_main
    from open_clip import loss as oc_loss

    original = open_clip.factory.create_loss
    with M.patch_loss_factory(impl="reference") as patch:
        assert open_clip.create_loss is oc_main.create_loss is open_clip.factory.create_loss
        assert open_clip.create_loss is not original
        clip = open_clip.create_loss(_oc_args(local_loss=True, gather_with_grad=True))
        assert type(clip) is mmfast.ClipLoss and clip.local_loss and clip.gather_with_grad and clip.cache_labels
        assert clip.impl == "reference"
        sig = oc_main.create_loss(_oc_args(siglip=True, loss_dist_impl="shift"))
        assert type(sig) is mmfast.SigLipLoss and sig.dist_impl == "shift"
        assert patch.losses == [clip, sig]
        gen = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
        scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
        torch.testing.assert_close(clip(img, txt, scale), oc_loss.ClipLoss()(img, txt, scale))
        torch.testing.assert_close(sig(img, txt, scale, bias), oc_loss.SigLipLoss()(img, txt, scale, bias))
        with pytest.raises(M.MMFastFlagError, match="CoCaLoss"):
            open_clip.create_loss(_oc_args(model="coca_ViT-B-32"))
    assert open_clip.create_loss is original and oc_main.create_loss is original
    assert not patch.active and not M.unpatch_loss_factory()


def test_patch_loss_factory_repatch_and_unpatch():
    import open_clip.factory

    original = open_clip.factory.create_loss
    first = M.patch_loss_factory(group_size=1)
    second = M.patch_loss_factory(group_size=2)  # replaces the first
    assert not first.active and second.active
    with pytest.raises(M.MMFastFlagError, match="must divide the world size 1"):
        open_clip.create_loss(_oc_args())
    assert M.unpatch_loss_factory() and open_clip.factory.create_loss is original
    with pytest.raises(ValueError, match="group_size"):
        M.patch_loss_factory(group_size=0)
    assert open_clip.factory.create_loss is original


def test_window_attention_hook_patches_swin_trunk(caplog):
    """The model hook on an open_clip TimmModel whose trunk is a (tiny) timm Swin."""
    timm = pytest.importorskip("timm")
    from open_clip.timm_model import TimmModel

    from mmfast.patch.timm import revert_window_attention

    visual = TimmModel.__new__(TimmModel)
    torch.nn.Module.__init__(visual)
    visual.trunk = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=0)
    visual.head = torch.nn.Identity()
    visual.image_size = (32, 32)
    model = SimpleNamespace(visual=visual)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = visual.eval()(x)
    caplog.set_level("INFO", logger=M.log.name)
    M._apply_model_patches(model, M.MMFastOptions(window_attention=True), 2, "cpu", "fp32")
    assert type(visual.trunk.layers[0].blocks[0]).__name__ == "MMFastSwinTransformerBlock"
    assert "mmfast: fused window attention on 2 Swin blocks on the vision tower" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(visual(x), ref, rtol=1e-4, atol=1e-5)
    revert_window_attention(visual.trunk)
    vit = TimmModel.__new__(TimmModel)
    torch.nn.Module.__init__(vit)
    vit.trunk = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1,
                                                                  num_heads=2, num_classes=0)
    with pytest.raises(M.MMFastFlagError, match="trunk is timm VisionTransformer"):
        M._apply_model_patches(SimpleNamespace(visual=vit), M.MMFastOptions(window_attention=True), 2, "cpu", "fp32")


def test_tome_hook_patches_timm_vit_trunk(caplog):
    """--mmfast-tome-r on an open_clip TimmModel whose trunk is a (tiny) timm ViT patches the trunk."""
    timm = pytest.importorskip("timm")
    from open_clip.timm_model import TimmModel

    visual = TimmModel.__new__(TimmModel)
    torch.nn.Module.__init__(visual)
    visual.trunk = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="avg")
    visual.head = torch.nn.Identity()
    caplog.set_level("INFO", logger=M.log.name)
    M._apply_model_patches(SimpleNamespace(visual=visual), M.MMFastOptions(tome_r=3), 2, "cpu", "fp32")
    assert mmfast.tome.is_patched(visual.trunk) and visual.trunk.tome_r_per_layer == [3, 3]
    assert "mmfast: ToMe r=3 (tokens 17 -> 11) on the vision tower" in caplog.text
    assert visual(torch.randn(2, 3, 32, 32)).shape == (2, 32)
