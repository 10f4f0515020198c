"""TiTok's proxy-code objective (Yu et al. 2024, "An Image is Worth 32 Tokens for Reconstruction and
Generation", https://arxiv.org/abs/2406.07550, Sec. 3.3 "two-stage training").

Stage 1 trains a 1D tokenizer whose decoder (:class:`~imagetok.nets.proxy_codes.ProxyCodeDecoder`)
predicts, for every cell of a trained grid tokenizer's (the teacher's) latent grid, the code the teacher
picks for the same image, with cross-entropy. Pixels come from the teacher's own decoder, which the
1D decoder starts from (:meth:`ProxyCodeLoss.load_teacher`) and which stage 1 keeps frozen. Stage 2
fine-tunes the decoder on pixels (``init_from`` = the stage-1 checkpoint, ``loss.proxy_codes.weight=0``).

The teacher is frozen and kept outside the module tree: it is not in checkpoints, the EMA copy or DDP.
Its codes are computed in eval mode under ``no_grad`` for each training batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch import nn

from imagetok.errors import ConfigValueError, check

PROXY_DECODER = "imagetok.nets.proxy_codes.ProxyCodeDecoder"
MAX_TEACHER_CODES = 65536  # the decoder's last layer has one output per code


class ProxyCodeLoss(nn.Module):
    """``weight * CE(code logits [B, V, h, w], teacher codes [B, h, w])``, plus the top-1 accuracy.

    Args:
        teacher: a trained grid tokenizer: a training checkpoint (``.ckpt``, EMA weights) or a
            ``save_pretrained`` directory, with one sub-token per position (VQ-style, ``V <= 65536``).
        weight: weight of the cross-entropy in the generator loss; 0 keeps the teacher only to shape and
            initialise the decoder (stage 2).
    """

    def __init__(self, *, teacher: str | None = None, weight: float = 1.0) -> None:
        super().__init__()
        check(isinstance(weight, (int, float)) and weight >= 0, "weight", weight, "a float >= 0")
        check(isinstance(teacher, str) and teacher, "teacher", teacher,
              "the checkpoint or save_pretrained directory of a trained grid tokenizer")
        from imagetok.evaluation.run import load_tokenizer  # lazy: evaluation imports the training callbacks

        try:
            model = load_tokenizer(teacher, "ema")
        except ConfigValueError as err:
            raise ConfigValueError("teacher", teacher, err.allowed) from None
        check(not model.is_sequence, "teacher", teacher, "a grid tokenizer (this one emits 1D tokens)")
        check(len(model.codebook_sizes) == 1 and model.codebook_sizes[0] <= MAX_TEACHER_CODES, "teacher", teacher,
              f"a tokenizer with one sub-token of at most {MAX_TEACHER_CODES} codes per position "
              f"(this one has codebook sizes {model.codebook_sizes})")
        self._teacher = [model.requires_grad_(False).eval()]  # outside the module tree
        self.weight = float(weight)
        self._captured: list[torch.Tensor] = []
        self._hook = None

    @property
    def teacher(self):
        return self._teacher[0]

    @property
    def codebook(self) -> torch.Tensor:
        """The teacher's code vectors as its decoder sees them, ``[V, D]`` (its quantizer's ``out_dim``)."""
        v = self.teacher.codebook_sizes[0]
        with torch.no_grad():
            latents = self.teacher.quantizer.indices_to_latents(torch.arange(v).view(1, v, 1, 1))  # [1, D, V, 1]
        return latents[0, :, :, 0].t().contiguous()

    def complete_decoder_config(self, cfg: DictConfig) -> None:
        """Fill the run config's ``decoder`` (a ProxyCodeDecoder) with the teacher's shape: its decoder
        config (``pixel_decoder``), code count and width, its ``post_quant_conv`` kernel, and the code
        decoder's grid (``h = image_size / f``, one mask token per cell, one logit per code)."""
        dec = cfg.decoder
        if dec.get("_target_") != PROXY_DECODER:
            raise ConfigValueError("decoder", dec.get("_target_"), f"{PROXY_DECODER} (decoder=proxy_codes) with "
                                   "loss.proxy_codes set: the proxy-code loss trains a decoder of the teacher's codes")
        h, w, _ = self.teacher.token_shape(cfg.data.image_size)
        check(h == w, "loss.proxy_codes.teacher", f"{h}x{w} grid", "a teacher whose code grid is square")
        config = self.teacher.config or {}
        with open_dict(cfg):
            dec.pixel_decoder = config["decoder"]
            dec.codebook_size, dec.codebook_dim = self.teacher.codebook_sizes[0], self.teacher.quantizer.out_dim
            dec.post_quant_kernel_size = config.get("quant_conv_kernel_size", 1)
            code = dec.code_decoder
            code.resolution, code.patch_size, code.out_channels = h, 1, dec.codebook_size

    def load_teacher(self, decoder: nn.Module) -> None:
        """Copy the teacher's code vectors, ``post_quant_conv`` and decoder into ``decoder`` (a
        ProxyCodeDecoder built from :meth:`complete_decoder_config`) and hook its code decoder's logits."""
        with torch.no_grad():
            decoder.codebook.copy_(self.codebook)
        decoder.post_quant_conv.load_state_dict(self.teacher.post_quant_conv.state_dict())
        decoder.pixel_decoder.load_state_dict(self.teacher.decoder.state_dict())
        if self._hook is not None:
            self._hook.remove()
        self._hook = decoder.code_decoder.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training forwards only
            self._captured[:] = [output]

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's codes of ``images`` ``[B, 3, H, W]`` in [-1, 1]: LongTensor ``[B, h, w]``."""
        teacher = self.teacher
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        return teacher.encode(images.detach())[..., 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted cross-entropy scalar, ``{"proxy_ce", "proxy_accuracy"}`` detached) for the training
        forward that just ran on ``images``."""
        if not self._captured:
            raise RuntimeError("ProxyCodeLoss.load_teacher(decoder) must run, and the tokenizer's training "
                               "forward, before the proxy-code loss (imagetok.training.run.build does it)")
        logits = self._captured.pop().float()  # [B, V, h, w]
        if self.weight == 0:
            return logits.new_zeros(()), {}
        codes = self.targets(images)
        ce = F.cross_entropy(logits, codes)
        accuracy = (logits.detach().argmax(dim=1) == codes).float().mean()
        return self.weight * ce, {"proxy_ce": ce.detach(), "proxy_accuracy": accuracy}
