"""Hooked ldm U-Nets against a float64 reference of the Perfusion formulas."""

from __future__ import annotations

import pytest
import torch
from concepts import encodings, layer_widths, make_concept, random_covariance
from ldm.modules.attention import CrossAttention
from models import small_unet

import perfusion
from perfusion import Activation, Activations, ConceptMismatch, KeyContexts, attach, projection_coefficients


def reference(W, e, concepts, gates, cov, projection="approximate", key_targets=None, additive=()):
    """float64 out(e) = W e_perp + sum_c g_c(e) o*_c, e_perp by ROME's s or by Cholesky + QR.

    W [d_out, d]; e [..., d]; concepts: list of (i*, o*); gates: list of (beta, tau).
    additive: indices of Infusion-style concepts (gated residual only, nothing projected out).
    """
    W, e, cov = W.double(), e.double(), cov.double()
    out = e @ W.T
    proj = [c for c in range(len(concepts)) if c not in additive]
    i_stars = torch.stack([concepts[c][0].double() for c in range(len(concepts))])
    c_inv = torch.linalg.solve(cov, i_stars.T).T
    energy = (i_stars * c_inv).sum(-1)
    s = e @ (c_inv / energy[:, None]).T
    if proj:
        if projection == "approximate":
            out = out - s[..., proj] @ (i_stars[proj] @ W.T)
        else:
            L = torch.linalg.cholesky(cov)
            u = torch.linalg.solve_triangular(L, e.reshape(-1, e.shape[-1]).T, upper=False)  # L^-1 e
            U = torch.linalg.solve_triangular(L, i_stars[proj].T, upper=False)
            Q, _ = torch.linalg.qr(U)
            e_perp = (L @ (u - Q @ (Q.T @ u))).T.reshape(e.shape)
            out = e_perp @ W.T
    for c, ((_, o), (beta, tau)) in enumerate(zip(concepts, gates)):
        g = torch.sigmoid((s[..., c] - beta) / tau)
        out = out + g[..., None] * o.double()
    return out


def close(y, ref, tol):
    """|y - ref| <= tol * (|ref| + max|ref|), elementwise, in float64."""
    y, ref = y.double(), ref.double()
    return bool(((y - ref).abs() <= tol * (ref.abs() + ref.abs().max())).all())


def capture(unet):
    """Record (input, output) of every attn2 to_k / to_v after all earlier hooks ran."""
    seen, handles = {}, []
    for name, attn in perfusion.find_cross_attention(unet).items():
        for kind in ("to_k", "to_v"):

            def hook(m, args, y, key=(name, kind)):
                seen[key] = (args[0].detach(), y.detach())

            handles.append(getattr(attn, kind).register_forward_hook(hook))
    return seen, handles


def lone_cross_attention(d):
    """(a module holding one ldm CrossAttention named attn2 reading d-wide context, that attn2)."""
    parent = torch.nn.Module()
    parent.attn2 = CrossAttention(query_dim=320, context_dim=d, heads=5, dim_head=64)
    return parent, parent.attn2


def prompt_context(concepts, d, batch=2, rows=77, seed=3):
    """Context [batch, rows, d] holding each concept's i* at a few rows, its superclass elsewhere."""
    ctx = encodings(batch * rows, d, seed).reshape(batch, rows, d)
    for n, c in enumerate(concepts):
        ctx[0, 5 + n] = c.i_star
        ctx[1, rows - 10 - n] = c.i_star
        ctx[1, 2 + n] = c.i_super
    return ctx


