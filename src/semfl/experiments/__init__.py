"""The experiment layer: sweeps, comparisons, benchmarks and reports. Reads run directories, never method internals."""
