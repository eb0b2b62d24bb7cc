"""The export-ready decoder (Llama, Mistral, Qwen2) with a fixed-shape sink + ring KV cache.

One module for the three families, driven by `ModelConfig`. Static shapes, no data-dependent Python
control flow, the cache as registered buffers: `torch.export` traces it unchanged for every target.
Attribute names follow Hugging Face so checkpoints load with a plain key clean-up.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporter.cache import chunk_writes, rope_frames, slot_index, slot_positions, visible
from exporter.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.init_buffers(torch.float32, None)

    def init_buffers(self, dtype: torch.dtype, device) -> None:
        # eps as a tensor: `tensor / tensor` lowers to a division XNNPACK delegates, `float / tensor`
        # to a reciprocal it does not (which would split every layer's partition).
        self.register_buffer("eps_tensor", torch.tensor([self.eps], dtype=dtype, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # Core ML computes in fp16, where x * x overflows past |x| = 256 (SmolLM2's residual stream
        # passes 600 by its third layer, and the norm then returns zeros). So the row is first divided
        # by s = max(max|x|, 1), which is exact in real arithmetic:
        #   x / sqrt(mean(x^2) + eps) = (x/s) / sqrt(mean((x/s)^2) + eps/s^2),  with (x/s)^2 <= 1.
        # The reductions run on a [1, N, dim, 1] view: the max and mean XNNPACK delegates, so each
        # layer stays one delegate partition (a split partition costs export time).
        d = x.shape[-1]
        rows = x.view(1, -1, d, 1)
        s = rows.abs().max(dim=2, keepdim=True).values.clamp(min=1.0)
        xs = rows / s
        ms = (xs * xs).mean(dim=(-2, -1), keepdim=True)
        return self.weight * (xs * torch.rsqrt(ms + self.eps_tensor / (s * s))).view(x.shape)


def cat_tree(parts: list[Tensor]) -> Tensor:
    """torch.cat on dim 0 as a tree of at most five inputs per cat. XNNPACK concatenates five tensors at a
    time and chains longer cats, copying the growing result again at every link: for a 30-layer cache that
    was 8 copies of it per token (profiled: a quarter of decode time); the tree copies it 3 times."""
    while len(parts) > 5:
        parts = [torch.cat(parts[i:i + 5]) for i in range(0, len(parts), 5)]
    return torch.cat(parts)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the Hugging Face half-split layout; cos/sin are [..., T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, ctx: dict) -> tuple[Tensor, Tensor, Tensor]:
        """x [1, T, hidden]; caches [KV, C, D], keys rotated at their slot. Returns out and the chunk's rotated
        keys and values [KV, T, D], for the caller to write: the cache itself is only read, never copied."""
        t = x.shape[1]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        g = h // kv
        q = self.q_proj(x).view(t, h, d).transpose(0, 1)  # [H, T, D]
        k = self.k_proj(x).view(t, kv, d).transpose(0, 1)  # [KV, T, D]
        v = self.v_proj(x).view(t, kv, d).transpose(0, 1)
        k = rotate(k, ctx["k_cos"], ctx["k_sin"])  # once, at the slot it is written to
        # The query in its three frames (exporter.cache.rope_frames), [KV, G*3*T, D] ordered (group, frame,
        # token): grouped-query attention without copying keys, query head h uses kv head h // G.
        qt = rotate(q.reshape(kv, g, 1, t, d), ctx["q_cos"], ctx["q_sin"]).reshape(kv, -1, d).transpose(1, 2)
        # Keys times the (small, transposed) queries: the cache is read as it lies, once.
        # bmm rather than @: matmul's decomposition adds expand ops XNNPACK does not take.
        scores = torch.cat([torch.bmm(k_cache, qt), torch.bmm(k, qt)], dim=1)  # [KV, C + T, G*3*T]
        # Each (query, key) pair keeps its frame's score: masks as 0/1 factors and a 0/-inf bias rather than
        # where/masked_fill, exact, and ops XNNPACK delegates.
        scores = (scores.transpose(1, 2).reshape(kv, g, 3, t, -1) * ctx["frames"]).sum(dim=2)
        probs = torch.softmax(scores * (d**-0.5) + ctx["bias"], dim=-1).view(kv, g * t, -1)
        c = k_cache.shape[1]
        out = torch.bmm(probs[:, :, :c], v_cache) + torch.bmm(probs[:, :, c:], v)
        return self.o_proj(out.view(h, t, d).transpose(0, 1).reshape(1, t, h * d)), k, v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, ctx: dict) -> tuple[Tensor, Tensor, Tensor]:
        a, k_cache, v_cache = self.self_attn(self.input_layernorm(x), k_cache, v_cache, ctx)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class StreamingLM(nn.Module):
    """Decoder with an S + W slot cache per layer. `forward(tokens [1, T], input_pos [1])` -> logits."""

    def __init__(self, cfg: ModelConfig, sink: int, window: int, max_chunk: int = 128,
                 dtype: torch.dtype = torch.float32, last_logits_only: bool = False):
        super().__init__()
        self.cfg, self.sink, self.window, self.max_chunk = cfg, sink, window, max_chunk
        self.last_logits_only = last_logits_only
        self.write_in_place = True  # False: the whole-cache blend Core ML converts (see `blended`)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(dtype)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)create the cache and rotary tables, e.g. after `to_empty` from the meta device."""
        cfg, s, w = self.cfg, self.sink, self.window
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One buffer for keys and values of all layers: one state per artifact (and coremltools'
        # state-ordering pass mishandles two updates in a row).
        shape = (2, cfg.num_layers, cfg.num_kv_heads, s + w, cfg.head_dim)
        self.register_buffer("kv_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Rotary tables computed in float64 once: angles never pass through low precision.
        rows = torch.arange(s + 2 * w, dtype=torch.float64)[:, None] * cfg.inv_freq()[None, :]
        self.register_buffer("rope_cos", rows.cos().to(dtype).to(device), persistent=False)
        self.register_buffer("rope_sin", rows.sin().to(dtype).to(device), persistent=False)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.init_buffers(dtype, device)

    @property
    def capacity(self) -> int:
        return self.sink + self.window

    def context(self, t: int, input_pos: Tensor) -> dict:
        """Everything the layers share for one call: rotary rows, frames, visibility."""
        s, w = self.sink, self.window
        start = input_pos.to(torch.int64)
        q_pos = start + torch.arange(t, dtype=torch.int64)
        k_pos = torch.cat([slot_positions(start - 1, s, w), q_pos])  # the cache's slots, then the chunk
        k_slot = torch.cat([torch.arange(s + w, dtype=torch.int64), slot_index(q_pos, s, w)])
        rows, frames = rope_frames(q_pos, k_pos, k_slot, s, w)
        cos, sin = self.rope_cos, self.rope_sin
        dtype = cos.dtype
        zero, ninf = torch.zeros(1, dtype=dtype), torch.full((1,), float("-inf"), dtype=dtype)
        return {
            "q_cos": cos[rows], "q_sin": sin[rows],  # [3, T, D/2]
            "k_cos": cos[rows[1]], "k_sin": sin[rows[1]],  # the chunk's keys at their slots
            "frames": frames.to(dtype),  # [3, T, C + T]
            "bias": torch.where(visible(q_pos, k_pos, s, w), zero, ninf),  # [T, C + T]
        }

    def cache_parts(self, kv_cache: Tensor) -> list[Tensor]:
        """The stacked cache [2, L, KV, C, D] as 2L views [KV, C, D]: keys of layers 0..L-1, then values."""
        return list(kv_cache.view(-1, *kv_cache.shape[2:]).unbind(0))

    def caches(self) -> list[Tensor]:
        """This model's cache, one [KV, C, D] tensor per layer and half (views of `kv_cache` unless split)."""
        if "kv_cache" in self._buffers:
            return self.cache_parts(self.kv_cache)
        return [getattr(self, f"cache_{j}") for j in range(2 * self.cfg.num_layers)]

    def per_layer_cache(self) -> StreamingLM:
        """A shallow copy (weights shared) whose cache is 2L buffers `cache_0`.. (keys, then values) rather than
        one stacked buffer: for runtimes that copy every slice they take of a tensor (ExecuTorch copied the
        whole cache a token taking its per-layer slices), each layer then reads its own buffer where it lies."""
        split = copy.copy(self)
        split._buffers = {k: v for k, v in self._buffers.items() if k != "kv_cache"}
        for j, part in enumerate(self.cache_parts(self.kv_cache)):
            split.register_buffer(f"cache_{j}", torch.zeros_like(part), persistent=False)
        return split

    def reset(self) -> None:
        for cache in self.caches():
            cache.zero_()

    def step(self, tokens: Tensor, input_pos: Tensor, caches: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Pure form, the cache (2L tensors [KV, C, D]) only read: logits ([1, T, V], or [1, V] with
        last_logits_only) and the chunk's cache entries, 2L tensors [KV, T, D] in the same order. Entry t
        belongs in slot `slot_of(input_pos + t)`; where a chunk longer than the ring repeats a slot, the later
        entry wins (`write_slots`, `blended`)."""
        t = tokens.shape[1]
        if t > self.max_chunk:
            raise ValueError(f"chunk of {t} tokens exceeds max_chunk={self.max_chunk}")
        ctx = self.context(t, input_pos)
        x = self.embed_tokens(tokens)
        n = self.cfg.num_layers
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, caches[i], caches[n + i], ctx)
            new_k.append(k)
            new_v.append(v)
        if self.last_logits_only:
            x = x[:, -1:, :]
        logits = self.lm_head(self.norm(x))
        if self.last_logits_only:
            logits = logits.view(1, -1)
        return logits, new_k + new_v

    def stacked(self, entries: list[Tensor]) -> Tensor:
        """2L entries [KV, T, D] as one tensor [2, L, KV, T, D], the stacked cache's layout."""
        return cat_tree(entries).view(2, self.cfg.num_layers, *entries[0].shape)

    def write_slots(self, caches: list[Tensor], entries: list[Tensor], input_pos: Tensor) -> None:
        """Write each entry [KV, T, D] into its slots of its cache [KV, C, D], in place (an index_put_, which
        ExecuTorch's reinplace pass keeps in place: one slot per layer written a token, nothing copied).
        Entries feeding a slot a later entry of the chunk also writes are replaced by that later one first,
        so a scatter with repeated slots writes equal values, in any order."""
        s, w = self.sink, self.window
        t = entries[0].shape[1]
        q_pos = input_pos.to(torch.int64) + torch.arange(t, dtype=torch.int64)
        newest = None
        if t > 1:
            i = torch.arange(t, dtype=torch.int64)
            newest = torch.where(q_pos < s, i, i + w * torch.div(t - 1 - i, w, rounding_mode="floor"))
        slots = slot_index(q_pos, s, w)
        for cache, entry in zip(caches, entries, strict=True):
            cache[:, slots] = entry if newest is None else entry.index_select(1, newest)

    def blended(self, cache: Tensor, entries: Tensor, input_pos: Tensor) -> Tensor:
        """The stacked cache with stacked entries [2, L, KV, T, D] in their slots, as a fixed-shape blend of
        the whole cache (keep or pick each slot: the form coremltools converts; it rejects index_copy)."""
        t = entries.shape[3]
        written, src = chunk_writes(input_pos.to(torch.int64), t, self.sink, self.window)
        keep = torch.logical_not(written).to(cache.dtype).view(-1, 1)
        pick = torch.logical_and(written[:, None], src[:, None] == torch.arange(t)[None, :]).to(cache.dtype)
        # One token: a broadcast product rather than a matmul.
        return cache * keep + (pick * entries if t == 1 else torch.matmul(pick, entries))

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Stateful form: reads and writes the cache buffers (ExecuTorch, Core ML, eager)."""
        caches = self.caches()
        logits, entries = self.step(tokens, input_pos, caches)
        if self.write_in_place:
            self.write_slots(caches, entries, input_pos)
        else:
            self.kv_cache.copy_(self.blended(self.kv_cache, self.stacked(entries), input_pos))
        return logits
