"""The output layout and the fingerprints of what made each output: the one module that knows both.

    OUT = outputs/<data folder name>      (or --out-dir)
    OUT/cache/            images.npy, metadata.csv, summary.json, cache_config.json (the cache's stamp),
                          labels.csv + labels.json (the label file parsed once, with its source's hash)
    OUT/runs/<run>/fold<K>/   config.yaml, fingerprint.json, preprocess.json, train.log, epochs.csv,
                          last.pth, best.pth, oof.json, oof.csv, oof_emb.npy, test.csv, test_emb.npy
    OUT/runs/<run>/predict.json           what made the folds' test.csv (its stamp and report)
    OUT/runs/seq_<run>/, boost_<run>/     the stage-2 models of <run>: the same files per fold
    OUT/report/<run>/, OUT/runs/<run>/report/   evaluation reports
    OUT/ensemble/<name>.json              a blend's weights, scores and stamp
    folds/<data>_k<K>_seed<S>.csv         fold assignments;  submissions/stage_2_<name>.csv

Fingerprints. Every step writes a *stamp* beside its output: the settings that change the result and the
fingerprints of its inputs (the cache's files and settings, the folds file, the label file, an upstream run).
Before a step writes anything it compares the stamp it would write with the one there (`guard`):
the same and finished -> the step is skipped; the same and unfinished -> it continues (resume); other
settings -> it stops, naming each difference and how to redo it, unless `--overwrite` says to redo it, in
which case the old output is removed first (so a killed redo never leaves old files under a new stamp).
Run-control settings (resume, workers, device, paths, names) are not part of a stamp: they do not
change what a step computes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .utils import CLASSES, ROOT, PipelineError, dataset_tag, write_csv, write_json

# file names inside a fold folder
CONFIG, STAMP, PREPROCESS, LOG, EPOCHS = "config.yaml", "fingerprint.json", "preprocess.json", "train.log", "epochs.csv"
LAST, BEST, OOF, OOF_EMB, TEST, TEST_EMB = "last.pth", "best.pth", "oof.csv", "oof_emb.npy", "test.csv", "test_emb.npy"
OOF_INFO = "oof.json"  # the OOF pass's own settings (TTA, best epoch), apart from the training's stamp
PREDICT = "predict.json"
STAGE2_KINDS = ("seq", "boost")


# ---------------------------------------------------------------- locations
def out_root(data_dir, out_dir=None) -> Path:
    """The outputs folder of a data folder: `out_dir` when given, else outputs/<data folder name>."""
    return Path(out_dir) if out_dir else ROOT / "outputs" / dataset_tag(data_dir)


def cache_dir(data_dir, out_dir=None) -> Path:
    return out_root(data_dir, out_dir) / "cache"


def folds_path(data_dir, k: int, seed: int) -> Path:
    return ROOT / "folds" / f"{dataset_tag(data_dir)}_k{k}_seed{seed}.csv"


def run_folds_file(data_dir, k: int, seed: int, folds_file=None) -> Path:
    """The folds file a run uses: the explicit one when given, else the standard one for (data, k, seed)."""
    return Path(folds_file) if folds_file else folds_path(data_dir, k, seed)


def load_folds(path) -> pd.DataFrame:
    """A folds file: index ID, columns PatientID and fold."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"folds file not found: {path} (run `python -m src.folds DATA_DIR --k K --fold-seed S`)")
    return pd.read_csv(path, dtype={"ID": str, "PatientID": str}).set_index("ID")


def ensemble_json(out: Path, name: str) -> Path:
    return Path(out) / "ensemble" / f"{name}.json"


def submission_path(name: str, submissions_dir=None) -> Path:
    return Path(submissions_dir or ROOT / "submissions") / f"stage_2_{name}.csv"


# ---------------------------------------------------------------- fingerprints
def fingerprint(obj) -> str:
    """A short, stable hash of JSON-able data (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path) -> str:
    """Hash of a file's bytes (folds files, label files: a few to a hundred MB, well under a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


# A step's code version: bump it when a change of the code alters what the step outputs for the same settings
# and inputs (a decoding fix, a new feature), so outputs of the old code are not reused as if they were current.
VERSIONS = {"prepare": 2, "train": 2, "predict": 2, "sequence": 2, "boost": 1, "evaluate": 2, "ensemble": 2}


