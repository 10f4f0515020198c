"""Small random checkpoints in other projects' own key layouts (taming-transformers' VQGAN, LlamaGen's
VQ, FoundationVision VAR's VQVAE, SEED-Voken's Open-MAGVIT2 and IBQ, diffusers' VQModel directories,
bytedance 1d-tokenizer's TiTok), shared by the converter tests: the real parameter names and shapes, small widths."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from imagetok import Tokenizer

CH, CH_MULT, BLOCKS, Z, K, DIM = 32, [1, 2], 1, 32, 64, 8


class StateBuilder:
    """Random tensors under the original projects' parameter names."""

    def __init__(self) -> None:
        self.gen, self.state = torch.Generator().manual_seed(0), {}

    def _rand(self, *shape, scale=0.2):
        return torch.randn(*shape, generator=self.gen) * scale

    def conv(self, name, cin, cout, k=3, bias=True):
        self.state[f"{name}.weight"] = self._rand(cout, cin, k, k, scale=(1 / (cin * k * k)) ** 0.5)
        if bias:
            self.state[f"{name}.bias"] = self._rand(cout, scale=0.05)

    def linear(self, name, cin, cout):
        self.state[f"{name}.weight"] = self._rand(cout, cin, scale=cin**-0.5)
        self.state[f"{name}.bias"] = self._rand(cout, scale=0.05)

    def norm(self, name, c):
        self.state[f"{name}.weight"], self.state[f"{name}.bias"] = 1 + self._rand(c, scale=0.1), self._rand(c, scale=0.1)

    def res(self, p, cin, cout):
        self.norm(f"{p}.norm1", cin), self.conv(f"{p}.conv1", cin, cout), self.norm(f"{p}.norm2", cout)
        self.conv(f"{p}.conv2", cout, cout)
        if cin != cout:
            self.conv(f"{p}.nin_shortcut", cin, cout, 1)

    def attn(self, p, c):
        self.norm(f"{p}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            self.conv(f"{p}.{n}", c, c, 1)


def taming_state(attn_levels=(1,)) -> dict:
    b, n = StateBuilder(), len(CH_MULT)
    b.conv("encoder.conv_in", 3, CH)
    block_in = CH
    for i, m in enumerate(CH_MULT):
        for j in range(BLOCKS):
            b.res(f"encoder.down.{i}.block.{j}", block_in, CH * m)
            block_in = CH * m
            if i in attn_levels:
                b.attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != n - 1:
            b.conv(f"encoder.down.{i}.downsample.conv", block_in, block_in)
    for pre in ("encoder", "decoder"):
        b.res(f"{pre}.mid.block_1", block_in, block_in), b.attn(f"{pre}.mid.attn_1", block_in)
        b.res(f"{pre}.mid.block_2", block_in, block_in)
    b.norm("encoder.norm_out", block_in), b.conv("encoder.conv_out", block_in, Z)
    b.conv("quant_conv", Z, DIM, 1), b.conv("post_quant_conv", DIM, Z, 1)
    b.state["quantize.embedding.weight"] = b._rand(K, DIM, scale=1.0)
    b.conv("decoder.conv_in", Z, block_in)
    for i in reversed(range(n)):
        for j in range(BLOCKS + 1):
            b.res(f"decoder.up.{i}.block.{j}", block_in, CH * CH_MULT[i])
            block_in = CH * CH_MULT[i]
            if i in attn_levels:
                b.attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            b.conv(f"decoder.up.{i}.upsample.conv", block_in, block_in)
    b.norm("decoder.norm_out", block_in), b.conv("decoder.conv_out", block_in, 3)
    b.state["loss.discriminator.main.0.weight"] = b._rand(4, 3, 4, 4)  # ignored by the converter
    return b.state


def llamagen_state() -> dict:
    b, n = StateBuilder(), len(CH_MULT)
    b.conv("encoder.conv_in", 3, CH)
    block_in = CH
    for i, m in enumerate(CH_MULT):
        for j in range(BLOCKS):
            b.res(f"encoder.conv_blocks.{i}.res.{j}", block_in, CH * m)
            block_in = CH * m
            if i == n - 1:
                b.attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != n - 1:
            b.conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in)
    for pre in ("encoder", "decoder"):
        b.res(f"{pre}.mid.0", block_in, block_in), b.attn(f"{pre}.mid.1", block_in), b.res(f"{pre}.mid.2", block_in, block_in)
    b.norm("encoder.norm_out", block_in), b.conv("encoder.conv_out", block_in, Z)
    b.conv("quant_conv", Z, DIM, 1), b.conv("post_quant_conv", DIM, Z, 1)
    # stored unnormalised (LlamaGen normalises at lookup): the converted lookup must normalise too
    b.state["quantize.embedding.weight"] = b._rand(K, DIM, scale=1.0) * torch.rand(K, 1, generator=b.gen) * 3
    b.state["quantize.codebook_used"] = torch.zeros(65536)
    b.conv("decoder.conv_in", Z, block_in)
    for idx, i in enumerate(reversed(range(n))):  # LlamaGen: lowest resolution first
        for j in range(BLOCKS + 1):
            b.res(f"decoder.conv_blocks.{idx}.res.{j}", block_in, CH * CH_MULT[i])
            block_in = CH * CH_MULT[i]
            if i == n - 1:
                b.attn(f"decoder.conv_blocks.{idx}.attn.{j}", block_in)
        if i != 0:
            b.conv(f"decoder.conv_blocks.{idx}.upsample.conv", block_in, block_in)
    b.norm("decoder.norm_out", block_in), b.conv("decoder.conv_out", block_in, 3)
    return b.state


