"""Kinematic polycrystal 4D-STEM simulator with ground truth and the published noise model.

The sample is a 2D crystal cut into Voronoi grains; one large *reference* grain is unstrained
and unrotated, every other grain carries a random mean strain (``exx, eyy, exy`` uniform in
``+-max_strain``) and rotation (uniform in ``+-max_rotation`` degrees) plus a smooth variation
inside the grain. Optionally a vacuum region (no crystal) covers an edge of the scan.

Per scan position the deformation gives ``F = V R`` (``strain.strain_to_F``), ``A = F^-T``
and the Bragg vectors ``g = A g0`` of the reference reciprocal lattice ``g0``
(hexagonal WS2-like with alternating strong/weak first-order spots, square, or rectangular).
Each pattern is a soft-edged direct-beam disk at the (descan-drifting) beam centre plus Bragg
disks at ``centre + g`` whose intensity falls with ``|g|``, varies smoothly from position to
position and grain to grain ("dynamical" variation) and carries a slight gradient inside each
disk. Noise follows the CC-ST-AE benchmark: a smooth diffuse background ``B``, normalised to the
same total as the clean pattern ``P``, is mixed in as ``(1 - w) P + w B`` and the result is
drawn as Poisson counts with ``dose`` electrons per pattern.

Everything is deterministic in ``seed``: the truth and the intensity fields come from seeded
generators, and the Poisson noise of scan row ``r`` from its own generator seeded by
``(seed, r)``, so a scan rendered in one block, in rows or in parallel gives identical data,
and :func:`simulate_array` equals the data :func:`simulate_to_file` writes.

Conventions are ``CONVENTIONS.md``'s: arrays ``(Rx, Ry, Qx, Qy)``, vectors ``(x, y)`` =
``(row, col)`` in detector pixels, ``theta`` counter-clockwise from +x toward +y in degrees.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import ndimage

from . import __version__
from .io.ground_truth import GroundTruth, write_ground_truth
from .strain import SYMMETRY_DEG, format_region, strain_to_A, wrap_angle

__all__ = [
    "SimulationSettings",
    "Simulator",
    "simulate_truth",
    "simulate_array",
    "simulate_to_file",
    "iter_blocks",
    "reciprocal_basis",
    "estimate_file_bytes",
    "LATTICES",
]

LATTICES = ("hex", "square", "rect")

#: Real-space lattice constants (nm) used only to give the detector a plausible calibration:
#: WS2 (a = 0.3153 nm) for the hexagonal lattice, 0.4 nm for the square/rectangular ones.
_LATTICE_NM = {"hex": 0.3153, "square": 0.4, "rect": 0.4}

ProgressCallback = Callable[[int, int, str], None]
StopCallback = Callable[[], bool]


@dataclass
class SimulationSettings:
    """Every knob of the simulator; all have defaults. Lengths are in detector pixels unless
    stated otherwise. ``None`` means "derive from the other settings" (see :meth:`resolved`)."""

    #: Scan shape ``(Rx, Ry)``.
    scan: tuple[int, int] = (64, 64)
    #: Detector size ``Q`` (patterns are ``Q x Q``).
    pattern: int = 128
    #: Radius of every disk (direct beam and Bragg), pixels.
    disk_radius: float = 4.0
    #: ``hex`` (WS2-like, 60 deg symmetry), ``square`` (90) or ``rect`` (180).
    lattice: str = "hex"
    #: Background weight ``w`` of the published noise model, ``pattern = (1-w) P + w B``.
    noise: float = 0.0
    #: Electrons per pattern for Poisson noise; ``None`` gives noise-free float patterns.
    dose: float | None = 1e5
    #: Whether an edge region of the scan is vacuum (no crystal).
    vacuum: bool = True
    #: Seed of every random choice.
    seed: int = 0
    #: Number of grains; ``None``: about 8 for a 64x64 scan, growing with the scan's side.
    n_grains: int | None = None
    #: Mean grain strains are uniform in ``+-max_strain`` (each of exx, eyy, exy).
    max_strain: float = 0.02
    #: Mean grain rotations are uniform in ``+-max_rotation`` degrees.
    max_rotation: float = 25.0
    #: Length of the first-order reciprocal vectors, pixels; ``None``: ``0.2 * pattern``.
    g_length: float | None = None
    #: Amplitude (pixels) of the smooth drift of the direct beam across the scan.
    descan: float = 2.0
    #: First-order Bragg disk intensity relative to the direct beam (per pixel).
    bragg_intensity: float = 0.05
    #: Fall of the Bragg intensity with ``|g|``: ``exp(-g_falloff ((|g|/g_length)^2 - 1))``.
    g_falloff: float = 0.5
    #: Relative amplitude of the smooth position-to-position variation of each disk's intensity.
    dynamical: float = 0.3
    #: Relative intensity gradient across a Bragg disk (0 = flat disks).
    disk_gradient: float = 0.05
    #: Width of the soft disk edge ``0.5 (1 - tanh((r - R) / w))``, pixels.
    edge_width: float = 0.7
    #: Amplitude of the smooth strain variation inside grains (not the reference grain).
    intra_strain: float = 0.003
    #: Amplitude (degrees) of the smooth rotation variation inside grains.
    intra_rotation: float = 0.3
    #: Orientation of the reference lattice on the detector (degrees, CCW from +x).
    lattice_angle: float = 0.0
    #: Hexagonal lattice: intensity of the weak first-order set relative to the strong one.
    hex_weak: float = 0.5
    #: Rectangular lattice: ``|g2| / |g1|``.
    rect_ratio: float = 1.3
    #: Fraction of scan positions that are vacuum when ``vacuum`` is set.
    vacuum_fraction: float = 0.18
    #: How much larger than the others the reference grain is (Voronoi distance weight).
    reference_weight: float = 1.3
    #: Grain-to-grain variation of the overall scattering strength (``+-grain_contrast``).
    grain_contrast: float = 0.25
    #: Scan step (nm) recorded as the real-space calibration.
    scan_step: float = 1.0

    # ------------------------------------------------------------------ derived / checking
    def resolved(self) -> SimulationSettings:
        """A copy with every ``None`` replaced by its derived value, validated."""
        self.validate()
        Rx, Ry = self.scan
        n = self.n_grains
        if n is None:
            n = max(2, int(round(8 * math.sqrt(Rx * Ry / 4096.0))))
        g = self.g_length if self.g_length is not None else 0.2 * self.pattern
        if g <= 2 * self.disk_radius:
            raise ValueError(
                f"disk radius {self.disk_radius:g} px is too large for {self.pattern} px "
                f"patterns: first-order disks {g:g} px apart would overlap (use a radius "
                f"below {g / 2:g} px or larger patterns)"
            )
        return replace(self, scan=(int(Rx), int(Ry)), n_grains=int(n), g_length=float(g))

    def validate(self) -> None:
        """Raise ``ValueError`` with one plain line for the first bad setting."""
        try:
            Rx, Ry = (int(v) for v in self.scan)
        except (TypeError, ValueError):
            raise ValueError(f"scan must be two integers (Rx, Ry), not {self.scan!r}") from None
        if Rx < 1 or Ry < 1:
            raise ValueError(f"scan size must be positive, not {Rx}x{Ry}")
        if int(self.pattern) < 8:
            raise ValueError(f"pattern size must be at least 8 pixels, not {self.pattern}")
        if not self.disk_radius > 0:
            raise ValueError(f"disk radius must be positive, not {self.disk_radius}")
        if self.disk_radius > self.pattern / 4:
            raise ValueError(
                f"disk radius {self.disk_radius} px is too large for {self.pattern} px patterns"
            )
        if self.lattice not in LATTICES:
            raise ValueError(f"lattice must be one of {', '.join(LATTICES)}, not {self.lattice!r}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise weight must be in [0, 1), not {self.noise}")
        if self.dose is not None and not (self.dose > 0 and math.isfinite(self.dose)):
            raise ValueError(f"dose must be a positive number of counts, not {self.dose}")
        if self.n_grains is not None and int(self.n_grains) < 1:
            raise ValueError(f"number of grains must be at least 1, not {self.n_grains}")
        if not 0 <= self.max_strain < 0.5:
            raise ValueError(f"max strain must be in [0, 0.5), not {self.max_strain}")
        if not 0 <= self.max_rotation <= 180:
            raise ValueError(f"max rotation must be in [0, 180] degrees, not {self.max_rotation}")
        if self.g_length is not None and not self.g_length > 2 * self.disk_radius:
            raise ValueError(
                f"g length {self.g_length} px must exceed the disk diameter "
                f"{2 * self.disk_radius} px"
            )
        if not self.descan >= 0:
            raise ValueError(f"descan must be >= 0 pixels, not {self.descan}")
        if not self.bragg_intensity >= 0:
            raise ValueError(f"bragg intensity must be >= 0, not {self.bragg_intensity}")
        if not 0 <= self.dynamical < 1:
            raise ValueError(f"dynamical variation must be in [0, 1), not {self.dynamical}")
        if not 0 <= self.disk_gradient <= 0.5:
            raise ValueError(f"disk gradient must be in [0, 0.5], not {self.disk_gradient}")
        if not self.edge_width > 0:
            raise ValueError(f"edge width must be positive, not {self.edge_width}")
        if not 0 <= self.vacuum_fraction <= 0.5:
            raise ValueError(f"vacuum fraction must be in [0, 0.5], not {self.vacuum_fraction}")
        if not 0 <= self.grain_contrast < 1:
            raise ValueError(f"grain contrast must be in [0, 1), not {self.grain_contrast}")
        if not self.reference_weight >= 1:
            raise ValueError(f"reference weight must be >= 1, not {self.reference_weight}")
        if not self.rect_ratio > 0:
            raise ValueError(f"rect ratio must be positive, not {self.rect_ratio}")
        if not self.g_falloff >= 0:
            raise ValueError(f"g falloff must be >= 0, not {self.g_falloff}")

    @property
    def symmetry_deg(self) -> float:
        return SYMMETRY_DEG[self.lattice]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scan"] = list(self.scan)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulationSettings:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "scan" in kw:
            kw["scan"] = tuple(int(v) for v in kw["scan"])
        return cls(**kw)


# ---------------------------------------------------------------------------------- helpers
def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *tags]))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """A smooth random field of max |value| 1 (zero when the shape is a single point)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    f -= f.mean()
    m = np.abs(f).max()
    return f / m if m > 0 else np.zeros(shape)


