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

    monkeypatch.setitem(train_model.CARRIED, 2, tmp_path / "none")  # not the committed run's checkpoint
    small = dict(batch=2)
    assert train_model.train(2, 600, tmp_path / "a", tmp_path / "a.safetensors", world=2, **small) == 2
    carried = tmp_path / "carried.safetensors"
    shutil.copyfile(tmp_path / "a" / "mini.checkpoint.safetensors", carried)
    monkeypatch.setitem(train_model.CARRIED, 2, carried)
    out = tmp_path / "mini2.safetensors"
    assert train_model.train(3, 600, tmp_path / "b", out, world=2, **small) == 3  # went on from step 2
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


def test_a_run_that_blows_up_goes_back_to_a_checkpoint_at_half_the_learning_rate(tmp_path, monkeypatch, capsys):
    import pytest

    from perfusion.world import train_model

    real = train_model.training_target
    steps_seen = []

    def poisoned(x0, t, noise, alphas, kind):  # from the 60th call on, targets far off: the loss jumps
        steps_seen.append(1)
        target = real(x0, t, noise, alphas, kind)
        return target + 10.0 if len(steps_seen) > 60 else target

    monkeypatch.setattr(train_model, "training_target", poisoned)
    with pytest.raises(SystemExit, match="diverged again"):
        # a budget no loaded machine reaches (5 minutes ran out here at 2.5 s/step before the third cut)
        train_model.train(200, 600, tmp_path / "w", tmp_path / "m.safetensors", world=1, batch=2)
    out = capsys.readouterr().out
    assert out.count("diverged; back to step") == 3 and "learning rate x0.125" in out
