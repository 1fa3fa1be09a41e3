"""Fast checks that the WebUI stand-in behaves like v1.10.1 where an extension can tell."""
import os
import shutil
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from modules import (call_queue, errors, extensions, extra_networks, infotext_utils, paths, processing,  # noqa: E402
                     script_callbacks, scripts, sd_hijack, sd_models, sd_samplers, shared, ui_extra_networks)
from modules.textual_inversion.textual_inversion import Embedding  # noqa: E402


@pytest.fixture(autouse=True)
def clean():
    extra_networks.initialize()
    ui_extra_networks.initialize()
    script_callbacks.clear_callbacks()
    scripts.scripts_data.clear()
    errors.exception_records.clear()
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    sd_samplers.sample_hook = None
    shared.sd_model = None
    yield
    sd_samplers.sample_hook = None
    shared.sd_model = None


class RecordingNetwork(extra_networks.ExtraNetwork):
    def __init__(self, log, name="perfusion"):
        super().__init__(name)
        self.log = log

    def activate(self, p, params_list):
        self.log.append(("activate", [x.items for x in params_list], p.is_hr_pass))

    def deactivate(self, p):
        self.log.append(("deactivate",))


def make_runner(log):
    class Recorder(scripts.Script):
        def title(self):
            return "recorder"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process(self, p, *args):
            log.append(("process", args))

        def before_process_batch(self, p, *args, **kwargs):
            log.append(("before_process_batch", list(kwargs["prompts"])))

        def after_extra_networks_activate(self, p, *args, **kwargs):
            log.append(("after_extra_networks_activate", p.is_hr_pass))

        def process_batch(self, p, *args, **kwargs):
            log.append(("process_batch", list(kwargs["prompts"])))

        def process_before_every_sampling(self, p, *args, **kwargs):
            log.append(("process_before_every_sampling", p.is_hr_pass, tuple(kwargs["x"].shape)))

        def before_hr(self, p, *args):
            log.append(("before_hr",))

        def postprocess(self, p, processed, *args):
            log.append(("postprocess",))

    scripts.scripts_data.append(scripts.ScriptClassData(Recorder, "recorder.py", paths.script_path, None))
    runner = scripts.ScriptRunner()
    runner.initialize_scripts(is_img2img=False)
    runner.alwayson_scripts[0].args_from, runner.alwayson_scripts[0].args_to = 1, 2
    return runner


def run_job(log, **kwargs):
    def hook(params):
        if params.denoiser.step == 0:
            log.append(("sample", params.denoiser.p.is_hr_pass, list(params.text_cond)))
        return params.x

    sd_samplers.sample_hook = hook
    p = processing.StableDiffusionProcessingTxt2Img(steps=2, width=64, height=64, **kwargs)
    p.scripts = make_runner(log)
    p.script_args = (0, "knob")
    shared.state.begin(job="test")
    try:
        return p, processing.process_images(p)
    finally:
        shared.state.end()


def test_parse_prompts_strips_tags_and_splits_params():
    prompts, data = extra_networks.parse_prompts(["a photo of <perfusion:teddy:0.15:beta=0.5:a=b=c> x <lora:y:1>",
                                                  "b <perfusion:other:1>"])
    assert prompts == ["a photo of  x ", "b "]
    assert sorted(data) == ["lora", "perfusion"]  # the first prompt's tags only
    (params,) = data["perfusion"]
    assert params.items == ["teddy", "0.15", "beta=0.5", "a=b=c"]
    assert params.positional == ["teddy", "0.15", "a=b=c"] and params.named == {"beta": "0.5"}
    assert params == extra_networks.ExtraNetworkParams(["teddy", "0.15", "beta=0.5", "a=b=c"])
    assert extra_networks.parse_prompt("no tags <not a tag> <x-y:z>")[1] == {}


def test_tag_free_job_activates_with_empty_list_and_never_deactivates():
    log = []
    extra_networks.register_extra_network(RecordingNetwork(log))
    _, res = run_job(log, prompt="a photo", n_iter=2)
    activations = [e for e in log if e[0] == "activate"]
    assert activations == [("activate", [], False)] * 2
    assert ("deactivate",) not in log
    assert [e[0] for e in log[:7]] == ["process", "before_process_batch", "activate", "after_extra_networks_activate",
                                       "process_batch", "process_before_every_sampling", "sample"]
    assert log[0] == ("process", ("knob",))
    assert log[-1] == ("postprocess",) and len(res.images) == 2
    assert errors.exception_records == []


