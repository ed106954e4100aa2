"""Validating a bundle on a site's own labelled scans (src.serve.validate, src.serve.site): the real CQ500 series with
a reads.csv row written for it; generated studies with known labels, whose figures are checked against
scikit-learn's roc_auc_score and hand-computed rates; every malformed label file; a site copy of the bundle that
loads and moves the demo's verdict to the site's threshold.

    .venv/bin/python -m pytest -q tests/test_validate.py
"""
import hashlib
import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid
from sklearn.metrics import roc_auc_score

import src.serve.validate as V
from src.evaluate import evaluate_runs
from src.export import export
from src.intervals import Draws
from src.predictor import Predictor
from src.scans import list_inputs
from src.serve.results import analyse_study
from src.serve.site import SiteLabels, match_labels, read_site_labels
from src.synth import generate
from src.utils import CLASSES, PipelineError, cli_main

from .conftest import CQ500, copy_run

RESAMPLES = 60
VENDORS = [("GE MEDICAL SYSTEMS", "Revolution", "STANDARD"), ("SIEMENS", "SOMATOM Force", "Hr38")]
# CQ500's reads.csv header, as the dataset ships it (44 columns: three readers' 14 findings)
FINDINGS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
            "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift"]
CQ500_HEADER = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in FINDINGS]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def card_of(bundle) -> dict:
    """A bundle's model card, read from its model.json."""
    return json.loads(zipfile.ZipFile(bundle).read("model.json"))["card"]


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    """The session's run, copied, reported (its card gets the out-of-fold operating point) and exported."""
    run = copy_run(trained_run, "val")
    evaluate_runs([run], stage1_only=False, resamples=50, quiet=True)
    return export(run, tmp_path_factory.mktemp("bundle") / "model.ichbundle", quiet=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Nine generated studies of eight patients (one has two) with known scan labels (the highest slice label per
    class), one folder each, half from a GE scanner and half from a Siemens one; and a tenth study, a copy of the
    first with a contrast agent, that the series selector refuses."""
    root = tmp_path_factory.mktemp("site")
    slices = generate(root / "raw", n_patients=8, n_test_series=1, slices=(7, 9), image_size=64, positive_rate=0.5,
                      seed=4, quiet=True)
    studies = {}
    for f in sorted((root / "raw" / "stage_2_train_images").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        studies.setdefault(ds.StudyInstanceUID, []).append((f, ds))
    rows = []
    for i, (study, items) in enumerate(sorted(studies.items())):
        d = root / "scans" / f"scan{i:02d}"
        d.mkdir(parents=True)
        for f, ds in items:
            ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel = VENDORS[i % 2]
            ds.save_as(d / f.name)
        y = slices.reindex([f.stem for f, _ in items]).max()
        rows.append({"StudyInstanceUID": study, "SeriesInstanceUID": items[0][1].SeriesInstanceUID, "folder": d.name,
                     "patient": items[0][1].PatientID, "vendor": VENDORS[i % 2][0], **{c: int(y[c]) for c in CLASSES}})
    contrast = {**rows[0], "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "folder": "scan99",
                "any": 1, "subdural": 1}
    (root / "scans" / "scan99").mkdir()
    for f in (root / "scans" / "scan00").iterdir():
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.ContrastBolusAgent = (contrast["StudyInstanceUID"],
                                                                            contrast["SeriesInstanceUID"], "IOHEXOL")
        ds.save_as(root / "scans" / "scan99" / f.name)
    truth = pd.DataFrame(rows + [contrast])
    assert 4 <= truth["any"].iloc[:-1].sum() <= 5 and truth.patient.nunique() == 8  # the seed's draw, relied on below
    return SimpleNamespace(dir=root / "scans", truth=truth, contrast=contrast["StudyInstanceUID"], root=root)


def write_labels(path, truth: pd.DataFrame, key="StudyInstanceUID", classes=CLASSES) -> Path:
    truth[[key, *classes]].to_csv(path, index=False)
    return path


def config(bundle, dicom_dir, labels, report_dir, **kw) -> V.ValidateConfig:
    return V.ValidateConfig(run=str(bundle), dicom_dir=str(dicom_dir), labels=str(labels), report_dir=str(report_dir),
                            resamples=RESAMPLES, device="cpu", **kw)


@pytest.fixture(scope="module")
def validated(bundle, site):
    """The command on the generated site, choosing a site threshold and writing a site copy of the bundle."""
    before = sha(bundle)
    labels = write_labels(site.root / "labels.csv", site.truth)
    cfg = config(bundle, site.dir, labels, site.root / "report", choose_threshold="sensitivity=0.95",
                 site_bundle=str(site.root / "site.ichbundle"))
    s = V.validate(cfg, progress=False)
    scans = pd.read_csv(site.root / "report" / "scans.csv").set_index("StudyInstanceUID")
    return SimpleNamespace(summary=s, cfg=cfg, scans=scans, before=before, report=site.root / "report")


def scored_truth(site, validated) -> pd.DataFrame:
    """The scored scans' known labels and the command's scores, by study."""
    t = site.truth[site.truth.StudyInstanceUID != site.contrast].set_index("StudyInstanceUID")
    return t.join(validated.scans[[f"p_{c}" for c in CLASSES]])


def test_scores_are_the_predictors_and_the_refused_study_is_left_out(validated, site, bundle):
    """Each scan's score is the Predictor's highest slice probability on the study's files; the contrast study is
    listed, with the selector's reason, in the report's opening and left out of every figure."""
    s, scans = validated.summary, validated.scans
    assert s["scans"]["studies"] == 10 and s["scans"]["scored"] == 9 and s["scans"]["patients"] == 8
    assert s["scans"]["bleeding"] == int(site.truth["any"].iloc[:-1].sum())
    assert not scans.loc[site.contrast, "scored"] and scans.scored.sum() == 9
    assert "contrast agent 'IOHEXOL': the model learned non-contrast CT" in scans.loc[site.contrast, "reason"]
    with pytest.warns(UserWarning, match="1 file"):  # the generator's truncated file
        table = Predictor.load(bundle, "cpu").predict(list_inputs([site.dir]))
    per_series = table.groupby("series")[CLASSES].max()
    for row in site.truth.iloc[:-1].itertuples():
        for c in CLASSES:
            assert scans.loc[row.StudyInstanceUID, f"p_{c}"] == pytest.approx(per_series.loc[row.SeriesInstanceUID, c],
                                                                              abs=1e-6)
    report = (validated.report / "report.md").read_text()
    opening = report[report.index("## What was scored"):report.index("## The model")]
    assert f"| {site.contrast} | scan99 | 11 | no series the model can read: series" in opening
    assert "Not scored: 1, left out of every figure" in opening
    order = [report.index(h) for h in ("## What was scored", "## The model", "## Training against this site",
                                       "## Figures at this site", "## By manufacturer", "## This site's threshold")]
    assert order == sorted(order)


def test_figures_match_scikit_learn_and_hand_counts(validated, site):
    s, t = validated.summary, scored_truth(site, validated)
    f = s["figures"]
    for c in CLASSES:
        y, p = t[c].to_numpy(), t[f"p_{c}"].to_numpy()
        if 0 < y.sum() < len(y):
            assert f["auc"][c]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12), c
        else:
            assert c not in f["auc"]
        assert f["brier"][c]["value"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12)
    assert s["threshold"]["value"] == card_of(validated.cfg.run)["operating_point"]["threshold"]
    # at the bundle's threshold, and at the site's (which flags scans: PPVs defined)
    for at in (f["at_threshold"], s["site_threshold"]["at_threshold"]):
        y, flag = t["any"].to_numpy() == 1, t["p_any"].to_numpy() >= at["threshold"]
        tp, fp, tn, fn = (y & flag).sum(), (~y & flag).sum(), (~y & ~flag).sum(), (y & ~flag).sum()
        assert at["counts"] == {"true_positive": tp, "false_negative": fn, "false_positive": fp, "true_negative": tn}
        with np.errstate(invalid="ignore", divide="ignore"):
            sens, spec, ppv, npv = tp / (tp + fn), tn / (tn + fp), np.float64(tp) / (tp + fp), np.float64(tn) / (tn + fn)
            ppv6 = sens * 0.06 / (sens * 0.06 + (1 - spec) * 0.94)
            npv6 = spec * 0.94 / (spec * 0.94 + (1 - sens) * 0.06)
        for k, v in (("sensitivity", sens), ("specificity", spec), ("ppv_site", ppv), ("npv_site", npv),
                     ("ppv_stated", ppv6), ("npv_stated", npv6)):
            assert at[k]["value"] == pytest.approx(v, abs=1e-12, nan_ok=True), k
        assert at["site_prevalence"] == pytest.approx(y.mean())
    assert s["site_threshold"]["at_threshold"]["counts"]["false_positive"] > 0  # a PPV below 1 was checked


def test_intervals_are_a_bootstrap_over_patients(validated, site):
    """The AUC interval equals the central 95% of scikit-learn's weighted AUC over draws of whole patients (the
    patient with two studies brings both), and the specificity interval the same draws' hand counts."""
    t = scored_truth(site, validated)
    draws = Draws(t.patient, RESAMPLES, 0)
    w = draws.weights(t.patient)
    assert validated.summary["bootstrap"]["patients"] == 8 and len(t) == 9
    twice = t.patient.value_counts().idxmax()
    both = np.flatnonzero(t.patient.to_numpy() == twice)
    assert len(both) == 2 and (w[:, both[0]] == w[:, both[1]]).all()
    y, p = t["any"].to_numpy(), t["p_any"].to_numpy()
    aucs = [roc_auc_score(y, p, sample_weight=x) for x in w if x[y == 1].sum() > 0 and x[y == 0].sum() > 0]
    got = validated.summary["figures"]["auc"]["any"]["ci"]
    assert got == pytest.approx([np.quantile(aucs, 0.025), np.quantile(aucs, 0.975)], abs=1e-12)
    flag = p >= validated.summary["threshold"]["value"]
    specs = [(x * ((y == 0) & ~flag)).sum() / (x * (y == 0)).sum() for x in w if (x * (y == 0)).sum() > 0]
    assert validated.summary["figures"]["at_threshold"]["specificity"]["ci"] == pytest.approx(
        [np.quantile(specs, 0.025), np.quantile(specs, 0.975)], abs=1e-12)


