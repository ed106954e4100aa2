"""The demo's local web page: upload DICOM files or a zip, see the summary, the z-plot and a slice viewer.

    python -m src.serve.webapp --run outputs/demo/runs/resnet10t_128      # http://127.0.0.1:7860

Every page says what the model was trained on (data folder, images and patients, out-of-fold weighted log
loss and AUC of `any`), warns in red when that was the generated demo data, and says it is a research demo,
not a medical device.

FastAPI rather than Gradio: it runs fully offline, and the page is small enough to own. Bound to
127.0.0.1 unless --host says otherwise. The upload limits the page states (MAX_FILES, MAX_BYTES) are
the ones enforced: the body is read as it streams, each file part written straight into a temporary
folder, and the upload is refused as soon as it passes a limit, so nothing beyond MAX_BYTES reaches the
disk (a chunked body without Content-Length included). Zip entries are checked so none can escape the
folder, and count uncompressed (zip bombs stop at the size limit). The folder is removed when the answer
is sent, refusals included (results are sent inline, nothing is kept); every refusal and every bad file
gives the page with a message, never JSON or a stack trace.

At most --max-uploads requests to /analyse are under way at once (receiving or waiting for the analysis): one
more is answered 503 at once, so the temporary files never pass --max-uploads x MAX_BYTES. One upload's body must
arrive within --upload-seconds, however slowly it trickles: past it the answer is 408 and its files are removed
at once. Before any body: a request's headers must arrive whole within --header-seconds of its first byte (or of
the connection), and at most --max-connections connections are open at once, --max-connections-per-address from one
address; past either, a connection is closed at once (`GuardedH11`, uvicorn's own HTTP protocol has no such limit:
slow headers from a thousand connections would hold every file descriptor).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..config import parse_config
from ..predictor import Predictor
from ..utils import PipelineError, cli_main
from .results import SYNTHETIC_WARNING, analyse_study, model_notes, overlay, zplot
from .selector import SeriesRules

MAX_BYTES = 512 * 1024 * 1024      # request body, then zips counted again uncompressed as they are unpacked
MAX_FILES = 2000
MAX_VIEWER_SLICES = 300            # Grad-CAM for every slice of the viewer up to this many per series
MAX_UPLOADS = 2                    # requests to /analyse at once (their files are on disk until answered)
UPLOAD_SECONDS = 300.0             # the longest one upload's body may take to arrive
HEADER_SECONDS = 10.0              # the longest a request's headers may take to arrive
MAX_CONNECTIONS = 256              # connections open at once (a browser opens a few)
MAX_PER_ADDRESS = 32               # connections open at once from one address
ZIP_DIRECTORY_BYTES = 1024         # bytes of a zip's central directory per entry it may have: names, extra fields
CHUNK = 1 << 20

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.5rem} .note{color:#666;font-size:.9rem} .err{background:#fde8e8;border:1px solid #e99;padding:1rem}
.warn{background:#b00020;color:#fff;font-weight:600;padding:1rem;border-radius:6px;font-size:1.05rem}
.card{background:#f4f6fb;border:1px solid #cdd5e5;padding:.6rem 1rem;border-radius:6px}
table{border-collapse:collapse;margin:1rem 0} td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} .pos{background:#fff0c2;font-weight:600}
.viewer{display:flex;gap:1.5rem;align-items:flex-start} .viewer img{width:384px;height:384px;image-rendering:auto}
form{border:1px solid #ddd;padding:1rem;border-radius:6px} input[type=submit]{font-size:1rem;padding:.4rem 1rem}
"""


