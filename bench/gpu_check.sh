#!/usr/bin/env bash
# Every GPU figure in one run of at most 8 minutes, on a bare GPU machine:
#
#   bench/gpu_check.sh             install the carried wheels (.whl/, from `make gpu-wheels`) and this
#                                  checkout into a private folder, run the gpu-marked tests, then the
#                                  detector, gallery-job and trainer figures; print one table and write
#                                  gpu_report.md (with results.jsonl, gpu_tests.xml, gpu_check.log)
#                                  under $OUT (default ./gpu_out)
#   bench/gpu_check.sh --dry-run   no GPU, seconds: checks the wheels list (and the folder, when there
#                                  is one), that the check's code imports without Ray and needs nothing
#                                  beyond the image and the wheels, the gpu test selection (and that it
#                                  skips cleanly without CUDA), and the report writer
#   bench/gpu_check.sh --smoke     the whole run on the CPU with tiny models (a rehearsal; no figure)
#
# Each part runs under its own time cap (and never past the 8-minute deadline); a part stopped at its
# cap keeps the figures it had written. Environment: PYTHON (default python3), OUT, GPU_WHEELS (default
# .whl), GPU_SITE (where the wheels and vlmixer are installed; default a fresh folder under /tmp).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${PYTHON:-python3}"
OUT="${OUT:-$here/gpu_out}"
WHEELS="${GPU_WHEELS:-$here/.whl}"
SITE="${GPU_SITE:-/tmp/vlmixer_gpu_site}"
mode="${1:-run}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results.jsonl"
JUNIT="$OUT/gpu_tests.xml"
GPU_TESTS="tests/test_gpu_paths.py"
# the gpu-marked tests, one per CUDA path; the dry run checks that the selection finds exactly these
EXPECTED_TESTS="test_detector_on_cuda_equals_cpu test_selection_on_cuda_equals_cpu_exactly
test_trainer_steps_in_bf16_autocast_stay_close_to_fp32 test_ddp_over_nccl_in_a_world_of_one_trains_as_the_plain_model"
DEADLINE=$(( $(date +%s) + 470 ))  # 8 minutes less 10 s for the report
SCALE=1  # the smoke run's CPU rehearsal gets 4x the caps and no 8-minute deadline

say() { echo "[gpu-check] $*" | tee -a "$LOG"; }

# run_part NAME CAP_S CMD...: at most CAP_S seconds (less if the deadline is nearer); records status
run_part() {
  local name="$1" cap=$(( $2 * SCALE )); shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( cap > left )) && cap=$left
  if (( cap < 5 )); then
    say "$name: skipped, the 8-minute deadline is reached"
    echo "{\"section\": \"status\", \"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"cap_s\": 0, \"note\": \"skipped: deadline\"}" >>"$RESULTS"
    return 0
  fi
  local t0=$SECONDS rc
  say "$name: start (cap ${cap}s)"
  timeout -k 5 "$cap" "$@" >>"$LOG" 2>&1
  rc=$?
  local note="ok"
  (( rc == 124 || rc == 137 )) && note="stopped at its cap"
  (( rc != 0 && rc != 124 && rc != 137 )) && note="failed (see gpu_check.log)"
  echo "{\"section\": \"status\", \"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( SECONDS - t0 )), \"cap_s\": $cap, \"note\": \"$note\"}" >>"$RESULTS"
  say "$name: $note, rc $rc, $(( SECONDS - t0 ))s"
  return 0
}

