"""The export-ready decoder (Llama, Mistral, Qwen2/3, Phi-3, SmolLM3, Gemma 3) with a fixed-shape sink + ring KV cache.

One module for every family, driven by `ModelConfig` (exporter/config.py says what each field does). Static shapes,
no data-dependent Python control flow, the cache as registered buffers: `torch.export` traces it unchanged for every
target.
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
        parts = [torch.cat(parts[i : i + 5]) for i in range(0, len(parts), 5)]
    return torch.cat(parts)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the Hugging Face half-split layout; cos/sin are [..., T, R/2]. With R below the head's
    dims (partial rotary), the first R dims rotate and the rest pass through."""
    r = 2 * cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rest is not None:  # broadcast like the rotated parts (the query's three frames)
        parts.append(rest.expand(*parts[0].shape[:-1], rest.shape[-1]))
    return torch.cat(parts, dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.local, self.rope = cfg.is_local(layer), cfg.has_rope(layer)
        self.scale = cfg.attn_scale or d**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, contexts: dict) -> tuple[Tensor, Tensor, Tensor]:
        """x [1, T, hidden]; caches [KV, C, D], keys rotated at their slot. Returns out and the chunk's rotated
        keys and values [KV, T, D], for the caller to write: the cache itself is only read, never copied."""
        t = x.shape[1]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        g = h // kv
        ctx = contexts["local" if self.local else "global"]
        q = self.q_proj(x).view(t, h, d)
        k = self.k_proj(x).view(t, kv, d)
        if hasattr(self, "q_norm"):  # per head, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, T, D], [KV, T, D]
        v = self.v_proj(x).view(t, kv, d).transpose(0, 1)
        if self.rope:
            k = rotate(k, ctx["k_cos"], ctx["k_sin"])  # once, at the slot it is written to
            # The query in its three frames (exporter.cache.rope_frames), [KV, G*3*T, D] ordered (group, frame,
            # token): grouped-query attention without copying keys, query head h uses kv head h // G.
            qt = rotate(q.reshape(kv, g, 1, t, d), ctx["q_cos"], ctx["q_sin"]).reshape(kv, -1, d).transpose(1, 2)
            frames = 3
        else:  # no rotary in this layer (SmolLM3): one frame
            qt = q.reshape(kv, g * t, d).transpose(1, 2)
            frames = 1
        # Keys times the (small, transposed) queries: the cache is read as it lies, once.
        # bmm rather than @: matmul's decomposition adds expand ops XNNPACK does not take.
        scores = torch.cat([torch.bmm(k_cache, qt), torch.bmm(k, qt)], dim=1)  # [KV, C + T, G*frames*T]
        scores = scores.transpose(1, 2).reshape(kv, g, frames, t, -1)
        # Each (query, key) pair keeps its frame's score: masks as 0/1 factors and a 0/-inf bias rather than
        # where/masked_fill, exact, and ops XNNPACK delegates.
        scores = (scores * ctx["frames"]).sum(dim=2) if self.rope else scores.view(kv, g, t, -1)
        probs = torch.softmax(scores * self.scale + ctx["bias"], dim=-1).view(kv, g * t, -1)
        c = k_cache.shape[1]
        out = torch.bmm(probs[:, :, :c], v_cache) + torch.bmm(probs[:, :, c:], v)
        return self.o_proj(out.view(h, t, d).transpose(0, 1).reshape(1, t, h * d)), k, v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        # Norms that read the residual stream take eps times residual_scale^2: scale-invariant, exactly.
        stream_eps, eps = cfg.rms_norm_eps * cfg.residual_scale**2, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, stream_eps)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:  # Gemma: post_attention_layernorm normalizes the attention's output
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, stream_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        else:  # Llama: post_attention_layernorm is the MLP's input norm
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, stream_eps)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, ctx: dict) -> tuple[Tensor, Tensor, Tensor]:
        a, k_cache, v_cache = self.self_attn(self.input_layernorm(x), k_cache, v_cache, ctx)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), k_cache, v_cache
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache

    def stream_outputs(self) -> list[RMSNorm]:
        """The modules whose output joins the residual stream, weights folded by `residual_scale` at load
        (without sandwich norms: the attention's and the MLP's output projections)."""
        if self.sandwich:
            return [self.post_attention_layernorm, self.post_feedforward_layernorm]
        return [self.self_attn.o_proj, self.mlp.down_proj]