@dataclass
class Stamp:
    """What made an output: the step (and its code version), the settings that change its result, and its
    inputs' fingerprints."""
    step: str
    settings: dict
    inputs: dict = field(default_factory=dict)
    version: int | None = None

    def __post_init__(self):
        if self.version is None:
            self.version = VERSIONS.get(self.step, 1)

    @property
    def id(self) -> str:
        return fingerprint({"step": self.step, "version": self.version, "settings": self.settings, "inputs": self.inputs})

    def to_dict(self) -> dict:
        return {"step": self.step, "version": self.version, "fingerprint": self.id, "settings": self.settings,
                "inputs": self.inputs}

    def save(self, path) -> None:
        write_json(self.to_dict(), path)

    @staticmethod
    def load(path) -> Stamp | None:
        path = Path(path)
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        d = d.get("stamp", d)  # a stamp may sit inside a larger record (predict.json, ensemble json)
        if not isinstance(d, dict) or "step" not in d or "settings" not in d:
            return None  # written by an older version: no fingerprint
        return Stamp(d["step"], d["settings"], d.get("inputs", {}), d.get("version", 0))

    def differences(self, old: Stamp | None) -> list[str]:
        """Human-readable differences from an older stamp: 'lr: 0.002 -> 0.001', 'input cache: changed'."""
        if old is None:
            return ["no fingerprint (made by an older version of this project, or by hand)"]
        out = [f"code version of step {self.step}: {old.version} -> {self.version}"] if old.version != self.version else []
        for k in sorted(set(old.settings) | set(self.settings)):
            a, b = old.settings.get(k, "(unset)"), self.settings.get(k, "(unset)")
            if a != b:
                out.append(f"{k}: {a} -> {b}")
        for k in sorted(set(old.inputs) | set(self.inputs)):
            if old.inputs.get(k) != self.inputs.get(k):
                out.append(f"input {k}: {old.inputs.get(k, '(none)')} -> {self.inputs.get(k, '(none)')} (it changed)")
        return out or [f"step {old.step} -> {self.step}"]


def announce_skip(what: str) -> None:
    """An up-to-date step says so; under run.sh (ICH_STEP_STATUS names a file) it tells run.sh, which prints
    its own [skip] line."""
    status = os.environ.get("ICH_STEP_STATUS")
    if status:
        Path(status).write_text("skip\n")
    else:
        print(f"up to date: {what}")


def guard(stamp: Stamp, stamp_file: Path, done: bool, overwrite: bool, what: str, clear=None, exists=None,
          redo: str = "") -> bool:
    """Decide whether a step runs, before it writes anything. True: skip (up to date); False: run.

    stamp_file: where the output's stamp lives; done: whether the output is complete; exists: whether any
    of the output is there (default: the stamp or a complete output); clear: the paths to remove before an
    overwrite; redo: how to redo it, for the message."""
    old = Stamp.load(stamp_file)
    if exists is None:
        exists = old is not None or done
    if not exists:
        return False
    if old is not None and old.id == stamp.id:
        return done  # finished: skip; unfinished: the step continues it
    diffs = stamp.differences(old)
    if not overwrite:
        raise PipelineError(
            f"{what} was made with other settings than this run's:\n    " + "\n    ".join(diffs) +
            f"\n  It was not reused and nothing was written. To redo it with the new settings: {redo or 'add --overwrite'}"
            "\n  (OVERWRITE=1 bash run.sh redoes every stale step); to keep it, run with its old settings"
            " or give the new run another name.")
    print(f"redoing {what}: " + "; ".join(diffs))
    for p in clear or []:
        p = Path(p)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return False


