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


def test_world2_run_resumes_from_a_carried_checkpoint_and_exports(tmp_path, monkeypatch):
    import shutil

    from perfusion.world import train_model

    small = dict(batch=2)
    assert train_model.train(2, 5, tmp_path / "a", tmp_path / "a.safetensors", world=2, **small) == 2
    carried = tmp_path / "carried.safetensors"
    shutil.copyfile(tmp_path / "a" / "mini.checkpoint.safetensors", carried)
    monkeypatch.setitem(train_model.CARRIED, 2, carried)
    out = tmp_path / "mini2.safetensors"
    assert train_model.train(3, 5, tmp_path / "b", out, world=2, **small) == 3  # went on from step 2
    meta = mini.weights_meta(out)
    assert meta["steps"] == 3 and meta["config"]["text"]["max_position_embeddings"] == 48
    adapter = mini.load(out)
    assert adapter.context_dim == 64 and adapter.chunk_length == 48
    assert train_model.export_checkpoint(tmp_path / "b", tmp_path / "probe.safetensors", 2) == 3
    probe = mini.load(tmp_path / "probe.safetensors")
    assert all(
        torch.equal(a, b)
        for a, b in zip(probe.diffusion_model.state_dict().values(), adapter.diffusion_model.state_dict().values())
    )
