"""Compile every Triton kernel of ``mmfast.triton`` for an H200 (sm_90a), without a GPU.

The interpreter tests (TRITON_INTERPRET=1) run the kernels' Python semantics with tiny tiles; they
never see what only the GPU compiler sees: MLIR lowering failures, ptxas errors, and shared memory
beyond the per-block limit (checked by the driver only at launch). This test closes that gap:

1. **Capture.** Representative calls of the public launchers (contrastive, window attention, ToMe;
   fp32 / fp16 / bf16, the shapes and features of the models they serve) run on CPU tensors while
   ``launch`` is intercepted: every ``kernel[grid](...)`` is recorded (arguments, constexprs,
   ``num_warps``, ``num_stages``) and NOT executed (launch arguments depend on shapes only; the host
   code after a launch only does torch ops on the outputs, whose values do not matter here). The host
   code is switched to its GPU choices while doing so: contrastive's tile sizes / stages / program
   count for an H200 (132 SMs) and no interpreter-only ``UPCAST``; window attention's dot precision
   from the environment default (``tf32x3``); bf16 allowed in ToMe. Only the support checks keep
   accepting CPU tensors.
2. **Specialise** each launch exactly as ``JITFunction.run`` does on a GPU (Triton's own binder, with
   the CUDA backend for sm_90: ints equal to 1 become constexprs, 16-divisible ints / 16-byte aligned
   pointers get the divisibility attribute; tensors are replaced by stand-ins with the dtype and the
   16-byte alignment a CUDA allocation at the same storage offset would have), and dedupe on the JIT
   cache key.
3. **Compile** each distinct configuration with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   90, 32))`` (Triton's bundled ptxas produces the cubin) in worker processes without
   TRITON_INTERPRET (one per CPU, at most 8; ``MMFAST_SM90_COMPILE_JOBS`` overrides), and assert
   ``metadata.shared <= 232448`` (227 KB, the H200's opt-in per-block limit).

One test per kernel (``module.kernel``) lists every failing configuration with its scenario, launch
options, constexprs and the compiler error. Skipped when Triton's NVIDIA backend or its ptxas is not
available. The compile cache is ``$TRITON_CACHE_DIR`` when set, else a fresh per-session directory.

Running this file as a script is the worker mode (``--sm90-compile-worker``): JSON lines in, JSON
lines out.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the tests skip
    triton = None

pytestmark = pytest.mark.slow

H200_SHARED_LIMIT = 232448  # bytes of shared memory per block (227 KB opt-in) on sm_90
H200_SMS = 132
TARGET_ARCH = 90
MODULES = ("mmfast.triton.contrastive", "mmfast.triton.window_attention", "mmfast.triton.tome")
WORKER_FLAG = "--sm90-compile-worker"
COMPILE_TIMEOUT_S = 300  # one configuration; a hung compiler process is killed and reported
_MARK = b"@@sm90@@"


# ------------------------------------------------------------------------------------------------
# Binding, shared by the capturing process and the compiling workers


class _DeviceTensor:
    """A CUDA tensor as the JIT specialises it: a dtype and a data pointer (for its 16-byte alignment).

    CUDA allocations are at least 256-byte aligned, so a view's pointer is aligned as its storage offset
    in bytes is."""

    def __init__(self, dtype: torch.dtype, ptr: int):
        self.dtype = dtype
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


def _encode(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "ptr": value.storage_offset() * value.element_size()}
    if isinstance(value, _DeviceTensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "ptr": value.ptr}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}: {value!r}")


def _decode(value):
    if isinstance(value, dict):
        return _DeviceTensor(getattr(torch, value["tensor"]), value["ptr"])
    return value


def _cuda_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", TARGET_ARCH, 32)
    return target, make_backend(target)


def _bind(jf, backend, args, kwargs):
    """``JITFunction.run``'s binding for ``backend``: (kwargs, bound args, specialization, options)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return kwargs, bound_args, specialization, options


