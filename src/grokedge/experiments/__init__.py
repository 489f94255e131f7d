"""The experiments that read the edge, pure torch math (no Lightning, Hydra or W&B): ablation,
perturbation, curvature, probes and their ridge, gap flow, universality classes, Fourier and
attention statistics."""
