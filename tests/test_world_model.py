"""The mini model's builder: seeded, and the token-table scale touches nothing else."""
import torch

from perfusion.world import model as mini


def test_build_is_seeded_and_token_scale_only_scales_the_token_table():
    (_, plain), (_, scaled) = mini.build(3), mini.build(3, token_scale=10.0)
    a, b = plain.state_dict(), scaled.state_dict()
    table = "embeddings.token_embedding.weight"
    torch.testing.assert_close(b[table], a[table] * 10)
    assert all(torch.equal(a[k], b[k]) for k in a if k != table)
    assert not torch.equal(mini.build(4)[1].state_dict()[table], a[table])
