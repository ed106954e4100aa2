"""The output layout: where each step's outputs live and what the files in them are called. No other module, and
not run.sh, spells one of these paths; they ask here.

    OUT = outputs/<data folder name>      (or --out-dir)
    OUT/cache/            images.bin (src.prepare's compact cache), metadata.csv, summary.json, cache_config.json (the cache's stamp),
                          labels.csv + labels.json (the label file parsed once, with its source's hash)
    OUT/runs/<run>/fold<K>/   config.yaml, fingerprint.json, preprocess.json, train.log, epochs.csv,
                          last.pth, best.pth, oof.json, oof.csv, oof_emb.npy, test.csv, test_emb.npy
    OUT/runs/<run>/predict.json, card.json   what made the folds' test.csv; what the run knows (src.card)
    OUT/runs/seq_<run>/, boost_<run>/     the stage-2 models of <run> (the GRU, the trees): the same files per fold
    OUT/blends/<name>.json                blend weights fitted on OOF predictions (src.blend); <run>.json: a run's
                                          own stages, which the Predictor applies
    OUT/report/<run>/                     the evaluation report of a run and its stages (src.evaluate)
    OUT/submissions/<name>.json           what made a submission;  OUT/bundles/<run>.ichbundle: a portable model
    folds/<data>_k<K>_seed<S>.csv         fold assignments;  submissions/stage_2_<name>.csv

run.sh asks for the paths it passes between steps:

    python -m src.layout tag --data-dir DATA               # the data folder's name
    python -m src.layout out --data-dir DATA               # OUT
    python -m src.layout run --out-dir OUT --name NAME     # OUT/runs/NAME
    python -m src.layout submission --name NAME [--submissions-dir DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---- a Kaggle-layout data folder
SPLITS = {"train": "stage_2_train_images", "test": "stage_2_test_images"}
LABELS_CSV, SAMPLE_CSV = "stage_2_train.csv", "stage_2_sample_submission.csv"
SYNTHETIC_MARKER = "GENERATED_BY_SRC_SYNTH.txt"  # src.synth leaves it in the folders it writes; the cache records it

# ---- files of a fold folder, and of a run folder
CONFIG, STAMP, PREPROCESS, LOG, EPOCHS = "config.yaml", "fingerprint.json", "preprocess.json", "train.log", "epochs.csv"
LAST, BEST, OOF, OOF_EMB, TEST, TEST_EMB = "last.pth", "best.pth", "oof.csv", "oof_emb.npy", "test.csv", "test_emb.npy"
OOF_INFO = "oof.json"  # the OOF pass's own settings (TTA, best epoch), apart from the training's stamp
FINISHED = OOF         # the last file a fold writes: its presence means the fold is finished
PREDICT, CARD = "predict.json", "card.json"
TENSORBOARD = "tb"     # TensorBoard event files of a stage-1 fold
STAGE2_KINDS = ("seq", "boost")
BUNDLE_SUFFIX = ".ichbundle"


def dataset_tag(data_dir) -> str:
    """The name that keeps the outputs of two data folders apart: the folder's own name."""
    return Path(data_dir).resolve().name


def out_root(data_dir, out_dir=None) -> Path:
    """The outputs folder of a data folder: `out_dir` when given, else outputs/<data folder name>."""
    return Path(out_dir) if out_dir else ROOT / "outputs" / dataset_tag(data_dir)


def cache_dir(data_dir, out_dir=None) -> Path:
    return out_root(data_dir, out_dir) / "cache"


# ---- files of the image cache (OUT/cache): src.prepare builds them, src.cache reads them. old_images / old_partial
# are the uncompressed format's (VERSIONS["prepare"] < 3), removed by an --overwrite rebuild; labels / labels_info:
# the label file parsed once (src.labels.cached_labels)
CACHE_FILES = dict(images="images.bin", partial="images.partial.bin", meta="metadata.csv", summary="summary.json",
                   config="cache_config.json", chunks="chunks", old_images="images.npy", old_partial="images.partial.npy",
                   labels="labels.csv", labels_info="labels.json")


def cache_files(cache: Path) -> dict[str, Path]:
    """The image cache's files in the folder `cache` (CACHE_FILES' names)."""
    return {k: Path(cache) / v for k, v in CACHE_FILES.items()}


def folds_path(data_dir, k: int, seed: int) -> Path:
    return ROOT / "folds" / f"{dataset_tag(data_dir)}_k{k}_seed{seed}.csv"


