"""The LlamaGen side of ``train_step.py``: its VQModel, VQLoss and EMA, imported at run time from a
checkout (``--llamagen DIR``; nothing of it is copied here), driven by the step of its ``vq_train.py``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _step_measure import FlopCount, batch_size, count_params, counts_flops, mark_memory_baseline, step_result, sync


def llamagen_setup(case: str, size: int, device: str) -> dict | None:
    """The LlamaGen build of a case, or ``{"skip": reason}``. Values mirror the imagetok recipe."""
    if case == "vit":
        return {"skip": "LlamaGen has no ViT tokenizer"}
    if case == "llamagen_vq16":  # vq_train.py's defaults (and its --ema)
        return dict(model="VQ-16", model_args=dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True),
                    loss=dict(disc_weight=0.5, disc_adaptive_weight=False, reconstruction_loss="l2", disc_dim=64,
                              disc_num_layers=3), betas=(0.9, 0.95), lr=1e-4, grad_clip=1.0, ema_decay=0.9999)
    if case == "taming_vqgan_f16":  # VQ-16 channels with taming's 16384 x 256 codebook, no l2 norm
        return dict(model="VQ-16", model_args=dict(codebook_size=16384, codebook_embed_dim=256, codebook_l2_norm=False),
                    loss=dict(disc_weight=0.8, disc_adaptive_weight=True, reconstruction_loss="l1", disc_dim=64,
                              disc_num_layers=3), betas=(0.5, 0.9), lr=4.32e-4, grad_clip=0.0, ema_decay=0.999)
    if case == "default_cpu":
        # imagetok's default recipe (configs/encoder/cnn.yaml, quantizer/vq.yaml, loss/vqgan.yaml, train.yaml):
        # ch 32, ch_mult [1,2,2], 1 res block, z 64, attention only in the middle, 1024 x 8 l2-normalised codes
        return dict(model="custom", model_args=dict(codebook_size=1024, codebook_embed_dim=8, codebook_l2_norm=True,
                                                    encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64),
                    ch=32, num_res_blocks=1, level_attention=False,
                    loss=dict(disc_weight=0.1, disc_adaptive_weight=True, reconstruction_loss="l1", disc_dim=32,
                              disc_num_layers=2), betas=(0.5, 0.9), lr=8e-4, grad_clip=1.0, ema_decay=0.999)
    raise ValueError(case)



def import_llamagen(directory: str):
    """LlamaGen's tokenizer modules from ``directory``; its LPIPS gets a VGG16 with random weights."""
    import torch
    import torchvision

    sys.path.insert(0, str(Path(directory).resolve()))
    import tokenizer.tokenizer_image.lpips as lpips_module

    class _RandomVGG:  # torchvision.models as its lpips.py sees it: vgg16(pretrained=True) without a download
        def __getattr__(self, name):
            return getattr(torchvision.models, name)

        @staticmethod
        def vgg16(pretrained=False, **kwargs):
            return torchvision.models.vgg16(weights=None)

    lpips_module.models = _RandomVGG()
    original_load = lpips_module.LPIPS.load_from_pretrained
    cache = Path(lpips_module.__file__).resolve().parent / "cache" / "vgg.pth"

    def load_or_skip(self, name="vgg_lpips"):  # its calibrated heads from cache/vgg.pth when present, never a download
        if cache.is_file() and cache.stat().st_size > 1000:
            try:
                return original_load(self, name)
            except Exception as err:  # e.g. a git-lfs pointer
                print(f"LlamaGen LPIPS heads not loaded ({type(err).__name__}); random heads", file=sys.stderr)

    lpips_module.LPIPS.load_from_pretrained = load_or_skip
    from tokenizer.tokenizer_image import vq_model
    from tokenizer.tokenizer_image.vq_loss import VQLoss
    from utils.ema import requires_grad, update_ema
    del torch
    return vq_model, VQLoss, update_ema, requires_grad


def build_llamagen_model(vq_model, setup: dict):
    from torch import nn

    if setup["model"] == "VQ-16":
        return vq_model.VQ_models["VQ-16"](commit_loss_beta=0.25, entropy_loss_ratio=0.0, dropout_p=0.0,
                                           **setup["model_args"])
    # Its VQModel with the default recipe's channels: ModelArgs set ch_mult, z_channels and the codebook;
    # ch and num_res_blocks are arguments of its Encoder/Decoder classes that VQModel does not pass on.
    a = vq_model.ModelArgs(**setup["model_args"])
    model = vq_model.VQModel(a)
    model.encoder = vq_model.Encoder(ch=setup["ch"], ch_mult=a.encoder_ch_mult, num_res_blocks=setup["num_res_blocks"],
                                     z_channels=a.z_channels, dropout=a.dropout_p)
    model.decoder = vq_model.Decoder(ch=setup["ch"], ch_mult=a.decoder_ch_mult, num_res_blocks=setup["num_res_blocks"],
                                     z_channels=a.z_channels, dropout=a.dropout_p)
    if not setup["level_attention"]:  # the recipe has attention in the middle block only
        for net in (model.encoder, model.decoder):
            for block in net.conv_blocks:
                block.attn = nn.ModuleList()  # its forward skips a level's attention when the list is empty
    return model


