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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]

# Dense bf16 tensor-core peak (TFLOPS, without sparsity), looked up by a substring of the device name.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
                    ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0)]

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


def llamagen_setup(case: str, size: int, device: str) -> dict | None:
    """The LlamaGen build of a case, or ``{"skip": reason}``. Values mirror the imagetok recipe."""
    if case == "vit":
        return {"skip": "LlamaGen has no ViT tokenizer"}
    if case == "llamagen_vq16":  # vq_train.py's defaults (and its --ema)
        return dict(model="VQ-16", model_args=dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True),
                    loss=dict(disc_weight=0.5, disc_adaptive_weight=False, reconstruction_loss="l2", disc_dim=64,
                              disc_num_layers=3), betas=(0.9, 0.95), lr=1e-4, grad_clip=1.0, ema_decay=0.9999)
    if case == "taming_vqgan_f16":  # VQ-16 channels with taming's 16384 x 256 codebook, no l2 norm
        return dict(model="VQ-16", model_args=dict(codebook_size=16384, codebook_embed_dim=256, codebook_l2_norm=False),
                    loss=dict(disc_weight=0.8, disc_adaptive_weight=True, reconstruction_loss="l1", disc_dim=64,
                              disc_num_layers=3), betas=(0.5, 0.9), lr=4.32e-4, grad_clip=0.0, ema_decay=0.999)
    if case == "default_cpu":
        # imagetok's default recipe (configs/encoder/cnn.yaml, quantizer/vq.yaml, loss/vqgan.yaml, train.yaml):
        # ch 32, ch_mult [1,2,2], 1 res block, z 64, attention only in the middle, 1024 x 8 l2-normalised codes
        return dict(model="custom", model_args=dict(codebook_size=1024, codebook_embed_dim=8, codebook_l2_norm=True,
                                                    encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64),
                    ch=32, num_res_blocks=1, level_attention=False,
                    loss=dict(disc_weight=0.1, disc_adaptive_weight=True, reconstruction_loss="l1", disc_dim=32,
                              disc_num_layers=2), betas=(0.5, 0.9), lr=8e-4, grad_clip=1.0, ema_decay=0.999)
    raise ValueError(case)


def batch_size(case: str, args) -> int:
    if args.batch_size:
        return args.batch_size
    if case in ("default_cpu",) or (case == "vit" and args.device == "cpu"):
        return 16  # the CPU recipes' own batch
    return 32 if args.device == "cuda" else 4


def total_steps(args) -> int:
    """Warm-up + timed steps + one FLOP-counted step on CUDA (after the timed ones) unless compiled."""
    return args.warmup + args.steps + (1 if counts_flops(args) else 0)


def counts_flops(args) -> bool:
    """FLOPs are counted on CUDA in eager mode; a compiled step has the same FLOPs, which ``--flops-from``
    takes from an eager run's JSON line (FlopCounterMode does not see inside every compiled graph)."""
    return args.device == "cuda" and not args.compile


def case_sizes(case: str, args) -> list[int]:
    if args.image_size:
        return list(args.image_size)
    if case == "vit":
        return [256 if args.device == "cuda" else 32]
    return DEFAULT_SIZES[case]


# ---------------------------------------------------------------------------------------------------
# Measuring helpers (inside a worker)
# ---------------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_name(device: str) -> str | None:
    if device != "cuda":
        return None
    import torch
    return torch.cuda.get_device_name()


