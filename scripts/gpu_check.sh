#!/usr/bin/env bash
# The GPU checks of issue 6, in one go (about 8 minutes at most on one H200):
#   (a) a Dyck run with callbacks=full on the GPU, past its grok step (seed 42 groks at 600):
#       wall time, summary.json, metrics.jsonl, analyses.jsonl;
#   (b) scripts/bench_scale.py --device cuda up to p = 1e8: time per delta (one capture),
#       the overhead ratio over the AdamW step, memory against grokedge.edge.memory;
#   (c) with CLASSES=1, SCAN's universality class on the paper-size model (3 seeds × ω ∈
#       {0, 1}, long enough for 10 late windows; ~45 minutes, a session of its own).
#
#   OUT=/some/dir bash scripts/gpu_check.sh      # on the lent machine, from the checkout
#
# Needs python3 with a CUDA torch, lightning, torchmetrics, scikit-learn, matplotlib; the
# Hydra stack comes as wheels in .whl/ (hydra_core, omegaconf, antlr4_python3_runtime; no
# network). W&B is not needed (logger=csv). grokedge itself is put on PYTHONPATH as the
# package layout pyproject.toml maps (src/grokedge + callbacks/ + conf/), no build step.
# Everything is written under $OUT (default ./gpu_check_out): gpu_check.log and the files.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_check_out}"
SITE="${SITE:-/tmp/site}"
PKG="${PKG:-/tmp/grokedge_pkg}"
STEPS="${STEPS:-1500}"            # Dyck steps: grok at ~600, then the post-grok analyses
BENCH_P="${BENCH_P:-1e6,1e7,5e7,1e8}"
BENCH_P_BF16="${BENCH_P_BF16:-1e8}"
DEVICE="${DEVICE:-cuda}"          # DEVICE=cpu TRAINER=cpu STEPS=20 BENCH_P=1e5 ...: a dry run on a CPU
TRAINER="${TRAINER:-gpu}"
T_RUN="${T_RUN:-330}"            # seconds allowed to each stage (timeout -k 10: Lightning traps SIGTERM)
T_BENCH="${T_BENCH:-200}"
T_BF16="${T_BF16:-90}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
status=0
stage() { echo; echo "=== $(date +%T) $*"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, torch.cuda.is_available())'

stage "install the Hydra wheels (.whl/) into $SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || { echo "wheel install failed"; exit 1; }
# grokedge as installed: grokedge <- src/grokedge, grokedge.callbacks <- callbacks,
# grokedge.conf <- conf (pyproject.toml's package-dir).
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r src/grokedge "$PKG/grokedge"
cp -r callbacks "$PKG/grokedge/callbacks"
cp -r conf "$PKG/grokedge/conf"
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import hydra, omegaconf, grokedge.train, grokedge.callbacks.gram as g;
print("hydra", hydra.__version__, "omegaconf", omegaconf.__version__, "grokedge from", g.__file__)' \
  || { echo "grokedge does not import"; exit 1; }

stage "(a) Dyck, callbacks=full, trainer=$TRAINER, $STEPS steps"
RUN="$OUT/dyck_full_gpu"
start=$(date +%s.%N)
timeout -k 10 "$T_RUN" python3 -m grokedge.train task=dyck callbacks=full trainer="$TRAINER" logger=csv \
  trainer.max_steps="$STEPS" progress_bar.refresh_rate=500 hydra.run.dir="$RUN" \
  || { echo "Dyck run failed (exit $?)"; status=1; }
end=$(date +%s.%N)
python3 - "$RUN" "$start" "$end" <<'EOF' || status=1
import json, sys
from pathlib import Path
run, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
s = json.loads((run / "summary.json").read_text())
keep = ("status", "error", "grok_step", "steps", "wall_s", "n_params", "test/acc",
        "gram/sigma_1", "edge/grad_frac_v1", "ablation/ratio", "probe/linear_r2")
print(json.dumps({k: s.get(k) for k in keep}, indent=1))
rows = [json.loads(l) for l in open(run / "analyses.jsonl")] if (run / "analyses.jsonl").exists() else []
kinds = sorted({r["analysis"] for r in rows})
print(f"process wall {end - start:.1f} s (fit {s['wall_s']} s); analyses.jsonl {len(rows)} rows: {kinds}")
(run.parent / "dyck_wall.json").write_text(json.dumps(
    {"process_wall_s": end - start, "fit_wall_s": s["wall_s"], "grok_step": s["grok_step"],
     "steps": s["steps"], "status": s.get("status"), "analyses": kinds}, indent=1) + "\n")
EOF
rm -f "$RUN"/checkpoints/*.ckpt  # not needed back

stage "(b) bench_scale --device $DEVICE --p $BENCH_P (float32 window)"
timeout -k 10 "$T_BENCH" python3 scripts/bench_scale.py --device "$DEVICE" --p "$BENCH_P" --steps 20 --rounds 7 \
  --captures 5 --json "$OUT/bench_scale_cuda.json" || { echo "bench failed (exit $?)"; status=1; }

stage "(b') bench_scale --device $DEVICE --p $BENCH_P_BF16 --buffer-dtype bfloat16"
timeout -k 10 "$T_BF16" python3 scripts/bench_scale.py --device "$DEVICE" --p "$BENCH_P_BF16" --steps 20 --rounds 7 \
  --captures 5 --buffer-dtype bfloat16 --json "$OUT/bench_scale_cuda_bf16.json" \
  || { echo "bf16 bench failed (exit $?)"; status=1; }

# (c) SCAN's universality class on the paper-size model (issue 12), off unless CLASSES=1:
# experiment=scan_paper × seeds × ω ∈ {0, 1} with the gap flow at every window, each run
# going on 10,500 steps past its grok step (N = 500: post = 5,000 steps, then 10 late
# windows). About 7 minutes a run on one H200 (166 s per 6,000 steps measured): six runs
# need a device session of their own. Report: python -m grokedge.report "$OUT/scan_classes".
# The paper's Table 2 classes, so the paper's edge (raw deltas; the project's default is the
# normalized one), as experiment=scan_paper and experiment=classes pin it too.
if [ "${CLASSES:-0}" = 1 ]; then
  stage "(c) SCAN classes: experiment=scan_paper, seeds ${CLASS_SEEDS:-42,137,2024}, ω 0,1"
  timeout -k 10 "${T_CLASSES:-3000}" python3 -m grokedge.train -m experiment=scan_paper \
    callbacks=gram callbacks.gram.edge_definition=paper \
    +callbacks@callbacks.gap_flow=gap_flow +callbacks@callbacks.classes=classes \
    callbacks.gap_flow.every='${task.gram_interval}' callbacks.gap_flow.n_sequences=512 \
    task.stop_after_grok=10500 trainer.max_steps=15000 trainer="$TRAINER" logger=csv \
    seed="${CLASS_SEEDS:-42,137,2024}" optimizer.weight_decay=0,1 progress_bar.refresh_rate=500 \
    hydra.sweep.dir="$OUT/scan_classes" || { echo "SCAN classes failed (exit $?)"; status=1; }
  rm -f "$OUT"/scan_classes/*/checkpoints/*.ckpt
fi

stage "done (status $status); files in $OUT"
ls -la "$OUT"
exit $status
