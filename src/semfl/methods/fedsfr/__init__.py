"""The FedSFR family: FedSFR (digital VQ-JSCC with feature regularisation), SKBS and FedSFD."""
