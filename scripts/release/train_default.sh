#!/usr/bin/env bash
# Reproduce the shipped default models: a small (ModelConfig.tiny) LiDiff teacher, a refiner and a
# student distilled from the teacher, trained on synthetic SemanticKITTI-layout street scenes.
#
#   scripts/release/train_default.sh [RUN_DIR]            # default RUN_DIR=runs/default
#
# Environment (defaults in brackets):
#   DEVICE [auto]        cuda or cpu
#   SEQUENCES [4]        synthetic training sequences 00..(N-1), SCANS scans each [60], SEED [0]
#   T_TEACHER [150]      wall-clock seconds for each stage (the run is stopped with SIGTERM, which
#   T_REFINER [40]       writes a checkpoint; the stage is then resumed for zero steps to export
#   T_DISTILL [80]       its inference checkpoint). Set MAX_STEPS_* instead for step-exact runs.
#   BATCH [8]            batch size of teacher and refiner
#   SCAN_POINTS [4000]   farthest-point-sampled scan points per sample (x_init = 10 x this; the
#                        published models use 18000); the target gets 10 x this many points
#   PYTHON [python3]     the interpreter (the venv's when you ran `make setup`)
#   TEACHER_LR [{gamma: 0.3, every_epochs: 3}]   the teacher's learning-rate schedule (per epoch)
#   MAX_STEPS_CALIBRATE [0]  >0: then fine-tune the teacher this many steps without LiDiff's std
#                        regulariser (diffusion.reg_weight=0, Adam 3e-4, stage "calibrate"), which
#                        stops it inflating its noise predictions (docs/training.md), and distil
#                        from that teacher (auxiliary nets also without the regulariser) unless
#                        DISTILL_FROM=teacher; T_CALIBRATE [100000] bounds it in seconds
#   DISTILL_FROM [calibrate when calibrated, else teacher]   the teacher the student is distilled
#                        from (the shipped student: calibrate)
#   DISTILL_LR, DISTILL_AUX_WARMUP, DISTILL_TEACHER_GUIDANCE   when set, the student's Adam rate
#                        (train.optimizer.lr), the auxiliary-only warm-up steps
#                        (distill.aux_warmup_steps) and the guidance of the teacher's score
#                        (distill.teacher_guidance); unset: tiny_distill_dpo.yaml's 1e-5, 10, 1
#   DISTILL_SEED [SEED]  the distillation's seed (its draws of t, noise and data order)
#   DISTILL_SEEDS []     several distillation seeds, e.g. "0 1 2 3" (instead of DISTILL_SEED): each
#                        trains as RUN/distill_s<seed> (T_DISTILL / MAX_STEPS_DISTILL each), one after
#                        the other, and RUN/distill becomes a link to the one whose best validation CD
#                        is lowest (RUN/distill_choice.json lists every seed's; ship_default.py records
#                        it). The seed spread of a short distillation is larger than the differences
#                        between objectives, and the validation drive ranks the seeds as held-out
#                        frames do (docs/experiments/distillation-seeds.md). Needs validation
#                        (VAL_EVERY and VAL_EVERY_DISTILL > 0); the default 3 frames ranked 18
#                        students there as 12 did (Spearman 0.94 against held-out frames)
#   DISTILL_MODE [dpo]   the distillation objective (distill.mode): dpo (Distillation-DPO) or vsd
#                        (score distillation alone)
#   DISTILL_SET []       more of the distillation's settings, space-separated key=value, each passed
#                        as --set (the shipped student: DISTILL_TEACHER_GUIDANCE=10 DISTILL_SEED=3
#                        DISTILL_SET="distill.pair_noise=independent distill.noise_scale=1.0
#                        distill.pair_regions=2 distill.aux_shared_draws=true
#                        distill.aux_optimizer.lr=1e-3", docs/experiments/shipped-models.md)
#   PARALLEL [0]         1: train teacher and refiner at the same time, one thread each (CPU)
#   WORKERS [0]          DataLoader worker processes (on the H200 run, 6 forked workers never
#                        delivered a first batch within 125 s while 0 workers trained at 0.28 s per
#                        step; workers now start from a forkserver and time out with an error)
#   PROFILE [cpu]        gpu-run: one GPU run of under ten minutes that must hand back at most a few
#                        files of at most 16 MiB (the lent GPU machines here): DEVICE=cuda, the
#                        Triton backend, bf16 autocast, training states in 16 MiB parts with one kept,
#                        T_TEACHER=300 T_REFINER=60 T_DISTILL=120 (seconds); the next run - on a GPU or
#                        the CPU - resumes every unfinished stage from those parts bit-exactly
#   VAL_EVERY [100]      validate every N steps (0: off) on a held-out drive generated into RUN_DIR/val
#   VAL_EVERY_DISTILL [20]  (sequence 07 of seed 2, VAL_SCANS [60] scans; VAL_FRAMES [3] frames 0, 10, ...;
#                        training/validation.py): 8 local steps, teacher at guidance VAL_TEACHER_GUIDANCE
#                        [2.5], student at VAL_STUDENT_GUIDANCE [2], the refiner on x_init; each stage
#                        keeps its best weights in RUN_DIR/<stage>/best/, the next stage starts from
#                        them and scripts/release/ship_default.py ships them
#
# The run is restartable: a stage that finished is skipped (RUN_DIR/<stage>/.stage_done), a stage
# that was interrupted resumes from its last checkpoint, and the same RUN_DIR with a larger
# T_*/MAX_STEPS_* trains a stage further once its .stage_done is deleted.
#
# Outputs: RUN_DIR/teacher/teacher.pt, RUN_DIR/refiner/refiner.pt, RUN_DIR/distill/distill.pt
# (student + teacher's condition encoder + refiner), RUN_DIR/calibrate/teacher.pt when calibrated,
# each with its best-by-validation twin RUN_DIR/<stage>/best/<kind>.pt, TensorBoard logs and
# metrics.jsonl (val/cd, val/jsd_bev at the validation steps).
set -uo pipefail
precision=()
if [ "${PROFILE:-cpu}" = gpu-run ]; then
  DEVICE=${DEVICE:-cuda}
  export LIDAR_COMPLETION_BACKEND=${LIDAR_COMPLETION_BACKEND:-triton}
  T_TEACHER=${T_TEACHER:-300}; T_REFINER=${T_REFINER:-60}; T_DISTILL=${T_DISTILL:-120}
  precision=(--set train.precision=bf16 --set checkpoint.part_mib=16 --set checkpoint.keep=1)
