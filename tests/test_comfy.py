"""The ComfyUI nodes against the ComfyUI stand-in (tests/comfy_standin) over the tests' tiny model."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_standin"))

import folder_paths  # noqa: E402
from comfy import model_management  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402
from comfy.sd import CLIP  # noqa: E402
from comfy.sd1_clip import SD1Tokenizer, SDClipModel  # noqa: E402
from comfy.sdxl_clip import SDXLTokenizer  # noqa: E402
from concepts import layer_widths, make_concept, random_covariance  # noqa: E402
from tiny import tiny_adapter  # noqa: E402

from perfusion import ConceptError, ConceptMismatch, gate_direction, save_concept  # noqa: E402
from perfusion.comfy import nodes, patch, text  # noqa: E402
from perfusion.hooks import Activation, Activations, attach  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of hugsy and boxy on the moon"


class BaseModel(torch.nn.Module):
    """comfy.model_base.BaseModel's part the nodes see: the U-Net as `diffusion_model`."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model as ComfyUI hands it to nodes (MODEL patcher + CLIP) and two concept files for it whose
    i* is their word's real encoding (so their gates open on their own rows)."""
    adapter = tiny_adapter()
    from perfusion.clip_tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("models") / "perfusion"
    folder.mkdir()
    folder_paths.folder_names_and_paths.clear()
    folder_paths.models_dir = str(folder.parent)
    nodes.register_folder()
    cov = random_covariance(adapter.context_dim, seed=3)
    concepts = {}
    for seed, (token, superclass) in enumerate((("hugsy", "teddy"), ("boxy", "box"))):
        c = make_concept(layer_widths(adapter.diffusion_model), adapter.context_dim, cov, seed, token=token)
        c.superclass = superclass
        g = torch.Generator().manual_seed(50 + seed)
        c.embedding = {"": torch.randn(1, adapter.context_dim, generator=g)}
        context, rows = adapter.encode([f"a photo of {token}"], {token: c.embedding})
        c.i_star = context[0, rows[token][0][0]].float()
        c.a, c.energy = (
            t.float() for t in gate_direction(c.i_star.double(), torch.linalg.solve(cov, c.i_star.double()))
        )
        c.values = {k: v * 3 for k, v in c.values.items()}  # a visible edit
        save_concept(c, folder / f"{token}.safetensors", dtype=torch.float32)
        concepts[token] = c
    tokenizer = SD1Tokenizer(embedding_directory=str(folder.parent / "embeddings"), inner=load_tokenizer())
    tokenizer.clip_l.embedding_size = adapter.context_dim  # the tiny CLIP is 64 wide (ComfyUI's SD1: 768)
    clip = CLIP(tokenizer, SDClipModel(adapter.text_encoder))
    model = ModelPatcher(BaseModel(adapter.diffusion_model), "cpu", "cpu")
    return adapter, model, clip, folder, concepts


