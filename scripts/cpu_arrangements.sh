#!/usr/bin/env bash
# How to train on a small CPU machine: train.py's throughput under each arrangement of threads and
# neighbours (docs/benchmarks.md, "Training on the CPU"). Each case trains the paper protocol's
# ResNet-20 (full pre-activation, BN over 64) in bf16 + channels_last + fused SGD + compile, on the
# JPEG copy of CIFAR-10 in data/, for 300 iterations (ITERS); the rate is the trainer's own over its
# windows of 100 iterations (WINDOW) after the first, which holds the compilation. Run it on an
# otherwise idle machine (it makes its own load), or name the cases to run beside a training run.
#
#   scripts/cpu_arrangements.sh            (all cases, a-f: about 15 minutes on 2 cores idle)
#   NEIGHBOUR=running ITERS=60 WINDOW=20 scripts/cpu_arrangements.sh e f   (beside a run going on;
#                                          short: a collapsed 2-thread run made 25 images/s here,
#                                          torch 2.14.1, 2026-12-05: docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
RUN=(depth=20 block=full_preact dataset=cifar10_jpeg trainer.device=cpu trainer.precision=bf16
     trainer.channels_last=true trainer.compile=default optim.impl=fused trainer.max_iters=${ITERS:-300}
     trainer.eval_every=${WINDOW:-100} trainer.checkpoint_every=100000 trainer.progress=false)

train() {  # train NAME THREADS [VAR=VALUE...]: one run in $WORK/NAME
    local name=$1 threads=$2; shift 2
    env OMP_NUM_THREADS="$threads" "$@" "$PY" train.py "${RUN[@]}" hydra.run.dir="$WORK/$name" >"$WORK/$name.log" 2>&1
}

rate() {  # images/s of run NAME after its first window
    "$PY" - "$WORK/$1" <<'EOF'
import sys
from idmap.rundir import read_metrics
from idmap.train.runlog import throughput
print(f"{throughput(read_metrics(sys.argv[1]), after_first=True):,.0f}")
EOF
}

busy() {  # a neighbour that takes one core, as a test run or a compile does (its output closed, or
          # $(busy) would wait for it). NEIGHBOUR=running: one already runs (a training run), start none.
    if [ "${NEIGHBOUR:-}" = running ]; then echo ""; else "$PY" -c 'while True: pass' >/dev/null 2>&1 & echo $!; fi
}

want() { [ -z "$CASES" ] || [[ " $CASES " == *" $1 "* ]]; }  # the cases named on the command line
CASES="$*"
for c in $CASES; do
    [[ " a b c d e f " == *" $c "* ]] || { echo "unknown case '$c': name cases a-f, or none for all" >&2; exit 2; }
done

echo "| arrangement | images/s per run | images/s in all |"
echo "|---|---|---|"
if want a; then train a 2 && r=$(rate a) && echo "| one run, 2 threads, machine idle | $r | $r |"; fi
if want b; then train b 1 && r=$(rate b) && echo "| one run, 1 thread, machine idle | $r | $r |"; fi
if want c; then
    train c1 1 & train c2 1; wait
    r1=$(rate c1); r2=$(rate c2)
    echo "| two runs, 1 thread each | $r1 + $r2 | $(( ${r1//,/} + ${r2//,/} )) |"
fi
if want d || want e || want f; then
    pid=$(busy)
    beside="beside a busy process"; [ -z "$pid" ] && beside="beside a one-thread training run"
    if want d; then train d 2 && r=$(rate d) && echo "| one run, 2 threads, $beside | $r | $r |"; fi
    if want e; then train e 2 OMP_WAIT_POLICY=PASSIVE && r=$(rate e) && echo "| the same, OMP_WAIT_POLICY=PASSIVE | $r | $r |"; fi
    if want f; then train f 1 && r=$(rate f) && echo "| one run, 1 thread, $beside | $r | $r |"; fi
    [ -z "$pid" ] || kill "$pid"
fi
