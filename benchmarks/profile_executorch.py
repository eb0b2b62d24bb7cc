"""Where an ExecuTorch decode step's time goes: per-event timings of one method of a .pte, from the pip wheel's
runtime with ETDump on (its XNNPACK reports each operator inside a delegate).

    python benchmarks/profile_executorch.py out/smol/executorch-int4/model.pte [--method decode] [--calls 20]
        [--warmup 3] [--pos 0] [--token 1] [--threads N] [--by-instance] [--baseline] [--etdump OUT.etdp]

Inputs are built the way runtimes/executorch_runner.py calls edgekv's `decode`/`prefill`: tokens int64 [1, T]
(T from the method's metadata: 1 for decode, the chunk for prefill) and input_pos int64 [1]; the position advances
by T each call, as in generation. Any other input is filled with zeros of its declared dtype/shape.

Every execute() is one ETDump "run"; the first --warmup runs are dropped, and for each event name the time summed
over its instances inside one call is reported as the median over the remaining calls.

Event kinds in the table:
  method    Method::execute               the whole method, as the runtime sees it
  delegate  DELEGATE_CALL                 one per XNNPACK delegate call (a partition), includes its ops
  xnnpack   e.g. "Fully Connected (NC, F32) GEMM"   XNNPACK's own per-operator timings inside the delegates
            (1 us resolution; the "#k" per-delegate counter is stripped unless --by-instance)
  kernel    native_call_<op>              a portable/optimized/quantized kernel outside the delegates
  op-call   OPERATOR_CALL                 the wrapper around each kernel call (kernel + dispatch); not a leaf

ETDump costs about 0.25 us an event, so its shares are the point; time the real speed with it off (`--baseline`,
or `edgekv bench`). XNNPACK's times are whole microseconds and its operators carry no node ids.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict

warnings.filterwarnings("ignore")

import torch  # noqa: E402  (the pybindings need libtorch loaded first)

DTYPES = {
    0: torch.uint8,
    1: torch.int8,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    11: torch.bool,
}
INSTANCE = re.compile(r" #\d+$")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pte")
    p.add_argument("--method", default="decode")
    p.add_argument("--calls", type=int, default=20, help="measured calls (after the warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pos", type=int, default=0, help="input_pos of the first call")
    p.add_argument("--token", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("EDGEKV_THREADS", "0") or 0),
        help="reset the threadpool to N threads, as the runner does (default: $EDGEKV_THREADS; 0: keep)",
    )
    p.add_argument("--by-instance", action="store_true", help="keep XNNPACK '#k' and instruction ids apart")
    p.add_argument("--baseline", action="store_true", help="first time the same calls with ETDump off")
    p.add_argument("--etdump", help="keep the .etdp here (default: a temporary file)")
    p.add_argument("--top", type=int, default=40, help="rows to print (0: all)")
    return p.parse_args()


def make_inputs(method, pos: int, token: int):
    meta = method.metadata
    inputs = []
    for i in range(meta.num_inputs()):
        t = meta.input_tensor_meta(i)
        sizes, dtype = list(t.sizes()), DTYPES.get(t.dtype(), torch.float32)
        if i == 0 and dtype == torch.int64:  # tokens [1, T]
            inputs.append(torch.full(sizes, token, dtype=dtype))
        elif dtype == torch.int64 and sizes == [1]:  # input_pos
            inputs.append(torch.tensor([pos], dtype=dtype))
        else:
            inputs.append(torch.zeros(sizes, dtype=dtype))
    step = list(meta.input_tensor_meta(0).sizes())[-1] if meta.num_inputs() else 1
    return inputs, step


def run_calls(program, args):
    method = program.load_method(args.method)
    if method is None:
        sys.exit(f"no method {args.method!r}; the program has {sorted(program.method_names)}")
    walls, pos = [], args.pos
    for i in range(args.warmup + args.calls):
        inputs, step = make_inputs(method, pos, args.token)
        t0 = time.perf_counter()
        method.execute(inputs)
        if i >= args.warmup:
            walls.append((time.perf_counter() - t0) * 1e3)
        pos += step
    return walls


def kind(name: str) -> str:
    if name == "Method::execute":
        return "method"
    if name == "DELEGATE_CALL":
        return "delegate"
    if name == "OPERATOR_CALL":
        return "op-call"
    if name.startswith("native_call_"):
        return "kernel"
    return "xnnpack"


def main():
    args = parse_args()
    import executorch.kernels.quantized  # noqa: F401  the quantized embedding kernels of int8/int4 exports
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if args.threads and portable_lib._threadpool_get_thread_count() != args.threads:
        portable_lib._unsafe_reset_threadpool(args.threads)
    print(f"threads: {portable_lib._threadpool_get_thread_count()}", file=sys.stderr)
    runtime = Runtime.get()

    if args.baseline:
        program = runtime.load_program(args.pte)
        base = run_calls(program, args)
        del program
        print(f"wall per call, ETDump off: median {statistics.median(base):.3f} ms", file=sys.stderr)

    program = runtime.load_program(args.pte, enable_etdump=True, debug_buffer_size=0)
    walls = run_calls(program, args)
    from executorch.devtools import Inspector

    with tempfile.TemporaryDirectory() as tmp:
        etdp = args.etdump or f"{tmp}/run.etdp"
        # The wrapper wants a debug buffer path; with debug_buffer_size=0 nothing is written there.
        program.write_etdump_result_to_file(etdp, f"{tmp}/debug.bin")
        del program
        inspector = Inspector(etdump_path=etdp)  # no ETRecord: edgekv's exporter writes none; names suffice
    # One EventBlock per distinct run signature: the method's calls are the "Execute" block holding the most runs
    # (loading the method is a "Default" block; a method run later would be a block of its own).
    blocks = [b for b in inspector.event_blocks if b.name == "Execute"]
    block = max(blocks, key=lambda b: max((len(e.perf_data.raw) for e in b.events if e.perf_data), default=0))
    n_runs = max(len(e.perf_data.raw) for e in block.events if e.perf_data)
    first = (
        n_runs - args.calls
    )  # drop the warmup runs (those of this block; a warmup run of another shape is elsewhere)

    per_call = defaultdict(lambda: [0.0] * args.calls)  # name -> summed ms, per measured call
    count = defaultdict(int)
    for e in block.events:
        if not e.perf_data or len(e.perf_data.raw) != n_runs:
            continue
        name = e.name if args.by_instance else INSTANCE.sub("", e.name)
        if args.by_instance and kind(e.name) in ("delegate", "kernel", "op-call", "xnnpack"):
            name = f"{name} @{e._instruction_id}"
        count[name] += 1
        for i, ms in enumerate(e.perf_data.raw[first:]):
            per_call[name][i] += ms

    rows = [
        (n, kind(n.split(" @")[0] if args.by_instance else n), count[n], statistics.median(v))
        for n, v in per_call.items()
    ]
    total = next((r[3] for r in rows if r[1] == "method"), None)
    rows.sort(key=lambda r: (r[1] != "method", r[1] != "delegate", -r[3]))
    shown = rows if not args.top else rows[: args.top]
    print(f"{args.pte} :: {args.method}: {args.calls} calls after {args.warmup} warmup; ETDump {etdp}")
    print(f"wall per call (Python, ETDump on): median {statistics.median(walls):.3f} ms")
    print(f"{'event':56} {'kind':9} {'n/call':>6} {'median ms/call':>14} {'% method':>8}")
    for n, k, c, ms in shown:
        share = f"{100 * ms / total:7.1f}%" if total else ""
        print(f"{n[:56]:56} {k:9} {c:6d} {ms:14.4f} {share:>8}")
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more rows (--top 0 for all)")
    by_kind = defaultdict(float)
    for _, k, _, ms in rows:
        by_kind[k] += ms
    if total:
        outside = total - by_kind["delegate"] - by_kind["op-call"]
        print(
            f"sums of medians: delegates {by_kind['delegate']:.4f} ms (their XNNPACK ops {by_kind['xnnpack']:.4f}), "
            f"kernels {by_kind['kernel']:.4f} ms (with call overhead {by_kind['op-call']:.4f}), "
            f"method-level rest {outside:.4f} ms"
        )


if __name__ == "__main__":
    main()
