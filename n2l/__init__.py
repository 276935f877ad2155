"""n2l: noise to latent, an overfitted image codec that transmits no latent codes."""
