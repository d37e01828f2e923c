"""A head-and-neck phantom: body outline, organs at risk and targets as implicit solids, varied per patient.

Landmarks are in mm in DICOM patient coordinates (+x left, +y posterior, +z superior) with z = 0 near the
level of C2 / the mandibular angle. Each patient gets a global size factor, per-organ offsets and size factors,
a primary tumour (oropharynx, left or right, 2-20 cc) and bilateral elective nodal volumes (levels II-IV).
Structure names follow AAPM TG-263 (Mayo et al. 2018); the colours follow common TPS defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rtqa_node.synth.shapes import (
    ArcTube,
    Ellipsoid,
    EllipticCylinder,
    Shape,
    TaperedNeck,
)
from rtqa_node.synth.sites import SiteProfile

SKIN_CROP_MM = 4.0  # PTVs are cropped this far inside the External (build-up region), as most protocols ask
GTV_TO_CTV_MM = 5.0


@dataclass(frozen=True)
class Structure:
    name: str  # TG-263
    shape: Shape
    rt_roi_interpreted_type: str  # PS3.3 C.8.8.8: EXTERNAL, PTV, CTV, GTV, ORGAN
    color_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Phantom:
    """A patient's anatomy. structures is ordered as written to the RTSTRUCT; tissues holds CT-only solids
    (bone, air, fat, brain) used to paint Hounsfield units."""

    structures: dict[str, Structure]
    tissues: dict[str, Shape]
    tumour_side: str  # "L" or "R"
    gtv_radius_mm: float
    size_factor: float
    meta: dict = field(default_factory=dict)


def make_phantom(rng: np.random.Generator, site: SiteProfile) -> Phantom:
    """Draw one patient's anatomy. The contoured OARs include the site's contouring bias; PTVs its margin."""
    g = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))  # global size

    def p(x: float, y: float, z: float, jitter_mm: float = 1.5) -> tuple[float, float, float]:
        return tuple(float(v * g + rng.normal(0.0, jitter_mm)) for v in (x, y, z))

    def s(a: float, b: float, c: float, spread: float = 0.08) -> tuple[float, float, float]:
        f = float(np.clip(rng.normal(1.0, spread), 0.8, 1.25))
        return tuple(v * g * f for v in (a, b, c))

    # -- body and CT-only tissues -------------------------------------------------------------------------
    head = Ellipsoid(p(0, 8, 70, 1.0), s(76, 92, 82, 0.04))
    neck_axes = s(60, 54, 1, 0.06)
    neck = TaperedNeck(
        center_xy_mm=p(0, 6, 0, 1.0)[:2], semi_axes_xy_mm=neck_axes[:2], z_shoulder_mm=-85 * g,
        max_half_width_mm=118.0, z_lo_mm=-400.0, z_hi_mm=45.0 * g,
    )
    body = head | neck

    cord_c = p(0, 38, 0, 1.0)[:2]
    vertebra = EllipticCylinder(p(0, 19, 0, 1.0)[:2], s(13, 10, 1)[:2], -400.0, 22 * g) | (
        EllipticCylinder(cord_c, (12.0 * g, 11.0 * g), -400.0, 22 * g) - EllipticCylinder(cord_c, (8 * g, 7 * g), -400, 30)
    )
    brain_region = Ellipsoid(head.center_mm, tuple(a - 9.0 for a in head.semi_axes_mm))
    skull = (Ellipsoid(head.center_mm, tuple(a - 3.0 for a in head.semi_axes_mm)) - brain_region) & EllipticCylinder(
        (0.0, 0.0), (300.0, 300.0), 38.0 * g, 400.0
    )
    brain = brain_region & EllipticCylinder((0.0, 0.0), (300.0, 300.0), 38.0 * g, 400.0)
    pharynx_lumen = EllipticCylinder(p(0, 2, 0, 1.0)[:2], s(11, 5.5, 1)[:2], -36 * g, 32 * g)
    trachea = EllipticCylinder(p(0, -22, 0, 1.0)[:2], s(8, 7, 1)[:2], -400.0, -34 * g)
    fat = body - body.grow(-7.0)  # subcutaneous fat layer

    # -- organs at risk (truth) -------------------------------------------------------------------------
    side_jitter = 1.0
    parotid_axes = s(12, 18, 20, 0.12)
    oars: dict[str, tuple[Shape, tuple[int, int, int]]] = {}
    oars["SpinalCord"] = (EllipticCylinder(cord_c, s(5, 4.5, 1, 0.05)[:2], -400.0, 26 * g), (255, 255, 0))
    oars["Brainstem"] = (Ellipsoid(p(0, 28, 46), s(13, 13, 20, 0.06)), (160, 32, 240))
    mandible = ArcTube(p(0, -14, 0, 1.0)[:2], s(45, 40, 1, 0.05)[:2], 8.0 * g, 0.0, -8 * g, 16 * g) | (
        EllipticCylinder(p(44, 2, 0)[:2], s(4, 12, 1)[:2], -4 * g, 36 * g)
        | EllipticCylinder(p(-44, 2, 0)[:2], s(4, 12, 1)[:2], -4 * g, 36 * g)
    )
    oars["Bone_Mandible"] = (mandible, (240, 230, 140))
    for side, sign in (("L", 1.0), ("R", -1.0)):
        axes = tuple(a * float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1)) for a in parotid_axes)
        oars[f"Parotid_{side}"] = (Ellipsoid(p(sign * 49, 8, 20, side_jitter * 2), axes), (0, 200, 255) if side == "L" else (0, 130, 255))
    for side, sign in (("L", 1.0), ("R", -1.0)):
        oars[f"Glnd_Submand_{side}"] = (Ellipsoid(p(sign * 32, -18, -12), s(10, 11, 9, 0.1)), (255, 140, 0))
    oars["Larynx"] = (EllipticCylinder(p(0, -25, 0, 1.0)[:2], s(15, 12, 1, 0.08)[:2], -72 * g, -34 * g), (0, 255, 127))
    constrictor_outer = EllipticCylinder(pharynx_lumen.center_xy_mm, tuple(a + 5.5 * g for a in pharynx_lumen.semi_axes_xy_mm), -40 * g, 28 * g)
    oars["Musc_Constrict"] = (constrictor_outer - pharynx_lumen, (255, 105, 180))
    oars["Cavity_Oral"] = (Ellipsoid(p(0, -33, 12), s(29, 24, 15, 0.08)), (205, 133, 63))

    # -- targets ------------------------------------------------------------------------------------------
    tumour_sign = 1.0 if rng.random() < 0.5 else -1.0
    r_gtv = float(rng.uniform(8.0, 16.0))
    gtv = Ellipsoid(
        p(tumour_sign * 10, -3, 4, 2.0), (r_gtv, r_gtv * float(rng.uniform(0.8, 1.0)), r_gtv * float(rng.uniform(1.0, 1.2)))
    )
    skin = body.grow(-SKIN_CROP_MM)
    ctv70 = gtv.grow(GTV_TO_CTV_MM) & skin
    ptv70 = ctv70.grow(site.ptv_margin_mm) & skin
    z_node_top = float(20 * g + rng.normal(0, 2))
    nodes = EllipticCylinder(p(34, 6, 0)[:2], s(11, 14, 1, 0.08)[:2], -70 * g, z_node_top) | EllipticCylinder(
        p(-34, 6, 0)[:2], s(11, 14, 1, 0.08)[:2], -70 * g, z_node_top
    )
    ctv56 = (nodes | ctv70.grow(5.0)) & skin
    ptv56 = (ctv56.grow(site.ptv_margin_mm) & skin) - ptv70

    structures: dict[str, Structure] = {"External": Structure("External", body, "EXTERNAL", (0, 255, 0))}
    structures["GTV_70"] = Structure("GTV_70", gtv, "GTV", (255, 0, 0))
    structures["CTV_70"] = Structure("CTV_70", ctv70, "CTV", (255, 64, 64))
    structures["PTV_70"] = Structure("PTV_70", ptv70, "PTV", (255, 0, 255))
    structures["CTV_56"] = Structure("CTV_56", ctv56, "CTV", (64, 64, 255))
    structures["PTV_56"] = Structure("PTV_56", ptv56, "PTV", (0, 0, 255))
    bias = site.oar_contour_bias_mm
    for name, (shape, color) in oars.items():
        drawn = shape.grow(bias) if abs(bias) > 1e-6 else shape
        structures[name] = Structure(name, drawn & body, "ORGAN", color)

    tissues = {
        "fat": fat,
        "brain": brain,
        "skull": skull,
        "vertebra": vertebra,
        "mandible": mandible,
        "pharynx_lumen": pharynx_lumen,
        "trachea": trachea,
        "larynx_lumen": EllipticCylinder(trachea.center_xy_mm, (6.0 * g, 4.0 * g), -72 * g, -30 * g),
    }
    return Phantom(
        structures=structures,
        tissues=tissues,
        tumour_side="L" if tumour_sign > 0 else "R",
        gtv_radius_mm=r_gtv,
        size_factor=g,
        meta={"ptv_margin_mm": site.ptv_margin_mm, "oar_contour_bias_mm": bias},
    )
