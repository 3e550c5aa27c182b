"""Semantic models (CSC student, DeepJSCC, GSC mentors) and the frozen task classifier."""
from semfl.models.base import ImageSpec, SemanticModel, SemanticOutput
from semfl.models.registry import SHARED, Shared, available_archs, build_model, register_arch

# importing a family module registers it
from semfl.models import csc, gsc, jscc, vqjscc  # noqa: F401,E402

__all__ = ["ImageSpec", "SemanticModel", "SemanticOutput", "SHARED", "Shared", "available_archs", "build_model", "register_arch"]


def _check_arch(cfg) -> None:
    """Config check that needs the registry: model.arch names a registered family."""
    from semfl.config import ConfigError

    if cfg.model.arch not in available_archs():
        raise ConfigError(f"model.arch: unknown model {cfg.model.arch!r} (allowed: {', '.join(available_archs())})")


from semfl.config import register_validator  # noqa: E402

register_validator(_check_arch)
