"""eto_ref: a from-scratch PyTorch reference implementation of ETO
(Exploration-based Trajectory Optimization for LLM agents, Song et al. 2024)."""
