"""The spectral edge itself, pure torch math (no Lightning, Hydra or W&B): the recorded update
window, its spectrum under each edge definition, derived windows, provenance, events and the
read-outs; every p-sized step works on a slice and sums W×W partials (docs/design.md, Scale)."""
