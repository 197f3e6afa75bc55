"""Ground truth of simulated datasets, stored beside the 4D data (``CONVENTIONS.md``).

A simulated file holds a group ``/ground_truth`` with float32 maps ``exx, eyy, exy, theta`` of
shape ``(Rx, Ry)`` (NaN in vacuum), the bool ``sample`` mask (crystal, not vacuum), and
optionally the int32 ``grains`` labels (-1 in vacuum), the true affine ``A`` ``(Rx, Ry, 2, 2)``
relative to the reference lattice (NaN in vacuum) and the true direct-beam ``center``
``(Rx, Ry, 2)`` in detector pixels. Attributes: ``symmetry_deg`` (60 hex, 90 square, 180 rect)
and ``reference`` (``"r0:r1,c0:c1"``, a rectangle lying wholly inside the unstrained, unrotated
reference grain), plus ``lattice`` when known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..strain import parse_region

__all__ = ["GroundTruth", "write_ground_truth", "read_ground_truth", "GROUP"]

#: Name of the HDF5 group holding the ground truth.
GROUP = "ground_truth"

_MAPS = ("exx", "eyy", "exy", "theta")


@dataclass
class GroundTruth:
    """True strain and rotation of a simulated scan, relative to its reference grain.

    ``exx, eyy, exy`` are dimensionless (tensor shear), ``theta`` in degrees wrapped into
    ``(-symmetry_deg/2, symmetry_deg/2]``; all four are ``(Rx, Ry)`` float32, NaN in vacuum.
    """

    exx: np.ndarray
    eyy: np.ndarray
    exy: np.ndarray
    theta: np.ndarray
    sample: np.ndarray
    symmetry_deg: float
    reference: str
    grains: np.ndarray | None = None
    A: np.ndarray | None = None
    center: np.ndarray | None = None
    lattice: str = ""

    @property
    def scan_shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in np.shape(self.exx))  # type: ignore[return-value]

    @property
    def reference_slices(self) -> tuple[slice, slice]:
        return parse_region(self.reference)

    def maps(self) -> dict[str, np.ndarray]:
        """The four maps by name (``exx, eyy, exy, theta``)."""
        return {k: getattr(self, k) for k in _MAPS}

    def relative_to(self, region: str | None, mask: np.ndarray | None = None) -> GroundTruth:
        """The truth as a method's maps are shown: relative to ``region`` (the median over it,
        as for the methods; needs the true ``A``) and counting only positions in ``mask``
        (the user's sample mask) - so an MAE measures the method, not the user's choices."""
        from dataclasses import replace

        from ..strain import strain_maps

        sample = np.asarray(self.sample, bool)
        if mask is not None and np.shape(mask) == sample.shape:
            sample = sample & np.asarray(mask, bool)
        out = replace(self, sample=sample)
        if region and region != self.reference and self.A is not None:
            try:
                m = strain_maps(self.A, region, self.symmetry_deg, mask=self.sample)
            except ValueError:  # no sample position in the region: keep the file's reference
                return out
            out = replace(out, exx=m.exx, eyy=m.eyy, exy=m.exy, theta=m.theta,
                          reference=region)
        return out


def write_ground_truth(h5: h5py.File | h5py.Group, gt: GroundTruth) -> None:
    """Write ``gt`` into the group ``/ground_truth`` of an open, writable HDF5 file (or under
    the given group), replacing any that is there."""
    if GROUP in h5:
        del h5[GROUP]
    g = h5.create_group(GROUP)
    for k in _MAPS:
        g.create_dataset(k, data=np.asarray(getattr(gt, k), np.float32))
    g.create_dataset("sample", data=np.asarray(gt.sample, bool))
    if gt.grains is not None:
        g.create_dataset("grains", data=np.asarray(gt.grains, np.int32))
    if gt.A is not None:
        g.create_dataset("A", data=np.asarray(gt.A, np.float32))
    if gt.center is not None:
        g.create_dataset("center", data=np.asarray(gt.center, np.float32))
    g.attrs["symmetry_deg"] = float(gt.symmetry_deg)
    g.attrs["reference"] = str(gt.reference)
    if gt.lattice:
        g.attrs["lattice"] = str(gt.lattice)
    g.attrs["conventions"] = (
        "CONVENTIONS.md: g = A g0, F = A^-T = V R, e = V - I (tensor shear), theta degrees CCW "
        "from +x (row) toward +y (column), wrapped into the symmetry period; NaN in vacuum"
    )


def read_ground_truth(path: str | os.PathLike | h5py.File | h5py.Group) -> GroundTruth | None:
    """The ground truth of a file (path or open HDF5 file), or ``None`` when it has none
    (or is not HDF5 at all)."""
    if isinstance(path, h5py.Group):
        return _read_group(path)
    p = Path(path)
    if not p.is_file():
        return None
    try:
        h5 = h5py.File(p, "r")
    except OSError:
        return None
    with h5:
        return _read_group(h5)


def _read_group(h5: h5py.Group) -> GroundTruth | None:
    if GROUP not in h5 or not isinstance(h5[GROUP], h5py.Group):
        return None
    g = h5[GROUP]
    if any(k not in g for k in (*_MAPS, "sample")):
        return None
    maps = {k: np.asarray(g[k][()], np.float32) for k in _MAPS}
    return GroundTruth(
        **maps,
        sample=np.asarray(g["sample"][()], bool),
        symmetry_deg=float(g.attrs.get("symmetry_deg", 360.0)),
        reference=_str(g.attrs.get("reference", "")),
        grains=np.asarray(g["grains"][()]) if "grains" in g else None,
        A=np.asarray(g["A"][()], np.float32) if "A" in g else None,
        center=np.asarray(g["center"][()], np.float32) if "center" in g else None,
        lattice=_str(g.attrs.get("lattice", "")),
    )


def _str(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
