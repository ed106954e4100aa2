"""A trained run as files: its folds, config, predictions and embeddings, and what made them.

    Run(path).folds(), .finished_folds(), .config(k), .load_oof(), .load_test(), .fold_outputs("oof", k),
    .stage1(), .stage2("seq"), .fingerprint()

Stage-1 and stage-2 runs alike (a stage-2 run's config names its stage-1 run). Where the files live is
src.layout's; what made them, src.stamps'.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import layout
from .layout import CONFIG, OOF, OOF_EMB, PREDICT, STAMP, TEST, TEST_EMB
from .stamps import Stamp, file_fingerprint, fingerprint
from .utils import CLASSES, PipelineError


def load_folds(path) -> pd.DataFrame:
    """A folds file: index ID, columns PatientID and fold."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"folds file not found: {path} (run `python -m src.folds DATA_DIR --k K --fold-seed S`)")
    return pd.read_csv(path, dtype={"ID": str, "PatientID": str}).set_index("ID")


@dataclass(frozen=True)
class Run:
    """A trained run: OUT/runs/<name>/ with one folder per fold. Stage-1 and stage-2 runs alike."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, data_dir, out_dir, name) -> Run:
        return cls(layout.run_dir(layout.out_root(data_dir, out_dir), name))

    @property
    def name(self) -> str:
        return self.path.name

    def fold_dir(self, k: int) -> Path:
        return layout.fold_dir(self.path, k)

    def folds(self) -> list[int]:
        """Fold numbers with a folder, sorted."""
        ks = [k for p in self.path.glob("fold*") if p.is_dir() and (k := layout.fold_number(p)) is not None]
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
        return Run(layout.stage2_dir(self.path, kind))

    def is_stage2(self) -> bool:
        return layout.stage2_kind(self.path) is not None and "stage1" in self.config()

    def has_finished_fold(self) -> bool:
        return self.path.is_dir() and any((p / OOF).exists() for p in self.path.glob("fold*"))

    def family(self) -> list[Run]:
        """A stage-1 run and those of its stage-2 runs with a finished fold: stage 1, then GRU, then trees."""
        return [self] + [s for s in map(self.stage2, layout.STAGE2_KINDS) if s.has_finished_fold()]

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
