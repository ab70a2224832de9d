"""Triton kernels of mmfast, one file per op. Installed as ``mmfast.triton``.

Modules here import triton lazily-safe: importing ``mmfast.triton`` never fails when triton is
missing; the op modules check ``mmfast._ext.triton_status()`` before launching.
"""
