"""Compression contenders of PSFL: FedAvg with compressed uplinks (STC, FTTQ, FedPAQ, top-k)."""
