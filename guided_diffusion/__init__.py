"""p2-diffusion: diffusion models with P2 (perception prioritized) weighting, in the ADM layout."""
