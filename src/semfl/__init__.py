"""semfl: federated learning of semantic-communication models over wireless links."""
__version__ = "0.1.0"