class UploadError(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _b64png(rgb) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def limits() -> str:
    return f"up to {MAX_FILES} files, {MAX_BYTES / 2**20:g} MB"


def too_large(how="") -> UploadError:
    return UploadError(f"upload larger than {MAX_BYTES / 2**20:g} MB{how} (the page takes {limits()})", 413)


async def receive_uploads(request: Request, folder: Path) -> tuple[list[Path], int]:
    """Stream a multipart body into folder, each file part straight into its own file, refusing as soon as the
    body passes MAX_BYTES or the file parts pass MAX_FILES: (saved paths, body bytes).

    Long because the streaming parser's callbacks share the current part's state; they live inside as closures."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError("not a file upload (expected multipart/form-data, as the page's form sends)", 415)
    saved, headers, name, value = [], {}, bytearray(), bytearray()
    out, ended = None, False

    def header_end():
        headers[bytes(name).lower()] = bytes(value)
        name.clear(), value.clear()

    def headers_finished():
        nonlocal out
        _, opts = parse_options_header(headers.pop(b"content-disposition", b""))
        headers.clear()
        filename = Path(opts.get(b"filename", b"").decode("utf-8", "replace")).name  # base name only: no path from the client
        if not filename:  # a plain field, or the browser's empty part when no file was chosen
            return
        if any(c < " " for c in filename):
            raise UploadError(f"a file name with a control character ({filename[:60]!r}): rename the file")
        if len(saved) >= MAX_FILES:
            raise UploadError(f"more than {MAX_FILES} files (the page takes {limits()})")
        dest = folder / f"{len(saved):05d}" / (filename if filename != ".." else "file")
        dest.parent.mkdir()
        saved.append(dest)
        out = open(dest, "wb")

    def part_data(data, start, end):
        if out:
            out.write(data[start:end])

    def part_end():
        nonlocal out
        if out:
            out.close()
        out = None

    def end():
        nonlocal ended
        ended = True

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": lambda d, a, b: name.extend(d[a:b]), "on_header_value": lambda d, a, b: value.extend(d[a:b]),
        "on_header_end": header_end, "on_headers_finished": headers_finished,
        "on_part_data": part_data, "on_part_end": part_end, "on_end": end})
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BYTES:  # checked before the chunk is parsed: nothing past the limit is written
                raise too_large()
            parser.write(chunk)  # synchronous writes of one received chunk at most: short enough for the event loop
    except FormParserError:
        raise UploadError("malformed multipart upload") from None
    except ClientDisconnect:
        raise UploadError("the upload was interrupted") from None
    finally:
        part_end()
    if not ended:
        raise UploadError("malformed multipart upload (it ends before its closing boundary)")
    return saved, total


def unpack_zips(paths: list[Path], total: int) -> list[Path]:
    """Replace each zip among the uploads by its entries, unpacked safely beside it; entries count uncompressed
    towards MAX_BYTES, on top of the body's bytes (total), and towards MAX_FILES."""
    saved = []
    for dest in paths:
        if not zipfile.is_zipfile(dest):
            saved.append(dest)
            continue
        out = dest.parent.with_name(dest.parent.name + "-unzipped")
        out.mkdir()
        declared, directory = zip_directory(dest)  # from the end record, before zipfile reads the directory
        if declared is None or declared > MAX_FILES - len(saved):
            raise UploadError(f"more than {MAX_FILES} files once unpacked: the zip archive declares "
                              f"{declared if declared is not None else 'an unreadable number of'} entries "
                              f"(the page takes {limits()})")
        if directory > MAX_FILES * ZIP_DIRECTORY_BYTES:  # zipfile reads the directory by its size, whatever the count
            raise UploadError(f"a zip archive whose directory is {directory:,} bytes, more than {MAX_FILES} entries "
                              f"take ({MAX_FILES * ZIP_DIRECTORY_BYTES:,}): refused before it is read")
        try:
            z = zipfile.ZipFile(dest)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise UploadError(f"{dest.name}: not a readable zip archive ({type(e).__name__}: {str(e)[:80]})") from None
        with z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                target = (out / info.filename).resolve()
                if not target.is_relative_to(out.resolve()):
                    raise UploadError(f"zip entry {info.filename!r} points outside the archive's folder: refused")
                total += info.file_size
                if total > MAX_BYTES:
                    raise too_large(" once unpacked")
                if len(saved) >= MAX_FILES:
                    raise UploadError(f"more than {MAX_FILES} files once unpacked (the page takes {limits()})")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    dst = open(target, "xb")
                except (FileExistsError, NotADirectoryError, IsADirectoryError, ValueError):
                    raise UploadError(f"zip entry {info.filename!r} collides with another entry of the archive "
                                      f"(a file and a folder of one name, or a name twice): refused") from None
                with z.open(info) as src, dst:
                    written = 0
                    while chunk := src.read(CHUNK):  # the header's size may lie: count what comes out
                        written += len(chunk)
                        if written > info.file_size + CHUNK or total - info.file_size + written > MAX_BYTES:
                            raise UploadError("zip entry larger than it declares: refused")
                        dst.write(chunk)
                saved.append(target)
        dest.unlink()
    if len(saved) > MAX_FILES:
        raise UploadError(f"more than {MAX_FILES} files once unpacked (the page takes {limits()})")
    if not saved:
        raise UploadError("no files were uploaded")
    return saved


def zip_directory(path: Path) -> tuple[int | None, int]:
    """(entries, bytes of the central directory) that a zip's end-of-central-directory record declares (zip64
    included); (None, 0) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            rec = zipfile._EndRecData(f)  # the standard library's own reader of the end record
    except (OSError, zipfile.BadZipFile, struct.error):
        return None, 0
    return (None, 0) if not rec else (int(rec[zipfile._ECD_ENTRIES_TOTAL]), int(rec[zipfile._ECD_SIZE]))


def script_json(obj) -> str:
    """JSON to embed in a <script>: with <, > and & escaped no string in it can close the element or open a comment."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(body: str, title="ICH demo") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
            f"<body><h1>Intracranial hemorrhage detection: try the model on your head CT</h1>{body}</body></html>")


