"""Head-to-head with ExecuTorch's own attention sink: the same weights, sink and window, the same text.

    python benchmarks/executorch_sink.py [--model M] [--sink 4] [--window 1020] [--tokens 2000] [--json FILE]

ExecuTorch 1.5.1's wheel carries its Llama example's attention sink
(`executorch/examples/models/llama/source_transformation/attention_sink.py`, `export_llama --use_attention_sink`).
Its cache holds S + 2W slots: the sinks, then a ring of 2W written at `S + (p - S) mod 2W`; each key is rotated
once, when written, at that ring index, and the query at its own; the mask lets a query see the sinks and the last
W positions. So relative distances are exact only while query and key sit in the same lap of the ring: a key
written before the ring wrapped is read with a rotary distance off by 2W. edgekv's cache holds S + W slots with
positions inside the cache (StreamingLLM's rule): distances are the cache's, every lap alike.

This script builds that model from ExecuTorch's own code (`construct_transformer`, `enable_attention_sink`) with
the checkpoint's weights (Hugging Face rotary layout, `use_hf_rope`) and scores the text with it and with edgekv's
reference, both eager fp32, chunk by chunk: perplexity over the first `--tokens` and over the same number after
`--after` tokens of stream (many wraps). Llama-architecture checkpoints only (SmolLM2, Llama): the example's
Transformer has no qk-norm, sandwich norms or hybrid layers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.forever import TEXT, Stream  # noqa: E402
from exporter.loaders import build_model, load_checkpoint  # noqa: E402
from runtimes.cli_ppl import read_text, stream_nll  # noqa: E402
from runtimes.manifest import load_tokenizer  # noqa: E402

# Hugging Face names (edgekv's model) -> the example Transformer's.
RENAMES = {
    "embed_tokens": "tok_embeddings",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "lm_head": "output",
}


def executorch_sink_model(ckpt, sink: int, window: int, chunk: int) -> torch.nn.Module:
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs
    from executorch.examples.models.llama.source_transformation.attention_sink import enable_attention_sink

    cfg = ckpt.config
    if cfg.model_type not in ("llama", "mistral") or cfg.qkv_bias or cfg.rope_scaling.get("rope_type") != "default":
        raise SystemExit(f"{cfg.model_type}: ExecuTorch's example Transformer is built here for plain Llama only")
    args = ModelArgs(
        dim=cfg.hidden_size,
        n_layers=cfg.num_layers,
        n_heads=cfg.num_heads,
        n_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_dim=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        norm_eps=cfg.rms_norm_eps,
        rope_freq_base=cfg.rope_theta,
        use_hf_rope=True,
        generate_full_logits=True,  # every position's logits, to score them
        max_batch_size=1,
        max_seq_len=chunk,
        max_context_len=sink + 2 * window,  # the rotary table must reach ring index S + 2W - 1
        use_kv_cache=True,
        enable_dynamic_shape=True,
    )
    model = enable_attention_sink(construct_transformer(args), params=args, sink_size=sink, window_size=window)
    ours = build_model(ckpt, sink, window, max_chunk=1).state_dict()
    weights = {}
    for name, tensor in ours.items():
        for old, new in RENAMES.items():
            name = name.replace(old, new)
        weights[name] = tensor
    if "output.weight" not in weights:  # tied
        weights["output.weight"] = weights["tok_embeddings.weight"]
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.endswith(("k_cache", "v_cache", "cache_positions"))]
    missing = [k for k in missing if "freqs" not in k and "mask" not in k]
    if missing:
        raise SystemExit(f"weights the example Transformer wants and the checkpoint lacks: {missing[:5]}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return model.eval()


def executorch_step(model):
    @torch.no_grad()
    def step(tokens: list[int], pos: int) -> torch.Tensor:
        out = model(tokens=torch.tensor([tokens]), attn_options={"input_pos": torch.tensor([pos])})
        out = out[0] if isinstance(out, tuple) else out
        return out[0] if out.dim() == 3 else out

    return step


def edgekv_step(ckpt, sink: int, window: int, chunk: int):
    model = build_model(ckpt, sink, window, max_chunk=chunk)

    @torch.no_grad()
    def step(tokens: list[int], pos: int) -> torch.Tensor:
        return model(torch.tensor([tokens]), torch.tensor([pos]))[0]

    return step


def same_below_the_ring(ours, theirs, n: int, chunk: int, vocab: int) -> float:
    """Before any eviction both caches are the dense model: the largest logit difference over n random tokens, as a
    fraction of the logits' scale (checks that the weights went where they belong)."""
    ids = np.random.default_rng(0).integers(0, vocab, n).tolist()
    worst, scale = 0.0, 0.0
    for a in range(0, n, chunk):
        x, y = ours(ids[a : a + chunk], a).numpy(), theirs(ids[a : a + chunk], a).numpy()
        worst, scale = max(worst, float(np.abs(x - y).max())), max(scale, float(np.abs(x).max()))
    return worst / scale


def scored(step, stream: Stream, chunk: int, tokens: int, after: int, label: str) -> dict:
    """Perplexity of the first `tokens` predictions, then of `tokens` predictions from position `after` on (the
    stream between fed in chunks, logits unused)."""
    start = time.perf_counter()
    first = stream_nll(step, stream.ids(0, tokens), chunk, f"{label} first")
    pos = tokens
    for a in range(pos, after, chunk):  # chunk-aligned, as the prefill entry would feed it
        step(stream.ids(a, min(a + chunk, after)), a)
    ids = stream.ids(after, after + tokens)
    nll = np.empty(len(ids) - 1)
    for i in range(0, len(ids) - 1, chunk):
        part = ids[i : i + chunk]
        logits = np.asarray(step(part, after + i), dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for j in range(len(part)):
            if i + j + 1 < len(ids):
                nll[i + j] = -logp[j, ids[i + j + 1]]
    return {
        "ppl_first": math.exp(float(first.mean())),
        "ppl_after": math.exp(float(nll.mean())),
        "seconds": time.perf_counter() - start,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the embedded SmolLM2-135M)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--tokens", type=int, default=2000, help="predictions scored at each place (default 2,000)")
    p.add_argument("--after", type=int, default=20_000, help="the second place, in tokens of stream (20,000)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ckpt = load_checkpoint(args.model)
    stream = Stream(load_tokenizer(ckpt.tokenizer_dir), read_text(args.text))
    result = {"sink": args.sink, "window": args.window, "tokens": args.tokens, "after": args.after}
    makers = {  # fresh models for each use: their caches are state
        "edgekv": lambda: edgekv_step(ckpt, args.sink, args.window, args.chunk),
        "executorch_sink": lambda: executorch_step(executorch_sink_model(ckpt, args.sink, args.window, args.chunk)),
    }
    n = (args.sink + args.window) // args.chunk * args.chunk
    diff = same_below_the_ring(*(make() for make in makers.values()), n, args.chunk, ckpt.config.vocab_size)
    result["below_the_ring_rel_diff"] = diff
    if diff > 1e-4:
        raise SystemExit(f"the two models differ before any eviction ({diff:.1e} of the logits' scale)")
    for name, make in makers.items():
        step = make()
        result[name] = scored(step, stream, args.chunk, args.tokens, args.after, name)
        print(name, json.dumps(result[name]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
