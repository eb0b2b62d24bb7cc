"""ExecuTorch through its Python runtime: `decode` and `prefill` methods share the cache buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtimes import Runner, threads
from runtimes.errors import EdgekvError
from runtimes.manifest import MANIFEST, REEXPORT
from runtimes.slots import cache_slots, own_parts, stack_parts

IDENTITY_METHOD = "edgekv_identity"  # a constant method returning the identity JSON (runtimes.manifest.IDENTITY)
# Methods sharing the cache buffers with decode and prefill: the 2L buffers out, and 2L tensors copied in (sessions).
READ_CACHE, WRITE_CACHE = "read_cache", "write_cache"
DTYPES = {3: "int32", 4: "int64", 5: "float16", 6: "float32"}  # ExecuTorch ScalarType codes


class ExecuTorchRunner(Runner):
    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        from executorch.runtime import Runtime

        if manifest.get("quantization", {}).get("scheme", "none") != "none":
            import executorch.kernels.quantized  # noqa: F401  registers the quantized embedding kernels

        if threads():
            from executorch.extension.pybindings import portable_lib

            if portable_lib._threadpool_get_thread_count() != threads():  # a reset logs a line on stderr
                portable_lib._unsafe_reset_threadpool(threads())
        program = Runtime.get().load_program(str(self.folder / manifest["files"]["model"]))
        self.program = program
        entries = manifest["entries"]
        self.methods = {1: program.load_method(entries["decode"]), self.chunk: program.load_method(entries["prefill"])}
        if None in self.methods.values():
            raise EdgekvError(f"{folder}: {manifest['files']['model']} lacks the methods {MANIFEST} names; {REEXPORT}")
        stamped = None
        if IDENTITY_METHOD in program.method_names:
            stamped = program.load_method(IDENTITY_METHOD).execute([])[0]
        names = [t["name"] for t in manifest["inputs"]] + [t["name"] for t in manifest["outputs"]]
        for method in self.methods.values():  # ExecuTorch declares no names: the manifest's, in order
            meta = method.metadata
            tensors = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())] + [
                meta.output_tensor_meta(i) for i in range(meta.num_outputs())
            ]
            if len(tensors) != len(names):
                raise EdgekvError(
                    f"{folder}: {MANIFEST} lists {len(names)} inputs and outputs, method "
                    f"{meta.name()} has {len(tensors)}; {REEXPORT}"
                )
            self.check_model(
                stamped,
                {n: (DTYPES.get(t.dtype(), "?"), list(t.sizes())) for n, t in zip(names, tensors, strict=True)},
                ("inputs", "outputs"),
            )

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        out = self.methods[tokens.shape[1]].execute([torch.from_numpy(tokens), torch.tensor([pos])])
        return out[0][0].numpy()

    def _cache_method(self, name: str):
        if name not in self.program.method_names:
            raise EdgekvError(
                f"{self.folder}: {self.manifest['files']['model']} has no {name} method (exported "
                f"before sessions existed); {REEXPORT}"
            )
        return self.program.load_method(name)

    def cache_state(self) -> np.ndarray:
        parts = self._cache_method(READ_CACHE).execute([])
        return stack_parts([p.numpy() for p in parts], cache_slots(self.manifest))

    def set_cache_state(self, cache: np.ndarray) -> None:
        parts = own_parts(cache, [t["shape"][1] for t in self.manifest["state"] if t["role"] == "cache"])
        self._cache_method(WRITE_CACHE).execute([torch.from_numpy(np.array(p, np.float32)) for p in parts])


def load(folder: Path, manifest: dict) -> Runner:
    return ExecuTorchRunner(folder, manifest)
