"""A trained model as parts: everything a Predictor needs and nothing else, read from a run folder.

`read_run(RUN)` gives a `Trained`: every finished stage-1 fold's weights (best.pth's `model`: the averaged weights
the run validated) and config, the preprocessing (cache size and windows), the stage-2 folds (GRU checkpoints,
LightGBM text models), the blend weights of the run's own stages (src.blend's file), and the model card.
The Predictor is built from one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import checkpoint, layout
from .runs import Run
from .utils import CLASSES, PipelineError


@dataclass
class Trained:
    """A trained run's predicting parts."""
    name: str                                        # the run's name
    stage1: list[tuple[str, dict, dict]]             # (fold<K>, config, state dict of the averaged weights)
    settings: dict                                   # preprocessing of the cache: size, windows
    seq: list[tuple[str, dict]] = field(default_factory=list)              # (fold<K>, GRU checkpoint dict)
    boost: list[tuple[str, dict, list[str]]] = field(default_factory=list)  # (fold<K>, config, LightGBM texts)
    blend: dict[str, list[float]] = field(default_factory=dict)            # stage1/seq/boost -> 6 weights
    card: dict = field(default_factory=dict)


def read_run(run_dir, stage2: bool = True) -> Trained:
    """The predicting parts of a stage-1 run folder (its finished folds) and, with stage2, of its stage-2 runs."""
    from .blend import run_blend
    from .card import run_card
    run = Run(run_dir)
    if not run.path.is_dir():
        raise PipelineError(f"run folder not found: {run.path}")
    if run.is_stage2():
        raise PipelineError(f"{run.path} is a stage-2 run: load its stage-1 run ({run.config()['stage1']})")
    ks = [k for k in run.finished_folds() if (run.fold_dir(k) / layout.BEST).exists()]
    if not ks:
        raise PipelineError(f"no trained fold in {run.path} (fold*/best.pth with oof.csv): train first")
    stage1 = []
    for k in ks:
        ck = checkpoint.load(run.fold_dir(k) / layout.BEST)
        stage1.append((f"fold{k}", ck["config"], ck["model"]))
    settings = json.loads((run.fold_dir(ks[0]) / layout.PREPROCESS).read_text())
    t = Trained(run.name, stage1, settings, card=run_card(run))
    if not stage2:
        return t
    s2, b2 = run.stage2("seq"), run.stage2("boost")
    t.seq = [(f"fold{k}", checkpoint.load(s2.fold_dir(k) / layout.BEST)) for k in ks
             if (s2.fold_dir(k) / layout.FINISHED).exists()]
    t.boost = [(f"fold{k}", yaml.safe_load((b2.fold_dir(k) / layout.CONFIG).read_text()),
                [(b2.fold_dir(k) / f"model_{c}.txt").read_text() for c in CLASSES]) for k in ks
               if (b2.fold_dir(k) / layout.FINISHED).exists()]
    info = run_blend(run)
    if info is not None:
        t.blend = {m["kind"]: info["weights"][m["name"]] for m in info["members"]}
    return t


# ---------------------------------------------------------------- the portable file
FORMAT, VERSION, KNOWN_VERSIONS = "ich-bundle", 1, (1,)
MANIFEST, MODEL = "manifest.json", "model.json"
SAFE_SUFFIXES = (".json", ".safetensors", ".txt")      # nothing that needs code to read (no pickle anywhere)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".npz", ".joblib")
# bounds a bundle must stay within before anything in it is read: 5 folds of the GPU specs in float32 are ~0.6 GB
MAX_BUNDLE_BYTES = 8 << 30
MAX_MEMBERS = 512
MAX_MEMBER_BYTES = 2 << 30
MAX_JSON_BYTES = 16 << 20
MAX_RATIO = 200                                         # uncompressed / compressed of a deflated member
# the zip's comment: this prefix and the SHA-256 (hex) of every byte of the file before the hex digits, so that a
# change to any byte (of a member, a header, the zip's directory or end record) is seen before anything is read
CHECKSUM_PREFIX = b"ich-bundle-sha256:"
CHECKSUM = len(CHECKSUM_PREFIX) + 64


def code_version() -> str:
    """The project's git commit (with -dirty when changed), else 'unknown'."""
    import subprocess
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=layout.ROOT, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    """The versions a bundle was made with, read from the installed packages' metadata (importing timm only for
    its version would cost seconds)."""
    from importlib.metadata import version
    from .stamps import VERSIONS
    return {**{p: version(p) for p in ("torch", "timm", "lightgbm", "numpy", "safetensors")}, "code": code_version(),
            "steps": VERSIONS}