elif [ "${PROFILE:-cpu}" != cpu ]; then
  echo "PROFILE must be cpu or gpu-run, got ${PROFILE}" >&2; exit 2
fi
read -r -a dset <<< "${DISTILL_SET:-}"   # split on spaces, no glob expansion; checked before any stage
dset_args=()
for kv in "${dset[@]}"; do
  case "$kv" in
    ?*=*) dset_args+=(--set "$kv") ;;
    *) echo "DISTILL_SET takes key=value settings separated by spaces, got '$kv'" >&2; exit 2 ;;
  esac
done
read -r -a dseeds <<< "${DISTILL_SEEDS:-}"
if [ ${#dseeds[@]} -gt 0 ]; then
  for s in "${dseeds[@]}"; do
    [[ "$s" =~ ^[0-9]+$ ]] || { echo "DISTILL_SEEDS takes integers separated by spaces, got '$s'" >&2; exit 2; }
  done
  if [ "${VAL_EVERY:-100}" -le 0 ] || [ "${VAL_EVERY_DISTILL:-20}" -le 0 ]; then
    echo "DISTILL_SEEDS chooses among the seeds by validation: VAL_EVERY and VAL_EVERY_DISTILL must be > 0" >&2; exit 2
  fi
fi
RUN=${1:-runs/default}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-auto}
SEQUENCES=${SEQUENCES:-4}
SCANS=${SCANS:-60}
SEED=${SEED:-0}
BATCH=${BATCH:-8}
SCAN_POINTS=${SCAN_POINTS:-4000}
# the shipped run: x0.3 every 3 epochs (240 steps an epoch with 6 x 80 scans at batch 2)
TEACHER_LR=${TEACHER_LR:-"{gamma: 0.3, every_epochs: 3}"}
TG=${VAL_TEACHER_GUIDANCE:-2.5}
export LIDAR_COMPLETION_BACKEND=${LIDAR_COMPLETION_BACKEND:-torch}
mkdir -p "$RUN"
DATA="$RUN/data"
seqs=$(seq -f "%02g" 0 $((SEQUENCES - 1)) | paste -sd, -)
yaml_seqs="[$(echo "$seqs" | sed 's/\([0-9][0-9]\)/"\1"/g')]"
log() { echo "[train_default $(date +%H:%M:%S)] $*"; }

if [ ! -f "$DATA/.complete" ]; then
  log "generating $SEQUENCES synthetic sequences x $SCANS scans in parallel"
  pids=()
  for i in $(seq 0 $((SEQUENCES - 1))); do
    rm -rf "$DATA/sequences/$(printf "%02d" "$i")"   # left by an interrupted generation (make-synthetic never overwrites)
    $PY -m lidar_completion make-synthetic "$DATA" --sequences 1 --first-sequence "$i" --scans "$SCANS" \
        --seed "$SEED" > "$RUN/make_synthetic_$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { log "make-synthetic failed"; exit 1; }; done
  log "building ground truth"
  pids=()
  for i in $(seq 0 $((SEQUENCES - 1))); do
    s=$(printf "%02d" "$i")
    $PY -m lidar_completion build-gt "$DATA" --sequences "$s" > "$RUN/build_gt_$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { log "build-gt failed"; exit 1; }; done
  echo ok > "$DATA/.complete"
fi

VAL_EVERY=${VAL_EVERY:-100}
VAL_DATA="$RUN/val"
if [ "$VAL_EVERY" -gt 0 ] && [ ! -f "$VAL_DATA/.complete" ]; then
  log "generating the validation drive (sequence 07, seed 2)"
  rm -rf "$VAL_DATA/sequences/07"
  { $PY -m lidar_completion make-synthetic "$VAL_DATA" --sequences 1 --first-sequence 7 --scans "${VAL_SCANS:-60}" \
        --seed 2 && $PY -m lidar_completion build-gt "$VAL_DATA" --sequences 07; } > "$RUN/make_val.log" 2>&1 \
    || { log "validation data failed, see $RUN/make_val.log"; exit 1; }
  echo ok > "$VAL_DATA/.complete"
fi
val() {  # val EVERY GUIDANCE: sets VA, the validation settings of a stage
  VA=(--set "validation.every_steps=0")
  [ "$VAL_EVERY" -gt 0 ] || return 0
  VA=(--set "validation.every_steps=$1" --set "validation.root=$VAL_DATA" --set "validation.sequence='07'"
      --set validation.every=10 --set "validation.frames=${VAL_FRAMES:-3}" --set validation.steps=8
      --set "validation.guidance=$2")
}
best() {  # best STAGE KIND: the stage's best-by-validation export, else its last
  if [ -f "$RUN/$1/best/$2.pt" ]; then echo "$RUN/$1/best/$2.pt"; else echo "$RUN/$1/$2.pt"; fi
}

common=(--device "$DEVICE" --set "data.root=$DATA" --set "data.sequences=$yaml_seqs" --set "seed=$SEED"
        --set "log.progress=false" --set "data.num_workers=${WORKERS:-0}"
        --set "data.scan_points=$SCAN_POINTS" --set "data.target_points=$((SCAN_POINTS * 10))"
        "${precision[@]}")

stage() {  # stage NAME CONFIG SECONDS MAX_STEPS extra-args...  (NAME: teacher, refiner, distill, calibrate)
  local name=$1 cfg=$2 secs=$3 steps=$4; shift 4
  local kind=$name
  [ "$name" = calibrate ] && kind=teacher
  case "$name" in distill_s*) kind=distill ;; esac
  local out="$RUN/$name"
  if [ -f "$out/.stage_done" ] && [ -f "$out/$kind.pt" ]; then
    log "$name: already done ($out/$kind.pt); delete $out/.stage_done to train it further"
    return 0
  fi
  local resume=()
  if [ -f "$out/checkpoints/latest.json" ] || compgen -G "$out/checkpoints/step_*.ckpt" > /dev/null; then
    resume=(--resume)   # an interrupted or time-limited stage: go on from its last checkpoint
    log "$name: resuming from $out/checkpoints"
  fi
  log "$name: up to ${secs}s / ${steps} steps in total"
  timeout -s TERM "$secs" $PY -m training "$kind" --config "$cfg" --out "$out" --max-steps "$steps" \
      "${resume[@]}" "${common[@]}" "$@" >> "$out.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    log "$name: failed (rc=$rc), see $out.log"; tail -20 "$out.log"; return 1
  fi
  if [ $rc -eq 124 ]; then
    # stopped by the time limit (a checkpoint was written on SIGTERM): resume for zero more steps,
    # which finishes the run and exports the inference checkpoint
    log "$name: stopped (rc=$rc); exporting the last checkpoint"
    $PY -m training "$kind" --config "$cfg" --out "$out" --resume --max-steps 0 "${common[@]}" "$@" >> "$out.log" 2>&1 \
      || { log "$name: export failed, see $out.log"; tail -20 "$out.log"; return 1; }
  fi
  tail -1 "$out.log"
  touch "$out/.stage_done"
}