def refusal(message: str, status: int, headers: dict | None = None) -> HTMLResponse:
    return HTMLResponse(page(f"<div class='err' id='error'>{html.escape(message)}</div><p><a href='/'>Back</a></p>"),
                        status_code=status, headers=headers)


def model_box(p: Predictor) -> str:
    """What the model knows, before anything it says: the synthetic-data warning, its training data and
    out-of-fold scores, and the disclaimer."""
    notes = model_notes(p.card)
    warn = (f"<div class='warn' id='synthetic-warning'>WARNING: {html.escape(SYNTHETIC_WARNING)}</div>"
            if SYNTHETIC_WARNING in notes else "")
    info = " ".join(html.escape(n) for n in notes if n != SYNTHETIC_WARNING)
    return f"{warn}<p class='card' id='model-card'>Model {html.escape(p.description)}. {info}</p>"


def upload_form(p: Predictor) -> str:
    return f"""{model_box(p)}
<form id="upload" action="/analyse" method="post" enctype="multipart/form-data">
  <p>DICOM files of one or more head CT series, or a zip of them ({limits()}).
  Files may be in any order; compressed DICOM (JPEG Lossless, JPEG 2000, RLE) is fine.</p>
  <input id="files" type="file" name="files" multiple>
  <input id="submit" type="submit" value="Analyse">
</form>
<p class="note">Nothing you upload is kept: files are deleted when the result is sent.</p>"""


def series_section(si: int, r) -> str:
    """One scored series: its summary table, the probabilities along the series and a slice viewer."""
    s = r.summary
    rows = "".join(
        f"<tr class='{'pos' if t['max_probability'] >= s['threshold'] else ''}'><td>{c}</td><td>{t['max_probability']:.3f}</td>"
        f"<td>{t['slice_of_max']}</td><td>{', '.join(map(str, t['slices_above_threshold'])) or '-'}</td></tr>"
        for c, t in s["types"].items())
    frames = []
    for pos in range(len(r.table)):
        cls, cam = r.cams.get(pos, (None, None))
        row = r.table.iloc[pos]
        caption = (f"slice {pos + 1}/{len(r.table)} ({row['file']}): any {row['any']:.2f}"  # shown as textContent
                   + (f"; heat map for {cls}" if cls else ""))
        frames.append({"src": _b64png(overlay(r.brain[pos], cam)), "caption": caption})
    start = int(r.table["any"].to_numpy().argmax())
    notes = f"<p class='note'>Scored with a note: {html.escape(s['selection_notes'])}</p>" \
        if s.get("selection_notes") else ""
    return f"""
<section class="series" id="series{si}">
<h3>Series {html.escape(r.series)}</h3>{notes}
<div class="summary" id="summary{si}"><p><b>{s['slices']} slices</b>. Verdict at {s['threshold']:.3f}
(<span class="threshold-from">{html.escape(s['threshold_from'])}</span>): <b class="verdict">{s['verdict']}</b></p>
<table><tr><th>type</th><th>highest probability</th><th>at slice</th><th>slices at or above {s['threshold']:.3f}</th></tr>{rows}</table></div>
<img alt="probabilities along the series" src="data:image/png;base64,{base64.b64encode(zplot(r.table, None, f'series {r.series}', s['threshold'])).decode()}">
<div class="viewer"><div><img id="slice{si}" alt="slice"><br>
<input type="range" id="range{si}" min="1" max="{len(frames)}" value="{start + 1}" style="width:384px"></div>
<p id="caption{si}"></p></div>
<script>(function(){{const f={script_json(frames)};const img=document.getElementById('slice{si}'),
cap=document.getElementById('caption{si}'),rng=document.getElementById('range{si}');
function show(i){{img.src=f[i].src;cap.textContent=f[i].caption;}} rng.oninput=()=>show(rng.value-1); show(rng.value-1);}})();</script>
</section>"""