# ---------------------------------------------------------------- labels, parsed once per data folder
def labels(data_dir, out_dir=None, cache=None) -> tuple[pd.DataFrame, str]:
    """(wide label table by image ID, the label file's fingerprint), from OUT/cache/labels.csv (or `cache`)
    when that was made from the same file: parsing the 4.5 M-row long format costs ~16 s, reading this ~0.3 s."""
    from .labels import read_labels
    src = Path(data_dir) / "stage_2_train.csv"
    if not src.exists():
        read_labels(src)  # the standard error message
    cache = Path(cache) if cache else cache_dir(data_dir, out_dir)
    table, info = cache / "labels.csv", cache / "labels.json"
    st = src.stat()
    quick = {"source": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if table.exists() and info.exists():
        rec = json.loads(info.read_text())
        if {k: rec.get(k) for k in quick} == quick or (rec.get("size") == st.st_size and
                                                       rec.get("sha") == file_fingerprint(src)):
            return pd.read_csv(table, dtype={"ID": str}).set_index("ID").astype(np.uint8), rec["sha"]
    wide = read_labels(src)
    sha = file_fingerprint(src)
    try:
        write_csv(wide, table)
        write_json({**quick, "sha": sha, "images": len(wide)}, info)
    except OSError:  # a read-only outputs folder: parse every time rather than fail
        pass
    return wide, sha


# ---------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """A trained run: OUT/runs/<name>/ with one folder per fold. Stage-1 and stage-2 runs alike."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, data_dir, out_dir, name) -> Run:
        return cls(out_root(data_dir, out_dir) / "runs" / name)

    @property
    def name(self) -> str:
        return self.path.name

    def fold_dir(self, k: int) -> Path:
        return self.path / f"fold{k}"

    def folds(self) -> list[int]:
        """Fold numbers with a folder, sorted."""
        ks = [int(p.name[4:]) for p in self.path.glob("fold*") if p.is_dir() and p.name[4:].isdigit()]
        if not ks:
            raise PipelineError(f"no fold folders in {self.path}: is this a run folder (OUT/runs/<run>)?")
        return sorted(ks)

    def finished_folds(self) -> list[int]:
        """Folds whose out-of-fold predictions are written (the last file a fold writes)."""
        return [k for k in self.folds() if (self.fold_dir(k) / OOF).exists()]

    def config(self, k: int | None = None) -> dict:
        """A fold's config.yaml (the first fold's by default); a clear error when there is none."""
        ks = [k] if k is not None else self.folds()
        for kk in ks:
            p = self.fold_dir(kk) / CONFIG
            if p.exists():
                return yaml.safe_load(p.read_text()) or {}
        raise PipelineError(f"{self.path}: no config.yaml in {'fold' + str(k) if k is not None else 'any fold'}; "
                            f"the run is incomplete or not a run folder")

    def stage1(self) -> Run:
        """The stage-1 run this run is built on (itself for a stage-1 run)."""
        s1 = self.config().get("stage1")
        return Run(s1) if s1 else self

    def data(self) -> tuple[str, str]:
        """(data_dir, out_dir) of the run's data, through the stage-1 run for a stage-2 run."""
        cfg = self.stage1().config()
        return cfg["data_dir"], cfg.get("out_dir", "")

    def stage2(self, kind: str) -> Run:
        return Run(self.path.parent / f"{kind}_{self.name}")

    def stamp(self, k: int) -> Stamp | None:
        return Stamp.load(self.fold_dir(k) / STAMP)

    def predict_stamp(self) -> Stamp | None:
        return Stamp.load(self.path / PREDICT)

    def fingerprint(self, with_test=True) -> str:
        """Of the run's outputs as they are now: per finished fold its stamp and the bytes of its oof.csv (and
        test.csv), and what made the test predictions. Downstream steps record it as their input, so a fold
        retrained with the same settings but other results (GPU kernels are not bit-reproducible) still
        makes them stale."""
        parts = {}
        for k in self.finished_folds():
            d, st = self.fold_dir(k), self.stamp(k)
            parts[f"fold{k}"] = {"stamp": st.id if st else "unstamped", "oof": file_fingerprint(d / OOF)}
            if with_test and (d / TEST).exists():
                parts[f"fold{k}"]["test"] = file_fingerprint(d / TEST)
        ps = self.predict_stamp()
        if with_test and ps is not None:
            parts["predict"] = ps.id
        return fingerprint(parts)

    # ---- predictions
    def load_oof(self, quiet=False) -> pd.DataFrame:
        """All finished folds' OOF predictions: index ID, columns fold + six classes."""
        ks = self.finished_folds()
        if not ks:
            raise PipelineError(f"no finished fold in {self.path} (no fold*/oof.csv)")
        rest = sorted(set(self.folds()) - set(ks))
        if rest and not quiet:
            print(f"note: {self.name}: fold(s) {rest} not finished; using the others")
        oof = pd.concat([read_preds(self.fold_dir(k) / OOF) for k in ks])
        dup = oof.index.duplicated()
        if dup.any():
            raise PipelineError(f"{self.path}: an image appears in two folds' OOF files, e.g. {oof.index[dup][:3].tolist()}")
        return oof

    def load_test(self) -> pd.DataFrame:
        """Mean of the folds' test predictions (index ID, six classes)."""
        parts = [read_preds(self.fold_dir(k) / TEST)[CLASSES] for k in self.folds() if (self.fold_dir(k) / TEST).exists()]
        if not parts:
            raise PipelineError(f"{self.path}: no fold*/test.csv; run `python -m src.predict {self.path}` "
                                f"(or the stage-2 step) first")
        ids = parts[0].index
        for p in parts[1:]:
            if len(p) != len(ids) or not p.index.isin(ids).all():
                raise PipelineError(f"{self.path}: the folds' test.csv files cover different images")
        return sum(p.loc[ids] for p in parts) / len(parts)

    def fold_outputs(self, which: str, k: int) -> tuple[pd.DataFrame, np.ndarray]:
        """One fold's `oof` or `test` predictions (index ID) and embeddings (rows in the same order)."""
        d = self.fold_dir(k)
        csv, npy = (d / OOF, d / OOF_EMB) if which == "oof" else (d / TEST, d / TEST_EMB)
        if not csv.exists() or not npy.exists():
            raise PipelineError(f"{d}: missing {csv.name} or {npy.name}; finish "
                                f"{'training (src.train)' if which == 'oof' else 'src.predict'} for fold {k} first")
        df = read_preds(csv)
        emb = np.load(npy, mmap_mode="r")
        if len(emb) != len(df):
            raise PipelineError(f"{npy}: {len(emb)} rows but {csv.name} has {len(df)}: rerun the step that wrote them")
        return df, emb


def read_preds(path) -> pd.DataFrame:
    """A predictions CSV (oof.csv / test.csv): index ID, the six classes (and fold / source columns)."""
    df = pd.read_csv(path, dtype={"ID": str}).set_index("ID")
    missing = [c for c in CLASSES if c not in df.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {missing}")
    return df


# ---------------------------------------------------------------- what a run knows
CARD = "card.json"


def run_card(run: Run) -> dict:
    """What a stage-1 run was trained on and how well it did out of fold, for whoever reads its predictions:
    RUN/card.json (written by src.evaluate, so it travels with a copied run folder), else what can be read now."""
    p = run.path / CARD
    if p.exists():
        return json.loads(p.read_text())
    return make_card(run)


def make_card(run: Run) -> dict:
    cfg = run.config()
    data_dir, out_dir = cfg.get("data_dir", ""), cfg.get("out_dir", "")
    card = {"run": run.name, "model": cfg.get("model"), "img_size": cfg.get("img_size"), "data_dir": str(data_dir),
            "data": dataset_tag(data_dir) if data_dir else "unknown", "folds": run.finished_folds(),
            "images": None, "patients": None, "synthetic": None, "oof_weighted_log_loss": None, "oof_auc_any": None,
            "stage": "stage 1"}
    try:
        folds = pd.read_csv(run_folds_file(data_dir, cfg["k"], cfg["fold_seed"], cfg.get("folds_file")),
                            usecols=["ID", "PatientID"], dtype=str)
        card["images"], card["patients"] = len(folds), int(folds["PatientID"].nunique())
    except (OSError, ValueError, KeyError):
        pass
    summary = cache_dir(data_dir, out_dir) / "summary.json"
    if summary.exists():
        card["synthetic"] = bool(json.loads(summary.read_text()).get("synthetic", False))
    elif data_dir:
        from .prepare import SYNTHETIC_MARKER
        card["synthetic"] = (Path(data_dir) / SYNTHETIC_MARKER).exists() or None
    family = {run.name: "stage1", f"seq_{run.name}": "seq", f"boost_{run.name}": "boost"}
    for rep in (out_root(data_dir, out_dir) / "report" / run.name / "summary.json", run.path / "report" / "summary.json"):
        if not rep.exists():
            continue
        s = json.loads(rep.read_text())
        res, w = s.get("runs", {}), s.get("blend_weights", {})
        if w and set(w) <= set(family):  # a blend of this run's own stages: what the Predictor applies
            card["blend_weights"] = {family[n]: x for n, x in w.items()}  # per class
            best = res.get("blend, cross-fitted", res["blend"])  # the honest figure: weights from the other folds
            card["stage"] = "blend of " + ", ".join(family[n] for n in w) + ", per-class weights"
        elif run.name in res:
            best, card["stage"] = res[run.name], "stage 1"
        else:
            continue
        card.update(oof_weighted_log_loss=best["weighted_log_loss"], oof_auc_any=best["per_class"]["any"]["auc"])
        break
    return card


def card_text(card: dict) -> str:
    """One paragraph a person can read next to the model's output."""
    def fmt(v, f="{:.4f}"):
        return "unknown" if v is None or (isinstance(v, float) and np.isnan(v)) else f.format(v)
    s = (f"Trained on '{card.get('data', 'unknown')}' ({card.get('data_dir', '?')}): {fmt(card.get('images'), '{:,}')} "
         f"images of {fmt(card.get('patients'), '{:,}')} patients, {len(card.get('folds') or [])} fold model(s). "
         f"Out of fold ({card.get('stage', 'stage 1')}): weighted log loss {fmt(card.get('oof_weighted_log_loss'))}, "
         f"AUC(any) {fmt(card.get('oof_auc_any'), '{:.3f}')}.")
    return s
