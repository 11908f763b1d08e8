"""Training efficiency against the machine's matmul peak, and what MFCon adds to a step.

1. Efficiency: FLOP/s of one full training step (forward, backward, optimizer step, as
   ``mfcon.train.loop._train_step`` runs it; FLOPs counted by ``FlopCounterMode`` over one step)
   divided by the FLOP/s of a large square ``torch.mm`` measured in the same run at the same
   thread count (fp32 on CPU; bf16 under autocast on CUDA, against a bf16 matmul).
2. MFCon overhead: step time with MFCon on all blocks / step time with MFCon weight 0.

Batches are the search spaces' shapes (``paper``: search_spaces/mfcon.yaml, ``tiny``:
search_spaces/demo.yaml): P speakers x K crops of ``crop_seconds`` (100 frames/s), random fbanks.

Variants: MFCon off/on x model code (``--against REV`` adds the model code of git revision REV,
``platform/mfcon/models`` only, same weights, batch, objective and optimizer: before/after of a
model change) x heap policy (``--heap``: glibc malloc as it comes, and keeping freed memory, see
``keep_freed_memory``; each policy lives in its own fresh process, as a policy cannot be undone).
Every repetition runs every variant once, in alternating order, each right after a peak-matmul run,
and every reported number is a median over repetitions of ratios taken side by side, so a
neighbour's load hits all variants alike. Wall-time ratios are what was asked; CPU-time ratios
(process time of the process that ran the step) are printed beside them because on a shared
box they measure our own work, not the neighbours' (on 1 thread they equal the wall ratio of an
idle box).

    .venv/bin/python bench/train_efficiency.py [--presets paper tiny] [--crops paper=32] [--reps 3]
        [--threads 2] [--heap default keep] [--against REV] [--profile]
        [--json bench/results/train_efficiency.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
try:
    import mfcon  # noqa: F401
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(REPO / "platform"))

from mfcon.config import TrainConfig, apply_overrides
from mfcon.data.batching import CropBatch
from mfcon.losses.multiscale import SpeakerObjective
from mfcon.models.mfa_conformer import build_model
from mfcon.study.spaces import load_search_space
from mfcon.train.heap import keep_freed_memory
from mfcon.train.loop import TrainModule, WorkerContext, _train_step, build_optimizer

SPACES = {"paper": REPO / "search_spaces" / "mfcon.yaml", "tiny": REPO / "search_spaces" / "demo.yaml"}
VOXCELEB1_DEV_SPEAKERS = 1211
FRAMES_PER_SECOND = 100  # 10 ms frame shift


# ---------------------------------------------------------------- machine and timing


def machine_lines(device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    lines = [f"machine: {cpu}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}"]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}")
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, the device drained before and after."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class MatmulPeak:
    """Dense square matmul at the step's precision: the machine's practical FLOP/s limit."""

    device: torch.device
    dtype: torch.dtype
    n: int
    calls: int = 3

    def __post_init__(self):
        g = torch.Generator(device=self.device).manual_seed(0)
        self.a = torch.randn(self.n, self.n, device=self.device, generator=g).to(self.dtype)
        self.b = torch.randn(self.n, self.n, device=self.device, generator=g).to(self.dtype)
        torch.mm(self.a, self.b)  # warm-up

    def measure(self) -> tuple[float, float]:
        """(FLOP/s by wall time, FLOP/s by CPU time) of ``calls`` back-to-back matmuls."""
        def run():
            for _ in range(self.calls):
                torch.mm(self.a, self.b)
        wall, cpu = timed(run, self.device)
        flops = 2 * self.n**3 * self.calls
        return flops / wall, flops / max(cpu, 1e-9)


# ---------------------------------------------------------------- model code at a git revision


def load_models_at(rev: str) -> Callable[[object], torch.nn.Module]:
    """``build_model`` of ``platform/mfcon/models`` as it was at git revision ``rev``.

    The files are copied into a temporary package (``mfcon.models.`` imports renamed to it), so
    both versions live in one process; ``mfcon.config`` and everything else stay the current ones.
    """
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    name = f"mfcon_models_{sha}"
    pkg = Path(tempfile.mkdtemp(prefix="mfcon-models-")) / name
    pkg.mkdir()
    files = subprocess.run(["git", "ls-tree", "--name-only", f"{sha}:platform/mfcon/models"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for file in files:
        source = subprocess.run(["git", "show", f"{sha}:platform/mfcon/models/{file}"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        (pkg / file).write_text(source.replace("mfcon.models.", f"{name}."))
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module(f"{name}.mfa_conformer").build_model


# ---------------------------------------------------------------- one training step


def space_config(preset: str, mfcon_on: bool) -> TrainConfig:
    """The search space's base recipe, with MFCon on all blocks (its weight, or 0.01) or weight 0."""
    cfg = load_search_space(SPACES[preset]).base_config()
    if cfg.model_preset != preset:
        raise ValueError(f"{SPACES[preset]}: base.model_preset is {cfg.model_preset!r}, expected {preset!r}")
    weight = (cfg.loss.mfcon_weight or 0.01) if mfcon_on else 0.0
    return apply_overrides(cfg, {"loss.mfcon_weight": weight, "loss.mfcon_blocks": "all"}, str(SPACES[preset]))