if [ "${PARALLEL:-0}" = 1 ]; then
  # the refiner does not need the teacher: train both at once, one thread each (on a 2-core CPU
  # this uses both cores with no oversubscription; the teacher goes on alone once the refiner ends)
  val "$VAL_EVERY" "$TG"
  OMP_NUM_THREADS=1 stage teacher tiny_teacher.yaml "${T_TEACHER:-150}" "${MAX_STEPS_TEACHER:-100000}" \
      --set "train.batch_size=$BATCH" --set "train.lr_schedule=$TEACHER_LR" "${VA[@]}" & tpid=$!
  val "$VAL_EVERY" 1
  OMP_NUM_THREADS=1 stage refiner tiny_refiner.yaml "${T_REFINER:-40}" "${MAX_STEPS_REFINER:-100000}" \
      --set "train.batch_size=$BATCH" "${VA[@]}" || exit 1
  wait $tpid || exit 1
else
  val "$VAL_EVERY" "$TG"
  stage teacher tiny_teacher.yaml "${T_TEACHER:-150}" "${MAX_STEPS_TEACHER:-100000}" \
      --set "train.batch_size=$BATCH" --set "train.lr_schedule=$TEACHER_LR" "${VA[@]}" || exit 1
  val "$VAL_EVERY" 1
  stage refiner tiny_refiner.yaml "${T_REFINER:-40}" "${MAX_STEPS_REFINER:-100000}" \
      --set "train.batch_size=$BATCH" "${VA[@]}" || exit 1
