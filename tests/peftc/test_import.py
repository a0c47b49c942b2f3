import subprocess
import sys


def test_import_loads_neither_peft_nor_the_trainer():
    # peft is the oracle, not a dependency; transformers' Trainer imports it (and bitsandbytes) where installed,
    # which took two of `import peftc`'s four seconds and printed bitsandbytes' warnings
    probe = "import sys, peftc; print(sorted(m for m in ('peft', 'transformers.trainer_utils') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_trainer_callback_is_a_trainer_callback():
    from transformers import TrainerCallback

    from peftc.trainer_callbacks import AdaLoraCallback

    assert isinstance(AdaLoraCallback(), TrainerCallback)
