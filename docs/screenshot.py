"""The README's picture of the demo page: serve a trained run, upload a series in headless Chromium, screenshot.

    .venv/bin/python docs/screenshot.py --run outputs/demo/runs/resnet10t_128 ../shared/ct_other/cq500_ct0_every10th

Needs Debian's `chromium` (what `.ci/run` installs) and the `playwright` package of requirements.txt.
Writes docs/demo_page.png (or --out) and, beside it, docs/demo_page.card.json: the model card the page showed and
the picture's sha256, which tests/test_structure.py compares with the demo run `bash run.sh` makes today, so the
picture cannot go stale unnoticed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run's folder")
    ap.add_argument("files", nargs="+", help="DICOM files or folders to upload")
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo_page.png"))
    a = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: chromium is not installed (Debian: apt-get install chromium)")
    files = sorted(str(f) for p in map(Path, a.files) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    sys.path.insert(0, str(ROOT))
    from src.serve.webapp import launched
    with launched(a.run) as (url, _):
        from playwright.sync_api import sync_playwright
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1150, "height": 1000})
            page.goto(url)
            page.set_input_files("#files", files)
            page.click("#submit")
            page.wait_for_selector(".summary", timeout=600_000)
            page.screenshot(path=a.out, full_page=True)
            verdict = page.inner_text(".summary")
            browser.close()
    from src.predictor import Predictor
    card = Predictor.load(a.run).card
    record = {"image": Path(a.out).name, "image_sha256": hashlib.sha256(Path(a.out).read_bytes()).hexdigest(),
              "run": str(a.run), "uploaded": sorted({str(Path(f).parent) for f in files}), "card": card,
              "summary_shown": " ".join(verdict.split())[:600]}
    card_file = Path(a.out).with_suffix(".card.json")
    card_file.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    print(f"wrote {a.out} and {card_file} ({len(files)} files uploaded)")


if __name__ == "__main__":
    main()
