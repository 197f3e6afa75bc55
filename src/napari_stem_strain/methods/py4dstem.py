"""The conventional baseline: py4DSTEM Bragg-disk detection + per-position lattice indexing.

Fully automatic - every setting is measured from the data in :meth:`Py4DSTEMMethod.prepare`:

* the direct beam (centre, radius, edge softness) on a grid of sampled positions;
* vacuum: positions whose patterns carry no lattice - the "lattice signal" (correlation
  intensity on the best-rotated lattice relative to the direct beam) splits clearly in two
  when the scan has vacuum. A bright-field/ADF fraction does not work here: under the
  published noise model a diffuse background of up to 70 % of the counts lies on vacuum and
  crystal alike. A vacuum probe template is averaged from the vacuum patterns (descan removed,
  local background subtracted), or, with no vacuum in the scan, a synthetic disk of the
  measured radius and edge softness is used;
* the correlation kernel: py4DSTEM's edge-sigmoid probe kernel, radii ``(r, 2r)``;
* the basis ``b1, b2``: the lattice of the descan-aligned mean pattern of the reference region
  (or, without one, of the best-indexed sampled pattern);
* the detection threshold: from the correlation's own noise floor - the intensity of the
  maxima that lie *off* the lattice in sampled patterns (noise, ringing), not a fraction of
  the direct beam, which fails when first-order disks hold well under 1 % of it;
* the fit acceptance: how many disks a crystal position indexes and how tightly, measured on
  sampled positions, so chance alignments of noise maxima are rejected (NaN, never garbage).

Per position (:meth:`Py4DSTEMMethod.process_block`) py4DSTEM's ``find_Bragg_disks`` finds the
disks; :mod:`._py4dstem_lattice` rotates the basis to the best-indexing orientation (any grain
rotation) and least-squares fits ``origin + h g1 + k g2``. The raw ``A`` solves
``[g1 g2] = A [b1 b2]``; strain comes from :mod:`napari_stem_strain.strain` (not py4DSTEM's
``get_strain``, whose small-strain formula mixes rotation into strain, see CONVENTIONS.md).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..strain import check_region, lattice_symmetry, parse_region
from ..uncertainty import basis_to_affine_covariance
from ._py4dstem_lattice import find_basis, index_pattern
from ._py4dstem_probe import (
    aligned_mean,
    beam_centre_radius,
    edge_width,
    subtract_local_background,
    vacuum_split,
)
from .base import (
    A_OUTPUT,
    SAMPLE_OUTPUT,
    BlockMethod,
    MethodResult,
    Output,
    ProgressCallback,
    StopCallback,
    check_stop,
)

__all__ = ["Py4DSTEMMethod", "run_py4dstem", "detect_disks", "DEFAULTS"]

#: Settings a caller may override (anything else is derived from the data). ``None`` = derive.
DEFAULTS: dict[str, Any] = {
    "probe_radius": None,  # direct-beam radius, px
    "threshold": None,  # minAbsoluteIntensity of the correlation maxima
    "vacuum_threshold": None,  # lattice signal at or below which a position is vacuum
    "subpixel": "multicorr",  # py4DSTEM subpixel mode: 'poly' or 'multicorr'
    "upsample_factor": 16,
    "tolerance": None,  # indexing tolerance, px (default 0.2 x shortest basis vector)
    "min_peaks": None,  # Bragg disks (besides the direct beam) needed for a fit (>= 4)
    "max_rms": None,  # largest rms residual (px) of an accepted lattice fit
    "max_strain": 0.25,  # reject fits further than this from the basis cell (mis-indexing)
    "n_sample": 256,  # positions sampled by prepare()
    "threshold_quantile": 0.9,  # quantile of off-lattice maxima taken as the noise floor
}


@contextmanager
def _no_new_figures() -> Iterator[None]:
    """Close any matplotlib figure py4DSTEM opens while we run.

    Every py4DSTEM call here is one that does not draw (no ``plot=True`` paths), so this is a
    guard, not a workaround: a figure must never pop up or leak from a batch run. The backend
    is left alone - switching it would break the plots of the application hosting us."""
    plt = sys.modules.get("matplotlib.pyplot")
    before = set(plt.get_fignums()) if plt is not None else set()
    try:
        yield
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            for num in set(plt.get_fignums()) - before:
                plt.close(num)


@dataclass
class _Derived:
    """Everything prepare() measured; self-contained and picklable (dask workers get a copy)."""

    radius: float
    centre: tuple[float, float]
    kernel: np.ndarray
    basis: np.ndarray  # (2, 2), columns b1, b2
    symmetry_deg: float
    threshold: float
    vacuum_threshold: float | None
    probe_source: str
    tolerance: float
    min_spacing: float
    edge_boundary: int
    max_peaks: int
    sigma_cc: float
    subpixel: str = "multicorr"
    upsample_factor: int = 16
    min_peaks: int = 4
    max_rms: float = 1.0
    artifact_rel: float = 0.0  # strongest off-centre maximum the bare beam makes, / its peak
    #: every off-centre maximum of the bare beam: (dx, dy) from its peak and strength / peak
    artifacts: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))


class Py4DSTEMMethod(BlockMethod):
    """py4DSTEM disk detection + per-position lattice fit, as a streaming :class:`BlockMethod`."""

    name = "py4dstem"
    block_bytes = 16 * 2**20

    def __init__(
        self,
        sample_mask: np.ndarray | None = None,
        reference: str | tuple[slice, slice] | None = None,
        **overrides: Any,
    ) -> None:
        unknown = sorted(set(overrides) - set(DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown py4DSTEM setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(DEFAULTS))}"
            )
        if overrides.get("subpixel", "multicorr") not in ("poly", "multicorr", "pixel"):
            raise ValueError("subpixel must be 'poly', 'multicorr' or 'pixel'")
        self.opts = {**DEFAULTS, **overrides}
        self.set_input("sample_mask", None if sample_mask is None
                       else np.asarray(sample_mask, bool))
        if isinstance(reference, str):
            reference = parse_region(reference) if reference.strip() else None
        self.reference = reference
        self.derived: _Derived | None = None

    @property
    def sample_mask(self) -> np.ndarray | None:
        """The user's sample mask (a per-position input: its rows travel with each block)."""
        return self.inputs().get("sample_mask")

    # ------------------------------------------------------------------ prepare
    def prepare(
        self,
        dataset: Any,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
    ) -> None:
        """Measure beam, vacuum, template, kernel, basis and threshold from sampled positions."""
        with _no_new_figures():
            self._prepare(dataset, progress, should_stop)

    def _prepare(
        self, dataset: Any, progress: ProgressCallback | None, should_stop: StopCallback | None
    ) -> None:
        from py4DSTEM.braggvectors.probe import Probe

        Rx, Ry = dataset.scan_shape
        if self.sample_mask is not None and self.sample_mask.shape != (Rx, Ry):
            raise ValueError(
                f"sample mask has shape {self.sample_mask.shape}, the scan is {Rx}x{Ry}"
            )
        total = Rx * Ry

        def say(msg: str) -> None:
            check_stop(should_stop)
            if progress is not None:
                progress(0, total, f"py4dstem: {msg}")

        say("measuring the direct beam")
        _, pats = _sample_positions(dataset, int(self.opts["n_sample"]))
        beams = np.array([beam_centre_radius(p) for p in pats])
        centres = beams[:, :2]
        radius = float(self.opts["probe_radius"] or np.median(beams[:, 2]))
        if not (radius >= 0.5):
            raise ValueError("no direct beam found in the patterns (all empty?)")
        centre = np.median(centres, axis=0)
        width = edge_width(aligned_mean(pats, centres, centre), tuple(centre))

        # stage 1: synthetic-disk kernel -> basis -> lattice signal -> vacuum
        probe = _synthetic_disk(pats.shape[1:], centre, radius, width)
        source = f"synthetic disk r={radius:.2f} edge={width:.2f}"
        st = self._state_for(_kernel(probe, centre, radius), centre, radius, np.eye(2), 1.0,
                             source)
        st.artifact_rel, st.artifacts = _beam_artifacts(probe, st)
        say("finding the lattice basis")
        st = self._with_basis(st, dataset, pats)
        # vacuum from the data even when the caller gives a sample mask: the mask says what
        # to map, not where the beam is bare (masked-out crystal must not enter the template)
        say("looking for vacuum")
        sig = self._signals(pats, st)
        vac_t = self.opts["vacuum_threshold"]
        vac_t = vacuum_split(sig) if vac_t is None else float(vac_t)
        is_vac = sig <= vac_t if vac_t is not None else np.zeros(len(pats), bool)

        # stage 2: a vacuum probe when the scan has vacuum
        if is_vac.sum() >= 3:
            say("building the vacuum probe template")
            mean = aligned_mean(pats[is_vac], centres[is_vac], centre)
            mean = subtract_local_background(mean, centre, radius)
            probe = np.asarray(Probe.from_vacuum_data(mean).probe, np.float64)
            source = f"vacuum ({int(is_vac.sum())} sampled positions)"
            st = self._state_for(_kernel(probe, centre, radius), centre, radius, st.basis,
                                 st.tolerance, source)
            st.artifact_rel, st.artifacts = _beam_artifacts(probe, st)
            st = self._with_basis(st, dataset, pats[~is_vac])
        crystal = ~is_vac
        if not crystal.any():
            raise ValueError("every sampled position looks like vacuum: no crystal to map")

        say("measuring the noise floor")
        thr = self.opts["threshold"]
        if thr is None:
            thr = _noise_floor(_spread(pats[crystal], 64), st,
                               float(self.opts["threshold_quantile"]))
        st.threshold = float(thr)
        say("measuring the fit quality")
        st.min_peaks, st.max_rms = self._acceptance(_spread(pats[crystal], 64), st)
        if self.sample_mask is None:
            vac_t = self.opts["vacuum_threshold"]
            if vac_t is None and is_vac.any():
                # the split again, with the final kernel and threshold
                vac_t = vacuum_split(self._signals(pats, st))
            st.vacuum_threshold = None if vac_t is None else float(vac_t)
        self.derived = st

    def _state_for(
        self, kernel: np.ndarray, centre: np.ndarray, radius: float, basis: np.ndarray,
        tolerance: float, source: str,
    ) -> _Derived:
        """Detection settings for a correlation kernel and a basis (identity: none yet)."""
        bmin = float(np.min(np.linalg.norm(basis, axis=0)))
        area = abs(float(np.linalg.det(basis)))
        n_sites = kernel.size / max(area, 1.0)
        return _Derived(
            radius=radius,
            centre=(float(centre[0]), float(centre[1])),
            kernel=kernel,
            basis=basis,
            symmetry_deg=lattice_symmetry(basis[:, 0], basis[:, 1]),
            threshold=0.0,
            vacuum_threshold=None,
            probe_source=source,
            tolerance=tolerance,
            min_spacing=max(1.5 * radius, 0.4 * bmin) if area > 1.0 else 1.5 * radius,
            edge_boundary=int(np.ceil(radius + 1)),
            max_peaks=int(min(500, max(20, 3 * n_sites))) if area > 1.0 else 200,
            sigma_cc=float(np.clip(radius / 4.0, 0.5, 2.0)),
            subpixel=str(self.opts["subpixel"]),
            upsample_factor=int(self.opts["upsample_factor"]),
        )

    def _with_basis(self, st: _Derived, dataset: Any, pats: np.ndarray) -> _Derived:
        """Find the basis and return the settings that depend on it.

        With a reference region: the lattice of its descan-aligned mean pattern. Without one:
        the lattices of up to 64 sampled patterns; their median cell shape (length ratio and
        angle - grain strains average out) decides the symmetry, and the basis is the
        best-indexed pattern's among those closest to that median shape."""
        tol = max(1.0, 0.5 * st.radius)
        centre = np.asarray(st.centre)
        sym = None
        if self.reference is not None:
            ref = _read_region(dataset, self.reference, 400)
            c = np.array([beam_centre_radius(p)[:2] for p in ref])
            try:
                g1, g2, _ = _basis_from(aligned_mean(ref, c, centre), st, tol)
            except ValueError as err:
                r, cc = self.reference
                raise ValueError(f"reference region {r.start}:{r.stop},{cc.start}:{cc.stop}: "
                                 f"{err} (is it on the crystal?)") from None
        else:
            found = []
            for p in _spread(pats, 64):
                try:
                    found.append(_basis_from(p, st, tol, subpixel="poly"))
                except ValueError:
                    continue
            if not found:
                raise ValueError("no sampled pattern shows a lattice of Bragg disks")
            shape = np.array([_cell_shape(g1, g2) for g1, g2, _ in found])
            med = np.median(shape, axis=0)
            dev = np.abs(shape - med).sum(axis=1)
            n = np.array([f[2] for f in found])
            score = np.where(dev <= np.quantile(dev, 0.5), n, -1)
            g1, g2, _ = found[int(np.argmax(score))]
            sym = _symmetry_from_shape(*med)
        basis = np.stack([g1, g2], axis=1)
        bmin = float(min(np.linalg.norm(g1), np.linalg.norm(g2)))
        tol = float(self.opts["tolerance"] or 0.2 * bmin)
        out = self._state_for(st.kernel, centre, st.radius, basis, tol, st.probe_source)
        out.artifact_rel, out.artifacts = st.artifact_rel, st.artifacts
        if sym is not None:
            out.symmetry_deg = sym
        return out

    def _acceptance(self, pats: np.ndarray, st: _Derived) -> tuple[int, float]:
        """How many indexed disks and how loose a fit a crystal position of *this* dataset
        gives: ``min_peaks`` = 30 % of the median count (at least 4) and ``max_rms`` = 3x the
        90th percentile of the rms residuals (between 0.05 and 0.4 tolerance). Fits outside
        these are chance alignments of noise maxima, not the crystal."""
        n_idx, rms = [], []
        for peaks, inten in _detect(pats, st, st.threshold):
            fit = index_pattern(peaks, inten, st.basis, st.symmetry_deg, st.tolerance,
                                min_peaks=4, max_rms=0.4 * st.tolerance).fit
            if fit is not None:
                n_idx.append(fit.n_indexed)
                rms.append(fit.rms)
        mp, mr = self.opts["min_peaks"], self.opts["max_rms"]
        if mp is None:
            mp = max(4, int(round(0.3 * np.median(n_idx)))) if n_idx else 4
        if mr is None:
            mr = (float(np.clip(3.0 * np.quantile(rms, 0.9), 0.05 * st.tolerance,
                                0.4 * st.tolerance)) if rms else 0.15 * st.tolerance)
        return int(mp), float(mr)

    def _signals(self, pats: np.ndarray, st: _Derived) -> np.ndarray:
        """Lattice signal of each pattern (see :class:`IndexResult`)."""
        out = []
        for peaks, inten in _detect(pats, st, st.threshold, subpixel="poly"):
            out.append(index_pattern(peaks, inten, st.basis, st.symmetry_deg, st.tolerance,
                                     min_peaks=4, max_rms=0.4 * st.tolerance).signal)
        return np.asarray(out)

    # ------------------------------------------------------------------ blocks
    def process_block(self, block: np.ndarray, r0: int, sample_mask: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
        """Raw ``A`` ``(n, Ry, 2, 2)`` (NaN where unfitted or vacuum), its covariance and the
        sample mask
        (``sample_mask``: the block's rows of the user's mask, when one was given)."""
        st = self._state()
        n, Ry = block.shape[:2]
        flat, broken = _clean_patterns(
            np.asarray(block, np.float32).reshape(n * Ry, *block.shape[2:])
        )
        with _no_new_figures():
            found = _detect(flat, st, st.threshold)
        A = np.full((n * Ry, 2, 2), np.nan, np.float32)
        if sample_mask is not None:
            sample = np.asarray(sample_mask, bool).reshape(-1).copy()
        else:
            sample = np.ones(n * Ry, bool)
        binv = np.linalg.inv(st.basis)
        cov = np.full((n * Ry, 4, 4), np.nan, np.float32)  # covariance of the raw A
        for i, (peaks, inten) in enumerate(found):
            res = index_pattern(peaks, inten, st.basis, st.symmetry_deg, st.tolerance,
                                min_peaks=st.min_peaks, max_strain=float(self.opts["max_strain"]),
                                max_rms=st.max_rms)
            if sample_mask is None and st.vacuum_threshold is not None:
                sample[i] = res.signal > st.vacuum_threshold
            if sample[i] and res.fit is not None and not broken[i]:
                A[i] = res.fit.G @ binv
                if res.fit.cov_g is not None:
                    cov[i] = basis_to_affine_covariance(res.fit.cov_g, binv)
        return {"A": A.reshape(n, Ry, 2, 2), "sample": sample.reshape(n, Ry),
                "A_cov": cov.reshape(n, Ry, 4, 4)}

    def outputs(self) -> tuple[Output, ...]:
        """``A``, ``sample`` and the covariance of the raw ``A`` (row-major 4x4, from the
        weighted lattice fit; it becomes :attr:`MethodResult.A_cov`)."""
        return (A_OUTPUT, SAMPLE_OUTPUT, Output("A_cov", (4, 4), "float32", np.nan))

    def finish(self, out: dict[str, np.ndarray], seconds: float) -> MethodResult:
        self._state()
        A = np.asarray(out["A"], np.float32).copy()
        A[~out["sample"]] = np.nan
        res = self.result(out, seconds, A=A)
        # no error bar where there is no value
        res.A_cov = np.where(np.isfinite(A).all((2, 3))[..., None, None], out["A_cov"],
                             np.nan).astype(np.float32)
        return res

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.opts.items()}
        st = self.derived
        if st is not None:
            out.update(
                probe_radius=round(st.radius, 3),
                beam_centre=[round(c, 2) for c in st.centre],
                probe_template=st.probe_source,
                kernel="py4DSTEM edge sigmoid, radii (r, 2r)",
                basis_g1=[round(float(v), 4) for v in st.basis[:, 0]],
                basis_g2=[round(float(v), 4) for v in st.basis[:, 1]],
                symmetry_deg=st.symmetry_deg,
                threshold=float(st.threshold),
                vacuum_threshold=st.vacuum_threshold,
                tolerance=round(st.tolerance, 3),
                min_peak_spacing=round(st.min_spacing, 3),
                edge_boundary=st.edge_boundary,
                max_peaks=st.max_peaks,
                sigma_cc=st.sigma_cc,
                beam_artifact_level=float(st.artifact_rel),
                min_peaks=st.min_peaks,
                max_rms=round(st.max_rms, 4),
            )
        if self.reference is not None:
            r, c = self.reference
            out["reference"] = f"{r.start}:{r.stop},{c.start}:{c.stop}"
        return out

    @property
    def symmetry_deg(self) -> float:
        return self._state().symmetry_deg

    def _state(self) -> _Derived:
        if self.derived is None:
            raise RuntimeError("Py4DSTEMMethod.prepare() must run before processing blocks")
        return self.derived