def synthetic_batch(cfg: TrainConfig, crops: int | None, num_classes: int, device: torch.device) -> CropBatch:
    """P speakers x K crops of the configured length (``crops`` overrides P x K, K kept), random fbanks."""
    k = cfg.data.utts_per_speaker
    p = max(2, (crops or cfg.data.speakers_per_batch * k) // k)
    frames = round(cfg.data.crop_seconds * FRAMES_PER_SECOND)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(p * k, frames, 80, generator=g)
    labels = torch.randperm(num_classes, generator=g)[:p].repeat_interleave(k)
    return CropBatch(feats.to(device), torch.full((p * k,), frames, device=device), labels.to(device))


@dataclass
class TrainStep:
    """One configured training step (model code version x MFCon on/off) and its measurements."""

    key: dict[str, str]  # heap, code, mfcon
    run: Callable[[], object] | None
    shape: tuple[int, ...] = ()
    flops: int = 0
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    peaks: list[tuple[float, float]] = field(default_factory=list)  # matmul FLOP/s (wall, CPU) beside each run


def build_step(key: dict[str, str], cfg: TrainConfig, model: torch.nn.Module, batch: CropBatch, num_classes: int,
               device: torch.device) -> TrainStep:
    """``_train_step`` exactly as the training loop calls it, on a fixed batch."""
    model_cfg = cfg.model_config_resolved()
    torch.manual_seed(1)
    module = TrainModule(model, SpeakerObjective(cfg.loss, model_cfg, num_classes)).to(device)
    optimizer = build_optimizer(cfg.optim, module.parameters())
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    ctx = WorkerContext(device=device)
    return TrainStep(key, lambda: _train_step(module, batch, optimizer, scaler, cfg, ctx, amp_dtype),
                     tuple(batch.feats.shape))


def count_flops(step: TrainStep) -> None:
    """FLOPs of one step; also the warm-up (oneDNN builds its primitives on first use)."""
    with FlopCounterMode(display=False) as counter:
        step.run()
    step.flops = counter.get_total_flops()


# ---------------------------------------------------------------- heap policy



# ---------------------------------------------------------------- variants, one process per heap policy


def variant_steps(preset: str, heap: str, builders: dict[str, Callable], args, device) -> list[TrainStep]:
    """For each model code version: (MFCon off, MFCon on) steps, all starting from the same weights."""
    steps, weights = [], None
    for code, build in builders.items():
        for mfcon in ("off", "on"):
            cfg = space_config(preset, mfcon == "on")
            torch.manual_seed(0)
            model = build(cfg.model_config_resolved())
            weights = weights or {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(weights)  # the same parameter names in every version: same start
            batch = synthetic_batch(cfg, args.crops.get(preset), args.num_classes, device)
            steps.append(build_step({"heap": heap, "code": code, "mfcon": mfcon}, cfg, model, batch,
                                    args.num_classes, device))
    return steps


def serve_steps(conn, preset: str, heap: str, args) -> None:
    """Child process: build this heap policy's steps, then time one step per request (index; None ends)."""
    torch.set_num_threads(args.threads)
    if heap == "keep" and not keep_freed_memory():
        raise RuntimeError("--heap keep needs glibc (Linux)")
    device = pick_device(args.device)
    builders = {f"before@{args.against}": load_models_at(args.against)} if args.against else {}
    builders["after" if args.against else "current"] = build_model
    steps = variant_steps(preset, heap, builders, args, device)
    for step in steps:
        count_flops(step)
    conn.send([(s.key, s.shape, s.flops) for s in steps])
    while (request := conn.recv()) is not None:
        index, profile = request
        if profile:
            profile_step(steps[index], device)
        conn.send(timed(steps[index].run, device))


def pick_device(choice: str) -> torch.device:
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def measure_preset(preset: str, args) -> dict:
    """Every variant once per repetition, in alternating order, beside a peak-matmul measurement."""
    ctx = multiprocessing.get_context("spawn")
    workers, steps = [], []
    for heap in args.heap:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve_steps, args=(child, preset, heap, args), daemon=True)
        proc.start()
        workers.append((parent, proc))
        steps += [(parent, i, TrainStep(key, None, tuple(shape), flops))
                  for i, (key, shape, flops) in enumerate(parent.recv())]
    device = pick_device(args.device)
    peak = MatmulPeak(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                      args.peak_n or (8192 if device.type == "cuda" else 2048))
    for rep in range(args.reps):
        for conn, index, step in (steps if rep % 2 == 0 else steps[::-1]):  # no variant always runs first
            step.peaks.append(peak.measure())  # the peak right beside each step: the same load
            conn.send((index, False))
            wall, cpu = conn.recv()
            step.walls.append(wall)
            step.cpus.append(cpu)
        print(f"  {preset} rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{label(s.key)} {s.walls[-1]:.2f}s (mm {s.peaks[-1][0] / 1e9:.0f} GFLOP/s)" for _, _, s in steps),
            flush=True)
    for conn, index, step in steps if args.profile else []:
        if step.key["mfcon"] == "on":
            conn.send((index, True))
            conn.recv()
    for conn, proc in workers:
        conn.send(None)
        proc.join()
    return summarize(preset, [s for _, _, s in steps])


