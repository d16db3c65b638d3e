"""A pure-torch Qwen2/Llama decoder with HuggingFace parameter names and a KV cache.

Why our own: the embedded rollout engine must run where SGLang cannot (CPU, CI) and must
accept weight updates addressed by HuggingFace names, exactly as SGLang does. Keeping the
module tree identical to `transformers` (`model.layers.{i}.self_attn.q_proj.weight`, ...)
makes `state_dict()` names the wire names, so no mapping table is needed here.

Batching: prompts are left-padded into one [B, S] block. A `KVCache` keeps one slot per
time step shared by the batch, plus a per-sequence validity mask; padding slots are never
attended to and positions count only valid tokens, so a padded sequence computes the same
values as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from erpo_mega.models import engine_native
from erpo_mega.models.config import ModelConfig
from erpo_mega.models.hf_io import HFCheckpointReader


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same values in one op for fp32 (the decode path counts ops); else `forward`."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, S, head_dim] for integer positions [B, S] (HF 'default' rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [B, S, D]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated keys/values for all layers: [B, Hkv, capacity, D] each, slot-aligned."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.kv_channels)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # slots used so far (shared by the batch)
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def seen_tokens(self) -> torch.Tensor:
        """Valid tokens cached per sequence: the position of the next token."""
        return self.valid[:, : self.length].sum(dim=1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (e.g. drop finished sequences from a decoding batch)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.valid = self.valid.index_select(0, rows)


class SlotKVCache:
    """A pool of per-sequence KV slots for continuous batching: [slots, Hkv, capacity, D] per layer.

    Why slots: sequences join and leave the running batch every step. Each owns one slot whose
    token t sits at index t (no padding), so a sequence that ends frees its slot by moving only
    the *last* active slot into the hole (`remove`), never copying the whole batch. Active
    sequences always occupy slots [0, active), so a decode step attends over a plain view.
    Both dimensions grow on demand (doubling), so a small job holds a small cache.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 slots: int = 8, capacity: int = 64):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens = torch.zeros(0, dtype=torch.long)   # tokens cached per slot
        self.active = 0
        self._alloc(slots, capacity)

    @property
    def slots(self) -> int:
        return self.lens.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def _alloc(self, slots: int, capacity: int) -> None:
        cfg = self.cfg
        shape = (slots, cfg.num_key_value_heads, capacity, cfg.kv_channels)
        old_k, old_v, old_lens = self.k, self.v, self.lens
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.lens = torch.zeros(slots, dtype=torch.long)
        if old_k and self.active:
            a, t = self.active, int(old_lens[: self.active].max())
            for new, old in zip(self.k + self.v, old_k + old_v):
                new[:a, :, :t] = old[:a, :, :t]
            self.lens[:a] = old_lens[:a]

    def reserve(self, slots: int, capacity: int) -> None:
        """Make room for `slots` active sequences of up to `capacity` tokens each (doubling growth)."""
        limit = self.cfg.max_position_embeddings
        if capacity > limit:
            raise ValueError(f"KV cache: {capacity} tokens exceed the context length {limit}")
        if slots > self.slots or capacity > self.capacity:
            new_slots = self.slots if slots <= self.slots else max(slots, 2 * self.slots)
            new_cap = self.capacity if capacity <= self.capacity else min(limit, max(capacity, 2 * self.capacity))
            self._alloc(new_slots, new_cap)

    def copy_slot(self, src: int, dst: int | list[int], length: int) -> None:
        """Copy the first `length` cached tokens of slot `src` into slot(s) `dst` (prompt sharing)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]
        self.lens[dst] = length

    def remove(self, slot: int) -> int:
        """Free `slot`; the last active slot moves into it. Returns the slot that moved (or -1)."""
        last = self.active - 1
        moved = -1
        if slot != last:
            self.copy_slot(last, slot, int(self.lens[last]))
            moved = last
        self.lens[last] = 0
        self.active -= 1
        return moved

    def clear(self) -> None:
        self.lens.zero_()
        self.active = 0


class RowWorkers:
    """Runs `fn(r0, r1)` over contiguous parts of a batch's rows on `n` threads, the caller's first.

    Why: decode (and prefill) rows are independent (own tokens, own KV slots), so on a few CPU
    cores n single-threaded workers, one GEMM of M/n rows each, beat one n-thread GEMM per op:
    at the engine's small M, torch's intra-op parallelism pays a fork/join per op and its
    spinning threads slow the single-threaded kernels in between. The caller sets torch's
    intra-op threads to 1 while these workers are in use (`Engine.use_row_threads`). Torch ops
    and the ctypes kernels release the GIL, so the workers run in parallel.
    """

    MIN_ROWS = 4  # fewer rows per worker are not worth a thread handoff

    def __init__(self, n: int):
        import queue
        import threading

        self.n = n
        self._tasks: list[queue.SimpleQueue] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        for k in range(n - 1):
            q: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(q,), name=f"engine-rows-{k + 1}", daemon=True).start()
            self._tasks.append(q)

    def _serve(self, q) -> None:
        while True:
            idx, fn, r0, r1 = q.get()
            try:
                self._done.put((idx, fn(r0, r1), None))
            except BaseException as e:  # re-raised in the caller
                self._done.put((idx, None, e))

    def run(self, fn, rows: int) -> list:
        """[fn(r0, r1) for each part] in row order; an exception in any part is raised here."""
        parts = max(1, min(self.n, rows // self.MIN_ROWS))
        bounds = [rows * k // parts for k in range(parts + 1)]
        with torch.no_grad():
            for k in range(1, parts):
                self._tasks[k - 1].put((k, fn, bounds[k], bounds[k + 1]))
            out = [None] * parts
            err = None
            try:
                out[0] = fn(bounds[0], bounds[1])
            except BaseException as e:
                err = e
            for _ in range(parts - 1):
                idx, res, e = self._done.get()
                out[idx] = res
                err = err or e
        if err is not None:
            raise err
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, kv = cfg.kv_channels, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.num_heads, self.num_kv = d, h, kv
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=bool(cfg.qkv_bias))
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=bool(cfg.qkv_bias))
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=bool(cfg.qkv_bias))
        # Llama's `attention_bias` also covers o_proj; Qwen2 biases only q/k/v.
        o_bias = bool(cfg.qkv_bias) and cfg.arch == "llama"
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=o_bias)

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + s] = k
            cache.v[layer][:, :, start:start + s] = v
            k = cache.k[layer][:, :, : start + s]
            v = cache.v[layer][:, :, : start + s]
        return self._attend(q, k, v, mask)

    def _attend(self, q, k, v, mask):
        """SDPA over [B, heads, S, D] (each KV head repeated for its GQA query heads), then o_proj;
        `mask` [B, S, T] is True where a query may attend."""
        b, _, s, _ = q.shape
        groups = self.num_heads // self.num_kv
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _qkv(self, x, cos, sin):
        """q, k, v [B, heads, S, D] from one fused projection, rope applied to q and k in one op."""
        b, s, _ = x.shape
        w, bias = _fused(self, ("q_proj", "k_proj", "v_proj"))
        qkv = F.linear(x, w, bias).view(b, s, self.num_heads + 2 * self.num_kv, self.head_dim)
        qk = qkv[:, :, : self.num_heads + self.num_kv]
        qk = qk * cos[:, :, None] + _rotate_half(qk) * sin[:, :, None]
        q = qk[:, :, : self.num_heads].transpose(1, 2)
        k = qk[:, :, self.num_heads:].transpose(1, 2)
        v = qkv[:, :, self.num_heads + self.num_kv:].transpose(1, 2)
        return q, k, v

    def prefill_slots(self, x, cos, sin, mask, layer: int, cache: SlotKVCache, slots: torch.Tensor):
        """Right-padded prompts [B, S] into fresh slots; attention within each prompt only."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        cache.k[layer][slots, :, :s] = k
        cache.v[layer][slots, :, :s] = v
        return self._attend(q, k, v, mask)

    def decode_slots(self, x, cos, sin, hide, layer: int, cache: SlotKVCache, pos: torch.Tensor, width: int):
        """One new token per active slot [0, B): write its K/V at `pos`, attend over [0, width)
        except the keys `hide` [B, 1, 1, T] marks (beyond each sequence's own length).

        GQA without copying K/V: the query heads of one KV head become that head's query rows.
        """
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        rows = torch.arange(b)
        cache.k[layer][rows, :, pos] = k[:, :, 0]
        cache.v[layer][rows, :, pos] = v[:, :, 0]
        keys = cache.k[layer][:b, :, :width]
        values = cache.v[layer][:b, :, :width]
        q = q.reshape(b, self.num_kv, self.num_heads // self.num_kv, self.head_dim)
        # Plain matmul-softmax-matmul: for one query row per head over a short cached span it beats
        # SDPA's CPU flash kernel (measured ~1.5x on the tiny shape), and every row sees its own token.
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.head_dim ** -0.5)
        scores.masked_fill_(hide, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), values)
        return self.o_proj(out.reshape(b, 1, -1))


