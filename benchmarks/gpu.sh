#!/usr/bin/env bash
# One prepared GPU measurement, at most ~8 minutes, for the first GPU machine this project gets:
#
#   bash benchmarks/gpu.sh OUTDIR                          # from the repository root
#   LLAMAGEN=/path/to/LlamaGen bash benchmarks/gpu.sh OUTDIR   # also LlamaGen's side of train_step.py
#   IMAGETOK_GPU_SMOKE=1 bash benchmarks/gpu.sh OUTDIR     # CPU smoke test: tiny sizes, 1-2 steps
#
# Steps, each under `timeout` and a shared deadline (GPU_SH_BUDGET_S, default 470 s) so that one hanging
# part cannot eat the budget: nvidia-smi; `pip install -e .` only if `import imagetok` fails;
# benchmarks/train_step.py on CUDA in bf16 for llamagen_vq16 at 256 px batch 32 and for vit_vqgan_b,
# eager; the per-component profile; evaluate throughput (reconstruction + Inception features, random
# Inception weights, on a checkpoint from a 2-step training run); then the same train_step cases with
# torch.compile (last: compiling is the slowest and least certain part). Everything lands in OUTDIR:
# *.jsonl / *.json results, *.log stderr of each step, steps.tsv (step, exit status, seconds).
set -u
OUT=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$(date +%s)
BUDGET=${GPU_SH_BUDGET_S:-470}
SMOKE=${IMAGETOK_GPU_SMOKE:-0}
LLAMAGEN_ARGS=()
if [ -n "${LLAMAGEN:-}" ]; then LLAMAGEN_ARGS=(--llamagen "$LLAMAGEN"); fi

if [ "$SMOKE" = 1 ]; then  # same steps, CPU-sized
  DEVICE=(--device cpu --precision 32 --threads 1)
  VQ_CASE=(--cases default_cpu --image-size 32 --batch-size 2)
  VIT_CASE=(--cases vit --image-size 32 --batch-size 2)
  STEPS=(--steps 1 --warmup 1 --repeats 1)
  COMPILE_STEPS=(--steps 1 --warmup 1 --repeats 1)
  TRAIN_EVAL=(trainer=cpu data.image_size=32 data.batch_size=2 cpu_threads=1)
  EVAL_IMAGES=8; EVAL_BATCH=8; EVAL_SIZE=32
  export OMP_NUM_THREADS=1
else
  DEVICE=(--device cuda --precision bf16)
  VQ_CASE=(--cases llamagen_vq16 --image-size 256 --batch-size 32)
  VIT_CASE=(--cases vit --image-size 256 --batch-size 32)
  STEPS=(--steps 10 --warmup 3 --repeats 1)
  COMPILE_STEPS=(--steps 10 --warmup 5 --repeats 1)
  TRAIN_EVAL=(experiment=llamagen_vq16 trainer=gpu data.image_size=256 data.batch_size=16)
  EVAL_IMAGES=1024; EVAL_BATCH=64; EVAL_SIZE=256
fi

printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"
# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left) seconds; stderr to OUTDIR/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, budget spent"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2> "$OUT/$name.log"
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  [ "$rc" = 0 ] || { echo "   exit $rc (124 = time limit); last lines of $OUT/$name.log:"; tail -3 "$OUT/$name.log"; }
}

