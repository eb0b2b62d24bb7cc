"""Model configuration: the few Hugging Face config fields the export model needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from runtimes.errors import EdgekvError, EdgekvWarning

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; edgekv supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu is implemented")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {rope_type!r}; edgekv supports {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope["rope_type"] = rope_type
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial rotary embeddings are not supported")
        heads = hf["num_attention_heads"]
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry the field but only use it when this flag is set
        bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bias,
            o_bias=bias and model_type != "qwen2",
            sliding_window=window,
        )

    def inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies (float64), with the config's scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        kind = self.rope_scaling["rope_type"]
        if kind == "linear":
            return inv / self.rope_scaling["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv, self.rope_scaling)
        return inv


def _llama3_inv_freq(inv: torch.Tensor, p: dict) -> torch.Tensor:
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def cache_sizes(cfg: ModelConfig, sink: int | None, window: int | None, allow_long: bool = False) -> tuple[int, int]:
    """Resolve `--sink`/`--window` defaults and refuse a cache longer than the trained context."""
    import warnings

    sink = 4 if sink is None else sink
    if window is None:
        window = min(1020, cfg.sliding_window) if cfg.sliding_window else 1020
        window = min(window, cfg.max_position_embeddings - sink)
    if sink < 0 or window < 1:
        raise ConfigError(f"need --sink >= 0 and --window >= 1, got sink={sink} window={window}")
    if sink + window > cfg.max_position_embeddings:
        msg = (
            f"sink + window = {sink + window} exceeds the model's trained context "
            f"({cfg.max_position_embeddings} tokens)"
        )
        if not allow_long:
            raise ConfigError(msg + "; lower --window or pass --allow-long-context")
        warnings.warn(msg + "; rotary positions past the trained context may degrade quality", EdgekvWarning,
                      stacklevel=2)
    return sink, window
