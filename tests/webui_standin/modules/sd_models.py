"""modules/sd_models.py: the part of a model load an extension notices, in the WebUI's order:
hijack, embeddings DB force-reloaded (emptied), on_model_loaded callbacks, then get_empty_cond(), which
calls extra_networks.activate() on a dummy StableDiffusionProcessingTxt2Img() (prompt "", all_prompts None,
scripts None) before encoding "". reload_model_weights() to another checkpoint with the same config loads
weights into the same object and only re-fires on_model_loaded (no embeddings reload, no dummy activate);
switching to a model kept in memory (sd_checkpoints_limit > 1) fires nothing unless the VAE changes (not
modelled). Building the model is pluggable: replace instantiate_from_config(config, state_dict=None)."""
from modules import shared, script_callbacks, extra_networks, processing, sd_hijack, devices


class CheckpointInfo:
    def __init__(self, filename, name=None):
        self.filename = filename
        self.name = name or filename
        self.name_for_extra = self.model_name = self.title = self.name
        self.hash = self.sha256 = self.shorthash = None


def instantiate_from_config(config, state_dict=None):
    raise NotImplementedError("stand-in: a test supplies sd_models.instantiate_from_config")


def get_empty_cond(sd_model):
    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    if hasattr(sd_model, 'get_learned_conditioning'):
        d = sd_model.get_learned_conditioning([""])
    elif hasattr(sd_model, 'cond_stage_model'):
        d = sd_model.cond_stage_model([""])
    else:
        d = None
    return d['crossattn'] if isinstance(d, dict) else d


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    checkpoint_info = checkpoint_info or CheckpointInfo("model.ckpt")
    sd_model = instantiate_from_config(checkpoint_info, already_loaded_state_dict)
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.sd_model_checkpoint = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.shorthash
    sd_hijack.model_hijack.hijack(sd_model)
    shared.sd_model = sd_model
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    script_callbacks.model_loaded_callback(sd_model)
    with devices.autocast():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    sd_model = sd_model or shared.sd_model
    if sd_model is None or forced_reload:
        return load_model(info)
    if info is None or sd_model.sd_model_checkpoint == info.filename:
        return sd_model
    sd_model.sd_checkpoint_info = info
    sd_model.sd_model_checkpoint = info.filename
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model
