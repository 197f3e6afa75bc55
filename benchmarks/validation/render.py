"""An independent kinematic 4D-STEM renderer for the validation set.

Written apart from ``napari_stem_strain.simulate`` (whose data the CC-ST-AE was tuned on) and on
purpose unlike it where real data differ from that simulator:

* disks are integrated over the *area* of each detector pixel (a counting detector), with a
  choice of edge: a sharp condenser aperture, an aperture blurred by a Gaussian (source size,
  partial coherence), or either one then blurred by a detector point-spread function;
* intensities inside each disk are not flat: per grain a linear gradient and a curved fringe
  across the disk (rocking-curve contrast), different for every reflection;
* first-order disks can be strong or very weak (``bragg`` relative to the direct beam), with
  a fixed pseudo-random structure factor per reflection (strong and weak sets);
* a diffuse background centred on the *detector* (a Lorentzian; an amorphous support or
  thermal diffuse scattering does not follow the beam when it is descanned);
* descan as linear ramps across the scan (a mis-set descan coil) rather than a smooth drift;
* Poisson noise at a given dose, or none.

Truth: each grain has one uniform deformation ``F = V R`` (CONVENTIONS.md) relative to the
reference grain; ``A = F^-T``; grain labels are stored so that error splits into a per-grain
bias and a within-grain scatter. The truth maps come from the true ``A`` through the shared
strain maths, relative to the median over the case's reference region - as CONVENTIONS.md
defines the reference - so a region that a grain boundary crosses (a few seeds put another
grain there) still has the same reference for the truth as for the methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from napari_stem_strain.io.ground_truth import GroundTruth, write_ground_truth
from napari_stem_strain.strain import SYMMETRY_DEG, strain_maps, strain_to_A

__all__ = ["Case", "render_case", "write_case_file"]


@dataclass(frozen=True)
class Case:
    """One validation dataset. Everything has a default; a case names what it changes."""

    name: str
    lattice: str = "hex"  # hex | square | rect
    scan: int = 40
    pattern: int = 128
    spacing: float = 24.0  # first-order reciprocal spacing, px
    radius: float = 4.0  # disk radius, px
    edge: str = "sharp"  # sharp | soft
    edge_width: float = 0.6  # soft edge: Gaussian sigma of the aperture blur, px
    psf: float = 0.0  # detector point-spread (Gaussian sigma, px); 0: none
    bragg: float = 0.03  # first-order disk intensity relative to the direct beam (per px)
    weak_ratio: float = 0.5  # weak first-order set relative to the strong one (hex)
    fringe: float = 0.15  # amplitude of the in-disk gradient and fringe (relative)
    background: float = 0.0  # share of the counts in the detector-centred Lorentzian
    background_hwhm: float = 0.09  # Lorentzian half-width, fraction of the detector size
    descan: tuple[float, float, float, float] = (0.5, 0.3, -0.2, 0.4)  # px over the scan:
    # (row shift per scan row, row shift per scan column, column shift per row, ... per column)
    dose: float | None = 1e5  # electrons per pattern; None: noise-free
    vacuum: bool = True  # a strip of vacuum along the last scan column
    n_grains: int = 6
    max_strain: float = 0.015
    max_rotation: float = 20.0
    seed: int = 0

    def file_name(self) -> str:
        return f"{self.name}.h5"


def _basis(lattice: str, L: float) -> np.ndarray:
    if lattice == "hex":
        return np.array([[L, 0.0], [L / 2, L * np.sqrt(3) / 2]])
    if lattice == "square":
        return np.array([[L, 0.0], [0.0, L]])
    if lattice == "rect":
        return np.array([[L, 0.0], [0.0, 1.3 * L]])
    raise ValueError(f"unknown lattice {lattice!r}")


def _grains(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Voronoi grain labels; grain 0 (the reference) holds the scan's top-left corner."""
    n = case.scan
    seeds = rng.uniform(0, n, (case.n_grains, 2))
    seeds[0] = (n * 0.15, n * 0.15)
    ii, jj = np.mgrid[0:n, 0:n]
    d = (ii[..., None] - seeds[:, 0]) ** 2 + (jj[..., None] - seeds[:, 1]) ** 2
    d[..., 0] /= 1.6  # a larger reference grain
    return d.argmin(-1)