def series_table(listing) -> str:
    """Every series of a study: scored or not, and why (the series selector's words)."""
    rows = "".join(
        f"<tr class='{'pos' if r.scored else ''}'><td>{html.escape(str(r.SeriesNumber or '-'))}</td>"
        f"<td>{html.escape(str(r.SeriesDescription or '-'))}</td><td>{r.files}</td><td>{'yes' if r.scored else 'no'}</td>"
        f"<td class='why'>{html.escape(str(r.reason or r.notes or '-'))}</td></tr>" for r in listing.itertuples())
    return ("<table class='series-list'><tr><th>series</th><th>description</th><th>files</th><th>scored</th>"
            f"<th>why not / notes</th></tr>{rows}</table>")


def result_html(studies, skipped, p: Predictor) -> str:
    """The answer page: the model first, then per study its verdict, every series (scored or not and why) and each
    scored series' details."""
    parts, si = [model_box(p), "<p class='note'><a href='/'>Analyse other files</a></p>"], 0
    for k, st in enumerate(studies):
        s = st.summary
        parts.append(f"""<section class="study" id="study{k}"><h2>Study {html.escape(st.study)}</h2>
<p class="study-verdict">Verdict at {s['threshold']:.3f}: <b class="verdict">{html.escape(s['verdict'])}</b></p>
{series_table(st.series)}""")
        for r in st.scored:
            parts.append(series_section(si, r))
            si += 1
        parts.append("</section>")
    if len(skipped):
        items = "".join(f"<li>{html.escape(Path(p).name)}: {html.escape(str(why))}</li>" for p, why in skipped.values[:50])
        parts.append(f"<h2>Skipped files ({len(skipped)})</h2><ul>{items}</ul>")
    if not any(st.scored for st in studies):
        parts.insert(1, "<div class='err' id='error'>No series the model can read in the upload (the reasons are "
                        "listed per series below).</div>")
    return "".join(parts)


