"""modules/sd_hijack.py: model_hijack with its embedding DB, comments and extra_generation_params
(the CLIP/U-Net patching and cross-attention optimizations are left out)."""
from modules.shared import cmd_opts


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        import modules.textual_inversion.textual_inversion
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = modules.textual_inversion.textual_inversion.EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(cmd_opts.embeddings_dir)

    def hijack(self, m):
        self.clip = getattr(m, "cond_stage_model", None)

    def undo_hijack(self, m):
        self.clip = None

    def apply_circular(self, enable):
        self.circular_enabled = enable

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
