"""OpenVINO CPU plugin with f32 inference precision (for validation); the cache is internal state."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes import Runner


class OpenVinoRunner(Runner):
    def __init__(self, folder: Path, manifest: dict, precision: str = "f32"):
        super().__init__(folder, manifest)
        import openvino as ov

        compiled = ov.Core().compile_model(str(self.folder / manifest["files"]["model"]), "CPU",
                                           {"INFERENCE_PRECISION_HINT": precision})
        self.logits = compiled.output("logits")
        self.request = compiled.create_infer_request()

    def reset(self) -> None:
        super().reset()
        self.request.reset_state()

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        self.request.infer({"tokens": tokens, "input_pos": np.array([pos], dtype=np.int64)})
        return self.request.get_tensor(self.logits).data[0].copy()


def load(folder: Path, manifest: dict) -> Runner:
    return OpenVinoRunner(folder, manifest)
