"""Strain and rotation maps from 4D-STEM data: a cycle-consistent spatial-transforming
autoencoder (CC-ST-AE) beside the conventional py4DSTEM pipeline, with a napari plugin.

The core (reading, simulation, strain maths, both methods, CLI) never imports Qt or napari;
the napari adapters live in the ``_reader``/``_sample_data``/``_writer``/``_widgets`` modules.
"""

__version__ = "0.1.0"
