"""``fedsilo demo``: three synthetic hospitals, a real TLS federation, and a pooled baseline.

1. Write synthetic hospitals (DICOM series + NIfTI labels, non-IID) and a site folder each.
2. Start a SuperLink (TLS, SuperNode authentication) and one SuperNode per silo on loopback.
3. Run the plan through Flower, printing one row per round.
4. Train the same plan pooled (all training cases in one place, no DP, same epochs).
5. Stop every process; leave model, plan, metrics, audit logs and site folders in the run folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedsilo.errors import ConfigError

DEMO_MARKER = ".fedsilo-demo"
DATASET = "synthetic"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLAN = REPO_ROOT / "configs" / "plans" / "seg3d-unet-dp.yaml"


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    plan: Path = DEFAULT_PLAN
    silos: int = 3
    sizes: tuple[int, ...] | None = None
    seed: int = 0
    rounds: int | None = None
    baseline: bool = True
    port: int = 0
    engine: str = "deployment"  # or "simulation" (Flower's simulation engine, optional extra)


def prepare_run_folder(out: Path) -> None:
    """Refuse to write into a folder that holds anything but an earlier demo run."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise ConfigError(f"{out} exists and is not an earlier demo run", fix="choose an empty or new folder for --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("fedsilo demo run folder; `fedsilo demo` may replace it\n", encoding="utf-8")


def make_sites(out: Path, plan_task: str, *, silos: int, sizes: tuple[int, ...] | None, seed: int, say: Callable[[str], None]) -> list[Any]:
    """Synthetic hospitals under out/data and a registered site folder each under out/sites."""
    from pipelines.synthetic import write_synthetic_federation
    from silo_agent.site import init_site, register_dataset

    start = time.perf_counter()
    written = write_synthetic_federation(out / "data", silos=silos, task=plan_task, seed=seed, sizes=sizes, progress=_bar("synthetic cases", say))
    n_cases = sum(s.n_train + s.n_test for s in written)
    say(f"wrote {len(written)} synthetic hospitals ({n_cases} cases as DICOM series + NIfTI labels) in {time.perf_counter() - start:.1f} s")
    sites = []
    start = time.perf_counter()
    for silo in written:
        site = init_site(out / "sites" / silo.name, silo.name)
        # The real registration: every series scanned and checked, keyed case ids, content hashes (silo_agent.registry).
        sites.append(register_dataset(site, DATASET, task=plan_task, datalist=silo.datalist))
    say(f"registered {n_cases} cases at {len(sites)} sites (headers scanned, geometry and labels checked) in {time.perf_counter() - start:.1f} s")
    return sites