def test_figures_by_manufacturer_model_and_kernel(validated, site):
    by, t = validated.summary["by"], scored_truth(site, validated)
    assert set(by) == {"manufacturer", "scanner model", "kernel"}
    assert set(by["manufacturer"]) == {"GE MEDICAL SYSTEMS", "SIEMENS"} and set(by["kernel"]) == {"STANDARD", "Hr38"}
    for vendor, g in t.groupby("vendor"):
        f = by["manufacturer"][vendor]
        assert f["scans"] == len(g) and f["positive"]["any"] == g["any"].sum()
        assert f["brier"]["any"]["value"] == pytest.approx(np.mean((g.p_any - g["any"]) ** 2), abs=1e-12)
        if 0 < g["any"].sum() < len(g):
            assert f["auc"]["any"]["value"] == pytest.approx(roc_auc_score(g["any"], g.p_any), abs=1e-12)
    assert by["manufacturer"]["GE MEDICAL SYSTEMS"]["scans"] == by["kernel"]["STANDARD"]["scans"]


def test_the_headline_compares_with_the_bundles_out_of_fold_figures(validated, bundle):
    op = card_of(bundle)["operating_point"]
    rows = validated.summary["comparison"]
    assert rows[0]["figure"] == "AUC of `any`, per scan"
    assert rows[0]["training"]["value"] == op["auc"] and rows[0]["training"]["ci"] == op["auc_ci"]
    site_auc = validated.summary["figures"]["auc"]["any"]["value"]
    assert rows[0]["site"]["value"] == site_auc and rows[0]["drop"] == pytest.approx(op["auc"] - site_auc)
    assert [r["training"]["value"] for r in rows[1:]] == [op["sensitivity"], op["specificity"]]
    report = (validated.report / "report.md").read_text()
    assert f"**AUC of `any`, per scan: {op['auc']:.3f} [{op['auc_ci'][0]:.3f}, {op['auc_ci'][1]:.3f}] out of fold" in report