def _predicting(config: dict) -> dict:
    """A config without its run control (paths, workers, device, ...): what the model is, not where it ran."""
    from .config import RUN_CONTROL
    return {k: v for k, v in config.items() if k not in RUN_CONTROL}


def _tensors(sd: dict, fp16: bool) -> tuple[dict, dict]:
    """(tensors to store, aliases): a tensor stored under several names (the network's head is its backbone's
    classifier) is stored once, under its first name; aliases maps the other names to it (safetensors refuses
    shared memory, and storing it twice could load two tensors where the model had one)."""
    first, tensors, aliases = {}, {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key in first:
            aliases[k] = first[key]
            continue
        first[key] = k
        tensors[k] = (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
    return tensors, aliases


def pack(t: Trained, fp16: bool = False) -> dict[str, bytes]:
    """The bundle's members (name -> bytes), manifest excluded."""
    from safetensors.torch import save
    members, model = {}, {"format": FORMAT, "version": VERSION, "name": t.name, "preprocess": t.settings,
                           "dtype": "float16" if fp16 else "float32", "stage1": [], "seq": [], "boost": [],
                           "blend": t.blend, "card": t.card, "versions": versions()}
    for name, cfg, sd in t.stage1:
        tensors, aliases = _tensors(sd, fp16)
        members[f"stage1/{name}.safetensors"] = save(tensors)
        model["stage1"].append({"fold": name, "config": _predicting(cfg), "weights": f"stage1/{name}.safetensors",
                                "aliases": aliases})
    for name, ck in t.seq:
        tensors = {f"model.{k}": v for k, v in ck["model"].items()}
        tensors.update({k: ck[k] for k in ("emb_mean", "emb_std") if ck.get(k) is not None})
        tensors, aliases = _tensors(tensors, False)  # small: kept in float32
        members[f"seq/{name}.safetensors"] = save(tensors)
        model["seq"].append({"fold": name, "config": _predicting(ck["config"]), "emb_dim": int(ck["emb_dim"]),
                             "weights": f"seq/{name}.safetensors", "aliases": aliases})
    for name, cfg, texts in t.boost:
        files = [f"boost/{name}/model_{c}.txt" for c in CLASSES]
        members.update({f: txt.encode() for f, txt in zip(files, texts)})
        model["boost"].append({"fold": name, "config": _predicting(cfg), "models": files})
    members[MODEL] = json.dumps(model, indent=1, default=float).encode()
    return members


def write_bundle(t: Trained, path, fp16: bool = False, provenance: dict | None = None) -> dict:
    """One zip file (stored, not compressed: weights do not compress) holding the members and a manifest with the
    SHA-256 of each (and `provenance`, when given: what a copy was made from and what changed, src.serve.validate);
    written to a temporary name and renamed. Returns the manifest."""
    import datetime
    import hashlib
    import zipfile
    from .utils import atomic_path
    members = pack(t, fp16)
    manifest = {"format": FORMAT, "version": VERSION, "name": t.name,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "members": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in members.items()}}
    if provenance:
        manifest["provenance"] = provenance
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=1))
            for n, b in members.items():
                z.writestr(n, b)
        seal(tmp)
    return manifest


def seal(path) -> None:
    """Give a zip file (with no comment) the bundle's checksum: its comment becomes the prefix and the SHA-256 of
    every byte before the digits (the end record with the comment's length included)."""
    import zipfile
    with zipfile.ZipFile(path, "a") as z:
        z.comment = CHECKSUM_PREFIX + b"0" * 64
    with open(path, "r+b") as f:
        digest = _file_sha256(f, Path(path).stat().st_size - 64)
        f.seek(-64, 2)
        f.write(digest.encode())