@pytest.mark.parametrize("d", [768, 1024, 2048])
@pytest.mark.parametrize("n_concepts,projection", [(1, "approximate"), (3, "approximate"), (3, "exact")])
def test_hooked_outputs_match_float64_reference(d, n_concepts, projection):
    torch.manual_seed(0)
    unet = small_unet(d)
    cov = random_covariance(d, seed=d)
    widths = layer_widths(unet)
    concepts = [make_concept(widths, d, cov, seed=s, token=f"c{s}", with_keys=(s == 1)) for s in range(n_concepts)]
    gates = [(0.6 + 0.05 * s, 0.1 + 0.05 * s) for s in range(n_concepts)]
    ctx = prompt_context(concepts, d)
    with attach(unet, Activations([Activation(c, b, t) for c, (b, t) in zip(concepts, gates)], projection)):
        seen, handles = capture(unet)
        unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), context=ctx)
        for h in handles:
            h.remove()
    assert len(seen) == 2 * len(widths) >= 14
    for (layer, kind), (e, y) in seen.items():
        attn = dict(unet.named_modules())[layer]
        W = getattr(attn, kind).weight
        if kind == "to_v":
            targets = [c.values[layer] for c in concepts]
        else:
            targets = [c.keys[layer] if c.keys else W.double() @ c.i_super.double() for c in concepts]
        ref = reference(W, e, list(zip([c.i_star for c in concepts], targets)), gates, cov, projection)
        assert close(y, ref, 1e-4), (layer, kind)
    # the gate did fire on the concept rows and not on ordinary rows
    s = perfusion.similarity(ctx, torch.stack([c.a for c in concepts]))
    assert s[0, 5, 0] == pytest.approx(1.0, abs=1e-4)


def test_exact_equals_approximate_for_one_concept_and_differs_for_correlated_concepts():
    d = 768
    cov = random_covariance(d)
    W = torch.randn(320, d, dtype=torch.float64)
    base = make_concept({"x": 320}, d, cov, seed=0)
    twin = make_concept({"x": 320}, d, cov, seed=1)
    twin.i_star = base.i_star + 0.2 * twin.i_star  # strongly correlated targets
    twin.a, twin.energy = perfusion.gate_direction(twin.i_star.double(), torch.linalg.solve(cov, twin.i_star.double()))
    e = encodings(20, d, 5)
    e[3] = base.i_star
    outs = {}
    for proj in ("approximate", "exact"):
        cs = [base, twin]
        a = torch.stack([c.a for c in cs]).double()
        i = torch.stack([c.i_star for c in cs]).double()
        en = torch.cat([c.energy for c in cs]).double()
        x = perfusion.projection_coefficients(e.double() @ a.T, a, i, en, proj)
        outs[proj] = e.double() @ W.T - x @ (i @ W.T)
    zeros = torch.zeros(320)  # zero targets: the reference is then W e_perp alone
    ref = reference(W, e, [(base.i_star, zeros), (twin.i_star, zeros)], [(0.7, 0.15)] * 2, cov, "exact")
    assert close(outs["exact"], ref, 1e-6)  # a is stored in float32
    assert not torch.allclose(outs["exact"], outs["approximate"], rtol=1e-3)
    # the exact projection removes i*_c completely: W (i*_1)_perp = 0
    assert outs["exact"][3].abs().max() < 1e-6 * (e[3].double() @ W.T).abs().max()


def test_global_locking_feeds_superclass_context_to_keys_only():
    d = 1024
    unet = small_unet(d)
    cov = random_covariance(d, seed=1)
    widths = layer_widths(unet)
    local = make_concept(widths, d, cov, seed=0, token="hugsy")
    glob = make_concept(widths, d, cov, seed=1, token="mochi")
    ctx = prompt_context([local, glob], d)
    key_ctx = ctx.clone()
    key_ctx[0, 6] = glob.i_super  # the globally locked word replaced by its superclass encoding
    key_ctx[1, 77 - 11] = glob.i_super
    uncond = encodings(77, d, 99)[None]
    contexts = KeyContexts()
    contexts.add(ctx, key_ctx)
    batch = torch.cat([ctx, uncond])  # cond rows then the unconditional row, as a CFG batch
    items = [Activation(local, 0.65, 0.12), Activation(glob, 0.5, 0.15, lock="global")]
    gates = [i.gate for i in items]
    with attach(unet, Activations(items, key_context=contexts)):
        seen, handles = capture(unet)
        unet(torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 900]), context=batch)
        for h in handles:
            h.remove()
    expected_k_input = torch.cat([key_ctx, uncond])
    for (layer, kind), (e, y) in seen.items():
        W = getattr(dict(unet.named_modules())[layer], kind).weight
        if kind == "to_k":
            assert torch.equal(e, expected_k_input)  # unconditional row kept, cond rows substituted
            ref = reference(W, expected_k_input, [(local.i_star, W.double() @ local.i_super.double())], gates[:1], cov)
        else:
            assert torch.equal(e, batch)
            ref = reference(
                W, batch, [(local.i_star, local.values[layer]), (glob.i_star, glob.values[layer])], gates, cov
            )
        assert close(y, ref, 1e-4), (layer, kind)