def run_folds_file(data_dir, k: int, seed: int, folds_file=None) -> Path:
    """The folds file a run uses: the explicit one when given, else the standard one for (data, k, seed)."""
    return Path(folds_file) if folds_file else folds_path(data_dir, k, seed)


def run_dir(out: Path, name: str) -> Path:
    return Path(out) / "runs" / name


def fold_dir(run: Path, k: int) -> Path:
    return Path(run) / f"fold{k}"


def fold_number(path: Path) -> int | None:
    """K of a fold<K> folder, else None."""
    name = Path(path).name
    return int(name[4:]) if name.startswith("fold") and name[4:].isdigit() else None


def stage2_dir(stage1_run: Path, kind: str) -> Path:
    """The stage-2 run of `kind` (seq: the GRU, boost: the trees) built on a stage-1 run: beside it."""
    if kind not in STAGE2_KINDS:
        raise ValueError(f"stage-2 kind must be one of {STAGE2_KINDS}, not {kind!r}")
    return Path(stage1_run).parent / f"{kind}_{Path(stage1_run).name}"


def stage2_kind(run: Path) -> str | None:
    """seq or boost for a folder named as stage2_dir names them, else None."""
    head = Path(run).name.split("_", 1)[0]
    return head if head in STAGE2_KINDS and "_" in Path(run).name else None


def run_out_root(run: Path) -> Path:
    """OUT of a run folder OUT/runs/<run>."""
    return Path(run).parent.parent


def report_dir(run: Path) -> Path:
    """Where the report of a run and its stages goes: OUT/report/<run>."""
    return run_out_root(run) / "report" / Path(run).name


# the files of a report folder (src.evaluate)
REPORT_FILES = dict(summary="summary.json", markdown="report.md", roc="roc.png", calibration="calibration.png",
                    loss_curves="loss_curves.png")


def report_files(report: Path) -> dict[str, Path]:
    return {k: Path(report) / v for k, v in REPORT_FILES.items()}


def subsets_dir(where=None) -> Path:
    """Where src.subset puts its data folders (outputs/subsets by default)."""
    return Path(where) if where else ROOT / "outputs" / "subsets"


def blend_file(out: Path, name: str) -> Path:
    return Path(out) / "blends" / f"{name}.json"


def run_blend_file(run: Path) -> Path:
    """The blend of a stage-1 run's own stages (stage 1, GRU, trees): named after the run."""
    return blend_file(run_out_root(run), Path(run).name)


def submission_record(out: Path, name: str) -> Path:
    """What made submissions/stage_2_<name>.csv (src.make_submission): OUT/submissions/<name>.json."""
    return Path(out) / "submissions" / f"{name}.json"


def submission_path(name: str, submissions_dir=None) -> Path:
    return Path(submissions_dir or ROOT / "submissions") / f"stage_2_{name}.csv"


def bundle_path(run: Path) -> Path:
    """Where src.export writes a run's bundle by default: OUT/bundles/<run>.ichbundle."""
    return run_out_root(run) / "bundles" / (Path(run).name + BUNDLE_SUFFIX)


def bundle_stamp(bundle: Path) -> Path:
    """What made a bundle (src.export's stamp): beside it, <bundle>.stamp.json."""
    return Path(bundle).with_name(Path(bundle).name + ".stamp.json")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m src.layout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tag", "out", "run", "submission", "bundle"], help="which path to print")
    ap.add_argument("--data-dir", default="", help="a Kaggle-layout data folder (tag, out)")
    ap.add_argument("--out-dir", default="", help="outputs root, OUT (run, bundle)")
    ap.add_argument("--name", default="", help="run or submission name (run, submission, bundle)")
    ap.add_argument("--submissions-dir", default="", help="default submissions/")
    a = ap.parse_args(argv)
    need = {"tag": "data_dir", "out": "data_dir", "run": "name", "submission": "name", "bundle": "name"}[a.what]
    if not getattr(a, need):
        ap.error(f"{a.what} needs --{need.replace('_', '-')}")
    print({"tag": lambda: dataset_tag(a.data_dir), "out": lambda: out_root(a.data_dir),
           "run": lambda: run_dir(Path(a.out_dir), a.name),
           "submission": lambda: submission_path(a.name, a.submissions_dir or None),
           "bundle": lambda: bundle_path(run_dir(Path(a.out_dir), a.name))}[a.what]())


if __name__ == "__main__":
    main()