def reciprocal_basis(lattice: str, g_length: float, angle_deg: float = 0.0,
                     rect_ratio: float = 1.3) -> np.ndarray:
    """The reference reciprocal basis ``[g1, g2]`` as rows, (x, y) detector pixels.

    hex: ``|g1| = |g2|`` at 120 degrees; square: equal at 90; rect: ``|g2| = rect_ratio |g1|``
    at 90. The basis is rotated by ``angle_deg`` (CCW from +x).
    """
    L = float(g_length)
    if lattice == "hex":
        b = np.array([[1.0, 0.0], [math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3)]]) * L
    elif lattice == "square":
        b = np.array([[1.0, 0.0], [0.0, 1.0]]) * L
    elif lattice == "rect":
        b = np.array([[1.0, 0.0], [0.0, rect_ratio]]) * L
    else:
        raise ValueError(f"lattice must be one of {', '.join(LATTICES)}, not {lattice!r}")
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return b @ rot.T


def _reflections(s: SimulationSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(h, k)``, reference vectors ``g0`` (n, 2) and base intensities (n,) of every
    reflection that can land on the detector, strongest first."""
    basis = reciprocal_basis(s.lattice, s.g_length, s.lattice_angle, s.rect_ratio)
    L = float(s.g_length)
    gmax = 0.75 * s.pattern * (1 + 2 * s.max_strain + 2 * s.intra_strain) + s.disk_radius
    kmax = int(math.ceil(gmax / (min(np.linalg.norm(basis, axis=1)) * 0.5))) + 1
    hk, gs, amps = [], [], []
    for h in range(-kmax, kmax + 1):
        for k in range(-kmax, kmax + 1):
            if h == 0 and k == 0:
                continue
            g = h * basis[0] + k * basis[1]
            n = float(np.hypot(*g))
            if n > gmax:
                continue
            sf = 1.0
            if s.lattice == "hex" and (h + k) % 3 == 2:
                sf = s.hex_weak
            amp = sf * math.exp(-s.g_falloff * ((n / L) ** 2 - 1.0))
            if amp < 2e-3:
                continue
            hk.append((h, k))
            gs.append(g)
            amps.append(amp)
    order = np.argsort(-np.asarray(amps), kind="stable")
    return (np.asarray(hk, int).reshape(-1, 2)[order], np.asarray(gs, float).reshape(-1, 2)[order],
            np.asarray(amps, float)[order])


# ------------------------------------------------------------------------------- the truth
def _make_truth(s: SimulationSettings) -> dict[str, np.ndarray]:
    """Grains, vacuum and the per-position strain/rotation (float64, unwrapped theta)."""
    Rx, Ry = s.scan
    rng = _rng(s.seed, 1)
    scale = float(max(Rx, Ry))
    X, Y = np.meshgrid((np.arange(Rx) + 0.5) / scale, (np.arange(Ry) + 0.5) / scale,
                       indexing="ij")
    cx, cy = Rx / 2 / scale, Ry / 2 / scale

    # vacuum: the far side of a slightly wavy line across one edge/corner
    phi = rng.uniform(0, 2 * math.pi)
    d = np.array([math.cos(phi), math.sin(phi)])
    p = (X - cx) * d[0] + (Y - cy) * d[1]
    t = -(X - cx) * d[1] + (Y - cy) * d[0]
    p = p + 0.03 * np.sin(2 * math.pi * rng.uniform(1.0, 2.5) * t + rng.uniform(0, 2 * math.pi))
    if s.vacuum and s.vacuum_fraction > 0 and Rx * Ry > 1:
        thr = np.quantile(p, 1.0 - s.vacuum_fraction)
        sample = p <= thr
        if not sample.any():
            sample = np.ones((Rx, Ry), bool)
    else:
        sample = np.ones((Rx, Ry), bool)

    # Voronoi grains; the reference seed sits on the crystal side, away from the vacuum
    n = int(s.n_grains)
    ref = np.array([cx, cy]) - 0.22 * d + rng.uniform(-0.04, 0.04, 2)
    ref = np.clip(ref, [0.5 / scale, 0.5 / scale], [(Rx - 0.5) / scale, (Ry - 0.5) / scale])
    others = rng.uniform([0, 0], [Rx / scale, Ry / scale], size=(n - 1, 2))
    seeds = np.vstack([ref, others])
    dist = np.hypot(X[..., None] - seeds[:, 0], Y[..., None] - seeds[:, 1])
    dist[..., 0] /= s.reference_weight
    grains = np.argmin(dist, axis=-1).astype(np.int32)
    ri = min(Rx - 1, int(ref[0] * scale))
    rj = min(Ry - 1, int(ref[1] * scale))
    sample[ri, rj] = True
    grains[ri, rj] = 0

    # per-grain mean strain / rotation (grain 0 is the reference: exactly zero)
    mean = np.zeros((n, 4))
    mean[1:, :3] = rng.uniform(-s.max_strain, s.max_strain, size=(n - 1, 3))
    mean[1:, 3] = rng.uniform(-s.max_rotation, s.max_rotation, size=n - 1)
    comp = mean[grains]  # (Rx, Ry, 4)
    sigma = max(1.0, scale / 10.0)
    inside = (grains > 0)[..., None]
    intra = np.stack([_smooth_field(rng, (Rx, Ry), sigma) for _ in range(4)], -1)
    intra *= np.array([s.intra_strain] * 3 + [s.intra_rotation])
    comp = comp + np.where(inside, intra, 0.0)

    # the reference rectangle: the largest (capped) square inside grain 0
    mask0 = (grains == 0) & sample
    cheb = ndimage.distance_transform_cdt(np.pad(mask0, 1), metric="chessboard")[1:-1, 1:-1]
    i, j = np.unravel_index(int(np.argmax(cheb)), cheb.shape)
    dmax = int(cheb[i, j])
    cap = max(2, min(Rx, Ry) // 16)
    hw = min(dmax - 1, cap)
    if hw >= 1:
        region = (slice(i - hw + 1, i + hw), slice(j - hw + 1, j + hw))
    else:
        region = (slice(i, i + 1), slice(j, j + 1))
    assert mask0[region].all()

    grains = np.where(sample, grains, -1).astype(np.int32)
    return {
        "exx": comp[..., 0], "eyy": comp[..., 1], "exy": comp[..., 2], "theta": comp[..., 3],
        "sample": sample, "grains": grains, "reference": format_region(region),
        "n_grains": n,
    }


def _descan(s: SimulationSettings) -> np.ndarray:
    """Direct-beam centre ``(Rx, Ry, 2)``: detector centre plus a smooth linear + quadratic
    drift of maximum amplitude ``descan`` pixels."""
    Rx, Ry = s.scan
    rng = _rng(s.seed, 4)
    u, v = np.meshgrid(np.linspace(-0.5, 0.5, Rx), np.linspace(-0.5, 0.5, Ry), indexing="ij")
    terms = np.stack([u, v, u * u - 1 / 12, u * v, v * v - 1 / 12], -1)
    coef = rng.standard_normal((5, 2)) * np.array([1, 1, 0.3, 0.3, 0.3])[:, None]
    shift = terms @ coef
    m = np.hypot(shift[..., 0], shift[..., 1]).max()
    if m > 0:
        shift *= s.descan / m
    return shift + s.pattern / 2.0


# ------------------------------------------------------------------------------ simulator
class Simulator:
    """Holds the truth and every precomputed field; renders any block of scan rows.

    ``render_rows(r0, r1)`` is a pure function of the settings and the row range: rows
    rendered in any grouping give identical values.
    """

    def __init__(self, settings: SimulationSettings | None = None) -> None:
        s = (settings or SimulationSettings()).resolved()
        self.settings = s
        Rx, Ry = s.scan
        t = _make_truth(s)
        self.sym = s.symmetry_deg
        self.sample = t["sample"]
        self.grains = t["grains"]
        self.reference = t["reference"]
        A = strain_to_A(t["exx"], t["eyy"], t["exy"], t["theta"])
        self._A_render = A.astype(np.float64)  # finite everywhere (vacuum gets no disks)
        A_true = A.copy()
        A_true[~self.sample] = np.nan
        self.A = A_true
        nan = np.where(self.sample, 1.0, np.nan)
        self.truth = GroundTruth(
            exx=(t["exx"] * nan).astype(np.float32),
            eyy=(t["eyy"] * nan).astype(np.float32),
            exy=(t["exy"] * nan).astype(np.float32),
            theta=(wrap_angle(t["theta"], self.sym) * nan).astype(np.float32),
            sample=self.sample.copy(),
            symmetry_deg=self.sym,
            reference=self.reference,
            grains=self.grains.copy(),
            A=A_true.astype(np.float32),
            center=None,
            lattice=s.lattice,
        )
        self.center = _descan(s)
        self.truth.center = self.center.astype(np.float32)

        # reflections and their intensity fields
        self.hk, self.g0, base = _reflections(s)
        nref = len(self.g0)
        rng = _rng(s.seed, 2)
        sigma = max(1.0, max(Rx, Ry) / 12.0)
        smooth = np.stack([_smooth_field(rng, (Rx, Ry), sigma) for _ in range(nref + 1)], -1)
        n = int(s.n_grains)
        per_grain = rng.uniform(-1, 1, size=(n, nref + 1))
        g_idx = np.maximum(self.grains, 0)
        dyn = (1 + s.dynamical * smooth) * (1 + 0.5 * s.dynamical * per_grain[g_idx])
        dyn = np.clip(dyn, 0.05, None)
        ang = rng.uniform(0, 2 * math.pi, size=(n, nref))
        self.disk_grad = s.disk_gradient * np.stack([np.cos(ang), np.sin(ang)], -1)  # (n,nref,2)
        # each grain scatters more or less as a whole (thickness, zone-axis tilt): the contrast
        # between grains that virtual dark-field images show; the reference grain is nominal
        strength = 1 + rng.uniform(-s.grain_contrast, s.grain_contrast, size=n)
        strength[0] = 1.0
        k = strength[g_idx]
        bragg = s.bragg_intensity * base[None, None, :] * dyn[..., 1:] * k[..., None]
        self.bragg_amp = np.where(self.sample[..., None], bragg, 0.0).astype(np.float32)
        # direct beam: 1 in vacuum; in crystal weaker, the more so the more the grain scatters
        direct = 0.85 * (1 + 0.5 * s.dynamical * smooth[..., 0]) * (1 - 0.5 * (k - 1))
        self.direct_amp = np.where(self.sample, direct, 1.0).astype(np.float32)

        # background: broad falloff around the beam, an amorphous ring, and a few smooth
        # detector-space structures whose weights vary slowly over the scan
        rng_b = _rng(s.seed, 3)
        Q = s.pattern
        self.bg_struct = np.stack(
            [_smooth_field(rng_b, (Q, Q), Q / 10.0) for _ in range(3)], 0
        ).astype(np.float32)
        self.bg_weights = (0.35 * np.stack(
            [_smooth_field(rng_b, (Rx, Ry), sigma) for _ in range(3)], -1)).astype(np.float32)
        self.bg_r0 = Q / 8.0
        self.bg_ring_r = 0.8 * s.g_length
        self.bg_ring_w = 0.2 * s.g_length
        self.bg_ring_amp = 0.3
        self._radial_cache: dict[tuple[int, int], np.ndarray] = {}

        R, w = s.disk_radius, s.edge_width
        self._h = int(math.ceil(R + 4 * w)) + 1
        self._pad = 2 * self._h

    # ---------------------------------------------------------------------- rendering
    @property
    def shape(self) -> tuple[int, int, int, int]:
        Rx, Ry = self.settings.scan
        return Rx, Ry, self.settings.pattern, self.settings.pattern

    def clean_rows(self, r0: int, r1: int) -> np.ndarray:
        """Noise-free kinematic patterns ``P`` of rows ``r0:r1`` (float32)."""
        s = self.settings
        Ry = s.scan[1]
        Q = s.pattern
        N = (r1 - r0) * Ry
        h, pad = self._h, self._pad
        S = Q + 2 * pad
        buf = np.zeros((N, S, S), np.float32)
        flat_buf = buf.reshape(-1)
        centre = self.center[r0:r1].reshape(N, 2)
        A = self._A_render[r0:r1].reshape(N, 2, 2)
        offs = np.arange(-h, h + 1, dtype=np.int64)
        R = np.float32(s.disk_radius)
        two_inv_w = np.float32(2.0 / s.edge_width)

        def add(c: np.ndarray, amp: np.ndarray, grad: np.ndarray | None) -> None:
            ok = (amp > 0) & np.all((c >= -h) & (c <= Q - 1 + h), axis=1)
            sel = np.flatnonzero(ok)
            if sel.size == 0:
                return
            cs = c[sel]
            ci = np.rint(cs).astype(np.int64)
            px = ci[:, 0, None] + offs  # (M, P)
            py = ci[:, 1, None] + offs
            dx = (px - cs[:, 0, None]).astype(np.float32)
            dy = (py - cs[:, 1, None]).astype(np.float32)
            r = np.sqrt(dx[:, :, None] ** 2 + dy[:, None, :] ** 2)
            # soft edge 0.5 (1 - tanh((r - R) / w)) written as a logistic (faster, identical)
            z = (r - R) * two_inv_w
            np.minimum(z, 60.0, out=z)
            prof = 1.0 / (1.0 + np.exp(z))
            prof *= amp[sel, None, None]
            if grad is not None:
                gs = grad[sel].astype(np.float32) / R
                prof *= (1 + gs[:, 0, None, None] * dx[:, :, None]
                         + gs[:, 1, None, None] * dy[:, None, :])
            flat = ((sel * S)[:, None] + px + pad)[:, :, None] * S + (py + pad)[:, None, :]
            flat_buf[flat] += prof

        add(centre, self.direct_amp[r0:r1].reshape(N), None)
        g = np.einsum("nij,kj->nki", A, self.g0)  # (N, nref, 2)
        amps = self.bragg_amp[r0:r1].reshape(N, -1)
        gidx = np.maximum(self.grains[r0:r1].reshape(N), 0)
        for k in range(len(self.g0)):
            grad = self.disk_grad[gidx, k] if s.disk_gradient > 0 else None
            add(centre + g[:, k], amps[:, k], grad)
        out = buf[:, pad:pad + Q, pad:pad + Q]
        return np.ascontiguousarray(out).reshape(r1 - r0, Ry, Q, Q)

    def _radial(self, key: tuple[int, int]) -> np.ndarray:
        """Beam-centred part of the background (broad falloff + amorphous ring) for a beam
        centre quantised to 1/4 pixel; cached, since the descan visits few such centres."""
        prof = self._radial_cache.get(key)
        if prof is None:
            Q = self.settings.pattern
            q = np.arange(Q, dtype=np.float64)
            r2 = (q[:, None] - key[0] / 4.0) ** 2 + (q[None, :] - key[1] / 4.0) ** 2
            x = 1.0 / (1.0 + r2 / self.bg_r0**2)
            ring = np.exp(-0.5 * ((np.sqrt(r2) - self.bg_ring_r) / self.bg_ring_w) ** 2)
            prof = (x * np.sqrt(x) + self.bg_ring_amp * ring).astype(np.float32)
            self._radial_cache[key] = prof
        return prof

    def background_rows(self, r0: int, r1: int) -> np.ndarray:
        """The un-normalised diffuse background ``B`` of rows ``r0:r1`` (float32): a broad
        falloff and a faint amorphous ring around the beam, modulated by a few smooth
        detector-space structures whose weights drift slowly over the scan."""
        s = self.settings
        Ry, Q = s.scan[1], s.pattern
        N = (r1 - r0) * Ry
        keys = np.rint(self.center[r0:r1].reshape(N, 2) * 4).astype(np.int64)
        wts = self.bg_weights[r0:r1].reshape(N, -1)
        B = (wts @ self.bg_struct.reshape(len(self.bg_struct), -1)).reshape(N, Q, Q)
        B += 1.0
        np.maximum(B, 0.1, out=B)
        for n in range(N):
            B[n] *= self._radial((int(keys[n, 0]), int(keys[n, 1])))
        return B.reshape(r1 - r0, Ry, Q, Q)

    def render_rows(self, r0: int, r1: int) -> np.ndarray:
        """Final patterns of rows ``r0:r1``: background mixed in, then Poisson counts (float32
        holding whole numbers) when ``dose`` is set."""
        s = self.settings
        P = self.clean_rows(r0, r1)
        tot = P.sum(axis=(2, 3), keepdims=True)
        if s.noise > 0:
            B = self.background_rows(r0, r1)
            B *= tot / B.sum(axis=(2, 3), keepdims=True)
            P = np.float32(1 - s.noise) * P + np.float32(s.noise) * B
            tot = P.sum(axis=(2, 3), keepdims=True)
        if s.dose is None:
            return P.astype(np.float32, copy=False)
        lam = P * (np.float32(s.dose) / tot)
        out = np.empty_like(lam)
        for i, r in enumerate(range(r0, r1)):
            out[i] = _rng(s.seed, 100, r).poisson(lam[i])
        return out

    def max_count_bound(self) -> float:
        """A safe upper bound of any pixel count (for choosing the file's integer type).

        No pixel holds a larger share of a pattern than the centre pixel of a lone direct-beam
        disk (a vacuum pattern): Bragg disks and the background only add to the total. The
        bound is that share of the dose plus ten standard deviations of Poisson noise.
        """
        s = self.settings
        if s.dose is None:
            return float("inf")
        h = self._h
        d = np.arange(-h, h + 1, dtype=np.float64)
        r = np.hypot(d[:, None], d[None, :])
        disk = 0.5 * (1 - np.tanh((r - s.disk_radius) / s.edge_width))
        peak = float(s.dose) * float(disk.max() / disk.sum())
        return peak + 10 * math.sqrt(peak) + 50


# ------------------------------------------------------------------------------ public API
def simulate_truth(settings: SimulationSettings | None = None) -> tuple[GroundTruth, np.ndarray]:
    """Ground truth and the true ``A`` ``(Rx, Ry, 2, 2)`` (relative to the reference lattice,
    NaN in vacuum) without rendering any pattern."""
    sim = Simulator(settings)
    return sim.truth, sim.A


def simulate_array(
    settings: SimulationSettings | None = None, workers: int | None = None
) -> tuple[np.ndarray, GroundTruth]:
    """A small in-memory dataset ``(Rx, Ry, Q, Q)`` float32 (counts when ``dose`` is set) and
    its ground truth. ``workers`` threads render blocks of rows in parallel (default: the
    CPU count, at most 8); the result does not depend on it."""
    sim = Simulator(settings)
    data = np.empty(sim.shape, np.float32)
    for r0, r1, block in iter_blocks(sim, workers):
        data[r0:r1] = block
    return data, sim.truth


def _rows_per_block(s: SimulationSettings) -> int:
    """Rows rendered together: about 256 patterns, at least one row."""
    return max(1, 256 // max(1, s.scan[1]))


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def iter_blocks(
    sim: Simulator, workers: int | None = None, should_stop: StopCallback | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(r0, r1, patterns)`` for consecutive blocks of scan rows, in order, rendered by
    ``workers`` threads (numpy releases the GIL in the heavy loops) with at most a couple of
    blocks per thread in flight, so memory stays bounded. ``should_stop`` is polled before
    each block is handed out and raises :class:`~napari_stem_strain.progress.Cancelled`."""
    from .progress import check_stop

    Rx = sim.settings.scan[0]
    step = _rows_per_block(sim.settings)
    starts = list(range(0, Rx, step))
    workers = _default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(starts) == 1:
        for r0 in starts:
            check_stop(should_stop)
            r1 = min(Rx, r0 + step)
            yield r0, r1, sim.render_rows(r0, r1)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simulate") as ex:
        pending: deque = deque()
        it = iter(starts)
        try:
            while True:
                while len(pending) < 2 * workers:
                    r0 = next(it, None)
                    if r0 is None:
                        break
                    r1 = min(Rx, r0 + step)
                    pending.append((r0, r1, ex.submit(sim.render_rows, r0, r1)))
                if not pending:
                    return
                check_stop(should_stop)
                r0, r1, fut = pending.popleft()
                yield r0, r1, fut.result()
        finally:
            for *_, fut in pending:
                fut.cancel()


def _file_dtype(sim: Simulator) -> np.dtype:
    if sim.settings.dose is None:
        return np.dtype(np.float32)
    return np.dtype(np.uint16) if sim.max_count_bound() <= 65535 else np.dtype(np.uint32)


def estimate_file_bytes(settings: SimulationSettings) -> int:
    """Roughly how many bytes :func:`simulate_to_file` writes (uncompressed)."""
    s = settings.resolved()
    Rx, Ry = s.scan
    item = 4 if s.dose is None else 2
    return Rx * Ry * s.pattern * s.pattern * item + Rx * Ry * 64


def simulate_to_file(
    path: str | os.PathLike,
    settings: SimulationSettings | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    compression: str | None = None,
    workers: int | None = None,
) -> Path:
    """Simulate a dataset straight to an HDF5 file, one block of scan rows at a time.

    Layout: ``/data`` ``(Rx, Ry, Q, Q)`` (chunks of one scan row; uint16/uint32 counts with a
    dose, float32 without) with calibration and settings attributes, and ``/ground_truth``.
    The file is written under a temporary name in the same folder and renamed when complete,
    so a crash or cancel never leaves a half-written file under ``path``. ``compression`` may
    be ``None``, ``"gzip"`` or ``"lzf"``; ``workers`` threads render rows in parallel (the data
    do not depend on it). ``progress(done, total, message)`` counts scan positions;
    ``should_stop()`` is polled between blocks and raises ``Cancelled``.
    """
    from .io.results import check_writable
    from .progress import check_stop

    s = (settings or SimulationSettings()).resolved()
    path = Path(path)
    check_writable(path, estimate_file_bytes(s))
    t0 = time.perf_counter()
    sim = Simulator(s)
    Rx, Ry, Q, _ = sim.shape
    dtype = _file_dtype(sim)
    info = np.iinfo(dtype).max if dtype.kind == "u" else None
    q_cal = (2.0 / (math.sqrt(3) * _LATTICE_NM["hex"]) if s.lattice == "hex"
             else 1.0 / _LATTICE_NM[s.lattice]) / s.g_length
    comp_kw: dict[str, Any] = {}
    if compression:
        if compression not in ("gzip", "lzf"):
            raise ValueError(f"compression must be gzip, lzf or none, not {compression!r}")
        comp_kw = {"compression": compression}
        if compression == "gzip":
            comp_kw["compression_opts"] = 1
        comp_kw["shuffle"] = True

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        _chmod_like_new_file(tmp)
        with h5py.File(tmp, "w") as h5:
            dset = h5.create_dataset("data", shape=(Rx, Ry, Q, Q), dtype=dtype,
                                     chunks=(1, Ry, Q, Q), **comp_kw)
            a = dset.attrs
            a["r_pixel_size"] = float(s.scan_step)
            a["r_units"] = "nm"
            a["q_pixel_size"] = float(q_cal)
            a["q_units"] = "1/nm"
            a["dims"] = "Rx,Ry,Qx,Qy"
            a["simulation_settings"] = s.to_json()
            a["reference"] = sim.reference
            a["symmetry_deg"] = float(s.symmetry_deg)
            a["detector_center"] = np.array([Q / 2.0, Q / 2.0])
            write_ground_truth(h5, sim.truth)
            h5.attrs["software_version"] = f"napari-stem-strain {__version__}"
            h5.attrs["title"] = (
                f"simulated {s.lattice} polycrystal, {Rx}x{Ry} scan of {Q}x{Q} patterns "
                f"(noise {s.noise}, dose {s.dose})"
            )
            h5.attrs["simulation_settings"] = s.to_json()
            total = Rx * Ry
            if progress is not None:
                progress(0, total, "simulating")
            for r0, r1, block in iter_blocks(sim, workers, should_stop):
                if info is not None:
                    np.minimum(block, info, out=block)
                dset[r0:r1] = block.astype(dtype)
                if progress is not None:
                    progress(r1 * Ry, total, f"{r1}/{Rx} rows")
            check_stop(should_stop)
            h5.attrs["seconds"] = time.perf_counter() - t0
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _chmod_like_new_file(path: str) -> None:
    """mkstemp creates 0600 files; give the result the permissions a plain new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass
