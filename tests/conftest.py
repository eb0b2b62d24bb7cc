"""Shared fixtures: tiny random Hugging Face checkpoints (seeded) and the real SmolLM2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# One thread per process wherever two processes share the two cores, so that no runtime's threads spin waiting
# for a core the other holds (that made some tests 7x slower): under two pytest workers, and in two_at_a_time.
ONE_THREAD = {var: "1" for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "EDGEKV_THREADS")}
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var, value in ONE_THREAD.items():
        os.environ.setdefault(var, value)

import torch  # noqa: E402  after OMP_NUM_THREADS: torch reads it once, at import

TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
RUNNABLE = ("executorch", "onnx", "openvino")  # the targets whose runtime runs on Linux
TARGETS = ("executorch", "coreml", "onnx", "openvino")  # slowest conversion first

# Grouped-query heads and head_dim != hidden / heads wherever the config allows it.
TINY = {
    "llama": dict(
        head_dim=16,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # Llama 3.2: tied embeddings and its llama3 rope (theta 500,000, factor 32), every frequency band in use.
    "llama3.2": dict(
        head_dim=16,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-linear": dict(head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral": dict(head_dim=16, sliding_window=24),
    "qwen2": dict(),  # Qwen2 derives head_dim from hidden / heads; it carries q/k/v biases
    "qwen3": dict(head_dim=16),  # q/k norms
    "phi3": dict(),  # fused qkv_proj / gate_up_proj
    "phi3-partial": dict(partial_rotary_factor=0.5),  # Phi-4-mini style: half of each head rotates
    "phi3-longrope": dict(
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + i / 8 for i in range(6)],
            "long_factor": [2.0 + i for i in range(6)],
        },
    ),
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2, tie_word_embeddings=True),  # layers 1, 3: no rotary
    # Two sliding layers around a global one; a 7-token local ring; the (1 + w) norms, sandwich norms, q/k norms;
    # one KV head, as Gemma 3 270M.
    "gemma3": dict(
        num_hidden_layers=3,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=7,
        query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True,
    ),
}
FAMILY_CLASSES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "smollm3": "SmolLM3",
    "gemma3": "Gemma3Text",
}


def make_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random checkpoint of `kind` (a TINY key) as a Hugging Face folder."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    family = kind.split("-")[0].removesuffix("3.2")
    cls = FAMILY_CLASSES[family]
    fields = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=None,
    )  # SmolLM3's default pad id is past a tiny vocab
    fields.update(TINY[kind])
    fields.update(overrides)
    config = getattr(transformers, cls + "Config")(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, ("Gemma3" if family == "gemma3" else cls) + "ForCausalLM")(config).eval()
    with torch.no_grad():  # random biases and norm weights, so one that is dropped shows up in the logits
        for name, p in model.named_parameters():
            if name.endswith(".bias") or (name.endswith("norm.weight") and family in ("qwen3", "gemma3")):
                p.normal_(0, 0.5) if name.endswith(".bias") else p.uniform_(-0.5, 0.5).add_(family != "gemma3")
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(fields["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def smollm2():
    from exporter.loaders import load_checkpoint

    return load_checkpoint()


@pytest.fixture(scope="session")
def smollm2_text_ids(smollm2):
    from runtimes.cli_ppl import read_text, read_tokens
    from runtimes.manifest import load_tokenizer

    return read_tokens(load_tokenizer(smollm2.tokenizer_dir), read_text(TEXT), 2000)


@pytest.fixture(scope="session")
def smol_artifacts(tmp_path_factory):
    """SmolLM2 exported to every target (fp32; Core ML fp16) with a small ring: S=4, W=60, chunk 16."""
    return kept_exports(tmp_path_factory, "smol", "--window", "60", "--chunk", "16")


def kept_exports(tmp_path_factory, name: str, *args: str) -> Path:
    """export_all into this session's tmp folder, or, when EDGEKV_TEST_ARTIFACTS names a folder (CI does), into
    that folder, reused by later sessions of the same run (the slow tier reuses the default tier's exports). A
    folder is reused only if its export finished with the same arguments; it never outlives the code: CI's is new."""
    keep = os.environ.get("EDGEKV_TEST_ARTIFACTS")
    if not keep:
        return export_all(tmp_path_factory.mktemp(name), *args)
    out, key = Path(keep) / name, json.dumps(args)
    done = out / "exported-with.json"
    if done.is_file() and done.read_text() == key:
        return out
    shutil.rmtree(out, ignore_errors=True)
    export_all(out, *args)
    done.write_text(key)
    return out


def export_all(out: Path, *args: str, schemes: tuple[str, ...] = ("none",)) -> Path:
    """`edgekv export` to every target with each scheme, one process per artifact (ExecuTorch's, the slowest,
    first)."""
    jobs = [(t, s) for t in TARGETS for s in schemes]
    runs = two_at_a_time([("export", "--target", t, "--quantize", s, *args, "--out", str(out)) for t, s in jobs])
    for (target, scheme), r in zip(jobs, runs, strict=True):
        assert r.returncode == 0, f"{target} {scheme}: {r.stderr[-2000:]}"
        assert only_edgekv_lines(r.stderr), f"{target} {scheme}: {r.stderr[-2000:]}"
    return out


STAGE_LINE = re.compile(r"\[(export|executorch|coreml|onnx|openvino) +\d+\.\ds\] \S")


def only_edgekv_lines(stderr: str) -> bool:
    """An export's stderr holds nothing but edgekv's own stage lines: the converters' output is captured."""
    return all(STAGE_LINE.match(line) for line in stderr.splitlines())


def two_at_a_time(commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess]:
    """edgekv commands, two processes at a time with one thread each: exports are mostly single-threaded Python,
    so two of them keep both cores busy."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: edgekv(*args, env=ONE_THREAD), commands))


def edgekv(
    *args: str, timeout: int = 3600, stdin: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process (with `env` added to the environment). The timeout only
    catches a hang: SmolLM2's ExecuTorch int4 export takes 7 minutes alone and twice that beside two others."""
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env={**os.environ, **(env or {})},
    )


