"""onnxruntime: the cache is one preallocated buffer whose per-layer parts are bound as the graph's cache inputs
with IO binding (no copy); the graph returns the chunk's new entries and the runner writes them into their
slots, in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes import Runner, threads

DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


class OnnxRunner(Runner):
    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads()
        self.session = ort.InferenceSession(
            str(self.folder / manifest["files"]["model"]), opts, providers=["CPUExecutionProvider"]
        )
        ports = self.session.get_inputs() + self.session.get_outputs()
        self.check_model(
            self.session.get_modelmeta().custom_metadata_map.get("edgekv"),
            {p.name: (DTYPES.get(p.type, p.type), [d if isinstance(d, int) else None for d in p.shape]) for p in ports},
        )
        self.cache = self._cache_buffer()
        self.binding = self.session.io_binding()
        # Each OrtValue shares its part of the buffer's memory: slot writes below are what the next call reads.
        for name, part in zip(self.cache_inputs, self.cache, strict=True):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(part))
        self.binding.bind_output("logits")

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        b = self.binding
        b.bind_cpu_input("tokens", tokens)
        b.bind_cpu_input("input_pos", np.array([pos], dtype=np.int64))
        b.bind_output("kv_update")  # bound afresh: its shape follows the chunk
        self.session.run_with_iobinding(b)
        logits, entries = b.copy_outputs_to_cpu()
        self._write_entries(self.cache, entries, pos)
        return logits[0]


def load(folder: Path, manifest: dict) -> Runner:
    return OnnxRunner(folder, manifest)