def _bar(what: str, say: Callable[[str], None]) -> Callable[[int, int], None]:
    state = {"last": -1}

    def progress(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct // 25 != state["last"] // 25 or done == total:
            state["last"] = pct
            say(f"  {what}: {done}/{total} ({pct}%)")

    return progress


def pooled_baseline(sites: list[Any], plan, *, say: Callable[[str], None]) -> dict[str, float]:
    """Train the plan on all silos' training cases in one place, without DP, for the same epochs.

    Returns Dice (or accuracy) per site on each site's held-out cases.
    """
    import numpy as np

    from pipelines.dataset import CaseArrays, apply_transforms, load_split
    from pipelines.metrics import evaluate
    from pipelines.networks import build_network
    from pipelines.training import train_local
    from pipelines.transforms import split_transforms

    deterministic, random = split_transforms(plan.data.transforms, segmentation=plan.is_segmentation)

    def load(site, split):
        entry = site.dataset(plan.data.dataset)
        arrays = load_split(entry.datalist, split, task=plan.task, num_classes=plan.data.num_classes, cache_dir=site.cache_dir)
        return apply_transforms(arrays, deterministic, segmentation=plan.is_segmentation)

    parts = [load(site, "training") for site in sites]
    pooled = CaseArrays(images=np.concatenate([p.images for p in parts]), labels=np.concatenate([p.labels for p in parts]))
    model = build_network(plan, seed=plan.training.seed)
    epochs = plan.federation.rounds * plan.training.local_epochs
    start = time.perf_counter()
    train_local(model, pooled, plan, epochs=epochs, private=False, random_transform=random, seed=plan.training.seed)
    metric = "dice" if plan.is_segmentation else "accuracy"
    scores = {site.site_id: evaluate(model, load(site, "test"), plan)[metric] for site in sites}
    say(f"pooled baseline: {len(pooled)} cases, {epochs} epochs, no DP, {time.perf_counter() - start:.1f} s")
    return scores


def run_demo(opts: DemoOptions, *, stream: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the whole demo and return metrics.json's content."""
    from coordinator.progress import RoundTable
    from fedsilo.local_federation import LocalFederation, SiloSpec
    from fedsilo.local_simulation import LocalSimulation
    from pipelines.plan import load_plan, parse_plan

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    t0 = time.perf_counter()
    plan = load_plan(opts.plan)
    if opts.rounds is not None:
        raw = plan.to_dict()
        raw["federation"]["rounds"] = opts.rounds
        plan = parse_plan(raw)
    if plan.data.dataset != DATASET:
        raise ConfigError(f"the demo registers dataset '{DATASET}', the plan trains on '{plan.data.dataset}'", fix=f"set data.dataset: {DATASET} in the plan")
    if opts.silos < plan.federation.min_silos:
        raise ConfigError(f"--silos {opts.silos} is below the plan's min_silos {plan.federation.min_silos}", fix=f"use --silos {plan.federation.min_silos} or more")
    from fedsilo.processes import port_in_use

    if opts.port and port_in_use(opts.port):
        raise ConfigError(f"port {opts.port} is already in use", fix="choose another --port, or leave it out to use a free one")
    out = opts.out.resolve()
    prepare_run_folder(out)
    plan_path = out / "plan.yaml"
    plan_path.write_text(plan.to_yaml(), encoding="utf-8")
    say(f"fedsilo demo: plan '{plan.name}' ({plan.hash()[:12]}), {opts.silos} silos, {plan.federation.rounds} rounds, run folder {out}")
    sites = make_sites(out, plan.task, silos=opts.silos, sizes=opts.sizes, seed=opts.seed, say=say)
    bundle = sign_and_approve(out, plan_path, sites)
    say(f"plan signed by demo-researcher and approved at each site by its demo-officer ({bundle.name})")
    metric = "dice" if plan.is_segmentation else "accuracy"
    silos = [SiloSpec(site=s.site_id, site_dir=s.root) for s in sites]
    if opts.engine == "simulation":
        say("starting Flower's simulation engine (one SuperLink, virtual SuperNodes; no network, so no TLS) ...")
        runtime = LocalSimulation(out, silos, port=opts.port)
    else:
        say("starting SuperLink (TLS, SuperNode authentication) and one SuperNode per silo on 127.0.0.1 ...")
        runtime = LocalFederation(out, silos, superlink_port=opts.port)
    with runtime as federation:
        say(f"federation up on 127.0.0.1:{federation.port}; training with DP-SGD (target epsilon {plan.privacy.target_epsilon}, delta {plan.privacy.target_delta})")
        table = RoundTable(metric, stream, sites=[s.site_id for s in sites])
        federation.run_plan(bundle, out, on_evaluated=table.row)  # each round once its evaluation is in
    say("all federation processes stopped")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    if opts.baseline:
        baseline = pooled_baseline(sites, plan, say=say)
        metrics[f"baseline_pooled_{metric}"] = sum(baseline.values()) / len(baseline)
        metrics[f"baseline_pooled_{metric}_per_site"] = baseline
    metrics["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _summary(metrics, metric, say)
    say(f"verify the audit trail: {verify_hint(out, sites)}")
    return metrics


def sign_plan(out: Path, plan_path: Path, *, researcher: str = "demo-researcher") -> Path:
    """Sign the plan as a researcher would ('fedsilo plan sign'), with a key under out/pki/researcher; returns the bundle."""
    from compliance.keys import generate_signer, load_signer
    from compliance.records import utc_now
    from compliance.statements import sign_submission
    from pipelines.plan import load_plan

    plan = load_plan(plan_path)
    keys = out / "pki" / "researcher"
    signer = load_signer(keys, researcher) if (keys / f"{researcher}.key").exists() else generate_signer(keys, researcher, role="person")
    bundle = sign_submission(plan_path.read_text(encoding="utf-8"), plan.hash(), plan.name, signer, utc_now())
    # Beside the plan when it lies in the run folder (each plan its own bundle); never beside a plan elsewhere (the repository's).
    inside = plan_path.resolve().is_relative_to(out.resolve())
    bundle_path = (plan_path.parent if inside else out) / (plan_path.stem + ".submission.json")
    bundle_path.write_text(bundle.to_json(), encoding="utf-8")
    return bundle_path


def approve_at_sites(bundle_path: Path, sites: list[Any], *, officer: str = "demo-officer") -> None:
    """An officer at each site imports the bundle and approves it ('fedsilo silo plan import|approve')."""
    from silo_agent.approvals import add_officer, decide, import_bundle, officers_dir

    for site in sites:
        if not (officers_dir(site) / f"{officer}.vkey").exists():
            add_officer(site, officer)
        decide(site, import_bundle(site, bundle_path), officer=officer, decision="approved")


def sign_and_approve(out: Path, plan_path: Path, sites: list[Any]) -> Path:
    """Do what the people of a real federation do, with their real tools: the researcher signs the plan and an
    officer at each site approves it. Returns the submission bundle to run. Only the demo and tests approve
    for the sites; a real site's officer decides with 'fedsilo silo plan approve'.
    """
    bundle = sign_plan(out, plan_path)
    approve_at_sites(bundle, sites)
    return bundle


def _summary(metrics: dict[str, Any], metric: str, say: Callable[[str], None]) -> None:
    final = metrics.get("final", {})
    per_site = final.get(f"{metric}_per_site", {})
    eps = final.get("epsilon_per_site", {})
    baseline = metrics.get(f"baseline_pooled_{metric}_per_site", {})
    personal = final.get(f"personalized_{metric}_per_site", {})  # training.personalize: each site's own model
    head = f"  {'personalized':>12}" if personal else ""
    say("")
    say(f"{'site':>12}  {'federated+DP ' + metric:>20}{head}  {'epsilon':>8}  {'pooled, no DP ' + metric:>21}")
    for site in sorted(per_site):
        base = baseline.get(site)
        own = f"  {'-' if site not in personal else format(personal[site], '.3f'):>12}" if personal else ""
        say(f"{site:>12}  {per_site[site]:>20.3f}{own}  {eps.get(site, 0.0):>8.2f}  {'-' if base is None else format(base, '.3f'):>21}")
    mean = final.get(f"{metric}_mean")
    base_mean = metrics.get(f"baseline_pooled_{metric}")
    own_mean = f"  {final.get(f'personalized_{metric}_mean', float('nan')):>12.3f}" if personal else ""
    say(f"{'mean':>12}  {mean if mean is not None else float('nan'):>20.3f}{own_mean}  {max(eps.values(), default=0.0):>8.2f}  "
        f"{'-' if base_mean is None else format(base_mean, '.3f'):>21}")
    say(f"done in {metrics['seconds_total']:.0f} s")


def verify_hint(out: Path, sites: list[Any]) -> str:
    """The command a compliance officer runs to check this run's audit trail."""
    witnesses = " ".join(f"--witness {s.audit_dir}" for s in sites)
    return f"fedsilo audit verify {out / 'audit'} --keys {out / 'pki' / 'audit-trust'} {witnesses}"
