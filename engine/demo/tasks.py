"""The demo's string tasks and its held-out evaluation strings.

The built-in demo model copies its input; each shipped adapter applies one transformation.
Strings are lowercase ASCII letters and spaces. A string belongs to the held-out evaluation
split when a stable hash of it says so (about 1 in 10); training never samples those, so the
accuracy figures measure generalisation, not memory, and need no stored list of strings.
"""

from __future__ import annotations

import codecs
import random
import string
import zlib
from typing import Callable

ALPHABET = string.ascii_lowercase + " "
SPACE_PROB = 0.15
EVAL_MIN_LEN, EVAL_MAX_LEN = 3, 20
HELDOUT_MODULUS = 10  # 1 in HELDOUT_MODULUS strings is held out


def copy(s: str) -> str:
    """The base model's task: the string itself."""
    return s


def upper(s: str) -> str:
    """UPPERCASE the letters; spaces are kept."""
    return s.upper()


def reverse(s: str) -> str:
    """The string reversed, spaces included."""
    return s[::-1]


def rot13(s: str) -> str:
    """ROT13 of the letters; spaces are kept."""
    return codecs.encode(s, "rot13")


TASKS: dict[str, Callable[[str], str]] = {"copy": copy, "upper": upper, "reverse": reverse, "rot13": rot13}
ADAPTER_TASKS: tuple[str, ...] = ("upper", "reverse", "rot13")


def target(task: str | None, s: str) -> str:
    """Expected completion text of `task` for prompt `s` (None or "copy" = the base model)."""
    return TASKS[task or "copy"](s)


def is_heldout(s: str) -> bool:
    """True when `s` is in the evaluation split (stable across runs and machines)."""
    return zlib.crc32(s.encode("ascii")) % HELDOUT_MODULUS == 0


def random_string(rng: random.Random, min_len: int = EVAL_MIN_LEN, max_len: int = EVAL_MAX_LEN) -> str:
    """A random string of lowercase letters and spaces (each char a space with SPACE_PROB)."""
    n = rng.randint(min_len, max_len)
    return "".join(" " if rng.random() < SPACE_PROB else rng.choice(string.ascii_lowercase) for _ in range(n))


def runs_string(rng: random.Random, min_len: int, max_len: int) -> str:
    """A random string made of runs of repeated characters ("aaab  cc"): the hard case for
    reversal, which cannot then find its place by content alone."""
    n = rng.randint(min_len, max_len)
    out = ""
    while len(out) < n:
        c = " " if rng.random() < SPACE_PROB else rng.choice(string.ascii_lowercase)
        out += c * rng.randint(1, 4)
    return out[:n]


def training_string(rng: random.Random, min_len: int = 1, max_len: int = 24, runs_prob: float = 0.3) -> str:
    """A random string outside the held-out split (lengths a little wider than evaluation);
    with `runs_prob` it is built from repeated-character runs, which evaluation strings often
    contain (double spaces, "ooo") and a model must not trip over."""
    while True:
        if rng.random() < runs_prob:
            s = runs_string(rng, min_len, max_len)
        else:
            s = random_string(rng, min_len, max_len)
        if not is_heldout(s):
            return s


def copy_training_string(rng: random.Random, ascii_prob: float = 0.5) -> str:
    """A training string for the base: the evaluation alphabet, or (with `ascii_prob`) any
    printable ASCII. Copying all of printable ASCII makes the base useful on whatever a user
    types, and gives it trained outputs for the uppercase letters the `upper` adapter needs."""
    if rng.random() >= ascii_prob:
        return training_string(rng)
    while True:
        s = "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 24)))
        if not is_heldout(s):
            return s


def heldout_strings(n: int, seed: int = 1234) -> list[str]:
    """`n` distinct held-out strings of 3-20 characters, deterministic for a given seed."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = random_string(rng)
        if is_heldout(s) and s not in seen:
            seen.add(s)
            out.append(s)
    return out