def test_long_prompt_context_and_any_batch():
    d = 768
    unet = small_unet(d)
    cov = random_covariance(d)
    concept = make_concept(layer_widths(unet), d, cov)
    ctx = torch.cat([prompt_context([concept], d, batch=3, rows=77, seed=s) for s in (1, 2)], dim=1)  # 154 rows
    ctx[2, 120] = concept.i_star
    with attach(unet, Activations([Activation(concept)])):
        seen, handles = capture(unet)
        unet(torch.randn(3, 4, 16, 16), torch.tensor([1, 2, 3]), context=ctx)
        for h in handles:
            h.remove()
    for (layer, kind), (e, y) in seen.items():
        assert e.shape == (3, 154, d)
        W = getattr(dict(unet.named_modules())[layer], kind).weight
        target = concept.values[layer] if kind == "to_v" else W.double() @ concept.i_super.double()
        ref = reference(W, e, [(concept.i_star, target)], [(concept.beta, concept.tau)], cov)
        assert close(y, ref, 1e-4)


def test_fp16_module_keeps_gate_in_fp32():
    d = 768
    parent, attn = lone_cross_attention(d)
    cov = random_covariance(d)
    concept = make_concept({"attn2": 320}, d, cov, tau=0.02)
    parent.half()
    e = encodings(2 * 77, d, 4).reshape(2, 77, d)
    e[0, 4] = concept.i_star
    # rows whose similarity sits near beta: an fp16 gate (s rounded to ~3 digits) would be off
    for r, s_target in enumerate((0.68, 0.7, 0.72)):
        e[1, 10 + r] = concept.i_star * s_target  # s(c i*) = c
    e = e.half()
    with attach(parent, Activations([Activation(concept, beta=0.7, tau=0.02)])):
        y = attn.to_v(e)
    assert y.dtype == torch.float16
    ref = reference(
        attn.to_v.weight.float(),
        e.float(),
        [(concept.i_star.half().float(), concept.values["attn2"].half().float())],
        [(0.7, 0.02)],
        cov,
    )
    # fp16 output, reference from the same fp16 inputs in float64
    assert close(y, ref, 2e-3)
    gates = perfusion.gate(
        perfusion.similarity(e[1, 10:13], concept.a[None]), torch.tensor([0.7]), torch.tensor([0.02])
    )
    assert gates.dtype == torch.float32 and gates[0] < 0.4 and 0.4 < gates[1] < 0.6 and gates[2] > 0.6


def test_detach_and_no_concept_are_bit_identical():
    d = 768
    unet = small_unet(d)
    cov = random_covariance(d)
    concept = make_concept(layer_widths(unet), d, cov)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    ctx = prompt_context([concept], d)
    with torch.no_grad():
        bare = unet(x, t, context=ctx)
        hooks = attach(unet)
        assert torch.equal(unet(x, t, context=ctx), bare)  # attached, nothing active
        hooks.activate([Activation(concept)])
        edited = unet(x, t, context=ctx)
        assert not torch.allclose(edited, bare, atol=1e-3)
        hooks.clear()
        assert torch.equal(unet(x, t, context=ctx), bare)
        hooks.activate([Activation(concept)])
        hooks.detach()
        hooks.detach()  # twice is harmless
        assert torch.equal(unet(x, t, context=ctx), bare)
        assert all(
            not m.to_k._forward_hooks and not m.to_v._forward_hooks and not m.to_k._forward_pre_hooks
            for m in perfusion.find_cross_attention(unet).values()
        )