def peak_tflops(name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if name and key in name:
            return value
    return None


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_result(times: list[float], batch: int, args, flops: float | None) -> dict:
    """Per-repeat figures from the timed steps' wall times (seconds)."""
    step_s = statistics.median(times)
    out = {"images_per_s": batch / step_s, "step_ms": step_s * 1e3, "step_ms_all": [round(t * 1e3, 2) for t in times],
           "peak_memory_mb": round(peak_memory_mb(args.device), 1)}
    if args.device == "cuda":
        name = gpu_name(args.device)
        peak = peak_tflops(name)
        out.update(gpu=name, peak_bf16_tflops=peak)
        if flops is not None:
            out.update(flops_per_step=flops, achieved_tflops=flops / step_s / 1e12,
                       mfu=(flops / step_s / (peak * 1e12)) if peak else None)
    return out


class FlopCount:
    """``torch.utils.flop_counter.FlopCounterMode`` entered and left by hand (around one step)."""

    def __init__(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode
        self.mode = FlopCounterMode(display=False)
        self.total: float | None = None

    def start(self) -> None:
        self.mode.__enter__()

    def stop(self) -> None:
        self.mode.__exit__(None, None, None)
        self.total = float(self.mode.get_total_flops())


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


def make_step_timer(args):
    """The timing callback (Lightning imported only inside a worker)."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Wall time of each training step (``on_train_batch_start`` -> ``on_train_batch_end``), after
        ``warmup`` steps; on CUDA one more step is run under ``FlopCounterMode``; with ``--profile`` the
        timed steps run under torch.profiler instead (their times are then the profiled ones)."""

        def __init__(self, args) -> None:
            super().__init__()
            self.args, self.device = args, args.device
            self.times: list[float] = []
            self.flops = FlopCount() if counts_flops(args) else None
            self.profile_rows = None
            self._profiler = None
            self._hooks = []

        def _phase(self, batch_idx: int) -> str:
            if batch_idx < self.args.warmup:
                return "warmup"
            if batch_idx < self.args.warmup + self.args.steps:
                return "timed"
            return "flops"

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            phase = self._phase(batch_idx)
            if phase == "timed" and self.args.profile and self._profiler is None:
                self._start_profiler(pl_module)
            if phase == "flops" and self.flops is not None:
                self.flops.start()
            sync(self.device)
            self._step_scope = None
            if self._profiler is not None:
                import torch
                self._step_scope = torch.profiler.record_function("bench/step")
                self._step_scope.__enter__()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(self.device)
            elapsed = time.perf_counter() - self._t0
            if self._step_scope is not None:
                self._step_scope.__exit__(None, None, None)
            phase = self._phase(batch_idx)
            if phase == "timed":
                self.times.append(elapsed)
                if self._profiler is not None and len(self.times) == self.args.steps:
                    self._stop_profiler()
            elif phase == "flops" and self.flops is not None:
                self.flops.stop()

        # --- profiling: module hooks and wrapped methods of this process's training module -------------
        def _start_profiler(self, pl_module) -> None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            self._instrument(pl_module)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self._profiler = profile(activities=activities)
            self._profiler.__enter__()

        def _stop_profiler(self) -> None:
            prof, self._profiler = self._profiler, None
            prof.__exit__(None, None, None)
            for handle in self._hooks:
                handle.remove()
            self.profile_rows = profile_table(prof, self.times, self.device)

        def _instrument(self, pl_module) -> None:
            import torch
            import imagetok.training.module as training_module

            tok, loss = pl_module.tokenizer, pl_module.loss
            modules = {"encoder": tok.encoder, "quantizer": tok.quantizer, "decoder": tok.decoder,
                       "discriminator": loss.discriminator}
            perceptual = getattr(loss, "_perceptual", None)
            if perceptual:
                modules["lpips"] = perceptual[0]
            for name, module in modules.items():
                scopes = []

                def pre(_m, _inp, scopes=scopes, name=name):
                    scope = torch.profiler.record_function(f"bench/forward/{name}")
                    scope.__enter__()
                    scopes.append(scope)

                def post(_m, _inp, _out, scopes=scopes):
                    scopes.pop().__exit__(None, None, None)

                self._hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

            def scoped(fn, name):
                def wrapper(*a, **kw):
                    with torch.profiler.record_function(name if isinstance(name, str) else name()):
                        return fn(*a, **kw)
                return wrapper

            calls = {"n": 0}

            def backward_name():  # one generator and (once it has started) one discriminator backward per step
                calls["n"] += 1
                return "bench/generator_backward" if calls["n"] % 2 == 1 else "bench/discriminator_backward"

            pl_module.manual_backward = scoped(pl_module.manual_backward, backward_name)
            pl_module.log_dict = scoped(pl_module.log_dict, "bench/log")
            if hasattr(pl_module, "_nonfinite_terms"):
                pl_module._nonfinite_terms = scoped(pl_module._nonfinite_terms, "bench/nonfinite_check")
            if pl_module.ema is not None:
                pl_module.ema.update = scoped(pl_module.ema.update, "bench/ema")
            if hasattr(loss, "_adaptive_weight"):
                loss._adaptive_weight = scoped(loss._adaptive_weight, "bench/adaptive_weight")
            loss.generator_loss = scoped(loss.generator_loss, "bench/generator_loss")
            loss.discriminator_loss = scoped(loss.discriminator_loss, "bench/discriminator_loss")
            for fn in ("gradient_norm", "clip_gradient_norm"):
                if hasattr(training_module, fn):
                    setattr(training_module, fn, scoped(getattr(training_module, fn), "bench/grad_norm_clip"))

    return StepTimer(args)


def _tracked(name: str) -> bool:
    return name.startswith(("imagetok/", "bench/")) and name != "bench/step" or name.startswith("Optimizer.step#")


def profile_table(prof, step_times: list[float], device: str) -> dict:
    """Per tracked scope: calls, total CPU ms (inclusive), self ms (without the tracked scopes nested
    in it), per step; on CUDA also the device time attributed to the scope. ``other`` = step - sum(self)."""
    events = [e for e in prof.events() if _tracked(e.name)]
    steps = [e for e in prof.events() if e.name == "bench/step"]
    n = max(1, len(steps))

    def interval(e):
        return e.time_range.start, e.time_range.end

    by_thread: dict[int, list] = {}
    for e in events:
        by_thread.setdefault(e.thread, []).append(e)
    rows: dict[str, dict] = {}
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
        stack: list = []
        child_time: dict[int, float] = {}
        for e in thread_events:
            start, end = interval(e)
            while stack and interval(stack[-1])[1] <= start:
                stack.pop()
            if stack:  # nearest tracked ancestor on this thread
                parent = stack[-1]
                child_time[id(parent)] = child_time.get(id(parent), 0.0) + (end - start)
            stack.append(e)
        for e in thread_events:
            start, end = interval(e)
            row = rows.setdefault(e.name, {"calls": 0, "total_ms": 0.0, "self_ms": 0.0})
            row["calls"] += 1
            row["total_ms"] += (end - start) / 1e3
            row["self_ms"] += (end - start - child_time.get(id(e), 0.0)) / 1e3
    device_ms = {}
    if device == "cuda":
        for avg in prof.key_averages():
            if _tracked(avg.key):
                device_ms[avg.key] = getattr(avg, "device_time_total", getattr(avg, "cuda_time_total", 0.0)) / 1e3
    step_ms = sum(e.time_range.elapsed_us() for e in steps) / 1e3 if steps else sum(step_times) * 1e3
    # only scopes on the step's own thread (the main thread) partition its time
    main_thread = steps[0].thread if steps else None
    tracked_self = sum(r["self_ms"] for name, r in rows.items()
                       if main_thread is None or any(e.thread == main_thread and e.name == name for e in events))
    table = []
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["self_ms"]):
        entry = {"scope": name, "calls_per_step": r["calls"] / n, "total_ms_per_step": round(r["total_ms"] / n, 3),
                 "self_ms_per_step": round(r["self_ms"] / n, 3),
                 "self_percent": round(100 * r["self_ms"] / step_ms, 1) if step_ms else None}
        if name in device_ms:
            entry["device_ms_per_step"] = round(device_ms[name] / n, 3)
        table.append(entry)
    other = step_ms - tracked_self
    table.append({"scope": "other (Lightning, logging glue, unscoped work)", "calls_per_step": 1.0,
                  "total_ms_per_step": round(other / n, 3), "self_ms_per_step": round(other / n, 3),
                  "self_percent": round(100 * other / step_ms, 1) if step_ms else None})
    return {"profiled_steps": n, "step_ms_per_step": round(step_ms / n, 3), "rows": table,
            "imagetok_scopes_found": sorted(name for name in rows if name.startswith("imagetok/"))}


# ---------------------------------------------------------------------------------------------------
# LlamaGen worker
# ---------------------------------------------------------------------------------------------------

def import_llamagen(directory: str):
    """LlamaGen's tokenizer modules from ``directory``; its LPIPS gets a VGG16 with random weights."""
    import torch
    import torchvision

    sys.path.insert(0, str(Path(directory).resolve()))
    import tokenizer.tokenizer_image.lpips as lpips_module

    class _RandomVGG:  # torchvision.models as its lpips.py sees it: vgg16(pretrained=True) without a download
        def __getattr__(self, name):
            return getattr(torchvision.models, name)

        @staticmethod
        def vgg16(pretrained=False, **kwargs):
            return torchvision.models.vgg16(weights=None)

    lpips_module.models = _RandomVGG()
    original_load = lpips_module.LPIPS.load_from_pretrained
    cache = Path(lpips_module.__file__).resolve().parent / "cache" / "vgg.pth"

    def load_or_skip(self, name="vgg_lpips"):  # its calibrated heads from cache/vgg.pth when present, never a download
        if cache.is_file() and cache.stat().st_size > 1000:
            try:
                return original_load(self, name)
            except Exception as err:  # e.g. a git-lfs pointer
                print(f"LlamaGen LPIPS heads not loaded ({type(err).__name__}); random heads", file=sys.stderr)

    lpips_module.LPIPS.load_from_pretrained = load_or_skip
    from tokenizer.tokenizer_image import vq_model
    from tokenizer.tokenizer_image.vq_loss import VQLoss
    from utils.ema import requires_grad, update_ema
    del torch
    return vq_model, VQLoss, update_ema, requires_grad


def build_llamagen_model(vq_model, setup: dict):
    from torch import nn

    if setup["model"] == "VQ-16":
        return vq_model.VQ_models["VQ-16"](commit_loss_beta=0.25, entropy_loss_ratio=0.0, dropout_p=0.0,
                                           **setup["model_args"])
    # Its VQModel with the default recipe's channels: ModelArgs set ch_mult, z_channels and the codebook;
    # ch and num_res_blocks are arguments of its Encoder/Decoder classes that VQModel does not pass on.
    a = vq_model.ModelArgs(**setup["model_args"])
    model = vq_model.VQModel(a)
    model.encoder = vq_model.Encoder(ch=setup["ch"], ch_mult=a.encoder_ch_mult, num_res_blocks=setup["num_res_blocks"],
                                     z_channels=a.z_channels, dropout=a.dropout_p)
    model.decoder = vq_model.Decoder(ch=setup["ch"], ch_mult=a.decoder_ch_mult, num_res_blocks=setup["num_res_blocks"],
                                     z_channels=a.z_channels, dropout=a.dropout_p)
    if not setup["level_attention"]:  # the recipe has attention in the middle block only
        for net in (model.encoder, model.decoder):
            for block in net.conv_blocks:
                block.attn = nn.ModuleList()  # its forward skips a level's attention when the list is empty
    return model


def as_after_a_device_copy(model) -> None:
    """Its quantizer registers ``codebook_used`` as a buffer holding an ``nn.Parameter`` (requires_grad)
    and writes it in place every step. ``.to("cuda")`` turns that into a non-leaf copy, which may be
    written in place (autograd records the writes); on the CPU ``.to`` is a no-op and the in-place write
    on a leaf fails. A clone gives the CPU run the state its CUDA training has."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.requires_grad and buf.is_leaf:
                module._buffers[name] = buf.clone()


def run_llamagen(case: str, size: int, args) -> dict:
    import torch

    setup = llamagen_setup(case, size, args.device)
    if "skip" in setup:
        return {"skipped": setup["skip"]}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # as vq_train.py
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    vq_model_module, VQLoss, update_ema, requires_grad = import_llamagen(args.llamagen)
    device = torch.device(args.device)
    batch = batch_size(case, args)
    from copy import deepcopy

    vq_model = build_llamagen_model(vq_model_module, setup)
    ema = deepcopy(vq_model).to(device)
    requires_grad(ema, False)
    vq_model = vq_model.to(device)
    for net in (vq_model, ema):
        as_after_a_device_copy(net)
    vq_loss = VQLoss(disc_start=0, disc_type="patchgan", disc_loss="hinge", gen_adv_loss="hinge", image_size=size,
                     perceptual_weight=1.0, reconstruction_weight=1.0, codebook_weight=1.0, **setup["loss"]).to(device)
    generator_params, discriminator_params = count_params(vq_model), count_params(vq_loss.discriminator)
    scaler = torch.amp.GradScaler(args.device, enabled=False)  # its scalers are on for fp16 only
    scaler_disc = torch.amp.GradScaler(args.device, enabled=False)
    optimizer = torch.optim.Adam(vq_model.parameters(), lr=setup["lr"], betas=setup["betas"])
    optimizer_disc = torch.optim.Adam(vq_loss.discriminator.parameters(), lr=setup["lr"], betas=setup["betas"])
    update_ema(ema, vq_model, decay=0)
    if args.compile:
        vq_model = torch.compile(vq_model)
    inner = vq_model._orig_mod if args.compile else vq_model
    vq_model.train()
    ema.eval()
    vq_loss.train()
    ptdtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    max_grad_norm = setup["grad_clip"]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device) for _ in range(4)]

    def train_step(imgs, step):
        optimizer.zero_grad()
        with torch.autocast(args.device, dtype=ptdtype, enabled=args.precision == "bf16"):
            recons_imgs, codebook_loss = vq_model(imgs)
            loss_gen = vq_loss(codebook_loss, imgs, recons_imgs, optimizer_idx=0, global_step=step + 1,
                               last_layer=inner.decoder.last_layer, logger=None, log_every=10**9)
        scaler.scale(loss_gen).backward()
        if max_grad_norm != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(vq_model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, inner, decay=setup["ema_decay"])
        optimizer_disc.zero_grad()
        with torch.autocast(args.device, dtype=ptdtype, enabled=args.precision == "bf16"):
            loss_disc = vq_loss(codebook_loss, imgs, recons_imgs, optimizer_idx=1, global_step=step + 1,
                                logger=None, log_every=10**9)
        scaler_disc.scale(loss_disc).backward()
        if max_grad_norm != 0.0:
            scaler_disc.unscale_(optimizer_disc)
            torch.nn.utils.clip_grad_norm_(vq_loss.discriminator.parameters(), max_grad_norm)
        scaler_disc.step(optimizer_disc)
        scaler_disc.update()
        return loss_gen.item() + loss_disc.item()  # its running loss

    times = []
    for step in range(args.warmup + args.steps):
        imgs = batches[step % len(batches)]
        sync(args.device)
        t0 = time.perf_counter()
        train_step(imgs, step)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    flops = None
    if counts_flops(args):
        counter = FlopCount()
        counter.start()
        train_step(batches[0], args.warmup + args.steps)
        counter.stop()
        flops = counter.total
    out = step_result(times, batch, args, flops)
    out.update(generator_params=generator_params, discriminator_params=discriminator_params, batch_size=batch,
               threads=torch.get_num_threads(), build=setup["model"] if setup["model"] != "custom" else
               "VQModel(ModelArgs) with Encoder/Decoder(ch=32, num_res_blocks=1), level attention removed")
    return out


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


def print_profile(line: dict) -> None:
    prof = line.get("profile")
    if not prof:
        return
    print(f"\nprofile: {line['case']} @ {line['image_size']} px, {line['side']}, {prof['profiled_steps']} steps, "
          f"{prof['step_ms_per_step']:.1f} ms/step (under the profiler); imagetok/ scopes found: "
          f"{', '.join(prof['imagetok_scopes_found']) or 'none'}", file=sys.stderr)
    device = any("device_ms_per_step" in r for r in prof["rows"])
    header = f"{'scope':<48} {'calls':>6} {'total ms':>10} {'self ms':>10} {'self %':>7}" + (f" {'device ms':>10}" if device else "")
    print(header, file=sys.stderr)
    for r in prof["rows"]:
        text = (f"{r['scope']:<48} {r['calls_per_step']:>6.1f} {r['total_ms_per_step']:>10.2f} "
                f"{r['self_ms_per_step']:>10.2f} {r['self_percent'] if r['self_percent'] is not None else '-':>7}")
        if device:
            text += f" {r.get('device_ms_per_step', ''):>10}"
        print(text, file=sys.stderr)


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
                "params_equal": (line["generator_params"], line["discriminator_params"]) ==
                                (other["generator_params"], other["discriminator_params"])}
    emit({"summary": True, "device": args.device, "precision": args.precision, "compile": args.compile,
          "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
          "ratios": ratios})
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
