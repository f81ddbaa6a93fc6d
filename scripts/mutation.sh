#!/usr/bin/env bash
# Mutation testing of the code that guards peers (docs/testing.md, "Mutation testing").
#
#   bash scripts/mutation.sh                  # every group, one after the other
#   bash scripts/mutation.sh protocols keys   # only these groups
#   bash scripts/mutation.sh --list           # the groups, what they mutate, what they run
#
# Options: --jobs N (mutants run at once, default 1), --work DIR (default .mutation/),
# --fresh (re-check every survivor in a fresh interpreter, see below), --report (only
# print the report of the last run in DIR/GROUP/, e.g. one stopped with Ctrl-C),
# --sample N (check only N mutants drawn at random, --seed S, default 1: an estimate of
# the score of a group too slow to run whole; the report counts the others as not checked),
# --tests "FILES" (run these test files instead of the group's own: a first pass of a slow
# group against its fast tests, whose survivors are then re-checked against the rest).
# Needs mutmut (`pip install -e '.[mutation]'`; MUTMUT=/path/to/mutmut picks another) and
# the compiled extensions built in place (`python setup.py build_ext --inplace`).
#
# Each group runs in its own copy of the tree (DIR/GROUP/: the tracked and untracked
# files plus the built extensions), so the work tree is never touched, a killed run leaves
# nothing behind, and groups never share mutmut state. mutmut runs the group's fast tests
# once to learn which test calls which function, then runs each mutant against only the
# tests that call the mutated function. The summary (score and surviving mutants with
# their diffs) goes to stdout and DIR/GROUP/report.txt. Heavy: it runs under nice -n 10.
#
# mutmut's workers are forked from a process that has already imported xenpv, so a mutant
# in code that runs only at import (the record layouts built into module-level tables)
# is never executed by them and survives. --fresh runs the group's tests once more for
# each survivor in a new interpreter with that mutant active (MUTANT_UNDER_TEST), where
# import-time code runs mutated too; a survivor those tests fail on counts as caught.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$ROOT/.mutation"
JOBS=1
FRESH=0
REPORT_ONLY=0
SAMPLE=0
SEED=1
TESTS_OVERRIDE=""
MUTMUT="${MUTMUT:-mutmut}"
ALL_GROUPS=(keys store protocol-checks blkif layout hid ethernet emulator vchan rings)
# `protocols` names the five groups that cover xenpv/protocols/ together
PROTOCOL_GROUPS=(protocol-checks blkif layout hid ethernet)

# group -> files mutated (mutmut's only_mutate globs), tests run, extra environment,
# extra pytest arguments.  A mutant runs only the group's tests that call its function.
declare -A MUTATE TESTS ENVS ARGS
MUTATE[protocol-checks]="xenpv/protocols/netif.py xenpv/protocols/kbdif.py
 xenpv/protocols/usbif.py xenpv/protocols/vchan.py xenpv/protocols/xsring.py
 xenpv/protocols/console.py xenpv/protocols/__init__.py"
TESTS[protocol-checks]="tests/unit/test_protocol_netif.py tests/unit/test_protocol_misc.py
 tests/unit/test_protocol_vchan.py tests/unit/test_console_ring.py
 tests/unit/test_keyboard_overflow.py tests/unit/test_xs_values.py
 tests/property/test_perturbations.py tests/fuzz/test_oracles.py tests/fuzz/test_strategies.py"
MUTATE[blkif]="xenpv/protocols/blkif.py"
TESTS[blkif]="tests/unit/test_protocol_blkif.py tests/unit/test_blkif_abi.py tests/unit/test_blkif_mutants.py tests/unit/test_xs_values.py
 tests/property/test_perturbations.py tests/fuzz/test_oracles.py tests/fuzz/test_strategies.py"
MUTATE[layout]="xenpv/protocols/layout.py"
TESTS[layout]="tests/unit/test_layouts_roundtrip.py tests/unit/test_layout_edges.py tests/unit/test_layout_mutants.py tests/unit/test_blkif_abi.py tests/unit/test_protocol_blkif.py
 tests/unit/test_protocol_netif.py tests/unit/test_protocol_misc.py"
