"""Where a run's weights start (``init_from``) and which of them it keeps fixed (``freeze``).

``init_from`` starts a new run (fresh optimiser, schedule and step count) from another run's tokenizer
weights: TiTok's second stage starts from its first (Yu et al. 2024, https://arxiv.org/abs/2406.07550),
a fine-tune from a published tokenizer. ``freeze`` lists tokenizer parts that get no gradient and stay in
eval mode (so an EMA codebook or k-means step does not move them either).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from imagetok.errors import CheckpointError, ConfigValueError, check
from imagetok.tokenizer import Tokenizer

PARTS = ("encoder", "quant_conv", "quantizer", "post_quant_conv", "decoder")


def load_initial_weights(tokenizer: Tokenizer, path: str) -> int:
    """Copy the tokenizer weights of ``path`` (a training checkpoint, EMA weights, or a ``save_pretrained``
    directory) into ``tokenizer``, which must have the same names and shapes. Returns the tensor count."""
    from imagetok.evaluation.run import load_tokenizer  # lazy: evaluation imports the training callbacks

    try:
        source = load_tokenizer(path, "ema").state_dict()
    except ConfigValueError as err:
        raise ConfigValueError("init_from", path, err.allowed) from None
    target = tokenizer.state_dict()
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    if missing or extra:
        raise CheckpointError(f"init_from={path}: its tokenizer has other parts than this run's "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}); init_from needs the same "
                              "encoder, quantizer and decoder config")
    for name, tensor in source.items():
        if tensor.shape != target[name].shape:
            raise CheckpointError(f"init_from={path}: {name} has shape {tuple(tensor.shape)}, this run's "
                                  f"{tuple(target[name].shape)}; init_from needs the same config")
    tokenizer.load_state_dict(source)
    return len(source)


def freeze_parts(tokenizer: Tokenizer, names: Sequence[str]) -> list[nn.Module]:
    """Turn off gradients of the named tokenizer parts (``encoder``, ``quantizer``, ... or a dotted
    submodule such as ``decoder.pixel_decoder``) and return them, for the training module to keep in eval mode."""
    check(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names), "freeze", names,
          f"a list of tokenizer parts, e.g. [encoder, quant_conv, quantizer]; parts: {list(PARTS)}")
    frozen = []
    for name in names:
        try:
            part = tokenizer.get_submodule(name)
        except AttributeError:
            raise ConfigValueError("freeze", name, f"a tokenizer part ({', '.join(PARTS)}) or a dotted submodule "
                                   "of one, e.g. decoder.pixel_decoder") from None
        part.requires_grad_(False).eval()
        frozen.append(part)
    if frozen and not any(p.requires_grad for p in tokenizer.parameters()):
        raise ConfigValueError("freeze", list(names), "a list that leaves some tokenizer parameters to train")
    return frozen