def _cache_key(specialization, options) -> str:
    # as triton.runtime.jit.compute_cache_key
    return repr((tuple(specialization), str(options)))


# ------------------------------------------------------------------------------------------------
# Worker (this file run as a script, without TRITON_INTERPRET)

if triton is not None:

    @triton.jit
    def _probe_kernel(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) * 2.0, mask=offs < n)


def _compile(jf, args, kwargs, target, backend, expected_key=None) -> dict:
    from triton.compiler import ASTSource

    kwargs, bound_args, specialization, options = _bind(jf, backend, args, kwargs)
    key = _cache_key(specialization, options)
    if expected_key is not None and key != expected_key:
        return {"error": f"the worker specialised the launch differently:\n  {key}\nvs\n  {expected_key}"}
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound_args, specialization, options)
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target, options=options.__dict__)
    md = kernel.metadata
    return {"shared": int(md.shared), "num_warps": md.num_warps, "num_stages": md.num_stages,
            "seconds": round(time.perf_counter() - t0, 2)}


def _error_text(exc: BaseException, limit: int = 3000) -> str:
    """The innermost source location of a compile error (nested calls raise one per frame) and its cause."""
    from triton.compiler.errors import CompilationError

    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    located = [e for e in chain if isinstance(e, CompilationError)]
    shown = [located[-1]] if located else []
    if not shown or (chain[-1] is not shown[0] and str(chain[-1]) not in str(shown[0])):
        shown.append(chain[-1])
    text = "\n".join(f"{type(e).__name__}: {e}".strip() for e in shown)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    text = "\n".join(lines[-40:])
    return text if len(text) <= limit else "..." + text[-limit:]


def _worker_main() -> None:
    out = os.fdopen(os.dup(1), "wb", buffering=0)  # results; anything printed by the compiler -> stderr
    os.dup2(2, 1)

    def send(obj):
        out.write(_MARK + json.dumps(obj).encode() + b"\n")

    try:
        from triton.runtime.jit import JITFunction

        assert isinstance(_probe_kernel, JITFunction), "TRITON_INTERPRET must be unset in the worker"
        target, backend = _cuda_backend()
        _compile(_probe_kernel, [_DeviceTensor(torch.float32, 0), 100], {"BLOCK": 128}, target, backend)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which skips
        send({"probe_error": _error_text(exc)})
        return
    send({"ready": True})
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            jf = getattr(importlib.import_module(spec["module"]), spec["name"])
            if not isinstance(jf, JITFunction):
                raise TypeError(f"{spec['module']}.{spec['name']} is a {type(jf).__name__}, not a JITFunction")
            args = [_decode(a) for a in spec["args"]]
            kwargs = {k: _decode(v) for k, v in spec["kwargs"].items()}
            res = _compile(jf, args, kwargs, target, backend, spec["key"])
        except Exception as exc:  # noqa: BLE001 - a compile failure is the result
            res = {"error": _error_text(exc)}
        send(res)


# ------------------------------------------------------------------------------------------------
# Host code in its GPU mode, launches recorded