fi
TEACHER_PT=$(best teacher teacher)
DISTILL_REG=5.0
if [ "${MAX_STEPS_CALIBRATE:-0}" -gt 0 ]; then
  # the teacher again, fine-tuned without the std regulariser (constant Adam 3e-4)
  val "$VAL_EVERY" "$TG"
  stage calibrate tiny_teacher.yaml "${T_CALIBRATE:-100000}" "$MAX_STEPS_CALIBRATE" \
      --set "init=$TEACHER_PT" --set diffusion.reg_weight=0 --set train.optimizer.lr=3e-4 \
      --set "train.batch_size=$BATCH" "${VA[@]}" || exit 1
  if [ "${DISTILL_FROM:-calibrate}" = calibrate ]; then
    TEACHER_PT=$(best calibrate teacher)
    DISTILL_REG=0
  fi
fi
dextra=()
[ -n "${DISTILL_LR:-}" ] && dextra+=(--set "train.optimizer.lr=$DISTILL_LR")
[ -n "${DISTILL_AUX_WARMUP:-}" ] && dextra+=(--set "distill.aux_warmup_steps=$DISTILL_AUX_WARMUP")
[ -n "${DISTILL_TEACHER_GUIDANCE:-}" ] && dextra+=(--set "distill.teacher_guidance=$DISTILL_TEACHER_GUIDANCE")
[ -n "${DISTILL_MODE:-}" ] && dextra+=(--set "distill.mode=$DISTILL_MODE")
[ -n "${DISTILL_SEED:-}" ] && dextra+=(--set "seed=$DISTILL_SEED")   # after common's seed=SEED: wins
dextra+=("${dset_args[@]}")
val "${VAL_EVERY_DISTILL:-20}" "${VAL_STUDENT_GUIDANCE:-2}"
dargs=(tiny_distill_dpo.yaml "${T_DISTILL:-80}" "${MAX_STEPS_DISTILL:-100000}"
       --set "distill.teacher=$TEACHER_PT" --set "distill.refiner=$(best refiner refiner)"
       --set "diffusion.reg_weight=$DISTILL_REG" "${VA[@]}" "${dextra[@]}")
if [ ${#dseeds[@]} -eq 0 ]; then
  stage distill "${dargs[@]}" || exit 1
else
  if [ -e "$RUN/distill" ] && [ ! -L "$RUN/distill" ]; then
    log "$RUN/distill is a single-seed distillation: move it away to distil DISTILL_SEEDS into this run"; exit 1
  fi
  for s in "${dseeds[@]}"; do
    stage "distill_s$s" "${dargs[@]}" --set "seed=$s" || exit 1   # the last seed= wins
  done
  # the seed whose best validation CD is lowest (ties: the first listed)
  chosen=$("$PY" - "$RUN" "${dseeds[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
run, seeds = Path(sys.argv[1]), sys.argv[2:]
rows = []
for s in seeds:
    rec = run / f"distill_s{s}" / "best" / "validation.json"
    try:
        v = json.loads(rec.read_text())
        rows.append({"seed": int(s), "folder": f"distill_s{s}", "step": v["step"], "select": v["select"],
                     "value": float(v["value"]), "metrics": v.get("metrics", {})})
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"no validation record for seed {s} ({rec}): {e}")
best = min(rows, key=lambda r: r["value"])
(run / "distill_choice.json").write_text(json.dumps({"chosen": best["seed"], "by": best["select"],
                                                     "seeds": rows}, indent=1) + "\n")
print(best["seed"])
PYEOF
) || { log "choosing among DISTILL_SEEDS failed"; exit 1; }
  ln -sfn "distill_s$chosen" "$RUN/distill"
  ln -sfn "distill_s$chosen.log" "$RUN/distill.log"
  log "distill: seed $chosen has the lowest validation CD of seeds ${dseeds[*]} -> $RUN/distill ($RUN/distill_choice.json)"
fi
log "done: $(ls "$RUN"/*/*.pt "$RUN"/*/best/*.pt 2>/dev/null)"