def _fused(module: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The named Linear layers' weights (and biases) concatenated along the output dim, cached.

    Why: on CPU a decode step's cost is mostly per-op overhead, so one GEMM for q/k/v and one
    for gate/up beat three and two. The HF-named parameters stay the source of truth (weight
    updates address them); the cache is rebuilt whenever any of them changed: in-place writes
    bump the tensor's version counter, replaced storage changes its pointer or shape, and
    `TorchLLM.load_named_tensors` clears it explicitly.
    """
    layers = [getattr(module, n) for n in names]
    params = [p for lin in layers for p in (lin.weight, lin.bias) if p is not None]
    key = tuple((p.data_ptr(), p._version, p.shape) for p in params)
    cached = module.__dict__.get("_fused_cache")
    if cached is None or cached[0] != key:
        w = torch.cat([lin.weight.detach() for lin in layers])
        b = torch.cat([lin.bias.detach() for lin in layers]) if layers[0].bias is not None else None
        cached = (key, w, b)
        module.__dict__["_fused_cache"] = cached
    return cached[1], cached[2]


# Linear layers with at least this many weights run through oneDNN with a prepacked weight on the
# native decode path: measured on this repository's 2-core AVX-512 VM at batch 64, 1.2-1.3x MKL's
# rate for the mid shape's layers and 2.2x for a 32000 x 512 lm_head; for smaller weights (the tiny
# shape's 128 x 256) plain MKL is as fast or faster.
PACK_MIN_WEIGHTS = 1 << 17


def _mkldnn_linear_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _DecodeLinear:
    """A (possibly fused) linear layer prepared for the native decode step's small-M GEMMs."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        self.w, self.b = w, b
        self.packed = None
        if w.dtype == torch.float32 and w.device.type == "cpu" and w.numel() >= PACK_MIN_WEIGHTS \
                and _mkldnn_linear_ok():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + linear(x): in place into `residual` (fused into the GEMM) where possible."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.b, "add")
        residual.addmm_(x, self.w.t())
        return residual if self.b is None else residual.add_(self.b)


def _decode_linear(module: nn.Module, names: tuple[str, ...]) -> _DecodeLinear:
    """The named Linear layers of `module` (or `module` itself for no names) fused and prepared,
    cached and rebuilt on any weight change exactly like `_fused`."""
    layers = [getattr(module, n) for n in names] if names else [module]
    params = [p for lin in layers for p in (lin.weight, lin.bias) if p is not None]
    key = (names, tuple((p.data_ptr(), p._version, p.shape) for p in params))
    cached = module.__dict__.get("_decode_cache")
    if cached is None or cached[0] != key:
        w = torch.cat([lin.weight.detach() for lin in layers]) if len(layers) > 1 else layers[0].weight.detach()
        b = None
        if layers[0].bias is not None:
            b = torch.cat([lin.bias.detach() for lin in layers]) if len(layers) > 1 else layers[0].bias.detach()
        cached = (key, _DecodeLinear(w.contiguous(), b))
        module.__dict__["_decode_cache"] = cached
    return cached[1]


def _check_token_ids(tokens: torch.Tensor, vocab: int, what: str) -> None:
    """Token ids the C stack will index the embedding with must lie in [0, vocab)."""
    if tokens.numel():
        lo, hi = tokens.aminmax()
        if int(lo) < 0 or int(hi) >= vocab:
            raise ValueError(f"{what} tokens must be ids in [0, {vocab})")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fused_forward(self, x):
        w, _ = _fused(self, ("gate_proj", "up_proj"))
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill_slots(self, x, cos, sin, mask, layer, cache, slots):
        x = x + self.self_attn.prefill_slots(self.input_layernorm.fast(x), cos, sin, mask, layer, cache, slots)
        return x + self.mlp.fused_forward(self.post_attention_layernorm.fast(x))

    def decode_slots(self, x, cos, sin, hide, layer, cache, pos, width):
        x = x + self.self_attn.decode_slots(self.input_layernorm.fast(x), cos, sin, hide, layer, cache, pos, width)
        return x + self.mlp.fused_forward(self.post_attention_layernorm.fast(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TorchLLM(nn.Module):
    """Causal LM; `forward` returns logits [B, S, V] (fp32) and fills `cache` if given."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.row_workers: RowWorkers | None = None  # set by Engine.use_row_threads
        self.fused_step: bool | None = None         # None: auto (see _use_fused_step)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, S]; attention_mask [B, S] bool marks real (non-pad) tokens.

        Positions count real tokens only (cache-aware), so left padding changes nothing.
        """
        b, s = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.bool, device=device)
        attention_mask = attention_mask.bool()
        past = cache.length if cache is not None else 0
        offset = cache.seen_tokens() if cache is not None else torch.zeros(b, dtype=torch.long, device=device)
        positions = (offset[:, None] + attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            if past + s > cache.capacity:
                raise ValueError(f"KV cache overflow: {past + s} slots needed, capacity {cache.capacity}")
            cache.valid[:, past:past + s] = attention_mask
            key_valid = cache.valid[:, : past + s]
        else:
            key_valid = attention_mask
        q_slot = torch.arange(past, past + s, device=device)
        k_slot = torch.arange(past + s, device=device)
        causal = k_slot[None, :] <= q_slot[:, None]                       # [S, T]
        mask = causal[None] & key_valid[:, None, :]                        # [B, S, T]
        mask = mask | (k_slot[None, None, :] == q_slot[None, :, None])     # pad queries see themselves
        cos, sin = rope_cos_sin(positions, self.config.kv_channels, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, i, cache)
        if cache is not None:
            cache.length = past + s
        return self.lm_head(self.model.norm(x)).float()

    # --- continuous batching over a SlotKVCache -----------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for integer positions from a table built once (same formula as rope_cos_sin)."""
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].device != positions.device:
            n = self.config.max_position_embeddings
            table = rope_cos_sin(torch.arange(n, device=positions.device)[None], self.config.kv_channels,
                                 self.config.rope_theta)
            table = (table[0][0], table[1][0])
            self._rope_table = table
        dtype = self.lm_head.weight.dtype
        return table[0][positions].to(dtype), table[1][positions].to(dtype)

    def prefill_slots(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: SlotKVCache,
                      slots: torch.Tensor) -> torch.Tensor:
        """Prompts right-padded to [B, S] (true `lengths`) into fresh `slots`; returns the final
        hidden states [B, S, H] (normed). The caller applies `lm_head` only where it needs logits.
        With `row_workers`, parts of the prompts run on the workers' threads.
        """
        b, s = input_ids.shape
        ek = self._native_kernels() if input_ids.device.type == "cpu" else None
        if ek is not None:
            self._rope(lengths[:1])  # build the table before any worker reads it
            self._check_native_step(cache, s)
            lins = self._decode_linears()
            input_ids, lengths, slots = input_ids.cpu(), lengths.cpu().long(), slots.cpu().long()
            fn = lambda r0, r1: self._prefill_native(ek, lins, input_ids[r0:r1], lengths[r0:r1],  # noqa: E731
                                                     cache, slots[r0:r1])
        else:
            fn = lambda r0, r1: self._prefill_slots(input_ids[r0:r1], lengths[r0:r1], cache,  # noqa: E731
                                                    slots[r0:r1])
        if self.row_workers is not None and b >= 2 * RowWorkers.MIN_ROWS:
            self._rope(lengths[:1])
            out = torch.cat(self.row_workers.run(fn, b))
        else:
            out = fn(0, b)
        if ek is not None:
            cache.lens[slots] = lengths
        return out

    def _prefill_slots(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: SlotKVCache,
                       slots: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        device = input_ids.device
        pos = torch.arange(s, device=device)
        valid = pos[None, :] < lengths[:, None]                                     # [B, S]
        mask = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]             # [B, S, S]
        cos, sin = self._rope(pos.expand(b, s))
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer.prefill_slots(x, cos, sin, mask, i, cache, slots)
        cache.lens[slots.cpu()] = lengths.cpu()
        return self.model.norm.fast(x)

    def decode_slots(self, tokens: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """One token per active slot (tokens [B], B == cache.active); returns logits [B, V] fp32.

        fp32 on CPU with the native kernels available: `_decode_native`; else plain torch ops.
        """
        ek = self._native_kernels()
        if ek is not None:
            parts = self.decode_slots_rows(tokens, cache, lambda logits, r0, r1: logits)
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        b = tokens.shape[0]
        lens = cache.lens[:b]
        width = int(lens.max()) + 1
        if width > cache.capacity:
            raise ValueError(f"KV cache overflow: {width} slots needed, capacity {cache.capacity}")
        pos = lens.to(tokens.device)
        hidden = (torch.arange(width, device=tokens.device)[None] > pos[:, None])[:, None, None]  # [B,1,1,T]
        cos, sin = self._rope(pos[:, None])
        x = self.model.embed_tokens(tokens[:, None])
        for i, layer in enumerate(self.model.layers):
            x = layer.decode_slots(x, cos, sin, hidden, i, cache, pos, width)
        cache.lens[:b] += 1
        return self.lm_head(self.model.norm.fast(x[:, 0])).float()

    def _native_kernels(self):
        """The engine's C kernels when this model can use them (fp32 on CPU, head_dim they support)."""
        p = self.lm_head.weight
        cfg = self.config
        if p.dtype != torch.float32 or p.device.type != "cpu" or cfg.kv_channels % 2 \
                or cfg.kv_channels > engine_native.MAX_HEAD_DIM:
            return None
        return engine_native.kernels()

    def decode_slots_rows(self, tokens: torch.Tensor, cache: SlotKVCache, head) -> list:
        """`decode_slots` with the logits of rows [r0, r1) handed to `head(logits, r0, r1)` where
        they are computed; returns the heads' results in row order (one per row part: several
        with `row_workers`, so sampling runs in the same parallel pass as the model)."""
        b = tokens.shape[0]
        if b == 0:
            return []
        ek = self._native_kernels()
        if ek is None:
            return [head(self.decode_slots(tokens, cache), 0, b)]
        width = int(cache.lens[:b].max()) + 1
        if width > cache.capacity:
            raise ValueError(f"KV cache overflow: {width} slots needed, capacity {cache.capacity}")
        self._rope(cache.lens[:1])  # builds the table once, before any worker reads it
        lins = self._decode_linears()
        self._check_native_step_once(cache)

        sample = head if isinstance(head, engine_native.SampleHead) else None

        def part(r0: int, r1: int):
            logits = self._decode_native(ek, lins, tokens[r0:r1], cache, r0, r1, sample)
            return None if logits is None else head(logits, r0, r1)

        out = [part(0, b)] if self.row_workers is None else self.row_workers.run(part, b)
        cache.lens[:b] += 1
        return out

    def decode_slots_steps(self, tokens: torch.Tensor, cache: SlotKVCache, head: engine_native.SampleHead) -> None:
        """`head.steps` decode steps of every slot, each row part in one native call (the one-call
        step, sampling into the [steps, B] head: step k's drawn tokens are step k+1's inputs);
        advances `cache.lens` by `head.steps`. Only where `multi_step_ready()`."""
        b = tokens.shape[0]
        if not self.multi_step_ready():
            raise RuntimeError("decode_slots_steps needs the native one-call decode step")
        if b == 0 or head.uniforms.dim() != 2 or head.uniforms.shape[1] != b:
            raise ValueError(f"decode_slots_steps: head uniforms must be [steps, {b}]")
        ek, lins = self._native_kernels(), self._decode_linears()
        width = int(cache.lens[:b].max()) + head.steps
        if width > cache.capacity:
            raise ValueError(f"KV cache overflow: {width} slots needed, capacity {cache.capacity}")
        self._rope(cache.lens[:1])
        self._check_native_step_once(cache)

        def part(r0: int, r1: int):
            self._decode_fused(ek, lins, tokens[r0:r1], cache, r0, r1, head)

        if self.row_workers is None:
            part(0, b)
        else:
            self.row_workers.run(part, b)

    def multi_step_ready(self) -> bool:
        """Whether `decode_slots_steps` runs here (native kernels, the one-call step in use)."""
        if self.lm_head.weight.device.type != "cpu":
            return False
        ek = self._native_kernels()
        return ek is not None and self._use_fused_step(ek, self._decode_linears())

    def _decode_linears(self) -> list:
        """Per layer (qkv, o, gate_up, down) prepared for the native step, then lm_head.

        Cached as a whole, keyed by every parameter's storage and version counter (what
        `_decode_linear` keys each layer by), so a step pays one pass over the parameters. The
        parameter list itself is kept until `clear_fused` (which `load_named_tensors` calls):
        code that replaces a Parameter object must call it too.
        """
        params = self.__dict__.get("_param_list")
        if params is None:
            params = self.__dict__["_param_list"] = list(self.parameters())
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = self.__dict__.get("_decode_lins")
        if cached is not None and cached[0] == key:
            return cached[1]
        lins = self._build_decode_linears()
        # a serial number (not id(), which a new list may reuse) keys what was derived from lins
        self._lins_serial = getattr(self, "_lins_serial", 0) + 1
        self.__dict__["_decode_lins"] = (key, lins)
        return lins

    def _build_decode_linears(self) -> list:
        lins: list = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            lins.append((_decode_linear(a, ("q_proj", "k_proj", "v_proj")), _decode_linear(a.o_proj, ()),
                         _decode_linear(m, ("gate_proj", "up_proj")), _decode_linear(m.down_proj, ())))
        lins.append(_decode_linear(self.lm_head, ()))
        return lins

    def _decode_native(self, ek, lins: list, tokens: torch.Tensor, cache: SlotKVCache, r0: int, r1: int,
                       sample=None):
        """Logits [r1 - r0, V] for slots [r0, r1) (`_native_rows` over one token per slot, or the
        whole step in one C call: `_decode_fused`, which also samples when given a `SampleHead`
        and then returns None). Does not advance `cache.lens`."""
        if self._use_fused_step(ek, lins):
            return self._decode_fused(ek, lins, tokens, cache, r0, r1, sample)
        h = self._native_rows(ek, lins, tokens, cache, cache.lens.data_ptr() + 8 * r0, None,
                              r0 * cache.k[0][0].numel() * 4)
        return lins[-1](h)

    def _use_fused_step(self, ek, lins: list) -> bool:
        """`fused_step` True/False forces it; None (default): when BLAS is reachable from C and no
        layer is large enough for the prepacked oneDNN GEMMs (small models, where per-op
        overhead matters; at the mid size those GEMMs are worth more than the saved overhead)."""
        if ek.sgemm is None or self.fused_step is False:
            return False
        return bool(self.fused_step) or all(lin.packed is None for layer in lins[:-1] for lin in layer) \
            and lins[-1].packed is None

    def _decode_fused(self, ek, lins: list, tokens: torch.Tensor, cache: SlotKVCache, r0: int, r1: int,
                      sample=None):
        """The decode step of slots [r0, r1) as one `ek_decode_step` call (GIL released throughout);
        with a `SampleHead` the call also samples into its outputs and this returns None."""
        n = r1 - r0
        vocab = lins[-1].w.shape[0]
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            raise ValueError("decode tokens must be a contiguous int64 tensor")
        _check_token_ids(tokens, vocab, "decode")
        dims, lw_t, kc, vc = self._cached_fused_tables(lins, cache, r0)
        main = self._stack_work_floats(n, cache)
        sampling = 0 if sample is None else 2 * vocab + vocab // 16 + 1
        work = ek.scratch(main + sampling + n * vocab)   # per thread, reused step to step
        logits = work[main + sampling: main + sampling + n * vocab].view(n, vocab)
        cos_t, sin_t = self._rope_table
        if sample is None:
            extra = (None,) * 6
        else:
            extra = (sample.temps.data_ptr() + 4 * r0, sample.greedy.data_ptr() + r0, sample.uniforms.data_ptr() + 8 * r0,
                     sample.tokens.data_ptr() + 8 * r0, sample.logprobs.data_ptr() + 4 * r0,
                     work.data_ptr() + 4 * main)
        args = (ek.sgemm, n, dims.data_ptr(), tokens.data_ptr(), self.model.embed_tokens.weight.data_ptr(),
                lw_t.data_ptr(), self.model.norm.weight.data_ptr(), lins[-1].w.data_ptr(),
                self.model.norm.eps, cos_t.data_ptr(), sin_t.data_ptr(),
                cache.lens.data_ptr() + 8 * r0, kc.data_ptr(), vc.data_ptr(), cache.capacity,
                work.data_ptr(), logits.data_ptr(), *extra)
        if sample is not None and sample.uniforms.dim() == 2:  # K steps, advances cache.lens itself
            if ek.lib.ek_decode_steps(sample.steps, sample.uniforms.shape[1], *args) != sample.steps:
                raise RuntimeError("decode step produced no finite logit for a sequence (NaN or -inf logits)")
        else:
            ek.lib.ek_decode_step(*args)
        return None if sample is not None else logits.clone()

    def _check_native_step_once(self, cache: SlotKVCache) -> None:
        """`_check_native_step` at full capacity, again only when the cache or the weights changed."""
        checked = (self._lins_serial, self._cache_key(cache))
        if self.__dict__.get("_native_checked") != checked:
            self._check_native_step(cache, cache.capacity)
            self.__dict__["_native_checked"] = checked

    def _cached_fused_tables(self, lins: list, cache: SlotKVCache, r0: int) -> tuple:
        """`_fused_tables_for`, cached per weights, cache tensors and first row (at most 65 kept)."""
        key = (self._lins_serial, self._cache_key(cache), r0)
        tables = self.__dict__.setdefault("_fused_tables", {})
        if key not in tables:
            if len(tables) > 64:
                tables.clear()
            tables[key] = self._fused_tables_for(lins, cache, r0)
        return tables[key]

    def _stack_work_floats(self, rows: int, cache: SlotKVCache) -> int:
        """fp32 work space the C layer stack needs for `rows` token rows (activations of every
        projection, plus one attention score row per query head of a KV group over the cache)."""
        cfg = self.config
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_channels
        return (rows * (2 * cfg.hidden_size + (nh + 2 * nkv) * d + nh * d + 3 * cfg.intermediate_size)
                + (nh // nkv) * cache.capacity)

    @staticmethod
    def _cache_key(cache: SlotKVCache) -> tuple:
        """Identifies the cache's current tensors by address and shape (reallocation changes it)."""
        return (cache.capacity, cache.slots, cache.lens.data_ptr(), *(t.data_ptr() for t in cache.k + cache.v))

    def _fused_tables_for(self, lins: list, cache: SlotKVCache, r0: int) -> tuple:
        """`ek_decode_step`'s dims, weight and cache address tables (they hold the addresses only
        while `lins` and the cache tensors live: cached under their identities)."""
        cfg = self.config
        lw = []
        for layer, (qkv, o, gu, down) in zip(self.model.layers, lins[:-1]):
            lw += [layer.input_layernorm.weight.data_ptr(), qkv.w.data_ptr(), 0 if qkv.b is None else qkv.b.data_ptr(),
                   o.w.data_ptr(), 0 if o.b is None else o.b.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                   gu.w.data_ptr(), down.w.data_ptr()]
        off = r0 * cache.k[0][0].numel() * 4
        dims = torch.tensor([cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_channels,
                             cfg.intermediate_size, lins[-1].w.shape[0], len(self.model.layers)])
        return (dims, torch.tensor(lw), torch.tensor([t.data_ptr() + off for t in cache.k]),
                torch.tensor([t.data_ptr() + off for t in cache.v]))

    def _native_rows(self, ek, lins: list, tokens: torch.Tensor, cache: SlotKVCache, pos_p: int,
                     slots: torch.Tensor | None, kv_offset: int) -> torch.Tensor:
        """The final normed hidden states [n, H] of n token rows (token b at position *pos_p[b] of
        slot slots[b], or of slot b past `kv_offset` bytes): one C kernel per norm / attention /
        SiLU and one GEMM per (fused) projection, residual adds fused into the GEMMs; no masks,
        gathers or per-step temporaries beyond the GEMM outputs.

        Calls the C entry points directly (this runs once per layer and step, where wrapper
        checks would cost more than the kernels): `_check_native_step` validated the cache and
        weights, every other buffer is a fresh contiguous fp32 tensor made here.
        """
        lib = ek.lib
        cfg = self.config
        n, hid = tokens.shape[0], cfg.hidden_size
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_channels
        cap = cache.capacity
        cos_t, sin_t = self._rope_table
        slot_p = None if slots is None else slots.data_ptr()
        scratch = ek.scratch((nh // nkv) * cap).data_ptr()
        scale = d ** -0.5
        x = self.model.embed_tokens(tokens)
        h = torch.empty_like(x)
        att = x.new_empty(n, nh * d)
        act = None
        for i, layer in enumerate(self.model.layers):
            qkv_l, o_l, gu_l, down_l = lins[i]
            lib.ek_rmsnorm(x.data_ptr(), layer.input_layernorm.weight.data_ptr(), h.data_ptr(), n, hid,
                           layer.input_layernorm.eps)
            qkv = qkv_l(h)
            lib.ek_decode_attention(qkv.data_ptr(), n, nh, nkv, d, cos_t.data_ptr(), sin_t.data_ptr(), pos_p, slot_p,
                                    cache.k[i].data_ptr() + kv_offset, cache.v[i].data_ptr() + kv_offset,
                                    cap, scale, att.data_ptr(), scratch)
            x = o_l.add_to(att, x)
            lib.ek_rmsnorm(x.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(), h.data_ptr(), n, hid,
                           layer.post_attention_layernorm.eps)
            gu = gu_l(h)
            if act is None:
                act = gu.new_empty(n, gu.shape[1] // 2)
            lib.ek_silu_mul(gu.data_ptr(), act.data_ptr(), n, act.shape[1])
            x = down_l.add_to(act, x)
        lib.ek_rmsnorm(x.data_ptr(), self.model.norm.weight.data_ptr(), h.data_ptr(), n, hid, self.model.norm.eps)
        return h

    def _prefill_native(self, ek, lins: list, input_ids: torch.Tensor, lengths: torch.Tensor, cache: SlotKVCache,
                        slots: torch.Tensor) -> torch.Tensor:
        """`_prefill_slots` on the native rows: the prompts' real tokens as one flat batch (token
        rows in increasing positions per prompt, so each attends to its prompt's earlier keys)."""
        b, s = input_ids.shape
        valid = torch.arange(s)[None, :] < lengths[:, None]
        pos = torch.arange(s).expand(b, s)[valid].contiguous()
        slot_rows = slots[:, None].expand(b, s)[valid].contiguous()
        if self._use_fused_step(ek, lins):
            flat = self._prefill_fused(ek, lins, input_ids[valid].contiguous(), pos, slot_rows, cache)
        else:
            flat = self._native_rows(ek, lins, input_ids[valid], cache, pos.data_ptr(), slot_rows, 0)
        out = flat.new_zeros(b, s, flat.shape[1])
        out[valid] = flat
        return out

    PREFILL_CHUNK = 64  # token rows per pass through the model in `_prefill_fused` (activations in L2)

    def _prefill_fused(self, ek, lins: list, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                       cache: SlotKVCache) -> torch.Tensor:
        """Flat prompt token rows (int64 tokens/pos/slots, one slot's rows in increasing positions)
        through the whole model in one `ek_prefill_rows` call, `PREFILL_CHUNK` rows at a time
        (the one-call decode step's kernels and tables); the final normed hidden states [n, H]."""
        n = tokens.shape[0]
        for name, t in (("tokens", tokens), ("pos", pos), ("slots", slots)):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (n,):
                raise ValueError(f"prefill {name} must be a contiguous int64 tensor of {n} entries")
        out = torch.empty(n, self.config.hidden_size)
        if n == 0:
            return out
        _check_token_ids(tokens, self.model.embed_tokens.weight.shape[0], "prefill")
        dims, lw_t, kc, vc = self._cached_fused_tables(lins, cache, 0)
        chunk = min(n, self.PREFILL_CHUNK)
        work = ek.scratch(self._stack_work_floats(chunk, cache))
        cos_t, sin_t = self._rope_table
        ek.lib.ek_prefill_rows(ek.sgemm, n, chunk, dims.data_ptr(), tokens.data_ptr(),
                               self.model.embed_tokens.weight.data_ptr(), lw_t.data_ptr(),
                               self.model.norm.weight.data_ptr(), self.model.norm.eps, cos_t.data_ptr(),
                               sin_t.data_ptr(), pos.data_ptr(), slots.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                               cache.capacity, work.data_ptr(), out.data_ptr())
        return out

    def _check_native_step(self, cache: SlotKVCache, width: int) -> None:
        """What `_decode_native` relies on, checked once per step (C trusts its pointers)."""
        cfg = self.config
        if width > self._rope_table[0].shape[0]:
            raise ValueError(f"position {width - 1} beyond the rope table ({self._rope_table[0].shape[0]})")
        want = (cfg.num_key_value_heads, cache.capacity, cfg.kv_channels)
        for t in (*cache.k, *cache.v, cache.lens):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("KV cache tensors must be contiguous CPU tensors for the native decode step")
        for t in (*cache.k, *cache.v):
            if t.dtype != torch.float32 or tuple(t.shape[1:]) != want:
                raise ValueError(f"KV cache: {t.dtype} {tuple(t.shape)}, expected fp32 [slots, {want}]")
        if cache.lens.dtype != torch.int64:
            raise ValueError("KV cache lengths must be int64")
        for w in (self.model.embed_tokens.weight, self.model.norm.weight):
            if not w.is_contiguous() or w.dtype != torch.float32:
                raise ValueError("embedding and final norm weights must be contiguous fp32 for the native step")
        for layer in self.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not norm.weight.is_contiguous() or norm.weight.dtype != torch.float32:
                    raise ValueError("RMSNorm weights must be contiguous fp32 for the native decode step")

    def new_slot_cache(self, slots: int = 8, capacity: int = 64) -> SlotKVCache:
        p = self.lm_head.weight
        return SlotKVCache(self.config, p.dtype, p.device, slots, min(capacity, self.config.max_position_embeddings))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, capacity, p.dtype, p.device)

    # --- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def load_named_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy HF-named tensors into the parameters in place; returns the names loaded.

        Unknown names and shape mismatches raise `KeyError`/`ValueError` naming the tensor;
        they are checked before anything is written only per tensor, so callers should
        validate a whole update first when atomicity matters (see `check_named_shapes`).
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = []
        for name, tensor in named_tensors:
            target = params.get(name)
            if target is None:
                raise KeyError(f"unknown parameter name {name!r} for {self.config.arch} model")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name!r}: model {tuple(target.shape)}, "
                                 f"got {tuple(tensor.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            loaded.append(name)
        self.clear_fused()
        return loaded

    def clear_fused(self) -> None:
        """Drop the fused q/k/v and gate/up copies (rebuilt on the next step from the parameters)."""
        for m in self.modules():
            m.__dict__.pop("_fused_cache", None)
            m.__dict__.pop("_decode_cache", None)
        for name in ("_decode_lins", "_native_checked", "_fused_tables", "_param_list"):
            self.__dict__.pop(name, None)

    def check_named_shapes(self, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, shape in shapes:
            if name not in params:
                raise KeyError(f"unknown parameter name {name!r} for {self.config.arch} model")
            if tuple(params[name].shape) != tuple(shape):
                raise ValueError(f"shape mismatch for {name!r}: model {tuple(params[name].shape)}, "
                                 f"got {tuple(shape)}")

    @classmethod
    def from_hf_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TorchLLM:
        cfg = ModelConfig.from_hf_dir(path)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu").to(dtype)
        if cfg.tie_word_embeddings:  # to_empty re-materialises; re-tie
            model.lm_head.weight = model.model.embed_tokens.weight
        names = set(dict(model.named_parameters(remove_duplicate=False)))
        loaded = set(model.load_named_tensors(iter_hf_safetensors(path)))
        missing = names - loaded - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        if missing:
            raise KeyError(f"checkpoint {path} lacks parameters: {sorted(missing)[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        return model.eval()


def iter_hf_safetensors(path: str | Path) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from an HF dir, shard by shard, one tensor in memory at a time.

    Reads through the conversion tools' `HFCheckpointReader`, so a missing shard, a bad index or
    a truncated file is a `ConversionError` naming the file, here as in `erpo-mega convert`.
    """
    reader = HFCheckpointReader(path)
    try:
        for name in sorted(reader.names(), key=lambda n: (str(reader.where[n]), n)):
            yield name, reader.get(name)
    finally:
        reader.close()
