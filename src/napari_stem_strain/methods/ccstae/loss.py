"""Training loss of the CC-ST-AE.

* **Cycle mismatch, both ways, only inside Bragg-disk masks.** ``x(A v)`` vs ``base(v)`` (input
  warped into the base frame) and ``base(A^-1 u)`` vs ``x(u)`` (base warped back into the
  input frame). The masks are the disks of the *learned base* (its brightest pixels, dilated),
  recomputed from the current base every epoch, so diffuse background and the space between
  disks - noise only - never drive the fit.
* **Class as a choice of base.** Each pattern is compared with the sample base (through the
  transform) and with the background base (as is); the predicted sample probability ``p``
  mixes the two mismatches, so minimising the loss teaches the classifier to pick the base that
  explains the pattern.
* **Band penalties** keep scales and shear inside ``1 +- 0.8 band`` (quadratic outside) and a
  small L1 keeps the base sparse (disks, not noise).
* **Optional targets.** ``A`` from the per-pattern refinement (self-training during ``fit``;
  no ground truth) supervise rotation as ``(cos n t, sin n t)`` and the stretch ``S``, which
  keeps the self-supervised rotation out of the local minima a pure image loss has at
  multiples of the disk spacing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CCSTAE, right_polar, rotation_target, warp

__all__ = ["disk_mask", "ccstae_loss"]


def disk_mask(base: torch.Tensor, frac: float = 0.12, dilate: int = 1) -> torch.Tensor:
    """Binary mask ``(n, n)`` of the base's Bragg disks: its brightest ``frac`` of pixels,
    dilated by ``dilate`` pixels (a threshold relative to the base's own distribution, never to
    the masked-out direct beam)."""
    b = base.detach()
    thr = torch.quantile(b.flatten(), 1 - frac)
    m = (b >= thr).float()[None, None]
    if dilate > 0:
        m = F.max_pool2d(m, 2 * dilate + 1, 1, dilate)
    return m[0, 0]


def ccstae_loss(
    model: CCSTAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    target_A: torch.Tensor | None = None,
    target_sample: torch.Tensor | None = None,
    w_target: float = 1.0,
    l1_base: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch ``x`` ``(B,1,n,n)`` and its parts (floats, for progress reports)."""
    out = model(x)
    base_s = model.base[1][None, None]
    base_b = model.base[0][None, None]
    m = mask[None, None]
    msum = m.sum().clamp_min(1.0)
    # input -> base frame, compared inside the base's disks
    e_fwd = (((out["x_in_base"] - base_s) ** 2) * m).sum((1, 2, 3)) / msum
    # base -> input frame, compared inside the base's disks carried along
    m_in = warp(m.expand(x.shape[0], 1, -1, -1), torch.linalg.inv(out["A"].detach()),
                model.extent)
    e_bwd = (((out["base_in_x"] - x) ** 2) * m_in).sum((1, 2, 3)) / m_in.sum((1, 2, 3)).clamp_min(1)
    e_sample = 0.5 * (e_fwd + e_bwd)
    e_back = (((x - base_b) ** 2) * m).sum((1, 2, 3)) / msum
    p = out["p"]
    recon = (p * e_sample + (1 - p) * e_back).mean()
    S = out["S"]
    lim = 0.8 * model.band
    band = (F.relu((S[:, 0, 0] - 1).abs() - lim) ** 2 + F.relu((S[:, 1, 1] - 1).abs() - lim) ** 2
            + F.relu(S[:, 0, 1].abs() - lim) ** 2).mean()
    l1 = model.base.abs().mean()
    total = recon + 10.0 * band + l1_base * l1
    parts = {"cycle": recon.item(), "band": band.item()}
    if target_A is not None:
        ok = torch.isfinite(target_A).all(-1).all(-1)
        if target_sample is not None:
            ok = ok & target_sample.bool()
        if ok.any():
            th_t, S_t = right_polar(torch.nan_to_num(target_A[ok]))
            raw = out["raw"][ok]
            rot = raw[:, 3:5] / raw[:, 3:5].norm(dim=1, keepdim=True).clamp_min(1e-6)
            l_rot = ((rot - rotation_target(th_t, model.n_sym)) ** 2).sum(1).mean()
            l_s = ((S[ok] - S_t) ** 2).sum((1, 2)).mean() / model.band ** 2
            sup = l_rot + 0.1 * l_s
            total = total + w_target * sup
            parts["target"] = sup.item()
    if target_sample is not None:
        # class-balanced: a scan is often mostly crystal, and a classifier that just learns the
        # prior would call every vacuum position crystal
        t = target_sample.float()
        frac = t.mean().clamp(0.05, 0.95)
        wts = torch.where(t > 0.5, 0.5 / frac, 0.5 / (1 - frac))
        cls = F.binary_cross_entropy_with_logits(out["logit"], t, weight=wts)
        total = total + w_target * cls
        parts["class"] = cls.item()
    parts["loss"] = total.item()
    return total, parts
