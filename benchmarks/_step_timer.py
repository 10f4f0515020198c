"""The timing callback of the imagetok side of ``train_step.py`` (wall time per step, FLOPs on CUDA) and,
with ``--profile``, the per-part profile of a step."""

from __future__ import annotations

import sys
import time

from _step_measure import FlopCount, counts_flops, sync


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
