"""The export model against Hugging Face transformers (p < S + W) and the reference (many wraps)."""

from pathlib import Path

import pytest
import torch

from exporter.config import ConfigError, cache_sizes
from exporter.loaders import build_model, load_checkpoint
from exporter.reference import Reference, streamed_logits
from tests.conftest import TINY, make_tiny


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def feed(model, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """All logits for a stream fed in chunks of `chunk` (the last one may be shorter)."""
    model.reset()
    out = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1], chunk):
            out.append(model(tokens[:, s : s + chunk], torch.tensor([s]))[0])
    return torch.cat(out)


@pytest.mark.parametrize("kind", list(TINY))
def test_matches_transformers_before_the_ring_fills(kind, tmp_path):
    # Mistral's own sliding window would mask tokens here; widen it (the next test covers it).
    folder = make_tiny(kind, tmp_path, **({"sliding_window": 128} if kind == "mistral" else {}))
    ckpt = load_checkpoint(folder)
    model = build_model(ckpt, sink=4, window=60, max_chunk=64)
    tokens = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    want = hf_logits(folder, tokens)
    assert rel_err(feed(model, tokens, 64), want) < 1e-4
    assert rel_err(feed(model, tokens, 1), want) < 1e-4


def test_window_mode_equals_mistral_sliding_window_at_every_position(tmp_path):
    """S = 0, W = sliding_window is Mistral's own attention: relative rotary distances agree."""
    folder = make_tiny("mistral", tmp_path)
    model = build_model(load_checkpoint(folder), sink=0, window=24, max_chunk=16)
    tokens = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    assert rel_err(feed(model, tokens, 16), hf_logits(folder, tokens)) < 1e-4


def test_family_configs_are_read_as_transformers_defines_them(tmp_path):
    """What each family's config turns on (the logits tests above check that each is computed right)."""
    cfgs = {k: load_checkpoint(make_tiny(k, tmp_path / k)).config for k in ("gemma3", "smollm3", "phi3-partial")}
    g = cfgs["gemma3"]
    assert (g.local_window, g.sliding_window, [g.is_local(i) for i in range(3)]) == (7, None, [True, False, True])
    assert (g.rope_theta, g.local_rope["rope_theta"], g.norm_offset, g.hidden_act) == (
        1e6,
        1e4,
        1.0,
        "gelu_pytorch_tanh",
    )
    assert g.attn_scale == 12**-0.5 and g.embed_scale == pytest.approx(48**0.5) and g.residual_scale == 0.125
    assert [cfgs["smollm3"].has_rope(i) for i in range(4)] == [True, False, True, False]
    assert cfgs["phi3-partial"].rope_dim == 6 and cfgs["phi3-partial"].head_dim == 12


def test_gemma3_hybrid_cache_layout(tmp_path):
    """The stacked cache has max(S + W, local window) slots a layer; a layer reads only its own S + W of them (its
    own buffer when split per layer); a local layer writes token p to slot p mod 7 whatever S is."""
    model = build_model(load_checkpoint(make_tiny("gemma3", tmp_path)), sink=2, window=3, max_chunk=16)
    assert model.kv_cache.shape[3] == 7 and model.geometry == {"global": (2, 3), "local": (0, 7)}
    own = [7, 5, 7] * 2  # keys of layers 0-2 (local, global, local), then values
    assert [c.shape[1] for c in model.caches()] == [c.shape[1] for c in model.per_layer_cache().caches()] == own
    ctx = model.context(1, torch.tensor([0]))
    assert (ctx["global"]["bias"].shape, ctx["local"]["bias"].shape) == ((1, 5 + 1), (1, 7 + 1))
    tokens = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    feed(model, tokens, 16)
    written = model.kv_cache[0].abs().sum(dim=(1, 3)) > 0  # [layer, slot]
    assert written.tolist() == [[True] * 7, [True] * 5 + [False] * 2, [True] * 7]


