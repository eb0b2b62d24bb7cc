"""`edgekv export`: trace the one export model for each target into a self-describing folder."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from exporter.config import cache_sizes
from exporter.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, NONE, SCHEMES, Quantization, check_quantization
from exporter.targets import TARGETS, ExportSpec, Packer, pack_model, target_module
from runtimes.cli_ppl import read_text
from runtimes.errors import EdgekvError
from runtimes.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILES,
    edgekv_version,
    file_digest,
    identity,
    load_tokenizer,
    special_tokens,
)
from runtimes.progress import Progress, captured
from runtimes.slots import DEFAULT_SINK, DEFAULT_WINDOW
from runtimes.stopping import remove_stale

DEFAULT_CHUNK = 64
PREFIX = "prefix.safetensors"  # the initial session of an artifact exported with --system-prompt


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, choices=[*TARGETS, "all"], help="format to export to")
    p.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--sink", type=int, help=f"sink slots S (default {DEFAULT_SINK})")
    p.add_argument(
        "--window", type=int, help=f"window slots W (default {DEFAULT_WINDOW} or the model's sliding_window)"
    )
    p.add_argument(
        "--chunk", type=int, default=DEFAULT_CHUNK, help=f"tokens per prefill call (default {DEFAULT_CHUNK})"
    )
    p.add_argument(
        "--quantize",
        choices=SCHEMES,
        default="none",
        help="weight quantization, each weight as it is read (default none: fp32, Core ML fp16)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=DEFAULT_GROUP_SIZE,
        help=f"input channels per weight scale (default {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        help="artifacts go to OUT/<target>/, or OUT/<target>-<scheme>/ when quantized (default ./out)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--allow-long-context", action="store_true", help="allow S + W beyond the trained context")
    p.add_argument(
        "--system-prompt",
        type=Path,
        metavar="FILE",
        help="pin this system prompt: rendered with the chat template, held in the sink (sized to it) "
        "and shipped as the artifact's initial session, prefix.safetensors",
    )


def return_freed_memory() -> None:
    """glibc raises its mmap threshold after each big free (up to 32 MB); from then on a layer's float temporaries
    come from the heap, between the quantized tensors that outlive them, and are never given back (one thread's
    int4 ONNX export of 16 layers took 1.7x the memory of 4 layers'). A fixed threshold keeps big buffers mapped,
    returned as they are freed."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MB
        except OSError:  # not glibc
            pass


def main(args: argparse.Namespace) -> int:
    return_freed_memory()
    targets = list(TARGETS) if args.target == "all" else [args.target]
    quant = Quantization(args.quantize, args.group_size)
    folders = {t: args.out / (t if quant.scheme == "none" else f"{t}-{quant.scheme}") for t in targets}
    log = Progress("export")
    log(f"exporting {args.model or 'the embedded SmolLM2-135M'} to {', '.join(map(str, folders.values()))}")
    # Everything a user passed is checked before the model loads: a mistake costs a second, not an export.
    if args.chunk < 1:
        raise EdgekvError(f"--chunk must be >= 1, got {args.chunk}")
    check_output(args.out)
    for folder in folders.values():
        if folder.exists() and not folder.is_dir():
            raise EdgekvError(f"{folder} is a file, not an artifact folder; remove it or choose another --out")
        if folder.exists() and not args.force:
            raise EdgekvError(f"{folder} exists; pass --force to replace it or choose another --out")
    system = read_text(args.system_prompt, "--system-prompt").strip() if args.system_prompt else None
    if args.system_prompt and not system:
        raise EdgekvError(f"--system-prompt {args.system_prompt} is empty")

    # Folders this command creates for OUT, deepest first: removed again (when empty) if it fails or is interrupted.
    # Artifacts already finished by `--target all` stay: each is whole.
    created = [d for d in (args.out, *args.out.parents) if not d.exists()]
    written = []
    try:
        with captured():
            from exporter.loaders import build_model, load_checkpoint

            ckpt = load_checkpoint(args.model)
            prefix = pinned_prompt(system, ckpt.tokenizer_dir) if system else None
            # A pinned prompt fills the sink: its first tokens are the attention sinks, the rest stays attended.
            if prefix:
                sink = max(DEFAULT_SINK if args.sink is None else args.sink, len(prefix["ids"]))
            else:
                sink = args.sink
            sink, window = cache_sizes(ckpt.config, sink, args.window, args.allow_long_context)
            check_quantization(quant, ckpt.config)
            log(
                f"loading {ckpt.source} ({ckpt.config.model_type}, {ckpt.config.num_layers} layers), "
                f"S={sink} W={window}"
            )
            base = manifest_base(ckpt, sink, window, args.chunk)
            # A model per target, read from the checkpoint for that export alone (which may free its weights once
            # they are written); quantized, its weights go into the target's form as they are read (memory: the
            # quantized model and one float tensor).
            for t in targets:
                model = build_model(
                    ckpt,
                    sink,
                    window,
                    max_chunk=args.chunk,
                    last_logits_only=True,
                    pack=Packer(t, quant) if quant.bits else None,
                    dtype=None if quant.bits else getattr(target_module(t), "FLOAT_DTYPE", None),
                )
                log(f"model loaded{f', {quant.scheme} weights in the {t} form' if quant.bits else ''}")
                written.append(export_one(model, ckpt, t, folders[t], base, args.chunk, quant, prefix, owned=True))
                del model
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    finally:
        for path in written:
            print(path)
    return 0


def manifest_base(ckpt, sink: int, window: int, chunk: int) -> dict:
    """The manifest fields every target shares."""
    cfg = ckpt.config
    return {
        "format_version": FORMAT_VERSION,
        "edgekv_version": edgekv_version(),
        "source": {"model": ckpt.source, "kind": ckpt.kind, "weights_sha256": ckpt.weights_hash()},
        "architecture": {
            "model_type": cfg.model_type,
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings,
        },
        "sink": sink,
        "window": window,
        "chunk": chunk,
        "vocab_size": cfg.vocab_size,
        "special_tokens": special_tokens(ckpt.tokenizer_dir, load_tokenizer(ckpt.tokenizer_dir)),
        "cache_layout": (
            "[2 (keys, values), layer, kv_head, slot, head_dim], one tensor per layer and half where the "
            "target splits it; keys stored rotated as their slot's position (docs/cache.md)"
        ),
        **(
            {"local": {"window": cfg.local_window, "layers": [i for i in range(cfg.num_layers) if cfg.is_local(i)]}}
            if cfg.local_window
            else {}
        ),
    }


def check_output(out: Path) -> None:
    """--out is a folder edgekv can write in, or can be made: never a file, nor under one."""
    for d in (out, *out.parents):
        if d.exists():
            if not d.is_dir():
                raise EdgekvError(f"--out {out}: {d} is a file, not a folder; choose another --out")
            if not os.access(d, os.W_OK | os.X_OK):
                raise EdgekvError(f"--out {out}: {d} is not writable; choose another --out")
            return


def pinned_prompt(system: str, tokenizer_dir: Path) -> dict:
    """The system prompt as the chat will hold it: the template's rendering and its tokens."""
    from runtimes.chat import ChatTemplate

    rendered = ChatTemplate(tokenizer_dir).render([{"role": "system", "content": system}], add_generation_prompt=False)
    ids = load_tokenizer(tokenizer_dir).encode(rendered, add_special_tokens=False).ids
    return {"system": system, "rendered": rendered, "ids": ids}


def write_prefix(folder: Path, prefix: dict, log) -> None:
    """Feed the pinned prompt through the artifact itself and ship the stream as its initial session (so starting
    from it is bitwise what prefilling would give on this target); the manifest records it."""
    from runtimes import open_artifact
    from runtimes.session import save_session

    runner = open_artifact(folder)
    runner.feed(prefix["ids"])
    state = {"messages": [{"role": "system", "content": prefix["system"]}], "in_stream": prefix["rendered"]}
    save_session(runner, folder / PREFIX, state)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["prefix"] = PREFIX
    manifest["digests"][PREFIX] = file_digest(folder / PREFIX)
    manifest["prefix"] = {"file": PREFIX, "tokens": len(prefix["ids"]), "system": prefix["system"]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"pinned the system prompt: {len(prefix['ids'])} tokens in the sink, its cache in {PREFIX}")


def disk_hint(folder: Path, low: float = 2e9) -> str:
    """A converter that runs out of disk says so in its own words (OpenVINO: "basic_ios::clear: iostream error");
    name the likely cause when the output's disk is nearly full."""
    free = shutil.disk_usage(folder).free
    return f" (only {free / 1e6:.0f} MB free on the output's disk: free some space and retry)" if free < low else ""


def export_one(
    model,
    ckpt,
    target: str,
    out: Path,
    base: dict,
    chunk: int,
    quant: Quantization = NONE,
    prefix: dict | None = None,
    owned: bool = False,
) -> Path:
    """Export into a hidden temporary folder beside `out`, then rename: never a half-written artifact. `owned`: the
    model is this export's alone, and the target may free its weights once they are written (OpenVINO does)."""
    module = target_module(target)
    log = Progress(target)
    log(f"exporting to {out}")
    if quant.bits and model.packed != quant:  # a float model (tests, the API): packed as the CLI packs at load
        model = pack_model(model, Packer(target, quant))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named by host and process: the next export removes what a killed one left, never another host's (NFS).
    mine = f".{out.name}.tmp-{socket.gethostname()}-"
    remove_stale(out.parent, re.escape(mine) + r"(\d+)")
    tmp = out.parent / f"{mine}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            stamp = identity({**base, "target": target, "quantization": {"scheme": quant.scheme}})
            with captured():
                entries = module.export(
                    model, tmp, ExportSpec(chunk=chunk, log=log, quant=quant, identity=stamp, owned=owned)
                )
        except EdgekvError:
            raise
        except Exception as e:
            raise EdgekvError(
                f"{target} export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}{disk_hint(tmp)}"
            ) from e
        files = dict(entries.pop("files"))
        for name in TOKENIZER_FILES:
            if (ckpt.tokenizer_dir / name).is_file():
                shutil.copy(ckpt.tokenizer_dir / name, tmp / name)
                files[name.removesuffix(".json").removesuffix(".jinja")] = name
        manifest = {
            **base,
            "target": target,
            **entries,
            "files": files,
            "digests": {name: file_digest(tmp / name) for name in files.values()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if prefix:
            with captured():
                write_prefix(tmp, prefix, log)
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        if out.exists():  # --force: the old artifact stays whole until the new one is in place
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: the temporary folder goes, one line stays
        raise EdgekvError(f"writing {out} failed: {e.strerror or e}{disk_hint(out.parent)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    return out