def test_the_site_threshold_and_its_copy_of_the_bundle(validated, site, bundle):
    """The threshold flags 95% of the bleeding scans (by hand); the copy loads, carries it and where it came from, its
    manifest names the original (untouched); the demo's verdict moves to it."""
    c, t = validated.summary["site_threshold"], scored_truth(site, validated)
    pos = np.sort(t.loc[t["any"] == 1, "p_any"].to_numpy())[::-1]
    assert c["threshold"] == pytest.approx(pos[math.ceil(0.95 * len(pos)) - 1], abs=1e-5)
    assert c["at_threshold"]["sensitivity"]["value"] == 1.0 and c["threshold_ci"][0] <= c["threshold_ci"][1]
    assert sha(bundle) == validated.before
    copy = Path(validated.cfg.site_bundle)
    original, p = Predictor.load(bundle, "cpu"), Predictor.load(copy, "cpu")
    op = p.card["operating_point"]
    assert op["source"] == "site" and op["threshold"] == c["threshold"] and op["site"]["scans"] == 9
    assert op["out_of_fold"] == original.card["operating_point"]
    manifest = json.loads(zipfile.ZipFile(copy).read("manifest.json"))
    assert manifest["provenance"]["derived_from"]["sha256"] == validated.before
    assert manifest["provenance"]["change"]["card.operating_point"]["to"]["threshold"] == c["threshold"]
    old_t = original.card["operating_point"]["threshold"]
    between = t[(t.p_any >= c["threshold"]) & (t.p_any < old_t)]
    assert len(between), "the site's threshold must flag a scan the bundle's own does not"
    folder = site.truth.set_index("StudyInstanceUID").loc[between.index[0], "folder"]
    files = list_inputs([site.dir / folder])
    (a,), _ = analyse_study(original, files, cam_slices=0)
    (b,), _ = analyse_study(p, files, cam_slices=0)
    assert a.summary["verdict"] == "no hemorrhage found" and b.summary["verdict"] == "suspected hemorrhage"
    assert b.summary["threshold"] == c["threshold"]
    assert b.summary["threshold_from"].startswith("the site's operating point, chosen on 9 of its own labelled scans "
                                                  "(5 bleeding; labels labels.csv, ")
    assert "among the site's 9 labelled scans it was chosen on" in b.summary["notes"][1]


