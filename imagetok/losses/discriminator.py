"""Import shim: the discriminators moved to :mod:`imagetok.losses.discriminators`. Run configs stored in
older checkpoints name ``imagetok.losses.discriminator.PatchGANDiscriminator``; they keep working."""

from imagetok.losses.discriminators.objectives import discriminator_loss, generator_adversarial_loss
from imagetok.losses.discriminators.patchgan import PatchGANDiscriminator

__all__ = ["PatchGANDiscriminator", "discriminator_loss", "generator_adversarial_loss"]
