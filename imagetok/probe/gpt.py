"""The probe's model: a decoder-only transformer over token positions, trained with next-token
cross-entropy (the pre-norm blocks of ``nets/transformer.py`` under a causal mask).

Sub-tokens (``K > 1`` per position) are modelled in one of two ways:

- ``factorized``: one input embedding per sub-codebook, summed into the position's embedding, and one
  output head per sub-codebook: the ``K`` sub-tokens of a position are predicted together from the
  positions before it (independent given that prefix); the sequence is ``L`` long.
- ``flattened``: the ``K`` sub-tokens become ``K`` consecutive positions of an ``L * K`` sequence over one
  shared vocabulary, sub-codebook ``k``'s codes shifted by ``offset_k = sum_{j<k} V_j``; a sub-token
  then sees the earlier sub-tokens of its own position. Its logits cover its own sub-codebook only.

The first input is a start token: the class embedding (``num_classes`` classes and one null class,
id ``num_classes``, for unconditional sequences) or, without classes, one learned start embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imagetok.errors import check
from imagetok.nets.transformer import Transformer, init_weights

SUBTOKEN_MODES = ("factorized", "flattened")


def sample_from_logits(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``logits`` ``[B, V]`` (float): softmax at ``temperature`` (> 0) over the
    ``top_k`` largest logits (0 = all). Returns LongTensor ``[B]`` in ``[0, V)``."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ProbeGPT(nn.Module):
    """Next-token model of ``[B, L, K]`` token sequences.

    Args:
        codebook_sizes: ``V_k`` per sub-token (``K`` of them).
        positions: ``L``, positions per image.
        subtokens: ``factorized`` or ``flattened`` (see the module docstring).
        num_classes: classes of the class token; None for an unconditional model.
        width / depth / num_heads / mlp_ratio: the transformer (``width`` divisible by ``num_heads``).
    """

    def __init__(self, *, codebook_sizes: list[int], positions: int, subtokens: str = "factorized",
                 num_classes: int | None = None, width: int = 256, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        check(subtokens in SUBTOKEN_MODES, "probe.subtokens", subtokens, f"one of {list(SUBTOKEN_MODES)}")
        check(isinstance(width, int) and width >= 1, "probe_model.width", width, "a positive integer")
        check(isinstance(depth, int) and depth >= 1, "probe_model.depth", depth, "an integer >= 1")
        check(isinstance(num_heads, int) and num_heads >= 1 and width % num_heads == 0, "probe_model.num_heads",
              num_heads, f"a positive divisor of probe_model.width={width}")
        self.codebook_sizes, self.positions, self.subtokens = [int(v) for v in codebook_sizes], positions, subtokens
        self.num_classes = num_classes
        K = len(self.codebook_sizes)
        self.sequence_length = positions * K if subtokens == "flattened" else positions
        if subtokens == "flattened":
            offsets = torch.tensor([0, *self.codebook_sizes[:-1]]).cumsum(0)
            self.register_buffer("offsets", offsets, persistent=False)  # [K]
            self.embed = nn.Embedding(sum(self.codebook_sizes), width)
            self.head = nn.Linear(width, sum(self.codebook_sizes))
        else:
            self.embeds = nn.ModuleList(nn.Embedding(v, width) for v in self.codebook_sizes)
            self.heads = nn.ModuleList(nn.Linear(width, v) for v in self.codebook_sizes)
        self.start_token = nn.Embedding(num_classes + 1 if num_classes else 1, width)
        self.positions_table = nn.Parameter(torch.zeros(self.sequence_length, width))
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)
        causal = torch.ones(self.sequence_length, self.sequence_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)
        init_weights(self)
        with torch.no_grad():
            self.positions_table.normal_(0.0, width**-0.5)
            for table in [self.start_token, *([self.embed] if subtokens == "flattened" else self.embeds)]:
                table.weight.normal_(0.0, width**-0.5)

    @property
    def null_class(self) -> int:
        """Start-token id of an unconditional sequence (the only one without classes)."""
        return self.num_classes or 0

    def _hidden(self, units: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, 1 + n, width]`` of the start token followed by the first ``n`` units:
        ``units`` ``[B, n, K]`` codes (factorized) or ``[B, n]`` shared-vocabulary ids (flattened);
        ``start`` ``[B]`` start-token ids. Output ``i`` predicts unit ``i``."""
        if self.subtokens == "flattened":
            body = self.embed(units)
        else:
            body = sum(embed(units[..., k]) for k, embed in enumerate(self.embeds))
            if units.shape[1] == 0:
                body = units.new_zeros(units.shape[0], 0, self.start_token.embedding_dim, dtype=self.start_token.weight.dtype)
        x = torch.cat([self.start_token(start)[:, None], body], dim=1)
        n = x.shape[1]
        x = x + self.positions_table[:n].to(x.dtype)
        return self.transformer(x, mask=self.causal_mask[:n, :n])

    def _flat_ids(self, sequence: torch.Tensor) -> torch.Tensor:
        """``[B, L, K]`` codes -> ``[B, L * K]`` shared-vocabulary ids."""
        return (sequence + self.offsets).flatten(1)

    def _subcodebook_logits(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Flattened mode: logits over sub-codebook ``k``'s own ``V_k`` codes, ``[..., V_k]``."""
        start, size = int(self.offsets[k]), self.codebook_sizes[k]
        return F.linear(hidden, self.head.weight[start : start + size], self.head.bias[start : start + size])

    def forward(self, sequence: torch.Tensor, start: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits: ``sequence`` ``[B, L, K]`` codes, ``start`` ``[B]`` start-token ids ->
        ``K`` tensors ``[B, L, V_k]``, entry ``[b, t]`` of tensor ``k`` predicting ``sequence[b, t, k]``."""
        K = len(self.codebook_sizes)
        if self.subtokens == "flattened":
            hidden = self._hidden(self._flat_ids(sequence)[:, :-1], start)  # [B, L * K, width]
            return [self._subcodebook_logits(hidden[:, k::K], k) for k in range(K)]
        hidden = self._hidden(sequence[:, :-1], start)  # [B, L, width]
        return [head(hidden) for head in self.heads]

    def nll(self, sequence: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats of every sub-token, float32 ``[B, L, K]`` (>= 0)."""
        logits = self(sequence, start)
        return torch.stack([F.cross_entropy(z.float().flatten(0, 1), sequence[..., k].flatten(), reduction="none")
                            .view(sequence.shape[:2]) for k, z in enumerate(logits)], dim=-1)

    @torch.no_grad()
    def sample(self, start: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Draw sequences ``[B, L, K]`` (LongTensor, codes in ``[0, V_k)``) for start-token ids ``start``
        ``[B]``, one unit at a time (no key/value cache: each step reruns the prefix, which is fine for
        the probe's short sequences)."""
        B, K, device = start.shape[0], len(self.codebook_sizes), start.device
        steps = tqdm(range(self.sequence_length), desc="sample", unit="tok", leave=False, disable=not progress)
        if self.subtokens == "flattened":
            ids = torch.zeros(B, 0, dtype=torch.long, device=device)
            for s in steps:
                k = s % K
                last = self._hidden(ids, start)[:, -1]
                code = sample_from_logits(self._subcodebook_logits(last, k), temperature, top_k, generator)
                ids = torch.cat([ids, (code + self.offsets[k])[:, None]], dim=1)
            return (ids.view(B, self.positions, K) - self.offsets)
        codes = torch.zeros(B, 0, K, dtype=torch.long, device=device)
        for _ in steps:
            last = self._hidden(codes, start)[:, -1]
            step = torch.stack([sample_from_logits(head(last), temperature, top_k, generator) for head in self.heads], -1)
            codes = torch.cat([codes, step[:, None]], dim=1)
        return codes
