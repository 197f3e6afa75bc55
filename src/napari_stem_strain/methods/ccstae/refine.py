"""Per-pattern refinement of the encoder's transform against the base lattice.

The encoder is fast but coarse (a 32x32 view). Precision comes from a few batched
Gauss-Newton steps on the *raw* (square-rooted) pattern, starting from the encoder's guess:

* **Per-disk, intensity-free matching.** Around each predicted disk position the pattern's
  *exact pixels* (never interpolated: interpolation blurs by an amount that depends on the
  sub-pixel phase, which locks fitted positions to the pixel grid) are fitted as
  ``a T(o - f - d) + b + ramp . o`` (``T`` = a continuous radial profile of the data's own
  direct beam, ``f`` the disk's sub-pixel phase, ``a`` a free per-disk gain, ``b`` and
  ``ramp`` a free local background and its slope). Linearised in ``d`` this is a 6-column
  least-squares problem that depends only on ``f``; its pseudo-inverse is tabulated once per
  1/32 px phase, so every disk of every pattern costs one small matrix product. Only the
  first of several steps matches interpolated patches (wider capture range, see
  :func:`_bilinear_template`). Free gain and offset per disk is
  what makes this cope with dynamical scattering (intensities changing from position to
  position), first-order disks holding <1 % of the beam and diffuse background - no threshold
  or template relative to the direct beam's intensity.
* **Global affine update.** The disk shifts are combined by weighted least squares
  (weight ``a^2``: the position variance of a disk under uniform sqrt-Poisson noise scales as
  ``1/a^2``) into an update of ``A`` and of the beam position ``t`` (the undiffracted disk at
  ``p = 0`` is one of the disks, so descan is measured by the same fit).
* **Angular polish.** Before the Gauss-Newton steps, the rotation is polished over a few
  degrees around the encoder's guess by the summed disk intensity, widening the capture range.

The base lattice points are ideal lattice points ``h g1 + k g2`` (not peak positions read off a
blurry base image): any fixed error of the base then cancels exactly in ``A_raw A_ref^-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .preprocess import sample_points


def sqrt_samples(pats: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Square root of interpolated samples of the raw pattern (angular search only: the
    refinement reads exact pixels, see :func:`gather_patches`)."""
    return torch.sqrt(torch.clamp(sample_points(pats, pos, mode), min=0))

__all__ = ["DiskTemplate", "make_template", "gather_patches", "lattice_points", "refine",
           "angular_search", "fit_lattice", "condition", "pool_nuisance",
           "pooled_coefficients", "affine_update", "affine_covariance",
           "shift_error_model", "floored_weights"]


#: Columns of the 8-column disk fit left free (gain, offset, shift) and fixed (background
#: ramp, in-disk gradient) when the nuisances are pooled over neighbouring positions.
FREE4, FIXED4 = [0, 1, 4, 5], [2, 3, 6, 7]

#: Same-grain test of :func:`pool_nuisance` when the positions' ``A`` carry error bars: two
#: positions are one grain if ``|A_1 - A_2|^2 <= tol^2 + SAME_GRAIN_Q99 (tr C_1 + tr C_2)``.
#: ``|A_1 - A_2|^2`` of one grain is a sum of 4 squared Gaussian differences whose variances
#: add to ``tr C_1 + tr C_2``: with equal variances it is ``(tr C_1 + tr C_2) / 4`` times a
#: chi-square of 4 degrees of freedom, whose 99th percentile is 13.28 - so 99 % of a grain's
#: pairs pass whatever the noise.
SAME_GRAIN_Q99 = 13.28 / 4

#: A disk enters the pooled last step where its gain, pooled over same-grain neighbours,
#: stands this many standard errors above zero (see :func:`pooled_coefficients`); the value
#: of ``refine``'s ``min_snr``. Between 2 and 6 the validation maps change by < 0.6 %.
POOLED_SNR = 4.0

#: Sub-pixel phases per pixel at which the disk's least-squares problem is tabulated. The
#: template is evaluated at the tabulated phase nearest each disk's predicted position and
#: the fitted shift is taken from there, so the quantisation costs no precision.
PHASES = 32


@dataclass
class DiskTemplate:
    """A continuous, radially symmetric disk profile and the patch it is matched on.

    ``offsets`` ``(P, 2)``: integer pixel offsets of the patch around a disk's nearest pixel;
    ``profile`` / ``slope``: the square-rooted beam profile ``T(rho)`` (normalised to unit
    contrast) and its derivative, tabulated every ``step`` pixels of radius. ``pinv``
    ``(F, 8, P)`` and ``gram`` ``(F, 8, 8)``: the pseudo-inverse and normal matrix of the
    8-column design matrix (see :func:`make_template`) at each of the ``F = (PHASES + 1)^2``
    sub-pixel phases; ``cond`` ``(F, 6, 2)``: how the first six coefficients change when the
    two in-disk gradient coefficients are fixed instead of fitted (see :func:`condition`);
    ``g00`` ``(F,)``: the gain's variance factor of the 6-column fit. ``design`` ``(F, P, 8)``
    and ``design_lin`` ``(F, 8, P)`` (transposed): the design matrices themselves, of the
    square-rooted and of the plain intensity profile (the Poisson-weighted last step,
    :func:`poisson_fit`).
    ``coarse``: the interpolating matcher of the first Gauss-Newton step (see
    :func:`_bilinear_template`). ``lin_model``: what ``design_lin`` is built from (a
    :class:`PixelModel`, or a table-less template of the plain intensity profile).

    The phase tables are ~14 MB but follow from the profiles alone: a pickled template (what
    dask workers receive inside a prepared method) carries the profiles and rebuilds the
    tables on arrival with the same CPU code, so it stays small and gives identical bits."""

    offsets: torch.Tensor
    profile: torch.Tensor
    slope: torch.Tensor
    step: float
    radius: float
    pinv: torch.Tensor
    gram: torch.Tensor
    g00: torch.Tensor
    cond: torch.Tensor
    coarse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    design: torch.Tensor | None = None
    design_lin: torch.Tensor | None = None
    #: pixel aperture of the :class:`PixelModel` the tables come from; None: radial profile
    aperture: float | None = None
    lin_model: PixelModel | DiskTemplate | None = None

    #: the tables rebuilt from the profiles (see :func:`_fill_tables`), left out of a pickle
    _TABLES = ("pinv", "gram", "g00", "cond", "design", "design_lin")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.lin_model is not None:
            for k in self._TABLES:
                state[k] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.lin_model is not None and self.pinv is None:
            _fill_tables(self)

    def to(self, device: str | torch.device) -> DiskTemplate:
        return DiskTemplate(self.offsets.to(device), self.profile.to(device),
                            self.slope.to(device), self.step, self.radius,
                            self.pinv.to(device), self.gram.to(device), self.g00.to(device),
                            self.cond.to(device),
                            None if self.coarse is None
                            else tuple(x.to(device) for x in self.coarse),
                            None if self.design is None else self.design.to(device),
                            None if self.design_lin is None else self.design_lin.to(device),
                            self.aperture, self.lin_model)

    def evaluate(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``T(|v|)`` and its gradient ``(dT/dv0, dT/dv1)`` at offsets ``v`` ``(..., 2)``
        (linear interpolation in the table; constant beyond it)."""
        rho = torch.sqrt((v * v).sum(-1))
        x = rho / self.step
        n = self.profile.shape[0]
        i0 = torch.clamp(x.floor(), max=n - 2)
        w = (x - i0).clamp(0, 1)
        i0 = i0.long()
        T = torch.lerp(self.profile[i0], self.profile[i0 + 1], w)
        dT = torch.lerp(self.slope[i0], self.slope[i0 + 1], w)
        g = (dT / rho.clamp_min(1e-6))[..., None] * v
        return T, g[..., 0], g[..., 1]


def _patch_offsets(r: float, device: torch.device) -> tuple[torch.Tensor, int]:
    h = int(np.ceil(r)) + 2
    ii, jj = np.mgrid[-h:h + 1, -h:h + 1]
    keep = ii ** 2 + jj ** 2 <= (h + 0.5) ** 2
    off = torch.tensor(np.stack([ii[keep], jj[keep]], 1), dtype=torch.long, device=device)
    return off, h


def gather_patches(pats: torch.Tensor, pos: torch.Tensor, off: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact pixel values (square-rooted) of ``pats`` ``(B,Qx,Qy)`` at the integer ``off``
    ``(P,2)`` around the pixel nearest each ``pos`` ``(B,K,2)`` - never interpolated (an
    interpolated pattern is blurred by an amount that depends on the sub-pixel phase, which
    locks fitted positions to the pixel grid).

    Returns ``(patch (B,K,P), frac (B,K,2))``: the patch's offsets from ``pos`` are
    ``off - frac``. A patch that would leave the detector is moved inside it (``frac`` then
    exceeds half a pixel; callers treat such disks as outside)."""
    B, Q0, Q1 = pats.shape
    h = int(off.abs().max())
    # a lost position (NaN/inf) reads a valid patch far from it: ``frac`` then marks it outside
    pos = torch.where(torch.isfinite(pos), pos, torch.full_like(pos, -1e6))
    base = torch.round(pos)
    lo = torch.tensor([h, h], dtype=pos.dtype, device=pos.device)
    hi = torch.tensor([max(h, Q0 - 1 - h), max(h, Q1 - 1 - h)], dtype=pos.dtype,
                      device=pos.device)
    base = torch.minimum(torch.maximum(base, lo), hi)
    frac = pos - base
    bl = base.long()
    start = (torch.arange(B, device=pats.device)[:, None] * (Q0 * Q1)
             + bl[..., 0] * Q1 + bl[..., 1])  # (B,K)
    flat = start[..., None] + (off[:, 0] * Q1 + off[:, 1])  # (B,K,P)
    vals = pats.reshape(-1)[flat.reshape(-1)].reshape(flat.shape)
    return torch.sqrt(torch.clamp(vals, min=0)), frac


def make_template(pats: torch.Tensor, centres: torch.Tensor, r: float,
                  step: float = 0.05) -> DiskTemplate:
    """Super-resolved square-rooted direct-beam profile of raw patterns ``(B,Qx,Qy)``.

    The beam pixels of every pattern are binned by their exact distance from that pattern's
    own sub-pixel ``centres`` into fine radial bins (``step`` px; local-linear kernel
    regression with a 0.1 px Gaussian, widened where the bins are sparse, see
    :func:`_radial_profile`). The patterns' different sub-pixel
    phases fill the bins in, so the profile is continuous and carries no pixel-phase blur;
    each pattern is normalised by its own centre level first (beam intensities vary).

    The patch reaches 2 px beyond the disk edge. A wider ring of background pixels pins a
    *per-pattern* ramp down better (strain MAE -10 to -15 % for a 4 px ring when each pattern
    fitted its own ramp), but with the ramp pooled over neighbouring positions (see
    :func:`pooled_coefficients`) 2, 3 and 4 px rings gave the same MAE within 0.01e-3 at
    w = 0, 0.25 and 0.7, and each pixel of ring costs ~7 % of the mapping speed."""
    off, h = _patch_offsets(r, pats.device)
    vals, frac = gather_patches(pats, centres[:, None, :].to(pats.dtype), off)
    vals, frac = vals[:, 0].double(), frac[:, 0].double()  # (B,P), (B,2)
    rho = torch.linalg.norm(off[None].double() - frac[:, None, :], dim=-1)  # (B,P)
    core = rho <= max(0.5 * r, 1.5)
    level = (vals * core).sum(1) / core.sum(1).clamp_min(1)
    good = level > 0
    if not bool(good.any()):
        raise ValueError("the direct beam is flat: cannot build a disk template")
    vals = vals[good] / level[good, None]
    rho = rho[good]
    # the pixel-aperture model needs beams at many sub-pixel phases to tell the profile from
    # the aperture; without (no descan: every beam at one phase) the radial profile is used
    pix = (PixelModel.fit(off.double()[None] - frac[good][:, None, :], vals, h)
           if phases_spread(frac[good]) else None)
    n = int(np.ceil((h * np.sqrt(2) + 1.0) / step)) + 2
    # the square-rooted fit keeps the radial profile: a pixel integrates counts, not their
    # square roots, so the aperture model describes the intensities only (used through the
    # sqrt, it cost 2x in strain MAE on disks with internal dynamical contrast)
    T = _radial_profile(rho, vals, n, step)
    T_lin = None if pix is not None else _radial_profile(rho, vals ** 2, n, step)
    scale = float(T.max() - T.min())
    scale_lin = 1.0 if T_lin is None else float(T_lin.max() - T_lin.min())
    if not (scale > 0 and scale_lin > 0):
        raise ValueError("the direct beam is flat: cannot build a disk template")
    dT = torch.gradient(T, spacing=step)[0]
    dT[0] = 0.0
    tpl = DiskTemplate(off, (T / scale).float(), (dT / scale).float(), step, float(r),
                       torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0),
                       aperture=None if pix is None else pix.aperture)
    if pix is not None:
        tpl.lin_model = pix
    else:
        dT_lin = torch.gradient(T_lin, spacing=step)[0]
        dT_lin[0] = 0.0
        tpl.lin_model = DiskTemplate(off, (T_lin / scale_lin).float(),
                                     (dT_lin / scale_lin).float(), step, float(r),
                                     *(torch.empty(0),) * 4)
    tpl.coarse = _bilinear_template(pats, centres, off.to(pats.dtype), h)
    _fill_tables(tpl)
    return tpl


