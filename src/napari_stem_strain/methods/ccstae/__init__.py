"""CC-ST-AE: the cycle-consistent spatial-transforming autoencoder strain method.

``model`` (network), ``loss`` (cycle loss), ``preprocess`` (centring, lattice-unit view),
``refine`` (per-pattern Gauss-Newton against the base lattice), ``infer`` (streaming
:class:`CCSTAEMethod`), ``train`` (self-supervised ``fit``), ``modelfile`` (validated model
files). See ``docs/method.md``.
"""

from .infer import CCSTAEMethod, Engine, predict_pattern, run_ccstae
from .modelfile import DEFAULT_PATH, Model, load_model, save_model
from .train import fit_model

__all__ = ["CCSTAEMethod", "Engine", "Model", "DEFAULT_PATH", "fit_model", "load_model",
           "predict_pattern", "run_ccstae", "save_model"]
