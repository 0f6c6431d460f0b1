"""Steps and loops: DDPM/DDIM, ODE/SDE solvers, guidance, the sampler registry, sampling a checkpoint."""
