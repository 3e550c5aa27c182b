"""Semantic models (CSC student, DeepJSCC, GSC mentors) and the frozen task classifier."""
from semfl.models.base import ImageSpec, SemanticModel, SemanticOutput
from semfl.models.registry import SHARED, Shared, available_archs, build_model, register_arch

__all__ = ["ImageSpec", "SemanticModel", "SemanticOutput", "SHARED", "Shared", "available_archs", "build_model", "register_arch"]
