#!/usr/bin/env bash
# Scheduler C++ tests: builds and runs the unit tests (csrc/scheduler/tests/*.cpp), then
# the negative-compile checks (csrc/scheduler/tests/negative/*.cpp): every file must FAIL
# to compile with an error matching its "// EXPECT-ERROR: <extended regex>" line (so it
# fails for the intended reason), and every control_*.cpp must compile (so the checks
# cannot pass vacuously, e.g. on a broken include path).
# Needs only a C++20 compiler: CXX=clang++ works too. Run from anywhere.
# Last line: "<N> passed, <M> failed"; exit status non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C  # plain ASCII quotes in compiler messages
CXX=${CXX:-g++}
CXXFLAGS=(-std=c++20 -O1 -Wall -Werror -Icsrc/scheduler)
SRC=csrc/scheduler
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
passed=0
failed=0

echo "== unit tests ($CXX ${CXXFLAGS[*]})"
if "$CXX" "${CXXFLAGS[@]}" "$SRC"/*.cpp "$SRC"/tests/*.cpp -o "$BUILD/scheduler_tests" 2>"$BUILD/build.log"; then
  "$BUILD/scheduler_tests" | tee "$BUILD/unit.log"
  rc=${PIPESTATUS[0]}
  summary=$(grep -E '^[0-9]+ unit tests passed, [0-9]+ failed$' "$BUILD/unit.log" | tail -1)
  if [[ -z "$summary" ]]; then
    echo "FAIL  unit test binary printed no summary (exit $rc)"
    failed=$((failed + 1))
  else
    read -r up _ _ _ uf _ <<<"$summary"
    passed=$((passed + up))
    failed=$((failed + uf))
    if [[ $rc -ne 0 && $uf -eq 0 ]]; then
      echo "FAIL  unit test binary exited with $rc"
      failed=$((failed + 1))
    fi
  fi
else
  cat "$BUILD/build.log"
  echo "FAIL  unit tests did not build"
  failed=$((failed + 1))
fi

echo "== negative-compile checks"
shopt -s nullglob
negatives=("$SRC"/tests/negative/*.cpp)
n_controls=0
n_negative=0
for f in "${negatives[@]}"; do
  name=$(basename "$f")
  log="$BUILD/${name%.cpp}.log"
  if [[ "$name" == control_* ]]; then
    n_controls=$((n_controls + 1))
    if "$CXX" "${CXXFLAGS[@]}" -fsyntax-only "$f" 2>"$log"; then
      echo "  ok    $name compiles (control)"
      passed=$((passed + 1))
    else
      cat "$log"
      echo "  FAIL  $name must compile (control)"
      failed=$((failed + 1))
    fi
    continue
  fi
  n_negative=$((n_negative + 1))
  expect=$(sed -n 's#^// EXPECT-ERROR: *##p' "$f" | head -1)
  if [[ -z "$expect" ]]; then
    echo "  FAIL  $name has no EXPECT-ERROR line"
    failed=$((failed + 1))
  elif "$CXX" "${CXXFLAGS[@]}" -fsyntax-only "$f" 2>"$log"; then
    echo "  FAIL  $name compiled but must not"
    failed=$((failed + 1))
  elif grep -Eq -- "$expect" "$log"; then
    echo "  ok    $name does not compile: $(grep -Eo -m1 -- "$expect" "$log" | head -1)"
    passed=$((passed + 1))
  else
    grep -E 'error' "$log" | head -5
    echo "  FAIL  $name failed to compile, but not with /$expect/"
    failed=$((failed + 1))
  fi
done
if [[ $n_controls -eq 0 || $n_negative -eq 0 ]]; then
  echo "  FAIL  need at least one negative test and one control"
  failed=$((failed + 1))
fi

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