check_selection() {
  # -m gpu selects exactly the expected tests, none lives in another file (the GPU machine runs only
  # this one: the others import Ray or spaCy), and without CUDA every one of them skips
  local cuda=0 listing names t stray bad=0
  "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && cuda=1
  if (( cuda )); then
    listing="$("$PY" -P -m pytest --collect-only -q -m gpu "$GPU_TESTS" -p no:cacheprovider 2>&1)"
  else
    listing="$("$PY" -P -m pytest -v -m gpu "$GPU_TESTS" -p no:cacheprovider 2>&1)"
  fi
  names="$(grep -o "::test_[A-Za-z0-9_]*" <<<"$listing" | sed 's/:://' | sort -u)"
  for t in $EXPECTED_TESTS; do
    grep -qx "$t" <<<"$names" || { say "dry run: $t is not selected by -m gpu"; bad=1; }
  done
  for t in $names; do
    grep -qw "$t" <<<"$EXPECTED_TESTS" || { say "dry run: $t is gpu-marked but not in EXPECTED_TESTS"; bad=1; }
  done
  stray="$(grep -l "mark.gpu" tests/*.py | grep -v "^$GPU_TESTS$" || true)"
  [ -z "$stray" ] || { say "dry run: gpu-marked tests outside $GPU_TESTS: $stray"; bad=1; }
  if (( ! cuda )) && grep "::test_" <<<"$listing" | grep -v " SKIPPED" | grep -q .; then
    grep "::test_" <<<"$listing" | grep -v " SKIPPED" | head -3
    say "dry run: without CUDA the gpu tests must all skip"; bad=1
  fi
  (( bad == 0 )) && say "dry run: test selection ok ($(grep -c "::test_" <<<"$listing") gpu tests, all skip without CUDA)"
  return $bad
}

if [ "$mode" = "--dry-run" ]; then
  : >"$LOG"
  ok=0
  "$PY" bench/gpu/wheels.py check --dir "$WHEELS" 2>&1 | tee -a "$LOG"; (( PIPESTATUS[0] == 0 )) || ok=1
  "$PY" bench/gpu/imports.py 2>&1 | tee -a "$LOG"; (( PIPESTATUS[0] == 0 )) || ok=1
  check_selection || ok=1
  "$PY" bench/gpu/report.py --sample "$OUT/dry_run" 2>&1 | tee -a "$LOG"; (( PIPESTATUS[0] == 0 )) || ok=1
  if (( ok == 0 )); then say "dry run: ready for a GPU machine"; else say "dry run: NOT ready (see above)"; fi
  exit $ok
fi

: >"$LOG"; : >"$RESULTS"; rm -f "$JUNIT" "$OUT/gpu_report.md"
smoke=()
if [ "$mode" = "--smoke" ]; then
  smoke=(--smoke)
  SCALE=4; DEADLINE=$(( DEADLINE + 3600 ))
  say "smoke run on $(hostname): the parts on the CPU with tiny models, nothing installed"
elif [ "$mode" != "run" ]; then
  echo "usage: bench/gpu_check.sh [--dry-run | --smoke]" >&2; exit 2
else
  command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1
  if [ -d "$WHEELS" ]; then
    # the carried wheels and this checkout, into a private folder: the machine's own packages stay as they are
    rm -rf "$SITE"
    pip_target=("$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile
                --no-cache-dir --target "$SITE")
    run_part install-wheels 40 "${pip_target[@]}" "$WHEELS"/*.whl
    run_part install-vlmixer 60 "${pip_target[@]}" --no-build-isolation "$here"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no wheel folder $WHEELS: using the packages already installed"
  fi
  # -P: not this folder's vlmixer/ (only the ground package) but the installed one, with all its parts
  if ! where="$("$PY" -P -c 'import vlmixer.storage, vlmixer.trainer, vlmixer.pipeline.detector as d; print(d.__file__)' 2>>"$LOG")"; then
    say "vlmixer does not import here (see gpu_check.log): run make gpu-wheels where pip works, or make install"
    exit 2
  fi
  say "vlmixer from $where"
  run_part tests 90 "$PY" -P -m pytest -q -m gpu "$GPU_TESTS" -p no:cacheprovider --junitxml="$JUNIT"
fi
run_part detector 130 "$PY" bench/gpu/part_detector.py --results "$RESULTS" "${smoke[@]}"
run_part gallery 70 "$PY" bench/gpu/part_gallery.py --results "$RESULTS" "${smoke[@]}"
run_part trainer 200 "$PY" bench/gpu/part_trainer.py --results "$RESULTS" "${smoke[@]}"
"$PY" bench/gpu/report.py --results "$RESULTS" --junit "$JUNIT" --out "$OUT/gpu_report.md" | tee -a "$LOG"