def _disk_profile(d: np.ndarray, case: Case) -> np.ndarray:
    """Aperture profile at distance ``d`` (px) from a disk's centre, before pixelation."""
    from scipy.special import erfc

    width = 0.05 if case.edge == "sharp" else case.edge_width
    return 0.5 * erfc((d - case.radius) / (np.sqrt(2) * width))


def render_pattern(case: Case, A: np.ndarray | None, centre: np.ndarray, amps: np.ndarray,
                   hk: np.ndarray, fringes: np.ndarray, sub: int = 12) -> np.ndarray:
    """One noise-free pattern (unit direct-beam level). ``A`` None: vacuum (beam only)."""
    Q = case.pattern
    G0 = _basis(case.lattice, case.spacing)
    img = np.zeros((Q, Q))
    s = (np.arange(sub) + 0.5) / sub - 0.5
    w = int(np.ceil(case.radius + 4 * (case.edge_width if case.edge == "soft" else 0.05))) + 1
    g = hk @ G0 @ (np.eye(2) if A is None else A).T
    for idx, (q, a) in enumerate(zip(centre + g, amps, strict=True)):
        if A is None and idx > 0:
            break
        lo = np.floor(q).astype(int) - w
        if (lo < 0).any() or (lo + 2 * w + 1 > Q).any():
            continue
        x = ((lo[0] + np.arange(2 * w + 1))[:, None] + s[None, :]).reshape(-1)
        y = ((lo[1] + np.arange(2 * w + 1))[:, None] + s[None, :]).reshape(-1)
        dx, dy = x[:, None] - q[0], y[None, :] - q[1]
        disk = _disk_profile(np.hypot(dx, dy), case)
        if idx > 0 and case.fringe > 0:  # rocking-curve contrast inside the disk
            gx, gy, fx, fy, ph = fringes[idx]
            u, v = dx / case.radius, dy / case.radius
            disk = disk * (1 + case.fringe * (gx * u + gy * v)
                           + case.fringe * np.cos(np.pi * (fx * u + fy * v) + ph))
        n = 2 * w + 1
        img[lo[0]:lo[0] + n, lo[1]:lo[1] + n] += a * disk.reshape(n, sub, n, sub).mean((1, 3))
    if case.psf > 0:
        img = ndimage.gaussian_filter(img, case.psf, mode="constant")
    return img


@dataclass
class Draw:
    """Everything random about a case, drawn from ``case.seed`` in a fixed order (the data's
    Poisson noise is drawn after it, from the same generator ``rng``)."""

    rng: np.random.Generator
    labels: np.ndarray  # (n, n) grain of each scan position
    params: np.ndarray  # (n_grains, 4): exx, eyy, exy, theta (deg) of each grain's F
    sample: np.ndarray  # (n, n) bool
    hk: np.ndarray  # (R, 2) reflections, the direct beam first
    amps: np.ndarray  # (R,) their intensities relative to the beam
    grain_fringes: np.ndarray  # (n_grains, R, 5) in-disk gradient and fringe
    lor: np.ndarray  # (Q, Q) the detector-centred background, unit sum

    def centre(self, case: Case, i: int, j: int) -> np.ndarray:
        """The direct beam's position (detector px) at scan position ``(i, j)``: descan."""
        n, Q = case.scan, case.pattern
        c0 = np.array([(Q - 1) / 2 + 0.31, (Q - 1) / 2 - 0.17])
        dr, dc, er, ec = case.descan
        u, v = i / max(1, n - 1) - 0.5, j / max(1, n - 1) - 0.5
        return c0 + np.array([dr * u + dc * v, er * u + ec * v])

    def expected(self, case: Case, A: np.ndarray | None, centre: np.ndarray,
                 grain: int) -> np.ndarray:
        """The pattern's expected counts (or, noise-free, its stored values)."""
        p = render_pattern(case, A, centre, self.amps, self.hk, self.grain_fringes[grain])
        total = p.sum()
        if case.background > 0:
            p = (1 - case.background) * p / total + case.background * self.lor
        else:
            p = p / total
        return p * (1e5 if case.dose is None else case.dose)


