"""Discriminators (config group ``loss/discriminator``): ``patchgan`` (default) and ``dino``, and the
GAN objectives. A discriminator maps images ``[B, 3, H, W]`` in [-1, 1] to real/fake logits."""

from imagetok.losses.discriminators.objectives import discriminator_loss, generator_adversarial_loss
from imagetok.losses.discriminators.patchgan import PatchGANDiscriminator

__all__ = ["PatchGANDiscriminator", "discriminator_loss", "generator_adversarial_loss"]
