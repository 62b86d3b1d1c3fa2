"""Speed and memory benchmarks of the layer-wise measurement, measured side by side with baselines."""