def test_attach_is_idempotent_and_activations_change_without_reattaching():
    unet = small_unet(768)
    cov = random_covariance(768)
    c1, c2 = (make_concept(layer_widths(unet), 768, cov, seed=s) for s in (0, 1))
    h1 = attach(unet, Activations([Activation(c1)]))
    h2 = attach(unet, Activations([Activation(c2, beta=0.6)]))
    assert h1 is h2 and [i.concept for i in h1.activations.items] == [c2]
    for attn in perfusion.find_cross_attention(unet).values():
        assert len(attn.to_k._forward_hooks) == 1 and len(attn.to_v._forward_hooks) == 1
        assert len(attn.to_k._forward_pre_hooks) == 1
    self_attn = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    assert self_attn and all(not m.to_k._forward_hooks for m in self_attn)
    h1.detach()


def test_follows_output_device_and_dtype_of_bf16_module():
    d = 768
    parent, attn = lone_cross_attention(d)
    concept = make_concept({"attn2": 320}, d, random_covariance(d))
    parent.to(torch.bfloat16)
    e = encodings(77, d, 2)[None].bfloat16()
    e[0, 3] = concept.i_star.bfloat16()
    with attach(parent, Activations([Activation(concept)])):
        y = attn.to_v(e)
        k = attn.to_k(e)
    assert y.dtype == k.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_mismatched_concepts_are_refused_before_running():
    unet = small_unet(1024)
    cov768 = random_covariance(768)
    sd1_concept = make_concept({"input_blocks.1.1.transformer_blocks.0.attn2": 320}, 768, cov768)
    hooks = attach(unet)
    with pytest.raises(ConceptMismatch, match="768-wide"):
        hooks.activate([Activation(sd1_concept)])
    widths = layer_widths(unet)
    cov = random_covariance(1024)
    partial = make_concept(dict(list(widths.items())[:-1]), 1024, cov)
    with pytest.raises(ConceptMismatch, match="1 missing"):
        hooks.activate([Activation(partial)])
    wrong_width = make_concept({k: v * 2 for k, v in widths.items()}, 1024, cov)
    with pytest.raises(ConceptMismatch, match="outputs"):
        hooks.activate([Activation(wrong_width)])
    good = make_concept(widths, 1024, cov)
    with pytest.raises(ValueError, match="key_context"):
        hooks.activate([Activation(good, lock="global")])
    with pytest.raises(ValueError, match="tau"):
        hooks.activate([Activation(good, tau=0.0)])
    assert hooks.activations.items == []  # a refused activation changes nothing
    hooks.detach()


def test_gradients_reach_value_targets_and_i_star():
    d = 768
    unet = small_unet(d).requires_grad_(False)
    concept = make_concept(layer_widths(unet), d, random_covariance(d))
    for layer in concept.values:
        concept.values[layer].requires_grad_(True)
    concept.i_star.requires_grad_(True)
    ctx = prompt_context([concept], d)
    with attach(unet, Activations([Activation(concept, beta=0.75, tau=0.1)])):
        unet(torch.randn(2, 4, 16, 16), torch.tensor([5, 50]), context=ctx).square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in concept.values.values())
    assert concept.i_star.grad is not None and concept.i_star.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_infusion_concept_adds_gated_residual_only():
    d = 768
    parent, attn = lone_cross_attention(d)
    cov = random_covariance(d)
    inf = make_concept({"attn2": 320}, d, cov, method="infusion", token="teddy")
    e = encodings(77, d, 8)[None]
    e[0, 3] = inf.i_star
    with torch.no_grad(), attach(parent, Activations([Activation(inf, 0.7, 0.15)])):
        k, v = attn.to_k(e), attn.to_v(e)
    bare_k = e @ attn.to_k.weight.T
    assert torch.allclose(k, bare_k, atol=1e-5)  # keys untouched
    ref = reference(attn.to_v.weight, e, [(inf.i_star, inf.values["attn2"])], [(0.7, 0.15)], cov, additive=(0,))
    assert close(v, ref, 1e-4)