def create_app(run_dir=None, predictor: Predictor | None = None, max_uploads: int = MAX_UPLOADS,
               upload_seconds: float = UPLOAD_SECONDS, rules: SeriesRules | None = None, all_series: bool = False) -> FastAPI:
    rules = rules or SeriesRules.load()
    models = predictor or Predictor.load(run_dir)
    app = FastAPI(title="ICH demo", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one analysis at a time: the models are shared and the CPU is small
    under_way = [0]          # requests to /analyse now (counted on the event loop's one thread)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page(upload_form(models))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # the framework's own refusals (404, 405) as the page too, not JSON
        return refusal(str(exc.detail), exc.status_code)

    def analyse_page(paths, total):
        paths = unpack_zips(paths, total)
        with lock:
            studies, skipped = analyse_study(models, paths, cam_slices=MAX_VIEWER_SLICES, rules=rules,
                                             all_series=all_series or None)
        return page(result_html(studies, skipped, models))

    @app.post("/analyse", response_class=HTMLResponse)
    async def analyse_upload(request: Request):  # no File(...) parameter: the body is read here, as it streams
        if under_way[0] >= max_uploads:
            return refusal(f"The page is busy: {max_uploads} upload(s) are under way, the most it takes at once "
                           f"(--max-uploads). Try again in a minute.", 503, {"Retry-After": "60"})
        under_way[0] += 1
        tmp = Path(tempfile.mkdtemp(prefix="ich-demo-"))
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BYTES:  # refused before a byte is read
                raise too_large()
            try:
                paths, total = await asyncio.wait_for(receive_uploads(request, tmp), upload_seconds)
            except TimeoutError:
                raise UploadError(f"the upload took longer than {upload_seconds:g} s to arrive (--upload-seconds): "
                                  f"refused, nothing of it kept", 408) from None
            return HTMLResponse(await run_in_threadpool(analyse_page, paths, total))
        except (UploadError, PipelineError) as e:
            return refusal(str(e), getattr(e, "status", 400))
        except Exception as e:  # never a stack trace in the page; the server log has it
            import traceback
            traceback.print_exc()
            return refusal(f"Could not analyse these files ({type(e).__name__}). Are they DICOM images of a head CT?", 400)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            under_way[0] -= 1

    return app


@dataclass
class ServeConfig:
    run: str = ""                     # a stage-1 run folder (its stage-2 runs come along) or a bundle (src.export)
    host: str = "127.0.0.1"           # address to bind (default: this machine only)
    port: int = 7860                  # port of the page
    max_uploads: int = MAX_UPLOADS    # uploads under way at once; one more is answered 503 (busy)
    upload_seconds: float = UPLOAD_SECONDS  # the longest one upload's body may take; past it, 408 and files removed
    header_seconds: float = HEADER_SECONDS  # the longest a request's headers may take; past it, the connection closed
    max_connections: int = MAX_CONNECTIONS  # connections open at once; more are closed at once
    max_connections_per_address: int = MAX_PER_ADDRESS  # connections open at once from one address
    series_rules: str = ""            # which series of a study are scored (default configs/serve/series_rules.yaml)
    all_series: bool = False          # score every eligible series of a study, not only the one closest to training

    def __post_init__(self):
        if self.max_uploads < 1 or not self.upload_seconds > 0 or not self.header_seconds > 0 \
                or self.max_connections < 1 or self.max_connections_per_address < 1:
            raise PipelineError("--max-uploads, --max-connections and --max-connections-per-address must be >= 1, "
                                "--upload-seconds and --header-seconds > 0")


def guarded_h11(header_seconds: float = HEADER_SECONDS, max_connections: int = MAX_CONNECTIONS,
                max_per_address: int = MAX_PER_ADDRESS):
    """uvicorn's h11 protocol with the connection limits of the module docstring: a class for uvicorn's `http`.
    Long because it is one class, defined here so that uvicorn is imported only when the page is served, whose
    methods share the limits and the count of connections per address."""
    import logging
    from collections import Counter

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
    log, open_from = logging.getLogger("uvicorn.error"), Counter()

    class GuardedH11(H11Protocol):
        _timer, _host = None, None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            host = (self.client or ("unknown",))[0]
            why = (f"{len(self.connections) - 1} connections open, the page's limit (--max-connections)"
                   if len(self.connections) > max_connections else
                   f"{open_from[host]} connections from {host} open, its limit (--max-connections-per-address)"
                   if open_from[host] >= max_per_address else "")
            if why:
                log.warning(f"connection from {host} refused: {why}")
                transport.close()
                return
            self._host = host
            open_from[host] += 1
            self._arm()

        def _arm(self) -> None:
            self._timer = self.loop.call_later(header_seconds, self._late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _late(self) -> None:
            self._timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.warning(f"connection from {self._host} closed: a request's headers not received whole within "
                            f"{header_seconds:g} s (--header-seconds)")
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._host is None:    # refused in connection_made: nothing it sends is read
                return
            if self._timer is None and self.conn.their_state is h11.IDLE:
                self._arm()           # a new request on a kept-alive connection: its headers have their deadline
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own limit
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._host is not None:
                open_from[self._host] -= 1
                if open_from[self._host] <= 0:
                    del open_from[self._host]
                self._host = None
            super().connection_lost(exc)

    return GuardedH11


def server_config(app, host: str, port: int, header_seconds: float = HEADER_SECONDS,
                  max_connections: int = MAX_CONNECTIONS, max_per_address: int = MAX_PER_ADDRESS):
    """The uvicorn configuration the page is served with (tests serve an app with it too)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          http=guarded_h11(header_seconds, max_connections, max_per_address))


def serve(run_dir, host="127.0.0.1", port=7860, max_uploads=MAX_UPLOADS, upload_seconds=UPLOAD_SECONDS, rules=None,
          all_series=False, header_seconds=HEADER_SECONDS, max_connections=MAX_CONNECTIONS,
          max_per_address=MAX_PER_ADDRESS):
    import uvicorn
    app = create_app(run_dir, max_uploads=max_uploads, upload_seconds=upload_seconds, rules=rules, all_series=all_series)
    print(f"ICH demo on http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.Server(server_config(app, host, port, header_seconds, max_connections, max_per_address)).run()


@contextlib.contextmanager
def launched(run_dir, timeout=120.0):
    """The page for `run_dir` served by a background process on a free local port: yields (url, process) once
    it answers, stops it on exit. For scripts and tests that drive the page (docs/screenshot.py)."""
    import requests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()  # not a pipe: nobody reads it, and a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "src.serve.webapp", "--run", str(run_dir), "--port", str(port)],
                            cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                log.seek(0)
                raise PipelineError(f"the demo page for {run_dir} exited: {log.read().decode()[-2000:]}")
            if time.time() > deadline:
                raise PipelineError(f"the demo page for {run_dir} did not answer within {timeout:.0f}s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def main():
    a = parse_config(ServeConfig, description=__doc__, prog="python -m src.serve.webapp")
    if not a.run:
        raise PipelineError("--run RUN_FOLDER_OR_BUNDLE is required (e.g. outputs/demo/runs/resnet10t_128)")
    serve(a.run, a.host, a.port, a.max_uploads, a.upload_seconds, SeriesRules.load(a.series_rules or None),
          a.all_series, a.header_seconds, a.max_connections, a.max_connections_per_address)


if __name__ == "__main__":
    cli_main(main)
