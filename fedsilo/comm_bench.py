"""``fedsilo bench comm``: what each update-compression mode saves on the wire, and what it costs in time.

For each model and each mode of :mod:`pipelines.compression` (float32, float16, int8, topk), one silo update is
compressed as a silo would and decoded as the coordinator would, and the bench reports:

- ``wire_bytes_per_update``: the bytes Flower 1.42 transfers for the update's ``ArrayRecord``. In 1.42 a message
  travels as *inflatable objects* pushed one by one to the SuperLink (``flwr.supercore.inflatable``). fedsilo packs
  every array of an update into one safetensors blob (:mod:`fedsilo.wire`), so the record is the ArrayRecord (its
  name -> object-id map), one ``Array`` (dtype, shape, chunk ids) and its ``ArrayChunk`` objects (the blob in
  chunks of 5 MB), deduplicated by object id. The figure is the sum of ``len(obj.deflate())`` over
  ``get_all_nested_objects(fedsilo.wire.pack(payload))``: exactly the object contents a SuperNode pushes,
  without the gRPC/HTTP framing around each push and without the rest of the message (metrics, config);
- ``wire_objects_per_update``: how many objects that is (each is one push request);
- ``payload_bytes_per_update``: the arrays' raw data bytes (:func:`pipelines.compression.payload_nbytes`), the
  floor that framing (the safetensors header, about 80 bytes per array, and the objects' headers) adds to;
- ``compress_seconds`` / ``decompress_seconds``: :func:`~pipelines.compression.compress` at the silo (topk: in
  the steady state, with the error-feedback residual of a previous round) and
  :func:`~pipelines.compression.decompress` at the coordinator with every payload check, median of ``repeats``;
- ``relative_l2_error``: ``||decoded - delta|| / ||delta||`` over the floating tensors for one round (topk:
  without memory, so what one round alone loses; error feedback sends the rest in later rounds).

Ratios are against float32 of the same model, measured in the same run.

Models: ``demo``, the network of ``configs/plans/seg3d-unet-dp.yaml`` (MONAI UNet 3D, channels 8/16/32), whose
update is the real delta of one round of the plan's DP-SGD local training (:func:`pipelines.training.train_local`,
the plan's 4 local epochs at its noise multiplier) on 40 synthetic 32^3 volumes; ``30M``, the same MONAI UNet
3D scaled up (channels 40/80/160/320/640, strides 2/2/2/2, 2 residual units per block), whose update is
Gaussian with a per-tensor scale (1% of the RMS of that tensor's initial weights; 1e-3 for an all-zero or
all-one tensor such as a bias or a PReLU slope): the sizes and most timings do not depend on the values.

``--federation`` adds the rows of :func:`_secure_round_rows`: round time and uplink bytes of SecAgg+ against plain
FedAvg on the same real federation (:mod:`fedsilo.secagg_bench`).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.errors import ConfigError
from pipelines.compression import MODES

BENCH = "comm"
MODELS = ("demo", "30M")
DEMO_PLAN = Path(__file__).resolve().parent.parent / "configs" / "plans" / "seg3d-unet-dp.yaml"
DEMO_CASES = 40
LARGE_ARGS = {"channels": [40, 80, 160, 320, 640], "strides": [2, 2, 2, 2], "num_res_units": 2}


def add_bench_command(bsub) -> None:
    """``fedsilo bench comm`` (registered by fedsilo.bench_cli.BENCH_MODULES)."""
    p = bsub.add_parser("comm", help="update compression: bytes on the wire and compress/decompress time per mode, "
                                     "against float32")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)} (default both)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (default all)")
    p.add_argument("--repeats", type=int, default=5, help="timed compress/decompress calls per case (median quoted; default 5)")
    p.add_argument("--topk-fraction", type=float, default=0.01, help="share of entries topk sends (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--federation", action="store_true",
                   help="also time federated rounds with and without secure aggregation (slow; real SuperLink)")
    p.add_argument("--silos", type=int, default=3, help="--federation: number of silos (default 3, at least 3)")
    p.add_argument("--rounds", type=int, default=3, help="--federation: rounds per mode; each round is one repetition (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_handler)


def _names(text: str, what: str, allowed: tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ConfigError(f"--{what}: unknown {what[:-1]}(s) {', '.join(unknown) or '(none given)'}",
                          fix=f"use some of: {', '.join(allowed)}")
    return names


def _handler(args) -> int:
    from fedsilo.bench_report import print_result

    models = _names(args.models, "models", MODELS)
    modes = _names(args.modes, "modes", MODES)
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} is too small", fix="use 1 or more")
    if not 0 < args.topk_fraction <= 1:
        raise ConfigError(f"--topk-fraction {args.topk_fraction} must be in (0, 1]", fix="e.g. --topk-fraction 0.01")
    if args.federation and (args.silos < 3 or args.rounds < 1):
        raise ConfigError(f"--silos {args.silos} --rounds {args.rounds}: secure aggregation needs 3 or more silos and 1 or more rounds",
                          fix="e.g. --silos 3 --rounds 3")
    result = run_comm_bench(models=models, modes=modes, repeats=args.repeats, topk_fraction=args.topk_fraction,
                            seed=args.seed, say=lambda text: print(text, file=sys.stderr, flush=True))
    if args.federation:
        rows, params = _secure_round_rows(args)
        result["rows"].extend(rows)
        result["params"]["federation"] = params
    print_result(result, as_json=args.json)
    return 0


# ------------------------------------------------------------------------------------------ models


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _demo_update(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(reference weights, delta, description): one round of the demo plan's DP-SGD on synthetic volumes."""
    import warnings

    import torch
    from monai.data.synthetic import create_test_image_3d

    from pipelines.dataset import CaseArrays, apply_transforms
    from pipelines.networks import build_network
    from pipelines.plan import load_plan
    from pipelines.training import plan_noise_multiplier, train_local
    from pipelines.transforms import split_transforms

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    plan = load_plan(DEMO_PLAN)
    rs = np.random.RandomState(seed)
    size = 32
    images, labels = [], []
    for _ in range(DEMO_CASES):
        image, mask = create_test_image_3d(size, size, size, num_objs=4, rad_max=8, rad_min=4, noise_max=0.4,
                                           random_state=rs)
        images.append(image[None].astype(np.float32))
        labels.append((mask[None] > 0).astype(np.float32))
    data = CaseArrays(np.stack(images), np.stack(labels))
    deterministic, _ = split_transforms(plan.data.transforms, segmentation=True)
    data = apply_transforms(data, deterministic, segmentation=True)
    model = build_network(plan, seed=seed)
    reference = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus' full-backward-hook notice
        result = train_local(model, data, plan, seed=seed, noise_multiplier=plan_noise_multiplier(plan, len(data)))
    local = {k: v.detach().cpu().numpy() for k, v in result.state_dict.items()}
    delta = {k: (local[k] - reference[k]) if np.issubdtype(reference[k].dtype, np.floating) else local[k].copy()
             for k in reference}
    described = {
        "plan": DEMO_PLAN.name, "network": f"UNet 3D {plan.model.args}",
        "params": int(sum(a.size for a in reference.values())), "tensors": len(reference),
        "delta": f"one round of the plan's DP-SGD (train_local: {plan.training.local_epochs} local epochs, "
                 f"batch {plan.training.batch_size}, epsilon {plan.privacy.target_epsilon} over "
                 f"{plan.federation.rounds} rounds, noise multiplier {result.privacy.noise_multiplier:.3f}) on "
                 f"{DEMO_CASES} synthetic {size}^3 volumes (create_test_image_3d)" if result.privacy else
                 "one round of the plan's local training",
    }
    return reference, delta, described


