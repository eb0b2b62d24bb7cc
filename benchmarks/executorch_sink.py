"""Head-to-head with ExecuTorch's own attention sink: the same weights, sink and window, the same text.

    python benchmarks/executorch_sink.py [--model M] [--sink 4] [--window 1020] [--tokens 2000] [--json FILE]
                                         [--against DIR --pte FILE [--qmode 8da4w]]

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

`--against DIR --pte FILE` adds speed and size: it exports that model to FILE as `export_llama --use_attention_sink
--use_sdpa_with_kv_cache -X --xnnpack-extended-ops` does (fp32: XNNPACK linears, the fused `llama::custom_sdpa` with
the sink's mask, `llama::update_cache_with_indices`), then times one-token decode calls through `executorch.runtime`
after `--after` tokens of stream, and the same through DIR, edgekv's ExecuTorch export of the same checkpoint and
cache (fp32: `edgekv export --target executorch`). `--qmode 8da4w` lowers ExecuTorch's model quantized as
`export_llama -qmode 8da4w -G 32 -E 4,32` does (the wheel's own transforms: int4 weights in groups of 32 with int8
dynamic activations, the embedding in 4 bits, groups of 32), to race against `edgekv export --target executorch
--quantize int4` (the same groups).
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


def quantize_like_export_llama(model: torch.nn.Module, qmode: str) -> torch.nn.Module:
    """`export_llama -qmode 8da4w -G 32 -E 4,32`'s source transforms, from the wheel, in its order (embedding first)."""
    if qmode == "none":
        return model
    from executorch.examples.models.llama.source_transformation.quantize import (
        get_quant_embedding_transform,
        get_quant_weight_transform,
    )

    model = get_quant_embedding_transform("4,32")(model)
    return get_quant_weight_transform(qmode, group_size=32)(model).eval()


def executorch_step(model):
    @torch.no_grad()
    def step(tokens: list[int], pos: int) -> torch.Tensor:
        out = model(tokens=torch.tensor([tokens]), attn_options={"input_pos": torch.tensor([pos])})
        out = out[0] if isinstance(out, tuple) else out
        return out[0] if out.dim() == 3 else out

    return step


