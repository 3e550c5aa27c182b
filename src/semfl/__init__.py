"""semfl: federated learning of semantic-communication models over wireless links."""
__version__ = "0.1.0"

__all__ = ["load"]


def __getattr__(name: str):
    # `semfl.load` imports torch and the methods on first use, so `import semfl` stays light
    if name == "load":
        from semfl.experiments.codec import load

        return load
    raise AttributeError(f"module 'semfl' has no attribute {name!r}")