def _fill_tables(tpl: DiskTemplate) -> None:
    """The design matrices, pseudo-inverses and conditioning of ``tpl`` at every tabulated
    sub-pixel phase, from its profiles and ``lin_model``; always computed on the CPU (in
    float64) and then moved to the template's device, so a rebuilt table equals the first."""
    device = tpl.profile.device
    off = tpl.offsets.cpu()
    h = int(off.abs().max())
    cpu = DiskTemplate(off, tpl.profile.cpu(), tpl.slope.cpu(), tpl.step, tpl.radius,
                       *(torch.empty(0),) * 4)
    # the design matrix at every tabulated sub-pixel phase
    ph = torch.arange(-PHASES // 2, PHASES // 2 + 1, dtype=torch.float64) / PHASES
    fr = torch.stack(torch.meshgrid(ph, ph, indexing="ij"), -1).reshape(-1, 2)  # (F,2)
    v = off.double()[None] - fr[:, None, :]  # (F,P,2)
    Tv, gr, gc = (x.double() for x in cpu.evaluate(v.float()))
    # columns: gain, offset, background ramp (2), shift (2), intensity gradient inside the
    # disk (2). The ramps are odd functions like the edge gradients; left out, a sloping
    # diffuse background would read as a shift. An intensity gradient inside a disk
    # (dynamical scattering, tilt) also reads as a shift, but fitted freely per pattern it
    # costs too much precision; it is fitted here and then either dropped (a 6-column fit,
    # via ``cond``) or, with the ramp, fixed to a value pooled over neighbouring positions
    # (see :func:`pooled_coefficients`).
    D = _design(Tv, gr, gc, v, h)
    G = D.transpose(1, 2) @ D
    Ginv = torch.linalg.inv(G)
    tpl.pinv = (Ginv @ D.transpose(1, 2)).float().to(device)
    tpl.gram = G.float().to(device)
    G6inv = torch.linalg.inv(G[:, :6, :6])
    tpl.cond = (G6inv @ G[:, :6, 6:]).float().to(device)
    tpl.g00 = G6inv[:, 0, 0].float().to(device)
    tpl.design = D.float().to(device)
    # the same design for the intensities themselves (Poisson-weighted last step)
    lin = tpl.lin_model
    if isinstance(lin, PixelModel):
        Tl, glr, glc = lin.evaluate(v)
    else:
        lin_cpu = DiskTemplate(off, lin.profile.cpu(), lin.slope.cpu(), lin.step, lin.radius,
                               *(torch.empty(0),) * 4)
        Tl, glr, glc = (x.double() for x in lin_cpu.evaluate(v.float()))
    tpl.design_lin = _design(Tl, glr, glc, v, h).transpose(-1, -2).float().contiguous().to(
        device)


#: Beam pixels per block when :class:`PixelModel` sums its normal equations (a block holds
#: its rows' 64 aperture subsamples and ``W x W`` outer products, W ~15-30: ~40-70 MB).
FIT_CHUNK_ROWS = 10_000

#: Pixel apertures tried by :class:`PixelModel` (fraction of the pixel pitch over which a
#: detector pixel integrates: 0 = point samples, as a multislice FFT grid delivers; 1 = the
#: whole pixel, as a counting detector does).
APERTURES = (0.0, 0.5, 1.0)


@dataclass
class PixelModel:
    """A disk as a detector records it: a radially symmetric profile ``P(rho)`` *before*
    pixelation, integrated over a square pixel aperture of width ``aperture`` px.

    Why: a sharp disk integrated over square pixels is not radially symmetric (its edge is
    blurred by a box, which has 4-fold symmetry), so a radial template fitted to it is wrong
    by a 4-fold residual whose overlap with the shift columns depends on the disk's sub-pixel
    phase. Each disk then carries a phase-dependent bias, and the lattice - disks and beam at
    different phases - a strain bias that changes with the pattern's position on the detector
    (whole-pattern phase sweep of sharp pixel-integrated disks, tests/test_phase_sweep.py:
    strain error 3.4 / 5.1e-5 peak to peak in exx / eyy with the radial template, 2.2 / 1.2e-5
    with this one). Used for the counts (the Poisson step) only. ``P`` is fitted to the
    beam's pixels by linear least squares on hat functions every
    ``step`` px (a smoothness penalty fills radii no sample reaches), for each aperture of
    :data:`APERTURES`; the aperture whose fit leaves the least residual wins."""

    profile: torch.Tensor  # (n,) intensity profile P (normalised to unit contrast)
    step: float
    aperture: float
    sub: int = 8

    @classmethod
    def fit(cls, v: torch.Tensor, vals: torch.Tensor, h: int, step: float = 0.1,
            chunk: int = FIT_CHUNK_ROWS) -> PixelModel | None:
        """Fit to the intensities of square-rooted, level-normalised beam pixels ``vals``
        ``(B, P)`` at offsets ``v`` ``(B, P, 2)`` from each beam's centre. None when there
        are too few samples.

        Every pixel counts: the normal equations are summed over blocks of ``chunk`` pixels
        from banded design rows (:meth:`_normal_equations`), so memory stays bounded and the
        cost grows with the pixels times the band, not times all knots. An even subset of
        40 000 pixels used to be taken ("plenty for ~100 unknowns"), but the model's
        *derivative* - with which every disk's shift is measured - carries the beams' shot
        noise, and noise in it shortens each measured shift (errors in variables). Fitted to
        all ~450 sampled beams instead of ~240, the validation case at dose 2e4
        (hex_lowdose_background) mapped 1-3 % more precisely and its error bars went from
        15-17 % to 7-10 % short (tests/test_poisson_weights.py)."""
        v = v.reshape(-1, 2).double()
        y = vals.reshape(-1).double() ** 2
        n = int(np.ceil((h * np.sqrt(2) + 1.5) / step)) + 2
        if len(y) < 4 * n:
            return None
        best = None
        for ap in APERTURES:
            G, b = cls._normal_equations(v, y, ap, n, step, chunk)
            lin = _penalised_lstsq(G, b)
            # residual sum of squares from the normal equations: |y|^2 - 2 c.b + c.G.c
            rss = float(y @ y - 2 * lin @ b + lin @ G @ lin)
            if best is None or rss < best[0] * (1 - 1e-3):
                best = (rss, ap, lin)
        _, ap, lin = best
        contrast = float(lin.max() - lin.min())
        if not contrast > 0:  # a flat beam: the radial profile path refuses it clearly
            return None
        return cls(lin / contrast, step, ap)

    @staticmethod
    def _subsamples(aperture: float, sub: int, like: torch.Tensor) -> torch.Tensor:
        if aperture <= 0:
            return torch.zeros(1, 2, dtype=like.dtype)
        t = ((torch.arange(sub, dtype=like.dtype) + 0.5) / sub - 0.5) * aperture
        return torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)

    @classmethod
    def _basis(cls, v: torch.Tensor, aperture: float, n: int, step: float, sub: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Design rows at ``v`` ``(N, 2)`` - the pixel-aperture average of the hat functions -
        in banded form: ``(rows (N, W), first (N,))``, row ``k``'s nonzero entries being
        columns ``first[k] .. first[k] + W - 1`` of the full ``(N, n)`` design (a pixel's
        aperture spans ~1.5 px of radius: ~15 of the ~100-250 hat functions)."""
        u = cls._subsamples(aperture, sub, v)
        rho = torch.linalg.norm(v[:, None, :] + u[None], dim=-1) / step  # (N,S)
        i0 = rho.floor().long().clamp(max=n - 2)
        w = (rho - i0).clamp(0, 1) / u.shape[0]
        first = i0.amin(1)
        local = i0 - first[:, None]
        rows = torch.zeros(len(v), int(local.max()) + 2, dtype=v.dtype)
        rows.scatter_add_(1, local, 1 / u.shape[0] - w)
        rows.scatter_add_(1, local + 1, w)
        return rows, first

    @classmethod
    def _normal_equations(cls, v: torch.Tensor, y: torch.Tensor, aperture: float, n: int,
                          step: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``D^T D`` ``(n, n)`` and ``D^T y`` ``(n,)`` of the design over every row, summed
        block by block from the banded rows (each row adds a ``W x W`` outer product where
        its band lies: ``N W^2`` operations instead of ``N n^2``)."""
        # room past the last column for the widest band: a pixel's subsamples lie within
        # ``aperture * sqrt(2)`` px of radius of each other, so W <= that / step + 3
        pad = int(np.ceil(aperture * np.sqrt(2) / step)) + 3
        G = torch.zeros((n + pad) * (n + pad), dtype=torch.float64)
        b = torch.zeros(n + pad, dtype=torch.float64)
        for i in range(0, len(y), chunk):
            rows, first = cls._basis(v[i:i + chunk], aperture, n, step, cls.sub)
            W = rows.shape[1]
            assert W <= pad, (W, pad)  # the bound above; a band past it would wrap into G
            j = first[:, None] + torch.arange(W)  # (N, W) the band's columns
            idx = (j[:, :, None] * (n + pad) + j[:, None, :]).reshape(-1)
            G.index_add_(0, idx, (rows[:, :, None] * rows[:, None, :]).reshape(-1))
            b.index_add_(0, j.reshape(-1), (rows * y[i:i + chunk, None]).reshape(-1))
        return G.reshape(n + pad, n + pad)[:n, :n].contiguous(), b[:n].contiguous()

    def evaluate(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pixel-integrated profile and its gradient ``(T, dT/dv0, dT/dv1)`` at ``v``
        ``(..., 2)`` (float64)."""
        prof = self.profile.double()
        u = self._subsamples(self.aperture, self.sub, v)
        w = v[..., None, :].double() + u  # (..., S, 2)
        rho = torch.linalg.norm(w, dim=-1)
        x = rho / self.step
        n = prof.shape[0]
        i0 = x.floor().long().clamp(max=n - 2)
        f = (x - i0).clamp(0, 1)
        T = torch.lerp(prof[i0], prof[i0 + 1], f).mean(-1)
        slope = (prof[i0 + 1] - prof[i0]) / self.step
        g = (slope / rho.clamp_min(1e-6))[..., None] * w
        g = g.mean(-2)
        return T, g[..., 0], g[..., 1]


#: Largest phase concentration (mean resultant length of ``exp(2 pi i frac)``, per axis) at
#: which the beams still count as spread over the pixel: 1 = every beam at one sub-pixel
#: phase, 0 = uniform. 0.8 is a uniform spread over ~0.4 px.
MAX_PHASE_CONCENTRATION = 0.8


def phases_spread(frac: torch.Tensor) -> bool:
    """Whether beam sub-pixel offsets ``frac`` ``(B, 2)`` cover the pixel well enough, in both
    axes, for :class:`PixelModel`. Why: with every beam at one phase (a well-aligned
    microscope, no descan) the beam's samples lie on a fixed set of radii and the fit cannot
    tell the aperture's blur from the profile's; the pixel model then did worse than the
    radial profile (simulated w = 0.5 without descan: strain MAE 1.19-1.70 vs 0.62e-3)."""
    if len(frac) < 8:
        return False
    z = torch.exp(2j * np.pi * frac.double())
    return bool((z.mean(0).abs() < MAX_PHASE_CONCENTRATION).all())


def _penalised_lstsq(G: torch.Tensor, b: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """Least squares ``D c = y`` from its normal equations ``G = D^T D``, ``b = D^T y``, with
    a small second-difference penalty (relative to the data's own weight per coefficient), so
    radii no sample reaches are interpolated, and a zero slope at ``rho = 0``."""
    n = G.shape[0]
    L2 = torch.zeros(n - 2, n, dtype=G.dtype)
    idx = torch.arange(n - 2)
    L2[idx, idx], L2[idx, idx + 1], L2[idx, idx + 2] = 1.0, -2.0, 1.0
    scale = float(G.diagonal().mean())
    A = G + lam * scale * (L2.T @ L2)
    A[0, 0] += scale  # P'(0) = 0: c0 = c1
    A[0, 1] -= scale
    A[1, 0] -= scale
    A[1, 1] += scale
    return torch.linalg.solve(A, b)


def _design(T: torch.Tensor, gr: torch.Tensor, gc: torch.Tensor, v: torch.Tensor, h: float
            ) -> torch.Tensor:
    """The 8 columns of a disk fit ``(F, P, 8)`` from a profile ``T`` and its gradient
    ``(gr, gc)`` at the patch offsets ``v`` ``(F, P, 2)``: gain, offset, background ramp (2),
    shift (2), intensity gradient inside the disk (2)."""
    return torch.stack([T, torch.ones_like(T), v[..., 0] / h, v[..., 1] / h, -gr, -gc,
                        T * v[..., 0] / h, T * v[..., 1] / h], -1)


def _radial_profile(rho: torch.Tensor, vals: torch.Tensor, n: int, step: float
                    ) -> torch.Tensor:
    """Continuous radial profile (``n`` bins of ``step`` px) of samples ``vals`` at radii
    ``rho``: linear binning, then Gaussian *local-linear* kernel regression, finer where bins
    are full.

    Local-linear, not local-constant: when every beam sits at the same sub-pixel phase (no
    descan) the samples fall on a fixed set of radii 0.1-0.5 px apart, and a local average
    turns the disk edge into a staircase whose slope - the shift column of every disk fit -
    is wrong between the sampled radii. A local line interpolates between them (simulated
    polycrystal without descan, w = 0.5: strain MAE 0.85/0.99/0.63e-3 -> 0.62/0.61/0.43e-3);
    with descan it changes nothing measurable."""
    x = (rho / step).reshape(-1)
    y = vals.reshape(-1)
    i0 = x.floor().long().clamp(max=n - 2)
    w = (x - i0).clamp(0, 1)

    def binned(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float64)
        return out.index_add_(0, i0, v * (1 - w)).index_add_(0, i0 + 1, v * w)

    # per bin: weight, and first/second moments of the samples' exact coordinates (a local
    # line needs them: taking every sample at its bin's centre flattens the line)
    W, X, XX = binned(torch.ones_like(x)), binned(x), binned(x * x)
    S, SX = binned(y), binned(x * y)
    j = torch.arange(n, dtype=torch.float64)

    def smooth(a: torch.Tensor, sigma_px: float, odd: bool = False) -> torch.Tensor:
        s = sigma_px / step
        k = int(np.ceil(3 * s))
        t = torch.arange(-k, k + 1, dtype=torch.float64)
        ker = torch.exp(-0.5 * (t / s) ** 2)
        # mirror at rho = 0 (the profile is even in rho; odd moments change sign)
        mirror = a[1:k + 1].flip(0)
        ap = torch.cat([-mirror if odd else mirror, a, a[-1:].expand(k)])
        return torch.nn.functional.conv1d(ap[None, None], ker[None, None])[0, 0]

    T = torch.full((n,), float("nan"), dtype=torch.float64)
    for sig in (1.0, 0.3, 0.1):  # coarse first, finer where the bins are well filled
        c0 = smooth(W, sig)
        cj = smooth(X, sig, odd=True)
        c1 = cj - j * c0
        c2 = smooth(XX, sig) - 2 * j * cj + j * j * c0
        d0 = smooth(S, sig)
        d1 = smooth(SX, sig, odd=True) - j * d0
        det = c0 * c2 - c1 * c1
        # a line needs samples at two distinct radii inside the kernel; where there is just
        # one cluster the coarser kernel's line (or, at the coarsest, the mean) stays
        spread = det > 1e-3 * (c0 * c2).clamp_min(1e-30)
        line = (c2 * d0 - c1 * d1) / torch.where(spread, det, torch.ones_like(det))
        if sig < 1.0:
            use = (c0 > (3.0 * sig / step)) & spread
            fine = line
        else:
            use = c0 > 0
            fine = torch.where(spread, line, d0 / c0.clamp_min(1e-30))
        T = torch.where(use, fine, T)
    known = ~torch.isnan(T)
    if not bool(known.any()):
        raise ValueError("the direct beam is flat: cannot build a disk template")
    return torch.where(known, T, T[known][-1])  # beyond the sampled radii: the outermost level


def _bilinear_template(pats: torch.Tensor, centres: torch.Tensor, off: torch.Tensor, h: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coarse matcher of the first Gauss-Newton step(s): patches *interpolated* at the
    continuous disk position, against the mean interpolated beam (its shift derivative a
    difference over one pixel). Interpolation blurs the data and widens the capture range,
    but biases positions by the sub-pixel phase, so the last step always uses the exact
    pixels. Returns ``(pinv (6,P), gram (6,6), g00 ())``."""
    def mean_at(shift: tuple[float, float]) -> torch.Tensor:
        pos = centres[:, None, :] + off[None] + torch.tensor(shift, device=off.device)
        return sqrt_samples(pats, pos).mean(0).double()

    T = mean_at((0.0, 0.0))
    Tr = mean_at((0.5, 0.0)) - mean_at((-0.5, 0.0))
    Tc = mean_at((0.0, 0.5)) - mean_at((0.0, -0.5))
    scale = float(T.max() - T.min())
    if not scale > 0:
        raise ValueError("the direct beam is flat: cannot build a disk template")
    o = off.double() / h
    D = torch.stack([T / scale, torch.ones_like(T), o[:, 0], o[:, 1], -Tr / scale, -Tc / scale],
                    1)
    G = D.T @ D
    Ginv, info = torch.linalg.inv_ex(G)
    if int(info) != 0 or not bool(torch.isfinite(Ginv).all()):
        raise ValueError("the direct beam is too small or too flat to build a disk template")
    return (Ginv @ D.T).float(), G.float(), Ginv[0, 0].float()


def lattice_points(g1: np.ndarray, g2: np.ndarray, pmax: float) -> np.ndarray:
    """All lattice points ``h g1 + k g2`` with ``|p| <= pmax``, the origin first: ``(K, 2)``."""
    g1, g2 = np.asarray(g1, float), np.asarray(g2, float)
    n = int(np.ceil(pmax / max(1e-6, min(np.linalg.norm(g1), np.linalg.norm(g2))) * 2)) + 1
    pts = [(0.0, 0.0)]
    for h in range(-n, n + 1):
        for k in range(-n, n + 1):
            if h == 0 and k == 0:
                continue
            p = h * g1 + k * g2
            if np.linalg.norm(p) <= pmax:
                pts.append((float(p[0]), float(p[1])))
    return np.asarray(pts, np.float32)


def _rot(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def angular_search(
    pats: torch.Tensor, t: torch.Tensor, A0: torch.Tensor, P: torch.Tensor, L: float,
    span_deg: float, step_deg: float, r: float,
) -> torch.Tensor:
    """Rotate ``A0`` (B,2,2) by the angle in ``[-span, span]`` that maximises the summed
    pattern intensity at the predicted disk centres (five points per disk, so a disk is hit
    even when off by up to about its radius); parabolic sub-step. Returns the new ``A``."""
    dth = torch.arange(-span_deg, span_deg + 1e-6, step_deg, device=A0.device) * (np.pi / 180)
    J = len(dth)
    Rj = _rot(dth)  # (J,2,2)
    Pq = P[1:]  # without the direct beam
    cross = torch.tensor([[0, 0], [0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]], dtype=P.dtype,
                         device=P.device) * r
    B = A0.shape[0]
    A = Rj[None] @ A0[:, None]  # (B,J,2,2)
    pos = t[:, None, None, :] + L * torch.einsum("bjxy,ky->bjkx", A, Pq)  # (B,J,K,2)
    pos = pos[:, :, :, None, :] + cross  # (B,J,K,5,2)
    s = sqrt_samples(pats, pos.reshape(B, -1, 2)).reshape(B, J, -1).sum(-1)
    best = torch.argmax(s, 1)
    ib = best.clamp(1, J - 2)
    sm, s0, sp = (s.gather(1, (ib + k)[:, None])[:, 0] for k in (-1, 0, 1))
    den = sm - 2 * s0 + sp
    off = torch.where(den < 0, 0.5 * (sm - sp) / den.clamp(max=-1e-12), torch.zeros_like(den))
    off = torch.where(best == ib, off.clamp(-1, 1), torch.zeros_like(off))
    ang = dth[ib] + off * (step_deg * np.pi / 180)
    return _rot(ang) @ A0


def refine(
    pats: torch.Tensor, t: torch.Tensor, A: torch.Tensor, P: torch.Tensor, L: float,
    tpl: DiskTemplate, steps: int = 4, min_snr: float = 4.0, count_snr: float = 6.0,
    extra: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gauss-Newton refinement of ``A`` (B,2,2, lattice units) and beam position ``t`` (B,2 px).

    Returns ``(A, t, n_disks, rms)``: ``n_disks`` counts the diffracted disks (beam excluded)
    that were clearly significant (``count_snr``) in the last step; ``rms`` (px) is the
    weighted scatter of the disk shifts around the affine fit - large when the data's lattice
    is not the base's.

    ``extra``, when given, receives what redoing the last step with pooled nuisances needs
    (see :func:`pooled_coefficients`): :func:`poisson_fit`'s ``coef`` (B,K,8), ``cond``
    (B,K,3,4) and ``var4`` (B,K), the sub-pixel offsets ``dfrac`` (B,K,2), the disks used
    ``ok`` (B,K) and those whose patch lies on the detector ``inside`` (B,K), and
    ``A_prev`` / ``t_prev`` (before the last step); and ``A_cov`` (B,4,4),
    the covariance of the returned ``A`` (:func:`affine_covariance`).
    """
    B = A.shape[0]
    Q0, Q1 = pats.shape[-2:]
    K, npix = P.shape[0], tpl.offsets.shape[0]
    h = float(tpl.offsets.abs().max())
    n_ok = torch.zeros(B, dtype=torch.long, device=A.device)
    rms = torch.zeros(B, device=A.device)
    for step in range(max(1, steps)):
        # the first of several steps matches interpolated patches (wider capture range), the
        # others - always the last - exact pixels (unbiased)
        coarse = step == 0 and steps > 1 and tpl.coarse is not None
        pos = t[:, None, :] + L * torch.einsum("bxy,ky->bkx", A, P)  # (B,K,2)
        if coarse:
            cp, cg, c00 = tpl.coarse
            pts = (pos[:, :, None, :] + tpl.offsets.to(pos.dtype)).reshape(B, K * npix, 2)
            patch = sqrt_samples(pats, pts).reshape(B, K, npix)
            coef = patch @ cp.T
            fitted = torch.einsum("bki,ij,bkj->bk", coef, cg, coef)
            g00 = c00
            ncol = cp.shape[0]
            dfrac = torch.zeros_like(pos)
        else:
            # exact pixels around each disk's nearest pixel; the continuous template is
            # evaluated at the disk's sub-pixel phase (tabulated every 1/PHASES px: the shift is
            # then measured from the tabulated phase ``fq``)
            patch, frac = gather_patches(pats, pos, tpl.offsets)  # (B,K,npix), (B,K,2)
            iq = torch.round(frac * PHASES).clamp(-(PHASES // 2), PHASES // 2)
            dfrac = iq / PHASES - frac
            iq = iq.long() + PHASES // 2
            ph = iq[..., 0] * (PHASES + 1) + iq[..., 1]  # (B,K)
            coef8 = (tpl.pinv[ph] @ patch[..., None])[..., 0]  # (B,K,8)
            # residual power without forming the residual: |p|^2 - c^T (D^T D) c
            fitted = torch.einsum("bki,bkij,bkj->bk", coef8, tpl.gram[ph], coef8)
            coef = condition(coef8, ph, tpl)
            g00 = tpl.g00[ph]
            ncol = coef8.shape[-1]
        sigma2 = ((patch * patch).sum(-1) - fitted).clamp(min=0) / max(1, npix - ncol)
        a = coef[..., 0]
        inside = ((pos[..., 0] > h) & (pos[..., 0] < Q0 - 1 - h)
                  & (pos[..., 1] > h) & (pos[..., 1] < Q1 - 1 - h))
        # noise floor: 1e-4 of the beam's amplitude (1e-8 of its intensity in sqrt units), so
        # that exactly-zero noise-free vacuum never looks like a significant disk
        floor = (1e-4 * a[:, :1].abs()) ** 2 + 1e-30
        snr = a / torch.sqrt(sigma2 * g00 + floor)
        ok = inside & (snr > min_snr)
        # weak disks (> min_snr) still help the fit; only clear ones (> count_snr) count as
        # evidence of a lattice: smooth diffuse background alone can fake a few weak "disks".
        # 6 sigma: noise alone passes it ~1e-9 of the time; the 10 sigma used before refused
        # low-dose data whose first-order disks stand 6-10 sigma out (simulated dose 2e4 at
        # w = 0.6; validation hex_lowdose_background) and no background tried (the
        # simulator's amorphous rings up to w = 0.7, the validation cases' detector-centred
        # Lorentzians, abTEM's amorphous carbon) made a false crystal at either level
        n_ok = (ok & (snr > count_snr))[:, 1:].sum(1)
        n_sig = ok[:, 1:].sum(1)
        wts = None
        if not coarse and step == max(1, steps) - 1 and tpl.design_lin is not None:
            # the last step: Poisson-weighted fit of the counts themselves (the square-root fit
            # above decides which disks count and models the expected counts for the weights)
            # one detector count in data units: square-rooted Poisson counts scatter by 1/2
            count = 4.0 * sigma2[:, 1:].median(1).values if K > 1 else 4.0 * sigma2[:, 0]
            pf = poisson_fit(patch, ph, coef8, tpl, count)
            coef, wts = pf["coef6"], pf["weight6"]
            if extra is not None:
                extra.update(coef=pf["coef8"], cond=pf["cond"], var4=pf["var4"], dfrac=dfrac,
                             ok=ok, inside=inside, A_prev=A, t_prev=t)
        last = step == max(1, steps) - 1
        A_new, t_new, rms = affine_update(coef, ok, dfrac, A, t, P, L, h, wts,
                                          cov_out=extra if (last and extra is not None) else None)
        # a pattern with no usable disk gives a singular update (NaN): it keeps its previous
        # transform and counts no disk, so it ends as background rather than poisoning the
        # next step's pixel indices (seen on a 6-bit Merlin file without a direct beam)
        lost = ~(torch.isfinite(A_new).flatten(1).all(1) & torch.isfinite(t_new).all(1))
        lost |= (A_new.flatten(1).abs().amax(1) > 10) | (t_new.abs().amax(1) > 2 * max(Q0, Q1))
        if bool(lost.any()):
            A_new = torch.where(lost[:, None, None], A, A_new)
            t_new = torch.where(lost[:, None], t, t_new)
            n_ok = torch.where(lost, torch.zeros_like(n_ok), n_ok)
            n_sig = torch.where(lost, torch.zeros_like(n_sig), n_sig)
            rms = torch.where(lost, torch.full_like(rms, float("inf")), rms)
        A, t = A_new, t_new
    if extra is not None:
        extra["n_sig"] = n_sig
    return A, t, n_ok, rms


#: Floor of a pixel's variance in the Poisson step, relative to the peak of its own disk's
#: model: a pixel the model puts at (nearly) zero counts would otherwise weigh without bound,
#: and there the template's tail is model, not data (noise-free sharp disks shifted over a
#: pixel, tests/test_phase_sweep.py: strain spread 7e-5 with a floor at 0.1 % of the disk,
#: 1.2e-5 at 1 %). Relative to the disk, not the beam: a first-order disk may hold 1e-3 of
#: the beam, and the floor used to be 1e-3 of the beam's peak, which levels every pixel of
#: such a disk to one weight (tests/test_poisson_weights.py; a Cramer-Rao computation puts
#: the cost of a floor at 1 % of the disk's own peak at 1 %).
POISSON_FLOOR = 1e-2

#: ... and at this many detector counts: below about one count the Gaussian weights of the
#: Poisson fit stop describing Poisson data (low dose: a pixel the noisy model puts at 0.05
#: counts that records one would weigh 20x).
COUNT_FLOOR = 1.0


def poisson_fit(patch: torch.Tensor, ph: torch.Tensor, coef8: torch.Tensor,
                tpl: DiskTemplate, count: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """Poisson-weighted least squares of every disk's raw counts (the last Gauss-Newton step).

    The square-root fit is variance-stabilised but its template is then the square root of
    the beam, which a disk sitting on diffuse background does not follow (``sqrt(b + a T)``
    is not ``sqrt(b) + c sqrt(T)``); and it wastes the tails. Here the counts ``patch^2`` are
    fitted with the plain intensity design (``design_lin``, same 8 columns) and weights
    ``1 / mu``, ``mu`` = the square of the square-root fit ``coef8`` (floored at
    :data:`POISSON_FLOOR` of the disk's own peak and at ``count``, one detector count in the
    data's units, per pattern), then once more with ``mu`` from that fit: two steps of
    iteratively reweighted least squares for a Poisson likelihood (a single-disk Fisher
    computation gives 8-13 % lower shift scatter than the square-root fit; measured on the
    benchmark files: -6 % strain scatter at w = 0.5, the second reweighting another -2 to
    -3 %). ``count`` ``(B,)``: None leaves only the relative floor.

    Returns (all ``(B, K, ...)``): ``coef6`` the fit without the in-disk gradient and
    ``weight6`` its inverse shift variance times ``gain^2`` (the weight of the affine update);
    ``coef8`` the free 8-column fit, ``cond`` ``(3, 4)``: how gain and shift change when the
    ramp and gradient are fixed (``FIXED4``) instead of fitted, and ``var4`` the shift
    variance factor of that fixed fit - what :func:`pooled_coefficients` needs later.

    The variances are the sandwich ``G^-1 D^T W diag(mu) W D G^-1`` (``mu`` from the final fit),
    not ``G^-1``: where a floor caps a pixel's weight below its inverse variance, ``G^-1``
    overstates the shift's variance - at a few counts per pixel by 1.5x
    (tests/test_poisson_weights.py) - and so trusts a faint disk less, relative to the bright
    ones, than its scatter warrants; the affine fit's covariance assumes relative weights
    that are right (:func:`affine_covariance`)."""
    Ds = tpl.design[ph]  # (B,K,P,8)
    mu = (Ds @ coef8[..., None])[..., 0].clamp(min=0) ** 2
    # each disk's variances floored relative to its own peak (see POISSON_FLOOR)
    beam = coef8[:, :1, 0].clamp(min=0) ** 2  # (B,1)
    floor = torch.maximum(POISSON_FLOOR * mu.amax(-1), 1e-6 * beam) + 1e-12  # (B,K)
    if count is not None:
        floor = torch.maximum(floor, COUNT_FLOOR * count[:, None])
    DlT = tpl.design_lin[ph]  # (B,K,8,P): stored transposed, so this gather is contiguous
    y = (patch * patch)[..., None]
    eye = torch.eye(8, dtype=torch.float64, device=patch.device)
    c8 = coef8.double()
    for it in range(2):  # weights from the square-root fit, then from the first Poisson fit
        if it:
            mu = (c8.float()[..., None, :] @ DlT)[..., 0, :]
        W = 1.0 / torch.maximum(mu, floor[..., None])
        DWT = DlT * W[..., None, :]
        G = (DWT @ DlT.transpose(-1, -2)).double()
        rhs = (DWT @ y).double()
        tr = G.diagonal(dim1=-2, dim2=-1).sum(-1)
        G = G + (1e-9 * tr)[..., None, None] * eye
        c8 = torch.linalg.solve(G, rhs)[..., 0]
    G6i = torch.linalg.inv(G[..., :6, :6])
    c6 = (G6i @ rhs[..., :6, :])[..., 0]
    fr, fx = FREE4, FIXED4
    Gfi = torch.linalg.inv(G[..., fr, :][..., :, fr])
    M = Gfi @ G[..., fr, :][..., :, fx]  # (B,K,4,4)
    # the coefficients' covariance by the sandwich formula G^-1 (D^T W diag(mu) W D) G^-1:
    # the counts' variance is the model ``mu`` (Poisson), the weights ``W`` are not its
    # inverse where a floor capped them, and there G^-1 alone overstates the variance
    mu = (c8.float()[..., None, :] @ DlT)[..., 0, :].clamp(min=0)
    DWmu = DWT * mu[..., None, :]
    V = (DWmu @ DWT.transpose(-1, -2)).double()  # D^T W diag(mu) W D, (B,K,8,8)
    C6 = G6i @ V[..., :6, :6] @ G6i
    Cf = Gfi @ V[..., fr, :][..., :, fr] @ Gfi
    var6 = 0.5 * (C6[..., 4, 4] + C6[..., 5, 5])
    var4 = 0.5 * (Cf[..., 2, 2] + Cf[..., 3, 3])
    return {"coef6": c6.float(), "weight6": (c6[..., 0] ** 2 / var6.clamp_min(1e-300)).float(),
            "coef8": c8.float(), "cond": M[..., [0, 2, 3], :].float(), "var4": var4.float()}


def affine_update(coef: torch.Tensor, ok: torch.Tensor, dfrac: torch.Tensor, A: torch.Tensor,
                  t: torch.Tensor, P: torch.Tensor, L: float, h: float,
                  weight: torch.Tensor | None = None, cov_out: dict | None = None,
                  resid_out: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Gauss-Newton update of ``A`` and ``t`` from the per-disk fits ``coef`` (B,K,6).

    The disk shifts are combined by weighted least squares into ``dA`` and ``dt``
    (``d = dA p + dt``); ``weight`` (B,K) is each disk's inverse shift variance (default
    ``a^2``: the position variance of a disk under uniform sqrt-Poisson noise scales as
    ``1/a^2``). Returns ``(A, t, rms)``, ``rms`` the weighted scatter (px) the
    affine update leaves unexplained.

    ``cov_out``, when given, receives ``"A_cov"`` (B,4,4): the covariance of the updated
    ``A`` (row-major), see :func:`affine_covariance`, and the ``"chi2"`` and ``"dof"`` (B,)
    of its residual scale. ``resid_out``, when given, receives
    what :func:`shift_error_model` needs: ``"resid"`` (B,K,2) each disk's shift left
    unexplained (px), and ``"noise_factor"``, ``"floor_factor"`` (B,K) and ``"used"``: how
    much of a noise ``s2 / w_j`` and of a floor ``tau2`` on every disk's shift reaches each
    residual (``E |r_k|^2 / 2 = s2 noise_factor_k + tau2 floor_factor_k``)."""
    K = P.shape[0]
    X = torch.cat([P, torch.ones(K, 1, dtype=P.dtype, device=P.device)], 1)  # (K,3)
    a = coef[..., 0]
    a_safe = torch.where(ok, a, torch.ones_like(a))
    d = (coef[..., 4:6] / a_safe[..., None]).clamp(-h / 2, h / 2) + dfrac
    w = torch.where(ok, a ** 2 if weight is None else weight, torch.zeros_like(a))  # (B,K)
    Xw = X[None] * w[..., None]  # (B,K,3)
    M = Xw.transpose(1, 2) @ X[None]  # (B,3,3)
    rhs = Xw.transpose(1, 2) @ d  # (B,3,2)
    tr = M.diagonal(dim1=1, dim2=2).sum(-1)
    ridge = (1e-6 * tr + 1e-12)[:, None, None] * torch.eye(3, device=A.device)
    sol = torch.linalg.solve(M.double() + ridge.double(), rhs.double()).float()
    A = A + sol[:, :2, :].transpose(1, 2) / L
    t = t + sol[:, 2, :]
    res = d - X[None] @ sol
    chi2 = (w * (res ** 2).sum(-1)).sum(1)
    rms = torch.sqrt(chi2 / w.sum(1).clamp_min(1e-30))
    if cov_out is not None:
        cov_out["A_cov"] = affine_covariance(M.double() + ridge.double(), chi2, (w > 0).sum(1),
                                             L)
        # what the covariance's residual scale rests on (:func:`moderated_scale`)
        cov_out["chi2"], cov_out["dof"] = chi2, residual_dof((w > 0).sum(1)).to(chi2.dtype)
    if resid_out is not None:
        # E|r_k|^2 / 2 = sum_j (I - H)_kj^2 var_j, H = X M^-1 X^T W the fit's hat matrix: with
        # var_j = s2 / w_j + tau2 that is s2 a_k + tau2 b_k, exact whatever the weights
        Minv = torch.linalg.inv(M.double() + ridge.double())  # (B,3,3)
        H = torch.einsum("ki,bij,lj->bkl", X.double(), Minv, X.double()) * w.double()[:, None, :]
        IH2 = (torch.eye(K, dtype=H.dtype, device=H.device) - H) ** 2
        used = (w > 0).double()
        v = torch.where(w > 0, 1.0 / w.double().clamp_min(1e-300), torch.zeros_like(used))
        resid_out.update(resid=res, noise_factor=(IH2 @ v[..., None])[..., 0].float(),
                         floor_factor=(IH2 @ used[..., None])[..., 0].float(), used=w > 0)
    return A, t, rms


def residual_dof(n_disks: torch.Tensor) -> torch.Tensor:
    """Degrees of freedom (float64) of the affine disk-shift fit's residuals: two coordinates
    per disk used, less the six parameters of ``A`` and ``t``. One definition for the
    covariance's own scale (:func:`affine_covariance`) and for the moderation that borrows
    from neighbours (:func:`moderated_scale`), which must agree on it."""
    return 2.0 * n_disks.double() - 6.0


def _student_t_factor(dof: torch.Tensor) -> torch.Tensor:
    """:func:`napari_stem_strain.uncertainty.student_t_variance_factor` in torch:
    ``dof / (dof - 2)``, 3 below 3 degrees of freedom."""
    return torch.where(dof >= 3, dof / (dof - 2.0).clamp_min(1.0), torch.full_like(dof, 3.0))


def affine_covariance(M: torch.Tensor, chi2: torch.Tensor, n_disks: torch.Tensor, L: float
                      ) -> torch.Tensor:
    """Covariance (B,4,4) of ``A`` from :func:`affine_update`'s weighted disk-shift fit.

    ``M`` (B,3,3) is the fit's normal matrix ``X^T W X``, ``chi2`` (B,) its weighted residual
    sum over the ``n_disks`` disks used (2 coordinates each, 6 parameters). Why the residual
    scale (``chi2 / (2 n - 6)``) and not the weights' absolute values: the Poisson weights
    assume detector counts of one per electron and a perfect disk model; a detector gain, a
    background the template lacks or dynamical contrast inside a disk all scatter the disks
    beyond that, and the residuals measure exactly that scatter (the error bars then stay
    calibrated on data the model does not describe perfectly). ``A += sol^T / L``, so
    ``cov(A_ij, A_kl) = delta_ik s2 Minv_jl / L^2``, ``s2`` widened by the Student-t factor of
    an estimated scale (``dof / (dof - 2)``: 1.5 with 6 disks, 1.03 with 21); NaN where fewer
    than 4 disks were used.
    """
    Minv = torch.linalg.inv(M)[:, :2, :2]
    dof = residual_dof(n_disks)
    s2 = torch.where(dof > 0, chi2.double() / dof.clamp_min(1.0),
                     torch.full_like(dof, float("nan")))
    # the scale is itself estimated from ``dof`` residuals: the Student-t factor
    s2 = s2 * _student_t_factor(dof)
    C = Minv * (s2 / L ** 2)[:, None, None]
    cov = torch.zeros(C.shape[0], 4, 4, dtype=C.dtype, device=C.device)
    cov[:, :2, :2] = C
    cov[:, 2:, 2:] = C
    return cov.float()


def _trigamma_inverse(y: float) -> float:
    """``x`` with ``trigamma(x) = y`` (Newton's method on a decreasing convex function,
    started below the root as in Smyth 2004)."""
    from scipy.special import polygamma

    if y > 1e7:
        return 1.0 / np.sqrt(y)
    if y < 1e-6:
        return 1.0 / y
    x = 0.5 + 1.0 / y
    for _ in range(50):
        tri = float(polygamma(1, x))
        step = tri * (1.0 - tri / y) / float(polygamma(2, x))
        x += step
        if -step / x < 1e-8:
            break
    return x


#: Fewest positions from which :func:`moderated_scale` estimates the prior's weight.
MODERATION_MIN_POSITIONS = 20


def moderated_scale(s2: torch.Tensor, dof: torch.Tensor, prior: torch.Tensor,
                    prior_dof: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's residual scale shrunk towards its same-grain neighbours' (empirical
    Bayes, as limma moderates gene-wise variances: Smyth 2004).

    Why: the covariance of a position's ``A`` is scaled by its own residuals
    (:func:`affine_covariance`), ``s2`` from ``dof = 2 n - 6`` residuals - 10 with 8 disks.
    Such a scale is off by +-45 % by chance; the Student-t factor makes the bars right on
    average, but a position whose residuals came out small gets a bar too short and one
    whose came out large a bar too long (validation hex_lowdose_background: z's standard
    deviation 1.69 in the smallest fifth of sigmas, 0.85 in the largest). The neighbours of
    the same grain - same dose, disks and background - measure nearly the same scale.

    ``s2``, ``dof`` per position; ``prior`` its neighbours' pooled scale and ``prior_dof``
    the residual degrees of freedom behind it (all ``(N,)``). The prior's weight ``d0`` is
    estimated from the data: how much more ``log(s2 / prior)`` scatters than ``dof`` and
    ``prior_dof`` explain (``trigamma``) is the true scales' own spread; none left means the
    neighbours' scale is the position's (``d0 = prior_dof``). Returns the moderated scale
    ``(d0 s0^2 + dof s2) / (d0 + dof)`` and its degrees of freedom ``d0 + dof`` (for the
    Student-t factor); positions without a usable prior keep ``s2`` and ``dof``. The model:
    ``1 / sigma^2`` gamma-distributed around ``1 / s0^2`` with ``d0`` degrees of freedom,
    ``s0^2`` the neighbours' scale corrected for that spread (their mean scale is
    ``s0^2 d0 / (d0 - 2)``)."""
    from torch.special import digamma, polygamma

    s2d, d = s2.double(), dof.double()
    pr, D = prior.double(), prior_dof.double()
    ok = (torch.isfinite(s2d) & torch.isfinite(pr) & (d > 0) & (D > 0) & (s2d > 0) & (pr > 0))
    if int(ok.sum()) < MODERATION_MIN_POSITIONS:
        return s2, dof
    dd, DD = d[ok], D[ok]
    # log(chi2_k / k) has mean digamma(k/2) - log(k/2) and variance trigamma(k/2)
    e = (torch.log(s2d[ok] / pr[ok]) - (digamma(dd / 2) - torch.log(dd / 2))
         + (digamma(DD / 2) - torch.log(DD / 2)))
    excess = float(e.var() - polygamma(1, dd / 2).mean() - polygamma(1, DD / 2).mean())
    d0 = D.clone()
    if excess > 0:
        d0 = torch.minimum(d0, torch.full_like(d0, 2.0 * _trigamma_inverse(excess)))
    # the prior of the model is the scale whose inverse is the mean inverse scale: below the
    # neighbours' mean scale by the spread d0 implies (and by any common offset, mean(e))
    s0 = pr * torch.exp(e.mean() + digamma(d0 / 2) - torch.log(d0 / 2))
    post = (d0 * s0 + d * s2d) / (d0 + d)
    return (torch.where(ok, post, s2d).to(s2.dtype),
            torch.where(ok, d0 + d, d).to(dof.dtype))


def moderate_covariance(cov: dict, fitted: torch.Tensor, shape: tuple[int, int],
                        A: torch.Tensor, radius: int, A_var: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """:func:`affine_update`'s covariances (``cov``: ``A_cov``, ``chi2``, ``dof`` of the
    ``fitted`` positions of a ``shape`` window, ``fitted`` its flattened mask) with each
    residual scale moderated towards the same-grain neighbours' (:func:`moderated_scale`;
    neighbours as :func:`pool_nuisance` finds them, the position itself left out)."""
    Rx, Ry = shape
    chi2 = torch.zeros(Rx * Ry, dtype=torch.float64)
    dof = torch.zeros_like(chi2)
    chi2[fitted] = cov["chi2"].double()
    dof[fitted] = cov["dof"].double()
    valid = fitted & (dof > 0) & torch.isfinite(chi2)
    chi2 = torch.where(valid, chi2, torch.zeros_like(chi2))
    dof = torch.where(valid, dof, torch.zeros_like(dof))
    vals = torch.stack([chi2, dof], -1).reshape(Rx, Ry, 1, 2).float()
    mean, count = pool_nuisance(vals, valid.reshape(Rx, Ry, 1).float(), A, radius,
                                A_var=A_var, with_weight=True)
    total = (mean * count).reshape(Rx * Ry, 2).double()
    # the neighbours' sums (the pooled sums are float32: a position alone in its grain leaves
    # a rounding residue, not a prior; a neighbour brings at least 2 degrees of freedom)
    prior_dof = total[:, 1] - dof
    has = prior_dof > 1.0
    prior = torch.where(has, (total[:, 0] - chi2) / prior_dof.clamp_min(1.0),
                        torch.full_like(dof, float("nan")))
    prior_dof = torch.where(has, prior_dof, torch.zeros_like(prior_dof))
    s2 = torch.where(valid, chi2 / dof.clamp_min(1e-30), torch.full_like(dof, float("nan")))
    post, post_dof = moderated_scale(s2[valid], dof[valid], prior[valid],
                                     prior_dof[valid].clamp_min(0))
    factor = torch.ones_like(chi2)
    factor[valid] = (post * _student_t_factor(post_dof)
                     / (s2[valid] * _student_t_factor(dof[valid])))
    factor = torch.nan_to_num(factor[fitted], nan=1.0, posinf=1.0)
    return cov["A_cov"] * factor.to(cov["A_cov"].dtype)[:, None, None]


#: Iterations of the variance-component fit in :func:`shift_error_model`.
ERROR_MODEL_ITERATIONS = 4


def shift_error_model(resid: torch.Tensor, noise_factor: torch.Tensor,
                      floor_factor: torch.Tensor, used: torch.Tensor, A: torch.Tensor,
                      radius: int, A_var: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each disk's measured shift scatters, as noise plus a floor: ``var_k = s2 / w_k
    + tau2``, with ``s2`` and ``tau2`` (each ``(Rx, Ry)``) fitted to the affine fit's residuals
    of a band of the scan, pooled over same-grain neighbours (:func:`pool_nuisance`).

    Why: the weights ``w_k`` (gain^2 over the fit's variance factor) describe shot noise only,
    so a strong disk counts thousands of times more than a weak one. But a disk's shift also
    carries an error that does not shrink with its intensity: contrast inside the disk that
    the disk model does not describe (dynamical fringes, a soft edge, a curved background)
    biases each reflection's position by a few hundredths of a pixel, differently per
    reflection and the same at every position of a grain. Those per-disk errors are
    independent between reflections, so they average out over many disks - unless the
    weights hand the whole fit to the few strongest (first-order) disks. The residuals of the
    affine fit show both terms; with a floor the weights ``1 / var_k`` spread over all disks
    that are measured well enough.

    ``resid`` (Rx,Ry,K,2), ``noise_factor``, ``floor_factor`` and ``used`` (Rx,Ry,K) as
    :func:`affine_update` leaves them; ``A`` (Rx,Ry,2,2) the transforms that decide which
    neighbours are the same grain, ``A_var`` (Rx,Ry) their variance (:func:`pool_nuisance`).
    Method of moments on ``e_k = |r_k|^2 / 2``, whose mean is
    ``s2 noise_factor_k + tau2 floor_factor_k`` exactly (the factors carry the fit's hat
    matrix, so a disk that alone pins a parameter - the direct beam - weighs nothing);
    iteratively reweighted by the last round's variance of ``e_k`` (~ its mean squared)."""
    use = used & (floor_factor > 0)
    e = torch.where(use, (resid.double() ** 2).sum(-1) / 2.0, torch.zeros_like(floor_factor,
                                                                               dtype=torch.float64))
    a = torch.where(use, noise_factor.double(), torch.zeros_like(e))
    b = torch.where(use, floor_factor.double(), torch.zeros_like(e))
    n_used = use.sum(-1)
    # one scale for the band (s2 must stay comparable between pooled positions)
    scale = float(a[use].median()) if bool(use.any()) else 1.0
    scale = scale if scale > 0 else 1.0
    an, en = a / scale, e / scale
    has = (n_used > 6).double()[..., None]
    s2 = torch.ones(a.shape[:2], dtype=torch.float64)  # noise alone, in units of the weights
    t2 = torch.zeros_like(s2)
    for it in range(ERROR_MODEL_ITERATIONS):
        mean = s2[..., None] * an + t2[..., None] * b
        if it == 0:  # first round: plain least squares (no variance known yet)
            u = use.double()
        else:
            u = torch.where(use, 1.0 / mean.clamp_min(1e-12 * float(mean.max())) ** 2,
                            torch.zeros_like(mean))
        mom = torch.stack([u * an * an, u * an * b, u * b * b, u * an * en, u * b * en],
                          -1).sum(2)  # (Rx,Ry,5)
        # each position counts the same in the pooled mean
        mom = mom / (mom[..., 0] + mom[..., 2]).clamp_min(1e-300)[..., None]
        pooled = pool_nuisance(mom[:, :, None, :].float(), has.float(), A, radius,
                               A_var=A_var)[:, :, 0]
        aa, ab, bb, ae, be = (pooled[..., i].double() for i in range(5))
        det = aa * bb - ab * ab
        okd = det > 1e-9 * (aa * bb).clamp_min(1e-300)
        safe = torch.where(okd, det, torch.ones_like(det))
        s2n = (bb * ae - ab * be) / safe
        t2n = (aa * be - ab * ae) / safe
        # one component negative: the other alone
        only_s = ae / aa.clamp_min(1e-300)
        only_t = be / bb.clamp_min(1e-300)
        s2n, t2n = (torch.where(t2n < 0, only_s, torch.where(s2n < 0, 0.0, s2n)),
                    torch.where(t2n < 0, 0.0, torch.where(s2n < 0, only_t, t2n)))
        s2n = torch.where(okd, s2n, only_s)
        t2n = torch.where(okd, t2n, torch.zeros_like(t2n))
        s2, t2 = s2n.clamp_min(0), t2n.clamp_min(0)
    s2 = torch.where(has[..., 0] > 0, s2, torch.ones_like(s2))
    t2 = torch.where(has[..., 0] > 0, t2, torch.zeros_like(t2))
    # back to the weights' units: var_k = s2 / w_k + tau2 (tau2 in px^2)
    return s2.float(), (t2 * scale).float()


def floored_weights(weight: torch.Tensor, s2: torch.Tensor, tau2: torch.Tensor) -> torch.Tensor:
    """Affine weights ``1 / (s2 / w + tau2)`` of :func:`shift_error_model`'s error model
    (zero where ``weight`` is)."""
    w = weight.double()
    var = s2.double()[..., None] / w.clamp_min(1e-300) + tau2.double()[..., None]
    out = torch.where((weight > 0) & (var > 0), 1.0 / var.clamp_min(1e-300), torch.zeros_like(w))
    return torch.where((weight > 0) & (var <= 0), w, out).float()


def condition(coef8: torch.Tensor, ph: torch.Tensor, tpl: DiskTemplate) -> torch.Tensor:
    """The plain 6-column fit (gain, offset, ramp, shift; no in-disk gradient) from the free
    8-column fit ``coef8`` (B,K,8) of the square-rooted patches: the gradient coefficients
    fixed to zero. Exact for a linear least-squares problem: ``c6 = c8[:6] + G66^-1 G62
    c8[6:]``."""
    return coef8[..., :6] + (tpl.cond[ph] @ coef8[..., 6:, None])[..., 0]


def pool_nuisance(values: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                  radius: int = 4, tol: float = 0.01, A_var: torch.Tensor | None = None,
                  with_weight: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of per-disk nuisance ``values`` (Rx,Ry,K,C) over neighbouring positions.

    ``weight`` (Rx,Ry,K) or (Rx,Ry,K,C): inverse variance (zero where the disk was not
    fitted); ``A`` (Rx,Ry,2,2). Within a ``(2 radius + 1)^2`` window, a neighbour counts only
    if its ``A`` is within ``tol`` (Frobenius) of the centre's: the same grain, registered
    the same way, so disk ``k`` is the same reflection - pooling stops at grain boundaries.
    Why pool: the diffuse background under a disk and the intensity gradient inside it
    (thickness, tilt) change slowly across a grain, while one pattern's own estimates of them
    are noisy and, fitted freely, cost the shift much of its precision (a free in-disk
    gradient about 45 % in standard deviation); fixed to pooled values they remove their bias
    from the shift at almost no cost. Returns the pooled values (0 where nothing pooled).

    ``A_var`` (Rx,Ry), when given: the variance of each position's ``A`` (the trace of its
    covariance). Neighbours then count as the same grain up to the distance their own noise
    explains (:data:`SAME_GRAIN_Q99`): at low dose one position's ``A`` scatters by more than
    ``tol``, and a fixed tolerance left each position pooling only a few neighbours - the
    pooled step then fell back to each pattern's own, noisier free fit (validation case
    hex_lowdose_background: a median of 6 of 81 neighbours, the map 12-14 % worse than with
    no pooling at all). ``with_weight``: also return the summed weight ``(Rx,Ry,K,C)``."""
    Rx, Ry = values.shape[:2]
    if weight.dim() == 3:
        weight = weight[..., None].expand_as(values)
    Af = torch.nan_to_num(A.reshape(Rx, Ry, 4), nan=1e6)
    wv = weight * values
    pad = radius
    # (C,K,Rx+2p,Ry+2p): padded, scan axes last, so each offset is a plain slice
    wvp = torch.nn.functional.pad(wv.permute(3, 2, 0, 1), (pad, pad, pad, pad))
    wp = torch.nn.functional.pad(weight.permute(3, 2, 0, 1), (pad, pad, pad, pad))
    ap = torch.nn.functional.pad(Af.permute(2, 0, 1), (pad, pad, pad, pad), value=1e6)
    Ac = Af.permute(2, 0, 1)
    if A_var is not None:
        v = torch.nan_to_num(A_var.to(Af.dtype), nan=0.0, posinf=0.0).clamp_min(0)
        vp = torch.nn.functional.pad(v, (pad, pad, pad, pad))
    num = torch.zeros_like(wvp[:, :, pad:pad + Rx, pad:pad + Ry])  # (C,K,Rx,Ry)
    den = torch.zeros_like(num)
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            r = slice(pad + di, pad + di + Rx)
            c = slice(pad + dj, pad + dj + Ry)
            lim = tol ** 2 if A_var is None else tol ** 2 + SAME_GRAIN_Q99 * (vp[r, c] + v)
            same = (((ap[:, r, c] - Ac) ** 2).sum(0) < lim).to(values.dtype)  # (Rx,Ry)
            num += wvp[:, :, r, c] * same
            den += wp[:, :, r, c] * same
    num, den = num.permute(2, 3, 1, 0), den.permute(2, 3, 1, 0)
    pooled = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return (pooled, den) if with_weight else pooled


def pooled_coefficients(coef8: torch.Tensor, cond: torch.Tensor, var4: torch.Tensor,
                        ok: torch.Tensor, A: torch.Tensor, radius: int = 4,
                        A_var: torch.Tensor | None = None, inside: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every disk's fit with its background ramp and in-disk gradient fixed to their values
    pooled over neighbours (:func:`pool_nuisance`), and which disks the pooled step uses.

    Inputs are :func:`poisson_fit`'s for a whole band of the scan: ``coef8`` (Rx,Ry,K,8),
    ``cond`` (Rx,Ry,K,3,4), ``var4`` (Rx,Ry,K); ``ok`` (Rx,Ry,K) the disks each position's
    own fit found significant, ``inside`` (Rx,Ry,K) those whose patch lies on the detector
    (None: ``ok``); ``A`` (Rx,Ry,2,2) and ``A_var`` (Rx,Ry) its variance (see
    :func:`pool_nuisance`). Exact for a linear least-squares problem: fixing coefficients
    ``x`` to ``v`` moves the free ones by ``G_ff^-1 G_fx (c_x - v)``. Returns ``(coef6,
    weight, used)``: 6 coefficients in :func:`affine_update`'s layout, the affine weights
    (zero where a disk is not used) and the disks used (Rx,Ry,K).

    The gain in ``coef6`` - by which :func:`affine_update` divides the shift coefficient, and
    which sets the weight ``gain^2 / var4`` - is pooled too: with each pattern's own fitted
    gain, a faint disk's gain noise made the weighted offset a ratio estimator shrunk towards
    zero by ``E[g]^2 / E[g^2]`` (15 % at 40 % gain noise, ``tests/test_poisson_weights.py``),
    and a disk whose gain came out high by chance counted more. The same reflection's gain
    hardly changes between neighbours of one grain. It is the mean over every same-grain
    neighbour where the disk lies on the detector, significant there or not.

    Which disks are used is decided by that pooled gain too, not by each position's own
    fit: a disk is used where its gain pooled over the grain stands :data:`POOLED_SNR`
    standard errors above zero (standard error from the gains' scatter between the
    neighbours). A reflection that no single pattern shows at ``min_snr`` is still measured
    in every one, with the small weight its noise gives it; the per-position test dropped
    it at exactly the positions where noise made it look faint (validation
    hex_lowdose_background - first-order disks of 1-2 counts per pixel on a background of
    2 - strain MAE -7 to -12 %). A position with no same-grain neighbour keeps its own
    test.

    The ramp and the in-disk gradient's coefficients are plain means over the same
    neighbours. They used to be pooled only where the disk was significant on its own, the
    gradient as its ratio to the position's own gain weighted by that gain squared; a disk
    used for its pooled gain alone then often had nothing to pool them from, they fell to
    zero and its in-disk gradient read as a shift (square_psf_weak strain MAE +1 to +4 %),
    and over noisy gains the weighted ratio ``sum g c / sum g^2`` is shrunk by ``E[g]^2 /
    E[g^2]``. The mean gradient coefficient over the mean gain is not."""
    inside = ok if inside is None else inside
    gain = coef8[..., 0]
    # the ramp, the gradient coefficients and the gain's first two moments, plain means over
    # every neighbour with the disk on the detector
    ins = inside.to(coef8.dtype)[..., None].expand(*inside.shape, 6)
    values = torch.cat([coef8[..., 2:4], coef8[..., 6:], gain[..., None], gain[..., None] ** 2],
                       -1)
    pooled, den = pool_nuisance(values, ins, A, radius, A_var=A_var, with_weight=True)
    ramp, grad, gmean, gsq = pooled[..., :2], pooled[..., 2:4], pooled[..., 4], pooled[..., 5]
    n = den[..., 4]
    se = torch.sqrt((gsq - gmean ** 2).clamp_min(0) / (n - 1).clamp_min(1))
    used = inside & (gmean > 0) & torch.where(n > 1, gmean > POOLED_SNR * se, ok & (gain > 0))
    gbar = torch.where(used, gmean, gain)
    fixed = torch.cat([ramp, grad], -1)
    cf = coef8[..., [0, 4, 5]] + (cond @ (coef8[..., FIXED4] - fixed)[..., None])[..., 0]
    coef6 = torch.stack([gbar, torch.zeros_like(cf[..., 0]), ramp[..., 0], ramp[..., 1],
                         cf[..., 1], cf[..., 2]], -1)
    w = gbar ** 2 / var4.clamp_min(1e-30)
    return coef6, torch.where(used, w, torch.zeros_like(w)), used


def fit_lattice(points: np.ndarray, weights: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reduced lattice basis ``(g1, g2)`` from peak positions ``(K, 2)`` (origin excluded).

    ``g1`` = the shortest vector, ``g2`` = the shortest one not parallel to it, then both
    refined by least squares over every peak indexed to its nearest lattice point.
    """
    pts = np.asarray(points, float)
    pts = pts[np.linalg.norm(pts, axis=1) > 1e-6]
    if len(pts) < 2:
        raise ValueError("fewer than two Bragg disks found: cannot determine the lattice")
    nrm = np.linalg.norm(pts, axis=1)
    order = np.argsort(nrm)
    g1 = pts[order[0]]
    g2 = None
    for i in order[1:]:
        v = pts[i]
        cosang = abs(v @ g1) / (np.linalg.norm(v) * np.linalg.norm(g1))
        if cosang < np.cos(np.deg2rad(25)):
            g2 = v
            break
    if g2 is None:
        raise ValueError("the Bragg disks are collinear: cannot determine a 2D lattice")
    g1, g2 = _reduce(g1, g2)
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, float)
    for _ in range(2):
        G = np.stack([g1, g2], 1)
        hk = np.rint(np.linalg.solve(G, pts.T).T)
        good = np.linalg.norm(pts - hk @ G.T, axis=1) < 0.25 * np.linalg.norm(g1)
        good &= np.abs(hk).sum(1) > 0
        if good.sum() < 2:
            break
        sw = np.sqrt(w[good])[:, None]
        sol, *_ = np.linalg.lstsq(hk[good] * sw, pts[good] * sw, rcond=None)
        g1, g2 = _reduce(sol[0], sol[1])
    return np.asarray(g1), np.asarray(g2)


def _reduce(g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange-Gauss reduction: the shortest basis of the same lattice, acute angle (so a
    square lattice found as ``(1,0), (1,1)`` becomes ``(1,0), (0,1)`` and is seen as square)."""
    g1, g2 = np.asarray(g1, float), np.asarray(g2, float)
    for _ in range(32):
        if g2 @ g2 < g1 @ g1:
            g1, g2 = g2, g1
        m = np.rint((g1 @ g2) / (g1 @ g1))
        if m == 0:
            break
        g2 = g2 - m * g1
    if g1 @ g2 < 0:
        g2 = -g2
    return g1, g2
