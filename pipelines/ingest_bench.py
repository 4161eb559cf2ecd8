"""``fedsilo bench ingest``: how fast a site's DICOM is scanned and loaded, against plain pydicom in the same run.

Two measurements:

1. Header scan. ``files`` small DICOM slices (default 10,000: 32x32 CT slices, series of
   ``slices_per_series``) are generated once into a temporary folder from one template encoded by
   pydicom, with new UIDs and positions patched in at fixed offsets (fixed-width values, so every file
   is a valid DICOM file of the same length). Then, each ``repeats`` times, with a cold start of the
   code path but a warm page cache: our scan (``pipelines.ingest.scan_images``: read, hash, parse the
   header with ``stop_before_pixels``, check the pixel data size, group into series and check the
   geometry) with one worker and with ``workers`` processes; and the baseline, a plain loop of
   ``pydicom.dcmread(path, stop_before_pixels=True)`` over the same files. Rows: files/s (median),
   ratio = ours / baseline.
2. Loading. A small synthetic silo (``pipelines.synthetic``; ``cases`` cases of ``size``^3) is
   registered-style (scanned, content-hashed) and read through MONAI with ``pipelines.dataset.load_cases``:
   the first epoch (empty cache: decode every DICOM series) against a cached epoch (the ``.npz`` entries
   keyed by content hash). Rows: seconds (median), ratio = cached / first.

Peak memory is the OS's (``getrusage`` of this process and of its reaped worker processes).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = "ingest"
_UID_ROOT = "1.2.826.0.1.3680043.8.498.77."  # pydicom's root; fixed-width counters follow


def add_bench_command(bsub) -> None:
    p = bsub.add_parser("ingest", help="DICOM header scan vs a plain pydicom.dcmread loop; first vs cached epoch load")
    p.add_argument("--files", type=int, default=10_000, help="DICOM files to scan (default 10,000)")
    p.add_argument("--slices-per-series", type=int, default=100, help="slices per generated series (default 100)")
    p.add_argument("--workers", type=int, default=None, help="processes for our parallel scan (default: up to 4, one per core)")
    p.add_argument("--cases", type=int, default=20, help="synthetic cases for the load timing (default 20)")
    p.add_argument("--size", type=int, default=32, help="edge of the synthetic volumes for the load timing (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedsilo.bench_report import print_result
    from fedsilo.errors import ConfigError

    for name in ("files", "slices_per_series", "cases", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} is too small", fix="use 1 or more")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is too small", fix="use 1 or more")
    if args.cases < 2:
        raise ConfigError("--cases must be at least 2", fix="use --cases 2 or more")
    result = run_ingest_bench(files=args.files, slices_per_series=args.slices_per_series, workers=args.workers, cases=args.cases,
                              size=args.size, repeats=args.repeats, progress=not args.json)
    print_result(result, as_json=args.json)
    return 0


def write_dicom_files(folder: Path, n: int, *, slices_per_series: int = 100) -> list[Path]:
    """``n`` valid DICOM slices (32x32, CT) under ``folder``/series-NNNNN/, ``slices_per_series`` per series."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    sop0, series0, z0, num0 = _UID_ROOT + "1" + "0" * 12, _UID_ROOT + "2" + "0" * 8, f"{0.0:010.3f}", "000001"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop0
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop0, "CT"
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series0, _UID_ROOT + "3"
    ds.InstanceNumber = num0
    ds.ImagePositionPatient = ["0", "0", z0]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["1", "1"]
    ds.SliceThickness = "1"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = np.random.RandomState(0).randint(0, 2000, (32, 32)).astype("<i2").tobytes()
    raw = tempfile.NamedTemporaryFile(delete=False, suffix=".dcm")
    raw.close()
    ds.save_as(raw.name, enforce_file_format=True)
    template = Path(raw.name).read_bytes()
    os.unlink(raw.name)
    sop_at = [i for i in range(len(template)) if template.startswith(sop0.encode(), i)]
    series_at = template.index(series0.encode())
    z_at = template.index(z0.encode())
    num_at = template.index(num0.encode())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    buf = bytearray(template)
    for k in range(n):
        series, index = divmod(k, slices_per_series)
        for at in sop_at:
            buf[at:at + len(sop0)] = (_UID_ROOT + "1" + f"{k:012d}").encode()
        buf[series_at:series_at + len(series0)] = (_UID_ROOT + "2" + f"{series:08d}").encode()
        buf[z_at:z_at + len(z0)] = f"{float(index):010.3f}".encode()
        buf[num_at:num_at + len(num0)] = f"{index + 1:06d}".encode()
        sub = folder / f"series-{series:05d}"
        if index == 0:
            sub.mkdir(exist_ok=True)
        path = sub / f"{index:04d}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, bytes(buf))
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mib() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def _row(case: str, metric: str, value: float, baseline: str | None = None, base_value: float | None = None) -> dict[str, Any]:
    ratio = None if baseline is None or not base_value else value / base_value
    return {"case": case, "metric": metric, "value": round(value, 4), "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 3)}


def run_ingest_bench(*, files: int = 10_000, slices_per_series: int = 100, workers: int | None = None, cases: int = 20,
                     size: int = 32, repeats: int = 3, progress: bool = False) -> dict[str, Any]:
    """Measure the header scan and the first vs cached epoch; returns ``{"bench", "params", "machine", "rows"}``."""
    import sys

    import pydicom

    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-ingest-bench-"))
    try:
        say(f"writing {files} DICOM files ...")
        paths = write_dicom_files(tmp / "dicom", files, slices_per_series=slices_per_series)
        str_paths = [str(p) for p in paths]
        results: dict[str, Any] = {}

        def ours(n_workers: int):
            def go():
                results[n_workers] = _scan_only(tmp / "dicom", n_workers)
            return go

        def plain():
            for p in str_paths:
                pydicom.dcmread(p, stop_before_pixels=True)

        say("timing the plain pydicom.dcmread loop ...")
        t_plain = _median_time(plain, repeats)
        say("timing our scan, 1 worker ...")
        t_one = _median_time(ours(1), repeats)
        say(f"timing our scan, {workers} workers ...")
        t_par = _median_time(ours(workers), repeats)
        images, rejected = results[workers]
        if len(images) != -(-files // slices_per_series) or rejected:
            raise RuntimeError(f"the scan found {len(images)} series and {len(rejected)} rejections in the generated files")
        rows.append(_row("pydicom.dcmread loop (stop_before_pixels)", "files/s", files / t_plain))
        rows.append(_row("our scan, 1 worker", "files/s", files / t_one, "pydicom.dcmread loop (stop_before_pixels)", files / t_plain))
        rows.append(_row(f"our scan, {workers} workers", "files/s", files / t_par, "pydicom.dcmread loop (stop_before_pixels)", files / t_plain))
        rows.append(_row(f"our scan, {workers} workers", "seconds", t_par, "pydicom.dcmread loop (stop_before_pixels)", t_plain))
        own, children = _peak_mib()
        rows.append(_row("scan peak RSS (this process)", "MiB", own))
        rows.append(_row("scan peak RSS (largest worker)", "MiB", children))
        say(f"writing {cases} synthetic cases and timing the first and the cached epoch ...")
        rows += _load_rows(tmp, cases=cases, size=size, repeats=repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import numpy as np

    return {
        "bench": BENCH,
        "params": {"files": files, "slices_per_series": slices_per_series, "workers": workers, "cases": cases, "size": size,
                   "repeats": repeats},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pydicom": pydicom.__version__, "numpy": np.__version__},
        "rows": rows,
    }


def _scan_only(folder: Path, workers: int):
    """Our scan without label pairing: every file read, hashed and parsed, then grouped and checked as series."""
    from pipelines.ingest.scan import _collect, walk
    from pipelines.ingest.series import assemble_series

    paths, empty = walk(folder)
    found = _collect(paths, workers, None)
    images, rejected = assemble_series(found.headers, spatial_dims=3)
    return images, empty + found.rejections + rejected


def _load_rows(tmp: Path, *, cases: int, size: int, repeats: int) -> list[dict[str, Any]]:
    from pipelines.dataset import CaseSource, case_content_hash, load_cases, stat_fingerprint
    from pipelines.ingest import scan_images
    from pipelines.synthetic import default_profiles, write_synthetic_silo

    profile = default_profiles(1, sizes=[cases])[0]
    silo = write_synthetic_silo(tmp / "synthetic", profile, task="seg3d", size=size)
    scan = scan_images(silo.root / "images", task="seg3d", labels=silo.root / "labels")
    sources = []
    for c in scan.cases:
        files = c.image.files + c.label.files
        sources.append(CaseSource(content_sha256=case_content_hash(c.image.sha256, c.label.sha256[0]), image_format=c.image.format,
                                  image_files=c.image.files, label_file=c.label.files[0],
                                  stat_sha256=stat_fingerprint(files, list(c.image.stats + c.label.stats))))
    cache = tmp / "cache"
    load_cases(sources[:1], task="seg3d", cache_dir=None)  # import MONAI and build the loader outside the timing

    def first():
        shutil.rmtree(cache, ignore_errors=True)
        load_cases(sources, task="seg3d", cache_dir=cache)

    def cached():
        load_cases(sources, task="seg3d", cache_dir=cache)

    t_first = _median_time(first, repeats)
    t_cached = _median_time(cached, repeats)
    label = f"{len(sources)} cases of {size}^3 ({size} DICOM slices each)"
    return [_row(f"first epoch, decode DICOM: {label}", "seconds", t_first),
            _row(f"cached epoch: {label}", "seconds", t_cached, f"first epoch, decode DICOM: {label}", t_first)]
