"""The reference: a deliberately plain eager implementation of the cache contract.

Per layer it keeps the tokens it holds in age order (a list of absolute positions and the keys,
before rotation, and values stacked in the same order), appends each new token, evicts the oldest
non-sink token once more than S + W are held, rotates every key by its index (its position inside
the cache), and attends. Attention one token at a time, no masks, no ring arithmetic. A hybrid model's sliding
layers follow the same rule with S = 0 and W = the model's own sliding window (docs/cache.md).
It borrows only the weights of a `StreamingLM`; none of its cache or attention code. `ReferenceRunner` puts it
behind the runner interface, so it streams and generates like an artifact; `streamed_logits` runs it a layer at a
time from the checkpoint, for models whose float weights do not fit in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from exporter.model import StreamingLM
from runtimes import Runner


def _tables(n: int, inv_freq: Tensor, gain: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [n, R/2] of integer positions 0..n-1 (angles in float64)."""
    angles = torch.arange(n).double()[:, None] * inv_freq[None, :]
    return (angles.cos() * gain).to(dtype), (angles.sin() * gain).to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., N, D] rotated by the tables' rows [N, R/2]; the first R dims rotate, any others pass (partial
    rotary)."""
    r = 2 * cos.shape[-1]
    x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], dim=-1)


class Reference:
    def __init__(self, model: StreamingLM, sink: int | None = None, window: int | None = None):
        self.m = model
        self.sink = model.sink if sink is None else sink
        self.window = model.window if window is None else window
        cfg = model.cfg
        # Per layer: (S, W, inverse frequencies, rotary gain); sliding layers of a hybrid model a plain ring.
        self.geometry = [
            (0, cfg.local_window, cfg.inv_freq(True), cfg.rope_gain(True))
            if cfg.is_local(i)
            else (self.sink, self.window, cfg.inv_freq(), cfg.rope_gain())
            for i in range(cfg.num_layers)
        ]
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        cfg = self.m.cfg
        empty = torch.zeros(cfg.num_kv_heads, 0, cfg.head_dim, dtype=self.m.embed_tokens.weight.dtype)
        self.layers = [{"pos": [], "k": empty, "v": empty} for _ in self.m.layers]

    def feed(self, token: int) -> Tensor:
        """Feed one token; returns its logits [vocab] (float32)."""
        return self.run([token])[-1]

    @torch.no_grad()
    def run(self, tokens: list[int]) -> Tensor:
        """Feed consecutive tokens; returns the logits of each [n, vocab]."""
        x = self.embed(tokens)
        for i in range(len(self.layers)):
            x = self.layer(i, x, self.pos)
        self.pos += len(tokens)
        return self.head(x)

    def embed(self, tokens: list[int]) -> Tensor:
        cfg = self.m.cfg
        return self.m.embed_tokens(torch.tensor(tokens)) * (cfg.embed_scale * cfg.residual_scale)  # [n, hidden]

    def head(self, x: Tensor) -> Tensor:
        return self.m.lm_head(self.m.norm(x))

    @torch.no_grad()
    def layer(self, i: int, x: Tensor, start: int) -> Tensor:
        """Layer i over consecutive tokens x [n, hidden] at absolute positions start, start + 1, ...: the
        projections and the MLP take the rows together (each row alone is the same sum), attention one token at a
        time by the rule."""
        cfg, layer, store = self.m.cfg, self.m.layers[i], self.layers[i]
        sink, window, inv_freq, gain = self.geometry[i]
        n, h, kv, d = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        attn = layer.self_attn
        y = layer.input_layernorm(x)
        q, k, v = attn.q_proj(y).view(n, h, d), attn.k_proj(y).view(n, kv, d), attn.v_proj(y).view(n, kv, d)
        if cfg.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        outs = []
        cos_all, sin_all = _tables(sink + window, inv_freq, gain, x.dtype)  # rows for every cache position
        for j in range(n):
            store["pos"].append(start + j)
            store["k"] = torch.cat([store["k"], k[j, :, None]], dim=1)
            store["v"] = torch.cat([store["v"], v[j, :, None]], dim=1)
            self._evict(store, sink, window)
            held = len(store["pos"])
            keys, values, qj = store["k"], store["v"], q[j]  # [KV, held, D], [H, D]
            if attn.rope:  # the rule: positions inside the cache, 0..held-1 in age order
                cos, sin = cos_all[:held], sin_all[:held]
                keys = _rotate(keys, cos, sin)
                qj = _rotate(qj[:, None, :], cos[-1:], sin[-1:])[:, 0, :]
            qj = qj.view(kv, h // kv, d)  # query head i reads kv head i // (H / KV)
            scores = torch.einsum("kgd,knd->kgn", qj, keys) * attn.scale
            outs.append(torch.einsum("kgn,knd->kgd", torch.softmax(scores, dim=-1), values).reshape(h * d))
        out = attn.o_proj(torch.stack(outs))
        if layer.sandwich:
            x = x + layer.post_attention_layernorm(out)
            return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        x = x + out
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _evict(self, store: dict, sink: int, window: int) -> None:
        while len(store["pos"]) > sink + window:
            oldest = next(i for i, p in enumerate(store["pos"]) if p >= sink)
            del store["pos"][oldest]
            for key in ("k", "v"):
                store[key] = torch.cat([store[key][:, :oldest], store[key][:, oldest + 1 :]], dim=1)


class ReferenceRunner(Runner):
    def __init__(self, model, tokenizer, chunk: int = 1):
        self.ref = Reference(model)
        self.tokenizer, self.chunk, self.vocab_size = tokenizer, chunk, model.cfg.vocab_size
        self.token_dtype, self.manifest, self.pos = np.int64, None, 0

    def reset(self) -> None:
        super().reset()
        self.ref.reset()

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        return self.ref.run([int(t) for t in tokens[0]])[-1].numpy()


@torch.no_grad()
def streamed_logits(ckpt, sink: int, window: int, ids: list[int], rows: list[int], step=None) -> np.ndarray:
    """The reference's logits at `rows` of the stream `ids` [len(rows), vocab], float32, with one layer of the
    checkpoint in memory at a time (fp32): the embedding, then each layer over the whole stream, then the head.
    Layer i's outputs depend only on layer i - 1's, so this is `Reference.run(ids)` in another order; it is how
    `edgekv validate` checks a model whose float weights do not fit in memory."""
    from exporter.loaders import build_model

    def part(*prefixes: str) -> StreamingLM:
        return build_model(ckpt, sink, window, max_chunk=1, only=prefixes)

    with ckpt.opened():
        ref = Reference(part("embed_tokens."))
        x = ref.embed(ids)
        for i in range(len(ref.layers)):
            ref.m = part(f"layers.{i}.")
            x = ref.layer(i, x, 0)
            if step:
                step()  # progress
        ref.m = part("norm.", "lm_head.", *(("embed_tokens.",) if ckpt.config.tie_word_embeddings else ()))
        return ref.head(x[rows]).numpy()