def export_pte(model: torch.nn.Module, path: Path, chunk: int) -> None:
    """The wheel's attention-sink Llama to an XNNPACK .pte, as `export_llama` lowers it (`export_llama_lib.py`:
    the custom SDPA and KV cache in that order, `cache_positions` initialised in the program so that its empty
    slots read -1; `extension/llm/export/builder.py`: strict export under the MATH SDPA kernel, the redundant
    transposes removed, the linears converted). Changes `model` in place."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.examples.models.llama.source_transformation.custom_kv_cache import (
        replace_kv_cache_with_custom_kv_cache,
    )
    from executorch.examples.models.llama.source_transformation.sdpa import replace_sdpa_with_custom_op
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.extension.llm.export.export_passes import RemoveRedundantTransposes
    from torch.export import Dim, export
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = replace_sdpa_with_custom_op(model, use_attention_mask=True)
    model = replace_kv_cache_with_custom_kv_cache(model).to(torch.float32)
    example = (torch.tensor([[2, 3, 4]]), {"input_pos": torch.tensor([0])})
    dynamic = ({1: Dim("token_dim", max=chunk)}, {"input_pos": {0: 1}})
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        ep = export(model, example, dynamic_shapes=dynamic, strict=True).run_decompositions({})
        ep = export(RemoveRedundantTransposes()(ep.module()).graph_module, example, dynamic_shapes=dynamic, strict=True)
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
    ).transform([ConvertToLinearPass()])
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            passes=[InitializedMutableBufferPass(["cache_positions"])],
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    with open(path, "wb") as f:
        program.write_to_file(f)


def pte_step(path: Path):
    """One call of the exported program (its cache is the loaded method's state)."""
    import executorch.kernels.quantized  # noqa: F401  registers the quantized embedding kernels
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers the llama:: kernels
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def step(tokens: list[int], pos: int) -> torch.Tensor:
        return method.execute([torch.tensor([tokens]), torch.tensor([pos])])[0][0]

    return step


def decode_ms(step, stream: Stream, chunk: int, at: int, calls: int = 32) -> dict:
    """Median and p10-p90 ms of one-token calls from stream position `at` on, the stream fed in chunks up to it."""
    for a in range(0, at, chunk):
        step(stream.ids(a, min(a + chunk, at)), a)
    ms = []
    for i, tok in enumerate(stream.ids(at, at + calls + 4)):
        start = time.perf_counter()
        step([tok], at + i)
        ms.append(1e3 * (time.perf_counter() - start))
    ms = np.array(ms[4:])  # the first calls warm the decode path
    return {"at": at, "ms_median": float(np.median(ms)), "ms_p10_p90": np.percentile(ms, [10, 90]).tolist()}


def speed(args, ckpt, stream: Stream) -> dict:
    from runtimes import open_artifact
    from runtimes.manifest import read_manifest

    m = read_manifest(args.against)
    scheme = {"none": "none", "8da4w": "int4"}[args.qmode]
    want = ("executorch", args.sink, args.window, scheme)
    if (m["target"], m["sink"], m["window"], m["quantization"]["scheme"]) != want:
        raise SystemExit(
            f"--against {args.against}: want an ExecuTorch export at S={args.sink} W={args.window} with "
            f"--quantize {scheme} (for --qmode {args.qmode})"
        )

    def model() -> torch.nn.Module:
        return quantize_like_export_llama(executorch_sink_model(ckpt, args.sink, args.window, args.chunk), args.qmode)

    start = time.perf_counter()
    export_pte(model(), args.pte, args.chunk)
    print(f"exported {args.pte} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    eager = executorch_step(model())
    lowered = same_below_the_ring(eager, pte_step(args.pte), args, ckpt.config.vocab_size)
    print(f"the .pte against its eager model: {lowered:.1e} of the logits' scale", file=sys.stderr)
    runner = open_artifact(args.against)
    ours = decode_ms(lambda tokens, pos: runner.feed(tokens), stream, args.chunk, args.after)
    theirs = decode_ms(pte_step(args.pte), stream, args.chunk, args.after)
    size = sum(f.stat().st_size for f in Path(args.against).iterdir() if f.suffix == ".pte")
    return {
        "qmode": args.qmode,
        "edgekv": {**ours, "pte_mb": size / 1e6},
        "executorch_sink": {**theirs, "pte_mb": args.pte.stat().st_size / 1e6, "vs_eager_rel_diff": lowered},
    }


def edgekv_step(ckpt, sink: int, window: int, chunk: int):
    model = build_model(ckpt, sink, window, max_chunk=chunk)

    @torch.no_grad()
    def step(tokens: list[int], pos: int) -> torch.Tensor:
        return model(torch.tensor([tokens]), torch.tensor([pos]))[0]

    return step


def same_below_the_ring(ours, theirs, args, vocab: int) -> float:
    """Before any eviction both caches are the dense model: the largest logit difference over the whole chunks of
    random tokens that fit in S + W slots, as a fraction of the logits' scale (the weights went where they belong)."""
    chunk = args.chunk
    n = (args.sink + args.window) // chunk * chunk
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
    p.add_argument(
        "--against", type=Path, help="edgekv's ExecuTorch export of the same model, to race (int4 with --qmode 8da4w)"
    )
    p.add_argument("--pte", type=Path, help="where to write ExecuTorch's sink model as a .pte (with --against)")
    p.add_argument(
        "--qmode",
        choices=["none", "8da4w"],
        default="none",
        help="ExecuTorch's model as fp32 (default) or as export_llama's -qmode 8da4w -G 32 -E 4,32 (with --against)",
    )
    p.add_argument("--skip-ppl", action="store_true", help="only the speed and size (with --against)")
    args = p.parse_args()
    if bool(args.against) != bool(args.pte):
        raise SystemExit("--against and --pte go together")
    ckpt = load_checkpoint(args.model)
    stream = Stream(load_tokenizer(ckpt.tokenizer_dir), read_text(args.text))
    result = {"sink": args.sink, "window": args.window, "tokens": args.tokens, "after": args.after}
    makers = {  # fresh models for each use: their caches are state
        "edgekv": lambda: edgekv_step(ckpt, args.sink, args.window, args.chunk),
        "executorch_sink": lambda: executorch_step(executorch_sink_model(ckpt, args.sink, args.window, args.chunk)),
    }
    diff = same_below_the_ring(*(make() for make in makers.values()), args, ckpt.config.vocab_size)
    result["below_the_ring_rel_diff"] = diff
    if diff > 1e-4:
        raise SystemExit(f"the two models differ before any eviction ({diff:.1e} of the logits' scale)")
    for name, make in makers.items() if not args.skip_ppl else ():
        step = make()
        result[name] = scored(step, stream, args.chunk, args.tokens, args.after, name)
        print(name, json.dumps(result[name]), file=sys.stderr)
    if args.against:
        result["speed"] = speed(args, ckpt, stream)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
