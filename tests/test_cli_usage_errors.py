"""Bad flag values are usage errors across commands: exit 2 (README), one line, no traceback."""

from __future__ import annotations

import pytest

from tests.test_cli import run_cli


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("serve", "--dtype", "int4"), "dtype must be one of auto, float32, bfloat16, float16, got 'int4'"),
        (("serve", "--device", "tpu"), "device must be one of auto, cpu, cuda, got 'tpu'"),
        (("serve", "--lora-dtype", "int8"), "lora_dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
        (("budget", "--lora-dtype", "float64"), "unsupported dtype float64"),
        (("serve", "--max-loras", "4", "--max-cpu-loras", "2"), "max_cpu_loras (2) must be >= max_loras (4)"),
        (("bench", "--zipf", "0"), "--zipf must be > 0"),
        (("bench", "--rate", "0"), "--rate must be > 0"),
        (("bench", "--preset", "tiny", "--model", "some/dir"), "give either --preset or --model, not both"),
        (("serve", "--lora-weight", "upper=0"), "--lora-weight upper must be a number > 0, got 0.0"),
        (("serve", "--lora-weight", "upper"), "--lora-weight expects NAME=WEIGHT, got 'upper'"),
        (("bench", "--workload", "flood", "--rate", "0"), "--rate must be > 0 requests/s"),
        (("budget", "--dtype", "int4"), "unsupported dtype int4"),
        (("validate", "x", "--max-lora-rank", "0"), "--max-lora-rank"),
        # merge's flag values were exit 1 (ConfigError); they are usage errors like every other command's
        (("merge", "x", "--base", "b", "--out", "o", "--weight", "nan"), "--weight must be a finite number, got nan"),
        (("merge", "x", "--base", "b", "--out", "o", "--weight", "inf"), "--weight must be a finite number, got inf"),
        (("merge", "x", "--base", "b", "--out", "o", "--tolerance", "-1"), "--tolerance must be a number >= 0, got -1.0"),
        (("merge", "x", "--base", "b", "--out", "o", "--dtype", "int8"),
         "--dtype must be one of auto, float32, float16, bfloat16, got 'int8'"),
        (("merge", "x", "--base", "b", "--out", "o", "--weight", "0.5", "--weight", "0.5"),
         "got 1 adapter(s) but 2 --weight value(s)"),
        (("merge", "--base", "b", "--out", "o"), "no adapter given"),
    ],
)
def test_bad_flag_values_exit_2(args, fragment):
    res = run_cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert fragment in res.stderr and "Traceback" not in res.stderr + res.stdout
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: ") or first.startswith("Usage: "), res.stderr  # ours, or click's own
