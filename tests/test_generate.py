"""generate / bench on tiny exports of every runnable target: same tokens everywhere, reproducible
sampling, streams that wrap the ring, and the benchmark's documented output."""

import json

import pytest

from exporter.export import export_one, manifest_base
from exporter.loaders import build_model, load_checkpoint
from exporter.reference import ReferenceRunner
from runtimes.generate import TextStream, generate
from runtimes.manifest import load_tokenizer, read_manifest
from runtimes.traffic import step_bytes
from tests.conftest import RUNNABLE, edgekv, make_tiny, one_line_error

SINK, WINDOW, CHUNK = 2, 6, 4
PROMPT = "w5 w17 w3 w99 w42 w8 w64"  # 7 tokens: one prefill chunk, then decode
NEW = 24  # 7 + 24 = 31 positions: the 8-slot cache wraps its 6-slot ring four times


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    ckpt = load_checkpoint(make_tiny("llama", tmp / "hf", seed=11))
    model = build_model(ckpt, SINK, WINDOW, max_chunk=CHUNK, last_logits_only=True)
    base = manifest_base(ckpt, SINK, WINDOW, CHUNK)
    folders = {t: export_one(model, ckpt, t, tmp / t, base, CHUNK) for t in RUNNABLE}
    ref = ReferenceRunner(model, load_tokenizer(ckpt.tokenizer_dir), chunk=CHUNK)
    return folders, ref


def generate_json(folder, *args) -> dict:
    r = edgekv("generate", str(folder), "--prompt", PROMPT, "--max-tokens", str(NEW), "--json", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_greedy_identical_across_targets_and_reference(tiny):
    folders, ref = tiny
    prompt = ref.tokenizer.encode(PROMPT).ids
    want = list(generate(ref, prompt, NEW))
    assert len(set(want)) > 3  # a real continuation, not one token repeated
    for target, folder in folders.items():
        out = generate_json(folder)
        assert out["prompt_tokens"] == prompt and out["tokens"] == want, target
        assert out["position"] == len(prompt) + NEW > SINK + 2 * WINDOW
        assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0


def test_sampling_is_reproducible_with_a_seed(tiny):
    folders, _ = tiny
    sampled = [
        generate_json(folders["onnx"], "--temperature", "1.0", "--top-p", "0.95", "--seed", str(s))["tokens"]
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert (
        generate_json(folders["executorch"], "--temperature", "1.0", "--top-p", "0.95", "--seed", "7")["tokens"]
        == sampled[0]
    )


def test_generation_stops_at_a_stop_token(tiny):
    _, ref = tiny
    prompt = ref.tokenizer.encode(PROMPT).ids
    ref.reset()
    first = list(generate(ref, prompt, NEW))
    ref.reset()
    stopped = list(generate(ref, prompt, NEW, stop={first[5]}))
    assert stopped == first[: first.index(first[5]) + 1]


def test_text_stream_matches_full_decode(smollm2):
    tok = load_tokenizer(smollm2.tokenizer_dir)
    text = "Héllo wörld! 日本語のテキスト 🙂 and  two  spaces\nnew line"
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert len(stream.ids) < 8  # only a short tail is kept, whatever the length


def test_bench_json_and_plot(tiny, tmp_path):
    folders, _ = tiny
    png = tmp_path / "bench.png"
    r = edgekv(
        "bench",
        str(folders["onnx"]),
        str(folders["executorch"]),
        "--tokens",
        "60",
        "--steps",
        "4",
        "--points",
        "3",
        "--json",
        "--plot",
        str(png),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout)["results"]
    assert [x["target"] for x in results] == ["onnx", "executorch"]
    for x in results:
        assert x["positions"] == [SINK + WINDOW, 32, 56]
        for key in ("ms_per_token", "rss_mb"):
            assert len(x[key]) == 3 and min(x[key]) > 0
        assert x["prefill_tok_s"] > 0 and x["size_mb"] > 0 and x["artifact"] == str(folders[x["target"]])
        folder = folders[x["target"]]
        assert x["step_bytes"] == step_bytes(folder, read_manifest(folder))  # read in its own process
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_refuses_a_stream_shorter_than_the_cache(tiny):
    folders, _ = tiny
    one_line_error(edgekv("bench", str(folders["onnx"]), "--tokens", "5"), "below the cache size")


def test_generate_bad_sampling_arguments(tiny):
    folders, _ = tiny
    one_line_error(edgekv("generate", str(folders["onnx"]), "--prompt", "w1", "--top-p", "0"), "--top-p")


@pytest.mark.parametrize(
    "executor,says", [(None, "(transformers, 0.0 MB"), ("numpy-mil", "(coreml via numpy-mil, not its speed")]
)
def test_bench_report_names_who_ran_it(executor, says):
    from runtimes.cli_bench import report

    row = {
        "artifact": "a",
        "target": "transformers",
        "size_mb": 0.0,
        "sink": 0,
        "window": 8,
        "chunk": 4,
        "prefill_tok_s": None,
        "decode_tok_s": 2.0,
        "positions": [8, 16],
        "ms_per_token": [500.0, 510.0],
        "ms_p10": [490.0, 500.0],
        "ms_p90": [520.0, 530.0],
        "rss_mb": [100.0, 100.0],
        "flat_ms_ratio": 1.02,
        "rss_growth": 0.0,
    }
    if executor:  # a Core ML folder on Linux: numbers from the NumPy MIL executor
        row.update(target="coreml", executor=executor)
    text = report(row)
    assert says in text and "x1.020" in text and "prefill n/a" in text
