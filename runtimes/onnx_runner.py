"""onnxruntime: the cache lives in two preallocated buffers bound with IO binding and swapped each
call (an output may not alias its input), so it never round-trips through Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes import Runner


class OnnxRunner(Runner):
    def __init__(self, folder: Path, manifest: dict, threads: int = 0):
        super().__init__(folder, manifest)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / manifest["files"]["model"]), opts,
                                            providers=["CPUExecutionProvider"])
        shape = next(i["shape"] for i in manifest["inputs"] if i["name"] == "kv_cache")
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]
        self.current = 0
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits")

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        b, cur = self.binding, self.current
        b.bind_cpu_input("tokens", tokens)
        b.bind_cpu_input("input_pos", np.array([pos], dtype=np.int64))
        b.bind_ortvalue_input("kv_cache", self.values[cur])
        b.bind_ortvalue_output("kv_cache_out", self.values[1 - cur])
        self.session.run_with_iobinding(b)
        self.current = 1 - cur
        return b.copy_outputs_to_cpu()[0][0]


def load(folder: Path, manifest: dict) -> Runner:
    return OnnxRunner(folder, manifest)
