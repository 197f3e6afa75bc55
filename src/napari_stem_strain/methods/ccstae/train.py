"""Self-supervised fitting of a CC-ST-AE to a user's dataset (``stem-strain fit``).

1. **Lattice.** Keep the initial model's base lattice when it matches the data; otherwise read
   the lattice off the data itself (peaks of the reference region's mean centred pattern, or of
   the most strongly diffracting sampled pattern), snapped to an exact hexagonal/square lattice
   when it is one - a new material needs no hand-set lattice or rotation offset.
2. **Targets without ground truth.** Each training pattern is registered to the base lattice by
   an exhaustive angular search over one symmetry period followed by the Gauss-Newton
   refinement (:mod:`.refine`). These self-made targets teach the encoder a good first guess.
3. **Base.** The sample base starts as the mean of the training patterns warped into the base
   frame (with their targets), the background base as the mean vacuum pattern.
4. **Training.** Cycle-consistent loss inside the base's disk masks (masks recomputed each
   epoch) + the targets, Adam, early stopping on a held-out tenth, a checkpoint after every epoch
   (``OUT.ckpt``, resumed automatically), deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...device import resolve_device
from ..base import BlockMethod, Output, ProgressCallback, StopCallback, check_stop
from .loss import ccstae_loss, disk_mask
from .model import warp
from .modelfile import Model, load_model, new_model, save_model
from .preprocess import as_patterns, beam_centres, measure_geometry
from .refine import fit_lattice

__all__ = ["fit_model", "train_default", "collect_training_set", "train_model",
           "lattice_from_pattern",
           "DEFAULT_EPOCHS"]

DEFAULT_EPOCHS = 15
MAX_TRAIN = 1024


def lattice_from_pattern(pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Base lattice ``(g1, g2)`` in lattice units and its symmetry from one (mean) pattern.

    Peaks = local maxima of the square-rooted pattern, beyond the direct beam, standing clearly
    above the background (median + 4 robust sigma, and a quarter of the strongest disk),
    refined by a centre of mass. The background's rotationally symmetric part (diffuse
    falloff, an amorphous ring) is removed first: its median over each ring of radius around
    the beam, which the few Bragg disks on a ring do not move. Without that, maxima of a
    bright amorphous ring became "disks" and the fitted lattice was wrong.
    """
    import torch.nn.functional as F

    from ...strain import lattice_symmetry

    geom = measure_geometry(pattern[None])
    pats = as_patterns(pattern[None])
    c = beam_centres(pats, geom.c0, geom.r)[0].numpy()
    s = torch.sqrt(pats.clamp(min=0))[0]
    s = s - _radial_median(s.numpy(), c)
    k = 2 * int(np.ceil(geom.r)) + 1
    mx = F.max_pool2d(s[None, None], k, 1, k // 2)[0, 0]
    Q0, Q1 = s.shape
    ii, jj = np.mgrid[0:Q0, 0:Q1]
    rad = np.hypot(ii - c[0], jj - c[1])
    ring = rad > 1.8 * geom.r + 2
    vals = s.numpy()[ring]
    med = np.median(vals)
    sig = 1.4826 * np.median(np.abs(vals - med)) + 1e-12
    cand = (s == mx).numpy() & ring
    top = float(s.numpy()[cand].max()) if cand.any() else 0.0
    # clearly above the noise AND not negligible next to the strongest disk (a noise maximum
    # near the beam would otherwise become the "shortest lattice vector")
    peak = cand & (s.numpy() > med + 4 * sig) & (s.numpy() > med + 0.25 * (top - med))
    peak &= (ii > geom.r) & (ii < Q0 - 1 - geom.r) & (jj > geom.r) & (jj < Q1 - 1 - geom.r)
    pi, pj = np.nonzero(peak)
    if len(pi) < 2:
        raise ValueError("fewer than two Bragg disks stand out of the noise: cannot determine "
                         "the lattice (choose a reference region on the crystal)")
    sn = s.numpy()
    pts, wts = [], []
    R = int(np.ceil(geom.r))
    for a, b in zip(pi, pj, strict=True):
        win = np.clip(sn[a - R:a + R + 1, b - R:b + R + 1] - med, 0, None)
        wi, wj = np.mgrid[-R:R + 1, -R:R + 1]
        tot = win.sum() + 1e-12
        pts.append(((a + (win * wi).sum() / tot - c[0]) / geom.L,
                    (b + (win * wj).sum() / tot - c[1]) / geom.L))
        wts.append(tot)
    g1, g2 = fit_lattice(np.asarray(pts), np.asarray(wts))
    # lattice units: the shortest Bragg vector has length 1, as the mapping's measured L
    unit = min(np.linalg.norm(g1), np.linalg.norm(g2))
    g1, g2 = g1 / unit, g2 / unit
    sym = lattice_symmetry(g1, g2, tol=0.05)
    g1, g2 = _snap(g1, g2, sym)
    return g1, g2, sym


def _radial_median(img: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The median of ``img`` over each 1 px ring around ``centre``, as an image."""
    ii, jj = np.indices(img.shape)
    rad = np.rint(np.hypot(ii - centre[0], jj - centre[1])).astype(int)
    order = np.argsort(rad, axis=None, kind="stable")
    r_sorted = rad.reshape(-1)[order]
    v_sorted = img.reshape(-1)[order]
    edges = np.flatnonzero(np.diff(r_sorted)) + 1
    med = np.array([np.median(part) for part in np.split(v_sorted, edges)])
    prof = np.zeros(int(rad.max()) + 1)
    prof[np.unique(r_sorted)] = med
    return torch.tensor(prof[rad], dtype=torch.float32)


def _snap(g1: np.ndarray, g2: np.ndarray, sym: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace a nearly hexagonal/square basis by an exact one (same mean length, ``g1``'s
    direction), so that rotations by the symmetry period map the base exactly onto itself."""
    if sym not in (60.0, 90.0):
        return g1, g2
    n = 0.5 * (np.linalg.norm(g1) + np.linalg.norm(g2))
    a = np.arctan2(g1[1], g1[0])
    side = np.sign(np.cross(g1, g2)) or 1.0
    b = a + side * np.deg2rad(sym)
    return n * np.array([np.cos(a), np.sin(a)]), n * np.array([np.cos(b), np.sin(b)])


def collect_training_set(
    engine: Any, dataset: Any, max_patterns: int = MAX_TRAIN,
    should_stop: StopCallback | None = None, batch: int = 512,
    progress: ProgressCallback | None = None,
) -> dict[str, torch.Tensor]:
    """Encoder views, self-made target ``A`` and sample flags of up to ``max_patterns``
    positions spread over the scan (streamed block by block through the runner, so it has
    its progress, cancel and read-error wrapping; nothing else is kept)."""
    from ..runner import run_method

    collector = TrainingSetCollector(engine, dataset.scan_shape, max_patterns, batch)
    return run_method(collector, dataset, progress=progress, should_stop=should_stop,
                      prepared=True)


class TrainingSetCollector(BlockMethod):
    """Every ``stride``-th position of the scan (in scan order) registered from an exhaustive
    search: its encoder view, target ``A`` and sample flag, as ``cat`` outputs of the block
    contract (a variable number per block, concatenated in scan order)."""

    name = "training set"
    block_bytes = 32 * 2**20

    def __init__(self, engine: Any, scan_shape: tuple[int, int], max_patterns: int,
                 batch: int = 512) -> None:
        self.engine = engine
        self.stride = max(1, int(np.ceil(scan_shape[0] * scan_shape[1] / max_patterns)))
        self.batch = int(batch)
        net = engine.model.net
        self._view = (1, net.n, net.n)

    def outputs(self) -> tuple[Output, ...]:
        return (Output("x", self._view, "float32", kind="cat"),
                Output("A", (2, 2), "float32", kind="cat"),
                Output("sample", (), "bool", kind="cat"))

    def process_block(self, block: np.ndarray, r0: int) -> dict[str, np.ndarray]:
        flat = block.reshape(-1, *block.shape[2:])
        idx = np.arange(r0 * block.shape[1], r0 * block.shape[1] + len(flat))
        pick = flat[(idx % self.stride) == 0]
        xs, As, ss = [np.zeros((0, *self._view), np.float32)], [np.zeros((0, 2, 2),
                                                                         np.float32)], []
        for i in range(0, len(pick), self.batch):
            out = self.engine.run(pick[i:i + self.batch], init="search")
            xs.append(out["x"].cpu().numpy())
            As.append(out["A"].cpu().numpy())
            ss.append((out["n_disks"] >= 3).cpu().numpy())
        return {"x": np.concatenate(xs), "A": np.concatenate(As),
                "sample": np.concatenate(ss) if ss else np.zeros(0, bool)}

    def finish(self, out: dict[str, np.ndarray], seconds: float) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(out[k])) for k in ("x", "A", "sample")}


