"""pytest plugin: run timm's own tests (tests/test_models.py of timm's source distribution) on models
patched by mmfast. Loaded with ``-p mmfast_timm_plugin`` (this folder on PYTHONPATH).

``MMFAST_TIMM_PATCH`` chooses the patch applied to every model the timm test module creates with
``create_model``: ``window`` (``mmfast.patch.timm.apply_window_attention``), ``tome``
(``mmfast.tome.apply_patch`` with ``MMFAST_TIMM_TOME_R``, default 4) or ``none`` (the unpatched
control run). A model the patch does not apply to is a test error, so the selection must name
patchable models only. ``MMFAST_TIMM_COUNT`` names a file each patched model appends a line to (the
caller checks that patches really ran)."""

from __future__ import annotations

import functools
import os

import pytest

PATCH = os.environ.get("MMFAST_TIMM_PATCH", "none")


def _patched_factory(create_model):
    @functools.wraps(create_model)
    def create(*args, **kwargs):
        model = create_model(*args, **kwargs)
        if PATCH == "window":
            import mmfast.patch.timm as pt

            pt.apply_window_attention(model)
        elif PATCH == "tome":
            from mmfast import tome

            tome.apply_patch(model, r=int(os.environ.get("MMFAST_TIMM_TOME_R", "4")))
        elif PATCH != "none":
            raise ValueError(f"MMFAST_TIMM_PATCH must be window, tome or none, got {PATCH!r}")
        count = os.environ.get("MMFAST_TIMM_COUNT")
        if count and PATCH != "none":
            with open(count, "a") as f:
                f.write(f"{type(model).__name__}\n")
        return model

    return create


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    mod = getattr(item, "module", None)
    if mod is not None and hasattr(mod, "create_model") and not getattr(mod.create_model, "_mmfast", False):
        mod.create_model = _patched_factory(mod.create_model)
        mod.create_model._mmfast = True