@dataclass
class Config:
    """One distinct compilation: a kernel and its JIT specialisation."""

    kernel: str  # "contrastive._softmax_fwd_kernel"
    spec: dict  # what a worker needs: module, name, args, kwargs, key
    constexprs: str
    launch_options: str
    scenarios: list = field(default_factory=list)
    result: dict | None = None

    def describe(self) -> str:
        more = len(self.scenarios) - 3
        shown = "; ".join(self.scenarios[:3]) + (f"; +{more} more" if more > 0 else "")
        return (f"{self.kernel}, {self.launch_options}\n"
                f"    constexprs: {self.constexprs}\n"
                f"    launched by: {shown}")


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _launched_kernels() -> list[str]:
    """``module.kernel`` of every jit function its module launches (``name[grid](...)`` in the source)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = []
    for modname in MODULES:
        mod = importlib.import_module(modname)
        src = inspect.getsource(mod)
        for name, obj in vars(mod).items():
            if isinstance(obj, (InterpretedFunction, JITFunction)) and re.search(rf"\b{name}\s*\[", src):
                found.append(f"{_short(modname)}.{name}")
    return sorted(found)


@contextlib.contextmanager
def _gpu_host_mode():
    """Launchers take CPU tensors but make the choices they make for CUDA tensors on an H200."""
    C = importlib.import_module("mmfast.triton.contrastive")
    W = importlib.import_module("mmfast.triton.window_attention")
    T = importlib.import_module("mmfast.triton.tome")

    def checks_as_interpreter(mod, flag, checker):
        # the support checks accept the CPU stand-ins of CUDA tensors; every other choice is the GPU's
        orig = getattr(mod, checker)

        def wrapped(*args, **kwargs):
            with pytest.MonkeyPatch.context() as inner:
                inner.setattr(mod, flag, lambda: True)
                return orig(*args, **kwargs)

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "_interpreting", lambda: False)
        mp.setattr(C, "_sm_count", lambda index: H200_SMS)
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        mp.setattr(C, "not_supported_reasons", checks_as_interpreter(C, "_interpreting", "not_supported_reasons"))
        mp.setattr(W, "_interpreting", lambda: False)
        mp.setattr(W, "not_supported_reasons", checks_as_interpreter(W, "_interpreting", "not_supported_reasons"))
        mp.delenv("MMFAST_TRITON_DOT_PRECISION", raising=False)  # the default, tf32x3
        mp.setattr(T, "_interpreted", lambda: False)  # bf16 allowed
        mp.setattr(T, "_common_reasons", lambda **tensors: [])  # device / dtype checks only
        yield


def _record_launches(scenarios) -> list[tuple[str, object, tuple, dict]]:
    """Run ``scenarios`` ((label, fn) pairs) with every kernel launch recorded instead of executed."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    records = []
    current = [""]

    def record(self, *args, grid, warmup, **kwargs):
        records.append((current[0], self, args, kwargs))

    with pytest.MonkeyPatch.context() as mp, _gpu_host_mode():
        mp.setattr(InterpretedFunction, "run", record)
        mp.setattr(JITFunction, "run", record)
        with torch.no_grad():
            for label, fn in scenarios:
                current[0] = label
                fn()
    return records


def _configs(records) -> dict[str, Config]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _, backend = _cuda_backend()
    jit_of = {}
    configs: dict[str, Config] = {}
    for label, fn, args, kwargs in records:
        if fn not in jit_of:
            jit_of[fn] = JITFunction(fn.fn, **fn.kwargs) if isinstance(fn, InterpretedFunction) else fn
        jf = jit_of[fn]
        stand_ins = [_decode(_encode(a)) for a in args]
        kw_stand_ins = {k: _decode(_encode(v)) for k, v in kwargs.items()}
        _, bound, specialization, options = _bind(jf, backend, stand_ins, kw_stand_ins)
        module, name = jf.fn.__module__, jf.fn.__name__
        key = f"{module}.{name}:{_cache_key(specialization, options)}"
        if key not in configs:
            consts = ", ".join(f"{n}={s[1]!r}" for n, s in zip(bound, specialization) if s[0] == "constexpr")
            opts = ", ".join(f"{k}={options.get(k, 'default')}" for k in ("num_warps", "num_stages"))
            spec = {"module": module, "name": name, "args": [_encode(a) for a in args],
                    "kwargs": {k: _encode(v) for k, v in kwargs.items()}, "key": _cache_key(specialization, options)}
            configs[key] = Config(f"{_short(module)}.{name}", spec, consts, opts)
        if label not in configs[key].scenarios:
            configs[key].scenarios.append(label)
    return configs


# ------------------------------------------------------------------------------------------------
# Scenarios: what the models served by these kernels launch


