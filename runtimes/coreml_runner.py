"""Core ML: real prediction through coremltools on macOS 15 / iOS 18; elsewhere the NumPy MIL executor
(`runtimes/mil_executor.py`), which runs the same package with Core ML's fp16 semantics but not its speed."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from runtimes import Runner
from runtimes.errors import EdgekvError
from runtimes.manifest import REEXPORT


class _CoreMLRunner(Runner):
    """Shared part: tensors found by role in the manifest, decode and prefill functions by entry name."""

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        self.package = self.folder / manifest["files"]["model"]
        self.entries = {1: manifest["entries"]["decode"], self.chunk: manifest["entries"]["prefill"]}
        self.names = {t["role"]: t["name"] for t in manifest["inputs"] + manifest["outputs"] + manifest["state"]}
        self._check_spec()

    def _check_spec(self) -> None:
        """The manifest against the package's spec: the identity in its user-defined metadata, and each entry
        function's inputs, state and outputs (the spec's description; no weights are read)."""
        import coremltools as ct

        array = ct.proto.FeatureTypes_pb2.ArrayFeatureType
        dtypes = {array.FLOAT16: "float16", array.FLOAT32: "float32", array.INT32: "int32"}
        description = ct.utils.load_spec(str(self.package)).description
        functions = {f.name: f for f in description.functions}
        for entry in sorted(set(self.entries.values())):
            if entry not in functions:
                raise EdgekvError(f"{self.folder}: {self.package.name} has no function {entry!r}; {REEXPORT}")
            f = functions[entry]
            arrays = [(p.name, p.type.multiArrayType) for p in [*f.input, *f.output]] + [
                (p.name, p.type.stateType.arrayType) for p in f.state
            ]
            self.check_model(
                description.metadata.userDefined.get("edgekv"),
                {name: (dtypes.get(a.dataType, "?"), list(a.shape)) for name, a in arrays},
            )

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

    def cache_state(self) -> np.ndarray:  # MLState's read/write API (coremltools 8+, macOS 15)
        return np.array(self.state.read_state(self.names["cache"]), np.float16)

    def set_cache_state(self, cache: np.ndarray) -> None:
        self.state.write_state(self.names["cache"], cache.astype(np.float16))


class MILRunner(_CoreMLRunner):
    executor = "numpy-mil"
    note = (
        "Core ML prediction needs macOS: running the package with edgekv's NumPy MIL executor "
        "(Core ML's fp16 semantics; its speed is not Core ML's)"
    )

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        from runtimes.mil_executor import MILProgram

        self.program = MILProgram(self.package)
        self.state = self.program.make_state(self.entries[1])

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        outputs = self.program.run(self.entries[tokens.shape[1]], self._inputs(tokens, pos), self.state)
        return outputs[self.names["logits"]][0]

    def cache_state(self) -> np.ndarray:  # the executor holds fp16 values in float32 arrays
        return self.state[self.names["cache"]].astype(np.float16)

    def set_cache_state(self, cache: np.ndarray) -> None:
        self.state[self.names["cache"]][...] = cache.astype(np.float16)


def load(folder: Path, manifest: dict) -> Runner:
    """Real Core ML where it exists (macOS), the NumPy MIL executor elsewhere."""
    return (CoreMLRunner if platform.system() == "Darwin" else MILRunner)(folder, manifest)
