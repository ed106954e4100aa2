"""Validate a submission file and upload it with the official Kaggle client.

    python -m src.upload submissions/stage_2_demo_blend.csv -m "resnet10t + sequence" --dry-run
    python -m src.upload submissions/stage_2_input_blend.csv -m "5-fold seresnext50 + GRU"

Runs `kaggle competitions submit -c rsna-intracranial-hemorrhage-detection -f FILE -m MESSAGE` after the
file passed the same validation as src.make_submission's (src.submission) (IDs and order of the sample submission, no NaN,
values in [0, 1]). Credentials: ~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY in the
environment (https://www.kaggle.com/settings, "Create New Token"). --dry-run validates and prints the
command without running it.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import submission
from .config import parse_config, positional, short
from .layout import SAMPLE_CSV
from .utils import PipelineError, cli_main

COMPETITION = "rsna-intracranial-hemorrhage-detection"


def has_credentials(env=None) -> bool:
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return True
    if env.get("KAGGLE_API_TOKEN"):
        return True
    cfg_dir = Path(env.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (cfg_dir / "kaggle.json").exists()


def kaggle_command(path, message) -> list[str]:
    exe = shutil.which("kaggle") or str(Path(sys.executable).with_name("kaggle"))
    return [exe, "competitions", "submit", "-c", COMPETITION, "-f", str(path), "-m", message]


def submit(path, message, sample, dry_run=False) -> int:
    df = submission.validate_file(path, sample)
    print(f"{path}: valid ({len(df)} rows, {len(df) // 6} images)")
    cmd = kaggle_command(path, message)
    if dry_run:
        print("dry run; would run:\n  " + shlex.join(cmd))
        return 0
    if not has_credentials():
        raise PipelineError("no Kaggle credentials: put kaggle.json (Kaggle > Settings > API > Create New Token) in "
                            "~/.kaggle/ (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; then rerun")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise PipelineError("the kaggle client is not installed here: pip install -r requirements.txt") from e
    except subprocess.TimeoutExpired as e:
        raise PipelineError("the upload did not finish in 10 minutes: is there network access to kaggle.com?") from e
    sys.stdout.write(r.stdout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise PipelineError("kaggle submit failed (no network, wrong credentials, or competition rules not accepted?): "
                            + " | ".join(tail))
    return 0


@dataclass
class UploadConfig:
    file: str = positional(None)      # the submission CSV (submissions/stage_2_<name>.csv)
    message: str = short("", "-m")    # the submission's description on Kaggle (required)
    sample: str = ""                  # the data's sample submission (default: DATA_DIR/stage_2_sample_submission.csv)
    data_dir: str = "input"           # the Kaggle-layout data folder whose sample submission the file must match
    dry_run: bool = False             # validate and print the upload command without running it


def main():
    a = parse_config(UploadConfig, description=__doc__, prog="python -m src.upload")
    if not a.file or not a.message:
        raise PipelineError("give the submission file and a message: python -m src.upload FILE -m \"message\"")
    sys.exit(submit(a.file, a.message, a.sample or str(Path(a.data_dir) / SAMPLE_CSV), a.dry_run))


if __name__ == "__main__":
    cli_main(main)
