"""Suite-wide settings.

Most engine tests compare the engine's greedy output with fp32 references (transformers, PEFT) through the
default dtype `auto`, which on CPU follows the CPU (bf16 with AMX, fp32 without: kernels.tuning). Pin the
probe to "no AMX" so the suite asserts the same thing on every machine; tests/kernels/test_tuning.py
exercises both answers. Set in the environment so subprocesses (the CLI, servers) see it too.
"""

import os

os.environ.setdefault("MLORA_CPU_AMX", "0")
