"""One full training step (generator step, then discriminator step), imagetok against LlamaGen at equal
architecture: images/s, peak memory, parameter counts, and on CUDA the model FLOPs utilisation (MFU).

    python benchmarks/train_step.py [--cases default_cpu,llamagen_vq16,taming_vqgan_f16,vit]
                                    [--image-size 128 256] [--device cpu|cuda] [--precision 32|bf16]
                                    [--batch-size B] [--steps 5] [--warmup 2] [--repeats 3] [--threads 1]
                                    [--compile] [--llamagen DIR] [--out results.jsonl] [--profile]

Every term of the objective runs on both sides: L1/L2 pixel loss, LPIPS-VGG (random VGG weights: the
time does not depend on their values), PatchGAN (hinge), the adaptive adversarial weight where the
recipe uses it, the quantizer's codebook and commitment losses, gradient clipping where the recipe
clips, and the weight EMA.

imagetok side: the real training path. The train config is composed with Hydra from the package's
config tree (``experiment=...`` plus the case's overrides, ``data=sample`` at the case's image size,
``loss.disc_start=0``) and run through ``imagetok.training.run.train``; a Lightning callback, added in
this process by wrapping ``lightning.Trainer``, times every step from ``on_train_batch_start`` to
``on_train_batch_end`` (data loading and the host-to-device copy happen before: outside the window).

LlamaGen side (``--llamagen DIR``, a checkout of FoundationVision/LlamaGen; imported from there at run
time, nothing of it is copied here): ``VQ_models['VQ-16']`` (or its ``VQModel`` with the case's
``ModelArgs``), ``VQLoss`` with its PatchGAN and LPIPS, ``Adam`` and ``utils.ema.update_ema``, driven
by the loop of its ``tokenizer/tokenizer_image/vq_train.py``: forward under autocast (bf16), generator
loss with ``optimizer_idx=0``, backward, ``clip_grad_norm_``, step, EMA; discriminator loss with
``optimizer_idx=1``, backward, clip, step; ``loss.item()`` of both (its running loss). Its LPIPS asks
torchvision for pretrained VGG16 (a download): patched here to ``weights=None``. Inputs are batches held
in memory on the device. Without ``DIR`` the LlamaGen side is skipped (one line says so).

Each (case, side, repeat) runs in a fresh subprocess, sides alternating (imagetok, LlamaGen, imagetok,
...), so peak memory belongs to that side alone: peak resident set (``ru_maxrss``, whole process) on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA. One JSON line per (case, side), then a summary with
``ratio = imagetok images/s / LlamaGen images/s`` (medians over repeats; above 1: imagetok faster).

``--profile``: torch.profiler over a few imagetok steps of each case; time per ``imagetok/<part>``
``record_function`` scope found in the trace, per module forward (encoder, quantizer, decoder, LPIPS,
discriminator: hooks added here), per method of the step that this script wraps in its own process
(``bench/...``: backward passes, adaptive weight, gradient norm and clipping, EMA, logging), torch's own
``Optimizer.step`` ranges, and the rest of the step as ``other``. Nested scopes are counted once:
each scope's ``self`` time excludes the tracked scopes inside it, and the ``self`` times plus
``other`` add up to the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _llamagen_step import llamagen_setup, run_llamagen
from _step_measure import batch_size, count_params, counts_flops, mark_memory_baseline, step_result
from _step_timer import make_step_timer, print_profile

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]

CASES = ("default_cpu", "llamagen_vq16", "taming_vqgan_f16", "vit")
DEFAULT_SIZES = {"default_cpu": [32], "llamagen_vq16": [128, 256], "taming_vqgan_f16": [128, 256], "vit": None}


# ---------------------------------------------------------------------------------------------------
# Cases: the imagetok overrides and the matching LlamaGen build
# ---------------------------------------------------------------------------------------------------

def vit_experiment(device: str) -> str:
    return "vit_vqgan_b" if device == "cuda" else "cpu_vit_vqgan"


def imagetok_overrides(case: str, size: int, args) -> list[str]:
    """Hydra overrides of a case (on top of ``train``'s defaults)."""
    batch = batch_size(case, args)
    o: list[str] = []
    if case == "llamagen_vq16":
        # LlamaGen puts attention in the lowest-resolution level (16x16 at 256 px, 8x8 at 128 px) and
        # uses BatchNorm in its PatchGAN; imagetok's recipe says attn_resolutions=[16] and GroupNorm.
        o += ["experiment=llamagen_vq16", f"encoder.attn_resolutions=[{size // 16}]", "loss.discriminator.norm=batch"]
    elif case == "taming_vqgan_f16":
        o += ["experiment=taming_vqgan_f16", f"encoder.attn_resolutions=[{size // 16}]"]
    elif case == "vit":
        o += [f"experiment={vit_experiment(args.device)}"]
    o += ["data=sample", f"data.image_size={size}", f"data.batch_size={batch}", "data.num_workers=0",
          "data.val_samples=8", "data.val_batch_size=8",
          f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
          f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
          f"trainer.max_steps={total_steps(args)}", "trainer.limit_val_batches=0", "trainer.val_check_interval=1000000",
          "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "checkpoint.every_n_steps=1000000", "logger=[]",
          "loss.perceptual_random_backbone=true", "loss.disc_start=0", f"cpu_threads={args.threads}"]
    if args.compile:
        o.append("trainer.compile=true")
    return o + list(args.override or [])


def total_steps(args) -> int:
    """Warm-up + timed steps + one FLOP-counted step on CUDA (after the timed ones) unless compiled."""
    return args.warmup + args.steps + (1 if counts_flops(args) else 0)


def case_sizes(case: str, args) -> list[int]:
    if args.image_size:
        return list(args.image_size)
    if case == "vit":
        return [256 if args.device == "cuda" else 32]
    return DEFAULT_SIZES[case]


# ---------------------------------------------------------------------------------------------------
# imagetok worker
# ---------------------------------------------------------------------------------------------------

def run_imagetok(case: str, size: int, args) -> dict:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import imagetok
    from imagetok.training import run as run_module

    mark_memory_baseline()

    config_dir = Path(imagetok.__file__).resolve().parent / "configs"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        cfg = compose("train", overrides=imagetok_overrides(case, size, args))
    batch = int(cfg.data.batch_size)
    timer = make_step_timer(args)

    class TimedTrainer(L.Trainer):  # the timing (and profiling) callback, added in this process only
        def __init__(self, *a, callbacks=None, **kw):
            super().__init__(*a, callbacks=[*(callbacks or []), timer], **kw)

    run_module.L = _LightningWith(TimedTrainer)  # run.py calls L.Trainer(...); nothing else changes
    with tempfile.TemporaryDirectory(prefix="train_step_") as run_dir:
        result = run_module.train(cfg, run_dir)
    module = result.module
    out = step_result(timer.times, batch, args, timer.flops.total if timer.flops else None)
    out.update(generator_params=count_params(module.tokenizer), discriminator_params=count_params(module.loss.discriminator),
               batch_size=batch, threads=torch.get_num_threads(), experiment=cfg.get("experiment") or _experiment(case, args),
               steps_run=int(result.summary["generator_steps"]))
    if timer.profile_rows is not None:
        out["profile"] = timer.profile_rows
    return out


def _experiment(case: str, args) -> str:
    return {"default_cpu": "(default recipe)", "vit": vit_experiment(args.device)}.get(case, case)


class _LightningWith:
    """The ``lightning`` module as ``imagetok.training.run`` sees it, with ``Trainer`` replaced."""

    def __init__(self, trainer_class) -> None:
        import lightning
        self._lightning, self.Trainer = lightning, trainer_class

    def __getattr__(self, name):
        return getattr(self._lightning, name)


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------

def worker(args) -> None:
    case, size, side = args.worker[0], int(args.worker[1]), args.worker[2]
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()
    result = run_imagetok(case, size, args) if side == "imagetok" else run_llamagen(case, size, args)
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


def worker_command(case: str, size: int, side: str, args) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--worker", case, str(size), side, "--device", args.device,
           "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.compile:
        cmd.append("--compile")
    if args.llamagen:
        cmd += ["--llamagen", args.llamagen]
    if args.profile and side == "imagetok":
        cmd.append("--profile")
    for o in args.override or []:
        cmd += ["--override", o]
    return cmd


def run_worker(cmd: list[str], timeout: float, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [line for line in out.stderr.strip().splitlines() if line.strip()]
    # the most telling line: a Hydra/config error or the exception, not a trailing blank traceback line
    telling = [line for line in err if "Error" in line or "error" in line] or err
    return {"error": (telling[-1] if telling else f"exit status {out.returncode}")[:400],
            "stderr_tail": "\n".join(err[-8:])[-1500:]}


def summarise(case: str, size: int, side: str, runs: list[dict], args) -> dict:
    ok = [r for r in runs if "error" not in r and "skipped" not in r]
    line = {"case": case, "image_size": size, "side": side, "device": args.device, "precision": args.precision,
            "compile": args.compile, "steps": args.steps, "warmup": args.warmup, "repeats": len(runs)}
    if not ok:
        first = runs[0] if runs else {}
        line.update({k: first[k] for k in ("skipped", "error", "stderr_tail") if k in first})
        return line
    rates = [r["images_per_s"] for r in ok]
    line.update(images_per_s_median=round(statistics.median(rates), 3), images_per_s_min=round(min(rates), 3),
                images_per_s_max=round(max(rates), 3), step_ms_median=round(statistics.median(r["step_ms"] for r in ok), 2),
                peak_memory_mb=max(r["peak_memory_mb"] for r in ok),
                peak_memory_kind="cuda max_memory_allocated" if args.device == "cuda" else "peak RSS of the process",
                generator_params=ok[0]["generator_params"], discriminator_params=ok[0]["discriminator_params"],
                batch_size=ok[0]["batch_size"], threads=ok[0]["threads"], failed_repeats=len(runs) - len(ok))
    if all("peak_memory_above_imports_mb" in r for r in ok):
        line["peak_memory_above_imports_mb"] = max(r["peak_memory_above_imports_mb"] for r in ok)
    for key in ("experiment", "build", "gpu", "peak_bf16_tflops", "flops_per_step"):
        if key in ok[0]:
            line[key] = ok[0][key]
    if "flops_per_step" not in ok[0] and args.flops_from and ok[0].get("peak_bf16_tflops"):
        eager = eager_flops(args.flops_from, case, size, side, ok[0]["batch_size"])
        if eager:
            peak = ok[0]["peak_bf16_tflops"] * 1e12
            for r in ok:
                r["achieved_tflops"] = eager / (r["step_ms"] / 1e3) / 1e12
                r["mfu"] = r["achieved_tflops"] * 1e12 / peak
            line.update(flops_per_step=eager, flops_source=f"eager run in {args.flops_from}")
    if "mfu" in ok[0] and ok[0]["mfu"] is not None:
        line["mfu_median"] = round(statistics.median(r["mfu"] for r in ok), 4)
        line["achieved_tflops_median"] = round(statistics.median(r["achieved_tflops"] for r in ok), 2)
    if "profile" in ok[0]:
        line["profile"] = ok[0]["profile"]
    if len(runs) > len(ok):
        line["error"] = next(r["error"] for r in runs if "error" in r)
    return line


def eager_flops(path: str, case: str, size: int, side: str, batch: int) -> float | None:
    """FLOPs per step of the same (case, size, side, batch) from an eager run's JSON lines."""
    try:
        lines = [json.loads(t) for t in Path(path).read_text().splitlines() if t.startswith("{")]
    except OSError:
        return None
    for m in lines:
        if (m.get("case"), m.get("image_size"), m.get("side"), m.get("batch_size")) == (case, size, side, batch) \
                and m.get("flops_per_step") and not m.get("compile"):
            return m["flops_per_step"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--image-size", type=int, nargs="+", help="sizes for every chosen case (default: per case)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default=None, help="default: 32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 16 for the CPU recipes (default_cpu, cpu_vit_vqgan), else 4 on CPU / 32 on CUDA")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; 5 with --compile)")
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per side, sides alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--compile", action="store_true", help="imagetok trainer.compile=true; LlamaGen torch.compile")
    parser.add_argument("--llamagen", default=None, help="a FoundationVision/LlamaGen checkout")
    parser.add_argument("--sides", default="imagetok,llamagen")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the imagetok steps")
    parser.add_argument("--override", action="append", help="extra Hydra override for the imagetok side (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--flops-from", default=None, help="with --compile: FLOPs per step from this eager JSONL")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "SIZE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "32")
    args.warmup = args.warmup if args.warmup is not None else (5 if args.compile else 2)
    if args.worker:
        return worker(args)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "llamagen" in sides and not (args.llamagen and (Path(args.llamagen) / "tokenizer" / "tokenizer_image").is_dir()):
        print(json.dumps({"note": f"LlamaGen side skipped: no LlamaGen checkout at --llamagen={args.llamagen!r} "
                                  "(needs DIR/tokenizer/tokenizer_image)"}), flush=True)
        sides = [s for s in sides if s != "llamagen"]
    out_file = open(args.out, "a") if args.out else None

    def emit(obj: dict) -> None:
        text = json.dumps(obj)
        print(text, flush=True)
        if out_file:
            out_file.write(text + "\n")
            out_file.flush()

    lines = []
    for case in cases:
        for size in case_sizes(case, args):
            runs = {side: [] for side in sides}
            skip = llamagen_setup(case, size, args.device) if "llamagen" in sides else None
            for _ in range(args.repeats):
                for side in sides:
                    if side == "llamagen" and skip and "skip" in skip:
                        runs[side] = [{"skipped": skip["skip"]}]
                        continue
                    runs[side].append(run_worker(worker_command(case, size, side, args), args.timeout, args.threads))
            for side in sides:
                line = summarise(case, size, side, runs[side], args)
                emit({k: v for k, v in line.items() if k != "profile"} | ({"profile": line["profile"]} if "profile" in line else {}))
                print_profile(line)
                lines.append(line)
    ratios = {}
    for line in lines:
        if line["side"] != "imagetok" or "images_per_s_median" not in line:
            continue
        other = next((m for m in lines if m["side"] == "llamagen" and m["case"] == line["case"]
                      and m["image_size"] == line["image_size"] and "images_per_s_median" in m), None)
        if other:
            ratios[f"{line['case']}@{line['image_size']}"] = {
                "ratio_images_per_s": round(line["images_per_s_median"] / other["images_per_s_median"], 3),
                "imagetok_images_per_s": line["images_per_s_median"], "llamagen_images_per_s": other["images_per_s_median"],
                "memory_ratio": round(line["peak_memory_mb"] / other["peak_memory_mb"], 3),
                **({"memory_above_imports_ratio": round(line["peak_memory_above_imports_mb"]
                                                         / other["peak_memory_above_imports_mb"], 3)}
                   if "peak_memory_above_imports_mb" in line and "peak_memory_above_imports_mb" in other else {}),
                "params_equal": (line["generator_params"], line["discriminator_params"]) ==
                                (other["generator_params"], other["discriminator_params"])}
    emit({"summary": True, "device": args.device, "precision": args.precision, "compile": args.compile,
          "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
          "ratios": ratios})
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
