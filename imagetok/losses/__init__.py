"""Training losses: reconstruction, perceptual, adversarial."""