def _contrastive(dtype, D, M, N, *, bias=True, param_dtype=torch.float32):
    def run():
        C = importlib.import_module("mmfast.triton.contrastive")
        a = torch.zeros(M, D, dtype=dtype)
        b = torch.zeros(N, D, dtype=dtype)
        scale = torch.full((1,), 14.0, dtype=param_dtype)
        b_ = torch.full((1,), -10.0, dtype=param_dtype) if bias else None
        C.softmax_fwd(a, b, scale, b_)
        C.softmax_bwd(a, b, scale, b_, torch.zeros(M), torch.zeros(N), torch.full((M,), 0.5 / M),
                      torch.full((N,), 0.5 / N))
        C.sigmoid_fwd(a, b, scale, b_)
        C.sigmoid_bwd(a, b, scale, b_, torch.full((M,), 1.0 / M))

    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    extra = "" if bias else " no bias"
    extra += "" if param_dtype == torch.float32 else f" {name[param_dtype]} scale/bias"
    return f"contrastive {name[dtype]} D={D} M={M} N={N}{extra}", run


def _window(dtype, window, head_dim, heads, hw, shift, *, v2, pad=True, deterministic=(False, True),
            order="roll_pad", batch=2):
    """Swin v1 (bias table, qkv bias as pad value) or v2 (cosine attention, CPB table) on a fused qkv."""

    def run():
        W = importlib.import_module("mmfast.triton.window_attention")
        h, w = hw
        q, k, v = torch.zeros(batch, h, w, 3, heads, head_dim, dtype=dtype).unbind(3)
        rows = (2 * window[0] - 1) * (2 * window[1] - 1)
        bias = torch.zeros(rows, heads)
        logit_scale = torch.full((heads,), 10.0) if v2 else None
        pad_value = torch.zeros(3, heads, head_dim) if pad else None
        kw = dict(window_size=window, shift_size=shift, order=order)
        out, lse = W.window_attention_fwd(q, k, v, bias, logit_scale, pad_value, **kw)
        dout = torch.zeros(batch, h, w, heads, head_dim, dtype=dtype)
        for det in deterministic:
            W.window_attention_bwd(dout, q, k, v, out, lse, bias, logit_scale, pad_value, deterministic=det, **kw)

    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    what = "v2 cosine" if v2 else "v1"
    return (f"window {name} {window[0]}x{window[1]} hd{head_dim} {what} {hw[0]}x{hw[1]} shift {shift}"
            f"{'' if pad else ' no pad'} det {'/'.join(map(str, deterministic))} {order}"), run


def _tome(dtype, *, c_metric=64, c_x=768, batch=2, n=197, r=16, class_token=True, distill_token=False,
          size=True):
    def run():
        T = importlib.import_module("mmfast.triton.tome")
        metric = torch.zeros(batch, n, c_metric, dtype=dtype)
        unm, src, dst = T.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
        x = torch.zeros(batch, n, c_x, dtype=dtype)
        s = torch.ones(batch, n, 1, dtype=dtype) if size else None
        out, s_out = T.tome_merge_wavg(x, s, unm, src, dst)
        T.tome_merge_wavg_bwd(torch.zeros_like(out), torch.zeros_like(s_out) if size else None, x, s, unm, src, dst)

    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return (f"tome {name} B={batch} N={n} C={c_metric}/{c_x} r={r} class={class_token} distill={distill_token} "
            f"size={size}"), run


