"""The reference: a deliberately plain eager implementation of the cache contract.

Per layer it keeps the tokens it holds in age order (a list of absolute positions and the keys,
before rotation, and values stacked in the same order), appends each new token, evicts the oldest
non-sink token once more than S + W are held, rotates every key by its index (its position inside
the cache), and attends. One token at a time, no masks, no ring arithmetic. A hybrid model's sliding layers follow
the same rule with S = 0 and W = the model's own sliding window (docs/cache.md).
It borrows only the weights of a `StreamingLM`; none of its cache or attention code. `ReferenceRunner` puts it
behind the runner interface, so it streams and generates like an artifact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from exporter.model import StreamingLM
from runtimes import Runner


def _rotate(x: Tensor, pos: Tensor, inv_freq: Tensor, gain: float = 1.0) -> Tensor:
    """x [..., N, D] rotated by integer positions pos [N] (angles in float64); the first 2 * len(inv_freq) dims
    rotate, any others pass (partial rotary)."""
    angles = pos.double()[:, None] * inv_freq[None, :]
    cos, sin = (angles.cos() * gain).to(x.dtype), (angles.sin() * gain).to(x.dtype)
    r = 2 * inv_freq.shape[0]
    x1, x2 = x[..., : r // 2], x[..., r // 2: r]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], dim=-1)


class Reference:
    def __init__(self, model: StreamingLM, sink: int | None = None, window: int | None = None):
        self.m = model
        self.sink = model.sink if sink is None else sink
        self.window = model.window if window is None else window
        cfg = model.cfg
        # Per layer: (S, W, inverse frequencies, rotary gain); sliding layers of a hybrid model a plain ring.
        self.geometry = [
            (0, cfg.local_window, cfg.inv_freq(True), cfg.rope_gain(True)) if cfg.is_local(i)
            else (self.sink, self.window, cfg.inv_freq(), cfg.rope_gain())
            for i in range(cfg.num_layers)
        ]
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        cfg = self.m.cfg
        empty = torch.zeros(cfg.num_kv_heads, 0, cfg.head_dim, dtype=self.m.embed_tokens.weight.dtype)
        self.layers = [{"pos": [], "k": empty, "v": empty} for _ in self.m.layers]

    @torch.no_grad()
    def feed(self, token: int) -> Tensor:
        """Feed one token; returns its logits [vocab] (float32)."""
        m, cfg = self.m, self.m.cfg
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = m.embed_tokens(torch.tensor([token])) * (cfg.embed_scale * cfg.residual_scale)  # [1, hidden]
        for layer, store, (sink, window, inv_freq, gain) in zip(m.layers, self.layers, self.geometry, strict=True):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q, k = attn.q_proj(y).view(h, d), attn.k_proj(y).view(kv, 1, d)
            if cfg.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            store["pos"].append(self.pos)
            store["k"] = torch.cat([store["k"], k], dim=1)
            store["v"] = torch.cat([store["v"], attn.v_proj(y).view(kv, 1, d)], dim=1)
            self._evict(store, sink, window)
            n = len(store["pos"])
            cache_pos = torch.arange(n)  # the rule: positions inside the cache, in age order
            keys, values = store["k"], store["v"]  # [KV, n, D]
            if attn.rope:
                keys = _rotate(keys, cache_pos, inv_freq, gain)
                q = _rotate(q[:, None, :], cache_pos[-1:], inv_freq, gain)[:, 0, :]  # [H, D]
            group = h // kv  # query head i reads kv head i // group
            keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
            scores = torch.einsum("hd,hnd->hn", q, keys) * attn.scale
            out = attn.o_proj(torch.einsum("hn,hnd->hd", torch.softmax(scores, dim=-1), values).reshape(1, h * d))
            if layer.sandwich:
                x = x + layer.post_attention_layernorm(out)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            else:
                x = x + out
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.pos += 1
        return m.lm_head(m.norm(x))[0]

    def _evict(self, store: dict, sink: int, window: int) -> None:
        while len(store["pos"]) > sink + window:
            oldest = next(i for i, p in enumerate(store["pos"]) if p >= sink)
            del store["pos"][oldest]
            for key in ("k", "v"):
                store[key] = torch.cat([store[key][:, :oldest], store[key][:, oldest + 1:]], dim=1)


class ReferenceRunner(Runner):
    def __init__(self, model, tokenizer, chunk: int = 1):
        self.ref = Reference(model)
        self.tokenizer, self.chunk, self.vocab_size = tokenizer, chunk, model.cfg.vocab_size
        self.token_dtype, self.manifest, self.pos = np.int64, None, 0

    def reset(self) -> None:
        super().reset()
        self.ref.reset()

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        with torch.no_grad():
            for t in tokens[0]:
                logits = self.ref.feed(int(t))
        return logits.numpy()
