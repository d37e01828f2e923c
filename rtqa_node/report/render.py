"""A one-page summary for people (PDF and PNG, matplotlib) and its DICOM wrapping (Encapsulated PDF).

The page: the verdict with protocol, algorithm and model versions; a findings table (severity, check code,
message: the same texts as the SR's Comment items); a DVH plot of the constrained structures with the protocol
limits as markers (upper limits as downward triangles, lower limits as upward ones, at the metric's volume);
the risk map over up to three CT slices (the slices with the most risk, else through the dose maximum).
No patient name or ID is printed: the DICOM header of the Encapsulated PDF carries the identity.

Encapsulated PDF: PS3.3 A.45.1 (Encapsulated PDF IOD: Patient, General Study, Encapsulated Document Series,
General Equipment, SC Equipment, Encapsulated Document, SOP Common).
"""

from __future__ import annotations

import io
import re
import textwrap
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

import rtqa_node
from rtqa_node.errors import InputError
from rtqa_node.report.header import result_dataset
from rtqa_node.report.kinds import ENCAPSULATED_PDF_STORAGE
from rtqa_node.report.riskmap import RiskMap, plan_structures
from rtqa_node.review import Review, Severity, Verdict
from rtqa_node.rt.plan_study import PlanStudy, plan_dose

PDF_SERIES_NUMBER = 9904
MAX_TABLE_ROWS = 12
MAX_DVH_STRUCTURES = 10
_LIMIT = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([0-9]+(?:\.[0-9]*)?)\s*Gy\s*$")
_METRIC_VOLUME = re.compile(r"^D([0-9]+(?:\.[0-9]*)?)%$")
_VERDICT_TEXT = {Verdict.PER_PROTOCOL: "PER PROTOCOL", Verdict.MINOR: "MINOR DEVIATION",
                 Verdict.MAJOR: "MAJOR DEVIATION", Verdict.NOT_EVALUABLE: "NOT EVALUABLE"}
_VERDICT_COLOUR = {Verdict.PER_PROTOCOL: "#1b7837", Verdict.MINOR: "#d95f02", Verdict.MAJOR: "#b2182b",
                   Verdict.NOT_EVALUABLE: "#555555"}
_SEVERITY_COLOUR = {Severity.INFO: "#f0f0f0", Severity.MINOR: "#fdd49e", Severity.MAJOR: "#f4a582",
                    Severity.NOT_EVALUABLE: "#d9d9d9"}


@dataclass(frozen=True)
class Summary:
    pdf_bytes: bytes
    png_bytes: bytes


#: how the summary names each prediction target; probabilities of an adverse event, except local control
_TARGET_TEXT = {"qa_major": "major deviation (expert QA)", "xerostomia_severe": "severe xerostomia",
                "dysphagia_severe": "severe dysphagia", "local_control": "local control"}


def prediction_line(review: Review) -> str:
    """One line: each prediction's probability, in the model's order (``major deviation (expert QA) 12 %, ...``)."""
    return ", ".join(f"{_TARGET_TEXT.get(p.target, p.target)} {100 * p.probability:.0f} %" for p in review.predictions)


def finding_lines(review: Review) -> list[tuple[str, str, str]]:
    """(severity, code, message) per finding, in the order of the review (the table rows, and the SR's)."""
    return [(f.severity.value, f.code, f.message) for f in review.findings]


def _marker_volume_pct(metric: str) -> float:
    """Where on the volume axis a limit on ``metric`` sits: Dx% at x, Dmean at 50, Dmax / D0.03cc near 0."""
    match = _METRIC_VOLUME.match(metric.replace(" ", ""))
    if match:
        return float(match.group(1))
    return 50.0 if metric.lower() in ("dmean", "mean") else 1.0


