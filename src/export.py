"""A trained run as one portable file (a bundle), and its stage-1 networks as ONNX.

    python -m src.export outputs/demo/runs/resnet10t_128                     # -> OUT/bundles/resnet10t_128.ichbundle
    python -m src.export RUN --out model.ichbundle --fp16                    # stage-1 weights in float16
    python -m src.export RUN --onnx onnx/                                    # also onnx/fold<K>.onnx
    python -m src.export model.ichbundle --onnx onnx/                        # a bundle's networks as ONNX

A bundle holds everything needed to predict and nothing else: every stage-1 fold's averaged weights (the ones the
run validated) as safetensors, both stage-2 models of every fold (GRU weights as safetensors, LightGBM models as
text), the blend weights of the run's stages (src.blend), the preprocessing as trained (cache size and windows;
input mode, 2.5D neighbours and TTA in each fold's config), the model card (data, images, patients, OOF figures,
whether the data was generated), the versions of torch, timm and LightGBM and the code's commit, and a
manifest with the SHA-256 of every member. No pickle anywhere; src/bundle.py lists what a loader refuses.

    from src.predictor import Predictor
    p = Predictor.load("resnet10t_128.ichbundle")        # as a run folder; src.predict, src.serve.demo, src.serve.webapp and
    p.predict(["/path/to/series/"])                      # src.make_submission take a bundle wherever they take a run

ONNX (`--onnx DIR`): each fold's stage-1 network, uint8 images (N, C, H, W) in, probabilities (N, 6) and the
pooled embedding out, dynamic batch; its normalisation is inside, as in the network.

A bundle up to date with its run (the run's and its stages' fingerprints, the blend file, the settings) is not
written again; `--overwrite` writes it anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import layout
from .bundle import is_bundle, read_run, write_bundle
from .config import parse_config, positional
from .runs import Run
from .stamps import Stamp, file_fingerprint, guard
from .utils import PipelineError, cli_main


def export_stamp(run: Run, fp16: bool) -> Stamp:
    inputs = {r.name: r.fingerprint(with_test=False) for r in run.family()}
    blend = layout.run_blend_file(run.path)
    if blend.exists():
        inputs["blend"] = file_fingerprint(blend)
    card = run.path / layout.CARD
    if card.exists():
        inputs["card"] = file_fingerprint(card)
    return Stamp("export", {"fp16": fp16}, inputs)


def export(run_dir, out=None, fp16: bool = False, overwrite: bool = False, quiet: bool = False) -> Path:
    """Write the run's bundle (default OUT/bundles/<run>.ichbundle); returns its path."""
    run = Run(run_dir)
    out = Path(out) if out else layout.bundle_path(run.path)
    stamp_file = layout.bundle_stamp(out)
    stamp = export_stamp(run, fp16)
    if guard(stamp, stamp_file, out.exists(), overwrite, f"the bundle {out}", clear=[out, stamp_file], quiet=quiet):
        return out
    t = read_run(run.path)
    manifest = write_bundle(t, out, fp16)
    stamp.save(stamp_file)
    if not quiet:
        print(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB, {len(t.stage1)} stage-1 fold(s), {len(t.seq)} GRU and "
              f"{len(t.boost)} tree fold(s), {len(manifest['members'])} members"
              + ("; stage-1 weights in float16" if fp16 else ""))
    return out


def export_onnx(source, out_dir) -> list[Path]:
    """Each stage-1 fold of a run folder or bundle as out_dir/fold<K>.onnx (dynamic batch); returns the paths."""
    import torch

    from .model import OnnxNet
    from .predictor import Predictor
    p = Predictor.load(source, device="cpu", stage2=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in p.folds:
        cfg = f.config
        x = torch.zeros(2, 9 if cfg["input_mode"] == "slices_windows" else 3, cfg["img_size"], cfg["img_size"],
                        dtype=torch.uint8)
        path = out_dir / f"{f.name}.onnx"
        wrapper = OnnxNet(f.model.to(memory_format=torch.contiguous_format)).eval()
        torch.onnx.export(wrapper, (x,), str(path), input_names=["image"], output_names=["probabilities", "embedding"],
                          dynamic_axes={n: {0: "batch"} for n in ("image", "probabilities", "embedding")},
                          opset_version=17, dynamo=False)  # the TorchScript exporter: no onnxscript needed
        paths.append(path)
    return paths


@dataclass
class ExportConfig:
    run: str = positional(None)       # a stage-1 run folder (OUT/runs/<run>); its stage-2 runs and blend come along
    out: str = ""                     # the bundle file (default OUT/bundles/<run>.ichbundle)
    fp16: bool = False                # store stage-1 weights in float16: half the size, probabilities within ~1e-3
    onnx: str = ""                    # also write each fold's stage-1 network as ONNX into this folder
    overwrite: bool = False           # write the bundle even when it is up to date


def main():
    a = parse_config(ExportConfig, description=__doc__, prog="python -m src.export")
    if not a.run:
        raise PipelineError("give the run folder: python -m src.export OUT/runs/<run>")
    if is_bundle(a.run):              # a bundle already: only its networks as ONNX
        if not a.onnx:
            raise PipelineError(f"{a.run} is a bundle already; --onnx DIR writes its stage-1 networks as ONNX")
        out = Path(a.run)
    else:
        out = export(a.run, a.out or None, a.fp16, a.overwrite)
    if a.onnx:
        for p in export_onnx(out, a.onnx):
            print(f"wrote {p}")


if __name__ == "__main__":
    cli_main(main)
