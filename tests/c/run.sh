#!/usr/bin/env bash
# Compile and run the C tests (tests/c/test_*.c) and the C examples (examples/c/*.c) against an
# already built libphi3 (scripts/c-tests builds it first, then calls this).
#
#   tests/c/run.sh [--lib-dir DIR] [--valgrind] [--no-soak]
#
# Default run: every program built with -fsanitize=address,undefined and run with LeakSanitizer
# on, so a leaked handle, a use after free or UB in the C code fails it. With --valgrind (and
# valgrind installed) each program is also built without sanitizers and run under memcheck.
# Then the soak (tests/c/soak.c), built without sanitizers because it measures resident memory:
# thousands of generations, RSS, fds and threads flat after a warm-up (--no-soak skips it).
# Prints "N passed, M failed" (counting programs; a valgrind run counts as its own program) and
# exits non-zero on any failure. Environment: CC (default cc), TEST_TIMEOUT (seconds per program,
# default 300), PHI3_SOAK_ITERS / PHI3_SOAK_WARMUP / PHI3_SOAK_MAX_GROWTH_KB (see soak.c).
set -uo pipefail
cd "$(dirname "$0")/../.."

lib_dir="${CARGO_TARGET_DIR:-target}/debug"
use_valgrind=0
use_soak=1
while [ $# -gt 0 ]; do
  case "$1" in
    --lib-dir) lib_dir="$2"; shift 2 ;;
    --valgrind) use_valgrind=1; shift ;;
    --no-soak) use_soak=0; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

cc="${CC:-cc}"
timeout_s="${TEST_TIMEOUT:-300}"
if [ ! -f include/phi3.h ]; then
  echo "run.sh: include/phi3.h not found" >&2; exit 2
fi
if [ ! -f "$lib_dir/libphi3.so" ]; then
  echo "run.sh: $lib_dir/libphi3.so not found: run 'cargo build -p phi3-capi' first" >&2; exit 2
fi
lib_dir="$(cd "$lib_dir" && pwd)"
out_dir="${CARGO_TARGET_DIR:-target}/c-tests"
mkdir -p "$out_dir/asan" "$out_dir/plain" "$out_dir/soak"

base_flags=(-std=c99 -Wall -Wextra -Wpedantic -Werror -g -pthread -Iinclude -Itests/c)
san_flags=(-fsanitize=address,undefined -fno-omit-frame-pointer)
link_flags=(-L"$lib_dir" -lphi3 -Wl,-rpath,"$lib_dir" -lm)

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
if [ -f tests/c/lsan.supp ]; then
  export LSAN_OPTIONS="suppressions=$PWD/tests/c/lsan.supp:print_suppressions=0"
fi

passed=0
failed=0
failures=()

pass() { passed=$((passed + 1)); echo "PASS $1 ($2 s)"; }
fail() { failed=$((failed + 1)); failures+=("$1"); echo "FAIL $1: $2"; }

# build NAME SOURCE KIND(asan|plain|soak): compile SOURCE into $out_dir/KIND/NAME.
build() {
  local name="$1" src="$2" kind="$3" flags=("${base_flags[@]}")
  [ "$kind" = asan ] && flags+=("${san_flags[@]}") || flags+=(-O1)
  [ "$kind" = soak ] && flags+=(-std=c11)
  "$cc" "${flags[@]}" "$src" -o "$out_dir/$kind/$name" "${link_flags[@]}"
}

# The chat example with two piped lines: exits 0, writes two replies and two stats lines; and a
# missing model folder: exits non-zero with the library's message.
run_chat() {
  local exe=("$@") out err rc
  out="$(mktemp)"; err="$(mktemp)"
  printf 'Hello there!\nHow are you today?\n' |
    timeout "$timeout_s" "${exe[@]}" --max-tokens 24 >"$out" 2>"$err"
  rc=$?
  cat "$out" "$err"
  if [ $rc -ne 0 ]; then rm -f "$out" "$err"; echo "chat exited with $rc"; return 1; fi
  if [ "$(grep -c 'generated' "$err")" -ne 2 ]; then
    rm -f "$out" "$err"; echo "expected two stats lines on stderr"; return 1
  fi
  if [ ! -s "$out" ]; then rm -f "$out" "$err"; echo "no reply on stdout"; return 1; fi
  echo "Hi" | timeout "$timeout_s" "${exe[@]}" tests/fixtures/no-such-model >"$out" 2>"$err"
  rc=$?
  cat "$err"
  if [ $rc -eq 0 ] || ! grep -q 'PHI3_ERR_IO' "$err"; then
    rm -f "$out" "$err"; echo "a missing model folder should fail with PHI3_ERR_IO"; return 1
  fi
  rm -f "$out" "$err"
}

# run_program LABEL KIND NAME: run one built program (tests directly, the chat example through
# run_chat), under valgrind when KIND is plain.
run_program() {
  local label="$1" kind="$2" name="$3" exe=("$out_dir/$2/$3") start rc
  if [ "$kind" = plain ]; then
    # Rust's libstd keeps a few allocations alive until exit by design ("still reachable" or
    # "possibly lost" in its thread-locals and rayon's global pool); only definite leaks count.
    # PHI3_C_TEST_QUICK shortens the longest generation (valgrind runs ~50x slower).
    exe=(env PHI3_C_TEST_QUICK=1 valgrind -q --error-exitcode=1 --leak-check=full
         --errors-for-leak-kinds=definite --show-leak-kinds=definite "${exe[@]}")
  fi
  start=$SECONDS
  if [ "$name" = chat ]; then
    local msg
    if msg="$(run_chat "${exe[@]}" 2>&1)"; then
      echo "$msg" | sed 's/^/    /'
      pass "$label" $((SECONDS - start))
    else
      echo "$msg" | sed 's/^/    /'
      fail "$label" "$(echo "$msg" | tail -n 1)"
    fi
    return
  fi
  timeout "$timeout_s" "${exe[@]}"
  rc=$?
  if [ $rc -eq 0 ]; then
    pass "$label" $((SECONDS - start))
  elif [ $rc -eq 124 ]; then
    fail "$label" "timed out after ${timeout_s} s"
  else
    fail "$label" "exit status $rc"
  fi
}

programs=()
for src in tests/c/test_*.c examples/c/*.c; do
  [ -f "$src" ] && programs+=("$src")
done

kinds=(asan)
if [ $use_valgrind -eq 1 ]; then
  if command -v valgrind >/dev/null 2>&1; then
    kinds+=(plain)
  else
    echo "run.sh: --valgrind given but valgrind is not installed: skipping the valgrind runs" >&2
  fi
fi

for kind in "${kinds[@]}"; do
  for src in "${programs[@]}"; do
    name="$(basename "$src" .c)"
    label="${src%.c}"
    [ "$kind" = plain ] && label="$label [valgrind]"
    echo "== $label"
    if ! build "$name" "$src" "$kind"; then
      fail "$label" "does not compile"
      continue
    fi
    run_program "$label" "$kind" "$name"
  done
done

if [ $use_soak -eq 1 ]; then
  echo "== tests/c/soak"
  if build soak tests/c/soak.c soak; then
    run_program tests/c/soak soak soak
  else
    fail tests/c/soak "does not compile"
  fi
fi

echo
if [ $failed -gt 0 ]; then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