def _dvh_axes(ax, review: Review, study: PlanStudy | None) -> None:
    from rtqa_node.rt.dvh import structure_dvh

    ax.set_title("DVH with protocol limits", fontsize=9, loc="left")
    dose = None
    if study is not None and study.doses and study.structure_sets:
        try:
            dose = plan_dose(study)
            dose.require_gy()
        except InputError:
            dose = None
    if dose is None:
        ax.text(0.5, 0.5, "no dose in Gy: no DVH", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    structure_set = study.structure_set_for(dose)
    wanted = [c.structure for c in review.constraints]
    wanted += [f.structure for f in review.findings if f.structure]
    if not wanted:  # no protocol: targets and organs the plan itself names
        wanted = [s.name for s in structure_set.structures if s.interpreted_type in ("PTV", "ORGAN", "CTV")]
    names = list(dict.fromkeys(wanted))
    colours: dict[str, str] = {}
    curves = 0
    for name in names:
        for structure in plan_structures(review, structure_set.structures, name):
            if curves == MAX_DVH_STRUCTURES:
                break
            try:
                dvh = structure_dvh(structure, dose).dvh
            except (ValueError, InputError):  # no contours inside the grid, a non-Gy dose: no curve, no error
                continue
            label = structure.name if structure.name == name else f"{structure.name} ({name})"
            (line,) = ax.plot(dvh.dose_gy, dvh.volume_pct, lw=1.2, label=label, color=f"C{curves % 10}")
            curves += 1
            colours.setdefault(name, line.get_color())
    for c in review.constraints:
        match = _LIMIT.match(c.per_protocol or "")
        if not match or c.structure not in colours:
            continue
        upper = match.group(1) in ("<=", "<", "≤")
        ax.plot([float(match.group(2))], [_marker_volume_pct(c.metric)], marker="v" if upper else "^",
                ms=7, color=colours[c.structure], markeredgecolor="black", linestyle="none")
    ax.set_xlabel(f"dose ({dose.unit_label})", fontsize=8)
    ax.set_ylabel("volume (%)", fontsize=8)
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if colours:
        ax.legend(fontsize=6, loc="upper right", ncol=2)


def _ct_slice(study: PlanStudy, z_mm: float) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """The CT slice nearest ``z_mm`` (HU) and its extent (left, right, bottom, top) in mm for imshow."""
    ct = study.ct
    if ct is None or not ct.geometry.is_axial:
        return None
    k = int(np.argmin(np.abs(ct.geometry.z_positions_mm - z_mm)))
    slope, intercept = ct.rescale[k]
    pixels = pydicom.dcmread(ct.files[k], force=True).pixel_array.astype(np.float32) * slope + intercept
    return pixels, _extent(ct.geometry)


def _extent(g) -> tuple[float, float, float, float]:
    sx, sy = g.spacing_mm[0], g.spacing_mm[1]
    x0, y0 = g.origin_mm[0], g.origin_mm[1]
    return (x0 - sx / 2, x0 + sx * (g.shape[2] - 0.5), y0 + sy * (g.shape[1] - 0.5), y0 - sy / 2)


def _representative_frames(risk: RiskMap | None, study: PlanStudy | None, n: int = 3) -> tuple[list[float], str]:
    """z positions (mm) of up to ``n`` frames: most risk, else the dose maximum."""
    if risk is not None and float(risk.values.max()) > 0:
        per_frame = risk.values.reshape(risk.values.shape[0], -1).sum(axis=1)
        order = [int(k) for k in np.argsort(per_frame)[::-1] if per_frame[k] > 0]
        chosen: list[int] = []
        for k in order:  # spread the slices: at least 3 frames apart
            if all(abs(k - j) >= 3 for j in chosen):
                chosen.append(k)
            if len(chosen) == n:
                break
        return [float(risk.geometry.z_positions_mm[k]) for k in sorted(chosen)], "risk"
    if study is not None and study.doses:
        try:
            dose = plan_dose(study)
        except InputError:
            return [], ""
        k = int(np.unravel_index(np.argmax(dose.dose), dose.dose.shape)[0])
        return [float(dose.geometry.z_positions_mm[k])], "dose maximum"
    return [], ""


def _risk_axes(axes, risk: RiskMap | None, study: PlanStudy | None) -> None:
    frames, why = _representative_frames(risk, study, n=len(axes))
    for ax in axes:
        ax.set_axis_off()
    if not frames or study is None or study.ct is None:
        axes[0].text(0.0, 0.5, "no CT or no risk map: nothing to overlay", fontsize=8, transform=axes[0].transAxes)
        return
    for ax, z in zip(axes, frames):
        ct = _ct_slice(study, z)
        if ct is None:
            continue
        pixels, extent = ct
        ax.imshow(pixels, cmap="gray", vmin=-200, vmax=300, extent=extent)
        if risk is not None and risk.geometry.is_axial:
            k = int(np.argmin(np.abs(risk.geometry.z_positions_mm - z)))
            layer = np.ma.masked_less_equal(risk.values[k], 0.0)
            ax.imshow(layer, cmap="autumn_r", vmin=0, vmax=1, alpha=0.75, extent=_extent(risk.geometry))
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(f"z = {z:.1f} mm ({why})", fontsize=7)
    axes[0].text(0.0, -0.12, risk.caption if risk is not None else "Dose maximum (no risk map)",
                 fontsize=7, transform=axes[0].transAxes)


def _lines(rows: list[list[str]], wrap: int) -> int:
    """Text lines a table needs: one header line, and per row its most wrapped cell."""
    return 1 + sum(max(len(textwrap.wrap(cell, wrap)) or 1 for cell in row) for row in rows) if rows else 1


def _table(ax, title: str, header: list[str], rows: list[list[str]], colours: list[str], widths: list[float], *,
           wrap: int, empty: str) -> None:
    """A table filling ``ax``: each row as tall as its most wrapped cell; at most MAX_TABLE_ROWS rows."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")
    if not rows:
        ax.text(0, 0.5, empty, fontsize=8, transform=ax.transAxes)
        return
    shown = rows[:MAX_TABLE_ROWS]
    cells = [["\n".join(textwrap.wrap(cell, wrap)) or "-" for cell in row] for row in shown]
    table = ax.table(cellText=cells, colLabels=header, loc="upper left", colWidths=widths, cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    heights = [1] + [max(cell.count("\n") + 1 for cell in row) for row in cells]
    unit = 1.0 / sum(heights)
    for i, lines in enumerate(heights):
        for j in range(len(header)):
            table[i, j].set_height(unit * lines)
            table[i, j].PAD = 0.02
            if i:
                table[i, j].set_facecolor(colours[i - 1])
    if len(rows) > len(shown):
        ax.text(0, -0.08, f"... and {len(rows) - len(shown)} more (see the SR)", fontsize=7, transform=ax.transAxes)


def render_summary(review: Review, study: PlanStudy | None, risk: RiskMap | None, *, title: str) -> Summary:
    """The one-page summary as PDF and PNG bytes.

    Parameters:
        title: first line of the page (e.g. plan label and revision; no patient identifiers).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans"}):
        fig = plt.figure(figsize=(8.27, 11.69))  # A4 portrait
        # table heights follow their line counts, so short tables leave no empty band
        findings_lines = _lines([[f.message] for f in review.findings][:MAX_TABLE_ROWS], 78)
        constraint_lines = _lines([[c.constraint_id, c.structure] for c in review.constraints][:MAX_TABLE_ROWS], 30)
        grid = fig.add_gridspec(5, 3, height_ratios=[0.55, 0.2 + 0.075 * findings_lines,
                                                     0.2 + 0.075 * constraint_lines, 1.5, 1.05],
                                hspace=0.35, wspace=0.1, left=0.06, right=0.97, top=0.97, bottom=0.04)
        head = fig.add_subplot(grid[0, :])
        head.set_axis_off()
        verdict = review.verdict
        head.text(0, 0.95, title, fontsize=11, va="top", weight="bold")
        head.text(0, 0.62, f"Verdict: {_VERDICT_TEXT[verdict]}", fontsize=15, va="top", weight="bold",
                  color=_VERDICT_COLOUR[verdict])
        models = ", ".join(sorted({f"{p.model} {p.model_version}" for p in review.predictions})) or "none"
        head.text(0, 0.25, f"Protocol: {review.protocol or 'none (generic checks)'}    "
                  f"Algorithm: rtqa-node {review.algorithm_version or rtqa_node.__version__}    Models: {models}",
                  fontsize=8, va="top")
        if review.predictions:
            head.text(0, 0.13, "Predicted (research model): " + prediction_line(review), fontsize=8, va="top")
        head.text(0, 0.02, "Research software, not for clinical use. Details: the DICOM SR of this review.",
                  fontsize=7, va="top", color="#555555")

        findings_ax = fig.add_subplot(grid[1, :])
        _table(findings_ax, f"Findings ({len(review.findings)})", ["severity", "check", "message"],
               [[sev, code, message] for sev, code, message in finding_lines(review)],
               [_SEVERITY_COLOUR[f.severity] for f in review.findings], [0.09, 0.3, 0.61], wrap=78,
               empty="No findings.")
        constraints_ax = fig.add_subplot(grid[2, :])
        _table(constraints_ax, f"Protocol constraints ({len(review.constraints)})",
               ["constraint", "structure", "metric", "value", "per protocol", "minor", "category"],
               [[c.constraint_id, c.structure, c.metric, "-" if c.value is None else f"{c.value:.2f} {c.unit}",
                 c.per_protocol, c.minor or "-", c.to_json()["category"]] for c in review.constraints],
               [_SEVERITY_COLOUR.get(c.category, "#ffffff") for c in review.constraints],
               [0.2, 0.2, 0.09, 0.11, 0.13, 0.13, 0.14], wrap=30, empty="No protocol applied.")
        _dvh_axes(fig.add_subplot(grid[3, :]), review, study)
        _risk_axes([fig.add_subplot(grid[4, k]) for k in range(3)], risk, study)

        pdf, png = io.BytesIO(), io.BytesIO()
        fig.savefig(pdf, format="pdf", metadata={"Creator": f"rtqa-node {rtqa_node.__version__}",
                                                 "CreationDate": None})
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
    return Summary(pdf.getvalue(), png.getvalue())


def encapsulated_pdf(pdf_bytes: bytes, plan: Dataset, *, sop_instance_uid: str, series_instance_uid: str,
                     instance_number: int, document_title: str) -> Dataset:
    """An Encapsulated PDF object (PS3.3 A.45.1) in the plan's patient and study."""
    ds = result_dataset(plan, sop_class_uid=ENCAPSULATED_PDF_STORAGE, sop_instance_uid=sop_instance_uid,
                        modality="DOC", series_instance_uid=series_instance_uid, series_number=PDF_SERIES_NUMBER,
                        series_description="RTQA plan review summary", instance_number=instance_number)
    ds.ConversionType = "WSD"  # workstation
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.AcquisitionDateTime = ds.InstanceCreationDate + ds.InstanceCreationTime
    ds.BurnedInAnnotation = "NO"  # the page prints no patient name or ID
    ds.DocumentTitle = document_title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf_bytes + (b"\x00" if len(pdf_bytes) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    return ds
