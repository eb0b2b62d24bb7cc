"""Model configuration: the few Hugging Face config fields the export model needs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from runtimes.errors import EdgekvError, EdgekvWarning
from runtimes.slots import DEFAULT_SINK, DEFAULT_WINDOW

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FULL, SLIDING = "full_attention", "sliding_attention"


class ConfigError(EdgekvError):
    """A checkpoint or option the export model cannot honour; the message says what to do."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None  # every layer's window (Mistral): caps the ring's W
    # What sets the families apart (README.md, "Supported models"); the defaults are Llama's.
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys, before rotary (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # a norm after attention and after the MLP too (Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1); folded into the weights at load
    attn_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden), rounded to fp32 as transformers does)
    rotary_dim: int | None = None  # partial rotary: the first rotary_dim dims of a head rotate (Phi-3); None: all
    rope_layers: tuple[bool, ...] = ()  # False where a layer has no rotary at all (SmolLM3); empty: every layer
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer; SLIDING layers of a hybrid model keep a plain ring
    local_window: int | None = None  # that ring's size, the model's own sliding window (Gemma 3)
    local_rope: dict = field(default_factory=dict)  # rotary of the sliding layers (Gemma 3: theta 10,000)
    residual_scale: float = 1.0  # the residual stream is carried times this (a power of 2: exact); see model.py

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 layout). Every number that sizes
        something is checked first; anything else malformed is still one line naming config.json, never a
        traceback (tests/test_inputs.py fuzzes it)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json holds a {type(hf).__name__}, not an object of fields")
        model_type = hf.get("model_type")
        if model_type == "gemma3":
            raise ConfigError(
                "this is a multimodal Gemma 3 checkpoint; export its text model (model_type "
                "gemma3_text, e.g. Gemma 3 270M or 1B)"
            )
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; edgekv supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        check_sizes(hf)
        try:
            cfg = cls._from_hf(hf)
            # The rotary tables from these fields, now: a missing factor is a line naming it, not a crash at build.
            for local in (False, True) if cfg.local_window else (False,):
                if not (torch.isfinite(cfg.inv_freq(local)).all() and math.isfinite(cfg.rope_gain(local))):
                    raise ConfigError("config.json: its rotary parameters give non-finite frequencies")
        except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError, RuntimeError) as e:
            what = f"has no field {e}" if isinstance(e, KeyError) else f"has a malformed field ({e})"
            raise ConfigError(f"config.json {what}; fix it or re-download the checkpoint") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads {cfg.num_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_kv_heads}"
            )
        return cfg

    @classmethod
    def _from_hf(cls, hf: dict) -> ModelConfig:
        model_type = hf["model_type"]  # checked by from_hf
        gemma = model_type == "gemma3_text"
        act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"unsupported activation {act!r}; edgekv implements {', '.join(ACTIVATIONS)}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        n = hf["num_hidden_layers"]
        global_rope, local_rope = _rope_parameters(hf, gemma)
        partial = float(global_rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        if not 0 < partial <= 1:
            raise ConfigError(f"config.json: partial_rotary_factor {partial} is not in (0, 1]")
        rotary_dim = int(head_dim * partial)
        if rotary_dim % 2 or rotary_dim < 2:
            raise ConfigError(f"partial_rotary_factor {partial} gives {rotary_dim} rotary dims; need an even number")
        if global_rope["rope_type"] == "longrope":
            global_rope["original_max_position_embeddings"] = hf.get(
                "original_max_position_embeddings", global_rope.get("original_max_position_embeddings")
            )
            global_rope.setdefault("max_position_embeddings", hf.get("max_position_embeddings", 2048))
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
            window = None  # these configs carry the field but only use it when this flag is set
        types = tuple(hf.get("layer_types") or ())
        if gemma and not types:  # transformers 4 configs and GGUF: five sliding layers, then a global one
            pattern = hf.get("sliding_window_pattern", 6)
            types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
        if len(types) not in (0, n) or set(types) - {FULL, SLIDING}:
            raise ConfigError(f"layer_types {list(types)} does not give {n} layers of {FULL} / {SLIDING}")
        hybrid = window is not None and FULL in types and SLIDING in types
        no_rope = hf.get("no_rope_layers")
        if model_type == "smollm3" and no_rope is None:
            every = hf.get("no_rope_layer_interval", 4)
            no_rope = [int((i + 1) % every != 0) for i in range(n)]
        bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(global_rope.pop("rope_theta")),
            rope_scaling=global_rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma or model_type == "smollm3")),
            qkv_bias=model_type == "qwen2" or bias,
            o_bias=bias and model_type != "qwen2",
            sliding_window=None if hybrid else window,
            hidden_act=act,
            qk_norm=gemma or model_type == "qwen3",
            sandwich_norm=gemma,
            norm_offset=1.0 if gemma else 0.0,
            attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            embed_scale=float(torch.tensor(hf["hidden_size"] ** 0.5, dtype=torch.float32)) if gemma else 1.0,
            rotary_dim=None if rotary_dim == head_dim else rotary_dim,
            rope_layers=tuple(bool(x) for x in no_rope) if no_rope is not None else (),
            layer_types=types if hybrid else (),
            local_window=window if hybrid else None,
            local_rope=local_rope if hybrid else {},
            # Gemma 3's residual stream passes fp16's 65,504 (about 1e5 around layers 13-15); carried at 1/8 it
            # stays in range for Core ML, exactly (model.py).
            residual_scale=0.125 if gemma else 1.0,
        )

    @property
    def trained_context(self) -> int:
        """Longest context the rotary tables here were trained for (longrope's short factors: its original one)."""
        if self.rope_scaling.get("rope_type") == "longrope":
            return self.rope_scaling["original_max_position_embeddings"]
        return self.max_position_embeddings

    def is_local(self, layer: int) -> bool:
        """Is this a sliding layer of a hybrid model, with its own plain ring of `local_window` slots?"""
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    def has_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def inv_freq(self, local: bool = False) -> torch.Tensor:
        """Rotary inverse frequencies (float64) of global or sliding layers, with the config's scaling applied."""
        d = self.rope_dim
        rope = self.local_rope if local else {**self.rope_scaling, "rope_theta": self.rope_theta}
        inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        kind = rope["rope_type"]
        if kind == "linear":
            return inv / rope["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv, rope)
        if kind == "longrope":  # the short factors: every rotary row of the cache is below the original context
            return inv / torch.tensor(rope["short_factor"], dtype=torch.float64)
        return inv

    def rope_gain(self, local: bool = False) -> float:
        """The factor longrope multiplies cos and sin by (1 otherwise)."""
        rope = self.local_rope if local else self.rope_scaling
        if rope.get("rope_type") != "longrope":
            return 1.0
        if rope.get("attention_factor") is not None:
            return float(rope["attention_factor"])
        old = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or rope["max_position_embeddings"] / old
        return math.sqrt(1 + math.log(factor) / math.log(old)) if factor > 1 else 1.0


# Fields that size tensors or tables: (required, upper bound). A bound far above any real model's keeps an
# allocation from ever being sized by an unchecked number; the weights' shapes are checked against them next.
SIZE_FIELDS = {
    "vocab_size": (True, 1 << 24),
    "hidden_size": (True, 1 << 16),
    "intermediate_size": (True, 1 << 18),
    "num_hidden_layers": (True, 1024),
    "num_attention_heads": (True, 1024),
    "num_key_value_heads": (False, 1024),
    "head_dim": (False, 4096),
    "max_position_embeddings": (False, 1 << 24),
    "sliding_window": (False, 1 << 24),
    "original_max_position_embeddings": (False, 1 << 24),
    "query_pre_attn_scalar": (False, 1 << 16),
}


def check_sizes(hf: dict) -> None:
    """Each size field is a positive integer within its bound (None where optional)."""
    for key, (required, bound) in SIZE_FIELDS.items():
        value = hf.get(key)
        if value is None and not required:
            continue
        if value is None:
            raise ConfigError(f"config.json has no {key}; is this a decoder LLM's config?")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bound:
            raise ConfigError(f"config.json: {key} = {value!r} is not an integer in 1..{bound}")


def _rope_parameters(hf: dict, gemma: bool) -> tuple[dict, dict]:
    """(global, sliding-layer) rotary parameters with rope_theta and rope_type, from either config layout:
    transformers 5 folds rope_theta and rope_scaling into rope_parameters, nested per layer type for Gemma 3."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if FULL in rope:
        glob, local = dict(rope[FULL]), dict(rope.get(SLIDING) or {})
    else:
        glob, local = rope, {}
    glob.setdefault("rope_theta", hf.get("rope_theta", 1e6 if gemma else 10000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    for r in (glob, local):
        r["rope_type"] = r.get("rope_type", r.get("type", "default"))
        r.pop("type", None)
        if r["rope_type"] in ("su", "yarn") and hf.get("model_type") == "phi3":
            r["rope_type"] = "longrope"
        if r["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {r['rope_type']!r}; edgekv supports {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        r["rope_theta"] = float(r["rope_theta"])
    return glob, local


def _llama3_inv_freq(inv: torch.Tensor, p: dict) -> torch.Tensor:
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def physical_memory() -> int:
    """Bytes of RAM (POSIX; a large number where unknown, so that nothing is refused on a guess)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def cache_sizes(cfg: ModelConfig, sink: int | None, window: int | None, allow_long: bool = False) -> tuple[int, int]:
    """Resolve `--sink`/`--window` defaults and refuse a cache longer than the trained context."""
    import warnings

    sink = DEFAULT_SINK if sink is None else sink
    if window is None:
        window = min(DEFAULT_WINDOW, cfg.sliding_window or DEFAULT_WINDOW)
        window = min(window, cfg.trained_context - sink)
    if sink < 0 or window < 1:
        raise ConfigError(f"need --sink >= 0 and --window >= 1, got sink={sink} window={window}")
    slots = max(sink + window, cfg.local_window or 0)
    cache = 2 * cfg.num_layers * cfg.num_kv_heads * slots * cfg.head_dim * 4
    if cache > physical_memory():  # checked before anything is allocated: a typo'd --window is one line, not a crash
        raise ConfigError(
            f"a {slots}-slot cache takes {cache / 1e9:.1f} GB, more than this machine's "
            f"{physical_memory() / 1e9:.1f} GB of memory; lower --window"
        )
    if sink + window > cfg.trained_context:
        msg = f"sink + window = {sink + window} exceeds the model's trained context ({cfg.trained_context} tokens)"
        if not allow_long:
            raise ConfigError(msg + "; lower --window or pass --allow-long-context")
        warnings.warn(
            msg + "; rotary positions past the trained context may degrade quality", EdgekvWarning, stacklevel=2
        )
    return sink, window