VAR_CODES, VAR_DIM = 64, 8


def var_tokenizer(scales=(1, 2, 4, 8), num_refiners=4, ch_mult=(1, 2), seed=0) -> Tokenizer:
    """A small VAR-shaped tokenizer: attention at the lowest level and in the middle, 3x3 quant convs."""
    torch.manual_seed(seed)
    lowest = 256 // 2 ** (len(ch_mult) - 1)
    net = {"ch": 16, "ch_mult": list(ch_mult), "num_res_blocks": 1, "attn_resolutions": [lowest], "z_channels": VAR_DIM}
    tok = Tokenizer.from_config({
        "encoder": {"_target_": "imagetok.nets.cnn.Encoder", **net},
        "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **net},
        "quantizer": {"_target_": "imagetok.quantizers.multiscale.MultiScaleResidualQuantizer", "dim": VAR_DIM,
                      "codebook_size": VAR_CODES, "scales": list(scales), "num_refiners": num_refiners},
        "quant_conv_kernel_size": 3,
    })
    with torch.no_grad():  # non-trivial norms and codes at the latents' scale, so a wrong mapping shows
        for name, p in tok.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        tok.quantizer.vq.codebook.normal_(0, 0.3)
    return tok.eval()


def var_state(tok: Tokenizer, phi_layout: str = "qresi_ls") -> dict[str, torch.Tensor]:
    """``tok``'s weights under VAR's names (the inverse of ``convert_var``'s mapping)."""
    state, out = tok.state_dict(), {}
    for key, value in state.items():
        if key.startswith("quantizer."):
            continue
        if ".attn" in key and key.rsplit(".", 2)[-2] in ("k", "v"):
            continue
        if ".attn" in key and key.rsplit(".", 2)[-2] == "q":
            prefix, leaf = key.rsplit(".", 2)[0], key.rsplit(".", 1)[-1]
            out[f"{prefix}.qkv.{leaf}"] = torch.cat([state[f"{prefix}.{n}.{leaf}"] for n in "qkv"]).clone()
            continue
        out[key] = value.clone()
    out["quantize.embedding.weight"] = state["quantizer.vq.codebook"].clone()
    out["quantize.ema_vocab_hit_SV"] = torch.zeros(len(tok.quantizer.scales), VAR_CODES)
    for key, value in state.items():
        if key.startswith("quantizer.refiners."):
            j, leaf = key.split(".")[2:]
            where = {"qresi_ls": f"qresi_ls.{j}", "per_scale": j, "shared": "qresi"}[phi_layout]
            out[f"quantize.quant_resi.{where}.{leaf}"] = value.clone()
    return out