def _large_update(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(reference weights, delta, description): the demo's UNet scaled to about 30M parameters, Gaussian delta."""
    import torch

    from pipelines.networks import build_network
    from pipelines.plan import parse_plan

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    plan = parse_plan({"name": "bench-comm-30m", "task": "seg3d", "model": {"network": "UNet", "args": LARGE_ARGS},
                       "privacy": {"enabled": False}})
    reference = _state(build_network(plan, seed=seed))
    rng = np.random.default_rng(seed)
    delta: dict[str, np.ndarray] = {}
    for name, w in reference.items():
        if not np.issubdtype(w.dtype, np.floating):
            delta[name] = w.copy()
            continue
        rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) if w.size else 0.0
        constant = w.size == 0 or float(np.ptp(w)) == 0.0
        sd = 1e-3 if constant or rms == 0 else 0.01 * rms
        delta[name] = (rng.standard_normal(w.shape, dtype=np.float32) * np.float32(sd)).astype(w.dtype)
    described = {
        "network": f"MONAI UNet 3D {LARGE_ARGS} (in 1, out 2 channels)",
        "params": int(sum(a.size for a in reference.values())), "tensors": len(reference),
        "delta": "Gaussian, per tensor sd = 1% of the RMS of the tensor's initial weights (1e-3 for a constant tensor)",
    }
    return reference, delta, described


