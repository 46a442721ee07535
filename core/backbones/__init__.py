"""Frozen backbones and the soft-prompt wrapper around them."""
from core.backbones.load import DTYPES, Backbone, BackboneError, accepted, freeze, load, load_kept
from core.backbones.registry import REGISTRY

__all__ = ["DTYPES", "Backbone", "BackboneError", "REGISTRY", "accepted", "freeze", "load", "load_kept"]
