"""The napari docks of napari-stem-strain: thin Qt shells over the core.

* :mod:`.mapping` - choose and run the methods, results as layers, histograms, MAE table;
* :mod:`.reference` - the reference rectangle and the editable sample/background mask;
* :mod:`.probe` - the diffraction pattern under the mouse with each method's predicted disks;
* :mod:`.export` - result file, TIFF per map, PNG figure.

The docks of one viewer share one :class:`~._session.StrainSession` (dataset, reference,
mask, results), so moving the rectangle in one place updates maps, histograms and overlay.
"""

from .export import ExportWidget
from .mapping import MappingWidget
from .probe import ProbeInspector
from .reference import ReferenceWidget

__all__ = ["ExportWidget", "MappingWidget", "ProbeInspector", "ReferenceWidget"]