def label(key: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in key.items())


def paired_ratios(steps: list[TrainStep], dim: str) -> dict[str, dict[str, float]]:
    """For a dimension with two values (a, b): median over repetitions of time(b) / time(a), per
    setting of the other dimensions (wall and CPU time)."""
    values = list(dict.fromkeys(s.key[dim] for s in steps))
    if len(values) != 2:
        return {}
    out = {}
    for a in (s for s in steps if s.key[dim] == values[0]):
        rest = {k: v for k, v in a.key.items() if k != dim}
        b = next(s for s in steps if s.key[dim] == values[1] and all(s.key[k] == v for k, v in rest.items()))
        out[f"{dim} {values[1]}/{values[0]}, {label(rest)}"] = {
            "wall": statistics.median(y / x for x, y in zip(a.walls, b.walls)),
            "cpu_time": statistics.median(y / x for x, y in zip(a.cpus, b.cpus))}
    return out


def summarize(preset: str, steps: list[TrainStep]) -> dict:
    """Medians of per-repetition ratios (each ratio from measurements taken side by side)."""
    med = statistics.median
    peaks = [p for s in steps for p in s.peaks]
    out = {"preset": preset, "batch": list(steps[0].shape), "peak_gflops_wall": med(p[0] for p in peaks) / 1e9,
           "peak_gflops_cpu": med(p[1] for p in peaks) / 1e9, "steps": [], "ratios": {}}
    for s in steps:
        out["steps"].append({
            **s.key, "gflop": s.flops / 1e9, "step_s": med(s.walls), "step_cpu_s": med(s.cpus),
            "efficiency": med(s.flops / w / p[0] for w, p in zip(s.walls, s.peaks)),
            "efficiency_cpu_time": med(s.flops / c / p[1] for c, p in zip(s.cpus, s.peaks)),
            "walls": s.walls, "cpus": s.cpus, "peaks_gflops": [[p[0] / 1e9, p[1] / 1e9] for p in s.peaks]})
    for dim in ("mfcon", "code", "heap"):
        out["ratios"].update(paired_ratios(steps, dim))
    return out


def profile_step(step: TrainStep, device: torch.device, rows: int = 15) -> None:
    """Top operators of one step by self time (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step.run()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntop ops of one step, {label(step.key)}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=45), flush=True)


# ---------------------------------------------------------------- report


def print_report(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['preset']}: batch {tuple(r['batch'])} (crops, frames, mels); matmul peak "
              f"{r['peak_gflops_wall']:.0f} GFLOP/s wall, {r['peak_gflops_cpu']:.0f} per CPU-second")
        print(f"  {'variant':<44} {'GFLOP':>7} {'step s':>8} {'CPU s':>8} {'eff.':>5} {'eff.(CPU)':>9}")
        for s in r["steps"]:
            name = label({k: s[k] for k in ("heap", "code", "mfcon")})
            print(f"  {name:<44} {s['gflop']:>7.1f} {s['step_s']:>8.3f} {s['step_cpu_s']:>8.3f} "
                  f"{s['efficiency']:>5.2f} {s['efficiency_cpu_time']:>9.2f}")
        for name, ratio in r["ratios"].items():
            print(f"  time {name}: x{ratio['wall']:.3f} wall, x{ratio['cpu_time']:.3f} CPU")


def preset_counts(items: list[str]) -> dict[str, int]:
    """["paper=32", ...] -> {"paper": 32}."""
    out = {}
    for item in items:
        name, _, count = item.partition("=")
        if name not in SPACES or not count.isdigit() or int(count) < 2:
            raise SystemExit(f"--crops: expected PRESET=N with PRESET in {sorted(SPACES)} and N >= 2, got {item!r}")
        out[name] = int(count)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["paper", "tiny"], choices=sorted(SPACES))
    ap.add_argument("--crops", nargs="*", default=[], metavar="PRESET=N",
                    help="crops per step instead of the space's P x K (K kept), e.g. paper=32")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of every variant")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--heap", nargs="+", default=["default", "keep"], choices=["default", "keep"],
                    help="glibc malloc as it comes, and/or keeping freed memory (see keep_freed_memory)")
    ap.add_argument("--num-classes", type=int, default=VOXCELEB1_DEV_SPEAKERS)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--peak-n", type=int, help="side of the square peak matmul (2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--against", metavar="REV", help="also time the model code of this git revision")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one step of every MFCon-on variant")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    args.crops = preset_counts(args.crops)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    for line in machine_lines(device):
        print(line, flush=True)
    results = [measure_preset(preset, args) for preset in args.presets]
    print_report(results)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_lines(device), "args": sys.argv[1:],
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
