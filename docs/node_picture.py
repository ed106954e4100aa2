"""docs/node.md's picture of what a viewer receives: one study's answer, as the node sends it, rendered.

    .venv/bin/python docs/node_picture.py --run outputs/demo/runs/resnet10t_128 ../shared/ct_other/cq500_ct0_every10th

Scores the study the way the node does (`src.serve.results.analyse_study`: the series selector, then the
`Predictor`), writes the objects the node would send (`src.serve.dicom_out.result_objects`: the TID 1500 SR, the
Key Object Selection, the Grad-CAM Secondary Captures), renders the SR with dcmtk's `dsr2html +Cc +Cm` in headless
Chromium and puts the Secondary Captures beside it. Needs Debian's `dcmtk` and `chromium` (what `.ci/run`
installs) and the `playwright` package of requirements.txt.

Writes docs/node_report.png (or --out) and, beside it, docs/node_report.card.json: the model card and the
picture's sha256, which tests/test_structure.py compares with the demo run `bash run.sh` makes today.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def render_sr(sr: Path, html: Path, png: Path, chromium: str, width: int) -> None:
    """dsr2html's page of the SR (`+Cc +Cm`: every code beside its meaning, so the SNOMED CT codes show), screenshot whole."""
    r = subprocess.run(["dsr2html", "+Cc", "+Cm", str(sr), str(html)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"error: dsr2html could not render {sr}: {r.stderr.strip()}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": width, "height": 800})
        page.goto(html.resolve().as_uri())
        page.screenshot(path=str(png), full_page=True)
        browser.close()


def side_by_side(sr_png: Path, captures: list[np.ndarray], out: Path, column: int = 420) -> None:
    """The SR's page on the left, the Secondary Captures stacked on the right, at most as tall as the page."""
    left = Image.open(sr_png).convert("RGB")
    tiles = [Image.fromarray(c).convert("RGB").resize((column, column * c.shape[0] // c.shape[1])) for c in captures]
    height = max(left.height, sum(t.height + 8 for t in tiles))
    canvas = Image.new("RGB", (left.width + column + 16, height), "white")
    canvas.paste(left, (0, 0))
    y = 0
    for t in tiles:
        canvas.paste(t, (left.width + 8, y))
        y += t.height + 8
    # 256 colours: a third of the bytes of full colour, with the text and the heat maps unchanged to the eye
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run's folder or bundle")
    ap.add_argument("study", help="one study's DICOM folder")
    ap.add_argument("--out", default=str(ROOT / "docs" / "node_report.png"))
    ap.add_argument("--width", type=int, default=900, help="the SR page's width in pixels")
    a = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    for tool, name in ((chromium, "chromium"), (shutil.which("dsr2html"), "dcmtk")):
        if tool is None:
            raise SystemExit(f"error: {name} is not installed (Debian: apt-get install {name})")
    sys.path.insert(0, str(ROOT))
    from src.predictor import Predictor
    from src.serve.dicom_out import Algorithm, result_objects, source_header
    from src.serve.results import analyse_study
    p = Predictor.load(a.run)
    studies, _ = analyse_study(p, [Path(a.study)])
    if len(studies) != 1 or not studies[0].scored:
        raise SystemExit(f"error: {a.study} must hold one study with a series the model can read "
                         f"({len(studies)} studies found)")
    study = studies[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = {f.name: pydicom.dcmread(f, stop_before_pixels=True)
                 for f in Path(a.study).rglob("*") if f.is_file()}
    headers = {n: source_header(heads[n]) for r in study.scored for n in r.table["file"]}
    objects = result_objects(study, headers, Algorithm.of(p))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        objects[0].save_as(tmp / "sr.dcm", enforce_file_format=True)
        render_sr(tmp / "sr.dcm", tmp / "sr.html", tmp / "sr.png", chromium, a.width)
        captures = [o.pixel_array for o in objects[2:]]
        side_by_side(tmp / "sr.png", captures, Path(a.out))
    record = {"image": Path(a.out).name, "image_sha256": hashlib.sha256(Path(a.out).read_bytes()).hexdigest(),
              "run": str(a.run), "study": str(a.study), "card": p.card,
              "objects": [str(o.Modality) + " " + str(o.get("SeriesDescription", "")) for o in objects],
              "verdict": study.summary["verdict"]}
    card_file = Path(a.out).with_suffix(".card.json")
    card_file.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    print(f"wrote {a.out} and {card_file} ({len(objects)} objects: SR, KOS, {len(captures)} Grad-CAM images)")


if __name__ == "__main__":
    main()
