"""The split-learning family (FedCL and its baselines FedProto, FedAvg-split) and their shared parts."""
