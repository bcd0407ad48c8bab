#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer stage (CPU machine, no GPU needed):
#   bash .ci/sanitize.sh
# Builds nag_cuda._C and nag_cuda._kernels with NAG_CUDA_SANITIZE=1 (setup.py: -fsanitize=address,undefined
# -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -fno-wrapv, CPU build) out of place, from a snapshot of the
# source tree in a temporary folder (the installed nag_cuda, the checkout and its build/ are not touched), lays out an
# importable copy of the package with those libraries, and runs the step-path tests against it with the compiler's ASan runtime preloaded into Python (which is not
# itself built with ASan). Exits non-zero on any sanitizer report (printed at the end), any test failure, or no test run
# (pytest's exit code 5).
# Environment:
#   NAG_SANITIZE_SRC   the source tree to build and test (default: this checkout); e.g. a scratch copy with a planted
#                      bug, to see that the stage catches it
#   PYTEST_K           a pytest -k expression (default: every test of the files below)
#   NAG_SANITIZE_KEEP  1: keep the temporary folder (its path is printed)
#   CXX, MAX_JOBS      the compiler (its libasan.so is the one preloaded) and parallel compile jobs, as for setup.py
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "${NAG_SANITIZE_SRC:-$repo}" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/nag-sanitize.XXXXXX")
cleanup() { if [ "${NAG_SANITIZE_KEEP:-0}" = 1 ]; then echo "sanitize: kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
start=$SECONDS

# The step-path tests; test_hostile.py and test_fuzz.py are run where they exist.
tests=(tests/test_host_path.py tests/test_clip.py tests/test_ops.py tests/test_drop_in.py tests/test_optimizer.py)
for optional in tests/test_hostile.py tests/test_fuzz.py; do
  if [ -e "$src/$optional" ]; then tests+=("$optional"); fi
done
for t in "${tests[@]}"; do
  [ -e "$src/$t" ] || { echo "sanitize: $src/$t is missing" >&2; exit 1; }
done

# 1. Snapshot of the sources (a build or test run reads one consistent tree, whatever else edits the checkout meanwhile).
mkdir -p "$work/src"
cp -r "$src/setup.py" "$src/pyproject.toml" "$src/README.md" "$src/csrc" "$src/nag_cuda" "$src/tests" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} + -o -name '*.so' -exec rm -f {} +

# 2. The sanitized CPU build, out of place.
echo "sanitize: building $src/csrc with ASan + UBSan in $work"
(cd "$work/src" && NAG_CUDA_BUILD=0 NAG_CUDA_SANITIZE=1 python setup.py -q build_ext \
  --build-temp "$work/build" --build-lib "$work/lib") > "$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log" >&2; echo "sanitize: the sanitized build failed" >&2; exit 1; }
libs=("$work"/lib/nag_cuda/_C*.so "$work"/lib/nag_cuda/_kernels*.so)
[ -e "${libs[0]}" ] && [ -e "${libs[1]}" ] ||
  { echo "sanitize: the build made no nag_cuda/_C*.so or no _kernels*.so" >&2; exit 1; }
for lib in "${libs[@]}"; do
  undefined=$(nm -D --undefined-only "$lib")
  grep -q __asan_report <<< "$undefined" || { echo "sanitize: $lib is not instrumented by ASan" >&2; exit 1; }
  grep -q __ubsan_handle <<< "$undefined" || { echo "sanitize: $lib is not instrumented by UBSan" >&2; exit 1; }
done
echo "sanitize: built in $((SECONDS - start)) s"

