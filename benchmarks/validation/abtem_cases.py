"""Independent multislice validation datasets, simulated with abTEM (1.0).

Physics choices: every grain is a finite flake (a disc or cylinder of the crystal, radius
``flake_radius``) deformed by its own ``F = V R`` (CONVENTIONS.md) acting on the atoms' ``(x, y)``
(``z`` untouched) and centred in the *same* orthogonal, vacuum-padded box for all grains, so no
strain or rotation ever clashes with periodic boundaries and the reciprocal sampling ``1/box`` is
shared by every pattern. abTEM's array axes are ``(x, y)`` in real space and ``(kx, ky)`` in the
far field, which we keep as ``(row, col)``, so ``g = A g0`` with ``A = F^-T`` holds on the
detector (checked numerically by ``--check``). The far field is sampled at ``1/box``, twice finer
than the detector, and binned 2 x 2 (an area-integrating pixel) to 128 x 128 px; the real-space
sampling keeps the whole 128 px square (corners included) inside abTEM's anti-aliasing pass
band. The convergence semiangle makes the disks ~4 px in radius with first-order spots ~24 px
from the beam (200 kV, lambda = 0.0251 A), i.e. well separated, as in nanobeam strain mapping.
Multislice (infinite projection, IAM) gives real dynamical intensities inside the disks, frozen
phonons (own Gaussian displacements, sigma 0.08 A, averaged over configurations) give thermal
diffuse scattering, and a ~2 nm amorphous carbon support (random sequential addition, 1.4 A
minimum distance at 2 g/cm^3, a fresh periodic translation per grain) gives a genuinely diffuse,
beam-following background; the vacuum strip is the probe through the support alone. Descan is
emulated as a beam tilt: each grain has a few probe variants (tilt along the descan ramp and a
small probe-position offset), which change the dynamical excitation; because abTEM's tilt only
enters the propagator, the matching detector shift (``tilt / lambda``) is applied explicitly,
exactly per scan position, by a bilinear sub-pixel shift at the fine sampling before binning. A
Gaussian detector point-spread function is applied before Poisson noise at the case's dose
(electrons per pattern incident; counts lost outside the detector are simply lost).
Noise-free fine-sampled patterns are cached per physics setting, so dose variants are cheap.

Usage::

    PYTHONPATH=src python benchmarks/validation/abtem_cases.py [--cases NAME ...] [--force]
        [--resimulate]   # --force rewrites files (reusing cached patterns); --resimulate also
                         # recomputes the multislice patterns
    PYTHONPATH=src python benchmarks/validation/abtem_cases.py --check abtem_ws2_3layer
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from render import write_case_file  # benchmarks/validation is on sys.path when run
from scipy import ndimage
from scipy.spatial import cKDTree

from napari_stem_strain.io.ground_truth import GroundTruth
from napari_stem_strain.strain import SYMMETRY_DEG, strain_to_A, strain_to_F, wrap_angle

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "bench_data" / "validation"
CACHE_DIR = OUT_DIR / "abtem_cache"

ENERGY = 200e3  # eV
Q = 128  # detector pixels (binned)
BIN = 2  # fine far-field pixels per detector pixel
MARGIN = 4  # fine pixels kept around the crop for the descan shift


def wavelength(energy: float = ENERGY) -> float:
    """Relativistic electron wavelength [A]."""
    m0c2, e_h_c = 510998.95, 12.398419843320026e3  # eV; h c in eV A
    return e_h_c / np.sqrt(energy * (2 * m0c2 + energy))


@dataclass(frozen=True)
class Physics:
    """Everything that determines the noise-free patterns (one cache per physics name)."""

    name: str
    crystal: str  # ws2_2h3 | si001
    box: float  # A, square box side (reciprocal detector pixel = BIN / box)
    gpts: int = 576
    flake_radius: float = 36.0  # A
    thickness: float = 0.0  # A (bulk crystals only)
    slice_thickness: float = 2.0  # A
    num_configs: int = 4  # frozen phonon configurations
    sigma_fp: float = 0.08  # A
    carbon_thickness: float = 20.0  # A; 0: no support
    disk_radius_px: float = 4.0
    variants: int = 4  # probe variants (tilt / position) per grain
    seed: int = 0


@dataclass(frozen=True)
class Case:
    name: str
    physics: Physics
    lattice: str
    dose: float = 1e5
    psf: float = 0.7  # detector PSF sigma (detector px), applied before the noise
    scan: int = 32
    n_grains: int = 5
    vacuum_cols: int = 3
    max_strain: float = 0.015
    max_rotation: float = 15.0
    descan: tuple[float, float, float, float] = (0.8, 0.4, -0.3, 0.6)  # detector px over the
    # scan: (row shift per scan row, row per scan column, column per row, column per column)
    seed: int = 1


WS2 = Physics("ws2_3layer", "ws2_2h3", box=131.0)
SI = Physics("si001_thick", "si001", box=92.2, thickness=150.0, flake_radius=36.0)
CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("abtem_ws2_3layer", WS2, "hex", dose=1e5),
        Case("abtem_si001_thick", SI, "square", dose=1e5, seed=6),
        Case("abtem_ws2_3layer_lowdose", WS2, "hex", dose=2e4),
    )
}


# --------------------------------------------------------------------------- structures
def _ws2_trilayer_cell() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2H-WS2 trilayer (ABA): numbers, Cartesian positions [A] and the 2D cell (rows a1, a2).
    The second layer is the first one rotated by 180 degrees about z (sites B <-> C) and raised
    by c/2 = 6.16 A, as in the P6_3/mmc bulk; the third repeats the first at c."""
    from ase.build import mx2

    layer = mx2("WS2", kind="2H", a=3.153, thickness=3.19, size=(1, 1, 1), vacuum=0.0)
    cell = np.asarray(layer.cell)[:2, :2]
    frac = layer.get_scaled_positions(wrap=False)[:, :2]
    z = layer.positions[:, 2] - layer.positions[:, 2].mean()
    nums, pos = [], []
    for sign, dz in ((1, 0.0), (-1, 6.16), (1, 12.32)):
        f = np.mod(sign * frac, 1.0)
        xy = f @ cell
        nums.append(layer.numbers)
        pos.append(np.column_stack([xy, z + dz]))
    return np.concatenate(nums), np.concatenate(pos), cell


