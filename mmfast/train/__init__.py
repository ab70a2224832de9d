"""mmfast.train: the reference CLIP/SigLIP trainer (``python -m mmfast.train``, ``mmfast-train``).

Modules: :mod:`~mmfast.train.config` (options), :mod:`~mmfast.train.data` (procedural shapes, CSV and
folder datasets), :mod:`~mmfast.train.tokenizer` (offline word tokenizer with byte fallback),
:mod:`~mmfast.train.model` (windowed ViT with ToMe, text transformer; the only caller of the fused
ops), :mod:`~mmfast.train.trainer` (loop, DDP, checkpoints, evaluation, ``--compare``),
:mod:`~mmfast.train.evaluate`, :mod:`~mmfast.train.checkpoint`, :mod:`~mmfast.train.progress`,
:mod:`~mmfast.train.plot`. The user guide is the docstring of :mod:`mmfast.train.__main__`.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Same as ``python -m mmfast.train`` (see :func:`mmfast.train.__main__.main`)."""
    from mmfast.train.__main__ import main as _main

    return _main(argv)