def test_tags_activate_per_batch_again_for_hires_then_deactivate_once():
    log = []
    extra_networks.register_extra_network(RecordingNetwork(log))
    extra_networks.register_extra_network(RecordingNetwork(log, "other"))
    p, res = run_job(log, prompt=["<perfusion:teddy:0.15> a photo", "<perfusion:bear:1> b"], batch_size=2, enable_hr=True)
    teddy = ("activate", [["teddy", "0.15"]], False)
    assert log == [
        ("process", ("knob",)),
        ("before_process_batch", ["<perfusion:teddy:0.15> a photo", "<perfusion:bear:1> b"]),
        teddy, ("activate", [], False), ("after_extra_networks_activate", False),
        ("process_batch", [" a photo", " b"]),
        ("process_before_every_sampling", False, (2, 4, 8, 8)),
        ("sample", False, [" a photo", " b"]),
        ("activate", [["teddy", "0.15"]], True), ("activate", [], True), ("after_extra_networks_activate", True),
        ("before_hr",),
        ("process_before_every_sampling", True, (2, 4, 16, 16)),
        ("sample", True, [" a photo", " b"]),
        ("deactivate",), ("deactivate",),  # the tagged network, then every other registered one
        ("postprocess",),
    ]
    assert p.is_hr_pass is False
    assert res.infotexts[0].startswith("<perfusion:teddy:0.15> a photo\nSteps: 2")
    assert "Hires upscale: 2.0" in res.infotexts[0] and "Hires prompt" not in res.infotexts[0]
    assert errors.exception_records == []


def test_deactivate_depends_on_the_last_batch_only():
    log = []
    extra_networks.register_extra_network(RecordingNetwork(log))
    run_job(log, prompt=["<perfusion:a:1> x", "y"], n_iter=2)
    assert [e for e in log if e[0] in ("activate", "deactivate")] == [("activate", [["a", "1"]], False), ("activate", [], False)]


def test_model_load_order_and_dummy_activate(monkeypatch):
    log = []

    class Seen(extra_networks.ExtraNetwork):
        def activate(self, p, params_list):
            log.append(("activate", p.prompt, p.all_prompts, p.scripts, params_list))

    class Clip:
        def tokenize(self, texts):
            return [[1000 + sum(map(ord, t))] for t in texts]

        def encode_embedding_init_text(self, text, n):
            return torch.zeros(n, 8)

    class Model:
        cond_stage_model = Clip()

        def get_learned_conditioning(self, texts):
            return torch.zeros(len(texts), 77, 8)

    extra_networks.register_extra_network(Seen("perfusion"))
    script_callbacks.on_model_loaded(lambda m: log.append(("model_loaded", m is shared.sd_model)))
    monkeypatch.setattr(sd_models, "instantiate_from_config", lambda config, state_dict=None: Model())
    db = sd_hijack.model_hijack.embedding_db
    db.register_embedding(Embedding(torch.ones(1, 8), "teddy"), Model())
    assert "teddy" in db.word_embeddings
    model = sd_models.load_model()
    assert log == [("model_loaded", True), ("activate", "", None, None, [])]
    assert db.word_embeddings == {} and model.cond_stage_model_empty_prompt.shape == (1, 77, 8)


def test_extension_scripts_callbacks_and_reload_ui():
    ext = os.path.join(paths.extensions_dir, "ext-test")
    os.makedirs(os.path.join(ext, "scripts"))
    with open(os.path.join(ext, "scripts", "entry.py"), "w") as f:
        f.write(textwrap.dedent("""
            import sys
            from modules import script_callbacks, scripts, shared
            LOG = sys.modules["__standin_log__"]
            LOG.append(("import", scripts.basedir(), __name__ in sys.modules))
            script_callbacks.on_before_ui(lambda: LOG.append("before_ui"))
            script_callbacks.on_script_unloaded(lambda: LOG.append("unloaded"))
            script_callbacks.on_ui_settings(lambda: shared.opts.add_option("ext_knob", shared.OptionInfo(
                0.5, "Knob", None, {"minimum": 0}, section=("ext", "Ext"))))
            def drop_mine():
                script_callbacks.remove_current_script_callbacks()
            class Entry(scripts.Script):
                def title(self):
                    return "Entry"
                def show(self, is_img2img):
                    return scripts.AlwaysVisible
        """))
    log = sys.modules["__standin_log__"] = []
    try:
        extensions.list_extensions()
        scripts.load_scripts()
        assert log == [("import", ext, False)]
        assert [c.name for c in script_callbacks.callback_map["callbacks_before_ui"]] == ["ext-test/entry.py/before_ui"]
        script_callbacks.before_ui_callback()
        script_callbacks.ui_settings_callback()
        assert shared.opts.ext_knob == 0.5 and shared.opts.data_labels["ext_knob"].section == ("ext", "Ext")
        # Reload UI: unload callbacks, then scripts run again on a cleared callback registry
        script_callbacks.app_reload_callback()
        script_callbacks.script_unloaded_callback()
        scripts.load_scripts()
        script_callbacks.before_ui_callback()
        assert log[1:] == ["before_ui", "unloaded", ("import", ext, False), "before_ui"]
        assert len(script_callbacks.callback_map["callbacks_script_unloaded"]) == 1
        assert [d.script_class.__name__ for d in scripts.scripts_data] == ["Entry"]
        module = scripts.scripts_data[0].module
        script_callbacks.on_app_started(lambda demo, app: None)  # registered from this test file: survives
        module.drop_mine()
        assert all(not cbs or all(c.script == __file__ for c in cbs) for cbs in script_callbacks.callback_map.values())
        assert len(script_callbacks.callback_map["callbacks_app_started"]) == 1
        assert errors.exception_records == []
    finally:
        shutil.rmtree(ext)
        extensions.list_extensions()
        del sys.modules["__standin_log__"]