def test_other_keys_give_the_same_figures_and_kept_scores_are_reused(validated, site, tmp_path, monkeypatch):
    """Labels keyed by folder or by SeriesInstanceUID match the same studies; a second run reuses each study's kept
    scores, and a study whose file changed, or whose kept file is damaged, is scored again."""
    calls = []
    real = V.score_study
    monkeypatch.setattr(V, "score_study", lambda p, files, *a: calls.append(files) or real(p, files, *a))
    for key in ("folder", "SeriesInstanceUID"):
        report = tmp_path / key
        shutil.copytree(validated.report / "scores", report / "scores")
        labels = write_labels(tmp_path / f"{key}.csv", site.truth, key)
        s = V.validate(config(validated.cfg.run, site.dir, labels, report), progress=False)
        assert s["inputs"]["key"] == key and V._plain(s["figures"]) == V._plain(validated.summary["figures"])
    assert calls == []
    changed = next((site.dir / "scan03").iterdir())
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    damaged = site.truth.set_index("folder").loc["scan05", "StudyInstanceUID"]
    (tmp_path / "folder" / "scores" / f"{hashlib.sha256(damaged.encode()).hexdigest()[:20]}.json").write_text("{")
    V.validate(config(validated.cfg.run, site.dir, tmp_path / "folder.csv", tmp_path / "folder"), progress=False)
    assert sorted(Path(f[0]).parent.name for f in calls) == ["scan03", "scan05"]


@pytest.fixture(scope="module")
def cq500(tmp_path_factory):
    """The real CQ500 series (JPEG Lossless, read "no ICH" by 2 of 3 readers) in a folder of its own."""
    if not CQ500.exists():
        pytest.skip("../shared/ct_other (the real CQ500 series) not present")
    d = tmp_path_factory.mktemp("cq500") / "scans"
    shutil.copytree(CQ500, d / CQ500.name)
    return d