def draw(case: Case) -> Draw:
    """The random part of ``case`` (see :class:`Draw`)."""
    rng = np.random.default_rng(case.seed)
    n, Q = case.scan, case.pattern
    labels = _grains(case, rng)
    params = np.zeros((case.n_grains, 4))
    for k in range(1, case.n_grains):
        params[k, :3] = rng.uniform(-case.max_strain, case.max_strain, 3)
        params[k, 3] = rng.uniform(-case.max_rotation, case.max_rotation)
    sample = np.ones((n, n), bool)
    if case.vacuum:
        sample[:, -max(3, n // 10):] = False
    # reflections and their (fixed, pseudo-random) structure factors
    G0 = _basis(case.lattice, case.spacing)
    hk = np.array([(h, k) for h in range(-8, 9) for k in range(-8, 9)])
    hk = hk[np.argsort(np.linalg.norm(hk @ G0, axis=1), kind="stable")]
    glen = np.linalg.norm(hk @ G0, axis=1)
    keep = glen < 0.85 * Q
    hk, glen = hk[keep], glen[keep]
    sf = rng.uniform(0.4, 1.0, len(hk))
    if case.lattice == "hex":  # strong and weak first-order sets, as in a TMD
        sf[(hk[:, 0] - hk[:, 1]) % 3 == 1] *= case.weak_ratio
    amps = case.bragg * sf * np.exp(-0.6 * ((glen / case.spacing) ** 2 - 1))
    amps[0] = 1.0
    grain_fringes = rng.uniform(-1, 1, (case.n_grains, len(hk), 5))
    grain_fringes[..., 2:4] *= 2.0
    grain_fringes[..., 4] *= np.pi
    # Lorentzian background centred on the detector, normalised to unit sum
    ii, jj = np.mgrid[0:Q, 0:Q]
    hw = case.background_hwhm * Q
    lor = 1.0 / (1.0 + ((ii - (Q - 1) / 2) ** 2 + (jj - (Q - 1) / 2) ** 2) / hw**2)
    lor /= lor.sum()
    return Draw(rng, labels, params, sample, hk, amps, grain_fringes, lor)


def render_case(case: Case, folder: Path) -> Path:
    """Render ``case`` into ``folder/NAME.h5`` (4D data at ``/data``, ground truth at
    ``/ground_truth``) and return the path. Deterministic in ``case.seed``."""
    import time

    t0 = time.perf_counter()
    d = draw(case)
    rng, labels, params, sample = d.rng, d.labels, d.params, d.sample
    n, Q = case.scan, case.pattern
    sym = SYMMETRY_DEG[case.lattice]
    data = np.zeros((n, n, Q, Q), np.float32)
    A_true = np.full((n, n, 2, 2), np.nan, np.float32)
    cen = np.zeros((n, n, 2), np.float32)
    for i in range(n):
        for j in range(n):
            c = d.centre(case, i, j)
            cen[i, j] = c
            if sample[i, j]:
                k = labels[i, j]
                A = strain_to_A(*params[k])
                A_true[i, j] = A
                lam = d.expected(case, A, c, k)
            else:
                lam = d.expected(case, None, c, 0)
            data[i, j] = lam if case.dose is None else rng.poisson(lam)
    folder.mkdir(parents=True, exist_ok=True)
    ref = f"0:{max(4, n // 5)},0:{max(4, n // 5)}"
    # the grains' deformations are relative to grain 0; the maps are relative to the
    # region's median, which is grain 0 only where grain 0 holds most of the region
    tm = strain_maps(A_true, ref, sym, sample)
    truth = {k: getattr(tm, k).astype(np.float32) for k in ("exx", "eyy", "exy", "theta")}
    gt = GroundTruth(truth["exx"], truth["eyy"], truth["exy"], truth["theta"], sample, sym, ref,
                     grains=np.where(sample, labels, -1), A=A_true, center=cen,
                     lattice=case.lattice)
    return write_case_file(folder / case.file_name(), data, gt, {
        "validation_case": str(asdict(case)),
        "generation_seconds": round(time.perf_counter() - t0, 1)})


def write_case_file(path: Path, data: np.ndarray, truth: GroundTruth, attrs: dict) -> Path:
    """Write one validation case (4D data at ``/data``, one scan row per chunk; the ground
    truth at ``/ground_truth``; ``attrs`` on the file) under a temporary name, then rename,
    so a killed run never leaves a half case that later runs would take as cached."""
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("data", data=data, chunks=(1, *data.shape[1:]))
        write_ground_truth(h5, truth)
        for k, v in attrs.items():
            h5.attrs[k] = v
    tmp.replace(path)
    return path