def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edgekv: error:")]
    assert len(lines) == 1 and text in lines[0], r.stderr[-1500:]


# A chat template in the tiny tokenizer's own words (w0..w127), append-only like the real ones (the generation
# prompt is the assistant's header), so `edgekv chat` runs on a tiny export.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'w3' if m['role'] == 'assistant' else 'w1' }} {{ m['content'] }} w2 "
    "{% endfor %}{% if add_generation_prompt %}w3 {% endif %}"
)


def export_tiny_chat(
    tmp: Path, targets: tuple[str, ...], sink: int = 2, window: int = 6, chunk: int = 4, family: str = "llama"
) -> dict[str, Path]:
    """A tiny Llama (or `family`) with a chat template, exported in-process to each target (a few seconds each)."""
    from exporter.export import export_one, manifest_base
    from exporter.loaders import build_model, load_checkpoint

    hf = make_tiny(family, tmp / "hf", seed=11)
    (hf / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    ckpt = load_checkpoint(hf)
    model = build_model(ckpt, sink, window, max_chunk=chunk, last_logits_only=True)
    base = manifest_base(ckpt, sink, window, chunk)
    return {t: export_one(model, ckpt, t, tmp / t, base, chunk) for t in targets}


@pytest.fixture(scope="session")
def tiny_chat_exports(tmp_path_factory):
    """target -> export_tiny_chat's artifact, exported on first use (ExecuTorch's takes half a minute)."""

    class Lazy(dict):
        def __missing__(self, target):
            self[target] = export_tiny_chat(tmp_path_factory.mktemp(f"tiny-{target}"), (target,))[target]
            return self[target]

    return Lazy()


# Measurements a test reports (record_property("measured", text)), printed at the end of the run; xdist carries a
# test's user_properties back to the controller, so this works on any number of workers.
MEASURED: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        MEASURED.extend(value for key, value in report.user_properties if key == "measured")


def pytest_terminal_summary(terminalreporter):
    for line in MEASURED:
        terminalreporter.write_line(f"measured: {line}")
