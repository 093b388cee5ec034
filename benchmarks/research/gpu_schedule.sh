#!/usr/bin/env bash
# The longer schedule on a GPU: `inspect`'s two-view fit (the default, 300 steps) resumed to longer schedules
# within a time budget, then every checkpoint scored with benchmarks.research.compare_fits on grouped val and on the grouped
# test half (test/ and pasted defects), the two splits side by side. On a CUDA machine with the `train` extra:
#
#   DATA=../shared/datasets/magnetic_tile bash benchmarks/research/gpu_schedule.sh OUTDIR
#
# Environment: DATA (dataset root; benchmarks.research.resize_dataset makes a smaller copy that loads the same),
# STEPS (default "300 1000 3000"), BUDGET (seconds for all fits, default 280: a stage that would not fit
# is skipped), DEV (cuda), PY (python3), EXTRA_PYTHONPATH (prepended to PYTHONPATH). Writes OUTDIR/run.log,
# score_{val,test}.log, compare_{val,test}/*.json and logs.tar.gz (each view's log.jsonl per stage).
set -u
OUT=$(realpath -m "${1:?usage: gpu_schedule.sh OUTDIR}"); mkdir -p "$OUT"
D=$(realpath -m "${DATA:-../shared/datasets/magnetic_tile}")
cd "$(dirname "$0")/../.." || exit 2
PY=${PY:-python3}; DEV=${DEV:-cuda}; STEPS=${STEPS:-"300 1000 3000"}; BUDGET=${BUDGET:-280}
export PYTHONUNBUFFERED=1 PYTHONPATH="${EXTRA_PYTHONPATH:+$EXTRA_PYTHONPATH:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
G=benchmarks/groups/magnetic_tile.csv
exec > >(tee -a "$OUT/run.log") 2>&1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
echo "== env"; nvidia-smi -L 2>/dev/null
"$PY" -c "import torch, cv2, sklearn, scipy, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__, 'cv2', cv2.__version__)"
nproc
amp=()          # --no-amp once a fit with mixed precision has failed
done_ckpts=()
prev=""; prev_s=0; rate_ms=0
for s in $STEPS; do
  left=$(( BUDGET - $(el) ))
  resume=()
  if [ -n "$prev" ]; then
    need=$(( rate_ms * (s - prev_s) / 1000 ))  # from the last stage's seconds per step (an overestimate)
    if [ "$left" -lt $(( need + 20 )) ]; then echo "== skip $s steps: about $need s needed, $left s of the fit budget left"; break; fi
    resume=(--resume)
  fi
  run=runs/gpu$s
  rm -rf "$run"; [ -z "$prev" ] || cp -r "$prev" "$run"
  echo "== fit $s steps (${resume[*]}) at $(el) s"
  t=$(date +%s)
  timeout $(( left > 60 ? left : 60 )) "$PY" -m train fit --data "$D" --groups "$G" --out "$run" --steps "$s" \
      "${resume[@]}" --device "$DEV" --quiet "${amp[@]}"
  rc=$?
  if [ $rc -ne 0 ] && [ -z "$prev" ] && [ ${#amp[@]} -eq 0 ]; then
    echo "== fit failed (rc $rc) with mixed precision; again with --no-amp"; amp=(--no-amp); rm -rf "$run"; t=$(date +%s)
    timeout 200 "$PY" -m train fit --data "$D" --groups "$G" --out "$run" --steps "$s" --device "$DEV" --quiet "${amp[@]}"
    rc=$?
  fi
  echo "== fit $s steps: rc $rc, $(( $(date +%s) - t )) s"
  [ $rc -eq 0 ] || break
  for v in "$run"/views/*/; do
    mkdir -p "$OUT/logs/$s/$(basename "$v")"; cp "$v"/*.json* "$OUT/logs/$s/$(basename "$v")/" 2>/dev/null
  done
  rate_ms=$(( ($(date +%s) - t) * 1000 / (s - prev_s) ))
  done_ckpts+=("$run/last.pt"); prev=$run; prev_s=$s
done
[ -d "$OUT/logs" ] && (cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
echo "== fits done at $(el) s: ${done_ckpts[*]}"
[ ${#done_ckpts[@]} -gt 0 ] || exit 1
echo "== score val and test side by side at $(el) s"
pids=()
for split in val test; do
  "$PY" -m benchmarks.research.compare_fits --checkpoints "${done_ckpts[@]}" --data "$D" --split "$split" --transplant \
      --groups "$G" --device "$DEV" --out "$OUT/compare_$split" > "$OUT/score_$split.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"  # not a bare wait: that also waits for the tee behind the log
grep -v '^{' "$OUT"/score_val.log "$OUT"/score_test.log | cut -c1-200
echo "== all done at $(el) s"