# 3. An importable copy: nag_cuda's Python files and the sanitized library, the tests beside it. Run from that folder
# (`python -m pytest` puts it first on sys.path; PYTHONPATH too, for the tests' subprocesses); the checkout is not on
# sys.path, so neither its nag_cuda/ nor the installed distribution's _C can be what is imported.
pkg=$work/pkg
mkdir -p "$pkg/nag_cuda"
cp "$work"/src/nag_cuda/*.py "$pkg/nag_cuda/"
cp "${libs[@]}" "$pkg/nag_cuda/"
cp -r "$work/src/tests" "$work/src/pyproject.toml" "$pkg/"
cat > "$pkg/sanitize_check.py" <<'EOF'
"""pytest plugin (-p sanitize_check): refuses to run unless the sanitized copy of nag_cuda._C is the one imported."""
import os

import nag_cuda._ops


def pytest_sessionstart(session):
    path = os.path.realpath(nag_cuda._ops._C.__file__)
    here = os.path.realpath(os.path.dirname(__file__))
    if not path.startswith(here + os.sep):
        raise SystemExit(f"sanitize: imported {path}, not the sanitized copy under {here}")
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(f"sanitize: nag_cuda._C is {path}")


def pytest_runtest_logstart(nodeid, location):
    with open(os.environ["SANITIZE_CURRENT_TEST"], "w") as f:  # (where a sanitizer ended the process)
        f.write(nodeid)
EOF

# 4. The tests, with the compiler's ASan runtime first in the process (UBSan's comes in as the library's dependency),
# and its libstdc++ right after: ASan finds the real __cxa_throw when it starts, and Python loads libstdc++ only later
# (with torch), so without it the first C++ exception thrown (any TORCH_CHECK) ends the process in a CHECK failure.
preload=()
for lib in libasan.so libstdc++.so.6; do
  path=$("${CXX:-c++}" -print-file-name=$lib)
  [ -e "$path" ] || { echo "sanitize: ${CXX:-c++} has no $lib ($path)" >&2; exit 1; }
  preload+=("$(readlink -f "$path")")
done
reports=$work/reports
mkdir -p "$reports"
# detect_leaks=0: CPython and torch keep memory until exit by design. allocator_may_return_null=1: an allocation too
# large for ASan returns null (torch raises its out-of-memory error) rather than ending the process. ASan's reports go
# to files (one per process, the tests' subprocesses included). UBSan's ignore log_path where the ASan runtime is
# preloaded (gcc 12) and go to stderr: so pytest captures only sys.stdout/err (--capture=sys), not file descriptor 2,
# which a process that a report ends would take with it, and its output is searched for UBSan's reports.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=0:log_path=$reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH=$pkg PYTHONDONTWRITEBYTECODE=1 SANITIZE_CURRENT_TEST=$work/current-test
k_args=()
if [ -n "${PYTEST_K:-}" ]; then k_args=(-k "$PYTEST_K"); fi
echo "sanitize: pytest ${tests[*]} ${k_args[*]}"
set +e
(cd "$pkg" && LD_PRELOAD="${preload[0]}:${preload[1]}${LD_PRELOAD:+:$LD_PRELOAD}" \
  python -m pytest -q -p no:cacheprovider -p sanitize_check --capture=sys -rfE "${k_args[@]}" "${tests[@]}") 2>&1 \
  | tee "$work/pytest.log"
rc=${PIPESTATUS[0]}
set -e

found=0
if grep -qE ': runtime error: |^SUMMARY: UndefinedBehaviorSanitizer|ERROR: AddressSanitizer' "$work/pytest.log"; then
  found=1
  echo "===== sanitizer report(s) in pytest's output: =====" >&2
  grep -E -m 5 -A 40 ': runtime error: |ERROR: AddressSanitizer' "$work/pytest.log" >&2 || true
fi
for report in "$reports"/*; do
  [ -s "$report" ] || continue
  found=1
  echo "===== sanitizer report: $(basename "$report") =====" >&2
  cat "$report" >&2
done
if [ "$found" = 1 ] && [ -s "$work/current-test" ]; then
  echo "sanitize: the last test pytest started: $(cat "$work/current-test")" >&2
fi
echo "sanitize: $((SECONDS - start)) s in all"
if [ "$found" = 1 ]; then
  echo "sanitize: FAILED: the sanitizers reported errors (above); pytest exit code $rc" >&2
  exit 1
fi
if [ "$rc" = 5 ]; then
  echo "sanitize: FAILED: pytest collected no tests (exit code 5)" >&2
  exit 1
fi
if [ "$rc" != 0 ]; then
  echo "sanitize: FAILED: pytest exit code $rc" >&2
  exit "$rc"
fi
echo "sanitize: passed, no sanitizer reports"
