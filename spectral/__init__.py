"""The Spectral paper: logit decomposition (spectral.decomposition) and synthetic tasks (spectral.tasks)."""
