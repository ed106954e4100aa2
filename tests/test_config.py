"""Settings from spec files and flags: every field type both ways, every spec in configs/ loadable, clear one-line
errors for a wrong type or an unknown key."""
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from src.config import TrainConfig, load_yaml, parse_config, positional
from src.utils import PipelineError, cli_main

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "configs").glob("*.yaml"))


@dataclass
class Kinds:
    n: int = 1               # an int
    x: float = 0.5           # a float
    s: str = "a"             # a text
    b: bool = False          # a bool
    items: list[str] = field(default_factory=list)  # a list


# (field, YAML text, value expected) for values each type must take from a file
GOOD_YAML = [("n", "3", 3), ("n", "4.0", 4), ("n", "'5'", 5), ("x", "2e-3", 0.002), ("x", "3", 3.0), ("x", "0.25", 0.25),
             ("s", "hello", "hello"), ("s", "2024", "2024"), ("b", "true", True), ("b", "false", False),
             ("b", "yes", True), ("b", "'on'", True), ("b", "0", False), ("items", "[a, b]", ["a", "b"]),
             ("items", "a b", ["a", "b"])]
# values that must be refused rather than turned into something else, with the message after "<file>: <field>: "
WHOLE, NUMBER, BOOL = "expected a whole number, got ", "expected a number, got ", "expected true or false, got "
BAD_YAML = [("n", "2.5", WHOLE + "2.5"), ("n", "true", WHOLE + "True"), ("n", "abc", WHOLE + "'abc'"),
            ("n", "[1]", WHOLE + "[1]"), ("x", "abc", NUMBER + "'abc'"), ("x", "false", NUMBER + "False"),
            ("x", "{a: 1}", NUMBER + "{'a': 1}"), ("s", "true", "expected text, got True"),
            ("s", "[a]", "expected text, got ['a']"), ("b", "maybe", BOOL + "'maybe'"), ("b", "2", BOOL + "2"),
            ("b", "0.5", BOOL + "0.5"), ("items", "{a: 1}", "expected a list of texts, got {'a': 1}"),
            ("n", "", "has no value (write 'n: VALUE', or leave the line out for the default)")]
GOOD_FLAGS = [("--n", "7", "n", 7), ("--x", "1e-4", "x", 1e-4), ("--s", "z", "s", "z"), ("--b", "false", "b", False),
              ("--b", "on", "b", True), ("--items", "p q", "items", ["p", "q"])]
BAD_FLAGS = [("--n", "2.5", WHOLE + "'2.5'"), ("--n", "x", WHOLE + "'x'"), ("--x", "abc", NUMBER + "'abc'"),
             ("--b", "maybe", BOOL + "'maybe'")]


@pytest.mark.parametrize("name,text,want", GOOD_YAML)
def test_each_type_from_a_file(tmp_path, name, text, want):
    f = tmp_path / "spec.yaml"
    f.write_text(f"{name}: {text}\n")
    got = load_yaml(f, Kinds)[name]
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("name,text,message", BAD_YAML)
def test_a_wrong_type_in_a_file_is_one_clear_error(tmp_path, name, text, message):
    f = tmp_path / "spec.yaml"
    f.write_text(f"{name}: {text}\n")
    with pytest.raises(PipelineError) as e:
        load_yaml(f, Kinds)
    assert str(e.value) == f"{f}: {name}: {message}"


@pytest.mark.parametrize("flag,value,name,want", GOOD_FLAGS)
def test_each_type_from_a_flag(flag, value, name, want):
    got = getattr(parse_config(Kinds, [flag, *value.split()]), name)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("flag,value,message", BAD_FLAGS)
def test_a_wrong_type_in_a_flag_is_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Kinds, [flag, value])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: argument {flag}: {message}")


def test_a_bare_bool_flag_means_true_and_flags_win_over_the_file(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text("b: true\nn: 3\n")
    assert parse_config(Kinds, ["--config", str(f)]).b is True
    assert parse_config(Kinds, ["--config", str(f), "--b", "false", "--n", "9"]) == Kinds(n=9, b=False)
    assert parse_config(Kinds, ["--b"]).b is True


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_in_configs_loads_and_pretrained_can_be_turned_off(spec):
    cfg = parse_config(TrainConfig, ["--config", str(spec)])
    assert cfg.run_name == spec.stem
    file_values = load_yaml(spec, TrainConfig)
    assert {k: getattr(cfg, k) for k in file_values} == file_values
    assert parse_config(TrainConfig, ["--config", str(spec), "--pretrained", "false"]).pretrained is False
    assert dataclasses.replace(cfg) == cfg and cfg.input_mode == file_values.get("input_mode", TrainConfig.input_mode)


def test_every_spec_is_trained_by_run_sh():
    """run.sh's lists of specs per device name every file in configs/, so the run.sh tests cover a new spec."""
    text = (ROOT / "run.sh").read_text()
    listed = {line.split("=", 1)[0]: line for line in text.splitlines() if line.startswith(("GPU_CONFIGS=", "CPU_CONFIGS="))}
    assert set(listed) == {"GPU_CONFIGS", "CPU_CONFIGS"}
    for spec in SPECS:
        assert f"configs/{spec.name}" in listed["GPU_CONFIGS"] + listed["CPU_CONFIGS"], spec.name


@pytest.mark.parametrize("content,expect", [("pretrained: maybe\n", "pretrained: expected true or false"),
                                            ("epochs: 2.5\n", "epochs: expected a whole number"),
                                            ("learning_rate: 0.1\n", "unknown setting(s) ['learning_rate']")])
def test_a_bad_spec_file_is_one_line_and_exit_2(tmp_path, content, expect, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: parse_config(TrainConfig, ["--config", str(f)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[0].startswith(f"error: {f}: {expect}") and len(lines) == 1, lines


def test_a_bad_spec_file_stops_the_real_command_without_a_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("pretrained: maybe\n")
    r = subprocess.run([sys.executable, "-m", "src.train", "--config", str(f), "--data-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {f}: pretrained: expected true or false, got 'maybe'"]


@dataclass
class WithPositional:
    runs: list[str] = positional(nargs="+")  # run folders


def test_positional_lists_come_from_the_command_line():
    assert parse_config(WithPositional, ["a", "b"]).runs == ["a", "b"]