# 1. the machine
{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/torch.txt"

# 2. install only when needed (from the repository root imagetok imports without installing; a machine
#    without internet needs the missing dependencies carried as wheels, see the device tool's README)
if ! "$PY" -c "import imagetok, lightning, hydra, lpips, torchmetrics" 2>/dev/null; then
  step install 200 "$PY" -m pip install -q -e .
fi

TS=(benchmarks/train_step.py "${DEVICE[@]}" "${LLAMAGEN_ARGS[@]}")
# 3. eager training steps (the per-subprocess --timeout keeps one side from starving the other)
step train_step_vq16 100 "$PY" "${TS[@]}" "${VQ_CASE[@]}" "${STEPS[@]}" --timeout 45 --out "$OUT/train_step.jsonl"
step train_step_vit 70 "$PY" "${TS[@]}" "${VIT_CASE[@]}" "${STEPS[@]}" --sides imagetok --timeout 60 \
  --out "$OUT/train_step.jsonl"

# 3b. host synchronisations inside a training step (CUDA's sync debug mode and ATen-level records)
step host_syncs 60 "$PY" benchmarks/host_syncs.py --device "${DEVICE[1]}" --steps 6 --from-step 3 \
  --out "$OUT/host_syncs.json" \
  $([ "$SMOKE" = 1 ] && echo "data.image_size=32 data.batch_size=2" || echo "experiment=llamagen_vq16 data.image_size=256 data.batch_size=8")

# 4. where the time goes (imagetok side)
step profile 60 "$PY" "${TS[@]}" "${VQ_CASE[@]}" --steps 3 --warmup 2 --repeats 1 --sides imagetok --profile \
  --timeout 55 --out "$OUT/profile.jsonl"

# 5. evaluate throughput: reconstruction + Inception features (random weights), checkpoint from 2 steps
step evaluate 70 "$PY" - "$OUT" "$EVAL_IMAGES" "$EVAL_BATCH" "$EVAL_SIZE" "${TRAIN_EVAL[@]}" <<'EOF'
import json, sys, tempfile, time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import imagetok
from imagetok.evaluation.run import evaluate
from imagetok.training.run import train

out, n_images, batch, size, *train_overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:]
configs = str(Path(imagetok.__file__).resolve().parent / "configs")
work = Path(tempfile.mkdtemp(prefix="gpu_sh_eval_"))
with initialize_config_dir(version_base="1.3", config_dir=configs):
    cfg = compose("train", overrides=["data=sample", "logger=[]", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                                      "loss.perceptual_random_backbone=true", "+trainer.enable_progress_bar=false",
                                      *train_overrides])
checkpoint = train(cfg, work / "train").summary["checkpoint"]
GlobalHydra.instance().clear()
results = {}
for label, count in (("warmup", batch), ("timed", n_images)):
    with initialize_config_dir(version_base="1.3", config_dir=configs):
        ecfg = compose("evaluate", overrides=[f"checkpoint={checkpoint}", "data=sample", f"data.image_size={size}",
                                              f"eval.num_images={count}", f"eval.batch_size={batch}",
                                              "eval.metrics=[psnr,fid]", "eval.force=true", "eval.random_weights=true"])
    GlobalHydra.instance().clear()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = evaluate(ecfg, work / f"eval_{label}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    results[label] = {"images": metrics["num_images"], "seconds": round(seconds, 2),
                      "images_per_s": round(metrics["num_images"] / seconds, 2)}
line = {"benchmark": "evaluate", "what": "evaluate(): crops + tokenizer reconstruction + PSNR + Inception-2048 "
        "features (random weights) + Frechet step, wall time of the call (network set-up included)",
        "image_size": size, "batch_size": batch, "train_overrides": train_overrides,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, **results}
print(json.dumps(line))
(Path(out) / "evaluate.json").write_text(json.dumps(line, indent=1) + "\n")
EOF

# 6. the same steps compiled (imagetok trainer.compile=true; LlamaGen torch.compile of its VQ model)
if [ "$SMOKE" = 1 ] && [ "${IMAGETOK_GPU_SMOKE_COMPILE:-0}" != 1 ]; then
  echo "== compile steps skipped in the smoke test (IMAGETOK_GPU_SMOKE_COMPILE=1 runs them)"
  printf 'train_step_vq16_compile\tskipped\t0\ntrain_step_vit_compile\tskipped\t0\n' >> "$OUT/steps.tsv"
else
  step train_step_vq16_compile 150 "$PY" "${TS[@]}" "${VQ_CASE[@]}" "${COMPILE_STEPS[@]}" --compile --timeout 72 --flops-from "$OUT/train_step.jsonl" \
    --out "$OUT/train_step_compile.jsonl"
  step train_step_vit_compile 100 "$PY" "${TS[@]}" "${VIT_CASE[@]}" "${COMPILE_STEPS[@]}" --compile --sides imagetok --flops-from "$OUT/train_step.jsonl" \
    --timeout 95 --out "$OUT/train_step_compile.jsonl"
fi

echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
cat "$OUT/steps.tsv"