def test_ungated_activation_is_romes_closed_form():
    d = 768
    parent, attn = lone_cross_attention(d)
    cov = random_covariance(d)
    concept = make_concept({"attn2": 320}, d, cov)
    e = encodings(77, d, 9)[None]
    e[0, 3] = concept.i_star
    with torch.no_grad(), attach(parent, Activations([Activation(concept, 0.7, 0.15, ungated=True)])):
        v = attn.to_v(e)
    W = attn.to_v.weight.double()
    s = (
        e.double()
        @ torch.linalg.solve(cov, concept.i_star.double())
        / (concept.i_star.double() @ torch.linalg.solve(cov, concept.i_star.double()))
    )
    ref = e.double() @ W.T + s[..., None] * (concept.values["attn2"].double() - W @ concept.i_star.double())
    assert close(v, ref, 1e-4)


def test_exact_projection_survives_concepts_with_the_same_direction():
    """Two concepts sharing i* (e.g. trained on one word twice) make the Gram matrix singular; the
    pseudo-inverse keeps the image going and removes W i* once, as one concept would."""
    d = 16
    cov = random_covariance(d)
    one = make_concept({"l.attn2": 8}, d, cov, seed=1)
    twin = make_concept({"l.attn2": 8}, d, cov, seed=1)
    s = torch.tensor([[0.9, 0.9], [0.2, 0.2]])
    x = projection_coefficients(
        s,
        torch.stack([one.a, twin.a]),
        torch.stack([one.i_star, twin.i_star]),
        torch.cat([one.energy, twin.energy]),
        "exact",
    )
    assert torch.isfinite(x).all()
    assert torch.allclose(x.sum(-1), s[:, 0], atol=1e-5)


def test_key_contexts_work_on_inference_tensors():
    """Forge samples under torch.inference_mode: its tensors have no version counter."""
    contexts = KeyContexts()
    cond, twin = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    contexts.add(cond, twin)
    with torch.inference_mode():
        batch = torch.cat([cond, torch.randn(1, 77, 8)])
        out = contexts(batch)
        assert torch.equal(out[0], twin[0]) and torch.equal(out[1], batch[1]) and contexts(batch) is out


def test_hard_lock_ungates_the_key_edit_only():
    """lock="hard": K = W_K e + s (W_K i_super - W_K i*) on every row (the key direction is the superclass's
    whatever the gate), V keeps the gated edit; against float64."""
    d = 768
    parent, attn = lone_cross_attention(d)
    cov = random_covariance(d)
    concept = make_concept({"attn2": 320}, d, cov)
    e = encodings(77, d, 9)[None]
    e[0, 3] = concept.i_star
    e[0, 9] = 0.6 * concept.i_star + 0.4 * e[0, 9]  # a weakened concept row: the gate half closed, s not
    with torch.no_grad(), attach(parent, Activations([Activation(concept, 0.7, 0.15, lock="hard")])):
        k, v = attn.to_k(e), attn.to_v(e)
    c_inv_i = torch.linalg.solve(cov, concept.i_star.double())
    s = e.double() @ c_inv_i / (concept.i_star.double() @ c_inv_i)
    Wk, Wv = attn.to_k.weight.double(), attn.to_v.weight.double()
    k_ref = e.double() @ Wk.T + s[..., None] * (Wk @ concept.i_super.double() - Wk @ concept.i_star.double())
    assert close(k, k_ref, 1e-4)
    ref_v = reference(Wv, e, [(concept.i_star, concept.values["attn2"])], [(0.7, 0.15)], cov)
    assert close(v, ref_v, 1e-4)
    with torch.no_grad(), attach(parent, Activations([Activation(concept, 0.7, 0.15)])):
        k_local = attn.to_k(e)
    assert not close(k_local, k_ref, 1e-4)  # the paper's local lock gates the key edit: it differs
