"""``rtqa dvh PATH``: DVHs of every structure for each dose object of a folder, as a table, JSON, CSV or PNG.

JSON contract (docs/architecture.md, "Command-line contract"): one dose object gives a list of structure records
``{"structure", "volume_cc", "min_gy", "mean_gy", "max_gy", "d99_gy", "d98_gy", "d95_gy", "d50_gy", "d5_gy",
"d2_gy", "d1_gy", "d0_03cc_gy", "dvh": {"dose_gy", "volume_pct"}}``; several give
``[{"dose": {"sop_instance_uid", "file", "summation_type"}, "structures": [...]}, ...]``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from rtqa_node.errors import InputError
from rtqa_node.rt.dvh import StructureDvh, structure_dvh
from rtqa_node.rt.geometry import RasterSettings
from rtqa_node.rt.plan_study import DoseGrid, PlanStudy, load_folder

log = logging.getLogger(__name__)

METRIC_KEYS = ("volume_cc", "min_gy", "mean_gy", "max_gy", "d99_gy", "d98_gy", "d95_gy", "d50_gy", "d5_gy",
               "d2_gy", "d1_gy", "d0_03cc_gy")


@dataclass(frozen=True)
class DoseDvhs:
    dose: DoseGrid
    structures: tuple[StructureDvh, ...]


def compute_study_dvhs(study: PlanStudy, settings: RasterSettings = RasterSettings()) -> tuple[DoseDvhs, ...]:
    """DVHs of every structure with closed planar contours, for every dose object (each counted once).

    Raises InputError when there is no dose, no structure set, or a dose is not in GY.
    """
    if not study.doses:
        raise InputError("no RTDOSE object found")
    if not study.structure_sets:
        raise InputError("no RTSTRUCT object found: nothing to compute a DVH for")
    out = []
    for dose in study.doses:
        dose.require_gy()
        structure_set = study.structure_set_for(dose)
        results = []
        for structure in structure_set.structures:
            if not structure.has_volume:
                log.info("structure_without_contours", extra={"roi_number": structure.roi_number})
                continue
            results.append(structure_dvh(structure, dose, settings))
        out.append(DoseDvhs(dose, tuple(results)))
    return tuple(out)


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)


def _step_gy(max_gy: float) -> float:
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        if max_gy / step <= 2000:
            return step
    return max_gy / 2000


def structure_record(result: StructureDvh) -> dict:
    m = result.metrics
    doses, pct = result.dvh.resampled(_step_gy(max(m.max_gy if math.isfinite(m.max_gy) else 0.0, 0.01)))
    record = {"structure": m.structure}
    record.update({k: _num(getattr(m, k)) for k in METRIC_KEYS})
    record["dvh"] = {"dose_gy": [round(float(d), 4) for d in doses], "volume_pct": [round(float(v), 4) for v in pct]}
    return record


def json_document(results: tuple[DoseDvhs, ...]) -> list:
    if len(results) == 1:
        return [structure_record(r) for r in results[0].structures]
    return [{"dose": {"sop_instance_uid": r.dose.sop_instance_uid, "file": str(r.dose.file),
                      "summation_type": r.dose.summation_type},
             "structures": [structure_record(s) for s in r.structures]} for r in results]


def csv_text(results: tuple[DoseDvhs, ...]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dose_file", "summation_type", "unit", "structure", *METRIC_KEYS])
    for r in results:
        for s in r.structures:
            writer.writerow([r.dose.file.name, r.dose.summation_type, s.metrics.unit, s.metrics.structure,
                             *(_num(getattr(s.metrics, k)) for k in METRIC_KEYS)])
    return buf.getvalue()


def table_text(results: tuple[DoseDvhs, ...]) -> str:
    lines = []
    for r in results:
        unit = r.dose.unit_label
        lines.append(f"{r.dose.file.name}  {r.dose.summation_type}  {r.dose.dose_type}  ({unit})")
        lines.append(f"  {'structure':<22}{'cc':>10}{'min':>8}{'mean':>8}{'max':>8}{'D98%':>8}{'D95%':>8}"
                     f"{'D50%':>8}{'D2%':>8}{'D0.03cc':>9}")
        for s in r.structures:
            m = s.metrics
            lines.append(f"  {m.structure[:21]:<22}{m.volume_cc:>10.2f}{m.min_gy:>8.2f}{m.mean_gy:>8.2f}"
                         f"{m.max_gy:>8.2f}{m.d98_gy:>8.2f}{m.d95_gy:>8.2f}{m.d50_gy:>8.2f}{m.d2_gy:>8.2f}"
                         f"{m.d0_03cc_gy:>9.2f}")
    return "\n".join(lines) + "\n"


def write_png(results: tuple[DoseDvhs, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 4.5 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        for s in r.structures:
            ax.plot(s.dvh.dose_gy, s.dvh.volume_pct, label=s.metrics.structure)
        ax.set_xlabel(f"dose ({r.dose.unit_label})")
        ax.set_ylabel("volume (%)")
        ax.set_title(f"{r.dose.file.name} ({r.dose.summation_type})")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_dvh(path: Path, *, output: str, png: Path | None) -> tuple[str | None, list | None]:
    """Load ``path`` and compute. Returns (text, None) for "table"/"csv" or (None, document) for "json"."""
    results = compute_study_dvhs(load_folder(path))
    if png is not None:
        write_png(results, png)
    if output == "json":
        return None, json_document(results)
    if output == "csv":
        return csv_text(results), None
    return table_text(results), None
