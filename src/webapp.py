"""The demo's local web page: upload DICOM files or a zip, see the summary, the z-plot and a slice viewer.

    python -m src.demo serve --model outputs/demo/runs/resnet10t_128      # http://127.0.0.1:7860

FastAPI rather than Gradio: it runs fully offline, and the page is small enough to own. Bound to
127.0.0.1 unless --host says otherwise. Uploads are limited in size and file count, zip entries are
checked so none can escape the temporary folder (and zip bombs stop at the size limit), everything
uploaded lives in a temporary folder removed when the request ends (results are sent inline, nothing
is kept), and a bad file gives a message in the page, not a stack trace.
"""
from __future__ import annotations

import base64
import html
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import cv2
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import HTMLResponse

from .demo import THRESHOLD, analyse, load_models, overlay, zplot
from .utils import PipelineError

MAX_BYTES = 512 * 1024 * 1024      # whole upload, zips counted uncompressed
MAX_FILES = 2000
MAX_VIEWER_SLICES = 300            # Grad-CAM for every slice of the viewer up to this many per series
CHUNK = 1 << 20

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.5rem} .note{color:#666;font-size:.9rem} .err{background:#fde8e8;border:1px solid #e99;padding:1rem}
table{border-collapse:collapse;margin:1rem 0} td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} .pos{background:#fff0c2;font-weight:600}
.viewer{display:flex;gap:1.5rem;align-items:flex-start} .viewer img{width:384px;height:384px;image-rendering:auto}
form{border:1px solid #ddd;padding:1rem;border-radius:6px} input[type=submit]{font-size:1rem;padding:.4rem 1rem}
"""


class UploadError(Exception):
    pass


def _b64png(rgb) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def save_uploads(files: list[UploadFile], folder: Path) -> list[Path]:
    """Write uploads into folder, unpacking zips safely; enforce the limits."""
    total, saved = 0, []
    for i, up in enumerate(files):
        name = Path(up.filename or f"file{i}").name or f"file{i}"  # the base name only: no path from the client
        (folder / f"{i:05d}").mkdir(exist_ok=True)
        dest = folder / f"{i:05d}" / name
        with open(dest, "wb") as f:
            while chunk := up.file.read(CHUNK):
                total += len(chunk)
                if total > MAX_BYTES:
                    raise UploadError(f"upload larger than {MAX_BYTES // 2**20} MB")
                f.write(chunk)
        if zipfile.is_zipfile(dest):
            out = folder / f"{i:05d}" / "unzipped"
            out.mkdir()
            with zipfile.ZipFile(dest) as z:
                for info in z.infolist():
                    if info.is_dir():
                        continue
                    target = (out / info.filename).resolve()
                    if not target.is_relative_to(out.resolve()):
                        raise UploadError(f"zip entry {info.filename!r} points outside the archive's folder: refused")
                    total += info.file_size
                    if total > MAX_BYTES:
                        raise UploadError(f"upload larger than {MAX_BYTES // 2**20} MB once unpacked")
                    if len(saved) >= MAX_FILES:
                        raise UploadError(f"more than {MAX_FILES} files")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:
                        written = 0
                        while chunk := src.read(CHUNK):  # the header's size may lie: count what comes out
                            written += len(chunk)
                            if written > info.file_size + CHUNK or total - info.file_size + written > MAX_BYTES:
                                raise UploadError("zip entry larger than it declares: refused")
                            dst.write(chunk)
                    saved.append(target)
            dest.unlink()
        else:
            saved.append(dest)
        if len(saved) > MAX_FILES:
            raise UploadError(f"more than {MAX_FILES} files")
    if not saved:
        raise UploadError("no files were uploaded")
    return saved


def page(body: str, title="ICH demo") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
            f"<body><h1>Intracranial hemorrhage detection: try the model on your head CT</h1>{body}</body></html>")


def upload_form(models) -> str:
    return f"""
<p class="note">Model: {html.escape(models.description)}. Research demo, not a medical device.</p>
<form id="upload" action="/analyse" method="post" enctype="multipart/form-data">
  <p>DICOM files of one or more head CT series, or a zip of them (up to {MAX_FILES} files, {MAX_BYTES // 2**20} MB).
  Files may be in any order; compressed DICOM (JPEG Lossless, JPEG 2000, RLE) is fine.</p>
  <input id="files" type="file" name="files" multiple>
  <input id="submit" type="submit" value="Analyse">
</form>
<p class="note">Nothing you upload is kept: files are deleted when the result is sent.</p>"""


def result_html(results, skipped, models) -> str:
    parts = [f"<p class='note'>Model: {html.escape(models.description)}. <a href='/'>Analyse other files</a></p>"]
    for si, r in enumerate(results):
        s = r.summary
        rows = "".join(
            f"<tr class='{'pos' if t['max_probability'] >= THRESHOLD else ''}'><td>{c}</td><td>{t['max_probability']:.3f}</td>"
            f"<td>{t['slice_of_max']}</td><td>{', '.join(map(str, t['slices_above_threshold'])) or '-'}</td></tr>"
            for c, t in s["types"].items())
        frames = []
        for pos in range(len(r.table)):
            cls, cam = r.cams.get(pos, (None, None))
            p = r.table.iloc[pos]
            caption = (f"slice {pos + 1}/{len(r.table)} ({html.escape(str(p['file']))}): any {p['any']:.2f}"
                       + (f"; heat map for {cls}" if cls else ""))
            frames.append({"src": _b64png(overlay(r.brain[pos], cam)), "caption": caption})
        start = int(r.table["any"].to_numpy().argmax())
        import json
        parts.append(f"""
<section class="series" id="series{si}">
<h2>Series {html.escape(r.series)}</h2>
<div class="summary" id="summary{si}"><p><b>{s['slices']} slices</b>. Verdict at {THRESHOLD}: <b class="verdict">{s['verdict']}</b></p>
<table><tr><th>type</th><th>highest probability</th><th>at slice</th><th>slices above {THRESHOLD}</th></tr>{rows}</table></div>
<img alt="probabilities along z" src="data:image/png;base64,{base64.b64encode(zplot(r.table, None, f'series {r.series}')).decode()}">
<div class="viewer"><div><img id="slice{si}" alt="slice"><br>
<input type="range" id="range{si}" min="1" max="{len(frames)}" value="{start + 1}" style="width:384px"></div>
<p id="caption{si}"></p></div>
<script>(function(){{const f={json.dumps(frames)};const img=document.getElementById('slice{si}'),
cap=document.getElementById('caption{si}'),rng=document.getElementById('range{si}');
function show(i){{img.src=f[i].src;cap.textContent=f[i].caption;}} rng.oninput=()=>show(rng.value-1); show(rng.value-1);}})();</script>
</section>""")
    if len(skipped):
        items = "".join(f"<li>{html.escape(Path(p).name)}: {html.escape(str(why))}</li>" for p, why in skipped.values[:50])
        parts.append(f"<h2>Skipped files ({len(skipped)})</h2><ul>{items}</ul>")
    if not results:
        parts.insert(0, "<div class='err' id='error'>No readable CT slice in the upload.</div>")
    return "".join(parts)


def create_app(run_dir) -> FastAPI:
    models = load_models(run_dir)
    app = FastAPI(title="ICH demo", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one analysis at a time: the models are shared and the CPU is small

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page(upload_form(models))

    @app.post("/analyse", response_class=HTMLResponse)
    def analyse_upload(request: Request, files: list[UploadFile] = File(default=[])):
        length = int(request.headers.get("content-length", 0) or 0)
        if length > MAX_BYTES + CHUNK:
            return HTMLResponse(page(f"<div class='err' id='error'>Upload larger than {MAX_BYTES // 2**20} MB.</div>"
                                     "<p><a href='/'>Back</a></p>"), status_code=413)
        tmp = Path(tempfile.mkdtemp(prefix="ich-demo-"))
        try:
            paths = save_uploads(files, tmp)
            with lock:
                results, skipped = analyse(models, paths, cam_slices=MAX_VIEWER_SLICES)
            return page(result_html(results, skipped, models))
        except (UploadError, PipelineError) as e:
            return HTMLResponse(page(f"<div class='err' id='error'>{html.escape(str(e))}</div><p><a href='/'>Back</a></p>"),
                                status_code=400)
        except Exception as e:  # never a stack trace in the page; the server log has it
            import traceback
            traceback.print_exc()
            return HTMLResponse(page(f"<div class='err' id='error'>Could not analyse these files ({html.escape(type(e).__name__)}). "
                                     "Are they DICOM images of a head CT?</div><p><a href='/'>Back</a></p>"), status_code=400)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for f in files:
                f.file.close()

    return app


def serve(run_dir, host="127.0.0.1", port=7860):
    import uvicorn
    app = create_app(run_dir)
    print(f"ICH demo on http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