BUILDERS: dict[str, Callable[[int], tuple[dict, dict, dict]]] = {"demo": _demo_update, "30M": _large_update}


# ------------------------------------------------------------------------------------------ measures


def wire_size(payload: dict[str, np.ndarray]) -> tuple[int, int]:
    """(bytes, objects) Flower 1.42 pushes for the payload packed as fedsilo sends it (fedsilo.wire: one safetensors
    Array): the deflated content of every object of the record's tree (ArrayRecord, Array, ArrayChunks), each
    object id once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedsilo.wire import pack

    record = pack(payload)
    objects = get_all_nested_objects(record)
    return sum(len(obj.deflate()) for obj in objects.values()), len(objects)


def _relative_error(decoded: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> float:
    num = den = 0.0
    for name, d in delta.items():
        if np.issubdtype(d.dtype, np.floating):
            diff = decoded[name].astype(np.float64) - d
            num += float(np.sum(diff * diff))
            den += float(np.sum(np.square(d, dtype=np.float64)))
    return math.sqrt(num / den) if den else 0.0


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_mode(reference: dict[str, np.ndarray], delta: dict[str, np.ndarray], mode: str, *, repeats: int,
                 topk_fraction: float, seed: int) -> dict[str, float]:
    """Every figure of one (model, mode): sizes, median times, one-round error."""
    from pipelines.compression import compress, decompress, payload_nbytes

    rng = np.random.default_rng(seed)
    payload, residual = compress(delta, mode, topk_fraction=topk_fraction, rng=rng)
    decoded = decompress(payload, reference, mode, topk_fraction=topk_fraction)
    error = _relative_error(decoded, delta)
    wire, objects = wire_size(payload)
    # Steady state: topk compresses delta + the residual a previous round left (the others ignore it).
    compress_s = _median_seconds(lambda: compress(delta, mode, topk_fraction=topk_fraction, residual=residual, rng=rng),
                                 repeats)
    decompress_s = _median_seconds(lambda: decompress(payload, reference, mode, topk_fraction=topk_fraction), repeats)
    return {"wire_bytes_per_update": wire, "wire_objects_per_update": objects,
            "payload_bytes_per_update": payload_nbytes(payload), "compress_seconds": compress_s,
            "decompress_seconds": decompress_s, "relative_l2_error": error}


RATIO_METRICS = ("wire_bytes_per_update", "wire_objects_per_update", "payload_bytes_per_update", "compress_seconds",
                 "decompress_seconds")


def _sig(value: float) -> float:
    return float(f"{float(value):.6g}")


def _row(case: str, metric: str, value: float, baseline: str | None, base_value: float | None) -> dict[str, Any]:
    """A row; counts exact, other values to 6 significant digits, the ratio (4 significant digits) from them."""
    exact = metric.startswith(("wire_", "payload_"))
    value = int(value) if exact else _sig(value)
    base_value = None if base_value is None else int(base_value) if exact else _sig(base_value)
    ratio = float(f"{value / base_value:.4g}") if baseline is not None and base_value else None
    return {"case": case, "metric": metric, "value": value, "baseline": baseline if ratio is not None else None,
            "ratio": ratio}


def run_comm_bench(*, models: list[str] | None = None, modes: list[str] | None = None, repeats: int = 5,
                   topk_fraction: float = 0.01, seed: int = 0, say: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Measure every (model, mode); returns ``{"bench": "comm", "params", "machine", "rows"}``."""
    import flwr
    import torch

    models = list(models or MODELS)
    modes = list(modes or MODES)
    measured = ["float32", *[m for m in modes if m != "float32"]]  # the baseline is always measured
    rows: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    for model in models:
        start = time.perf_counter()
        say(f"bench comm: {model}: building the model and its update"
            + (" (one round of DP-SGD local training, some seconds)" if model == "demo" else ""))
        reference, delta, described[model] = BUILDERS[model](seed)
        say(f"bench comm: {model}: {described[model]['params']:,} parameters in {described[model]['tensors']} tensors, "
            f"ready in {time.perf_counter() - start:.1f} s")
        figures: dict[str, dict[str, float]] = {}
        for mode in measured:
            start = time.perf_counter()
            figures[mode] = measure_mode(reference, delta, mode, repeats=repeats, topk_fraction=topk_fraction, seed=seed)
            f = figures[mode]
            say(f"bench comm: {model} {mode}: {f['wire_bytes_per_update']:,} bytes on the wire, compress "
                f"{f['compress_seconds'] * 1e3:.1f} ms, decompress {f['decompress_seconds'] * 1e3:.1f} ms "
                f"({time.perf_counter() - start:.1f} s)")
        base = figures["float32"]
        for mode in modes:
            case = f"{model} {mode}"
            baseline = None if mode == "float32" else f"{model} float32"
            for metric in (*RATIO_METRICS, "relative_l2_error"):
                ref = base[metric] if baseline and metric in RATIO_METRICS else None
                rows.append(_row(case, metric, figures[mode][metric], baseline if ref is not None else None, ref))
        del reference, delta
    params = {
        "models": described, "modes": modes, "repeats": repeats, "topk_fraction": topk_fraction, "seed": seed,
        "notes": {"wire": "sum of len(deflate()) of the Flower 1.42 objects pushed for fedsilo.wire.pack(payload) "
                "(ArrayRecord, one safetensors Array, ArrayChunks; each object id once); no gRPC/HTTP framing, no "
                "metrics or config",
        "timing": "median of repeats; topk compress with the error-feedback residual of a previous round; "
                  "decompress includes every payload check",
        "relative_l2_error": "||decoded - delta|| / ||delta|| over floating tensors, one round (topk without memory)"},
    }
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?", "torch": torch.__version__}
    return {"bench": BENCH, "params": params, "machine": machine, "rows": rows}


# ------------------------------------------------------------------------------- secure aggregation


def _secure_round_rows(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Round time and uplink bytes of a federation with SecAgg+ against the same federation without it
    (``--federation``; :mod:`fedsilo.secagg_bench`: real SuperLink and SuperNodes with TLS on loopback)."""
    import tempfile

    from fedsilo.round_bench import DEFAULT_PLAN
    from fedsilo.secagg_bench import secure_round_rows

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"bench comm: {args.silos} silos, {args.rounds} round(s) plain and {args.rounds} with secagg+ on one federation")
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-secagg-") as tmp:
        return secure_round_rows(plan_path=DEFAULT_PLAN, silos=args.silos, rounds=args.rounds, root=Path(tmp), say=say)


__all__ = ["BENCH", "MODELS", "add_bench_command", "measure_mode", "run_comm_bench", "wire_size"]