MUTATE[hid]="xenpv/protocols/hid.py xenpv/protocols/keycodes.py"
TESTS[hid]="tests/unit/test_hid_descriptor.py tests/unit/test_hid_translate.py tests/unit/test_keyboard_overflow.py
 tests/unit/test_protocol_misc.py"
MUTATE[ethernet]="xenpv/protocols/ethernet.py"
TESTS[ethernet]="tests/unit/test_ethernet.py tests/unit/test_net_helpers.py"
MUTATE[keys]="xenpv/xenbus/keys.py"
TESTS[keys]="tests/unit/test_xenbus_paths.py tests/unit/test_xs_values.py
 tests/property/test_perturbations.py tests/fuzz/test_oracles.py"
MUTATE[store]="xenpv/xenstore/store.py"
# the model state machine runs 30-60 s at load 10: a 60 s limit cut it mid-example, and
# Hypothesis then reported a flaky strategy instead of a result
ARGS[store]="--timeout=600"
TESTS[store]="tests/unit/test_xs_store.py tests/unit/test_xs_store_requests.py
 tests/unit/test_xs_rules.py tests/unit/test_xs_store_edges.py tests/property/test_xs_model.py"
MUTATE[emulator]="xenpv/platforms/loopback/core.py"
TESTS[emulator]="tests/unit/test_core_rules.py tests/unit/test_platform_core.py tests/unit/test_platform_model.py
 tests/platform/test_suite_grants.py tests/platform/test_suite_events.py"
ARGS[emulator]="-k|not crossprocess"  # the daemon mode runs the core in another process
MUTATE[vchan]="xenpv/vchan/ring.py"
TESTS[vchan]="tests/unit/test_vchan_ring.py tests/unit/test_protocol_vchan.py"
ENVS[vchan]="XENPV_PURE_PYTHON=1"
MUTATE[rings]="xenpv/rings/_reference.py"
TESTS[rings]="tests/unit/test_ring_shared.py tests/unit/test_ring_atomic.py
 tests/unit/test_ring_bytering.py tests/property/test_ring_properties.py
 tests/property/test_console_ring_model.py tests/hostile/test_ring_hostile.py
 tests/unit/test_ring_reference_edges.py"
ENVS[rings]="XENPV_PURE_PYTHON=1"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

# an option that takes a value must have one (not the end of the line, not another option)
value_of() {
    if (($# < 2)) || [[ -z "$2" || "$2" == --* ]]; then
        echo "mutation.sh: $1 needs a value" >&2; usage >&2; exit 2
    fi
}
count_of() {
    value_of "$@"
    [[ "$2" =~ ^[0-9]+$ ]] || { echo "mutation.sh: $1 needs a number, not '$2'" >&2; exit 2; }
}

groups=()
while (($#)); do
    case "$1" in
        --jobs) count_of "$@"; JOBS="$2"; shift 2 ;;
        --fresh) FRESH=1; shift ;;
        --report) REPORT_ONLY=1; shift ;;
        --sample) count_of "$@"; SAMPLE="$2"; shift 2 ;;
        --seed) count_of "$@"; SEED="$2"; shift 2 ;;
        --tests) value_of "$@"; TESTS_OVERRIDE="$2"; shift 2 ;;
        --work) value_of "$@"; WORK="$(realpath -m "$2")"; shift 2 ;;
        --list)
            for g in "${ALL_GROUPS[@]}"; do
                printf '%s\n  mutates: %s\n  runs:    %s\n' "$g" "$(echo ${MUTATE[$g]})" \
                    "$(echo ${TESTS[$g]})"
                [[ -n "${ENVS[$g]:-}" ]] && printf '  env:     %s\n' "${ENVS[$g]}"
            done
            exit 0 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "mutation.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        protocols) groups+=("${PROTOCOL_GROUPS[@]}"); shift ;;
        *)
            [[ -n "${MUTATE[$1]:-}" ]] || { echo "mutation.sh: unknown group $1 (one of: ${ALL_GROUPS[*]} protocols)" >&2; exit 2; }
            groups+=("$1"); shift ;;
    esac
