"""Ensembles of artifacts: built from members' out-of-fold scores (``build``, ``fitting``) and served as
one artifact (``serving``)."""
from hier.services.ensemble.build import build
from hier.services.ensemble.serving import Ensemble, EnsemblePredictor, open_ensemble, refusal

__all__ = ["Ensemble", "EnsemblePredictor", "build", "open_ensemble", "refusal"]
