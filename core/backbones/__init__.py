"""Frozen backbones and the soft-prompt wrapper around them."""
from core.backbones.load import DTYPES, Backbone, BackboneError, accepted, freeze, load
from core.backbones.registry import REGISTRY

__all__ = ["DTYPES", "Backbone", "BackboneError", "REGISTRY", "accepted", "freeze", "load"]
