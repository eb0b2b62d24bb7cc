"""A long stream: 200,000 tokens (over 14,000 laps of a 14-slot ring) through a tiny model's ONNX export end where
the plain reference fed the same stream ends. Positions never enter the graph as anything but a slot and a mask,
so nothing may drift, overflow or lose precision with the stream's length; this checks it at four points."""

import numpy as np
import pytest
import torch

from exporter.export import export_one, manifest_base
from exporter.loaders import build_model, load_checkpoint
from exporter.reference import Reference
from runtimes import open_artifact
from tests.conftest import make_tiny

SINK, WINDOW, CHUNK = 3, 11, 7  # 50,000 = 7 x 7,142 + 6: every block ends with six decode calls


@pytest.mark.slow
def test_200k_tokens_through_onnx_end_as_the_reference_does(tmp_path, request):
    ckpt = load_checkpoint(make_tiny("llama", tmp_path / "hf", seed=3))
    model = build_model(ckpt, SINK, WINDOW, max_chunk=CHUNK, last_logits_only=True)
    runner = open_artifact(
        export_one(model, ckpt, "onnx", tmp_path / "onnx", manifest_base(ckpt, SINK, WINDOW, CHUNK), CHUNK)
    )
    ref = Reference(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's tensors are tiny: a second thread only waits (3x slower here)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    ids = np.random.default_rng(200_000).integers(0, 128, 200_000).tolist()
    for start in range(0, len(ids), 50_000):
        block = ids[start : start + 50_000]
        got, want = runner.feed(block), ref.run(block)[-1].numpy()
        assert runner.pos == ref.pos == start + 50_000
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), start
        assert got.argmax() == want.argmax(), start