# ---------------------------------------------------------------------- helpers
def _synthetic_disk(
    shape: tuple[int, int], centre: np.ndarray, radius: float, width: float
) -> np.ndarray:
    """A disk with a logistic edge at ``centre`` (py4DSTEM's synthetic probe is always centred
    on the detector; ours sits on the measured beam so the kernel origin is exact)."""
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(xx - centre[0], yy - centre[1]) - radius
    return 1.0 / (1.0 + np.exp(4.0 * r / width))


def _spread(items: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``items``, evenly spread (sampled patterns are in scan order: the first
    ``n`` would all come from the top of the scan)."""
    if len(items) <= n:
        return items
    return items[np.linspace(0, len(items) - 1, n).round().astype(int)]


def _cell_shape(g1: np.ndarray, g2: np.ndarray) -> tuple[float, float]:
    """``(|long| / |short|, |cos angle|)`` of a cell: its shape, blind to rotation and size."""
    n1, n2 = np.linalg.norm(g1), np.linalg.norm(g2)
    return float(max(n1, n2) / min(n1, n2)), float(abs(g1 @ g2) / (n1 * n2))


def _symmetry_from_shape(ratio: float, cos_angle: float) -> float:
    """Symmetry period of a cell shape (as :func:`strain.lattice_symmetry` would judge it)."""
    return lattice_symmetry(np.array([1.0, 0.0]),
                            ratio * np.array([cos_angle, np.sqrt(max(0.0, 1 - cos_angle**2))]))


def _kernel(probe: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """py4DSTEM's edge-sigmoid correlation kernel: the probe minus a smooth disk out to ``2r``
    (zero mean), which sharpens the correlation peak and ignores smooth background."""
    from py4DSTEM.braggvectors.probe import Probe

    return Probe.get_probe_kernel_edge_sigmoid(
        probe, radii=(radius, 2.0 * radius), origin=(float(centre[0]), float(centre[1]))
    )


def _beam_artifacts(probe: np.ndarray, st: _Derived) -> tuple[float, np.ndarray]:
    """The maxima a bare direct beam (the probe template) produces away from itself: the
    strongest one's strength relative to the beam's own correlation peak, and every one as
    ``(dx, dy, strength)`` rows. Template matching rings: the correlation of the beam with
    the edge kernel has weak side maxima on a regular grid, which a search for the lattice on
    a high signal-to-noise mean pattern would otherwise take for a lattice of disks. Measured
    by running the same detection on the template."""
    none = (0.0, np.zeros((0, 3)))
    peaks, inten = _detect(probe[None], st, threshold=0.0, subpixel="poly")[0]
    if len(peaks) < 2:
        return none
    c = int(np.argmax(inten))
    far = np.linalg.norm(peaks - peaks[c], axis=1) > 2 * st.radius + 2
    if not far.any() or inten[c] <= 0:
        return none
    rel = inten[far] / inten[c]
    return float(rel.max()), np.column_stack([peaks[far] - peaks[c], rel])


def _ringing(offsets: np.ndarray, rel: np.ndarray, st: _Derived, tol: float) -> np.ndarray:
    """Which maxima (``offsets`` from the beam, strengths ``rel`` relative to it) the bare
    beam's own ringing could explain: one of its side maxima lies within ``tol`` px and is at
    least a third as strong.

    Why by position: a global cut at 3x the strongest side maximum wherever it lies threw
    away every Bragg disk of data whose first-order disks hold ~2 % of the beam when a noisy
    vacuum probe rang at 0.4 % somewhere (validation case rect_dynamical, with its reference
    region given: "the Bragg disks found do not form a lattice")."""
    art = np.asarray(st.artifacts, float).reshape(-1, 3)
    if len(art) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), bool)
    near = np.linalg.norm(offsets[:, None, :] - art[None, :, :2], axis=2) <= tol
    return (near & (rel[:, None] <= 3.0 * art[None, :, 2])).any(axis=1)


def _basis_from(
    pattern: np.ndarray, st: _Derived, tol: float, subpixel: str | None = None
) -> tuple:
    """``(g1, g2, n_indexed)`` of one (high signal-to-noise) pattern."""
    peaks, inten = _detect(pattern[None], st, threshold=0.0, subpixel=subpixel)[0]
    if len(peaks) < 3:
        raise ValueError("fewer than two Bragg disks found: cannot determine the lattice")
    c = int(np.argmax(inten))
    keep = np.arange(len(peaks)) != c
    # maxima closer to the beam than a disk diameter plus 2 px are the kernel's ringing around
    # the direct beam, never Bragg disks that template matching could resolve
    gap = 2 * st.radius + 2
    keep &= np.linalg.norm(peaks - peaks[c], axis=1) > gap
    # and maxima where the bare beam rings, no stronger than that ringing (x3), are not
    # evidence of disks
    keep &= ~_ringing(peaks - peaks[c], inten / inten[c], st, tol)
    g1, g2, n = find_basis(peaks[keep] - peaks[c], inten[keep], tol)
    if n < 4 or min(np.linalg.norm(g1), np.linalg.norm(g2)) <= gap:
        raise ValueError("the Bragg disks found do not form a lattice")
    return g1, g2, n


def _detect(
    patterns: np.ndarray, st: _Derived, threshold: float, subpixel: str | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """py4DSTEM ``find_Bragg_disks`` on a stack of patterns -> ``[(peaks (N,2), intensity)]``.

    A 3D stack rather than a DataCube: the same per-pattern code path, without the DataCube's
    console progress bar (this package reports progress through its own callback).
    ``subpixel`` overrides the precise mode where only a rough position matters (prepare).
    """
    from py4DSTEM.braggvectors.diskdetection import find_Bragg_disks

    with np.errstate(divide="ignore", invalid="ignore"):  # flat maxima in empty regions
        res = find_Bragg_disks(
            np.asarray(patterns, np.float64),
            st.kernel,
            sigma_cc=st.sigma_cc,
            subpixel=subpixel or st.subpixel,
            upsample_factor=st.upsample_factor,
            minAbsoluteIntensity=threshold,
            minRelativeIntensity=0,
            minPeakSpacing=st.min_spacing,
            edgeBoundary=st.edge_boundary,
            maxNumPeaks=st.max_peaks,
        )
    out = []
    for q in res:
        d = q.data
        out.append((np.column_stack([d["qx"], d["qy"]]).astype(float),
                    np.asarray(d["intensity"], float)))
    return out


def _noise_floor(patterns: np.ndarray, st: _Derived, quantile: float) -> float:
    """The correlation intensity below which maxima are mostly noise.

    Detect every maximum, index the pattern, and take a high quantile of the maxima that lie
    off the lattice: those are noise (or kernel ringing) by construction, so their intensity
    distribution *is* the noise floor of this dataset, whatever the dose and scattering."""
    off: list[np.ndarray] = []
    for peaks, inten in _detect(patterns, st, threshold=0.0, subpixel="poly"):
        fit = index_pattern(peaks, inten, st.basis, st.symmetry_deg, st.tolerance,
                            min_peaks=4, max_rms=0.4 * st.tolerance).fit
        if fit is None:
            continue
        d = peaks - fit.origin
        hk = np.round(np.linalg.solve(fit.G, d.T).T)
        resid = np.linalg.norm(d - hk @ fit.G.T, axis=1)
        off.append(inten[resid > st.tolerance])
    vals = np.concatenate(off) if off else np.zeros(0)
    if vals.size < 5:
        return 0.0
    return float(np.quantile(vals, quantile))


def _sample_positions(dataset: Any, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_max`` patterns on a regular grid over the scan (reading only those rows)."""
    Rx, Ry = dataset.scan_shape
    step = max(1, int(np.ceil(np.sqrt(Rx * Ry / max(n_max, 1)))))
    rows = np.arange(step // 2, Rx, step)
    cols = np.arange(step // 2, Ry, step)
    pats, pos = [], []
    for r in rows:
        row = dataset.read_rows(int(r), int(r) + 1)[0]
        pats.append(row[cols])
        pos.extend((int(r), int(c)) for c in cols)
    return np.array(pos), _clean_patterns(np.concatenate(pats, axis=0).astype(np.float64))[0]


def _read_region(dataset: Any, region: tuple[slice, slice], n_max: int) -> np.ndarray:
    """Patterns of the reference region (strided to at most ``n_max``)."""
    Rx, Ry = dataset.scan_shape
    rs, cs = check_region(region, (Rx, Ry))
    r0, r1, _ = rs.indices(Rx)
    c0, c1, _ = cs.indices(Ry)
    step = max(1, int(np.ceil(np.sqrt((r1 - r0) * (c1 - c0) / n_max))))
    out = [dataset.read_rows(r, r + 1)[0, c0:c1:step] for r in range(r0, r1, step)]
    return _clean_patterns(np.concatenate(out, axis=0).astype(np.float64))[0]


def _clean_patterns(pats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patterns fit for detection, and which of them held NaN/inf pixels.

    A non-finite pixel (a dead or saturated-and-flagged detector pixel, a broken frame) must not
    poison the data-derived thresholds of the whole scan, nor be fitted as if it were data: such
    patterns are zeroed (so they read as 'no lattice') and reported so their position stays
    unfitted. Negative values (dark-reference subtraction gone below zero) are clipped to zero,
    which keeps every count-based statistic meaningful.
    """
    finite = np.isfinite(pats)
    broken = ~finite.reshape(len(pats), -1).all(axis=1)
    clean = np.where(finite, pats, 0)
    np.maximum(clean, 0, out=clean)
    clean[broken] = 0
    return clean, broken


# ---------------------------------------------------------------------- public helpers
def run_py4dstem(
    dataset: Any,
    reference: str | tuple[slice, slice] | None = None,
    sample_mask: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    **overrides: Any,
) -> MethodResult:
    """Run the baseline over a whole dataset (streamed in blocks of rows)."""
    from .runner import run_method

    method = Py4DSTEMMethod(sample_mask=sample_mask, reference=reference, **overrides)
    return run_method(method, dataset, progress=progress, should_stop=should_stop)


def detect_disks(pattern: np.ndarray, method_state: Py4DSTEMMethod) -> np.ndarray:
    """Disk positions ``(N, 2)`` (detector px, (x, y)) py4DSTEM finds in one pattern with the
    settings ``method_state.prepare`` derived - for showing detections in the viewer."""
    st = method_state._state()
    pattern = np.asarray(pattern, np.float64)
    if pattern.ndim != 2 or pattern.shape != st.kernel.shape:
        raise ValueError(
            f"pattern has shape {pattern.shape}; the method was prepared for {st.kernel.shape}"
        )
    peaks, _ = _detect(pattern[None], st, st.threshold)[0]
    return peaks
