"""M-RoPE positions of our sequences against transformers' own computation (get_rope_index), not
against our Preprocessor: the fast and reference backends share it, so only an independent
computation can catch a wrong axis or offset in image positions."""
import pytest
import torch

from conftest import random_image
from rematch_fast import Item


def _hf_positions(model, seq):
    """transformers' positions for our token ids: [3, L]."""
    hf = model.backend.model.model
    ids = seq.input_ids[None]
    types = (ids == model.checkpoint.special_tokens.image).int()
    grids = seq.grid_thw if seq.grid_thw.shape[0] else None
    positions, _ = hf.get_rope_index(ids, types, image_grid_thw=grids, attention_mask=torch.ones_like(ids))
    return positions[:, 0]


@pytest.mark.parametrize("sizes", [[(97, 213)], [(28, 28)], [(300, 40), (56, 120)], [(140, 140), (29, 451), (64, 64)]])
def test_match_and_embed_positions_equal_transformers(model, sizes):
    """Several grids, several images per sequence (a query image and a document image)."""
    pre = model.preprocessor
    images = [random_image(w, h, seed=w + h) for w, h in sizes]
    query = model.prepare(Item(text="a query", image=images[0]))
    doc = model.prepare(Item(text="a document", image=images[-1]) if len(images) > 1 else "a document")
    seqs = [pre.embed_sequence(query, "query", model.head.query_tokens), pre.match_sequence(query, doc)]
    for seq in seqs:
        assert torch.equal(seq.positions, _hf_positions(model, seq))
    # the shared-prefix split keeps the full sequence's positions
    prefix, start = pre.match_prefix(query)
    suffix = pre.match_suffix(doc, start)
    assert torch.equal(torch.cat([prefix.positions, suffix.positions], dim=1), seqs[1].positions)
