"""ExecuTorch through its Python runtime: `decode` and `prefill` methods share the cache buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtimes import Runner, threads


class ExecuTorchRunner(Runner):
    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        from executorch.runtime import Runtime

        if manifest.get("quantization", {}).get("scheme", "none") != "none":
            import executorch.kernels.quantized  # noqa: F401  registers the quantized embedding kernels

        if threads():
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads())
        program = Runtime.get().load_program(str(self.folder / manifest["files"]["model"]))
        self.methods = {1: program.load_method("decode"), self.chunk: program.load_method("prefill")}

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        out = self.methods[tokens.shape[1]].execute([torch.from_numpy(tokens), torch.tensor([pos])])
        return out[0][0].numpy()


def load(folder: Path, manifest: dict) -> Runner:
    return ExecuTorchRunner(folder, manifest)