def as_after_a_device_copy(model) -> None:
    """Its quantizer registers ``codebook_used`` as a buffer holding an ``nn.Parameter`` (requires_grad)
    and writes it in place every step. ``.to("cuda")`` turns that into a non-leaf copy, which may be
    written in place (autograd records the writes); on the CPU ``.to`` is a no-op and the in-place write
    on a leaf fails. A clone gives the CPU run the state its CUDA training has."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.requires_grad and buf.is_leaf:
                module._buffers[name] = buf.clone()


def run_llamagen(case: str, size: int, args) -> dict:
    import torch

    setup = llamagen_setup(case, size, args.device)
    if "skip" in setup:
        return {"skipped": setup["skip"]}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # as vq_train.py
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    vq_model_module, VQLoss, update_ema, requires_grad = import_llamagen(args.llamagen)
    mark_memory_baseline()
    device = torch.device(args.device)
    batch = batch_size(case, args)
    from copy import deepcopy

    vq_model = build_llamagen_model(vq_model_module, setup)
    ema = deepcopy(vq_model).to(device)
    requires_grad(ema, False)
    vq_model = vq_model.to(device)
    for net in (vq_model, ema):
        as_after_a_device_copy(net)
    vq_loss = VQLoss(disc_start=0, disc_type="patchgan", disc_loss="hinge", gen_adv_loss="hinge", image_size=size,
                     perceptual_weight=1.0, reconstruction_weight=1.0, codebook_weight=1.0, **setup["loss"]).to(device)
    generator_params, discriminator_params = count_params(vq_model), count_params(vq_loss.discriminator)
    scaler = torch.amp.GradScaler(args.device, enabled=False)  # its scalers are on for fp16 only
    scaler_disc = torch.amp.GradScaler(args.device, enabled=False)
    optimizer = torch.optim.Adam(vq_model.parameters(), lr=setup["lr"], betas=setup["betas"])
    optimizer_disc = torch.optim.Adam(vq_loss.discriminator.parameters(), lr=setup["lr"], betas=setup["betas"])
    update_ema(ema, vq_model, decay=0)
    if args.compile:
        vq_model = torch.compile(vq_model)
    inner = vq_model._orig_mod if args.compile else vq_model
    vq_model.train()
    ema.eval()
    vq_loss.train()
    ptdtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    max_grad_norm = setup["grad_clip"]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device) for _ in range(4)]

    def train_step(imgs, step):
        optimizer.zero_grad()
        with torch.autocast(args.device, dtype=ptdtype, enabled=args.precision == "bf16"):
            recons_imgs, codebook_loss = vq_model(imgs)
            loss_gen = vq_loss(codebook_loss, imgs, recons_imgs, optimizer_idx=0, global_step=step + 1,
                               last_layer=inner.decoder.last_layer, logger=None, log_every=10**9)
        scaler.scale(loss_gen).backward()
        if max_grad_norm != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(vq_model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, inner, decay=setup["ema_decay"])
        optimizer_disc.zero_grad()
        with torch.autocast(args.device, dtype=ptdtype, enabled=args.precision == "bf16"):
            loss_disc = vq_loss(codebook_loss, imgs, recons_imgs, optimizer_idx=1, global_step=step + 1,
                                logger=None, log_every=10**9)
        scaler_disc.scale(loss_disc).backward()
        if max_grad_norm != 0.0:
            scaler_disc.unscale_(optimizer_disc)
            torch.nn.utils.clip_grad_norm_(vq_loss.discriminator.parameters(), max_grad_norm)
        scaler_disc.step(optimizer_disc)
        scaler_disc.update()
        return loss_gen.item() + loss_disc.item()  # its running loss

    times = []
    for step in range(args.warmup + args.steps):
        imgs = batches[step % len(batches)]
        sync(args.device)
        t0 = time.perf_counter()
        train_step(imgs, step)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    flops = None
    if counts_flops(args):
        counter = FlopCount()
        counter.start()
        train_step(batches[0], args.warmup + args.steps)
        counter.stop()
        flops = counter.total
    out = step_result(times, batch, args, flops)
    out.update(generator_params=generator_params, discriminator_params=discriminator_params, batch_size=batch,
               threads=torch.get_num_threads(), build=setup["model"] if setup["model"] != "custom" else
               "VQModel(ModelArgs) with Encoder/Decoder(ch=32, num_res_blocks=1), level attention removed")
    return out
