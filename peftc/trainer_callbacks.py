"""transformers Trainer callbacks, in a module `import peftc` does not load: transformers' Trainer takes a
second or two to import, and imports peft where it is installed."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class AdaLoraCallback(TrainerCallback):
    """A transformers Trainer callback: AdaLoRA's rank allocation after every optimizer step
    (`Trainer(model=am, callbacks=[AdaLoraCallback()])`), with the step PEFT's loop passes (0 first)."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        kwargs["model"].update_and_allocate(state.global_step)
