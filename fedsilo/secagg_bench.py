"""Round time and uplink bytes of SecAgg+ against a plain round, on the same federation.

Used by ``fedsilo bench comm --federation``. One real TLS deployment on loopback
(:class:`fedsilo.local_federation.LocalFederation`: a SuperLink and one authenticated SuperNode per
silo) runs the same plan twice: first as written with plain FedAvg (the baseline), then with
``federation.secure_aggregation: secagg+``. Both plans clip each update to the same L2 norm (the plain
run at the coordinator, the secure one at each silo before masking), so the silos do the same work. Per round: the wall time (training, the protocol's stages, evaluation) and the
serialized bytes of every train-phase reply the coordinator received (all four SecAgg+ stages in the
secure run); the median over rounds is quoted. Goals (issue 9): at most 2x the time, at most 1.1x the
uplink bytes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

#: The demo plan's updates have L2 norms of about 60 to 90: a bound above them leaves the work unchanged.
DEFAULT_BOUND = 100.0


def _plan_variants(plan_path: Path, root: Path, rounds: int, silos: int) -> dict[str, Path]:
    from pipelines.plan import load_plan, parse_plan

    raw = load_plan(plan_path).to_dict()
    fed = raw["federation"]
    fed.update({"rounds": rounds, "min_silos": min(max(3, fed["min_silos"]), silos), "aggregation": {"rule": "fedavg", "args": {}},
                "update_norm_bound": fed.get("update_norm_bound") or DEFAULT_BOUND, "update_norm_action": "clip"})
    paths = {}
    for case, secure in (("plain", "none"), ("secagg+", "secagg+")):
        variant = {**raw, "name": f"{raw['name']}-{'secagg' if secure != 'none' else 'plain'}", "federation": {**fed, "secure_aggregation": secure}}
        path = root / f"plan-{case.rstrip('+')}.yaml"
        path.write_text(parse_plan(variant).to_yaml(), encoding="utf-8")
        paths[case] = path
    return paths


def _warm_caches(sites, plan) -> None:
    """Decode every silo's registered cases into its preprocessing cache, as its first round would: neither
    run pays the first DICOM decode inside a timed round."""
    from pipelines.dataset import load_cases
    from silo_agent.registry import load_registry

    for site in sites:
        entry = site.dataset(plan.data.dataset)
        registry = load_registry(entry.registry)
        for split in ("training", "test"):
            load_cases(registry.case_sources(split), task=plan.task, num_classes=plan.data.num_classes, cache_dir=site.cache_dir)


def secure_round_rows(*, plan_path: Path, silos: int = 3, rounds: int = 3, cases: int | None = None, root: Path,
                      say=lambda text: None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, per-round figures): ``round_seconds`` and ``uplink_bytes_per_round`` for plain and secagg+."""
    from fedsilo.demo import make_sites, sign_and_approve
    from fedsilo.errors import ConfigError
    from fedsilo.local_federation import LocalFederation, SiloSpec
    from pipelines.plan import load_plan

    if silos < 3:
        raise ConfigError(f"--silos {silos}: secure aggregation needs at least 3 silos", fix="use --silos 3 or more")
    root.mkdir(parents=True, exist_ok=True)
    plans = _plan_variants(plan_path, root, rounds, silos)
    sizes = tuple([cases] * silos) if cases else None
    sites = make_sites(root, load_plan(plans["plain"]).task, silos=silos, sizes=sizes, seed=0, say=lambda text: None)
    bundles = {case: sign_and_approve(root, path, sites) for case, path in plans.items()}
    say("  decoding the silos' data into their caches (untimed)")
    _warm_caches(sites, load_plan(plans["plain"]))
    per_round: dict[str, list[dict[str, float]]] = {}
    started = time.perf_counter()
    with LocalFederation(root, [SiloSpec(s.site_id, s.root) for s in sites]) as federation:
        say(f"  federation of {silos} silos up in {time.perf_counter() - started:.1f} s")
        for case, bundle in bundles.items():
            rows: list[dict[str, Any]] = []
            federation.run_plan(bundle, root / f"run-{case.rstrip('+')}", on_round=rows.append)
            per_round[case] = [{"seconds": float(r["seconds"]), "uplink_bytes": float(r.get("uplink_bytes") or 0)} for r in rows]
            for i, r in enumerate(per_round[case], 1):
                say(f"  {case}: round {i}: {r['seconds']:.1f} s, {r['uplink_bytes'] / 1e6:.2f} MB up")
    out = []
    for metric, key in (("round_seconds", "seconds"), ("uplink_bytes_per_round", "uplink_bytes")):
        base = statistics.median(r[key] for r in per_round["plain"])
        for case in ("plain", "secagg+"):
            value = statistics.median(r[key] for r in per_round[case])
            out.append({"case": f"federation {case}", "metric": metric, "value": round(value, 3),
                        "baseline": None if case == "plain" else "federation plain",
                        "ratio": None if case == "plain" or not base else round(value / base, 3)})
    return out, {"silos": silos, "rounds": rounds, "plan": plan_path.name, "per_round": per_round}
