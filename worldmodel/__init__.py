"""V (ConvVAE) and M (world models over V's latent), their losses and their training."""
