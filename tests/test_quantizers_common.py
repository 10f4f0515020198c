"""Helpers every quantizer family shares (imagetok/quantizers/_utils.py): the index-range check of
``indices_to_latents``, one size for all sub-tokens or one per sub-token, and each family using it."""

from __future__ import annotations

import pytest
import torch

from imagetok.errors import ConfigValueError
from imagetok.quantizers._utils import check_index_range
from imagetok.quantizers.dimwise import DimensionWiseQuantizer
from imagetok.quantizers.fsq import FiniteScalarQuantizer
from imagetok.quantizers.ibq import IndexBackpropQuantizer
from imagetok.quantizers.lfq import LookupFreeQuantizer
from imagetok.quantizers.multiscale import MultiScaleResidualQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.quantizers.simvq import SimVectorQuantizer
from imagetok.quantizers.vq import VectorQuantizer


def test_one_size_for_every_sub_token():
    check_index_range(torch.tensor([[0, 15], [3, 7]]), 16)
    check_index_range(torch.zeros(0, 2, dtype=torch.long), 16)  # nothing to decode is in range
    check_index_range(torch.tensor([[2**62 - 1]]), 2**62)
    for bad, shown in ((torch.tensor([[0, 16]]), "range [0, 16]"), (torch.tensor([[-1, 3]]), "range [-1, 3]")):
        with pytest.raises(ConfigValueError, match=r"^indices=") as err:
            check_index_range(bad, 16)
        assert err.value.value == shown and err.value.allowed == "integers in [0, 16)"
    check_index_range(torch.tensor([[0, 15]]), [16, 16])  # equal sizes: the same one check


def test_one_size_per_sub_token_names_the_sub_token_out_of_range():
    sizes = [4, 1024]
    check_index_range(torch.tensor([[[3, 1023], [0, 5]]]), sizes)
    with pytest.raises(ConfigValueError, match=r"sub-token 0 in range \[3, 5\].*sizes \[4, 1024\]"):
        check_index_range(torch.tensor([[3, 9], [5, 0]]), sizes)  # 5 is fine for sub-token 1, not 0
    with pytest.raises(ConfigValueError, match=r"sub-token 1 in range \[-2, 9\]"):
        check_index_range(torch.tensor([[3, 9], [0, -2]]), sizes)


@pytest.mark.parametrize("quantizer, indices", [
    (VectorQuantizer(dim=4, codebook_size=8), torch.full((1, 2, 2, 1), 8)),
    (FiniteScalarQuantizer(dim=3, levels=[3, 3]), torch.full((1, 2, 2, 1), 9)),
    (LookupFreeQuantizer(dim=8, bits=8, bits_per_token=4), torch.full((1, 2, 2, 2), 16)),
    (MultiScaleResidualQuantizer(dim=4, codebook_size=8, scales=[1, 2]), torch.full((1, 5, 1), 8)),
    (SimVectorQuantizer(dim=4, codebook_size=8), torch.full((1, 2, 2, 1), 8)),
    (IndexBackpropQuantizer(dim=4, codebook_size=8), torch.full((1, 2, 2, 1), -1)),
    (ResidualVectorQuantizer(dim=4, codebook_size=8, depth=2, level_quantizer="simvq"), torch.full((1, 2, 2, 2), 8)),
])
def test_every_family_refuses_out_of_range_indices_in_one_line(quantizer, indices):
    with pytest.raises(ConfigValueError, match=r"^indices=.*integers in \[0, ") as err:
        quantizer.indices_to_latents(indices)
    assert "\n" not in str(err.value)


def test_dimension_wise_bins_are_checked_too():
    q = DimensionWiseQuantizer(dim=4, num_bins=4)
    q.set_bins(q.edges.clone(), q.values.clone())  # fitted (to the provisional bins): decoding allowed
    with pytest.raises(ConfigValueError, match=r"integers in \[0, 4\)"):
        q.indices_to_latents(torch.full((1, 2, 2, 2), 4))
