"""TensorBoard logs of a training run, when the WebUI's own "Enable tensorboard logging" (Settings > Training)
is on: loss, learning rates, the superclass word's gate and (with "Save generated images within tensorboard")
the previews, under the run's folder in `tensorboard/`, as the WebUI's textual-inversion trainer writes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..edit import gate
from ..train import Progress
from . import host
from .log import log


def _summary_writer() -> Any:
    """torch's SummaryWriter class (it needs the `tensorboard` package, which the WebUI does not install)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class Board:
    """One run's writer; every method is a no-op after close()."""

    def __init__(self, writer: Any, images: bool, train_beta: float, train_tau: float):
        self.writer, self.images, self.beta, self.tau = writer, images, train_beta, train_tau

    @classmethod
    def open(cls, run_folder: Path, train_beta: float, train_tau: float) -> Optional[Board]:
        """The run's board, or None when the setting is off or tensorboard is missing (said once in the console)."""
        if not host.webui_option("training_enable_tensorboard", False):
            return None
        try:
            writer_class = _summary_writer()
        except ImportError as e:
            log.warning(
                f"tensorboard logging is on (Settings > Training) but cannot start ({e}); "
                "install it in the WebUI's environment: pip install tensorboard"
            )
            return None
        folder = Path(run_folder) / "tensorboard"
        folder.mkdir(parents=True, exist_ok=True)
        flush = int(host.webui_option("training_tensorboard_flush_every", 120))
        writer = writer_class(log_dir=str(folder), flush_secs=flush)
        images = bool(host.webui_option("training_tensorboard_save_images", False))
        return cls(writer, images, train_beta, train_tau)

    def step(self, p: Progress) -> None:
        """Scalars of one optimiser step (x axis: the step)."""
        if self.writer is None:
            return
        superclass_gate = float(gate(torch.tensor(p.superclass_similarity), self.beta, self.tau))
        for tag, value in (
            ("Loss/train", p.loss),
            ("Loss/smoothed", p.smoothed),
            ("Learn rate/values", p.lr_values),
            ("Learn rate/embedding", p.lr_embedding),
            ("Gate/superclass similarity", p.superclass_similarity),
            ("Gate/superclass gate", superclass_gate),
            ("Speed/steps per s", p.it_per_s),
        ):
            self.writer.add_scalar(tag, value, global_step=p.step)

    def image(self, picture: Any, step: int) -> None:
        """A preview (PIL image) at `step`, when the WebUI's setting asks for images."""
        if self.writer is None or not self.images or picture is None:
            return
        self.writer.add_image("Preview", np.asarray(picture.convert("RGB")), global_step=step, dataformats="HWC")

    def with_images(self, preview: Optional[Callable[[Any, int], Any]]) -> Optional[Callable[[Any, int], Any]]:
        """`preview` that also logs the picture it returns (None stays None)."""
        if preview is None:
            return None

        def logged(concept: Any, step: int) -> Any:
            picture = preview(concept, step)
            self.image(picture, step)
            return picture

        return logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
