"""A head-and-neck phantom: body outline, organs at risk and targets as implicit solids, varied per patient.

Landmarks are in mm in DICOM patient coordinates (+x left, +y posterior, +z superior) with z = 0 near the
level of C2 / the mandibular angle. Each patient gets a global size factor, a neck length factor (everything
below z = 0 stretched), a shoulder height and width, per-organ offsets and size factors, a primary tumour
(oropharynx, larynx, oral cavity or hypopharynx, left or right, 2-20 cc), an involved node (GTVn, most
patients) and bilateral elective nodal volumes (levels II-IV). Targets: GTV_70 (+ GTVn) -> CTV_70 (+5 mm) ->
PTV_70; CTV_56 (elective nodes + CTV_70 + 5 mm) -> PTV_56 (minus PTV_70).

``structures`` are the contours as drawn (site contouring style, guideline period and per-patient noise
applied to the organs in ``sites.STYLED_STRUCTURES``); ``true_shapes`` are the unstyled organs, from which
the outcome models take their doses. ``stem_cells`` holds the planted parotid stem-cell regions (truth only,
never written to the RTSTRUCT).
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
    Translate,
)
from rtqa_node.synth.sites import (
    CONTOUR_NOISE_MM,
    GUIDELINE_NOISE_FACTOR,
    GUIDELINE_STYLE_FACTOR,
    STYLED_STRUCTURES,
    SiteProfile,
)

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
    tumour_site: str = "oropharynx"
    true_shapes: dict[str, Shape] = field(default_factory=dict)  # unstyled organs (outcome models)
    stem_cells: dict[str, Shape] = field(default_factory=dict)  # "Parotid_L"/"Parotid_R" -> planted sub-region
    contouring: dict = field(default_factory=dict)  # structure -> applied margin_mm and shift_mm


# Primary tumour centre (x for a left-sided tumour, mm, before size scaling) per tumour site.
PRIMARY_CENTRE_MM = {
    "oropharynx": (10.0, -3.0, 4.0),  # tonsil / base of tongue
    "oral_cavity": (12.0, -26.0, 8.0),  # tongue / floor of mouth
    "larynx": (6.0, -26.0, -44.0),  # supraglottis
    "hypopharynx": (12.0, -9.0, -40.0),  # piriform sinus
}


def make_phantom(rng: np.random.Generator, site: SiteProfile, *, tumour_site: str = "oropharynx",
                 after_guideline: bool = False, style_rng: np.random.Generator | None = None) -> Phantom:
    """Draw one patient's anatomy. The contoured organs carry the site's contouring style (systematic margin
    and shift per structure, shrunk after the guideline) and per-patient noise; PTVs the site's margin.

    style_rng draws the per-patient contouring noise (a separate stream, so the anatomy does not depend on it).
    """
    if tumour_site not in PRIMARY_CENTRE_MM:
        raise ValueError(f"tumour_site must be one of {sorted(PRIMARY_CENTRE_MM)}, got {tumour_site!r}")
    g = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))  # global size
    # Drawn from a child stream so that the draws below stay in their version-1 order.
    extra = np.random.default_rng(rng.integers(0, 2**63))
    neck_length = float(np.clip(extra.normal(1.0, 0.07), 0.85, 1.15))  # stretch below z = 0
    shoulder_shift_mm = float(extra.normal(0.0, 8.0))
    shoulder_half_width_mm = float(np.clip(extra.normal(118.0, 8.0), 100.0, 135.0))

    def zs(z: float) -> float:
        return z * g * (neck_length if z < 0 else 1.0)

    def p(x: float, y: float, z: float, jitter_mm: float = 1.5) -> tuple[float, float, float]:
        return (float(x * g + rng.normal(0.0, jitter_mm)), float(y * g + rng.normal(0.0, jitter_mm)),
                float(zs(z) + rng.normal(0.0, jitter_mm)))

    def s(a: float, b: float, c: float, spread: float = 0.08) -> tuple[float, float, float]:
        f = float(np.clip(rng.normal(1.0, spread), 0.8, 1.25))
        return tuple(v * g * f for v in (a, b, c))

    # -- body and CT-only tissues -------------------------------------------------------------------------
    head = Ellipsoid(p(0, 8, 70, 1.0), s(76, 92, 82, 0.04))
    neck_axes = s(60, 54, 1, 0.06)
    neck = TaperedNeck(
        center_xy_mm=p(0, 6, 0, 1.0)[:2], semi_axes_xy_mm=neck_axes[:2],
        z_shoulder_mm=zs(-85) + shoulder_shift_mm, max_half_width_mm=shoulder_half_width_mm, z_lo_mm=-400.0,
        z_hi_mm=45.0 * g,
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
    pharynx_lumen = EllipticCylinder(p(0, 2, 0, 1.0)[:2], s(11, 5.5, 1)[:2], zs(-36), 32 * g)
    trachea = EllipticCylinder(p(0, -22, 0, 1.0)[:2], s(8, 7, 1)[:2], -400.0, zs(-34))
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
    larynx_c, larynx_axes = p(0, -25, 0, 1.0)[:2], s(15, 12, 1, 0.08)[:2]
    oars["Larynx"] = (EllipticCylinder(larynx_c, larynx_axes, zs(-72), zs(-34)), (0, 255, 127))
    z_glottis = zs(-56)
    oars["Larynx_SG"] = (EllipticCylinder(larynx_c, larynx_axes, z_glottis + 3.0 * g, zs(-34)), (0, 220, 100))
    oars["Glottis"] = (EllipticCylinder((larynx_c[0], larynx_c[1] - 2.0), (larynx_axes[0] * 0.75, larynx_axes[1] * 0.7),
                                        z_glottis - 3.0 * g, z_glottis + 3.0 * g), (0, 180, 80))
    constrictor_outer = EllipticCylinder(pharynx_lumen.center_xy_mm, tuple(a + 5.5 * g for a in pharynx_lumen.semi_axes_xy_mm), zs(-40), 28 * g)
    constrictor = constrictor_outer - pharynx_lumen
    oars["Musc_Constrict"] = (constrictor, (255, 105, 180))
    for suffix, lo, hi in (("S", 8.0 * g, 28 * g), ("M", zs(-14), 8.0 * g), ("I", zs(-40), zs(-14))):
        band = EllipticCylinder(pharynx_lumen.center_xy_mm, (200.0, 200.0), lo, hi)
        oars[f"Musc_Constrict_{suffix}"] = (constrictor & band, (255, 105 + 40 * "SMI".index(suffix), 180))
    oars["Esophagus"] = (EllipticCylinder(p(0, -2, 0, 1.0)[:2], s(8, 5.5, 1, 0.08)[:2], -400.0, zs(-40)), (165, 42, 42))
    oars["Cavity_Oral"] = (Ellipsoid(p(0, -33, 12), s(29, 24, 15, 0.08)), (205, 133, 63))
    for side, sign in (("L", 1.0), ("R", -1.0)):
        oars[f"Cochlea_{side}"] = (Ellipsoid(p(sign * 40, 22, 50, 1.0), s(4, 4, 3, 0.05)), (255, 215, 0))
    for side, sign in (("L", 1.0), ("R", -1.0)):
        oars[f"OpticNrv_{side}"] = (Ellipsoid(p(sign * 15, -32, 92, 1.0), s(5, 20, 3, 0.05)), (255, 255, 128))
    oars["OpticChiasm"] = (Ellipsoid(p(0, -8, 94, 1.0), s(9, 5, 2.5, 0.05)), (255, 255, 64))

    # -- targets ------------------------------------------------------------------------------------------
    tumour_sign = 1.0 if rng.random() < 0.5 else -1.0
    r_gtv = float(rng.uniform(8.0, 16.0))
    cx, cy, cz = PRIMARY_CENTRE_MM[tumour_site]
    gtv = Ellipsoid(
        p(tumour_sign * cx, cy, cz, 2.0), (r_gtv, r_gtv * float(rng.uniform(0.8, 1.0)), r_gtv * float(rng.uniform(1.0, 1.2)))
    )
    skin = body.grow(-SKIN_CROP_MM)
    nodal_positive = bool(extra.random() < 0.7)
    gtv_n = None
    if nodal_positive:  # an involved level II/III node, ipsilateral
        r_n = float(extra.uniform(6.0, 11.0))
        node_z = -5.0 if tumour_site in ("oropharynx", "oral_cavity") else -30.0
        gtv_n = Ellipsoid((tumour_sign * 34 * g + float(extra.normal(0, 2)), 4 * g + float(extra.normal(0, 2)),
                           zs(node_z) + float(extra.normal(0, 4))), (r_n, r_n, r_n * 1.2))
    gross = gtv | gtv_n if gtv_n is not None else gtv
    ctv70 = gross.grow(GTV_TO_CTV_MM) & skin
    ptv70 = ctv70.grow(site.ptv_margin_mm) & skin
    z_node_top = float(20 * g + rng.normal(0, 2))
    nodes = EllipticCylinder(p(34, 6, 0)[:2], s(11, 14, 1, 0.08)[:2], zs(-70), z_node_top) | EllipticCylinder(
        p(-34, 6, 0)[:2], s(11, 14, 1, 0.08)[:2], zs(-70), z_node_top
    )
    # Levels III-IV run anterior-medially along the jugular vein, close to the larynx.
    low_axes = (float(extra.uniform(10.0, 13.0)) * g, float(extra.uniform(11.0, 14.0)) * g)
    for sign in (1.0, -1.0):
        nodes = nodes | EllipticCylinder((sign * 29.0 * g + float(extra.normal(0, 1.5)), -8.0 * g + float(extra.normal(0, 1.5))),
                                         low_axes, zs(-75), zs(-20))
    ctv56_true = (nodes | ctv70.grow(5.0)) & skin

    style_rng = style_rng or np.random.default_rng(0)
    style_factor = GUIDELINE_STYLE_FACTOR if after_guideline else 1.0
    noise_mm = CONTOUR_NOISE_MM * (GUIDELINE_NOISE_FACTOR if after_guideline else 1.0)
    contouring: dict[str, dict] = {}

    def styled(name: str, shape: Shape, extra_margin_mm: float = 0.0) -> Shape:
        margin, sx, sy, sz = site.contour_style.get(name, (0.0, 0.0, 0.0, 0.0))
        margin = margin * style_factor + extra_margin_mm + float(style_rng.normal(0.0, noise_mm))
        shift = tuple(v * style_factor + float(style_rng.normal(0.0, 1.5 * noise_mm)) for v in (sx, sy, sz))
        contouring[name] = {"margin_mm": round(margin, 3), "shift_mm": [round(v, 3) for v in shift]}
        return Translate(shape.grow(margin) if abs(margin) > 1e-6 else shape, shift)

    ctv56 = styled("CTV_56", ctv56_true) & skin
    ptv56 = (ctv56.grow(site.ptv_margin_mm) & skin) - ptv70

    structures: dict[str, Structure] = {"External": Structure("External", body, "EXTERNAL", (0, 255, 0))}
    structures["GTV_70"] = Structure("GTV_70", gtv & skin, "GTV", (255, 0, 0))
    if gtv_n is not None:
        structures["GTVn_70"] = Structure("GTVn_70", gtv_n & skin, "GTV", (200, 0, 0))
    structures["CTV_70"] = Structure("CTV_70", ctv70, "CTV", (255, 64, 64))
    structures["PTV_70"] = Structure("PTV_70", ptv70, "PTV", (255, 0, 255))
    structures["CTV_56"] = Structure("CTV_56", ctv56, "CTV", (64, 64, 255))
    structures["PTV_56"] = Structure("PTV_56", ptv56, "PTV", (0, 0, 255))
    bias = site.oar_contour_bias_mm
    true_shapes: dict[str, Shape] = {}
    for name, (shape, color) in oars.items():
        true_shapes[name] = shape & body
        if name in STYLED_STRUCTURES:
            drawn = styled(name, shape, bias)
        else:
            drawn = shape.grow(bias) if abs(bias) > 1e-6 else shape
        structures[name] = Structure(name, drawn & body, "ORGAN", color)
    true_shapes["CTV_56"] = ctv56_true

    # The planted parotid stem-cell regions: a small ellipsoid (~5 % of the gland) in the medial-anterior,
    # cranial part where the major ducts leave the gland (our reading of van Luijk et al., Sci Transl Med
    # 2015; the geometry is illustrative).
    stem_cells: dict[str, Shape] = {}
    for side, sign in (("L", 1.0), ("R", -1.0)):
        gland = oars[f"Parotid_{side}"][0]
        (gx, gy, gz), (a, b, c) = gland.center_mm, gland.semi_axes_mm
        r = 0.36 * (a * b * c) ** (1.0 / 3.0)
        centre = (gx - sign * 0.45 * a, gy - 0.45 * b, gz + 0.25 * c)
        stem_cells[f"Parotid_{side}"] = Ellipsoid(centre, (r, r, r * 1.2)) & gland

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
        meta={"ptv_margin_mm": site.ptv_margin_mm, "oar_contour_bias_mm": bias,
              "neck_length_factor": round(neck_length, 4), "shoulder_z_mm": round(zs(-85) + shoulder_shift_mm, 2),
              "shoulder_half_width_mm": round(shoulder_half_width_mm, 2), "nodal_stage_positive": nodal_positive},
        tumour_site=tumour_site,
        true_shapes=true_shapes,
        stem_cells=stem_cells,
        contouring=contouring,
    )
