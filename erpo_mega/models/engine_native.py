"""ctypes bindings of the engine's decode-step kernels (`erpo_mega/native/src/engine_kernels.c`).

Why: a decode step of a small model on CPU is a few GEMMs plus many small elementwise ops
(norms, rope, the KV-cache write, attention over a short cache, SiLU, the sampling pass over
the vocabulary); as torch ops each costs a dispatch, an allocation and a memory pass, which
together cost more than the GEMMs. Each kernel here is one call over fp32 buffers.

`kernels()` is None when the library is unavailable or `ERPO_NATIVE=0`; callers then take their
plain-torch path (tests run both and compare them with an independent reference). Inputs are
checked here (dtype, device, contiguity, shapes) because C trusts its pointers.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from erpo_mega.native import address as _ptr
from erpo_mega.native import load_library

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
MAX_HEAD_DIM = 1024  # the attention kernel keeps one rotated query on its stack


def _check(name: str, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"engine kernel argument {name}: need a contiguous CPU {dtype} tensor, got "
                         f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")


class EngineKernels:
    """Typed wrappers over one loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.ek_rmsnorm.argtypes = [_P, _P, _P, _I, _I, _F]
        lib.ek_silu_mul.argtypes = [_P, _P, _I, _I]
        lib.ek_decode_attention.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _F, _P, _P]
        lib.ek_sample.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P]
        lib.ek_decode_step.argtypes = [_P, _I, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P, _I, _P, _P,
                                       _P, _P, _P, _P, _P, _P]
        lib.ek_decode_steps.argtypes = [_I, _I] + lib.ek_decode_step.argtypes
        for f in (lib.ek_rmsnorm, lib.ek_silu_mul, lib.ek_decode_attention, lib.ek_sample, lib.ek_decode_step):
            f.restype = None
        lib.ek_decode_steps.restype = _I
        lib.ek_prefill_rows.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _I, _P, _P]
        lib.ek_prefill_rows.restype = None
        self.sgemm = blas_sgemm_address()
        self._local = threading.local()

    def scratch(self, n: int) -> torch.Tensor:
        """A reusable fp32 work buffer of at least n floats, one per thread (engines in one process
        each run their own worker thread)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < n:
            buf = self._local.buf = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())))
        return buf

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None):
        """RMSNorm over the last dim of x [rows, h] (HF formula, fp32)."""
        _check("x", x)
        _check("weight", weight)
        h = x.shape[-1]
        if weight.numel() != h:
            raise ValueError(f"rmsnorm: weight has {weight.numel()} elements, hidden size is {h}")
        out = torch.empty_like(x) if out is None else out
        _check("out", out)
        if out.shape != x.shape:
            raise ValueError(f"rmsnorm: out shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
        self.lib.ek_rmsnorm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // max(h, 1), h, eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """silu(gate) * up for gate_up [rows, 2 * inter] laid out [gate | up] -> [rows, inter]."""
        _check("gate_up", gate_up)
        rows, two = gate_up.shape
        if two % 2:
            raise ValueError(f"silu_mul: last dim {two} is odd; expected [gate | up]")
        out = gate_up.new_empty(rows, two // 2) if out is None else out
        _check("out", out)
        if tuple(out.shape) != (rows, two // 2):
            raise ValueError(f"silu_mul: out shape {tuple(out.shape)} != {(rows, two // 2)}")
        self.lib.ek_silu_mul(_ptr(gate_up), _ptr(out), rows, two // 2)
        return out

    def decode_attention(self, qkv: torch.Tensor, num_heads: int, num_kv: int, head_dim: int,
                         cos_table: torch.Tensor, sin_table: torch.Tensor, pos: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row b: rope q/k at pos[b], write k/v into cache slot b (or slots[b]) at
        pos[b], attend over the slot's keys [0, pos[b]]; rows run in order (a prompt's tokens in
        increasing positions see each other). qkv [B, (H + 2 Hkv) D]; caches [slots, Hkv, cap, D];
        cos/sin tables [positions, D]; pos (and slots) int64 [B]. Returns [B, H * D]."""
        for name, t in (("qkv", qkv), ("cos_table", cos_table), ("sin_table", sin_table),
                        ("k_cache", k_cache), ("v_cache", v_cache)):
            _check(name, t)
        _check("pos", pos, torch.int64)
        b = qkv.shape[0]
        slots_n, nkv, cap, d = k_cache.shape
        if head_dim > MAX_HEAD_DIM or head_dim % 2 or num_heads % num_kv:
            raise ValueError(f"decode_attention: head_dim {head_dim} (even, <= {MAX_HEAD_DIM}) and "
                             f"{num_heads} heads over {num_kv} kv heads not supported")
        if slots is not None:
            _check("slots", slots, torch.int64)
            if slots.shape != (b,) or (b and (int(slots.min()) < 0 or int(slots.max()) >= k_cache.shape[0])):
                raise ValueError(f"decode_attention: slots must be {b} indices into {k_cache.shape[0]} cache slots")
        if (nkv, d) != (num_kv, head_dim) or v_cache.shape != k_cache.shape or (slots is None and b > slots_n):
            raise ValueError(f"decode_attention: cache {tuple(k_cache.shape)} does not fit {b} rows of "
                             f"{num_kv} kv heads x {head_dim}")
        if tuple(qkv.shape) != (b, (num_heads + 2 * num_kv) * head_dim) or pos.shape != (b,):
            raise ValueError(f"decode_attention: qkv {tuple(qkv.shape)} / pos {tuple(pos.shape)} do not "
                             f"match {b} rows of {num_heads}+2x{num_kv} heads x {head_dim}")
        top = int(pos.max()) if b else 0
        if b and (int(pos.min()) < 0 or top >= cap or top >= cos_table.shape[0]
                  or tuple(cos_table.shape[1:]) != (head_dim,) or sin_table.shape != cos_table.shape):
            raise ValueError(f"decode_attention: positions [{int(pos.min())}, {top}] outside the cache "
                             f"({cap}) or rope table ({tuple(cos_table.shape)})")
        out = qkv.new_empty(b, num_heads * head_dim) if out is None else out
        _check("out", out)
        scratch = self.scratch((num_heads // num_kv) * (top + 1))
        self.lib.ek_decode_attention(_ptr(qkv), b, num_heads, num_kv, head_dim, _ptr(cos_table),
                                     _ptr(sin_table), _ptr(pos), None if slots is None else _ptr(slots),
                                     _ptr(k_cache), _ptr(v_cache), cap,
                                     scale, _ptr(out), _ptr(scratch))
        return out

    def sample(self, logits: torch.Tensor, temps: torch.Tensor, greedy: torch.Tensor,
               uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens int64 [B], log-probs fp32 [B]) for logits [B, V]: argmax where greedy, else an
        inverse-CDF draw with uniforms [B] (float64) over softmax(logits / temps); log-prob of the
        token under log_softmax(logits / temp) (temp 1 for greedy). Token -1: no finite logit."""
        _check("logits", logits)
        _check("temps", temps)
        _check("greedy", greedy, torch.uint8)
        _check("uniforms", uniforms, torch.float64)
        b, v = logits.shape
        if temps.shape != (b,) or greedy.shape != (b,) or uniforms.shape != (b,):
            raise ValueError(f"sample: temps/greedy/uniforms must each have {b} entries")
        tokens = torch.empty(b, dtype=torch.int64)
        lps = torch.empty(b, dtype=torch.float32)
        scratch = self.scratch(2 * v + v // 16 + 1)
        self.lib.ek_sample(_ptr(logits), b, v, _ptr(temps), _ptr(greedy), _ptr(uniforms), _ptr(tokens),
                           _ptr(lps), _ptr(scratch))
        return tokens, lps


def blas_sgemm_address() -> int | None:
    """Address of the Fortran-ABI `sgemm_` in torch's CPU library (its bundled MKL), or None.

    `ek_decode_step` runs its GEMMs through it, so they are the same BLAS calls torch's linear
    layers make; builds without an exported `sgemm_` use the per-op path instead.
    """
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


class SampleHead:
    """A decode head that samples rows [r0, r1) into shared outputs: `tokens`/`logprobs` [B].

    As a callable it runs `EngineKernels.sample` on a part's logits; the model's one-call decode
    step recognises it and samples inside that call instead (no logits leave C). With uniforms
    [K, B] it is a K-step head (`TorchLLM.decode_slots_steps`): outputs [K, B], step by step.
    """

    def __init__(self, kernels: EngineKernels, temps: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor):
        b = temps.shape[0]
        _check("temps", temps)
        _check("greedy", greedy, torch.uint8)
        _check("uniforms", uniforms, torch.float64)
        if greedy.shape != (b,) or uniforms.shape[-1:] != (b,) or uniforms.dim() > 2 or uniforms.numel() == 0:
            raise ValueError(f"SampleHead: temps/greedy must have {b} entries, uniforms [{b}] or [steps, {b}]")
        self.kernels, self.temps, self.greedy, self.uniforms = kernels, temps, greedy, uniforms
        self.steps = uniforms.shape[0] if uniforms.dim() == 2 else 1
        self.tokens = torch.empty(uniforms.shape, dtype=torch.int64)
        self.logprobs = torch.empty(uniforms.shape, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, r0: int, r1: int) -> None:
        if self.steps != 1 or self.uniforms.dim() != 1:
            raise ValueError("a multi-step SampleHead runs only inside the one-call decode step")
        t, lp = self.kernels.sample(logits.float().contiguous(), self.temps[r0:r1], self.greedy[r0:r1],
                                    self.uniforms[r0:r1])
        self.tokens[r0:r1] = t
        self.logprobs[r0:r1] = lp


_wrapped: dict[int, EngineKernels] = {}


def kernels() -> EngineKernels | None:
    """The engine kernels, or None (ERPO_NATIVE=0, no compiler, build error: the torch path runs)."""
    lib = load_library("engine_kernels")
    if lib is None:
        return None
    k = _wrapped.get(id(lib))
    if k is None:
        k = _wrapped[id(lib)] = EngineKernels(lib)
    return k
