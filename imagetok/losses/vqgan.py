"""The VQGAN objective: reconstruction + perceptual + adaptive-weighted adversarial + quantizer loss
(+ optional teacher alignment: semantic features, REPA on the decoder), and the discriminator's loss on
(real, reconstruction.detach()) with optional DiffAug, LeCAM and lazy R1."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from imagetok.errors import MissingWeightsError, check
from imagetok.losses.diffaug import DiffAugment
from imagetok.losses.discriminators.objectives import discriminator_loss, generator_adversarial_loss
from imagetok.losses.perceptual import LPIPS
from imagetok.losses.regularizers import LeCAM, r1_due, r1_penalty
from imagetok.losses.proxy_codes import ProxyCodeLoss
from imagetok.losses.repa import DecoderAlignment
from imagetok.losses.semantic import SemanticAlignmentLoss
from imagetok.quantizers.base import QuantizerOutput

log = logging.getLogger(__name__)


class VQGANLoss(nn.Module):
    """Generator and discriminator losses of VQGAN training.

    Args:
        discriminator: module mapping images ``[B, 3, H, W]`` in [-1, 1] to logits.
        reconstruction: ``"l1"`` or ``"l2"`` pixel loss.
        perceptual_weight: LPIPS weight; ``None`` (auto) uses 1.0 when the VGG weights can be found and
            otherwise trains without the term, saying so in one line. An explicit value > 0 requires them.
        perceptual_weights_path: local torchvision VGG16 file for LPIPS.
        perceptual_random_backbone: random LPIPS backbone (tests only).
        gan_loss: ``"hinge"`` or ``"non_saturating"``.
        disc_weight: weight of the adversarial term.
        adaptive_disc_weight: scale it by ||grad nll|| / ||grad adv|| at the decoder's last layer (VQGAN).
        disc_start: generator step from which the discriminator is trained and used.
        quantizer_weight: weight of ``QuantizerOutput.loss``.
        semantic: optional teacher-alignment loss on ``QuantizerOutput.features["semantic*"]``
            (factorized and dual-codebook quantizers); its frozen teacher stays out of the module tree.
        diffaug: DiffAug policies (``translation``, ``cutout``, ``color``) applied to real and generated
            images before every discriminator call; ``[]`` = off.
        lecam_weight: weight of the LeCAM regulariser in the discriminator loss; 0 = off (no anchors).
        lecam_decay: EMA decay of LeCAM's anchors.
        r1_weight: R1 ``gamma``; the penalty ``gamma / 2 * E||grad D(x)||^2`` on real images; 0 = off.
        r1_every: lazy R1: every ``r1_every``-th discriminator step, scaled by ``r1_every``.
        repa: optional REPA decoder alignment; its projector trains with the generator
            (:meth:`generator_parameters`), it is attached to the decoder by ``training.run.build``.
        proxy_codes: optional TiTok proxy-code cross-entropy (losses/proxy_codes.py) on a
            ProxyCodeDecoder's code logits; built and attached to the decoder by ``training.run.build``.
    """

    def __init__(self, *, discriminator: nn.Module, reconstruction: Literal["l1", "l2"] = "l1",
                 reconstruction_weight: float = 1.0, perceptual_weight: float | None = None,
                 perceptual_weights_path: str | None = None, perceptual_random_backbone: bool = False,
                 gan_loss: Literal["hinge", "non_saturating"] = "hinge", disc_weight: float = 0.5,
                 adaptive_disc_weight: bool = True, disc_start: int = 0, quantizer_weight: float = 1.0,
                 semantic: SemanticAlignmentLoss | None = None, diffaug: list[str] | tuple[str, ...] = (),
                 lecam_weight: float = 0.0, lecam_decay: float = 0.99, r1_weight: float = 0.0, r1_every: int = 16,
                 repa: DecoderAlignment | None = None, proxy_codes: ProxyCodeLoss | None = None) -> None:
        super().__init__()
        check(reconstruction in ("l1", "l2"), "reconstruction", reconstruction, "'l1' or 'l2'")
        check(gan_loss in ("hinge", "non_saturating"), "gan_loss", gan_loss, "'hinge' or 'non_saturating'")
        check(perceptual_weight is None or perceptual_weight >= 0, "perceptual_weight", perceptual_weight,
              "null (auto) or a float >= 0")
        check(isinstance(disc_start, int) and disc_start >= 0, "disc_start", disc_start, "an integer >= 0 (generator steps)")
        check(disc_weight >= 0, "disc_weight", disc_weight, "a float >= 0")
        check(isinstance(lecam_weight, (int, float)) and lecam_weight >= 0, "lecam_weight", lecam_weight,
              "a float >= 0 (0 = off)")
        check(isinstance(r1_weight, (int, float)) and r1_weight >= 0, "r1_weight", r1_weight, "a float >= 0 (0 = off)")
        check(isinstance(r1_every, int) and r1_every >= 1, "r1_every", r1_every, "an integer >= 1 (discriminator steps)")
        check(isinstance(diffaug, (list, tuple)), "diffaug", diffaug, "a list such as [translation,cutout,color]")
        check(isinstance(lecam_decay, (int, float)) and 0 <= lecam_decay < 1, "lecam_decay", lecam_decay, "a float in [0, 1)")
        self.discriminator = discriminator
        self.reconstruction, self.reconstruction_weight = reconstruction, reconstruction_weight
        self.gan_loss, self.disc_weight, self.adaptive_disc_weight = gan_loss, disc_weight, adaptive_disc_weight
        self.disc_start, self.quantizer_weight = disc_start, quantizer_weight
        self.diffaug = DiffAugment(diffaug)
        # Only when on: the default run's state_dict (and old checkpoints' keys) stay as they were.
        self.lecam_weight, self.r1_weight, self.r1_every = float(lecam_weight), float(r1_weight), r1_every
        if lecam_weight > 0:
            self.lecam = LeCAM(lecam_decay)
        self.repa = repa
        self.perceptual_weight, perceptual = self._build_perceptual(
            perceptual_weight, perceptual_weights_path, perceptual_random_backbone)
        # Kept outside the module tree: frozen, so it stays out of checkpoints, EMA and DDP.
        self._perceptual = [perceptual] if perceptual is not None else []
        self._semantic = [semantic] if semantic is not None else []  # likewise for its teacher
        self._proxy_codes = [proxy_codes] if proxy_codes is not None else []  # likewise

    @staticmethod
    def _build_perceptual(weight: float | None, path: str | None, random_backbone: bool) -> tuple[float, LPIPS | None]:
        if weight == 0:
            return 0.0, None
        try:
            return (1.0 if weight is None else weight), LPIPS(path, random_backbone)
        except MissingWeightsError as err:
            if weight is not None:  # the recipe asked for it explicitly: stop before training
                raise
            log.warning("Training without the perceptual (LPIPS) term: %s", err)
            return 0.0, None

    def set_proxy_codes(self, proxy_codes: ProxyCodeLoss) -> None:
        """Use ``proxy_codes`` (built by ``training.run.build``, which loads its teacher once)."""
        self._proxy_codes = [proxy_codes]

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the loss that train with the tokenizer (the REPA projector)."""
        return list(self.repa.parameters()) if self.repa is not None else []

    def discriminator_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def _pixel_loss(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon, images) if self.reconstruction == "l1" else F.mse_loss(recon, images)

    def _adaptive_weight(self, nll: torch.Tensor, adversarial: torch.Tensor, recon: torch.Tensor,
                         last_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VQGAN's adaptive weight ``|d nll / d W| / (|d adv / d W| + 1e-4)`` at the decoder's last
        layer ``W`` (Esser et al. 2021, eq. 7), clamped to [0, 1e4]. Returns it with ``d nll / d recon``
        and ``d adv / d recon``: the gradients at the last layer are taken from these through the last
        layer alone, and :meth:`generator_loss` hands them on, so that LPIPS and the discriminator are
        differentiated once per step, not twice (once here, once in the backward pass)."""
        # Through LPIPS and the discriminator, whose graphs are then freed: nothing differentiates them again.
        (nll_recon,) = torch.autograd.grad(nll, recon)
        (adv_recon,) = torch.autograd.grad(adversarial, recon)
        nll_grad = torch.autograd.grad(recon, last_layer, nll_recon, retain_graph=True)[0].float()
        adv_grad = torch.autograd.grad(recon, last_layer, adv_recon, retain_graph=True)[0].float()
        weight = (nll_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return weight, nll_recon, adv_recon

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, quant: QuantizerOutput, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss (scalar) and its detached terms. ``images``/``recon`` ``[B, 3, H, W]``
        in [-1, 1]; ``last_layer`` is needed for the adaptive adversarial weight."""
        pixel = self._pixel_loss(images, recon.float())
        nll = self.reconstruction_weight * pixel
        logs = {"pixel": pixel.detach()}
        if self._perceptual:
            perceptual = self._perceptual[0].to(images.device)(images, recon)
            nll = nll + self.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        others = self.quantizer_weight * quant.loss  # the terms that do not reach the encoder through recon alone
        logs["quantizer"] = quant.loss.detach()
        if self._semantic:  # outside nll: the adaptive adversarial weight balances pixels only
            semantic, semantic_logs = self._semantic[0](images, quant.features)
            others = others + semantic
            logs.update(semantic=semantic.detach(), **semantic_logs)
        if self.repa is not None:  # likewise outside nll
            repa, repa_logs = self.repa(images)
            others = others + repa
            logs.update(repa=repa.detach(), **repa_logs)
        if self._proxy_codes:  # likewise: stage 1 of TiTok trains on these codes alone
            proxy, proxy_logs = self._proxy_codes[0](images)
            others = others + proxy
            logs.update(proxy_logs)
        total = nll + others
        if self.discriminator_active(step):
            adversarial = generator_adversarial_loss(self.gan_loss, self.discriminator(self.diffaug(recon)).float())
            weight = adversarial.new_ones(())  # not torch.tensor(1.0, device=...): a blocking host-to-device copy
            if self.adaptive_disc_weight and last_layer is not None and torch.is_grad_enabled() and recon.requires_grad:
                with record_function("imagetok/adaptive_weight"):
                    weight, nll_recon, adv_recon = self._adaptive_weight(nll, adversarial, recon, last_layer)
                value = (total + self.disc_weight * weight * adversarial).detach()
                # The same gradient as `value`'s own graph: d total / d recon given directly, the rest as is.
                backward = (recon.float() * (nll_recon + self.disc_weight * weight * adv_recon).float()).sum() + others
                total = backward + (value - backward.detach())
            else:
                total = total + self.disc_weight * weight * adversarial
                value = total.detach()
            logs.update(adversarial=adversarial.detach(), adaptive_weight=weight)
        else:
            value = total.detach()
        logs["total"] = value
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module | None = None,
                           step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on real ``images`` and detached ``recon``, both ``[B, 3, H, W]`` in [-1, 1].
        ``discriminator``: what to call instead of ``self.discriminator`` (its data-parallel wrapper);
        ``step``: the generator step, which schedules lazy R1 (no R1 without it)."""
        discriminator = discriminator if discriminator is not None else self.discriminator
        logits_real = discriminator(self.diffaug(images.detach())).float()
        logits_fake = discriminator(self.diffaug(recon.detach())).float()
        loss = discriminator_loss(self.gan_loss, logits_real, logits_fake)
        logs = {"disc": loss.detach(), "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}
        if self.lecam_weight > 0:
            lecam = self.lecam(logits_real, logits_fake)
            loss = loss + self.lecam_weight * lecam
            logs.update(lecam=lecam.detach(), lecam_anchor_real=self.lecam.anchor_real.clone(),
                        lecam_anchor_fake=self.lecam.anchor_fake.clone())
        if self.r1_weight > 0 and step is not None and r1_due(step - self.disc_start, self.r1_every):
            r1 = r1_penalty(lambda x: discriminator(self.diffaug(x)), images)
            loss = loss + 0.5 * self.r1_weight * self.r1_every * r1  # lazy: N times the weight every N-th step
            logs["r1"] = r1.detach()
        return loss, logs
