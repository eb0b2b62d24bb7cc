"""OpenVINO CPU plugin with f32 inference precision (for validation). The cache is one buffer whose per-layer
parts are the request's cache input tensors (shared memory, no copy); the graph returns the chunk's new entries
and the runner writes them into their slots in place, as for ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes import Runner, threads

DTYPES = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32"}


class OpenVinoRunner(Runner):
    def __init__(self, folder: Path, manifest: dict, precision: str = "f32"):
        super().__init__(folder, manifest)
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, **({"INFERENCE_NUM_THREADS": threads()} if threads() else {})}
        core = ov.Core()
        model = core.read_model(str(self.folder / manifest["files"]["model"]))
        stamped = model.get_rt_info(["edgekv"]).astype(str) if model.has_rt_info(["edgekv"]) else None
        self.check_model(
            stamped,
            {
                p.get_any_name(): (
                    DTYPES.get(p.get_element_type().get_type_name(), "?"),
                    [d.get_length() if d.is_static else None for d in p.get_partial_shape()],
                )
                for p in model.inputs + model.outputs
            },
        )
        compiled = core.compile_model(model, "CPU", config)
        self.logits, self.entries = compiled.output("logits"), compiled.output("kv_update")
        self.request = compiled.create_infer_request()
        self.cache = self._cache_buffer()
        for name, part in zip(self.cache_inputs, self.cache, strict=True):
            self.request.set_tensor(name, ov.Tensor(part, shared_memory=True))

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        self.request.infer({"tokens": tokens, "input_pos": np.array([pos], dtype=np.int64)})
        self._write_entries(self.cache, self.request.get_tensor(self.entries).data, pos)
        return self.request.get_tensor(self.logits).data[0].copy()


def load(folder: Path, manifest: dict) -> Runner:
    return OpenVinoRunner(folder, manifest)
