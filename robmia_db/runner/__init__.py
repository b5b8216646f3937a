"""Runner layer: data, models, defenses, perturbations, bounds, signal extraction and the executor.

The only layer that imports torch. It may import `errors`, `spec`, `datasets` and `store`; it writes to
the store and nothing else. Nothing outside the runner imports it at module level.
"""