def test_smollm2_matches_transformers(smollm2, smollm2_text_ids):
    from transformers import AutoModelForCausalLM

    path = smollm2.files[0]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.tensor([smollm2_text_ids[:96]])
    with torch.no_grad():
        want = hf(tokens).logits[0]
    model = build_model(smollm2, sink=4, window=92, max_chunk=32)
    assert rel_err(feed(model, tokens, 32), want) < 1e-4


# (2, 12): Gemma's global ring (14 slots) wider than its 7-slot local one; (0, 5): narrower.
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "phi3-partial", "smollm3", "gemma3"])
@pytest.mark.parametrize("sink,window", [(4, 7), (0, 5), (1, 6), (2, 12)])
@pytest.mark.parametrize("write", ["slots", "coreml", "per-layer"])
def test_matches_reference_over_several_wraps(kind, sink, window, write, tmp_path):
    """Every cache write: slots in place (eager), Core ML's (a token's slot as a slice, chunks as a whole-cache
    blend), per-layer buffers (ExecuTorch)."""
    ckpt = load_checkpoint(make_tiny(kind, tmp_path))
    model = build_model(ckpt, sink, window, max_chunk=16)
    model.cache_write = "coreml" if write == "coreml" else "slots"
    if write == "per-layer":
        model = model.per_layer_cache()
        assert "kv_cache" not in dict(model.named_buffers()) and len(model.caches()) == 2 * ckpt.config.num_layers
    # three full wraps of the ring and a bit, and at least four laps of a 7-slot local ring
    n = max(sink + 3 * window + 5, 4 * (ckpt.config.local_window or 0) + 3)
    tokens = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(2))
    ref = Reference(model)
    want = torch.stack([ref.feed(int(t)) for t in tokens[0]])
    # one at a time; chunks that straddle wraps; a chunk longer than W; the largest chunk
    for chunk in (1, 3, min(window + 2, 16), 16):
        assert rel_err(feed(model, tokens, chunk), want) < 1e-5, chunk


@pytest.mark.parametrize("kind", ["llama3.2", "mistral", "phi3-partial", "gemma3"])
def test_reference_a_layer_at_a_time_equals_the_reference(kind, tmp_path):
    """`validate`'s reference for big models (exporter.reference.streamed_logits: one layer of the checkpoint in
    memory, over the whole stream) gives the logits of feeding the whole model one token at a time: tied and untied
    tables, Phi-3's fused projections, Gemma's hybrid layers, each over several wraps."""
    ckpt = load_checkpoint(make_tiny(kind, tmp_path))
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = Reference(build_model(ckpt, 2, 6))
    want = torch.stack([ref.feed(t) for t in ids])
    rows = [0, 7, 8, 20, 39]
    got = torch.from_numpy(streamed_logits(ckpt, 2, 6, ids, rows))
    assert got.shape == (5, 128) and rel_err(got, want[rows]) < 1e-5


def test_smollm2_matches_reference_past_the_ring(smollm2, smollm2_text_ids):
    model = build_model(smollm2, sink=4, window=28, max_chunk=40)
    tokens = torch.tensor([smollm2_text_ids[:110]])  # three wraps of a 28-slot ring
    ref = Reference(model)
    want = torch.stack([ref.feed(int(t)) for t in tokens[0]])
    assert rel_err(feed(model, tokens, 40), want) < 1e-4
    assert (feed(model, tokens, 1).argmax(-1) == want.argmax(-1)).all()


def test_window_defaults_and_limits(tmp_path):
    cfg = load_checkpoint(make_tiny("mistral", tmp_path)).config
    assert cfg.sliding_window == 24
    assert cache_sizes(cfg, None, None) == (4, 24)  # the model's own smaller window
    with pytest.raises(ConfigError, match="exceeds the model's trained context"):
        cache_sizes(cfg, 4, 300)
    with pytest.warns(UserWarning, match="trained context"):
        assert cache_sizes(cfg, 4, 300, allow_long=True) == (4, 300)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    folder = make_tiny("llama", tmp_path)
    cfg = (folder / "config.json").read_text().replace('"llama"', '"gpt2"')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(ConfigError, match="supports llama, mistral, qwen2"):
        load_checkpoint(folder)