def _file_sha256(f, n: int) -> str:
    """SHA-256 of the first n bytes of an open file, read a megabyte at a time."""
    import hashlib
    h, left = hashlib.sha256(), n
    f.seek(0)
    while left > 0:
        chunk = f.read(min(1 << 20, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


class BundleError(PipelineError):
    """A bundle refused: the message names the file and the reason."""


def is_bundle(path) -> bool:
    """Whether `path` is a file to be read as a bundle (a run is a folder)."""
    return Path(path).is_file()


def looks_like_bundle(path) -> bool:
    """A zip archive with a bundle's manifest (a torch .pth is a zip too, without one)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return MANIFEST in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def stage1_weights(path, fold: str, model: str, in_chans: int) -> dict:
    """The state dict of a bundle's stage-1 fold, for fine-tuning a network of the same architecture."""
    t = read_bundle(path, stage2=False)
    folds = {name: (cfg, sd) for name, cfg, sd in t.stage1}
    if fold not in folds:
        raise BundleError(f"{path}: no stage-1 fold {fold!r} (it has {', '.join(folds)}); choose one with --weights-fold")
    cfg, sd = folds[fold]
    have = 9 if cfg.get("input_mode") == "slices_windows" else 3
    if cfg.get("model") != model or have != in_chans:
        raise BundleError(f"{path}: its {fold} is {cfg.get('model')} on {have} channels, this run is {model} on "
                          f"{in_chans}: train with --model {cfg.get('model')} --input-mode {cfg.get('input_mode')}")
    return sd


def read_bundle(path, stage2: bool = True) -> Trained:
    """A bundle's predicting parts, after every check: its size, its members' names, kinds and sizes, the manifest
    (format, version, every member listed with its SHA-256, nothing unlisted), then the contents."""
    path = Path(path)
    files = _checked_members(path)
    model = _json(files, MODEL, path)
    try:
        return _unpack(model, files, path, stage2)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: refused: {MODEL} does not describe a model this code can load "
                          f"({type(e).__name__}: {e})") from e


def _refuse(path, why: str):
    raise BundleError(f"{path}: refused: {why}")


def _check_file(path: Path) -> None:
    """The file's own checksum (its zip comment), before the zip is parsed: any byte changed is refused here. A
    bundle written before bundles carried one (an empty comment) goes on to the member checks alone."""
    size = path.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        _refuse(path, f"{size:,} bytes, more than a bundle may be ({MAX_BUNDLE_BYTES:,})")
    with open(path, "rb") as f:
        f.seek(max(0, size - 22 - CHECKSUM))
        tail = f.read()
        if tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
            return                    # no comment: an older bundle
        end, comment = tail[:22], tail[22:]
        if end[:4] != b"PK\x05\x06" or end[-2:] != CHECKSUM.to_bytes(2, "little") or \
                not comment.startswith(CHECKSUM_PREFIX):
            _refuse(path, "not a bundle (not a zip archive written by src.export, or truncated or damaged at its "
                          "end): get the file again")
        if _file_sha256(f, size - 64).encode() != comment[-64:]:
            _refuse(path, "its bytes differ from the SHA-256 it carries (damaged in transfer or changed): get the "
                          "file again")


def _checked_members(path: Path) -> dict[str, bytes]:
    """name -> bytes of every member, each verified against the manifest; whatever the zip reader raises on a
    damaged or crafted file is a refusal."""
    import zipfile
    import zlib
    if not path.is_file():
        raise BundleError(f"bundle not found: {path}")
    _check_file(path)
    try:
        with zipfile.ZipFile(path) as z:
            return _verified(path, z)
    except BundleError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError,
            KeyError, TypeError, AttributeError, OverflowError) as e:
        _refuse(path, f"not a readable bundle ({type(e).__name__}: {str(e)[:120]}): damaged or not a bundle; get "
                      f"the file again")