MAGVIT2_BITS = 6
MAGVIT2_NETS = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": MAGVIT2_BITS}


def _randomize_magvit2(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.02))


def _with_ema(state: dict, seed: int = 5) -> dict:
    """``state`` plus LitEma shadows of its tokenizer tensors, each a little different from the raw one."""
    gen = torch.Generator().manual_seed(seed)
    shadows = {f"model_ema.{k.replace('.', '')}": v + 0.01 * torch.randn(v.shape, generator=gen)
               for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant", "post_quant"))}
    return {**state, **shadows, "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(-1)}


@functools.cache  # read-only in the tests: converting never modifies a checkpoint
def lfq_checkpoint() -> dict:
    """A Lightning ``{"state_dict": ...}`` in Open-MAGVIT2's layout (``lfqgan.VQModel``: no quant_conv,
    a parameter-free LFQ, ``decoder.up.i.upsample.conv1``, loss tensors)."""
    torch.manual_seed(0)
    source = Tokenizer.from_config({
        "encoder": {"_target_": "imagetok.nets.magvit2.Magvit2Encoder", **MAGVIT2_NETS},
        "decoder": {"_target_": "imagetok.nets.magvit2.Magvit2Decoder", **MAGVIT2_NETS},
        "quantizer": {"_target_": "imagetok.quantizers.lfq.LookupFreeQuantizer", "dim": MAGVIT2_BITS}})
    _randomize_magvit2(source, 1)
    state = {k.replace(".upsample.conv.", ".upsample.conv1."): v for k, v in source.state_dict().items()
             if k.startswith(("encoder.", "decoder."))}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    return {"state_dict": _with_ema(state), "epoch": 3, "global_step": 100}


def ibq_checkpoint(ema: bool = True) -> dict:
    state = taming_state()  # taming's nets and quant convs, 64 codes of 8 dims
    return {"state_dict": _with_ema(state) if ema else state}


# --- diffusers VQModel: a directory as ModelMixin.save_pretrained writes it ------------------------------
DIFFUSERS_SMALL = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 6, "vq_embed_dim": 8,
                   "num_vq_embeddings": 64, "norm_num_groups": 8, "mid_block_add_attention": True,
                   "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}
# MoVQ-style: spatial norms in the decoder, the quantized latent as wide as the encoder's
DIFFUSERS_SPATIAL = {**DIFFUSERS_SMALL, "latent_channels": 4, "vq_embed_dim": 4, "norm_type": "spatial"}


class DiffusersStateBuilder(StateBuilder):
    """Random tensors under diffusers' names: ``conv_shortcut``, linear attention ``to_q/k/v/to_out.0``
    with ``group_norm`` (or ``spatial_norm``), SpatialNorm's ``norm_layer/conv_y/conv_b``."""

    def __init__(self, zq_channels: int | None = None) -> None:
        super().__init__()
        self.zq = zq_channels

    def linear(self, name, cin, cout):
        self.state[f"{name}.weight"] = self._rand(cout, cin, scale=(1 / cin) ** 0.5)
        self.state[f"{name}.bias"] = self._rand(cout, scale=0.05)

    def any_norm(self, name, c, spatial):
        if not spatial:
            return self.norm(name, c)
        self.norm(f"{name}.norm_layer", c)
        self.conv(f"{name}.conv_y", self.zq, c, 1), self.conv(f"{name}.conv_b", self.zq, c, 1)
        self.state[f"{name}.conv_y.bias"] += 1  # a scale around 1, as a trained MoVQ's

    def res(self, p, cin, cout, spatial=False):
        self.any_norm(f"{p}.norm1", cin, spatial), self.conv(f"{p}.conv1", cin, cout)
        self.any_norm(f"{p}.norm2", cout, spatial), self.conv(f"{p}.conv2", cout, cout)
        if cin != cout:
            self.conv(f"{p}.conv_shortcut", cin, cout, 1)

    def attn(self, p, c, spatial=False):
        self.any_norm(f"{p}.spatial_norm" if spatial else f"{p}.group_norm", c, spatial)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            self.linear(f"{p}.{n}", c, c)


def diffusers_vq_state(config: dict = DIFFUSERS_SMALL) -> dict[str, torch.Tensor]:
    """A ``VQModel(**config)``'s tensors under diffusers' names (config keys as ``VQModel`` takes them)."""
    widths, blocks = config["block_out_channels"], config["layers_per_block"]
    latent, dim = config["latent_channels"], config.get("vq_embed_dim") or config["latent_channels"]
    spatial, n = config.get("norm_type", "group") == "spatial", len(widths)
    b = DiffusersStateBuilder(zq_channels=dim)
    b.conv("encoder.conv_in", 3, widths[0])
    out = widths[0]
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(blocks):
            b.res(f"encoder.down_blocks.{i}.resnets.{j}", out if j == 0 else widths[i], widths[i])
            if kind.startswith("Attn"):
                b.attn(f"encoder.down_blocks.{i}.attentions.{j}", widths[i])
        out = widths[i]
        if i != n - 1:
            b.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", out, out)
    for pre, cond in (("encoder", False), ("decoder", spatial)):
        b.res(f"{pre}.mid_block.resnets.0", out, out, cond)
        if config.get("mid_block_add_attention", True):
            b.attn(f"{pre}.mid_block.attentions.0", out, cond)
        b.res(f"{pre}.mid_block.resnets.1", out, out, cond)
    b.norm("encoder.conv_norm_out", out), b.conv("encoder.conv_out", out, latent)
    b.conv("quant_conv", latent, dim, 1), b.conv("post_quant_conv", dim, latent, 1)
    b.state["quantize.embedding.weight"] = b._rand(config["num_vq_embeddings"], dim, scale=0.3)
    b.conv("decoder.conv_in", latent, widths[-1])
    for k, kind in enumerate(config["up_block_types"]):  # lowest resolution first
        width = widths[n - 1 - k]
        for j in range(blocks + 1):
            b.res(f"decoder.up_blocks.{k}.resnets.{j}", out if j == 0 else width, width, spatial)
            if kind.startswith("Attn"):
                b.attn(f"decoder.up_blocks.{k}.attentions.{j}", width, spatial)
        out = width
        if k != n - 1:
            b.conv(f"decoder.up_blocks.{k}.upsamplers.0.conv", out, out)
    b.any_norm("decoder.conv_norm_out", out, spatial), b.conv("decoder.conv_out", out, 3)
    return b.state


def diffusers_vq_directory(path: Path, config: dict = DIFFUSERS_SMALL, **overrides) -> Path:
    """``path`` made a diffusers model directory: ``config.json`` (with ``_class_name``, as
    ``save_pretrained`` writes it; ``overrides`` change only the file) + ``diffusion_pytorch_model.safetensors``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    written = {"_class_name": "VQModel", "_diffusers_version": "0.42.1", "act_fn": "silu", "in_channels": 3,
               "out_channels": 3, "norm_type": "group", "scaling_factor": 0.18215, "force_upcast": False,
               "lookup_from_codebook": False, "sample_size": 32, **config, **overrides}
    (path / "config.json").write_text(json.dumps(written, indent=2))
    save_file(diffusers_vq_state(config), path / "diffusion_pytorch_model.safetensors")
    return path


# TiTok (bytedance/1d-tokenizer modeling/titok.py): widths multiples of TiTok's 64-wide heads, 16x16 images
TITOK = {"width": 64, "depth": 2, "patch": 4, "resolution": 16, "tokens": 4, "token_size": 4, "codes": 16,
         "pixel_codes": 16, "pixel_dim": 8, "pixel_ch": 32, "pixel_mult": [1, 2, 2]}


def _titok_vit(b: StateBuilder, part: str, width: int, depth: int, grid: int, tokens: int) -> None:
    """TiTokEncoder / TiTokDecoder's shared tensors: class token, positions, ln_pre/ln_post, CLIP blocks."""
    scale = width**-0.5
    b.state[f"{part}.class_embedding"] = b._rand(1, width, scale=scale)
    b.state[f"{part}.positional_embedding"] = b._rand(grid * grid + 1, width, scale=scale)
    b.state[f"{part}.latent_token_positional_embedding"] = b._rand(tokens, width, scale=scale)
    b.norm(f"{part}.ln_pre", width), b.norm(f"{part}.ln_post", width)
    for i in range(depth):
        p = f"{part}.transformer.{i}"
        b.norm(f"{p}.ln_1", width), b.norm(f"{p}.ln_2", width)
        b.state[f"{p}.attn.in_proj_weight"] = b._rand(3 * width, width, scale=scale)
        b.state[f"{p}.attn.in_proj_bias"] = b._rand(3 * width, scale=0.05)
        b.linear(f"{p}.attn.out_proj", width, width)
        b.linear(f"{p}.mlp.c_fc", width, 4 * width), b.linear(f"{p}.mlp.c_proj", 4 * width, width)


def _maskgit_decoder(b: StateBuilder, p: str, ch: int, mult: list[int], z: int) -> None:
    """MaskGIT-VQGAN's decoder (modeling/modules/maskgit_vqgan.py), one residual block per level."""
    widths = [ch * m for m in mult]

    def res(q, cin, cout):
        b.norm(f"{q}.norm1", cin), b.conv(f"{q}.conv1", cin, cout, bias=False), b.norm(f"{q}.norm2", cout)
        b.conv(f"{q}.conv2", cout, cout, bias=False)
        if cin != cout:
            b.conv(f"{q}.nin_shortcut", cout, cout, 1, bias=False)

    b.conv(f"{p}.conv_in", z, widths[-1])
    res(f"{p}.mid.0", widths[-1], widths[-1])
    for i in range(len(mult)):
        res(f"{p}.up.{i}.block.0", widths[min(i + 1, len(mult) - 1)], widths[i])
        if i > 0:
            b.conv(f"{p}.up.{i}.upsample_conv", widths[i], widths[i])
    b.norm(f"{p}.norm_out", widths[0]), b.conv(f"{p}.conv_out", widths[0], 3)


@functools.cache  # read-only in the tests
def titok_state(kind: str = "proxy") -> dict:
    """A bare TiTok state dict as released (``torch.save(model.state_dict())``). ``kind``: ``proxy`` (the
    VQ-4096 releases: ``is_legacy``, decoder logits over MaskGIT-VQGAN's codes + ``pixel_decoder``),
    ``pixels`` (the VQ-8k releases: pixel head), ``vae`` (continuous tokens), ``stage1`` (proxy logits, no
    pixel decoder), ``tatitok`` (a text-conditioned decoder)."""
    t, b = TITOK, StateBuilder()
    w, grid, n = t["width"], t["resolution"] // t["patch"], t["tokens"]
    b.state["latent_tokens"] = b._rand(n, w, scale=w**-0.5)
    b.conv("encoder.patch_embed", 3, w, t["patch"])
    _titok_vit(b, "encoder", w, t["depth"], grid, n)
    token_out = 2 * t["token_size"] if kind == "vae" else t["token_size"]
    b.conv("encoder.conv_out", w, token_out, 1)
    if kind != "vae":
        b.state["quantize.embedding.weight"] = b._rand(t["codes"], t["token_size"], scale=1.0)
    b.linear("decoder.decoder_embed", t["token_size"], w)
    b.state["decoder.mask_token"] = b._rand(1, 1, w, scale=w**-0.5)
    _titok_vit(b, "decoder", w, 1, grid, n)
    if kind in ("proxy", "stage1", "tatitok"):
        b.conv("decoder.ffn.0", w, 2 * w, 1), b.conv("decoder.ffn.2", 2 * w, t["pixel_codes"], 1)
    else:
        b.conv("decoder.ffn.0", w, t["patch"] ** 2 * 3, 1), b.conv("decoder.conv_out", 3, 3)
    if kind in ("proxy", "tatitok"):
        b.state["pixel_quantize.embedding.weight"] = b._rand(t["pixel_codes"], t["pixel_dim"], scale=1.0)
        _maskgit_decoder(b, "pixel_decoder", t["pixel_ch"], t["pixel_mult"], t["pixel_dim"])
    if kind == "tatitok":
        b.linear("decoder.text_guidance_proj", 16, w)
    return b.state
