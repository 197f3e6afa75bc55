"""Fast streaming inference: the CC-ST-AE as a :class:`BlockMethod`.

Per block of scan rows, in batches on the chosen device:
beam centres -> encoder view -> encoder (transform guess + class) -> angular polish ->
Gauss-Newton refinement against the base lattice (:mod:`.refine`) -> raw ``A``; then, in
:meth:`CCSTAEMethod.finish`, the last Gauss-Newton step is redone with each disk's background
ramp and intensity gradient pooled over neighbouring positions of the same grain
(:func:`.refine.pooled_coefficients`).

Everything global is measured once in :meth:`CCSTAEMethod.prepare` from a few hundred patterns
spread over the scan (beam position, disk radius, lattice unit, the disk template) and frozen,
so every block is processed independently: one block or many gives identical results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...device import resolve_device
from ...strain import parse_region
from ..base import (
    A_OUTPUT,
    SAMPLE_OUTPUT,
    BandConsumer,
    BlockMethod,
    MethodResult,
    Output,
    ProgressCallback,
    StopCallback,
    check_stop,
)
from .modelfile import Model, load_model
from .preprocess import DataGeometry, as_patterns, beam_centres, encoder_input, measure_geometry
from .refine import (
    DiskTemplate,
    affine_update,
    angular_search,
    floored_weights,
    lattice_points,
    make_template,
    moderate_covariance,
    pooled_coefficients,
    refine,
    shift_error_model,
)

log = logging.getLogger(__name__)

__all__ = ["Engine", "CCSTAEMethod", "PooledLastStep", "run_ccstae", "predict_pattern",
           "region_patterns", "sample_patterns"]

#: Most base-lattice disks (beam included) the refinement uses, in whole rings (see
#: :func:`select_disks`): more is more precise, fewer is faster; a hexagonal lattice on a
#: 128 px detector gets 19 (beam and three rings), a square one on 96 px all 25 it holds.
N_DISKS = 25
#: Half-width (scan positions) of the window over which each disk's background ramp and
#: in-disk intensity gradient are pooled (0: not pooled; each pattern then fits its own ramp
#: and ignores the gradient).
POOL_RADIUS = 4
#: Scan rows per band of the pooled last step (see :class:`PooledLastStep`): the rows of the
#: per-disk fits held at once are about this plus twice ``POOL_RADIUS``.
POOL_BAND_ROWS = 16

#: Whether the pooled last step weights disks by noise plus a per-disk error floor
#: (:func:`.refine.shift_error_model`) rather than by noise alone.
ERROR_FLOOR = True
#: Alternations of "measure the beam centres with the template" and "rebuild the template
#: from those centres" in :meth:`Engine.build`. A centre-of-mass centre errs by an amount
#: that depends on the beam's sub-pixel phase; a template built from such centres is wrong
#: in the same phase-dependent way, and so is every disk fitted with it. One pass left a
#: whole-pattern phase sweep of sharp pixel-integrated disks with a strain error of
#: 3-6e-5 peak to peak; three passes converge to 0.5-1.5e-5 (more change nothing).
TEMPLATE_PASSES = 3
#: Fewest significant diffracted disks for a lattice fit (and for a crystal position).
MIN_DISKS = 3
#: Fewest significant diffracted disks for a crystal position when the classifier also calls
#: it crystal, or the user's sample mask says so: two disks and the beam determine ``A``, and
#: the classifier (or the user) is evidence of its own (see ``CCSTAEMethod.process_block``).
MIN_DISKS_CLASSIFIED = 2
#: Gauss-Newton steps of the refinement (the first on interpolated patches, see
#: :func:`.refine.refine`).
REFINE_STEPS = 3
#: Layout of the floats kept per disk per position for the pooled last step (see
#: :class:`PooledLastStep`): the free 8-column fit, the 3x4 conditioning, the fixed fit's
#: shift variance, the 2 sub-pixel offsets, whether the position's own fit found the disk
#: significant, and whether its patch lies on the detector.
FIT_COEF, FIT_COND, FIT_VAR, FIT_DFRAC, FIT_OK, FIT_INSIDE = (slice(0, 8), slice(8, 20), 20,
                                                              slice(21, 23), 23, 24)
DISK_FIT = 25
#: A crystal pattern with fewer of the base disks clearly found is registered again from an
#: exhaustive search (see ``Engine._run``).
RETRY_FRACTION = 0.5
#: Share of the base disks whose clear detection marks a crystal whatever the classifier says
#: (with the classifier's vote between 0 and one half, the disks needed fall linearly from this
#: share to :data:`MIN_DISKS`).
STRONG_FRACTION = 0.6


def polar_angle(A: torch.Tensor) -> torch.Tensor:
    """Rotation angle (radians) of the polar decomposition of 2x2 ``A`` (..., 2, 2) with
    positive determinant: ``atan2(A10 - A01, A00 + A11)``."""
    return torch.atan2(A[..., 1, 0] - A[..., 0, 1], A[..., 0, 0] + A[..., 1, 1])


def _rotation(deg: float) -> torch.Tensor:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def select_disks(g1: np.ndarray, g2: np.ndarray, pmax: float, n_max: int) -> np.ndarray:
    """The base-lattice points the refinement fits (origin first): whole rings of ``|p|``
    up to ``pmax`` (lattice units), nearest first, as many rings as fit in ``n_max`` points.

    ``pmax`` reaches past the detector's inscribed circle: a disk there is on the detector
    for some grain orientations (along a diagonal) and, each pattern deciding which of its
    disks are inside, it then adds the strain information of a long lever arm (square
    lattice on a 96 px detector: the 12 outer disks this admits cut the strain MAE by
    15-20 %). Whole rings keep the fit symmetric; ``n_max`` bounds the cost (a hexagonal
    lattice on a 128 px detector stops at 19: its next ring of 12 would cost ~25 % of the
    speed for ~3 % of precision)."""
    allp = lattice_points(g1, g2, pmax)
    radius = np.linalg.norm(allp, axis=1)
    order = np.argsort(radius, kind="stable")
    ring = np.round(radius[order], 3)
    keep = 0
    for r in np.unique(ring):
        n = int((ring <= r).sum())
        if n > n_max and keep:
            break
        keep = n
    return allp[order[:max(keep, 1)]]


def sample_patterns(dataset: Any, max_patterns: int = 384) -> np.ndarray:
    """Up to ``max_patterns`` patterns spread evenly over the scan (whole rows are read, so
    only a few rows are touched).

    Why evenly, and never topped up with the reference region's patterns: the disk template
    is built from this sample's direct beams, and in a thick crystal each grain's beam carries
    its own dynamical contrast. Sixty-odd extra beams of one grain bent the template towards
    that grain (abTEM Si [001] 15 nm: strain exx MAE 0.52 -> 0.61e-3 when the reference was
    added). The reference region has its own reader, :func:`region_patterns`."""
    Rx, Ry = dataset.scan_shape
    n_rows = int(min(Rx, max(1, np.ceil(np.sqrt(max_patterns * Rx / max(Ry, 1))))))
    rows = np.unique(np.linspace(0, Rx - 1, n_rows).round().astype(int))
    per_row = max(1, max_patterns // len(rows))
    cols = np.unique(np.linspace(0, Ry - 1, min(Ry, per_row)).round().astype(int))
    out = [dataset.read_rows(r, r + 1)[0][cols] for r in rows]
    return np.concatenate(out, 0).astype(np.float32)


def region_patterns(dataset: Any, region: str, max_patterns: int | None = 256) -> np.ndarray:
    """The patterns of a scan region (``"r0:r1,c0:c1"``), at most ``max_patterns`` of them
    spread evenly over it (``None``: all of them)."""
    rs, cs = parse_region(region)
    Rx = dataset.scan_shape[0]
    pats = dataset.read_rows(*rs.indices(Rx)[:2])[:, cs].reshape(-1, *dataset.pattern_shape)
    if max_patterns is not None and len(pats) > max_patterns:
        pats = pats[np.linspace(0, len(pats) - 1, max_patterns).round().astype(int)]
    return np.asarray(pats, np.float32)


@dataclass
class Engine:
    """A model bound to one dataset's measured geometry: maps raw patterns to ``A``."""

    model: Model
    geom: DataGeometry
    tpl: DiskTemplate
    P: torch.Tensor
    device: str = "cpu"
    refine_steps: int = REFINE_STEPS
    polish_deg: float = 10.0
    #: orientation (deg, polar angle of ``A``) around which every mapped ``A`` is expressed
    #: on one symmetry branch (see :meth:`canonical_branch`); None: as registered
    anchor_deg: float | None = None
    #: ``(n, K)`` disk relabelling of each symmetry rotation (see :meth:`set_anchor`)
    branch_perms: torch.Tensor | None = None

    @classmethod
    def build(cls, model: Model, sample: np.ndarray, device: str = "cpu",
              refine_steps: int = REFINE_STEPS, n_disks: int = N_DISKS) -> Engine:
        """Measure geometry and template from ``sample`` patterns ``(M, Qx, Qy)``."""
        geom = measure_geometry(sample)
        if not (np.isfinite(geom.L) and geom.L > 0 and np.isfinite(geom.r) and geom.r > 0
                and np.isfinite(geom.c0).all()):
            raise ValueError("no direct beam and Bragg-disk spacing could be measured in the "
                             "patterns: is this diffraction data with a lattice?")
        pats = as_patterns(sample)
        centres = beam_centres(pats, geom.c0, geom.r)
        if not bool(torch.isfinite(centres).all(1).any()):
            raise ValueError("no direct beam found in the sampled patterns")
        tpl = make_template(pats, centres, geom.r)
        # centres and template depend on each other: re-measure the centres by matching the
        # template, rebuild it, and repeat (see TEMPLATE_PASSES)
        eye = torch.eye(2).expand(len(pats), 2, 2)
        for _ in range(TEMPLATE_PASSES):
            _, centres, _, _ = refine(pats, centres, eye, torch.zeros(1, 2), geom.L, tpl,
                                      steps=3)
            tpl = make_template(pats, centres, geom.r)
        h = float(tpl.offsets.abs().max())
        Q0, Q1 = geom.pattern_shape
        edge = min(geom.c0[0], geom.c0[1], Q0 - 1 - geom.c0[0], Q1 - 1 - geom.c0[1])
        pmax_edge = (edge - h - 1) / (geom.L * 1.03)
        g1n = min(np.linalg.norm(model.g1), np.linalg.norm(model.g2))
        if pmax_edge < g1n:
            raise ValueError(
                f"the {Q0}x{Q1} patterns do not hold a full first ring of Bragg disks "
                f"(lattice unit {geom.L:.1f} px, disk radius {geom.r:.1f} px): the model "
                "cannot be applied to this data")
        P = select_disks(model.g1, model.g2, max(pmax_edge, (1.25 * edge - h) / geom.L),
                         n_disks)
        net = model.net.to(device).eval()
        model = Model(net, model.g1, model.g2, model.training, model.source)
        eng = cls(model, geom, tpl.to(device), torch.tensor(P, device=device), device,
                  refine_steps)
        eng.calibrate(sample)
        return eng

    def calibrate(self, sample: np.ndarray, n: int = 128) -> None:
        """Correct the ring-based lattice unit ``L`` by the median scale of registered
        patterns: a diffuse background biases the ring radius by a few per cent, which would
        put outer disks pixels away from the first guess."""
        idx = np.linspace(0, len(sample) - 1, min(n, len(sample))).round().astype(int)
        out = self.run(sample[idx], init="search")
        good = out["n_disks"] >= 3
        if int(good.sum()) >= 3:
            det = torch.linalg.det(out["A"][good]).abs().sqrt()
            scale = float(det.median())
            if 0.8 < scale < 1.25:
                g = self.geom
                self.geom = DataGeometry(g.c0, g.r, g.L * scale, g.pattern_shape)

    @torch.inference_mode()
    def run(self, block: np.ndarray | torch.Tensor, init: str = "encoder", offset: int = 0
            ) -> dict[str, torch.Tensor]:
        """``A`` (B,2,2) raw, sample probability, disks fitted and beam centre of a batch.

        ``init="encoder"`` starts from the encoder (mapping); ``init="search"`` from an
        exhaustive angular search over one symmetry period (self-training targets, robust for a
        new material whose encoder is not trained yet).

        Work is done in chunks of exactly :attr:`chunk` patterns, aligned to the pattern's
        index ``offset + i`` in the scan (padded at both ends): math libraries pick kernels by
        shape and by a row's place in a matrix, so a pattern always sitting at the same place
        of a same-shaped chunk makes its result independent of how the scan was cut into
        blocks and batches - bit for bit.
        """
        pats = as_patterns(block, self.device)
        n = len(pats)
        chunk = self.chunk
        lead = offset % chunk
        if lead:
            pats = torch.cat([pats[:1].expand(lead, -1, -1), pats])
        outs = []
        for i in range(0, len(pats), chunk):
            part = pats[i:i + chunk]
            m = len(part)
            if m < chunk:
                part = torch.cat([part, part[:1].expand(chunk - m, -1, -1)])
            o = self._run(part, init)
            outs.append({k: v[:m] for k, v in o.items()})
        return {k: torch.cat([o[k] for o in outs])[lead:lead + n] for k in outs[0]}

    #: patterns per fixed-shape chunk; halved on CUDA out-of-memory (see ``CCSTAEMethod``)
    cuda_chunk: int = 1024

    @property
    def chunk(self) -> int:
        return self.cuda_chunk if self.device == "cuda" else 64

    def _run(self, pats: torch.Tensor, init: str) -> dict[str, torch.Tensor]:
        g = self.geom
        c = beam_centres(pats, g.c0, g.r)
        net = self.model.net
        x = encoder_input(pats, c, g, net.n, net.extent)
        A0, prob = net.predict(x)
        if init == "search":
            A0 = self._search(pats, c)
        elif self.polish_deg > 0:
            A0 = angular_search(pats, c, A0, self.P, g.L, self.polish_deg, 2.0, g.r)
        ex: dict = {}
        A, t, n_ok, rms = refine(pats, c, A0, self.P, g.L, self.tpl, steps=self.refine_steps,
                                 extra=ex)
        if init != "search":
            # safety net: a pattern the classifier calls crystal but whose lattice was not found
            # from the encoder's guess (guess outside the polish range) - or matched only a
            # few of its disks, as a wrong registration does (seen at a scan edge after `fit`:
            # 4 of 12 disks, 8 % strain off) - is registered again from an exhaustive search;
            # the result with more disks wins. Whole chunk, so shapes - and results - stay
            # fixed.
            few = max(MIN_DISKS, int(np.ceil(RETRY_FRACTION * (self.P.shape[0] - 1))))
            bad = (prob > 0.5) & (n_ok < few)
            if bool(bad.any()):
                ex2: dict = {}
                A2, t2, n2, r2 = refine(pats, c, self._search(pats, c), self.P, g.L, self.tpl,
                                        steps=self.refine_steps, extra=ex2)
                use = bad & ((n2 > n_ok) | ((n2 == n_ok) & (r2 < rms)))
                for k, v in ex.items():
                    ex[k] = torch.where(use.reshape((-1,) + (1,) * (v.ndim - 1)), ex2[k], v)
                A = torch.where(use[:, None, None], A2, A)
                t = torch.where(use[:, None], t2, t)
                n_ok = torch.where(use, n2, n_ok)
                rms = torch.where(use, r2, rms)
            A = self.canonical_branch(A, ex)
        return {"A": A, "prob": prob, "n_disks": n_ok, "n_sig": ex["n_sig"], "rms": rms,
                "centre": t, "x": x,
                "disk_fit": torch.cat([ex["coef"], ex["cond"].flatten(-2), ex["var4"][..., None],
                                       ex["dfrac"], ex["ok"][..., None].float(),
                                       ex["inside"][..., None].float()], -1),
                "A_prev": ex["A_prev"], "t_prev": ex["t_prev"], "A_cov": ex["A_cov"]}

    def set_anchor(self, A: torch.Tensor) -> None:
        """Place the symmetry branch's cut (see :meth:`canonical_branch`) from the registered
        transforms ``A`` (N,2,2) of sampled crystal patterns: in the middle of the widest
        range of orientations, modulo the lattice's symmetry, that none of them has.

        Why there: every position is mapped onto the branch within half a period of
        :attr:`anchor_deg`, so a grain whose orientation lies at the cut is split between two
        branches by its positions' scatter. Its halves then never pool their disk nuisances,
        and with any distortion of the measured lattice they carry different strain offsets.
        Anchored on the reference grain (or on the mean orientation), the cut fell wherever
        that put it: at half a period from the reference, which is where a hexagonal grain at
        30 degrees from it sits (multislice WS2 at dose 2e4: strain MAE 15-19 % worse with
        the reference given than without). Grains are clusters of orientation, so the widest
        empty range is the place that splits none."""
        sym = float(self.model.symmetry_deg)
        A = A[torch.isfinite(A).flatten(1).all(1)]
        if len(A) == 0 or sym >= 360.0:
            self.anchor_deg = None
            return
        a = torch.sort(torch.remainder(torch.rad2deg(polar_angle(A).double()), sym)).values
        gaps = torch.cat([a[1:] - a[:-1], a[:1] + sym - a[-1:]])  # the last wraps round
        i = int(torch.argmax(gaps))
        cut = float(a[i] + gaps[i] / 2)
        self.anchor_deg = (cut + sym / 2) % sym  # the cut lies half a period from the anchor
        self.branch_perms = self._branch_perms(sym)

    def _branch_perms(self, sym: float) -> torch.Tensor | None:
        """``(n, K)``: for each symmetry rotation ``S_m = R(m sym)`` of the base lattice, the
        disk index ``k`` with ``P_k = S_m^-1 P_j`` for every ``j``; None when the disk set is
        not closed under the rotations (then no branch is changed)."""
        n = int(round(360.0 / sym))
        P = self.P.double().cpu()
        perms = []
        for m in range(n):
            S = _rotation(m * sym)
            src = P @ S  # rows: S^-1 P_j (S orthogonal: S^-1 p = S^T p, as a row p^T S)
            d = torch.cdist(src, P)
            best = d.argmin(1)
            if float(d.gather(1, best[:, None]).max()) > 1e-4:
                perms = None
                break
            perms.append(best)
        return None if perms is None else torch.stack(perms).to(self.P.device)

    def canonical_branch(self, A: torch.Tensor, ex: dict) -> torch.Tensor:
        """Express every ``A`` (and the last step's per-disk fits in ``ex``) on the symmetry
        branch nearest :attr:`anchor_deg`: ``A S_m^-1`` with ``S_m = R(m sym)`` a rotation of
        the (exactly symmetric) base lattice, disks relabelled to match.

        Why: a lattice rotated by about half a symmetry period from the base (a hexagonal
        crystal at 30 degrees) registers as ``R(+30)`` or as ``R(-30)`` - the same lattice,
        but raw entries about 1 apart. Strain is taken against the reference's ``A``; when the
        measured lattice is not exactly the base's shape (a detector or projector distortion,
        anisotropic sampling), ``A_ref S A_ref^-1`` is not a pure rotation, so positions on
        the other branch carry a strain offset of the size of that distortion (seen: 1-2e-3
        between the two halves of a multislice WS2 map, and a -0.16 degree rotation offset
        of the whole map, its reference region mixing both branches). Neighbours on
        different branches also never pool their disk nuisances."""
        perms = self.branch_perms
        if self.anchor_deg is None or perms is None:
            return A
        sym = float(self.model.symmetry_deg)
        n = perms.shape[0]
        ang = torch.rad2deg(polar_angle(A))
        m = torch.round((ang - self.anchor_deg) / sym)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).long() % n
        if not bool((m != 0).any()):
            return A
        S = torch.stack([_rotation(k * sym) for k in range(n)]).to(A.dtype).to(A.device)
        St = S[m].transpose(1, 2)  # (B,2,2): A S^-1 = A S^T
        perm = perms[m]  # (B,K)

        def relabel(x: torch.Tensor) -> torch.Tensor:
            idx = perm.reshape(perm.shape + (1,) * (x.ndim - 2)).expand_as(x)
            return x.gather(1, idx)

        for key in ("coef", "cond", "var4", "dfrac", "ok"):
            if key in ex:
                ex[key] = relabel(ex[key])
        if "A_prev" in ex:
            ex["A_prev"] = ex["A_prev"] @ St
        if "A_cov" in ex:
            # row-major vec(A S^T) = kron(I, S) vec(A)
            eye = torch.eye(2, dtype=A.dtype, device=A.device)
            M = torch.stack([torch.kron(eye, S[k]) for k in range(n)])[m].to(ex["A_cov"].dtype)
            ex["A_cov"] = M @ ex["A_cov"] @ M.transpose(1, 2)
        return A @ St

    def _search(self, pats: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Exhaustive angular search over one symmetry period (2 deg, then 0.5 deg)."""
        g = self.geom
        eye = torch.eye(2, device=pats.device).expand(len(pats), 2, 2)
        half = self.model.net.symmetry_deg / 2
        A0 = angular_search(pats, c, eye, self.P, g.L, half, 2.0, g.r)
        return angular_search(pats, c, A0, self.P, g.L, 1.5, 0.5, g.r)


class CCSTAEMethod(BlockMethod):
    """CC-ST-AE strain mapping (see :mod:`napari_stem_strain.methods.ccstae`)."""

    name = "ae"
    block_bytes = 32 * 2**20

    def __init__(self, model: Model | str | Path | None = None, device: str = "auto",
                 batch_size: int | None = None, sample_mask: np.ndarray | None = None,
                 reference: str | None = None, refine_steps: int = REFINE_STEPS,
                 pool_radius: int = POOL_RADIUS, error_floor: bool = ERROR_FLOOR) -> None:
        self.model = load_model(model if model is not None else "default")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size) if batch_size else (4096 if self.device == "cuda"
                                                                   else 512)
        if self.batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be at least 1")
        self.set_input("sample_mask", None if sample_mask is None
                       else np.asarray(sample_mask, bool))
        self.reference = reference
        self.refine_steps = int(refine_steps)
        self.pool_radius = int(pool_radius)
        #: weights of the pooled step: noise plus a fitted per-disk floor (False: noise only)
        self.error_floor = bool(error_floor)
        self.engine: Engine | None = None

    @property
    def sample_mask(self) -> np.ndarray | None:
        """The user's sample mask (a per-position input), or None."""
        return self.inputs().get("sample_mask")

    def outputs(self) -> tuple[Output, ...]:
        """``A``, ``sample``, the classifier's crystal probability (an extra), the covariance
        of the raw ``A`` (row-major 4x4, from the last Gauss-Newton step's weighted disk fit;
        it becomes :attr:`MethodResult.A_cov`) and - when the last step is pooled (see
        :meth:`finish`) - per position what redoing that step needs: per disk [8
        coefficients, 3x4 conditioning, variance, 2 sub-pixel offsets, ok, inside] (``DISK_FIT``
        floats), and [A (4), t (2)] before the last step. These two are scratch declared
        ``window=True``: the runner streams them, band by band, to :class:`PooledLastStep`
        and never holds them for the whole scan (~1.8 kB per position)."""
        out = (A_OUTPUT, SAMPLE_OUTPUT, Output("class_prob", (), "float32", np.nan, extra=True),
               Output("A_cov", (4, 4), "float32", np.nan))
        if self.pool_radius > 0:
            if self.engine is None:
                raise RuntimeError("prepare() must run before outputs() (the disk count)")
            K = int(self.engine.P.shape[0])
            out += (Output("disk_fit", (K, DISK_FIT), "float32", 0.0, window=True),
                    Output("last_step", (6,), "float32", 0.0, window=True))
        return out

    def band_consumer(self, scan_shape: tuple[int, int]) -> PooledLastStep | None:
        """The pooled last Gauss-Newton step, fed band by band (see :meth:`finish`)."""
        if self.pool_radius <= 0:
            return None
        if self.engine is None:
            raise RuntimeError("prepare() must run before band_consumer()")
        return PooledLastStep(self.engine, self.pool_radius, scan_shape,
                              error_floor=self.error_floor)

    @property
    def symmetry_deg(self) -> float:
        return self.model.symmetry_deg

    def prepare(self, dataset: Any, progress: ProgressCallback | None = None,
                should_stop: StopCallback | None = None) -> None:
        """Measure the geometry and disk template, and check that the model fits the data."""
        check_stop(should_stop)
        if self.sample_mask is not None and self.sample_mask.shape != tuple(dataset.scan_shape):
            raise ValueError(f"sample mask of shape {self.sample_mask.shape} does not match the "
                             f"{dataset.scan_shape} scan")
        sample = sample_patterns(dataset)
        self.engine = Engine.build(self.model, sample, self.device, self.refine_steps)
        check_stop(should_stop)
        # does the model's lattice describe the data? Exhaustive search (independent of the
        # encoder): patterns where at least two base disks light up are diffracting; most of
        # them must then match many disks, consistently
        idx = np.linspace(0, len(sample) - 1, min(256, len(sample))).round().astype(int)
        out = self.engine.run(sample[idx], init="search")
        crystal = out["n_disks"] >= 2
        # one symmetry branch for the whole map, cut where no sampled grain is (the user's
        # reference region among them: strain is taken against it, so it must not be split)
        fits = (out["n_disks"] >= MIN_DISKS) & (out["rms"] < 0.5)
        anchor = out["A"][fits]
        if self.reference:
            ref_pats = region_patterns(dataset, self.reference)
            if len(ref_pats):
                ref = self.engine.run(ref_pats, init="search")
                good = (ref["n_disks"] >= MIN_DISKS) & (ref["rms"] < 0.5)
                anchor = torch.cat([anchor, ref["A"][good]])
        self.engine.set_anchor(anchor)
        if int(crystal.sum()) >= 8:
            # a lattice that is not the base's pulls disks in inconsistent directions
            frac = float(fits[crystal].float().mean())
            if frac < 0.5:
                raise ValueError(
                    f"the model ({self.model.lattice_kind} lattice, {self.model.source}) does not "
                    f"fit this data: only {frac:.0%} of crystal patterns matched its lattice - "
                    "train one with `stem-strain fit`")

    def process_block(self, block: np.ndarray, r0: int,
                      sample_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The block's rows of every output of :meth:`outputs` (``sample_mask``: the block's
        rows of the user's mask, when one was given)."""
        if self.engine is None:
            raise RuntimeError("prepare() must run before process_block()")
        n, Ry = block.shape[:2]
        N = n * Ry
        flat = block.reshape(N, *block.shape[2:])
        A = np.full((N, 2, 2), np.nan, np.float32)
        prob = np.zeros(N, np.float32)
        ok = np.zeros(N, bool)
        n_found = np.zeros(N, np.int64)
        n_sig = np.zeros(N, np.int64)
        pooled = self.pool_radius > 0
        K = int(self.engine.P.shape[0])
        disk_fit = np.zeros((N, K, DISK_FIT), np.float32) if pooled else None
        last_step = np.zeros((N, 6), np.float32) if pooled else None
        A_cov = np.full((N, 4, 4), np.nan, np.float32)
        for i in range(0, N, self.batch_size):
            out = self._run_shrinking(flat[i:i + self.batch_size], offset=r0 * Ry + i)
            rows = slice(i, i + len(out["A"]))
            A[rows] = out["A"].cpu().numpy()
            prob[rows] = out["prob"].cpu().numpy()
            n_found[rows] = out["n_disks"].cpu().numpy()
            n_sig[rows] = out["n_sig"].cpu().numpy()
            ok[rows] = (out["n_disks"] >= MIN_DISKS).cpu().numpy()
            A_cov[rows] = out["A_cov"].cpu().numpy()
            if pooled:
                disk_fit[rows] = out["disk_fit"].cpu().numpy()
                last = torch.cat([out["A_prev"].reshape(-1, 4), out["t_prev"]], -1)
                last_step[rows] = last.cpu().numpy()
        if sample_mask is not None:
            # the user's mask takes the classifier's place: inside it two clear disks (or
            # three significant ones) are lattice enough, as where the classifier says crystal
            sample = np.asarray(sample_mask, bool).reshape(-1)
            ok = ok | (sample & ((n_found >= MIN_DISKS_CLASSIFIED) | (n_sig >= MIN_DISKS)))
        else:
            # crystal = the lattice was found (a pattern in which not even MIN_DISKS disks stand
            # out of the noise holds no measurable lattice) AND the classifier says so - unless
            # the lattice evidence is overwhelming (most base disks clearly found). Where the
            # classifier says crystal, two clear disks are lattice enough: at low dose 2 % of a
            # grain's patterns show only two of their disks at 6 sigma (validation case
            # hex_lowdose_background, classifier 0.64-0.98), and their fit, which also uses the
            # weaker disks, is as good as their neighbours'; refused, each one cost the rotation
            # MAE as much as the largest rotation in the map
            #
            # The disks needed, counted at the fit's own significance (``min_snr``, 4 sigma),
            # rise smoothly from MIN_DISKS (a vote of one half or more) to the strong fraction
            # (the classifier sure of vacuum). Two seeds of hex_lowdose_background showed why:
            # with the vote wavering at 0.44-0.55, crystal patterns with 4-6 clear disks, or
            # only one clear disk but 4+ significant ones, were refused (9 and 38 of ~1100
            # crystal positions, each costing the rotation MAE the largest rotation in the
            # map); no vacuum position of the validation cases, of those two seeds or of the
            # simulator's benchmark files (w = 0 and 0.7, amorphous rings) came out crystal,
            # and the vacuum of the seed that lost 38 shows at most one significant disk.
            n_strong = STRONG_FRACTION * (self.engine.P.shape[0] - 1)
            need = MIN_DISKS + (n_strong - MIN_DISKS) * np.clip(1.0 - 2.0 * prob, 0.0, 1.0)
            ok = ok | ((prob > 0.5) & (n_found >= MIN_DISKS_CLASSIFIED))
            sample = (ok & ((prob > 0.5) | (n_found >= need))) | (n_sig >= need)
            ok = ok | sample
        A[~(sample & ok)] = np.nan
        rows_out = {"A": A.reshape(n, Ry, 2, 2), "sample": sample.reshape(n, Ry),
                    "class_prob": prob.reshape(n, Ry), "A_cov": A_cov.reshape(n, Ry, 4, 4)}
        if pooled:
            rows_out["disk_fit"] = disk_fit.reshape(n, Ry, K, DISK_FIT)
            rows_out["last_step"] = last_step.reshape(n, Ry, 6)
        return rows_out

    def _run_shrinking(self, pats: np.ndarray, offset: int) -> dict[str, torch.Tensor]:
        """Run the engine; on CUDA out-of-memory halve the GPU chunk and try again, so a
        smaller GPU (or one shared with other work) still finishes the map. The chunk stays a
        power of two, so chunks stay aligned to the scan index and results do not change."""
        while True:
            try:
                return self.engine.run(pats, offset=offset)
            except torch.OutOfMemoryError:
                if self.engine.device != "cuda" or self.engine.cuda_chunk <= 16:
                    raise
                torch.cuda.empty_cache()
                self.engine.cuda_chunk //= 2
                log.warning("CUDA out of memory: retrying with chunks of %d patterns",
                            self.engine.cuda_chunk)

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"model": self.model.source, "device": self.device,
                             "batch_size": self.batch_size, "refine_steps": self.refine_steps,
                             "pool_radius": self.pool_radius,
                             "error_floor": self.error_floor,
                             "lattice": self.model.lattice_kind,
                             "symmetry_deg": self.symmetry_deg}
        if self.engine is not None:
            s["geometry"] = self.engine.geom.as_dict()
            s["n_disks"] = int(self.engine.P.shape[0])
        return s

    def finish(self, out: dict[str, np.ndarray], seconds: float) -> MethodResult:
        """The result; with pooling, ``A`` and its covariance are those of the last
        Gauss-Newton step redone by :class:`PooledLastStep` (``out["pooled_A"]``,
        ``out["pooled_A_cov"]``)."""
        A, A_cov = out["A"], out["A_cov"]
        if "pooled_A" in out:
            A, A_cov = out["pooled_A"], out["pooled_A_cov"]
        # no error bar where there is no value
        A_cov = np.where(np.isfinite(A).all((2, 3))[..., None, None], A_cov, np.nan)
        res = self.result(out, seconds, A=A)
        res.A_cov = A_cov.astype(np.float32)
        return res


class PooledLastStep(BandConsumer):
    """Redo every fitted position's last Gauss-Newton step with its disks' background ramp
    and intensity gradient pooled over neighbours of the same grain (see
    :func:`.refine.pooled_coefficients`), band by band: a band of :data:`POOL_BAND_ROWS` scan
    rows needs the per-disk fits (``disk_fit``) of its rows plus the pooling window's halo of
    ``radius`` rows, and its own rows of ``last_step``; the runner feeds them as rows complete
    and drops them afterwards, so neither is ever held for the whole scan. Produces
    ``pooled_A`` and ``pooled_A_cov`` (``(Rx, Ry, 4, 4)``; where a position is not redone,
    the unpooled values)."""

    def __init__(self, engine: Engine, radius: int, scan_shape: tuple[int, int],
                 rows: int = POOL_BAND_ROWS, error_floor: bool = ERROR_FLOOR) -> None:
        self.rows = int(rows)
        self.error_floor = bool(error_floor)
        self.halo = int(radius)
        self.L = float(engine.geom.L)
        self.h = float(engine.tpl.offsets.abs().max())
        self.P = engine.P.cpu()
        Rx, Ry = scan_shape
        self.A = np.full((Rx, Ry, 2, 2), np.nan, np.float32)
        self.A_cov = np.full((Rx, Ry, 4, 4), np.nan, np.float32)

    def consume(self, r0: int, r1: int, h0: int, window: dict[str, np.ndarray],
                assembled: dict[str, np.ndarray]) -> None:
        A_all = assembled["A"]  # the unpooled A: pooling weights read it over the halo
        self.A[r0:r1] = A_all[r0:r1]
        self.A_cov[r0:r1] = assembled["A_cov"][r0:r1]
        disk_fit = window["disk_fit"]
        h1 = h0 + len(disk_fit)
        Ry, K = disk_fit.shape[1:3]
        fit = torch.from_numpy(disk_fit)
        good = torch.from_numpy(np.isfinite(A_all[h0:h1]).all(axis=(2, 3)))
        ok = (fit[..., FIT_OK] > 0.5) & good[..., None]
        inside = (fit[..., FIT_INSIDE] > 0.5) & good[..., None]
        A_band = torch.from_numpy(A_all[h0:h1]).float()
        # how far each unpooled A scatters decides how far apart the same grain may look
        A_var = torch.from_numpy(np.trace(assembled["A_cov"][h0:h1], axis1=-2, axis2=-1)
                                 .astype(np.float32))
        # the disks used from here on: those the grain's pooled gain finds significant
        coef, wts, ok = pooled_coefficients(fit[..., FIT_COEF],
                                            fit[..., FIT_COND].unflatten(-1, (3, 4)),
                                            fit[..., FIT_VAR], ok, A_band, self.halo, A_var,
                                            inside=inside)
        wts = torch.nan_to_num(wts, nan=0.0, posinf=0.0)
        # both passes below run over the band and its halo: the halo's residuals are the band's
        # edge positions' neighbours (the error model's pooling, moderated_scale)
        sel_all = good.reshape(-1)
        if not bool(sel_all.any()):
            return
        n_all = (h1 - h0) * Ry
        last = torch.from_numpy(window["last_step"]).reshape(n_all, 6)[sel_all]
        coef_f = coef.reshape(n_all, K, 6)[sel_all]
        ok_f = ok.reshape(n_all, K)[sel_all]
        dfrac_f = fit[..., FIT_DFRAC].reshape(n_all, K, 2)[sel_all]
        A_last, t_last = last[:, :4].reshape(-1, 2, 2), last[:, 4:]
        if self.error_floor:
            # a first pass measures how the disk shifts scatter (noise plus a per-disk floor,
            # pooled over the grain) and reweights the disks
            res: dict = {}
            affine_update(coef_f, ok_f, dfrac_f, A_last, t_last, self.P, self.L, self.h,
                          wts.reshape(n_all, K)[sel_all], resid_out=res)

            def scatter(x: torch.Tensor) -> torch.Tensor:
                full = torch.zeros((n_all, *x.shape[1:]), dtype=x.dtype)
                full[sel_all] = x
                return full.reshape(h1 - h0, Ry, *x.shape[1:])

            s2, tau2 = shift_error_model(scatter(res["resid"]), scatter(res["noise_factor"]),
                                         scatter(res["floor_factor"]), scatter(res["used"]),
                                         A_band, self.halo, A_var)
            wts = floored_weights(torch.where(ok, wts, torch.zeros_like(wts)), s2, tau2)
        cov: dict = {}
        A_new, _, _ = affine_update(coef_f, ok_f, dfrac_f, A_last, t_last, self.P, self.L,
                                    self.h, wts.reshape(n_all, K)[sel_all], cov_out=cov)
        A_cov = moderate_covariance(cov, sel_all, (h1 - h0, Ry), A_band, self.halo, A_var)
        band = torch.zeros(h1 - h0, Ry, dtype=torch.bool)
        band[r0 - h0:r1 - h0] = True
        band = band.reshape(-1)
        keep = band[sel_all]  # of the positions fitted, those in the band
        sel = sel_all[band].numpy()  # of the band's positions, those fitted
        n = (r1 - r0) * Ry
        self.A[r0:r1].reshape(n, 2, 2)[sel] = A_new[keep].numpy()
        self.A_cov[r0:r1].reshape(n, 4, 4)[sel] = A_cov[keep].numpy()

    def results(self) -> dict[str, np.ndarray]:
        return {"pooled_A": self.A, "pooled_A_cov": self.A_cov}


def run_ccstae(dataset: Any, model: Model | str | Path | None = None, device: str = "auto",
               reference: str | None = None, sample_mask: np.ndarray | None = None,
               progress: ProgressCallback | None = None, should_stop: StopCallback | None = None,
               **kw: Any) -> MethodResult:
    """Map a whole dataset with the CC-ST-AE (``kw``: ``batch_size``, ``refine_steps``,
    ``block_bytes``)."""
    from ..runner import run_method

    block_bytes = kw.pop("block_bytes", None)
    method = CCSTAEMethod(model=model, device=device, sample_mask=sample_mask,
                          reference=reference, **kw)
    return run_method(method, dataset, progress=progress, should_stop=should_stop,
                      block_bytes=block_bytes)


def predict_pattern(model: Model | str | Path | None, pattern: np.ndarray,
                    engine: Engine | None = None) -> dict[str, Any]:
    """``A`` (2x2 raw) and sample probability of one pattern, for the probe inspector.

    Without an ``engine`` (a prepared :class:`CCSTAEMethod`'s ``engine``), the geometry is
    measured from the pattern itself.
    """
    pat = np.asarray(pattern, np.float32)
    if pat.ndim != 2:
        raise ValueError(f"a single pattern is 2D, not of shape {pat.shape}")
    if engine is None:
        engine = Engine.build(load_model(model if model is not None else "default"), pat[None])
    t0 = time.perf_counter()
    out = engine.run(pat[None])
    A = out["A"][0].cpu().numpy().astype(np.float64)
    return {"A": A, "sample_prob": float(out["prob"][0]), "centre": out["centre"][0].cpu().numpy(),
            "n_disks": int(out["n_disks"][0]), "seconds": time.perf_counter() - t0}
