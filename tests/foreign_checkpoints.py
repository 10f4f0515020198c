"""Small random checkpoints in other projects' own key layouts (taming-transformers' VQGAN, LlamaGen's
VQ), shared by the converter tests: the real parameter names and shapes, small widths."""

from __future__ import annotations

import torch

CH, CH_MULT, BLOCKS, Z, K, DIM = 32, [1, 2], 1, 32, 64, 8


class StateBuilder:
    """Random tensors under the original projects' parameter names."""

    def __init__(self) -> None:
        self.gen, self.state = torch.Generator().manual_seed(0), {}

    def _rand(self, *shape, scale=0.2):
        return torch.randn(*shape, generator=self.gen) * scale

    def conv(self, name, cin, cout, k=3):
        self.state[f"{name}.weight"] = self._rand(cout, cin, k, k, scale=(1 / (cin * k * k)) ** 0.5)
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