def test_options():
    calls = []
    opts = shared.opts
    opts.add_option("standin_beta", shared.OptionInfo(0.75, "Beta", None, {"minimum": 0}, section=("perfusion", "Perfusion")))
    assert opts.standin_beta == 0.75 and opts.data["standin_beta"] == 0.75
    opts.onchange("standin_beta", lambda: calls.append(opts.standin_beta), call=False)
    assert opts.set("standin_beta", 0.5) and calls == [0.5]
    opts.standin_beta = 0.25  # attribute assignment: no onchange
    assert opts.data["standin_beta"] == 0.25 and calls == [0.5]
    shared.options_templates.update(shared.options_section(("perfusion", "Perfusion"), {"standin_tmpl": shared.OptionInfo(3)}))
    assert opts.standin_tmpl == 3 and "standin_tmpl" not in opts.data
    with pytest.raises(AttributeError):
        opts.no_such_option  # noqa: B018
    assert shared.cmd_opts.api is False and shared.cmd_opts.lowvram is False and shared.cmd_opts.data_dir == paths.data_path


def test_infotext_round_trip_and_paste_callback():
    script_callbacks.on_infotext_pasted(lambda text, params: params.update(Prompt=params["Prompt"].replace("old", "new")))
    p = processing.StableDiffusionProcessingTxt2Img(prompt="<perfusion:old:0.2> x", steps=3, width=64, height=64, seed=7,
                                                    extra_generation_params={"Perfusion": "old: 0.2, beta 0.5"})
    p.setup_prompts()
    p.all_seeds, p.all_subseeds = [7], [7]
    text = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds)
    params = infotext_utils.parse_generation_parameters(text)
    script_callbacks.infotext_pasted_callback(text, params)
    assert params["Perfusion"] == "old: 0.2, beta 0.5" and params["Prompt"] == "<perfusion:new:0.2> x"
    assert params["Size-1"] == "64" and params["Seed"] == "7"


def test_gpu_call_wrapper():
    seen = []
    f = call_queue.wrap_gradio_gpu_call(lambda task, x: (seen.append(shared.state.job_count) or x, "<p>ok</p>"), extra_outputs=[None])
    out = f("task(abc)", 5)
    assert out[0] == 5 and out[1].startswith("<p>ok</p><div class='performance'>") and seen == [-1]
    assert shared.state.job_count == 0 and call_queue.queue_lock.acquire(blocking=False)
    call_queue.queue_lock.release()
    bad = call_queue.wrap_gradio_gpu_call(lambda: 1 / 0, extra_outputs=[None])()
    assert bad[0] is None and "ZeroDivisionError" in bad[1]
    errors.exception_records.clear()


def test_extra_networks_page(tmp_path):
    for name in ("teddy.safetensors", "teddy.preview.png", "teddy.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "teddy.json").write_text('{"description": "from json"}')

    class Page(ui_extra_networks.ExtraNetworksPage):
        def list_items(self):
            path = str(tmp_path / "teddy")
            item = {"name": "teddy", "filename": path + ".safetensors", "preview": self.find_preview(path),
                    "description": self.find_description(path), "search_terms": [self.search_terms_from_path(path)],
                    "local_preview": path + ".png", "sort_keys": self.get_sort_keys(path + ".safetensors"),
                    "prompt": ui_extra_networks.quote_js("<perfusion:teddy:") + " + 0.15 + " + ui_extra_networks.quote_js(">")}
            self.read_user_metadata(item)
            yield item

        def allowed_directories_for_previews(self):
            return [str(tmp_path)]

    page = Page("Perfusion")
    ui_extra_networks.register_page(page)
    assert ui_extra_networks.extra_pages == [page] and str(tmp_path) in ui_extra_networks.allowed_dirs
    html = page.create_html("txt2img")
    item = page.items["teddy"]
    assert "teddy.preview.png" in item["preview"] and item["description"] == "from json"
    assert "cardClicked(&#x27;txt2img&#x27;, &quot;&lt;perfusion:teddy:&quot; + 0.15" in html
    assert ui_extra_networks.quote_js('a"b\\') == '"a\\"b\\\\"'