def _scenarios():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    out = []
    # contrastive: CLIP / SigLIP embeddings (D 64..768); 2048 x 2048 local batch; odd sizes once
    for dtype in (f32, f16, bf16):
        for D in (64, 96, 128, 768):
            out.append(_contrastive(dtype, D, 2048, 2048))
    out.append(_contrastive(f32, 96, 1000, 3000))
    out.append(_contrastive(f16, 768, 1000, 3000, bias=False))
    out.append(_contrastive(bf16, 768, 2048, 2048, param_dtype=bf16))
    # window attention: Swin 7x7 (hd 32), 12x12 (hd 64), 16x16 (hd 128, the largest), maps that need
    # padding, shifted (region mask) and not, v1 and v2, deterministic or atomic parameter gradients
    windows = (((7, 7), 32, 3, (20, 20), (3, 3)), ((12, 12), 64, 4, (30, 30), (6, 6)),
               ((16, 16), 128, 2, (24, 24), (8, 8)))
    # (every feature on: v2 in all dtypes; v1 in fp16, the AMP dtype; compile time is the limit)
    for window, hd, heads, hw, shift in windows:
        for dtype in (f32, f16, bf16):
            out.append(_window(dtype, window, hd, heads, hw, shift, v2=True))
        out.append(_window(f16, window, hd, heads, hw, shift, v2=False, deterministic=(False,)))
    out.append(_window(f16, (16, 16), 128, 2, (32, 32), (0, 0), v2=False, deterministic=(False,)))
    out.append(_window(f32, (12, 12), 64, 4, (30, 30), (6, 6), v2=True, pad=False, order="pad_roll",
                       deterministic=(True,)))
    # ToMe on ViT-B/16 (197 tokens, metric = mean of the keys over heads: 64; x: 768)
    for dtype in (f32, f16, bf16):
        out.append(_tome(dtype))
        out.append(_tome(dtype, c_x=64, class_token=False, size=False))
    out.append(_tome(f16, distill_token=True))
    return out


# ------------------------------------------------------------------------------------------------
# Compiling in worker processes


class _Worker:
    def __init__(self, env: dict, log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, bufsize=0)
        self._buf = b""

    def send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(_MARK):
                    return json.loads(line[len(_MARK):])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise EOFError(f"the compiler process exited (rc {self.proc.wait()})")
                self._buf += chunk

    def stderr_tail(self, n: int = 1500) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def close(self, kill: bool = False) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _jobs() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, int(os.environ.get("MMFAST_SM90_COMPILE_JOBS", cpus))))


