"""``fedsilo bench dp``: what DP-SGD costs per network and Opacus grad-sample mode.

``run_dp_bench`` returns the benchmark object of DESIGN.md ("Formats"). For each allow-listed network
(default: all of them, the demo plan's UNet first) and batch size it measures one optimizer step
(forward, loss, backward, ``optimizer.step``) on synthetic tensors, non-private and under each Opacus
grad-sample mode in :data:`MODES`:

- ``hooks``: per-sample gradients from Opacus' per-layer grad samplers (autograd hooks);
- ``functorch``: the same hooks, every layer's per-sample gradient through ``torch.func`` (vmap);
- ``ew``: PyTorch's expanded weights (``call_for_per_sample_grads``);
- ``ghost``: fast gradient / ghost clipping (``GradSampleModuleFastGradientClipping``): per-sample
  gradient *norms* only, layer by layer, then a second backward pass on the loss reweighted by the
  clipping coefficients. ``make_private(..., grad_sample_mode="ghost", criterion=...)`` returns a
  criterion wrapper (``DPLossFastGradientClipping``) that needs the loss per sample, so the plan's loss
  is wrapped in :class:`PerSampleLoss` (MONAI's DiceLoss with ``reduction="none"`` keeps singleton
  spatial dimensions, which would broadcast wrongly against the ``[B]`` clipping coefficients).

Every DP mode uses the same noise multiplier and clipping norm (:data:`NOISE_MULTIPLIER`,
:data:`MAX_GRAD_NORM`) and the plan's loss and optimizer. The batch is fixed (Opacus' Poisson sampling
off, ``poisson_sampling=False``): the cost of one step of a given size is what is compared; real
training (``pipelines.training.train_local``) draws Poisson batches whose size varies around the
plan's batch size, which changes nothing per step.

How it is measured:

- step time: the median of ``repeats`` timed steps after :data:`WARMUP` warm-up steps, the non-private case
  and every mode built in one child process and timed interleaved (one step of each in turn, the order rotated
  each round: :func:`measure_interleaved`), so that a change of load on a shared machine hits every case alike;
  ``torch.set_num_threads(threads)`` on CPU (default 2, the target machine), ``torch.cuda.synchronize``
  around each step on CUDA;
- memory: every case runs in a fresh child process (``python -c``), which also isolates failures and
  crashes. CPU: the peak resident set from the OS (``getrusage(RUSAGE_SELF).ru_maxrss``) after the steps
  ("peak RSS MiB", including the ~0.3-0.5 GiB of the imported libraries) and its increase over the value
  read after the imports, before the model is built ("peak extra RSS MiB": model, optimizer state,
  activations, gradients and per-sample gradients, i.e. what training adds). The DP/non-DP memory
  target is judged on the extra row: the whole-process peak dilutes the overhead with the import floor.
  CUDA: ``torch.cuda.max_memory_allocated`` ("peak allocated MiB") and its increase over the
  allocation before the model is built ("peak extra allocated MiB").
- A mode that fails for a network (an exception, a crash, a timeout, non-finite weights) gives one
  row ``"skipped: <reason>"`` instead of figures.

Rows per network, batch size and case: ``step seconds``, the two memory rows; the DP rows have the
non-private case as baseline and ratio = value / baseline value (both measured in this run). One
row per network names the fastest working mode (the lowest mean step-time ratio over the batch sizes)
and whether it is the one ``pipelines.networks.NETWORKS`` chooses; its value is that mean ratio.

The inputs are the demo's: 32^3 single-channel volumes; each network is built from the arguments of
its example plan (configs/plans) or, without one, small MONAI arguments (:data:`BENCH_PLANS`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError
from pipelines.networks import NETWORKS

BENCH = "dp"
MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
WARMUP = 2
THREADS = 2
CASE_TIMEOUT_S = 1800.0
_RESULT_MARK = "DP_BENCH_RESULT "
_ROOT = Path(__file__).resolve().parents[1]

# What the bench builds for each network: the plan sections that matter for one step (task, network
# arguments, loss, optimizer), and the spatial size of the synthetic input. The demo's shape, 32^3 single
# channel, for all: 3D segmentation as in the demo, and 3D classification at 32^3 as the cls3d example
# plan and the synthetic silos use it. DenseNet121 and EfficientNetBN downsample by 32, to one voxel: 32^3 is
# the smallest size they build and train at in hooks mode; DenseNet's functorch mode needs a larger input (its
# per-sample pass leaves the last GroupNorm one value per group, which torch refuses), and is reported
# skipped at the size real training uses rather than measured at another.
BENCH_PLANS: dict[str, dict[str, Any]] = {
    # configs/plans/seg3d-unet-dp.yaml (the demo).
    "UNet": {"task": "seg3d", "args": {"channels": [8, 16, 32], "strides": [2, 2]}, "loss": "dice",
             "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9}, "size": 32},
    # configs/plans/seg2d-basicunet-dp.yaml's features, in 3D.
    "BasicUNet": {"task": "seg3d", "args": {"features": [8, 8, 16, 32, 64, 8]}, "loss": "dice",
                  "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9}, "size": 32},
    # No example plan: MONAI's default width (init_filters 8) and depth.
    "SegResNet": {"task": "seg3d", "args": {"init_filters": 8}, "loss": "dice",
                  "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9}, "size": 32},
    # configs/plans/cls3d-densenet-dp.yaml.
    "DenseNet121": {"task": "cls3d", "args": {"init_features": 8, "growth_rate": 8, "block_config": [2, 2, 2, 2]},
                    "loss": "cross_entropy", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "size": 32},
    # No example plan: the smallest EfficientNet.
    "EfficientNetBN": {"task": "cls3d", "args": {"model_name": "efficientnet-b0"}, "loss": "cross_entropy",
                       "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "size": 32},
}


def _plan_dict(network: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"dp-bench-{network.lower()}",
        "task": spec["task"],
        "model": {"network": network, "args": spec["args"]},
        "training": {"local_epochs": 1, "batch_size": 8, "optimizer": spec["optimizer"], "loss": spec["loss"]},
        "privacy": {"enabled": True, "max_grad_norm": MAX_GRAD_NORM},
        "federation": {"rounds": 1},
    }


# ---------------------------------------------------------------------------------------------- child side


def _per_sample_loss_class():
    from pipelines.training import PerSampleLoss

    return PerSampleLoss


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def _child_setup(job: dict[str, Any]):
    """Imports, warnings, threads and the device; returns (torch, device, cuda, memory_now, memory_peak)."""
    import resource
    import warnings

    import torch

    # Everything a case imports lazily is imported before the "before" reading, so that the extra memory
    # is what the training step adds, not library code (MONAI's networks and losses, Opacus' modules).
    import monai.losses  # noqa: F401
    import monai.networks.nets  # noqa: F401
    import opacus  # noqa: F401
    import opacus.grad_sample  # noqa: F401
    import opacus.validators  # noqa: F401
    import torch.func  # noqa: F401
    import torch.utils.data  # noqa: F401

    import pipelines.grad_samplers  # noqa: F401
    import pipelines.networks  # noqa: F401
    import pipelines.plan  # noqa: F401
    import pipelines.training  # noqa: F401

    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*[Ss]ecure.*RNG.*", category=UserWarning)
    cuda = job["device"] == "cuda"
    device = torch.device(job["device"])
    if not cuda:
        torch.set_num_threads(int(job["threads"]))
    else:
        torch.cuda.reset_peak_memory_stats()

    def memory_now() -> float:
        if cuda:
            return torch.cuda.memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def memory_peak() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Start the thread pool (its stacks are not training memory) before the reading.
    torch.ones(64, 64, device=device).matmul(torch.ones(64, 64, device=device)).sum().item()
    return torch, device, cuda, memory_now, memory_peak


def _build_step(job: dict[str, Any], mode: str | None, device):
    """Build the network (non-private when ``mode`` is None, else made private in that mode) and its inputs;
    returns ``(step, model)`` where ``step()`` runs one optimizer step and returns the loss."""
    import warnings

    import torch

    from pipelines.networks import build_network
    from pipelines.plan import parse_plan
    from pipelines.training import make_loss, make_optimizer

    batch = int(job["batch"])
    plan = parse_plan(job["plan"])
    model = build_network(plan, seed=0).to(device)
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, *(int(job["size"]),) * plan.spatial_dims, generator=g)
    if plan.is_segmentation:
        y = (x > 0.5).float()
    else:
        y = torch.arange(batch) % plan.data.num_classes
    x, y = x.to(device), y.to(device)
    optimizer = make_optimizer(plan, model.parameters())
    loss_fn = make_loss(plan)
    if mode is not None:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        engine = PrivacyEngine(accountant="rdp")
        loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
        common = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
                      max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if mode == "ghost":
                model, optimizer, loss_fn, _ = engine.make_private(criterion=_per_sample_loss_class()(loss_fn), **common)
            else:
                model, optimizer, _ = engine.make_private(**common)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step, model


def _finite(model, loss_value: float) -> bool:
    import torch

    return all(torch.isfinite(p).all() for p in model.parameters()) and loss_value == loss_value


def _timed(step, torch, cuda: bool) -> tuple[float, float]:
    """(seconds, loss) of one step; on CUDA the clock waits for the device's queued work."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_value = step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss_value