def _si_cell() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from ase.build import bulk

    si = bulk("Si", "diamond", a=5.431, cubic=True)
    return si.numbers, si.positions, np.asarray(si.cell)[:2, :2], 5.431


def flake(phys: Physics, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atoms (numbers, positions) of one deformed flake centred at the box centre (x, y);
    ``z`` starts at 1 A."""
    R = phys.flake_radius
    if phys.crystal == "ws2_2h3":
        nums0, pos0, cell = _ws2_trilayer_cell()
        reps_z = 1
        cz = 0.0
    elif phys.crystal == "si001":
        nums0, pos0, cell, cz = _si_cell()
        reps_z = max(1, int(round(phys.thickness / cz)))
    else:
        raise ValueError(phys.crystal)
    n = int(np.ceil(1.6 * R / min(np.linalg.norm(cell, axis=1)))) + 2
    ii, jj, kk = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), np.arange(reps_z),
                             indexing="ij")
    t = np.column_stack([ii.ravel(), jj.ravel()]) @ cell
    tz = kk.ravel() * cz
    pos = (pos0[None, :, :] + np.column_stack([t, tz])[:, None, :]).reshape(-1, 3)
    nums = np.tile(nums0, len(t))
    keep = np.hypot(pos[:, 0], pos[:, 1]) <= R
    pos, nums = pos[keep], nums[keep]
    pos[:, :2] = pos[:, :2] @ np.asarray(F).T  # x' = F x on (x, y)
    pos[:, :2] += phys.box / 2
    pos[:, 2] += 1.0 - pos[:, 2].min()
    return nums, pos


def amorphous_carbon(phys: Physics, rng: np.random.Generator, dmin: float = 1.4,
                     density: float = 2.0) -> np.ndarray:
    """Random sequential addition of C atoms in a (box x box x thickness) slab, periodic in x, y,
    with a minimum distance ``dmin`` [A] and mass density ``density`` [g/cm^3]."""
    L, T = phys.box, phys.carbon_thickness
    target = int(density / 12.011 * 0.60221408 * L * L * T)  # atoms (N_A 1e-24 A^3/cm^3)
    pts = np.zeros((0, 3))
    for _ in range(200):
        need = target - len(pts)
        if need <= 0:
            break
        cand = rng.uniform((0, 0, 0), (L, L, T), (max(2 * need, 1000), 3))
        if len(pts):
            tree = cKDTree(np.column_stack([pts[:, :2], pts[:, 2]]), boxsize=(L, L, 1e9))
            d, _ = tree.query(cand, k=1)
            cand = cand[d >= dmin]
        ctree = cKDTree(cand, boxsize=(L, L, 1e9))
        bad = np.zeros(len(cand), bool)
        for a, b in ctree.query_pairs(dmin, output_type="ndarray"):
            if not bad[a]:
                bad[b] = True
        cand = cand[~bad][:need]
        pts = np.concatenate([pts, cand])
    return pts


# --------------------------------------------------------------------------- simulation
def _geometry(phys: Physics) -> dict[str, float]:
    lam = wavelength()
    dk = BIN / phys.box  # 1/A per detector pixel
    alpha = phys.disk_radius_px * dk * lam * 1e3  # mrad
    return {"wavelength": lam, "dk_detector": dk, "dk_fine": 1 / phys.box, "alpha_mrad": alpha,
            "sampling": phys.box / phys.gpts}


def simulate_grain(phys: Physics, F: np.ndarray | None, tilts: np.ndarray,
                   offsets: np.ndarray, carbon: np.ndarray | None,
                   rng: np.random.Generator) -> np.ndarray:
    """Noise-free fine far-field crops (variants, S, S), S = 2*(BIN*Q/2 + MARGIN), direct beam
    at index S/2, each normalised by its full-plane total. ``F`` None: support only."""
    import abtem
    from ase import Atoms

    abtem.config.set({"dask.lazy": False, "device": "cpu"})
    geo = _geometry(phys)
    N = phys.gpts
    half = BIN * Q // 2 + MARGIN
    out = np.zeros((len(tilts), 2 * half, 2 * half))
    if F is not None:
        nums, pos = flake(phys, F)
    else:
        nums, pos = np.zeros(0, int), np.zeros((0, 3))
    zc = pos[:, 2].max() + 2.0 if len(pos) else 1.0
    if carbon is not None and len(carbon):
        c = carbon.copy()
        c[:, :2] = np.mod(c[:, :2] + rng.uniform(0, phys.box, 2), phys.box)
        c[:, 2] += zc
        nums = np.concatenate([nums, np.full(len(c), 6)])
        pos = np.concatenate([pos, c])
    height = (pos[:, 2].max() + 2.0) if len(pos) else 2.0
    for _ in range(phys.num_configs):
        p = pos + rng.normal(0.0, phys.sigma_fp, pos.shape)
        p[:, :2] = np.mod(p[:, :2], phys.box)
        atoms = Atoms(numbers=nums, positions=p, cell=[phys.box, phys.box, height], pbc=True)
        pot = abtem.Potential(atoms, gpts=N, slice_thickness=phys.slice_thickness,
                              projection="infinite").build()
        for v, (tilt, off) in enumerate(zip(tilts, offsets, strict=True)):
            probe = abtem.Probe(energy=ENERGY, semiangle_cutoff=geo["alpha_mrad"],
                                tilt=(float(tilt[0]), float(tilt[1])))
            pos_probe = np.array([[phys.box / 2 + off[0], phys.box / 2 + off[1]]])
            waves = probe.multislice(pot, scan=pos_probe)
            arr = np.asarray(waves.array).reshape(N, N)
            inten = np.abs(np.fft.fftshift(np.fft.fft2(arr))) ** 2
            inten /= inten.sum()
            c0 = N // 2
            out[v] += inten[c0 - half:c0 + half, c0 - half:c0 + half]
    return out / phys.num_configs


def _grains(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi labels; grain 0 (the reference, enlarged) holds the top-left corner."""
    seeds = rng.uniform(0, n, (k, 2))
    seeds[0] = (n * 0.12, n * 0.12)
    ii, jj = np.mgrid[0:n, 0:n]
    d = (ii[..., None] - seeds[:, 0]) ** 2 + (jj[..., None] - seeds[:, 1]) ** 2
    d[..., 0] /= 2.0
    return d.argmin(-1)


def _plan(case: Case) -> dict:
    """Grain labels, per-grain deformation parameters, descan and variant assignment."""
    rng = np.random.default_rng(case.seed)
    n = case.scan
    labels = _grains(n, case.n_grains, rng)
    params = np.zeros((case.n_grains, 4))
    for k in range(1, case.n_grains):
        params[k, :3] = rng.uniform(-case.max_strain, case.max_strain, 3)
        params[k, 3] = rng.uniform(-case.max_rotation, case.max_rotation)
    sample = np.ones((n, n), bool)
    sample[:, n - case.vacuum_cols:] = False
    ii, jj = np.mgrid[0:n, 0:n]
    u, v = ii / (n - 1) - 0.5, jj / (n - 1) - 0.5
    dr, dc, er, ec = case.descan
    shift = np.stack([dr * u + dc * v, er * u + ec * v], -1)  # detector px
    K = case.physics.variants
    s = (u + v) / 2
    variant = np.clip(np.floor((s + 0.5) * K), 0, K - 1).astype(int)
    sk = (np.arange(K) + 0.5) / K - 0.5
    var_shift = np.stack([(dr + dc) * sk, (er + ec) * sk], -1)  # px at u = v = sk
    geo = _geometry(case.physics)
    tilts = var_shift * geo["dk_detector"] * geo["wavelength"] * 1e3  # mrad
    offsets = np.random.default_rng(case.physics.seed + 7).uniform(-1.5, 1.5, (K, 2))
    return {"labels": labels, "params": params, "sample": sample, "shift": shift,
            "variant": variant, "tilts": tilts, "offsets": offsets}


def noise_free(case: Case, force: bool = False) -> np.ndarray:
    """Cached noise-free fine crops, (n_grains + 1, variants, S, S); the last is the vacuum
    (support only) pattern set."""
    phys = case.physics
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{phys.name}_seed{case.seed}.npy"
    if path.exists() and not force:
        return np.load(path)
    plan = _plan(case)
    rng = np.random.default_rng(phys.seed)
    carbon = amorphous_carbon(phys, rng) if phys.carbon_thickness > 0 else None
    sets = []
    for k in range(case.n_grains):
        t0 = time.time()
        F = strain_to_F(*plan["params"][k])
        sets.append(simulate_grain(phys, F, plan["tilts"], plan["offsets"], carbon, rng))
        print(f"  {phys.name}: grain {k} {time.time() - t0:.0f} s", flush=True)
    sets.append(simulate_grain(phys, None, plan["tilts"], plan["offsets"], carbon, rng))
    arr = np.asarray(sets, np.float32)
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def detector_pattern(fine: np.ndarray, shift_px: np.ndarray, psf: float) -> np.ndarray:
    """Shift a fine crop by ``shift_px`` detector pixels (bilinear at the fine sampling), bin
    BIN x BIN to Q x Q and blur by the PSF. The direct beam lands at
    ``(BIN*Q/2 - 0.5)/BIN + shift_px``."""
    shifted = ndimage.shift(fine, BIN * np.asarray(shift_px), order=1, mode="constant")
    crop = shifted[MARGIN:MARGIN + BIN * Q, MARGIN:MARGIN + BIN * Q]
    img = crop.reshape(Q, BIN, Q, BIN).sum((1, 3))
    if psf > 0:
        img = ndimage.gaussian_filter(img, psf, mode="constant")
    return img


def beam_centre0() -> np.ndarray:
    return np.full(2, (BIN * Q / 2 - 0.5) / BIN)


def make_case(case: Case, force_cache: bool = False) -> Path:
    t0 = time.time()
    plan = _plan(case)
    fine = noise_free(case, force_cache)
    n = case.scan
    rng = np.random.default_rng(case.seed + 1000 + int(case.dose))
    sym = SYMMETRY_DEG[case.lattice]
    labels, params, sample = plan["labels"], plan["params"], plan["sample"]
    data = np.zeros((n, n, Q, Q), np.float32)
    A_true = np.full((n, n, 2, 2), np.nan, np.float32)
    truth = {k: np.full((n, n), np.nan, np.float32) for k in ("exx", "eyy", "exy", "theta")}
    centre = np.zeros((n, n, 2), np.float32)
    offset = np.array([0.31, -0.17])  # constant off-centre of the direct beam (px)
    for i in range(n):
        for j in range(n):
            g = labels[i, j] if sample[i, j] else case.n_grains
            sh = plan["shift"][i, j] + offset
            p = detector_pattern(fine[g, plan["variant"][i, j]], sh, case.psf)
            data[i, j] = rng.poisson(np.clip(p, 0, None) * case.dose)
            centre[i, j] = beam_centre0() + sh
            if sample[i, j]:
                A_true[i, j] = strain_to_A(*params[g])
                for name, val in zip(("exx", "eyy", "exy"), params[g, :3], strict=True):
                    truth[name][i, j] = val
                truth["theta"][i, j] = wrap_angle(params[g, 3], sym)
    ref = "0:6,0:6"
    assert (labels[0:6, 0:6] == 0).all() and sample[0:6, 0:6].all(), "reference not in grain 0"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    geo = _geometry(case.physics)
    gt = GroundTruth(truth["exx"], truth["eyy"], truth["exy"], truth["theta"], sample, sym, ref,
                     grains=np.where(sample, labels, -1), A=A_true, center=centre,
                     lattice=case.lattice)
    attrs = {"validation_case": str({**asdict(case), "physics": asdict(case.physics)}),
             "simulator": "abTEM multislice (benchmarks/validation/abtem_cases.py)",
             "generation_seconds": float(time.time() - t0),
             "cache_file": f"{case.physics.name}_seed{case.seed}.npy",
             **{k: float(v) for k, v in geo.items()},
             "energy_eV": ENERGY, "dose_per_pattern": float(case.dose),
             "psf_sigma_px": float(case.psf)}
    return write_case_file(OUT_DIR / f"{case.name}.h5", data, gt, attrs)


# --------------------------------------------------------------------------- frame check
def _reference_g0(phys: Physics) -> np.ndarray:
    """Two first-order reciprocal vectors of the undeformed crystal, detector px (row, col)."""
    dk = BIN / phys.box
    if phys.crystal == "ws2_2h3":
        cell = _ws2_trilayer_cell()[2]
        rec = np.linalg.inv(cell).T  # rows: reciprocal vectors (1/A)
    else:
        a = 5.431
        rec = np.array([[2 / a, 2 / a], [2 / a, -2 / a]])  # 220, 2-20
    return rec / dk


def _com(img: np.ndarray, q: np.ndarray, r: float = 5.0) -> np.ndarray:
    """Background-subtracted centre of mass of the disk near ``q`` (the background is the
    median of an annulus r+1 .. r+3 px)."""
    ii, jj = np.mgrid[0:Q, 0:Q]
    d2 = (ii - q[0]) ** 2 + (jj - q[1]) ** 2
    bg = np.median(img[(d2 > (r + 1) ** 2) & (d2 <= (r + 3) ** 2)])
    w = np.clip(img - bg, 0, None) * (d2 <= r * r)
    return np.array([(w * ii).sum(), (w * jj).sum()]) / w.sum()


def _find_disk(img: np.ndarray, q: np.ndarray, search: float = 10.0) -> np.ndarray:
    """The disk whose smoothed peak is brightest within ``search`` px of ``q``, refined by
    background-subtracted centre of mass (twice)."""
    sm = ndimage.gaussian_filter(img, 2.0)
    ii, jj = np.mgrid[0:Q, 0:Q]
    m = (ii - q[0]) ** 2 + (jj - q[1]) ** 2 <= search**2
    k = np.argmax(np.where(m, sm, -np.inf))
    p = np.array([ii.flat[k], jj.flat[k]], float)
    for _ in range(3):
        p = _com(img, p)
    return p


def frame_check(case: Case) -> None:
    """Measure disk centres in the noise-free patterns of every grain (no descan, no PSF) and
    compare them with ``g = A g0`` for the true ``A = F^-T`` and for wrong conventions. The
    disks are searched around their *unstrained* positions, so the search does not presume
    any convention; ``A`` is then fitted by least squares and turned into strain."""
    from napari_stem_strain.strain import A_to_strain

    fine = noise_free(case)
    plan = _plan(case)
    sym = SYMMETRY_DEG[case.lattice]
    g0 = _reference_g0(case.physics)
    if case.physics.crystal == "ws2_2h3":  # first order (6) and second order (6)
        hk = [(1, 0), (0, 1), (-1, 1), (-1, 0), (0, -1), (1, -1),
              (1, 1), (-1, 2), (-2, 1), (-1, -1), (1, -2), (2, -1)]
    else:  # 220-type (4) and 400-type (4)
        hk = [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    G0 = np.array(hk) @ g0
    c = beam_centre0()
    ref = detector_pattern(fine[0, 0], np.zeros(2), 0.0)
    c_ref = _com(ref, c)
    meas0 = np.array([_find_disk(ref, c_ref + g) for g in G0]) - c_ref
    print(f"{case.name}: reference grain, measured vs lattice first/second-order disks: max "
          f"deviation {np.abs(meas0 - G0).max():.2f} px (|g1| = {np.linalg.norm(g0[0]):.2f} px)")
    for k in range(1, case.n_grains):
        img = detector_pattern(fine[k, 0], np.zeros(2), 0.0)
        cc = _com(img, c)
        meas = np.array([_find_disk(img, cc + g) for g in meas0]) - cc
        A = strain_to_A(*plan["params"][k])
        p = plan["params"][k]
        cands = {"A=F^-T": A, "A^T": A.T, "A^-1": np.linalg.inv(A),
                 "theta->-theta": strain_to_A(p[0], p[1], p[2], -p[3]),
                 "exy->-exy": strain_to_A(p[0], p[1], -p[2], p[3]),
                 "x<->y swap": strain_to_A(p[1], p[0], p[2], -p[3])}
        devs = {nm: np.sqrt(((meas - meas0 @ M.T) ** 2).sum(1).mean()) for nm, M in cands.items()}
        A_fit = np.linalg.lstsq(meas0, meas, rcond=None)[0].T
        fit = np.array(A_to_strain(A_fit, sym), float)
        print(f"  grain {k}: true exx,eyy,exy = {p[0] * 100:+.2f},{p[1] * 100:+.2f},"
              f"{p[2] * 100:+.2f} %, theta {p[3]:+.2f} deg | fitted {fit[0] * 100:+.2f},"
              f"{fit[1] * 100:+.2f},{fit[2] * 100:+.2f} %, {fit[3]:+.2f} deg | rms disk offset: "
              + ", ".join(f"{nm} {d:.2f}" for nm, d in devs.items()) + " px")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--force", action="store_true", help="regenerate existing files")
    ap.add_argument("--resimulate", action="store_true",
                    help="recompute the cached noise-free patterns too (implies --force)")
    ap.add_argument("--check", metavar="CASE", help="frame/sign check on a case's patterns")
    args = ap.parse_args(argv)
    if args.check:
        frame_check(CASES[args.check])
        return
    for name in args.cases:
        case = CASES[name]
        path = OUT_DIR / f"{name}.h5"
        if path.exists() and not (args.force or args.resimulate):
            print(f"{name}: exists, skipped ({path})")
            continue
        t0 = time.time()
        make_case(case, force_cache=args.resimulate)
        print(f"{name}: {path} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
