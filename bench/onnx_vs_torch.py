"""onnxruntime against torch on the CPU: stage-1 inference images/s of one fold, in the same run, on the same batches.

    .venv/bin/python bench/onnx_vs_torch.py --run outputs/demo/runs/resnet10t_128      # a run folder or a bundle
    .venv/bin/python bench/onnx_vs_torch.py --run m.ichbundle --batch 32 --repeats 5

Both take the same uint8 batches (random bytes of the fold's input shape: inference cost does not depend on
the pixels). torch runs as the Predictor runs it (eval, no autograd, channels-last, the AMP policy of
src/engine.py: float32 on a CPU without native bfloat16); onnxruntime runs the file src.export --onnx writes,
with its default CPU provider and all cores. The median over repeats is printed, and the ratio to torch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.engine import amp_settings, autocast  # noqa: E402
from src.export import export_onnx  # noqa: E402
from src.predictor import Predictor  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder or a bundle")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import onnxruntime as ort
    p = Predictor.load(a.run, device="cpu", stage2=False)
    f = p.folds[0]
    chans = 9 if f.config["input_mode"] == "slices_windows" else 3
    x = np.random.default_rng(0).integers(0, 256, (a.batch, chans, f.config["img_size"], f.config["img_size"]), np.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(a.run, d)[0]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dtype, _ = amp_settings(torch.device("cpu"), f.config.get("amp", "auto"))
        model = f.model.eval().to(memory_format=torch.channels_last)
        xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

        def run_torch():
            with torch.no_grad(), autocast(torch.device("cpu"), dtype):
                for _ in range(a.batches):
                    torch.sigmoid(model(xt).float())

        def run_onnx():
            for _ in range(a.batches):
                sess.run(None, {"image": x})

        times = {"torch": [], "onnxruntime": []}
        run_torch(), run_onnx()  # warm-up: allocator, oneDNN kernels, onnxruntime's graph
        for _ in range(a.repeats):
            for name, fn in (("torch", run_torch), ("onnxruntime", run_onnx)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    n = a.batch * a.batches
    base = n / statistics.median(times["torch"])
    print(f"{f.config['model']} @ {f.config['img_size']} px, {chans} channels, batch {a.batch}, {torch.get_num_threads()} "
          f"torch threads; median of {a.repeats} repeats of {n} images")
    print(f"| runtime | images/s | ratio |\n|---|---:|---:|")
    for name in ("torch", "onnxruntime"):
        ips = n / statistics.median(times[name])
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x |")


if __name__ == "__main__":
    main()