def write_reads(path, rows: list[dict], header=CQ500_HEADER) -> Path:
    lines = [",".join(header)] + [",".join(str(r.get(c, 0)) for c in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_real_cq500_series_with_its_reads_csv_row(bundle, cq500, tmp_path):
    """One reader saw an intraparenchymal bleed, two saw none: the reference is no ICH. The name is matched to the
    study by its PatientID (CQ500's files carry it; the folder has another name)."""
    reads = write_reads(tmp_path / "reads.csv", [{"name": "CQ500-CT-0", "Category": "B1", "R1:ICH": 1, "R1:IPH": 1,
                                                  "R1:BleedLocation-Left": 1}])
    s = V.validate(config(bundle, cq500, reads, tmp_path / "report"), progress=False)
    assert s["inputs"]["format"] == "cq500" and s["scans"]["scored"] == 1 and s["scans"]["bleeding"] == 0
    scans = pd.read_csv(tmp_path / "report" / "scans.csv", keep_default_na=False)
    assert scans.reader_votes.tolist() == ["ICH 1/3 IPH 1/3 IVH 0/3 SDH 0/3 EDH 0/3 SAH 0/3"]
    assert scans.patient.tolist() == ["CQ500-CT-0"] and scans.kernel.tolist() == ["STANDARD"]
    assert (scans[[f"y_{c}" for c in CLASSES]] == 0).all().all()
    p_any = Predictor.load(bundle, "cpu").predict(list_inputs([cq500]))["any"].max()
    assert scans.p_any.iloc[0] == pytest.approx(p_any, abs=1e-5)
    at = s["figures"]["at_threshold"]
    assert at["specificity"]["value"] == float(p_any < s["threshold"]["value"])
    assert math.isnan(at["sensitivity"]["value"]) and s["figures"]["auc"] == {}
    assert list(s["by"]) == ["kernel"]  # the CQ500 headers name no manufacturer or model
    report = (tmp_path / "report" / "report.md").read_text()
    assert "majority of readers R1-R3 per finding" in report and "(undefined here: it needs bleeding and clean" in report


BAD_PLAIN = [  # (what, file text from the site's rows (a function of the rows' CSV lines), message fragment)
    ("a value other than 0/1", lambda h, r: [h, r[0], r[1][:-1] + "2", *r[2:]], "line 3: any is '2'; a label is 0 or 1"),
    ("a word for a value", lambda h, r: [h, r[0][:-1] + "yes", *r[1:]], "line 2: any is 'yes'; a label is 0 or 1"),
    ("an empty value", lambda h, r: [h, r[0][:-1], *r[1:]], "line 2: any is ''; a label is 0 or 1"),
    ("a duplicate", lambda h, r: [h, *r, r[1]], "lines 3, 12: StudyInstanceUID"),
    ("a subtype without any", lambda h, r: [h, ",".join(r[0].split(",")[:-2] + ["1", "0"]), *r[1:]],
     "line 2: subdural is 1 but any is 0"),
    ("a misspelt column", lambda h, r: [h.replace("subdural", "subdual"), *r], "unknown column(s) ['subdual']"),
    ("no any", lambda h, r: [",".join(h.split(",")[:-1])] + [",".join(x.split(",")[:-1]) for x in r],
     "no `any` column"),
    ("two keys", lambda h, r: [h.replace("epidural", "folder"), *r], "key columns ['StudyInstanceUID', 'folder']"),
    ("no key", lambda h, r: [h.replace("StudyInstanceUID", "study"), *r], "neither a plain label file"),
    ("a short row", lambda h, r: [h, r[0].rsplit(",", 1)[0], *r[1:]], "line 2: 6 field(s), the header has 7"),
    ("an empty key", lambda h, r: [h, "," + r[0].split(",", 1)[1], *r[1:]], "line 2: the StudyInstanceUID is empty"),
    ("a header alone", lambda h, r: [h], "a header and no row"),
    ("a label without scans", lambda h, r: [h, *r, "1.2.3.4,0,0,0,0,0,0"],
     "line 12: StudyInstanceUID '1.2.3.4' names no study under"),
    ("scans without a label", lambda h, r: [h, *r[:3], *r[4:]], "(scans without a label): add a row for it"),
]


@pytest.mark.parametrize("what,make,message", BAD_PLAIN, ids=[b[0] for b in BAD_PLAIN])
def test_a_malformed_label_file_is_an_error_naming_file_and_line(site, tmp_path, what, make, message):
    """Each is refused before the model is loaded or anything scored."""
    good = write_labels(tmp_path / "good.csv", site.truth).read_text().splitlines()
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(make(good[0], good[1:])) + "\n")
    with pytest.raises(PipelineError) as e:
        V.validate(config("no-bundle-needed.ichbundle", site.dir, path, tmp_path / "report"), progress=False)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("content,message", [
    (b"", "empty; a label file has a header"), (b"\xff\xfe\x00\x81 labels", "not a readable text file"),
    (None, "label file not found")])
def test_an_unreadable_label_file(site, tmp_path, content, message):
    path = tmp_path / "labels.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        read_site_labels(path)


def test_a_malformed_reads_csv(cq500, tmp_path):
    row = {"name": "CQ500-CT-0", "Category": "B1"}
    cases = [(write_reads(tmp_path / "a.csv", [row], [c for c in CQ500_HEADER if c != "R2:SAH"]),
              "without the column(s) ['R2:SAH']"),
             (write_reads(tmp_path / "b.csv", [{**row, "R3:ICH": 2}]), "line 2: R3:ICH is '2'; a reader's read is 0 or 1"),
             (write_reads(tmp_path / "c.csv", [row, row]), "lines 2, 3: name 'CQ500-CT-0' is given 2 times"),
             (write_reads(tmp_path / "d.csv", [row, {**row, "name": "CQ500-CT-1"}]),
              "line 3: name 'CQ500-CT-1' names no study under"),
             (write_reads(tmp_path / "e.csv", [{**row, **{f"R{r}:SDH": 1 for r in (1, 2)}}]),
              "line 2: subdural is 1 but any is 0 by the readers' majority")]
    for path, message in cases:
        with pytest.raises(PipelineError) as e:
            V.validate(config("x.ichbundle", cq500, path, tmp_path / "report"), progress=False)
        assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_names_folders_and_series_are_matched_as_stated(tmp_path):
    """CQ500's download folder for an anonymised PatientID; a folder holding two studies is ambiguous; two label
    rows naming one study (two of its series) are duplicates."""
    studies = pd.DataFrame([
        {"StudyInstanceUID": "1.1", "patient": "ANON1", "folder": "CQ500CT7 CQ500CT7", "series": ["1.1.1"], "files": ["a"]},
        {"StudyInstanceUID": "1.2", "patient": "CQ500-CT-8", "folder": "x", "series": ["1.2.1", "1.2.2"], "files": ["b"]},
        {"StudyInstanceUID": "1.3", "patient": "P3", "folder": "x", "series": ["1.3.1"], "files": ["c"]}])
    table = pd.DataFrame({"key": ["CQ500-CT-7", "CQ500-CT-8"], "line": [2, 3], "patient": ["", ""], "votes": ["", ""],
                          "any": [1, 0]})
    cq = SiteLabels(tmp_path / "reads.csv", "cq500", "name", ["any"], table)
    m = match_labels(cq, studies.iloc[:2], tmp_path)
    assert m.set_index("StudyInstanceUID").key.to_dict() == {"1.1": "CQ500-CT-7", "1.2": "CQ500-CT-8"}
    folders = SiteLabels(tmp_path / "l.csv", "plain", "folder", ["any"], table.assign(key=["CQ500CT7 CQ500CT7", "x"]))
    with pytest.raises(PipelineError, match=r"line 3: folder 'x' names 2 studies \(1.2, 1.3\); key the labels by "
                                            r"StudyInstanceUID"):
        match_labels(folders, studies, tmp_path)
    series = SiteLabels(tmp_path / "l.csv", "plain", "SeriesInstanceUID", ["any"], table.assign(key=["1.2.1", "1.2.2"]))
    with pytest.raises(PipelineError, match=r"lines 2, 3 all label study 1.2 \(duplicates\)"):
        match_labels(series, studies.iloc[1:2], tmp_path)


def test_settings_that_cannot_work_stop_before_anything_is_read(site, tmp_path, capsys):
    """Each stops with one line (through the command line: exit status 2, no trace); the original is never
    overwritten."""
    labels = write_labels(tmp_path / "labels.csv", site.truth)
    model = tmp_path / "m.ichbundle"
    model.write_bytes(b"")
    for kw, message in (({"choose_threshold": "specificity=0.9"}, "expected sensitivity=S with 0 < S <= 1"),
                        ({"site_bundle": "x.ichbundle"}, "--site-bundle needs --choose-threshold"),
                        ({"choose_threshold": "sensitivity=0.95", "site_bundle": str(model)},
                         "is the bundle validated: the original stays untouched"),
                        ({"prevalence": 6.0}, "a prevalence is between 0 and 1")):
        with pytest.raises(PipelineError, match=message):
            V.validate(config(model, site.dir, labels, tmp_path / "report", **kw), progress=False)
    assert not (tmp_path / "report").exists() and model.read_bytes() == b""
    with pytest.raises(SystemExit) as e:  # the command line, as `python -m src.serve.validate` runs it
        cli_main(lambda: V.main(["--run", str(model), "--dicom-dir", str(site.dir), "--labels", str(labels),
                                 "--choose-threshold", "sensitivity=0.95", "--site-bundle", str(model)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --site-bundle") and len(err.splitlines()) == 1, err