def denoise(model, clip, prompt=PROMPT, seed=0):
    """What KSampler does with the nodes' outputs, reduced to one U-Net call: encode, load, predict."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0]
    model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        return model.model.diffusion_model(x, torch.tensor([500]), context=cond)


def load(model, clip, name, tau=0.0, beta=0.0, **options):
    return nodes.PerfusionConceptLoader().load(model, clip, name, tau, beta, **options)


def test_loader_changes_the_image_and_never_its_inputs(world):
    adapter, model, clip, folder, _ = world
    base = denoise(model, clip)
    base_tokens = clip.tokenize(PROMPT)
    m1, c1 = load(model, clip, "hugsy.safetensors")
    assert m1 is not model and c1 is not clip
    edited = denoise(m1, c1)
    assert (edited - base).abs().max() > 1e-3
    # the input MODEL and CLIP give the base output again, after the patched run, bit for bit
    assert torch.equal(denoise(model, clip), base)
    assert clip.tokenize(PROMPT) == base_tokens
    assert clip.tokenizer is not c1.tokenizer
    # and the patched pair is reproducible after the base ran in between
    assert torch.equal(denoise(m1, c1), edited)


def test_the_word_becomes_its_learned_vectors(world):
    _, model, clip, _, concepts = world
    _, taught = load(model, clip, "hugsy.safetensors")
    for prompt in ("a photo of hugsy", "a photo of (hugsy:1.2), on the moon", "a photo of HUGSY,on the moon"):
        rows = [t for t, _ in taught.tokenize(prompt)["l"][0] if torch.is_tensor(t)]
        assert len(rows) == 1 and torch.equal(rows[0], concepts["hugsy"].embedding[""][0]), prompt
    assert not any(torch.is_tensor(t) for t, _ in taught.tokenize("a photo of hugsyland")["l"][0])
    weights = {w for t, w in taught.tokenize("a photo of (hugsy:1.2)")["l"][0] if torch.is_tensor(t)}
    assert weights == {1.2}


def test_two_chained_loaders_equal_the_engines_two_concept_edit(world):
    adapter, model, clip, _, concepts = world
    for projection in ("approximate", "exact"):
        m1, c1 = load(model, clip, "hugsy.safetensors", tau=0.2, beta=0.6)
        m2, c2 = load(m1, c1, "boxy.safetensors", projection=projection, composition="together")
        assert [a.concept.token for a in patch.applied(m2)] == ["hugsy", "boxy"]
        chained = denoise(m2, c2)
        model_management.load_models_gpu([model])  # the base again: the shared U-Net unpatched
        context, _ = adapter.encode([PROMPT], {t: c.embedding for t, c in concepts.items()})
        acts = Activations([Activation(concepts["hugsy"], beta=0.6, tau=0.2), Activation(concepts["boxy"])], projection)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=g)
        with attach(adapter.diffusion_model, acts) as hooks, torch.no_grad():
            reference = adapter.diffusion_model(x, torch.tensor([500]), context=context)
        assert not hooks.attached
        torch.testing.assert_close(chained, reference, rtol=1e-5, atol=1e-5)
        one, _ = load(model, clip, "hugsy.safetensors", tau=0.2, beta=0.6)
        assert (denoise(one, c2) - chained).abs().max() > 1e-4  # boxy's edit is really in the chain


def test_a_later_loader_of_the_same_concept_replaces_its_gate(world):
    _, model, clip, _, _ = world
    m1, c1 = load(model, clip, "hugsy.safetensors", beta=0.3)
    m2, c2 = load(m1, c1, "hugsy.safetensors", beta=0.9)
    assert [a.gate[0] for a in patch.applied(m2)] == [0.9]
    once, _ = load(model, clip, "hugsy.safetensors", beta=0.9)
    assert torch.equal(denoise(m2, c2), denoise(once, c2))


def test_zero_gate_inputs_take_the_concepts_suggested_gate(world):
    _, model, clip, _, concepts = world
    m, _ = load(model, clip, "hugsy.safetensors")
    assert patch.applied(m)[0].gate == (concepts["hugsy"].beta, concepts["hugsy"].tau)
    m, _ = load(model, clip, "hugsy.safetensors", tau=0.3, beta=1.1)
    assert patch.applied(m)[0].gate == (1.1, 0.3)


def _bad_files(folder, concepts):
    good = (folder / "hugsy.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "noise.safetensors").write_bytes(os.urandom(2048))
    wide = make_concept({"attn2": 320}, 768, random_covariance(768, 1), token="wide", arch="sd1")
    save_concept(wide, folder / "wide.safetensors")
    other = concepts["boxy"]
    twin = make_concept(
        layer_widths_of(other), other.context_dim, random_covariance(other.context_dim, 2), token="hugsy"
    )
    twin.embedding = {"": torch.randn(1, other.context_dim)}
    save_concept(twin, folder / "twin.safetensors")


def layer_widths_of(concept):
    return {k: int(v.shape[0]) for k, v in concept.values.items()}


@pytest.mark.parametrize(
    "name, error, words",
    [
        ("broken.safetensors", ConceptError, "broken.safetensors"),
        ("noise.safetensors", ConceptError, "noise.safetensors"),
        ("wide.safetensors", ConceptMismatch, "wide.safetensors"),
        ("missing.safetensors", FileNotFoundError, "missing.safetensors"),
    ],
)
def test_bad_input_fails_that_node_only(world, name, error, words):
    _, model, clip, folder, concepts = world
    _bad_files(folder, concepts)
    base = denoise(model, clip)
    with pytest.raises(error) as info:
        load(model, clip, name)
    assert words in str(info.value)
    assert torch.equal(denoise(model, clip), base)  # the next base run is bit-identical
    m, c = load(model, clip, "hugsy.safetensors")  # and the good file still loads
    assert (denoise(m, c) - base).abs().max() > 1e-3


def test_two_concepts_with_one_word_are_refused(world):
    _, model, clip, folder, concepts = world
    _bad_files(folder, concepts)
    m1, c1 = load(model, clip, "hugsy.safetensors")
    with pytest.raises(ValueError, match="twin.safetensors.*already the word of hugsy"):
        load(m1, c1, "twin.safetensors")


def test_sdxl_tokenizer_gets_each_encoders_vectors(world):
    from perfusion.clip_tokenizer import load_tokenizer

    _, _, _, _, concepts = world
    xl = CLIP(SDXLTokenizer(embedding_directory="/nonexistent", inner=load_tokenizer()), None)
    c = concepts["hugsy"]
    sdxl = type(c)(**{**vars(c), "embedding": {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}})
    taught = text.with_words(xl, [sdxl])
    tokens = taught.tokenize("a photo of hugsy")
    for key, width in (("l", 768), ("g", 1280)):
        rows = [t for t, _ in tokens[key][0] if torch.is_tensor(t)]
        assert [r.shape[-1] for r in rows] == [width, width]
    assert text.embedding_width(taught) == 2048
    with pytest.raises(ConceptMismatch, match="do not fit"):
        text.with_words(xl, [c])  # a one-encoder concept on SDXL
    assert not any(torch.is_tensor(t) for t, _ in xl.tokenize("a photo of hugsy")["l"][0])


def test_patched_forward_in_half_precision_matches_float64(world):
    _, _, _, _, concepts = world
    c = concepts["hugsy"]
    layer = next(iter(c.values))
    d_out = c.values[layer].shape[0]
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(c.context_dim, d_out, bias=False)
    linear.weight.data = torch.randn(d_out, c.context_dim, generator=g) * 0.05
    e = torch.randn(1, 7, c.context_dim, generator=g) * 0.5
    e[0, 3] = c.i_star
    from perfusion.edit import edited_output
    from perfusion.hooks import Editor

    w = linear.weight.double()
    ref = edited_output(
        e.double() @ w.T, e.double(), c.a[None].double(), c.i_star[None].double(), c.energy.reshape(1).double(),
        (c.i_star.double() @ w.T)[None], c.values[layer][None].double(), torch.tensor([0.7], dtype=torch.float64),
        torch.tensor([0.15], dtype=torch.float64),
    )  # fmt: skip
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        half = torch.nn.Linear(c.context_dim, d_out, bias=False).to(dtype)
        half.weight.data = linear.weight.data.to(dtype)
        editor = Editor({layer: type("A", (), {"to_k": half, "to_v": half})()}, Activations(), cache_rows=False)
        editor.check = lambda concept: None  # one bare layer, not a U-Net
        editor.activate([Activation(c, beta=0.7, tau=0.15)])
        y = patch.PatchedForward(editor, layer, "v", half.forward)(e.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y.float()).all()
        assert (y.double() - ref).abs().max() / ref.abs().max() < tol


def test_folder_registration_keeps_extra_model_paths(tmp_path):
    saved = dict(folder_paths.folder_names_and_paths), folder_paths.models_dir
    try:
        folder_paths.models_dir = str(tmp_path / "models")
        folder_paths.folder_names_and_paths["perfusion"] = (["/webui/models/perfusion"], set())
        nodes.register_folder()
        nodes.register_folder()
        paths, exts = folder_paths.folder_names_and_paths["perfusion"]
        assert paths == [str(tmp_path / "models" / "perfusion"), "/webui/models/perfusion"] and exts == {".safetensors"}
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved[0])
        folder_paths.models_dir = saved[1]


def test_repository_root_is_a_node_pack(world):
    """ComfyUI imports custom_nodes/<folder>/__init__.py as a package named after the folder."""
    spec = importlib.util.spec_from_file_location("sd-webui-perfusion", os.path.join(REPO, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == {"PerfusionConceptLoader", "PerfusionConceptInfo"}
        assert module.NODE_DISPLAY_NAME_MAPPINGS["PerfusionConceptLoader"] == "Load Perfusion Concept"
        loader = module.NODE_CLASS_MAPPINGS["PerfusionConceptLoader"]
        spec_inputs = loader.INPUT_TYPES()
        assert list(spec_inputs["required"]) == ["model", "clip", "concept_name", "tau", "beta"]
        assert "hugsy.safetensors" in spec_inputs["required"]["concept_name"][0]
        assert loader.RETURN_TYPES == ("MODEL", "CLIP") and loader.CATEGORY == "loaders"
    finally:
        sys.modules.pop(spec.name, None)


def test_info_node_and_change_detection(world):
    _, _, _, folder, concepts = world
    out = nodes.PerfusionConceptInfo().info("hugsy.safetensors")
    summary, word, beta, tau = out["result"]
    assert word == "hugsy" and "superclass: teddy" in summary and (beta, tau) == (0.7, 0.15)
    before = nodes.PerfusionConceptLoader.IS_CHANGED("hugsy.safetensors")
    c = concepts["hugsy"]
    c.beta = 0.8
    try:
        save_concept(c, folder / "hugsy.safetensors", dtype=torch.float32)
        assert nodes.PerfusionConceptLoader.IS_CHANGED("hugsy.safetensors") != before
        assert nodes.PerfusionConceptInfo().info("hugsy.safetensors")["result"][2] == 0.8
    finally:
        c.beta = 0.7
        save_concept(c, folder / "hugsy.safetensors", dtype=torch.float32)


def test_committed_workflows_match_the_nodes():
    """docs/comfyui's example workflows use the nodes' names and the loader's inputs as they are now, and hold no
    null but an input's `link` (the frontend's schema refuses the others with an alert on load)."""
    import json

    required = nodes.PerfusionConceptLoader.INPUT_TYPES()
    widgets = [k for k in list(required["required"]) + list(required["optional"]) if k not in ("model", "clip")]
    api = json.load(open(os.path.join(REPO, "docs", "comfyui", "perfusion.api.json")))
    loaders = [n for n in api.values() if n["class_type"] == "PerfusionConceptLoader"]
    assert len(loaders) == 1 and set(required["required"]) <= set(loaders[0]["inputs"])
    seen = set()

    def nulls(value, key=""):
        if isinstance(value, dict):
            return [n for k, v in value.items() for n in nulls(v, k)]
        if isinstance(value, list):
            return [n for v in value for n in nulls(v, key)]
        return [key] if value is None and key != "link" else []

    for name in ("perfusion", "beta-sweep", "concept-info", "two-concepts"):
        graph = json.load(open(os.path.join(REPO, "docs", "comfyui", f"{name}.json")))
        assert nulls(graph) == [], name
        for node in graph["nodes"]:
            if node["type"].startswith("Perfusion"):
                seen.add(node["type"])
                assert node["type"] in nodes.NODE_CLASS_MAPPINGS
                if node["type"] == "PerfusionConceptLoader":
                    assert len(node["widgets_values"]) == len(widgets), name
                    for key in ("composition", "regions", "blend"):  # an example composes as the docs' default
                        stored = node["widgets_values"][widgets.index(key)]
                        assert stored == required["optional"][key][1]["default"], (name, key, stored)
    assert seen == set(nodes.NODE_CLASS_MAPPINGS)


def test_global_lock_pairs_the_prompt_with_its_superclass_twin_as_the_engine_does(world):
    """lock=global: the loader's CLIP encodes the prompt and its twin (hugsy -> teddy) and the MODEL's keys
    read the twin; the result equals the engine's global locking with the same pair."""
    from perfusion.hooks import KeyContexts

    adapter, model, clip, _, concepts = world
    m, c = load(model, clip, "hugsy.safetensors", lock="global")
    tokens = c.tokenize("a photo of hugsy on the moon")
    assert isinstance(tokens, text.TwinTokens) and tokens.twin is not None
    assert not isinstance(c.tokenize("a photo of a cat"), text.TwinTokens)  # no word, no twin
    chained = denoise(m, c, "a photo of hugsy on the moon")
    local = denoise(load(model, clip, "hugsy.safetensors")[0], c, "a photo of hugsy on the moon")
    assert (chained - local).abs().max() > 1e-4
    model_management.load_models_gpu([model])
    context, _ = adapter.encode(["a photo of hugsy on the moon"], {"hugsy": concepts["hugsy"].embedding})
    twin, _ = adapter.encode(["a photo of teddy on the moon"])
    pairs = KeyContexts()
    pairs.add(context, twin)
    acts = Activations([Activation(concepts["hugsy"], lock="global")], key_context=pairs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with attach(adapter.diffusion_model, acts), torch.no_grad():
        reference = adapter.diffusion_model(x, torch.tensor([500]), context=context)
    torch.testing.assert_close(chained, reference, rtol=1e-5, atol=1e-5)
    # a later local loader in the chain keeps the global concept's pairing
    m2, c2 = load(m, c, "boxy.safetensors", composition="together")
    assert patch.key_contexts(m2) is patch.key_contexts(m)
    assert isinstance(c2.tokenize("a photo of hugsy and boxy"), text.TwinTokens)
    # composed, the global concept's keys read its clause with the superclass word, registered with the prompt
    m3, c3 = load(m, c, "boxy.safetensors")
    denoise(m3, c3)
    ((_, twins),) = patch.composition(m3).pairs
    assert twins.own_keys[0] is not None and twins.own_keys[1] is None  # hugsy global, boxy local
    # and a loader after the composed chain that applies them together pairs again
    m4, c4 = load(m3, c3, "boxy.safetensors", tau=0.3, composition="together")
    assert patch.key_contexts(m4) is not None and c4.tokenize("a photo of hugsy").twin is not None
    assert torch.equal(denoise(model, clip), denoise(model, clip))  # the inputs untouched


def test_two_chained_loaders_compose_region_by_region_as_the_engine_does(world, caplog):
    """composition=regional (the default): the chain's CLIP registers the prompt with its twins when it encodes it,
    the MODEL's U-Net forward composes; the result equals the engine's RegionalComposition with the same texts."""
    from perfusion.regional import RegionalComposition, Twins

    adapter, model, clip, _, concepts = world
    m1, c1 = load(model, clip, "hugsy.safetensors")
    assert patch.composition(m1) is None  # one concept: nothing to compose
    m2, c2 = load(m1, c1, "boxy.safetensors")
    composed = patch.composition(m2)
    assert composed is not None and [a.concept.token for a in patch.applied(m2)] == ["hugsy", "boxy"]
    with caplog.at_level("WARNING", logger="perfusion"):
        unregistered = denoise(m2, clip)  # encoded with a CLIP that does not know the concepts
    assert "connect that CLIP" in caplog.text and composed.composed == 0
    chained = denoise(m2, c2)
    assert len(composed.pairs) == 1 and composed.composed == 1
    assert (chained - unregistered).abs().max() > 1e-4
    model_management.load_models_gpu([model])  # the base again: the shared U-Net unpatched
    words = {t: c.embedding for t, c in concepts.items()}
    context, _ = adapter.encode([PROMPT], words)
    base, rows = adapter.encode(["a photo of teddy and box on the moon"], {"teddy": None, "box": None})
    own = [adapter.encode([t], words)[0][0] for t in ("a photo of hugsy", "boxy on the moon")]
    items = [Activation(concepts["hugsy"]), Activation(concepts["boxy"])]
    hooks = attach(adapter.diffusion_model)
    reference_composition = RegionalComposition(hooks, items, model=adapter.diffusion_model)
    reference_composition.add(context, [Twins(base[0], tuple(own), (rows["teddy"][0][0], rows["box"][0][0]))])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    try:
        with torch.no_grad():
            reference = adapter.diffusion_model(x, torch.tensor([500]), context=context)
    finally:
        reference_composition.detach()
        hooks.detach()
    torch.testing.assert_close(chained, reference, rtol=1e-5, atol=1e-5)
    together, _ = load(m1, c1, "boxy.safetensors", composition="together")
    assert patch.composition(together) is None and patch.UNET_FORWARD not in together.object_patches
    assert (denoise(together, c2) - chained).abs().max() > 1e-4
    assert torch.equal(denoise(model, clip), denoise(model, clip))  # the inputs untouched


def test_a_prompt_naming_places_is_composed_inside_the_cross_attentions_as_the_engine_does(world):
    """Where the prompt names a place for each concept, the loaders' object patches on every attn2 forward blend
    there with blend "attention" (one U-Net pass), and by prediction by default; each result equals the engine's
    composition with the same texts, places and blend, and a loader applying them together takes those patches off
    again."""
    from perfusion.regional import RegionalComposition, Twins

    adapter, model, clip, _, concepts = world
    placed = "a photo of hugsy at the left and boxy at the right"
    by_default = denoise(*load(*load(model, clip, "hugsy.safetensors"), "boxy.safetensors"), placed)
    m1, c1 = load(model, clip, "hugsy.safetensors", blend="attention")
    m2, c2 = load(m1, c1, "boxy.safetensors", blend="attention")
    layer_keys = [k for k, v in m2.object_patches.items() if isinstance(v, patch.ComposedLayer)]
    assert len(layer_keys) == len(patch.layers(model)) > 0
    chained = denoise(m2, c2, placed)
    composed = patch.composition(m2)
    ((_, twins),) = composed.pairs
    assert twins.places == ((0.25, 0.5), (0.75, 0.5)) and composed.composed == 1
    model_management.load_models_gpu([model])  # the base again: the shared U-Net unpatched
    unet = adapter.diffusion_model
    assert not any(isinstance(vars(m).get("forward"), patch.ComposedLayer) for m in patch.layers(model).values())
    words = {t: c.embedding for t, c in concepts.items()}
    context, _ = adapter.encode([placed], words)
    base, rows = adapter.encode(["a photo of teddy at the left and box at the right"], {"teddy": None, "box": None})
    own = [adapter.encode([t], words)[0][0] for t in ("a photo of hugsy at the left", "boxy at the right")]
    items = [Activation(concepts["hugsy"]), Activation(concepts["boxy"])]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def engine(**options):
        """The engine's composition of the same texts and places on the bare U-Net."""
        hooks = attach(unet)
        composition = RegionalComposition(hooks, items, model=unet, **options)
        composition.add(
            context, [Twins(base[0], tuple(own), (rows["teddy"][0][0], rows["box"][0][0]), (), twins.places)]
        )
        try:
            with torch.no_grad():
                return unet(x, torch.tensor([500]), context=context)
        finally:
            composition.detach()
            hooks.detach()

    torch.testing.assert_close(chained, engine(blend="attention"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_default, engine(), rtol=1e-5, atol=1e-5)
    assert (by_default - chained).abs().max() > 1e-4  # control: the blends differ
    together, _ = load(m2, c2, "boxy.safetensors", composition="together")
    assert not any(isinstance(v, patch.ComposedLayer) for v in together.object_patches.values())
    # regions "attention" (the same prompt from the model's attention) and blend "prediction" (a U-Net pass per
    # concept): each as the engine does it
    for option, value, bad in (("regions", "attention", "words"), ("blend", "prediction", "latent")):
        m3, c3 = load(m1, c1, "boxy.safetensors", **{option: value})
        other = denoise(m3, c3, placed)
        model_management.load_models_gpu([model])
        torch.testing.assert_close(other, engine(**{option: value}), rtol=1e-5, atol=1e-5)
        assert (other - chained).abs().max() > 1e-4 and getattr(patch.composition(m3), option) == value
        with pytest.raises(ValueError, match=f"{option} one of"):
            load(m1, c1, "boxy.safetensors", **{option: bad})
