"""Core ML through coremltools; prediction exists only on macOS 15 / iOS 18."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from exporter.config import EdgekvError
from runtimes import Runner


class CoreMLRunner(Runner):
    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        import coremltools as ct

        path = str(self.folder / manifest["files"]["model"])
        self.functions = {1: ct.models.MLModel(path, function_name=manifest["entries"]["decode"])}
        self.functions[self.chunk] = ct.models.MLModel(path, function_name=manifest["entries"]["prefill"])
        self.names = {t["role"]: t["name"] for t in manifest["inputs"] + manifest["outputs"]}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.state = self.functions[1].make_state()

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        inputs = {self.names["tokens"]: tokens.astype(np.int32),
                  self.names["position"]: np.array([pos], dtype=np.int32)}
        return self.functions[tokens.shape[1]].predict(inputs, state=self.state)[self.names["logits"]][0]


def load(folder: Path, manifest: dict) -> Runner:
    if platform.system() != "Darwin":
        raise EdgekvError(
            f"{folder}: Core ML prediction needs macOS 15 or iOS 18; on this machine run "
            f"`edgekv validate {folder}` to check the package against the reference and onnxruntime"
        )
    return CoreMLRunner(folder, manifest)