def _verified(path: Path, z) -> dict[str, bytes]:
    """The members of an open bundle, every check of read_bundle's docstring passed."""
    import hashlib
    infos = [i for i in z.infolist() if not i.is_dir()]
    _check_infos(path, infos)
    manifest = _json({MANIFEST: _read(z, z.getinfo(MANIFEST), path, MAX_JSON_BYTES)}, MANIFEST, path) \
        if MANIFEST in z.namelist() else _refuse(path, f"no {MANIFEST}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        _refuse(path, f"{MANIFEST} is not an {FORMAT} manifest")
    if manifest.get("version") not in KNOWN_VERSIONS:
        _refuse(path, f"format version {manifest.get('version')!r} is unknown to this code (it reads "
                      f"{', '.join(map(str, KNOWN_VERSIONS))}); update the project to load it")
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        _refuse(path, f"{MANIFEST} lists no members")
    names = {i.filename for i in infos} - {MANIFEST}
    for n in sorted(names - set(listed)):
        _refuse(path, f"member {n!r} is not in the manifest")
    for n in sorted(set(listed) - names):
        _refuse(path, f"member {n!r} of the manifest is missing")
    out = {}
    for i in infos:
        if i.filename == MANIFEST:
            continue
        data = _read(z, i, path, MAX_JSON_BYTES if i.filename.endswith(".json") else MAX_MEMBER_BYTES)
        want = str((listed[i.filename] or {}).get("sha256", ""))
        if hashlib.sha256(data).hexdigest() != want:
            _refuse(path, f"member {i.filename!r}: its SHA-256 differs from the manifest's (changed or damaged)")
        out[i.filename] = data
    return out


def _check_infos(path: Path, infos) -> None:
    """Names, kinds and sizes from the zip's directory, before any member is read."""
    import zipfile
    if len(infos) > MAX_MEMBERS:
        _refuse(path, f"{len(infos)} members, more than a bundle may have ({MAX_MEMBERS})")
    seen, total = set(), 0
    for i in infos:
        n = i.filename
        parts = n.split("/")
        if not n or n.startswith("/") or "\\" in n or ":" in n or any(p in ("", ".", "..") for p in parts):
            _refuse(path, f"member name {n!r} escapes the bundle or is not a plain relative path")
        if n in seen:
            _refuse(path, f"member {n!r} appears twice")
        seen.add(n)
        if n.lower().endswith(PICKLE_SUFFIXES):
            _refuse(path, f"member {n!r} is a pickle-based file, which would need code to load; bundles hold "
                          f"safetensors, JSON and text only")
        if not n.endswith(SAFE_SUFFIXES):
            _refuse(path, f"member {n!r} is of a kind bundles do not hold (only {', '.join(SAFE_SUFFIXES)})")
        if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            _refuse(path, f"member {n!r} uses compression method {i.compress_type}; bundles are stored or deflated")
        if i.file_size > MAX_MEMBER_BYTES:
            _refuse(path, f"member {n!r} declares {i.file_size:,} bytes, out of bounds for a bundle member "
                          f"(at most {MAX_MEMBER_BYTES:,})")
        if i.compress_type == zipfile.ZIP_DEFLATED and i.file_size > MAX_RATIO * max(i.compress_size, 1):
            _refuse(path, f"member {n!r} declares {i.file_size:,} bytes from {i.compress_size:,} compressed, more "
                          f"than {MAX_RATIO} times: out of bounds for a bundle member")
        total += i.file_size
        if total > MAX_BUNDLE_BYTES:
            _refuse(path, f"its members declare more than {MAX_BUNDLE_BYTES:,} bytes in all")


def _read(z, info, path: Path, limit: int) -> bytes:
    """A member's bytes, never more than `limit` (or than its declared size, whatever the data says)."""
    if info.file_size > limit:
        _refuse(path, f"member {info.filename!r} declares {info.file_size:,} bytes, more than {limit:,}")
    with z.open(info) as f:
        data = f.read(min(info.file_size, limit) + 1)
    if len(data) != info.file_size:
        _refuse(path, f"member {info.filename!r} holds another size than it declares")
    return data


def _json(files: dict, name: str, path: Path):
    try:
        return json.loads(files[name])
    except KeyError:
        _refuse(path, f"no {name}")
    except ValueError as e:
        _refuse(path, f"{name} is not JSON ({e})")


def _safetensors(files: dict, name: str, path: Path, dtype: str, aliases: dict | None = None) -> dict:
    """A safetensors member's tensors (float16 ones back to float32 when the bundle stored them so), with the
    aliased names pointing at their tensor again."""
    import torch
    from safetensors.torch import load
    if name not in files:
        _refuse(path, f"{MODEL} names the member {name!r}, which the bundle does not hold")
    try:
        sd = load(files[name])
    except Exception as e:  # noqa: BLE001  (safetensors reports a bad header in its own error types)
        _refuse(path, f"member {name!r} is not a safetensors file ({type(e).__name__}: {str(e)[:120]})")
    sd = {k: v.float() if dtype == "float16" and v.dtype == torch.float16 else v for k, v in sd.items()}
    for alias, target in (aliases or {}).items():
        if target not in sd:
            _refuse(path, f"member {name!r}: alias {alias!r} names {target!r}, which it does not hold")
        sd[alias] = sd[target]
    return sd


def _unpack(model: dict, files: dict, path: Path, stage2: bool) -> Trained:
    if model.get("format") != FORMAT or model.get("version") not in KNOWN_VERSIONS:
        _refuse(path, f"{MODEL} is not an {FORMAT} model of a known version")
    dtype = model.get("dtype", "float32")
    stage1 = [(f["fold"], f["config"], _safetensors(files, f["weights"], path, dtype, f.get("aliases")))
              for f in model["stage1"]]
    if not stage1:
        _refuse(path, "it holds no stage-1 fold")
    t = Trained(str(model["name"]), stage1, dict(model["preprocess"]), blend=dict(model.get("blend") or {}),
                card=dict(model.get("card") or {}))
    t.card["bundle"] = {"file": str(path), "dtype": dtype, "versions": model.get("versions", {})}
    if not stage2:
        return t
    for f in model.get("seq", []):
        sd = _safetensors(files, f["weights"], path, "float32", f.get("aliases"))
        ck = {"model": {k[6:]: v for k, v in sd.items() if k.startswith("model.")}, "config": f["config"],
              "emb_dim": int(f["emb_dim"]), "emb_mean": sd.get("emb_mean"), "emb_std": sd.get("emb_std")}
        t.seq.append((f["fold"], ck))
    for f in model.get("boost", []):
        t.boost.append((f["fold"], f["config"], [files[m].decode() for m in f["models"]]))
    return t