def _compile_all(configs: list[Config], cache_dir: str, log_dir: str) -> None:
    """Fill ``config.result`` ({"shared", ...} or {"error"}); skips when sm_90 cannot be compiled here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    counter = iter(range(1 << 30))

    def start() -> _Worker:
        return _Worker(env, os.path.join(log_dir, f"worker{next(counter)}.log"))

    def ready(worker: _Worker) -> str | None:
        try:
            msg = worker.recv(COMPILE_TIMEOUT_S)
        except (EOFError, TimeoutError) as exc:
            return f"{exc}; stderr: {worker.stderr_tail()}"
        return msg.get("probe_error")

    workers = [start() for _ in range(min(_jobs(), len(configs)))]
    problems = [p for p in map(ready, workers) if p]
    if problems:
        for w in workers:
            w.close(kill=True)
        pytest.skip(f"cannot compile Triton kernels for sm_{TARGET_ARCH}a here: {problems[0]}")

    # the longest compiles first (fewer idle workers at the end)
    todo: queue.Queue = queue.Queue()
    for cfg in sorted(configs, key=lambda c: 0 if "window" in c.kernel else 1 if "contrastive" in c.kernel else 2):
        todo.put(cfg)

    def drain(worker: _Worker | None) -> None:
        while True:
            try:
                cfg = todo.get_nowait()
            except queue.Empty:
                break
            if worker is None:
                worker = start()
                problem = ready(worker)
                if problem:
                    cfg.result = {"error": f"a new compiler process failed: {problem}"}
                    worker.close(kill=True)
                    worker = None
                    continue
            try:
                worker.send(cfg.spec)
                cfg.result = worker.recv(COMPILE_TIMEOUT_S)
            except (EOFError, TimeoutError, OSError) as exc:
                cfg.result = {"error": f"{exc}; compiler stderr: {worker.stderr_tail()}"}
                worker.close(kill=True)
                worker = None
        if worker is not None:
            worker.close()

    threads = [threading.Thread(target=drain, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------------------------------------
# Tests


def _backend_unavailable() -> str | None:
    from mmfast._ext import triton_status

    ok, how = triton_status()
    if not ok:
        return f"Triton cannot run here: {how}"
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

        _cuda_backend()
    except Exception as exc:  # noqa: BLE001
        return f"Triton's NVIDIA backend is not available: {exc}"
    try:
        ptxas = triton.knobs.nvidia.ptxas
    except Exception as exc:  # noqa: BLE001
        return f"Triton's ptxas is not available: {exc}"
    if ptxas is None:
        return "Triton's ptxas is not available"
    return None


def _kernel_ids() -> list[str]:
    if triton is None:
        return []
    try:
        return _launched_kernels()
    except Exception:  # noqa: BLE001 - the fixture reports it
        return []


KERNELS = _kernel_ids() if __name__ != "__main__" else []


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """{kernel: [Config]} for every launch of the scenarios, compiled for sm_90a."""
    if triton is None:
        pytest.skip("triton is not installed")
    reason = _backend_unavailable()
    if reason:
        pytest.skip(reason)
    t0 = time.perf_counter()
    records = _record_launches(_scenarios())
    configs = list(_configs(records).values())
    t1 = time.perf_counter()
    cache = os.environ.get("TRITON_CACHE_DIR") or str(tmp_path_factory.mktemp("triton_cache_sm90"))
    _compile_all(configs, cache, str(tmp_path_factory.mktemp("sm90_logs")))
    t2 = time.perf_counter()
    by_kernel: dict[str, list[Config]] = {}
    for cfg in configs:
        by_kernel.setdefault(cfg.kernel, []).append(cfg)
    print(f"\nsm_{TARGET_ARCH}a: {len(records)} launches -> {len(configs)} configurations "
          f"(capture {t1 - t0:.1f} s, compile {t2 - t1:.1f} s with {_jobs()} processes, cache {cache})")
    for kernel, cfgs in sorted(by_kernel.items()):
        ok = [c.result for c in cfgs if c.result and "shared" in c.result]
        worst = max((r["shared"] for r in ok), default="-")
        secs = sum(r.get("seconds", 0.0) for r in ok)
        over = sum(r["shared"] > H200_SHARED_LIMIT for r in ok)
        print(f"  {kernel}: {len(cfgs)} configurations ({len(cfgs) - len(ok)} compile errors, {over} over the "
              f"shared-memory limit), max shared {worst} B, compiled in {secs:.0f} s")
    return by_kernel


def test_kernel_discovery():
    """The modules' launched kernels were found (the per-kernel tests below are generated from them)."""
    if triton is None:
        pytest.skip("triton is not installed")
    assert KERNELS, "no kernel launches found in " + ", ".join(MODULES)
    assert {k.split(".")[0] for k in KERNELS} == {_short(m) for m in MODULES}


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_h200(sm90, kernel):
    """Every configuration the launchers use compiles for sm_90a and fits the H200's shared memory."""
    cfgs = sm90.get(kernel)
    assert cfgs, f"{kernel} is launched by its module but by none of the scenarios of this test: add one"
    failures = []
    for cfg in cfgs:
        res = cfg.result or {"error": "not compiled"}
        if "error" in res:
            failures.append(f"{cfg.describe()}\n    COMPILE ERROR: " + res["error"].replace("\n", "\n      "))
        elif res["shared"] > H200_SHARED_LIMIT:
            failures.append(f"{cfg.describe()}\n    SHARED MEMORY {res['shared']} B > {H200_SHARED_LIMIT} B "
                            f"(H200 per-block limit)")
    if failures:
        pytest.fail(f"{len(failures)} of {len(cfgs)} sm_{TARGET_ARCH}a configurations of {kernel} fail:\n"
                    + "\n".join(failures), pytrace=False)


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _worker_main()