class StreamingLM(nn.Module):
    """Decoder with an S + W slot cache per layer. `forward(tokens [1, T], input_pos [1])` -> logits.

    A hybrid model's sliding layers (Gemma 3) keep their model's own window as a plain ring, S = 0 and W = its
    sliding window (docs/cache.md, "Hybrid models"). Each layer reads only its own S + W slots: its own buffer
    (`per_layer_cache`, the pure graphs' inputs) or the first S + W slots of its part of the stacked buffer, which
    has the widest layer's slot count (Core ML's one state, sessions)."""

    def __init__(
        self,
        cfg: ModelConfig,
        sink: int,
        window: int,
        max_chunk: int = 128,
        dtype: torch.dtype = torch.float32,
        last_logits_only: bool = False,
    ):
        super().__init__()
        self.cfg, self.sink, self.window, self.max_chunk = cfg, sink, window, max_chunk
        self.geometry = {"global": (sink, window)}  # (S, W) of each kind of layer
        if cfg.local_window:
            self.geometry["local"] = (0, cfg.local_window)
        self.slots = max(s + w for s, w in self.geometry.values())
        self.last_logits_only = last_logits_only
        # How forward writes the cache: "slots" (index_put_ per layer, `write_slots`), or "coreml": one token's
        # slot as a slice of the stacked cache (`write_slot`), longer chunks as a whole-cache blend (`blended`).
        self.cache_write = "slots"
        self.packed = None  # the Quantization its weights were packed with at load (exporter/targets: Packer)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps * cfg.residual_scale**2)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(dtype)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)create the cache and rotary tables, e.g. after `to_empty` from the meta device."""
        cfg = self.cfg
        dtype, device = self.norm.weight.dtype, self.norm.weight.device  # never packed (loaders.build_model)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One buffer for keys and values of all layers: one state per artifact (and coremltools'
        # state-ordering pass mishandles two updates in a row).
        shape = (2, cfg.num_layers, cfg.num_kv_heads, self.slots, cfg.head_dim)
        self.register_buffer("kv_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Rotary tables computed in float64 once: angles never pass through low precision.
        for kind, (s, w) in self.geometry.items():
            local = kind == "local"
            rows = torch.arange(s + 2 * w, dtype=torch.float64)[:, None] * cfg.inv_freq(local)[None, :]
            gain = cfg.rope_gain(local)
            suffix = "_local" if local else ""
            self.register_buffer("rope_cos" + suffix, (rows.cos() * gain).to(dtype).to(device), persistent=False)
            self.register_buffer("rope_sin" + suffix, (rows.sin() * gain).to(dtype).to(device), persistent=False)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.init_buffers(dtype, device)

    @property
    def capacity(self) -> int:
        return self.sink + self.window

    def layer_geometry(self, layer: int) -> tuple[int, int]:
        return self.geometry["local" if self.cfg.is_local(layer) else "global"]

    def layer_slots(self, j: int) -> int:
        """Slots of cache part j (keys of layers 0..L-1, then values): its layer's S + W."""
        return sum(self.layer_geometry(j % self.cfg.num_layers))

    def context(self, t: int, input_pos: Tensor) -> dict:
        """Everything the layers of each kind share for one call: rotary rows, frames, visibility."""
        start = input_pos.to(torch.int64)
        q_pos = start + torch.arange(t, dtype=torch.int64)
        out = {}
        for kind, (s, w) in self.geometry.items():
            k_pos = torch.cat([slot_positions(start - 1, s, w), q_pos])  # this kind's own slots, then the chunk
            k_slot = torch.cat([torch.arange(s + w, dtype=torch.int64), slot_index(q_pos, s, w)])
            rows, frames = rope_frames(q_pos, k_pos, k_slot, s, w)
            suffix = "_local" if kind == "local" else ""
            cos, sin = getattr(self, "rope_cos" + suffix), getattr(self, "rope_sin" + suffix)
            dtype = cos.dtype
            zero, ninf = torch.zeros(1, dtype=dtype), torch.full((1,), float("-inf"), dtype=dtype)
            out[kind] = {
                "q_cos": cos[rows],
                "q_sin": sin[rows],  # [3, T, R/2]
                "k_cos": cos[rows[1]],
                "k_sin": sin[rows[1]],  # the chunk's keys at their slots
                "frames": frames.to(dtype),  # [3, T, C + T]
                "bias": torch.where(visible(q_pos, k_pos, s, w), zero, ninf),  # [T, C + T]
            }
        return out

    def cache_parts(self, kv_cache: Tensor) -> list[Tensor]:
        """The stacked cache [2, L, KV, C, D] as 2L views [KV, C_j, D], each its layer's own first S + W slots: keys
        of layers 0..L-1, then values."""
        parts = kv_cache.view(-1, *kv_cache.shape[2:]).unbind(0)
        return [p if self.layer_slots(j) == p.shape[1] else p[:, : self.layer_slots(j)] for j, p in enumerate(parts)]

    def caches(self) -> list[Tensor]:
        """This model's cache, one [KV, C, D] tensor per layer and half (views of `kv_cache` unless split)."""
        if "kv_cache" in self._buffers:
            return self.cache_parts(self.kv_cache)
        return [getattr(self, f"cache_{j}") for j in range(2 * self.cfg.num_layers)]

    def per_layer_cache(self) -> StreamingLM:
        """A shallow copy (weights shared) whose cache is 2L buffers `cache_0`.. (keys, then values), each of its
        layer's own S + W slots, rather than one stacked buffer: for runtimes that copy every slice they take of a
        tensor (ExecuTorch copied the whole cache a token taking its per-layer slices), each layer then reads its own
        buffer where it lies."""
        split = copy.copy(self)
        split._buffers = {k: v for k, v in self._buffers.items() if k != "kv_cache"}
        for j, part in enumerate(self.cache_parts(self.kv_cache)):
            split.register_buffer(
                f"cache_{j}", torch.zeros(part.shape, dtype=part.dtype, device=part.device), persistent=False
            )
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
        if self.cfg.embed_scale * self.cfg.residual_scale != 1.0:
            x = x * (self.cfg.embed_scale * self.cfg.residual_scale)
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
        t = entries[0].shape[1]
        q_pos = input_pos.to(torch.int64) + torch.arange(t, dtype=torch.int64)
        plan = {}  # per (S, W): the slots written and which entry each takes
        for s, w in self.geometry.values():
            newest = None
            if t > 1:
                i = torch.arange(t, dtype=torch.int64)
                newest = torch.where(q_pos < s, i, i + w * torch.div(t - 1 - i, w, rounding_mode="floor"))
            plan[s, w] = slot_index(q_pos, s, w), newest
        n = self.cfg.num_layers
        for j, (cache, entry) in enumerate(zip(caches, entries, strict=True)):
            slots, newest = plan[self.layer_geometry(j % n)]
            # aten's index_put_ rather than `cache[:, slots] =`, which squeezes a leading 1 of the value (one KV head:
            # Gemma 3 270M), a rank ExecuTorch's in-place index_put refuses at run time.
            torch.ops.aten.index_put_(cache, [None, slots], entry if newest is None else entry.index_select(1, newest))

    def write_slot(self, entries: Tensor, input_pos: Tensor) -> None:
        """One token's stacked entries [2, L, KV, 1, D] into its slot of the stacked cache: one slice per run of
        layers sharing a geometry (one for a uniform model), which coremltools converts to a slice_update of the
        state, a write of that slot alone, where the blend rewrote the whole cache. (slice_scatter rather than
        index_put_: coremltools reads an fp16 state as fp32, and only slice_scatter promotes the entries to it.)"""
        n, start = self.cfg.num_layers, 0
        cache = self.kv_cache
        for end in range(1, n + 1):
            if end < n and self.layer_geometry(end) == self.layer_geometry(start):
                continue
            slot = slot_index(input_pos.to(torch.int64), *self.layer_geometry(start))[0].item()
            torch._check(slot >= 0)
            torch._check(slot < self.slots)
            if (start, end) == (0, n):  # not cache[:, 0:n], an alias coremltools does not take
                cache = cache.slice_scatter(entries, dim=3, start=slot, end=slot + 1)
            else:
                run = cache[:, start:end].slice_scatter(entries[:, start:end], dim=3, start=slot, end=slot + 1)
                cache = cache.slice_scatter(run, dim=1, start=start, end=end)
            start = end
        self.kv_cache.copy_(cache)

    def blended(self, cache: Tensor, entries: Tensor, input_pos: Tensor) -> Tensor:
        """The stacked cache with stacked entries [2, L, KV, T, D] in their slots, as a fixed-shape blend of
        the whole cache (keep or pick each slot: the form coremltools converts; it rejects index_copy)."""
        t = entries.shape[3]
        masks = {}  # per (S, W): keep [C, 1] and pick [C, T] over the buffer's slots
        for s, w in self.geometry.values():
            written, src = chunk_writes(input_pos.to(torch.int64), t, s, w)
            if s + w < self.slots:
                written = torch.cat([written, torch.zeros(self.slots - s - w, dtype=torch.bool)])
                src = torch.cat([src, torch.zeros(self.slots - s - w, dtype=torch.int64)])
            keep = torch.logical_not(written).to(cache.dtype).view(-1, 1)
            pick = torch.logical_and(written[:, None], src[:, None] == torch.arange(t)[None, :]).to(cache.dtype)
            masks[s, w] = keep, pick
        if len(masks) == 1:
            keep, pick = masks[self.sink, self.window]
        else:  # a hybrid model: each layer its own, [1, L, 1, C, 1] and [1, L, 1, C, T]
            per_layer = [masks[self.layer_geometry(i)] for i in range(self.cfg.num_layers)]
            keep = torch.stack([k for k, _ in per_layer]).unsqueeze(0).unsqueeze(2)
            pick = torch.stack([p for _, p in per_layer]).unsqueeze(0).unsqueeze(2)
        # One token: a broadcast product rather than a matmul.
        return cache * keep + (pick * entries if t == 1 else torch.matmul(pick, entries))

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Stateful form: reads and writes the cache buffers (ExecuTorch, Core ML, eager)."""
        caches = self.caches()
        logits, entries = self.step(tokens, input_pos, caches)
        if self.cache_write == "slots":
            self.write_slots(caches, entries, input_pos)
        elif tokens.shape[1] == 1:
            self.write_slot(self.stacked(entries), input_pos)
        else:
            self.kv_cache.copy_(self.blended(self.kv_cache, self.stacked(entries), input_pos))
        return logits
