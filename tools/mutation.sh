#!/usr/bin/env bash
# Mutation testing (mutmut, pinned in requirements.txt under "tools"): is each silent-mistake module's code held by
# a test that fails when the code is changed? Not part of CI (minutes of both cores); run it after changing one of
# these modules or its tests, and write the score into docs/tests.md.
#
#   bash tools/mutation.sh                      # every module below
#   bash tools/mutation.sh metrics blend        # some of them
#   MUTATION_DIR=/tmp/mut bash tools/mutation.sh dicom   # where the scratch copies go (default /tmp/ich-mutation)
#
# Per module: a scratch copy of the project, mutmut over that module (or the named functions of it) running only the
# tests that exercise it, then one line "<module>: killed K of N (S survived, T timeout, U no test) = P%" and the
# surviving mutants' diffs in $MUTATION_DIR/<module>/survivors.diff.
#
# Two things about mutmut 3.8.1 the scratch copy works around (both checked in its source, mutmut/stats.py and
# mutmut/utils/format_utils.py): mutmut takes `src/` for a source folder whose modules are top-level, and names
# mutants with the `src.` prefix stripped, while this project's package IS `src` (`import src.metrics`). So the copy
# puts the package one level down (`src/src/...`: mutmut strips the outer `src.` and the names match the modules'
# `__name__`), and mutmut runs under `python -O`, which drops the one `assert` in mutmut (record_trampoline_hit)
# that refuses a module name starting with `src.`. -O drops `assert` statements only: pytest rewrites the tests'
# asserts into plain raises (they still fail), and src/ has no assert (tests/test_structure.py could check it).
# Tests that start a subprocess (which imports the unmutated tree) or train a model are left out of the selection:
# they cannot see a mutant and cost minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${MUTATION_DIR:-/tmp/ich-mutation}
SHARED=$(cd "$ROOT/.." && pwd)/shared

# module -> "tests to run | pytest -k expression | mutant name globs (empty: the whole module)"
declare -A SPEC=(
  [metrics]="tests/test_metrics.py tests/test_intervals.py | not report_card | "
  [intervals]="tests/test_intervals.py | not report_card | "
  [blend]="tests/test_blend.py tests/test_submission.py | not report_and_the_card and not kaggle_client | src.blend.x_fit_simplex* src.blend.x_fit_weights* src.blend.x_weights_for* src.blend.x_blend* src.blend.x_fold_weights* src.blend.x_cross_fitted* src.blend.x_oof_table* src.blend.x_fit_blend* src.blend.x_score* src.blend.x_weight_matrix*"
  [submission]="tests/test_submission.py | not kaggle_client | "
  [dicom]="tests/test_dicom.py tests/test_bombs.py tests/test_bad_input.py | not cli and not page and not cache_build and not stays_on_disk and not weights and not backbone | src.dicom.x_read_dicom* src.dicom.x_check_header* src.dicom.x_rescale_params* src.dicom.x_check_ct_values* src.dicom.x_first_value* src.dicom.x_pixels* src.dicom.x__finite* src.dicom.x__native_pixels*"
  [bundle]="tests/test_bundle.py | crafted or holding_another or declaring_more or flipped or bound or huge_size or truncated or gives_back or reader_refuses or checksum or cannot_read or optional or file_hash | src.bundle.x_read_bundle* src.bundle.x__refuse* src.bundle.x__check_file* src.bundle.x__file_sha256* src.bundle.x__checked_members* src.bundle.x__verified* src.bundle.x__check_infos* src.bundle.x__read* src.bundle.x__json* src.bundle.x__safetensors* src.bundle.x__unpack*"
)
# bundle: the reader's own tests, on small bundles made for them (the tests on a trained run's bundle build one
# again in each mutant's pytest session: hours on 2 cores).
ORDER=(metrics intervals blend submission dicom bundle)
MODULES=("$@"); [ ${#MODULES[@]} -gt 0 ] || MODULES=("${ORDER[@]}")

toml_list() { local out="" w; for w in "$@"; do out+="\"$w\", "; done; echo "[${out%, }]"; }

for m in "${MODULES[@]}"; do
  [ -n "${SPEC[$m]+x}" ] || { echo "unknown module $m (one of: ${ORDER[*]})" >&2; exit 2; }
  IFS='|' read -r tests kexpr globs <<< "${SPEC[$m]}"
  read -ra tests <<< "$tests"; read -ra globs <<< "$globs"
  kexpr=$(echo "$kexpr" | xargs)
  d=$WORK/$m
  rm -rf "$d" && mkdir -p "$d/src"
  cp -r "$ROOT/src" "$d/src/src" && cp -r "$ROOT/tests" "$ROOT/pytest.ini" "$d/"
  find "$d" -name __pycache__ -prune -exec rm -rf {} +
  ln -s "$SHARED" "$d/shared"  # tests/conftest.py finds ../shared beside the checkout: here, beside mutants/
  sel=("${tests[@]}"); [ -n "$kexpr" ] && sel+=("-k" "$kexpr")
  # torch (WeightedBCE's test) is not fork-safe: forked from mutmut's own process, its mutants hang. A fork server
  # avoids that at about a third of the speed, so only where torch is imported.
  iso=fork; [ "$m" = metrics ] && iso=forkserver
  cat > "$d/pyproject.toml" <<EOF
[tool.mutmut]
source_paths = ["src/"]
only_mutate = ["src/src/$m.py"]
pytest_add_cli_args_test_selection = $(toml_list "${sel[@]}")
pytest_add_cli_args = ["-p", "no:xdist", "-p", "no:cacheprovider"]
process_isolation = "$iso"
EOF
  t0=$(date +%s)
  (cd "$d" && OMP_NUM_THREADS=1 "$PY" -O -m mutmut run --max-children "${MUTATION_JOBS:-2}" "${globs[@]}" > run.log 2>&1) || {
    echo "$m: mutmut failed, see $d/run.log" >&2; tail -c 3000 "$d/run.log" >&2; exit 1; }
  (cd "$d" && "$PY" -O -m mutmut results --all true > results.txt)
  if [ ${#globs[@]} -gt 0 ]; then  # mutmut lists every mutant of the module: keep the named functions'
    pat=$(printf '%s\n' "${globs[@]}" | sed 's/\*$//; s/\./\\./g' | paste -sd'|')
    grep -E "^ *($pat)" "$d/results.txt" > "$d/results.sel" || true; mv "$d/results.sel" "$d/results.txt"
  fi
  count() { grep -c ": $1\$" "$d/results.txt" || true; }
  k=$(count killed); s=$(count survived); t=$(count timeout); u=$(count "no tests"); n=$(wc -l < "$d/results.txt")
  # the survivors' diffs, in one process (`mutmut show NAME` each costs a second's start)
  (cd "$d" && grep ": survived$" results.txt | sed 's/: survived$//; s/^ *//' | "$PY" -O -c '
import sys
from mutmut.__main__ import find_mutant, get_diff_for_mutant
for name in sys.stdin.read().split():
    print(f"# {name}\n{get_diff_for_mutant(name, path=find_mutant(name).path)}\n")' > survivors.diff)
  scored=$((k + s + t))
  echo "$m: killed $k of $n ($s survived, $t timeout, $u no test) = $(( scored ? 100 * (k + t) / scored : 0 ))% of those tested, in $(( $(date +%s) - t0 )) s; survivors: $d/survivors.diff"
done
