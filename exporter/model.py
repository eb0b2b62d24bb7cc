"""The export-ready decoder (Llama, Mistral, Qwen2) with a fixed-shape sink + ring KV cache.

One module for the three families, driven by `ModelConfig`. Static shapes, no data-dependent Python
control flow, the cache as registered buffers: `torch.export` traces it unchanged for every target.
Attribute names follow Hugging Face so checkpoints load with a plain key clean-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporter.cache import chunk_writes, rope_indices, slot_positions, visible
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
        """x [1, T, hidden]; caches [KV, C, D] (keys stored before rotation). Returns out, new caches."""
        t = x.shape[1]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(t, h, d).transpose(0, 1)  # [H, T, D]
        k = self.k_proj(x).view(t, kv, d).transpose(0, 1)  # [KV, T, D]
        v = self.v_proj(x).view(t, kv, d).transpose(0, 1)

        keys = torch.cat([k_cache, k], dim=1)  # [KV, C + T, D], unrotated
        values = torch.cat([v_cache, v], dim=1)
        keys = rotate(keys, ctx["k_cos"], ctx["k_sin"])
        # Grouped-query attention without copying keys: query head h uses kv head h // group.
        qs = rotate(q, ctx["qs_cos"], ctx["qs_sin"]).reshape(kv, -1, d)  # [KV, G*T, D]
        qw = rotate(q, ctx["qw_cos"], ctx["qw_sin"]).reshape(kv, -1, d)
        kt = keys.transpose(1, 2)
        # Masks as arithmetic (0/1 factors, 0/-inf bias) rather than where/masked_fill: exact, and
        # every op in a layer is one XNNPACK delegates, which keeps ExecuTorch export fast.
        # bmm/mm rather than @: matmul's decomposition adds expand ops XNNPACK does not take.
        scores = torch.bmm(qs, kt) * ctx["k_sink"] + torch.bmm(qw, kt) * ctx["k_window"]
        scores = scores.view(kv, h // kv, t, -1) * (d**-0.5) + ctx["bias"]
        probs = torch.softmax(scores, dim=-1).view(kv, -1, keys.shape[1])
        out = torch.bmm(probs, values).view(h, t, d).transpose(0, 1).reshape(1, t, h * d)

        # Cache write: slot j keeps its value or takes the chunk token `pick` selects (one-hot rows,
        # so the matmul copies exactly); the newest token wins when a chunk is longer than the ring.
        new_k = k_cache * ctx["keep"] + self._scatter(ctx["pick"], k)
        new_v = v_cache * ctx["keep"] + self._scatter(ctx["pick"], v)
        return self.o_proj(out), new_k, new_v

    def _scatter(self, pick: Tensor, x: Tensor) -> Tensor:
        """[C, T] one-hot rows times x [KV, T, D] -> [KV, C, D], as one 2-D matmul."""
        kv, t, d = x.shape
        x = x.transpose(0, 1).reshape(t, kv * d)
        # One token: a broadcast product, which XNNPACK takes (it leaves this mm to a slow portable kernel).
        rows = pick * x if t == 1 else torch.mm(pick, x)
        return rows.view(-1, kv, d).transpose(0, 1)


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
        rows = torch.arange(s + w + self.max_chunk, dtype=torch.float64)[:, None] * cfg.inv_freq()[None, :]
        self.register_buffer("rope_cos", rows.cos().to(dtype).to(device), persistent=False)
        self.register_buffer("rope_sin", rows.sin().to(dtype).to(device), persistent=False)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.init_buffers(dtype, device)

    @property
    def capacity(self) -> int:
        return self.sink + self.window

    def reset(self) -> None:
        self.kv_cache.zero_()

    def context(self, t: int, input_pos: Tensor) -> dict:
        """Everything the layers share for one call: rotary rows, visibility, cache writes."""
        s, w = self.sink, self.window
        start = input_pos.to(torch.int64)
        q_pos = start + torch.arange(t, dtype=torch.int64)
        k_pos = torch.cat([slot_positions(start - 1, s, w), q_pos])
        q_sink, q_win, k_row, k_is_sink = rope_indices(q_pos, k_pos, start, s, w, self.rope_cos.shape[0])
        written, src = chunk_writes(start, t, s, w)
        cos, sin = self.rope_cos, self.rope_sin
        dtype = cos.dtype
        zero, ninf = torch.zeros(1, dtype=dtype), torch.full((1,), float("-inf"), dtype=dtype)
        pick = torch.logical_and(written[:, None], src[:, None] == torch.arange(t)[None, :])
        return {
            "qs_cos": cos[q_sink], "qs_sin": sin[q_sink],
            "qw_cos": cos[q_win], "qw_sin": sin[q_win],
            "k_cos": cos[k_row], "k_sin": sin[k_row],
            "k_sink": k_is_sink.to(dtype).view(1, 1, -1),
            "k_window": torch.logical_not(k_is_sink).to(dtype).view(1, 1, -1),
            "bias": torch.where(visible(q_pos, k_pos, s, w), zero, ninf).view(1, 1, t, -1),
            "keep": torch.logical_not(written).to(dtype).view(1, -1, 1),
            "pick": pick.to(dtype),
        }

    def step(self, tokens: Tensor, input_pos: Tensor, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """Pure form: cache in, cache out (the ONNX graph). Logits [1, T, V] or [1, V]."""
        t = tokens.shape[1]
        if t > self.max_chunk:
            raise ValueError(f"chunk of {t} tokens exceeds max_chunk={self.max_chunk}")
        ctx = self.context(t, input_pos)
        x = self.embed_tokens(tokens)
        # One [KV, C, D] slice per layer and half, taken in one pass: ExecuTorch materializes every select
        # as a copy, so `kv_cache[0, i]` in the loop copied the whole key half once per layer.
        n = self.cfg.num_layers
        parts = kv_cache.view(2 * n, *kv_cache.shape[2:]).unbind(0)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, parts[i], parts[n + i], ctx)
            new_k.append(k)
            new_v.append(v)
        if self.last_logits_only:
            x = x[:, -1:, :]
        logits = self.lm_head(self.norm(x))
        if self.last_logits_only:
            logits = logits.view(1, -1)
        return logits, cat_tree(new_k + new_v).view(kv_cache.shape)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Stateful form: reads and writes the cache buffers (ExecuTorch, Core ML, OpenVINO)."""
        logits, kv = self.step(tokens, input_pos, self.kv_cache)
        self.kv_cache.copy_(kv)
        return logits