def _init_bases(model: Model, data: dict[str, torch.Tensor]) -> None:
    """Sample base = mean of the sample patterns warped into the base frame; background base =
    mean of the rest (zeros when the scan has no vacuum)."""
    net = model.net
    s = data["sample"]
    with torch.no_grad():
        if s.any():
            xs, As = data["x"][s], data["A"][s]
            acc = torch.zeros(1, 1, net.n, net.n)
            for i in range(0, len(xs), 256):
                acc += warp(xs[i:i + 256], As[i:i + 256], net.extent).sum(0, keepdim=True)
            net.base[1].copy_(acc[0, 0] / len(xs))
        if (~s).any():
            net.base[0].copy_(data["x"][~s].mean(0)[0])
        else:
            net.base[0].zero_()


def _rotate(x: torch.Tensor, A: torch.Tensor, gen: torch.Generator, extent: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmentation: rotate each view by a random angle and its target with it.

    A scan holds only a handful of grain orientations; without this the encoder learns those
    few and guesses wildly (often 30 degrees off) for a grain at a new orientation. The view
    ``x'(u) = x(R^-1 u)`` has its disks at ``R A p``, so the target becomes ``R A``.
    """
    phi = torch.rand(len(x), generator=gen) * (2 * np.pi)
    c, s = torch.cos(phi), torch.sin(phi)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    xr = warp(x, R.transpose(1, 2), extent)
    return xr, R @ A


def _signature(data: dict[str, torch.Tensor], seed: int, epochs: int,
               start: dict[str, torch.Tensor] | None = None) -> str:
    """What a checkpoint must match to be resumed: the training data (a sample of it), seed,
    epochs and the starting weights ``start`` (so a checkpoint left by a fit from another
    ``--init`` model is never resumed)."""
    h = hashlib.sha1()
    h.update(data["x"][:: max(1, len(data["x"]) // 64)].numpy().tobytes())
    h.update(f"{seed}:{epochs}".encode())
    for k, v in (start or {}).items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, ck: dict[str, Any]) -> None:
    """Write ``ck`` atomically (a temporary, then a rename). A failed write (disk full, no
    permission) leaves no temporary and is one ``OSError`` line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(ck, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"cannot write the fit's checkpoint {path}: {msg}") from None


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when it cannot be used (damaged, or not one).

    Loaded with ``weights_only=True``: a checkpoint holds only tensors, numbers, strings,
    lists and dicts, so a pickle planted under its name can never run code - it fails to load
    and the fit starts over."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - damaged, foreign or unsafe: start over
        return None
    return ck if isinstance(ck, dict) else None


def train_model(
    model: Model, data: dict[str, torch.Tensor], epochs: int = DEFAULT_EPOCHS, seed: int = 0,
    device: str = "cpu", lr: float = 3e-3, batch: int = 128, patience: int = 4,
    checkpoint: Path | None = None, resume: bool = True,
    progress: ProgressCallback | None = None, should_stop: StopCallback | None = None,
    init_bases: bool = True, augment: bool = True,
) -> tuple[Model, dict[str, Any]]:
    """Train ``model`` in place on ``data`` (from :func:`collect_training_set`).

    Returns the model holding the best (lowest held-out loss) weights, and a history dict.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(data["x"])
    if n < 8:
        raise ValueError(f"only {n} patterns to train on: the scan is too small to fit a model")
    perm = torch.randperm(n, generator=gen)
    n_val = max(2, n // 10)
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    net = model.net.to(device).train()
    if init_bases:
        _init_bases(model, data)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sig = _signature(data, seed, epochs, net.state_dict())
    start, best, best_state, history, bad, best_epoch = 0, math.inf, None, [], 0, 0
    if checkpoint is not None and resume and checkpoint.exists():
        ck = _load_checkpoint(checkpoint) or {}
        if ck.get("signature") == sig:
            fresh = ({k: v.detach().clone() for k, v in net.state_dict().items()},
                     opt.state_dict(), gen.get_state())
            try:
                net.load_state_dict(ck["state"])
                opt.load_state_dict(ck["opt"])
                gen.set_state(ck["gen"])
                start, best, history, bad = (int(ck["epoch"]), float(ck["best"]),
                                             list(ck["history"]), int(ck["bad"]))
                best_state, best_epoch = ck["best_state"], int(ck.get("best_epoch", 0))
            except Exception:  # noqa: BLE001 - a damaged checkpoint just means starting over
                net.load_state_dict(fresh[0])
                opt.load_state_dict(fresh[1])
                gen.set_state(fresh[2])
                start, best, best_state, history, bad, best_epoch = (0, math.inf, None, [], 0,
                                                                      0)
    for epoch in range(start, epochs):
        if bad >= patience:
            break
        check_stop(should_stop)
        mask = disk_mask(net.base[1]).to(device)
        order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
        net.train()
        tot, cnt = 0.0, 0
        for i in range(0, len(order), batch):
            j = order[i:i + batch]
            xb, Ab = data["x"][j], data["A"][j]
            if augment:
                xb, Ab = _rotate(xb, Ab, gen, net.extent)
            loss, parts = ccstae_loss(net, xb.to(device), mask, Ab.to(device),
                                      data["sample"][j].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += parts["loss"] * len(j)
            cnt += len(j)
        net.eval()
        with torch.no_grad():
            vl = 0.0
            for i in range(0, n_val, 256):
                j = val_idx[i:i + 256]
                _, parts = ccstae_loss(net, data["x"][j].to(device), mask,
                                       data["A"][j].to(device), data["sample"][j].to(device))
                vl += parts["loss"] * len(j)
            vl /= n_val
        history.append({"epoch": epoch + 1, "train": tot / max(cnt, 1), "val": vl})
        if _improved(vl, best):
            best, bad, best_epoch = vl, 0, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "signature": sig, "state": net.state_dict(), "opt": opt.state_dict(),
                "epoch": epoch + 1, "best": best, "history": history, "bad": bad,
                "best_state": best_state, "best_epoch": best_epoch, "gen": gen.get_state()})
        if progress is not None:
            progress(epoch + 1, epochs, f"loss {tot / max(cnt, 1):.4f} val {vl:.4f}")
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval().cpu()
    return model, {"history": history, "best_val": best, "best_epoch": best_epoch,
                   "stopped_early": len(history) < epochs}


def _improved(loss: float, best: float) -> bool:
    """Whether a held-out ``loss`` counts as progress over ``best``: more than 0.2 % lower (a
    plateau is no progress). The first finite loss always counts - with ``best = inf`` the
    relative test alone is ``inf - inf = nan`` and would never hold."""
    if not math.isfinite(loss):
        return False
    return not math.isfinite(best) or loss < best - 0.002 * abs(best)


def _same_lattice(model: Model, g1: np.ndarray, g2: np.ndarray, sym: float) -> bool:
    if sym != model.symmetry_deg:
        return False
    ratio_m = np.linalg.norm(model.g2) / np.linalg.norm(model.g1)
    ratio_d = np.linalg.norm(g2) / np.linalg.norm(g1)
    cm = abs(model.g1 @ model.g2) / (np.linalg.norm(model.g1) * np.linalg.norm(model.g2))
    cd = abs(g1 @ g2) / (np.linalg.norm(g1) * np.linalg.norm(g2))
    return abs(ratio_m - ratio_d) < 0.05 and abs(cm - cd) < 0.05


def fit_model(
    dataset: Any, init: str | Path | Model = "default", epochs: int | None = None, seed: int = 0,
    out: str | Path = "model.pt", progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None, resume: bool = True, reference: str | None = None,
    device: str = "auto", max_patterns: int = MAX_TRAIN,
) -> Path:
    """Fit a CC-ST-AE to ``dataset`` (self-supervised) and write it to ``out``; returns the path.

    Progress reports each epoch with the loss; ``should_stop`` cancels between batches of work
    (the checkpoint ``OUT.ckpt`` lets a later call resume).
    """
    from .infer import Engine, region_patterns, sample_patterns

    t0 = time.perf_counter()
    out = Path(out)
    if not out.parent.exists():
        raise ValueError(f"output folder {out.parent} does not exist")
    dev = resolve_device(device)
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    base = load_model(init)
    model = base.copy()
    sample = sample_patterns(dataset)
    check_stop(should_stop)
    # the data's own lattice, from the reference region (or the strongest-diffracting pattern)
    if reference:
        probe = _centred_mean(region_patterns(dataset, reference, max_patterns=None))
    else:
        probe = _strongest(dataset, sample)
    g1, g2, sym = lattice_from_pattern(probe)
    kept = _same_lattice(model, g1, g2, sym)
    if not kept:
        fresh = new_model(g1, g2, n=model.net.n, extent=model.net.extent,
                          width=model.net.features[0].out_channels, seed=seed)
        # keep what transfers (the feature extractor); the base is rebuilt from the data
        fresh.net.load_state_dict({k: v for k, v in model.net.state_dict().items()
                                   if k != "base"}, strict=False)
        model = fresh
    engine = Engine.build(model, sample, dev)
    if progress is not None:
        progress(0, epochs, "registering training patterns")
    data = collect_training_set(engine, dataset, max_patterns, should_stop)
    if int(data["sample"].sum()) < 8:
        raise ValueError("fewer than 8 crystal patterns could be registered to the lattice: "
                         "nothing to fit")
    model, info = train_model(model, data, epochs=epochs, seed=seed, device=dev,
                              checkpoint=out.with_name(out.name + ".ckpt"), resume=resume,
                              progress=progress, should_stop=should_stop)
    model.training = {
        "kind": "fit (self-supervised)",
        "init": str(getattr(base, "source", init)),
        "data": str(getattr(dataset, "source", "") or getattr(dataset, "name", "")),
        "scan_shape": list(dataset.scan_shape), "pattern_shape": list(dataset.pattern_shape),
        "geometry": engine.geom.as_dict(), "lattice_from": "model" if kept else "data",
        "reference": reference, "epochs": epochs, "seed": seed, "patterns": len(data["x"]),
        "best_val": info["best_val"], "epochs_run": len(info["history"]),
        "best_epoch": info["best_epoch"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save_model(model, out)
    ck = out.with_name(out.name + ".ckpt")
    if ck.exists():
        ck.unlink()
    return out


def _centred_mean(pats: np.ndarray) -> np.ndarray:
    """Mean of patterns each shifted (bilinear) so its direct beam sits at the first one's."""
    from .preprocess import sample_points

    geom = measure_geometry(pats)
    t = as_patterns(pats)
    c = beam_centres(t, geom.c0, geom.r)
    Q0, Q1 = t.shape[-2:]
    ii, jj = torch.meshgrid(torch.arange(Q0, dtype=torch.float32),
                            torch.arange(Q1, dtype=torch.float32), indexing="ij")
    grid = torch.stack([ii, jj], -1).reshape(1, -1, 2)
    shifted = sample_points(t, grid + (c - c[:1])[:, None, :])
    return shifted.mean(0).reshape(Q0, Q1).numpy()


def _strongest(dataset: Any, sample: np.ndarray, grid: int = 16, candidates: int = 8
               ) -> np.ndarray:
    """Centred mean of the 3x3 positions around a strongly diffracting position of a coarse
    grid over the scan: a clean single-grain pattern when no reference is given.

    The strongest few grid positions are candidates; the one whose 3x3 neighbourhood is most
    alike (one grain, not a grain boundary) wins. Why: a mean across a boundary holds two
    lattices, whose peaks fit no single lattice (seen on a simulated square polycrystal: the
    fitted "square" base came out 10 % and 8 degrees off, and every strain with it)."""
    Rx, Ry = dataset.scan_shape
    rows = np.unique(np.linspace(1, max(1, Rx - 2), min(Rx, grid)).round().astype(int))
    cols = np.unique(np.linspace(1, max(1, Ry - 2), min(Ry, grid)).round().astype(int))
    geom = measure_geometry(sample)
    Q0, Q1 = dataset.pattern_shape
    ii, jj = np.mgrid[0:Q0, 0:Q1]
    ring = torch.tensor(np.hypot(ii - geom.c0[0], jj - geom.c0[1]) > 1.8 * geom.r + 3)
    scored = []
    for r in rows:
        pats = dataset.read_rows(r, r + 1)[0][cols]
        t = torch.sqrt(as_patterns(pats).clamp(min=0))
        score = t[:, ring].std(1)
        scored += [(float(s), int(r), int(c)) for s, c in zip(score, cols, strict=True)]
    scored.sort(reverse=True)

    def block_at(r: int, c: int) -> np.ndarray:
        r0, r1 = max(0, r - 1), min(Rx, r + 2)
        c0, c1 = max(0, c - 1), min(Ry, c + 2)
        return dataset.read_rows(r0, r1)[:, c0:c1].reshape(-1, *dataset.pattern_shape)

    best, best_key = None, -np.inf
    for _score, r, c in scored[:candidates]:
        block = block_at(r, c)
        if len(block) < 2:
            key = 0.0
        else:
            x = torch.sqrt(as_patterns(block).clamp(min=0))[:, ring]
            x = x - x.mean(1, keepdim=True)
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            key = float((x @ x.T).min())  # least alike pair: low across a grain boundary
        if key > best_key + 0.02:
            best, best_key = block, key
    return _centred_mean(best)


#: The simulated training sets of the shipped weights: (seed, noise w, disk radius).
DEFAULT_RECIPE = ((101, 0.0, 4.0), (102, 0.25, 4.0), (103, 0.5, 3.5), (104, 0.7, 4.5))


def train_default(
    out: str | Path, seed: int = 0, epochs: int = 20, scan: int = 20,
    progress: ProgressCallback | None = None, should_stop: StopCallback | None = None,
) -> Path:
    """Rebuild the shipped weights from simulator data (deterministic for ``seed``).

    Four small hexagonal polycrystals (``DEFAULT_RECIPE``: noise 0 to 0.7, disk radius 3.5 to
    4.5 px) that share no seed with the benchmark files; the base lattice is the canonical
    hexagonal one (``g1`` along +x, unit length). Targets come from the same self-made
    registration as ``fit`` - the simulator's ground truth is not used for training.
    """
    from ...io.dataset import Dataset
    from ...simulate import SimulationSettings, simulate_array
    from .infer import Engine, sample_patterns

    t0 = time.perf_counter()
    model = new_model(np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2]), seed=seed)
    parts: list[dict[str, torch.Tensor]] = []
    for i, (sim_seed, w, r) in enumerate(DEFAULT_RECIPE):
        check_stop(should_stop)
        if progress is not None:
            progress(0, epochs, f"simulating and registering set {i + 1}/{len(DEFAULT_RECIPE)}")
        data, _ = simulate_array(SimulationSettings(scan=(scan, scan), noise=w, disk_radius=r,
                                                    seed=sim_seed), workers=1)
        ds = Dataset(data=data)
        engine = Engine.build(model, sample_patterns(ds), "cpu")
        parts.append(collect_training_set(engine, ds, scan * scan, should_stop))
    data_all = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    model, info = train_model(model, data_all, epochs=epochs, seed=seed, progress=progress,
                              should_stop=should_stop, patience=epochs)
    model.training = {
        "kind": "train-default (simulated hexagonal polycrystals, self-made targets)",
        "recipe": [list(r) for r in DEFAULT_RECIPE], "scan": [scan, scan], "pattern": 128,
        "epochs": epochs, "seed": seed, "patterns": len(data_all["x"]),
        "best_val": info["best_val"], "epochs_run": len(info["history"]),
        "best_epoch": info["best_epoch"], "seconds": round(time.perf_counter() - t0, 1),
    }
    return save_model(model, out)
