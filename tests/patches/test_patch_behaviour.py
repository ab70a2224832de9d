"""Patched models behave like the models they patch, for what users do with a model besides calling
it: ``torch.save`` / ``torch.load`` of the whole model (in a fresh process, where the patched class
does not exist yet), ``copy.deepcopy``, ``torch.jit.script``, ``torch.fx.symbolic_trace`` and
``torch.jit.trace`` (Swin: timm's own path is what gets scripted or traced), ``torch.compile`` in
training, ``no_grad`` and ``inference_mode``, and reaching the patches from a bare ``import mmfast``.

Every comparison is against the unpatched timm / open_clip model in fp32; patched and unpatched
differ only by the order of the fused kernels' sums (observed: < 1e-6), hence the 1e-4 tolerances
(1e-3 for backward, which sums over the batch and every token)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import timm
import torch

import mmfast
from mmfast import tome

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FWD_TOL, BWD_TOL = 1e-4, 1e-3


@pytest.fixture(autouse=True)
def _few_threads(at_most_two_threads):
    yield


def _swin(version: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if version == 1:
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
                                 depths=(1, 2), embed_dim=32, num_heads=(2, 4), num_classes=5).eval()
    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, window_size=8,
                             depths=(1, 2), embed_dim=32, num_heads=(2, 4), num_classes=5).eval()


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=5).eval()


def _open_clip_vit() -> torch.nn.Module:
    # imported here, not at module level: the GPU machine has no open_clip, and `pytest -m gpu`
    # collects this file there (a missing open_clip fails this test rather than skipping it)
    import open_clip

    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(image_size=64, patch_size=8, width=48, layers=3, heads=3,
                                                   mlp_ratio=4.0, output_dim=16).eval()


def _input(model) -> torch.Tensor:
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else model.image_size
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def _patched(kind: str):
    """(unpatched model or None, patched copy, the module that carries a patched class or None)."""
    if kind in ("swin_v1", "swin_v2"):
        ref = _swin(int(kind[-1]))
        ours = mmfast.patch.timm.apply_window_attention(copy.deepcopy(ref))
        return ref, ours, ours.layers[0].blocks[0]
    ref = _open_clip_vit() if kind == "tome_open_clip" else _vit()
    if kind == "windowed_vit":
        ours = mmfast.patch.timm.apply_windowed_vit(copy.deepcopy(ref), window_size=4, global_blocks=[-1], shift=True)
        return ref, ours, ours
    # token merging changes the function: its numbers are tested in test_tome_patch.py
    return None, tome.apply_patch(copy.deepcopy(ref), r=4), None


def _close(a, b, tol=FWD_TOL):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


KINDS = ["swin_v1", "swin_v2", "windowed_vit", "tome_timm", "tome_open_clip"]


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing of this process imported or patched); its stdout."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_patches_are_reachable_from_a_bare_import():
    code = ("import mmfast, timm\n"
            "m = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, depths=(1,), num_heads=(2,),"
            " embed_dim=32, img_size=56)\n"
            "mmfast.patch.timm.apply_window_attention(m)\n"
            "print(mmfast.patch.timm.count_patched(m), mmfast.patch.tome_timm.__name__, mmfast.distributed.__name__)\n")
    assert _python(code).split() == ["1", "mmfast.patch.tome_timm", "mmfast.distributed"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        mmfast.patch.nope  # noqa: B018


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_and_deepcopy_round_trip(kind, tmp_path):
    _, ours, carrier = _patched(kind)
    x = _input(ours)
    with torch.no_grad():
        want = ours(x)
        twin = copy.deepcopy(ours)
        assert type(twin) is type(ours) and twin is not ours
        _close(twin(x), want, 0.0)
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        _close(back(x), want, 0.0)
    assert type(carrier or ours).__name__.startswith(("MMFast", "ToMe"))
    # a fresh process, where no patch ran yet, loads the pickle into the patched classes
    path = tmp_path / "model.pt"
    torch.save({"model": ours, "x": x, "want": want}, path)
    code = ("import torch, sys\n"
            f"d = torch.load({str(path)!r}, weights_only=False)\n"
            "m = d['model']\n"
            "with torch.no_grad():\n"
            "    err = (m(d['x']) - d['want']).abs().max().item()\n"
            "print(type(m).__name__, err)\n")
    name, err = _python(code).split()
    assert name == type(ours).__name__ and float(err) == 0.0


@pytest.mark.parametrize("kind", ["swin_v1", "swin_v2"])
def test_patched_swin_scripts_and_traces_through_timm_path(kind):
    ref, ours, carrier = _patched(kind)
    x = _input(ours)
    with torch.no_grad():
        want = ref(x)
        scripted = torch.jit.script(ours)
        _close(scripted(x), want)
        # scripting leaves the eager model patched
        assert type(carrier).__name__.startswith("MMFast") and type(ours.layers[0].blocks[0]) is type(carrier)
        graph = torch.fx.symbolic_trace(ours)
        _close(graph(x), want)
        traced = torch.jit.trace(ours, x)
        _close(traced(x), want)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        _close(torch.jit.load(buf)(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_patched_models_compile_in_every_mode(kind):
    torch._dynamo.reset()
    ref, ours, _ = _patched(kind)
    x = _input(ours)
    compiled = torch.compile(ours)
    with torch.no_grad():
        want = ours(x)
        _close(compiled(x), want)
    with torch.inference_mode():
        _close(compiled(x), want)
    ours.train()
    params = [p for p in ours.parameters() if p.requires_grad]
    params = [params[0], params[-1]]  # the patch embedding and the classifier: the whole graph in between
    out = ours(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), params)
    _close(out_c, out)
    for a, b in zip(grads_c, grads):
        _close(a, b, BWD_TOL)
    ours.eval()
    if kind.startswith("swin"):  # the fused Swin computes what timm does (windows and merging do not)
        with torch.no_grad():
            _close(want, ref(x))