done
((${#groups[@]})) || groups=("${ALL_GROUPS[@]}")
if [[ -n "$TESTS_OVERRIDE" ]]; then
    for g in "${groups[@]}"; do TESTS[$g]="$TESTS_OVERRIDE"; done
fi
command -v "$MUTMUT" >/dev/null || {
    echo "mutation.sh: $MUTMUT not found: pip install -e '.[mutation]' (or set MUTMUT)" >&2; exit 2; }
ls "$ROOT"/xenpv/rings/_sring*.so >/dev/null 2>&1 || {
    echo "mutation.sh: build the extensions first: python setup.py build_ext --inplace" >&2; exit 2; }

run_group() {
    local g="$1" tree="$WORK/$1"
    local start=$SECONDS
    if ((REPORT_ONLY)); then
        [[ -d "$tree/mutants" ]] || { echo "$g: no run in $tree" >&2; return 1; }
        report_group "$g" "$tree" "$start"
        return
    fi
    rm -rf "$tree"
    mkdir -p "$tree"
    # a copy of the tree as it is now (tracked and untracked files, built extensions)
    (cd "$ROOT" && { git ls-files -co --exclude-standard; find xenpv -name '*.so*'; } |
        sort -u | while read -r f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done |
        tar -cf - --null -T -) | tar -xf - -C "$tree"
    {
        echo "[mutmut]"
        echo "source_paths = xenpv"
        echo "only_mutate ="
        for m in ${MUTATE[$g]}; do echo "    $m"; done
        # mutmut's timeout (15x the tests' clean CPU time + 10 s) turns a mutant that loops
        # forever into a kill
        echo "pytest_add_cli_args ="
        local IFS='|'
        # mutmut's own timeout counts CPU time: a mutant that blocks (an event never
        # signalled) is ended by pytest-timeout's wall clock instead, and counts as killed
        for a in -p no:cacheprovider -q --timeout=60 ${ARGS[$g]:-}; do echo "    $a"; done
        unset IFS
        echo "pytest_add_cli_args_test_selection ="
        for t in ${TESTS[$g]}; do echo "    $t"; done
        echo "timeout_constant = 10.0"
        echo "use_setproctitle = false"
    } > "$tree/setup.cfg"
    # mutmut puts DIR/GROUP/mutants first on sys.path; it must exist before Python starts,
    # or the import system caches its absence and the editable install's xenpv is tested
    mkdir -p "$tree/mutants"
    echo "== $g: mutating ${MUTATE[$g]} (log: $tree/mutmut.log)"
    local rc=0 names=()
    if ((SAMPLE)); then
        # generate the mutants and record which tests call what: mutmut stops there (with
        # an error) when no mutant matches the name given; then draw the sample
        (cd "$tree" && env PYTHONPATH="$tree/mutants" ${ENVS[$g]:-} \
            nice -n 10 "$MUTMUT" run --max-children "$JOBS" 'xenpv.no-such-mutant' \
            > "$tree/generate.log" 2>&1) || true
        mapfile -t names < <(cd "$tree" && PYTHONPATH="$tree/mutants" "$MUTMUT" results --all true |
            awk -F': ' '{gsub(/^[ \t]+/, "", $1); print $1}' |
            python3 -c 'import random, sys; n = sys.stdin.read().split(); random.Random(int(sys.argv[2])).shuffle(n); print("\n".join(sorted(n[: int(sys.argv[1])])))' "$SAMPLE" "$SEED")
        ((${#names[@]})) || { echo "$g: no mutants generated (see $tree/generate.log)" >&2; return 1; }
        echo "== $g: a sample of ${#names[@]} mutants (seed $SEED)"
    fi
    (cd "$tree" && env PYTHONPATH="$tree/mutants" ${ENVS[$g]:-} \
        nice -n 10 "$MUTMUT" run --max-children "$JOBS" "${names[@]}" > "$tree/mutmut.log" 2>&1) || rc=$?
    # Ctrl-C stops mutmut cleanly (exit 0): the report then covers the mutants checked
    if ((rc)); then
        echo "$g: mutmut failed (exit $rc); the end of $tree/mutmut.log:" >&2
        tr '\r' '\n' < "$tree/mutmut.log" | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' | tail -20 >&2
        return 1
    fi
    report_group "$g" "$tree" "$start"
}

report_group() {
    local g="$1" tree="$2" start="$3"
    (cd "$tree" && PYTHONPATH="$tree/mutants" "$MUTMUT" results --all true) > "$tree/results.txt"
    [[ -f "$tree/fresh.txt" ]] || : > "$tree/fresh.txt"
    if ((FRESH)); then
        : > "$tree/fresh.txt"
        # the interpreter mutmut runs under (its own venv, or the project's)
        local py
        py="$(head -1 "$(command -v "$MUTMUT")" | sed 's/^#!//')"
        [[ -x "$py" ]] || py=python3
        awk -F': ' '$2 == "survived" || $2 == "no tests" {print $1}' "$tree/results.txt" |
        while read -r name; do
            name="${name#"${name%%[![:space:]]*}"}"
            local verdict=survived
            # shellcheck disable=SC2086
            (cd "$tree/mutants" && env PYTHONPATH="$tree/mutants" ${ENVS[$g]:-} \
                MUTANT_UNDER_TEST="$name" nice -n 10 timeout 600 "$py" -m pytest -x -q \
                -p no:cacheprovider ${TESTS[$g]} > /dev/null 2>&1) || verdict=killed
            echo "$name: $verdict" >> "$tree/fresh.txt"
        done
    fi
    local elapsed=$((SECONDS - start))
    (cd "$tree" && PYTHONPATH="$tree/mutants" python3 - "$g" "$elapsed" "$MUTMUT") <<'EOF' | tee "$tree/report.txt"
import subprocess
import sys
from collections import Counter

group, elapsed, mutmut = sys.argv[1], int(sys.argv[2]), sys.argv[3]
CAUGHT = ("killed", "killed (fresh)", "timeout", "segfault")
def read(path: str) -> dict[str, str]:
    verdicts: dict[str, str] = {}
    for line in open(path, encoding="utf-8"):
        name, sep, verdict = line.strip().partition(": ")
        if sep:
            verdicts[name] = verdict
    return verdicts


status = read("results.txt")
fresh = read("fresh.txt")
status.update({n: "killed (fresh)" for n, v in fresh.items() if v == "killed"})
# an interrupted run (Ctrl-C) leaves mutants "not checked": the score covers the others
unchecked = sum(1 for v in status.values() if v == "not checked")
status = {n: v for n, v in status.items() if v != "not checked"}
count = Counter(status.values())
total = len(status)
# a mutant that makes the tests time out or crash the interpreter was noticed
caught = count["killed"] + count["killed (fresh)"] + count["timeout"] + count["segfault"]
score = 100.0 * caught / total if total else 0.0
print(f"{group}: {total} mutants in {elapsed} s"
      + (f" ({unchecked} more not checked: interrupted or outside the sample)" if unchecked else "")
      + f", score {score:.1f}% "
      f"({caught} caught: {count['killed']} killed, {count['killed (fresh)']} killed only "
      f"in a fresh interpreter, {count['timeout']} timeout, {count['segfault']} crashed; "
      "not caught: " + ", ".join(f"{n} {v}" for v, n in sorted(count.items()) if v not in CAUGHT)
      + ")")
for name, verdict in sorted(status.items()):
    if verdict in CAUGHT:
        continue
    diff = subprocess.run([mutmut, "show", name], capture_output=True, text=True).stdout
    changed = [ln for ln in diff.splitlines()
               if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    print(f"  {verdict}: {name}")
    for ln in changed:
        print(f"      {ln.strip()[:150]}")
EOF
}

failed=0
for g in "${groups[@]}"; do
    run_group "$g" || failed=1
done
exit "$failed"
