"""``from=var``: checkpoints in FoundationVision VAR's VQVAE key layout (written here from an imagetok
tokenizer through the inverse of the converter's mapping: fused ``qkv`` attention, ``quantize.*`` names,
three phi-sharing layouts) convert back into the same tokenizer; other files are refused in one line.
The comparison with VAR's own code is ``benchmarks/verify_converters.py --var``."""

from __future__ import annotations

import sys

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread on 2 shared cores mostly waits

from foreign_checkpoints import VAR_CODES as CODES
from foreign_checkpoints import VAR_DIM as DIM
from foreign_checkpoints import llamagen_state, taming_state, var_state
from foreign_checkpoints import var_tokenizer as _tokenizer
from imagetok import Tokenizer
from imagetok.errors import CheckpointError
from imagetok.export.converters.var import VAR_SCALES, convert_var, looks_like_var


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("phi_layout, num_refiners", [("qresi_ls", 4), ("per_scale", 4), ("shared", 1)])
def test_var_layout_converts_back_to_the_same_tokenizer(phi_layout, num_refiners):
    original = _tokenizer(num_refiners=num_refiners)
    state = var_state(original, phi_layout)
    assert looks_like_var(state) and "encoder.mid.attn_1.qkv.weight" in state
    tok = convert_var(state, scales=(1, 2, 4, 8))
    assert tok.config["quant_conv_kernel_size"] == 3 and tok.quant_conv.weight.shape[-1] == 3
    assert tok.config["quantizer"]["num_refiners"] == num_refiners
    x = _images(16)
    with torch.no_grad():
        (recon, out), (expected_recon, expected) = tok(x), original(x)
        ids = out.indices
        assert ids.shape == (2, 1 + 4 + 16 + 64, 1) and tok.token_shape(16) == (85, 1)
        assert torch.equal(ids, expected.indices) and torch.equal(recon, expected_recon)
        assert [m.shape[1:] for m in tok.quantizer.scale_maps(ids)] == [(s, s) for s in (1, 2, 4, 8)]
        latents = tok.indices_to_latents(ids)
        assert latents.shape == (2, DIM, 8, 8) and torch.equal(latents, out.z_q)
        assert torch.equal(tok.decode(ids), recon)  # decode(encode(x)) is the forward's reconstruction
        coarse = tok.indices_to_latents(ids[:, :5])  # a prefix of whole scales decodes to a coarser latent
        assert coarse.shape == latents.shape and not torch.equal(coarse, latents)
        # a .double() quantizer stays float64 (what the comparison with VAR's code in float64 relies on)
        double = tok.quantizer.double().indices_to_latents(ids)
        assert double.dtype == torch.float64 and (double.float() - latents).abs().max() < 1e-5


def test_published_schedule_is_the_default_and_gives_680_tokens_at_256():
    small_nets_f16 = _tokenizer(scales=VAR_SCALES, ch_mult=(1, 1, 2, 2, 4))  # VAR's downsampling by 16
    tok = convert_var(var_state(small_nets_f16))
    assert tok.config["quantizer"]["scales"] == list(VAR_SCALES) and tok.quantizer.refine_ratio == 0.5
    assert tok.token_shape(256) == (680, 1) and tok.codebook_sizes == [CODES] and tok.downsample_factor == 16


def test_wrong_number_of_scales_and_foreign_layouts_are_checkpoint_errors():
    state = var_state(_tokenizer())  # 4 scales' hit statistics
    with pytest.raises(CheckpointError, match="trained with 4 scales"):
        convert_var(state)
    for foreign in ({"model": llamagen_state()}, {"state_dict": taming_state()}, {"w": torch.zeros(1)}):
        assert not looks_like_var(foreign)
        with pytest.raises(CheckpointError, match="not a VAR VQVAE checkpoint"):
            convert_var(foreign)
    broken = dict(state)
    del broken["decoder.conv_out.weight"]
    with pytest.raises(CheckpointError, match="does not fit") as err:
        convert_var(broken, scales=(1, 2, 4, 8))
    assert "\n" not in str(err.value)


def _export_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """``python export.py <args>`` in-process (the console script's Hydra parsing and error handling)."""
    from imagetok.cli import export

    monkeypatch.setattr(sys, "argv", ["export", *args])
    code = 0
    try:
        export.main()
    except SystemExit as exited:
        code = exited.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_converts_var_and_refuses_other_files_in_one_line(tmp_path, monkeypatch, capsys):
    original = _tokenizer(scales=VAR_SCALES)  # f=2: 32 px images give VAR's 16x16 latent
    torch.save(var_state(original), tmp_path / "vae_ch32v64z8.pth")
    out = tmp_path / "out"
    code, _ = _export_main(monkeypatch, capsys, ["from=var", f"checkpoint={tmp_path / 'vae_ch32v64z8.pth'}", f"out={out}"])
    assert code == 0
    tok = Tokenizer.from_pretrained(out)
    x = _images(32, batch=1)
    assert tok.token_shape(32) == (680, 1) and torch.equal(tok.encode(x), original.encode(x))
    assert "converted from the var checkpoint" in (out / "README.md").read_text()

    torch.save({"model": llamagen_state()}, tmp_path / "vq_ds16_c2i.pt")
    (tmp_path / "notes.pth").write_text("hello\n")
    for bad, says in (("vq_ds16_c2i.pt", "is not a var checkpoint (from=var needs"),
                      ("notes.pth", "is not a readable checkpoint")):
        code, output = _export_main(monkeypatch, capsys, ["from=var", f"checkpoint={tmp_path / bad}", f"out={tmp_path / 'o'}"])
        lines = [line for line in output.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and says in lines[0], output
        assert "Traceback" not in output