def measure_case(job: dict[str, Any]) -> dict[str, Any]:
    """Build, make private (unless ``mode`` is None), run ``WARMUP + repeats`` steps; time and memory.

    ``job``: network, plan (a plan dict), size, batch, mode (None: non-private), repeats, device, threads.
    Returns ``{"seconds", "peak_mib", "extra_mib"}`` or ``{"skipped": reason}``.
    """
    torch, device, cuda, memory_now, memory_peak = _child_setup(job)
    before = memory_now()
    try:
        step, model = _build_step(job, job["mode"], device)
        times = []
        for _ in range(WARMUP + int(job["repeats"])):
            seconds, loss_value = _timed(step, torch, cuda)
            times.append(seconds)
        if not _finite(model, loss_value):
            return {"skipped": "non-finite weights or loss after the steps"}
    except Exception as exc:  # a mode that does not work for this network: reported, not raised
        return {"skipped": _first_line(exc)}
    peak = memory_peak()
    return {"seconds": statistics.median(times[WARMUP:]), "peak_mib": peak, "extra_mib": peak - before}


def measure_interleaved(job: dict[str, Any]) -> dict[str, Any]:
    """Step times of the non-private case and every DP mode of ``job["modes"]``, measured in turn.

    One process builds every case, then runs ``WARMUP + repeats`` rounds; each round times one step of
    every case, in an order rotated by one each round. On a shared machine a change of load then hits
    every case alike instead of whichever case ran at that moment, so the ratios hold better than those
    of cases timed one after the other. Returns ``{case: {"seconds": median} or {"skipped": reason}}``
    with the case ``"non-private"`` or the mode's name.
    """
    torch, device, cuda, _now, _peak = _child_setup(job)
    steps: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for mode in [None, *job["modes"]]:
        name = "non-private" if mode is None else mode
        try:
            steps[name] = _build_step(job, mode, device)
        except Exception as exc:
            out[name] = {"skipped": _first_line(exc)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(WARMUP + int(job["repeats"])):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name in out:
                continue
            step, model = steps[name]
            try:
                seconds, loss_value = _timed(step, torch, cuda)
                times[name].append(seconds)
            except Exception as exc:
                out[name] = {"skipped": _first_line(exc)}
                continue
            if r == WARMUP + int(job["repeats"]) - 1 and not _finite(model, loss_value):
                out[name] = {"skipped": "non-finite weights or loss after the steps"}
    for name in names:
        if name not in out:
            out[name] = {"seconds": statistics.median(times[name][WARMUP:])}
    return out


def _child_main() -> None:
    """Entry of the child process: one job as JSON on stdin, one result line on stdout."""
    job = json.loads(sys.stdin.read())
    result = measure_interleaved(job) if job.get("interleaved") else measure_case(job)
    sys.stdout.write(_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _run_isolated(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if job["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(job["threads"])
    code = "from pipelines.dp_bench import _child_main; _child_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(_ROOT))
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    last = (proc.stderr.strip().splitlines() or [""])[-1][:120]
    killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
    return {"skipped": f"child exited with code {proc.returncode}{killed}: {last}".rstrip(": ")}


# --------------------------------------------------------------------------------------------- parent side


def _resolve_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device '{device}' is not known", fix="use auto, cpu or cuda")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ConfigError("--device cuda: no CUDA device is available on this machine", fix="use --device auto or cpu")
    if device == "auto":
        return "cuda" if available else "cpu"
    return device


def _check_networks(networks: list[str] | None) -> list[str]:
    if networks is None:
        return ["UNet", *[n for n in NETWORKS if n != "UNet"]]
    if not networks:
        raise ConfigError("no network named", fix=f"name some of: {', '.join(NETWORKS)}")
    for name in networks:
        if name not in NETWORKS:
            raise ConfigError(f"'{name}' is not an allow-listed network", fix=f"use some of: {', '.join(NETWORKS)}")
    return list(dict.fromkeys(networks))


def _sig(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def _row(case: str, metric: str, value: float | None, baseline: str | None = None,
         base_value: float | None = None) -> dict[str, Any]:
    ratio = None
    if baseline is not None and value is not None and base_value:
        ratio = _sig(value / base_value)
    if ratio is None:
        baseline = None  # DESIGN.md: a row without a ratio names no baseline
    return {"case": case, "metric": metric, "value": _sig(value), "baseline": baseline, "ratio": ratio}


def _machine(device: str) -> dict[str, Any]:
    import monai
    import opacus
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine() or "cpu")
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "opacus": opacus.__version__, "monai": monai.__version__, "device": device, "device_name": name}


def run_dp_bench(
    *,
    networks: list[str] | None,
    batch_sizes: list[int],
    repeats: int,
    device: str,
    progress: bool,
    modes: list[str] | None = None,
    size: int | None = None,
    network_args: dict[str, dict[str, Any]] | None = None,
    threads: int = THREADS,
    isolate: bool = True,
    timeout_s: float = CASE_TIMEOUT_S,
) -> dict[str, Any]:
    """Measure DP and non-DP steps; returns ``{"bench": "dp", "params", "machine", "rows"}``.

    Args:
        networks: allow-listed network names (None: all, UNet first).
        batch_sizes: batch sizes to measure, each >= 1.
        repeats: timed steps per case (the median is quoted), after ``WARMUP`` warm-up steps.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        progress: one line per finished case on stderr.
        modes: Opacus grad-sample modes to try (default: all of :data:`MODES`).
        size: spatial input size for every network instead of :data:`BENCH_PLANS`' (tests, exploration).
        network_args: per network, constructor arguments instead of :data:`BENCH_PLANS`' (tests).
        threads: torch threads on CPU.
        isolate: run each case in a fresh child process (memory from the OS, failures isolated). False runs
            the cases in this process (tests only): the memory rows are then not meaningful and are None.
        timeout_s: a case running longer is reported skipped.
    """
    names = _check_networks(networks)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes {batch_sizes} must be whole numbers >= 1", fix="e.g. --batch-sizes 8,16,32")
    if repeats < 1:
        raise ConfigError(f"repeats {repeats} is too small", fix="use 1 or more")
    modes = list(MODES) if modes is None else list(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"Opacus mode(s) {unknown or modes} not known", fix=f"use some of: {', '.join(MODES)}")
    if size is not None and size < 8:
        raise ConfigError(f"input size {size} is too small", fix="use 8 or more")
    dev = _resolve_device(device)
    memory_metrics = (("peak allocated MiB", "peak_mib"), ("peak extra allocated MiB", "extra_mib")) if dev == "cuda" \
        else (("peak RSS MiB", "peak_mib"), ("peak extra RSS MiB", "extra_mib"))

    plans, shapes, used_args = {}, {}, {}
    for name in names:
        spec = dict(BENCH_PLANS[name])
        if network_args and name in network_args:
            spec["args"] = network_args[name]
        spec_size = size if size is not None else spec["size"]
        plans[name] = (_plan_dict(name, spec), spec_size)
        dims = 3 if spec["task"].endswith("3d") else 2
        shapes[name] = [1, *(spec_size,) * dims]
        used_args[name] = {"task": spec["task"], **spec["args"], "loss": spec["loss"], "optimizer": spec["optimizer"]}

    rows: list[dict[str, Any]] = []
    mode_ratios: dict[str, dict[str, list[float | None]]] = {}
    for name in names:
        plan, spec_size = plans[name]
        mode_ratios[name] = {m: [] for m in modes}
        for batch in batch_sizes:
            base_case = f"{name} b={batch} non-private"
            job = {"network": name, "plan": plan, "size": spec_size, "batch": batch, "modes": modes,
                   "repeats": repeats, "device": dev, "threads": threads, "interleaved": True}
            timing = _run_isolated(job, timeout_s) if isolate else measure_interleaved(job)
            if "skipped" in timing:  # the whole timing process failed (crash, timeout)
                timing = {m: timing for m in ["non-private", *modes]}
            base: dict[str, Any] = {}
            for mode in [None, *modes]:
                case = base_case if mode is None else f"{name} b={batch} {mode}"
                # Memory: a fresh process per case (a few steps: the peak is reached at the first).
                mem_job = {"network": name, "plan": plan, "size": spec_size, "batch": batch, "mode": mode,
                           "repeats": 1, "device": dev, "threads": threads}
                result = dict(timing["non-private" if mode is None else mode])
                if "skipped" not in result:
                    memory = _run_isolated(mem_job, timeout_s) if isolate else {"peak_mib": None, "extra_mib": None}
                    if "skipped" in memory:
                        result = memory
                    else:
                        result.update(peak_mib=memory["peak_mib"], extra_mib=memory["extra_mib"])
                if mode is None:
                    base = result
                if "skipped" in result:
                    rows.append({"case": case, "metric": f"skipped: {result['skipped']}", "value": None,
                                 "baseline": None, "ratio": None})
                    if mode is not None:
                        mode_ratios[name][mode].append(None)
                    if progress:
                        print(f"dp bench: {case}: skipped ({result['skipped']})", file=sys.stderr, flush=True)
                    continue
                baseline = None if mode is None else base_case
                rows.append(_row(case, "step seconds", result["seconds"], baseline, base.get("seconds")))
                for metric, key in memory_metrics:
                    rows.append(_row(case, metric, result[key], baseline, base.get(key)))
                if mode is not None:
                    ok = base.get("seconds")
                    mode_ratios[name][mode].append(result["seconds"] / ok if ok else None)
                if progress:
                    extra = "" if result["extra_mib"] is None else f", +{result['extra_mib']:.0f} MiB peak"
                    print(f"dp bench: {case}: {result['seconds']:.3f} s/step{extra}", file=sys.stderr, flush=True)
        chosen = NETWORKS[name].grad_sample_mode
        working = {m: statistics.mean(r) for m, r in mode_ratios[name].items() if r and all(v is not None for v in r)}
        if working:
            fastest = min(working, key=working.get)
            same = "the same as" if fastest == chosen else "differs from"
            rows.append({"case": f"{name} fastest DP mode: {fastest} ({same} networks.py's {chosen})",
                         "metric": "mean step-time ratio DP / non-private", "value": _sig(working[fastest]),
                         "baseline": None, "ratio": None})
            if fastest != chosen and chosen in working:
                rows.append({"case": f"{name} networks.py's mode: {chosen}", "metric": "mean step-time ratio DP / non-private",
                             "value": _sig(working[chosen]), "baseline": None, "ratio": None})
        else:
            rows.append({"case": f"{name} fastest DP mode: none of {', '.join(modes)} worked", "metric": "skipped: see the rows above",
                         "value": None, "baseline": None, "ratio": None})

    params = {
        "networks": names, "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": WARMUP, "device": dev,
        "modes": modes, "input_shapes": shapes, "networks_args": used_args, "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM, "poisson_sampling": False, "threads": threads if dev == "cpu" else None,
        "isolated": isolate,
        "timing": ("interleaved: one process builds the non-private case and every mode, then times one step of each "
                   "in turn (order rotated each round), median of the repeats per case"),
        "memory": ("peak RSS of a fresh process per case (getrusage); extra = over the imports" if dev == "cpu"
                   else "torch.cuda.max_memory_allocated per fresh process; extra = over the allocation before the model"),
    }
    return {"bench": BENCH, "params": params, "machine": _machine(dev), "rows": rows}
