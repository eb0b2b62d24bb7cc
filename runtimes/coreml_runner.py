"""Core ML: real prediction through coremltools on macOS 15 / iOS 18; elsewhere the NumPy MIL executor
(`runtimes/mil_executor.py`), which runs the same package with Core ML's fp16 semantics but not its speed."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from runtimes import Runner


class _CoreMLRunner(Runner):
    """Shared part: tensors found by role in the manifest, decode and prefill functions by entry name."""

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        self.package = self.folder / manifest["files"]["model"]
        self.entries = {1: manifest["entries"]["decode"], self.chunk: manifest["entries"]["prefill"]}
        self.names = {t["role"]: t["name"] for t in manifest["inputs"] + manifest["outputs"]}

    def _inputs(self, tokens: np.ndarray, pos: int) -> dict:
        return {self.names["tokens"]: tokens.astype(np.int32), self.names["position"]: np.array([pos], np.int32)}


class CoreMLRunner(_CoreMLRunner):
    executor = "coreml"

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        import coremltools as ct

        self.functions = {n: ct.models.MLModel(str(self.package), function_name=f) for n, f in self.entries.items()}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.state = self.functions[1].make_state()

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        outputs = self.functions[tokens.shape[1]].predict(self._inputs(tokens, pos), state=self.state)
        return outputs[self.names["logits"]][0]


class MILRunner(_CoreMLRunner):
    executor = "numpy-mil"
    note = ("Core ML prediction needs macOS: running the package with edgekv's NumPy MIL executor "
            "(Core ML's fp16 semantics; its speed is not Core ML's)")

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        from runtimes.mil_executor import MILProgram

        self.program = MILProgram(self.package)
        self.state = self.program.make_state(self.entries[1])

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        outputs = self.program.run(self.entries[tokens.shape[1]], self._inputs(tokens, pos), self.state)
        return outputs[self.names["logits"]][0]


def load(folder: Path, manifest: dict) -> Runner:
    """Real Core ML where it exists (macOS), the NumPy MIL executor elsewhere."""
    return (CoreMLRunner if platform.system() == "Darwin" else MILRunner)(folder, manifest)
