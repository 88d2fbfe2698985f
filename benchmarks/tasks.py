"""RULER-style synthetic long-context retrieval tasks for the byte-level tinyllama-byte-32k (no downloads).

Every sample is a prompt of exactly `context` tokens (token ids = UTF-8 bytes, plus the BOS id 256 first) and an
answer string of digits. The prompt formats are the ones in models/tinyllama-byte-32k/EVAL.md (the model was trained
on them); the haystack comes from text present on the machine (see `load_haystack`).

    from tasks import make_samples, TASKS
    samples = make_samples("passkey", context=4096, n=50, seed=0)
    samples[0].ids        # list[int], len == 4096, ids[0] == 256
    samples[0].answer     # "57213"
    samples[0].depth      # where the queried needle sits, 0 = right after BOS, 1 = right before the question

Tasks (TASKS):
    passkey     one needle "The pass key is NNNNN. Remember it. NNNNN is the pass key." (5 digits)
    kv          16 lines "key-xxxxxx: NNNNNN" scattered; query one (6 digits)
    niah        one needle "The special magic number for <word> is: NNNNNNN." (7 digits)
    niah_multi  4 such needles with different words; query one (the EVAL.md multi-needle task)
The queried needle's depth sweeps (0, 1) over the n samples of a cell (sample i: depth (i + 0.5) / n, so even 2
samples put it away from the sink and the window); other needles sit at random depths. Everything is deterministic in (task, context, sample index, seed).
"""
from __future__ import annotations

import ast
import glob
import hashlib
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field

BOS = 256
TASKS = ("passkey", "kv", "niah", "niah_multi")

# Needle words for the magic-number tasks (ordinary English nouns; none of them is needed in the haystack).
NEEDLE_WORDS = (
    "apple", "anchor", "badger", "balloon", "bamboo", "beacon", "biscuit", "blizzard", "butterfly", "cactus",
    "canyon", "caramel", "castle", "cherry", "chimney", "cobalt", "compass", "copper", "coral", "cricket",
    "crystal", "dolphin", "dragon", "eclipse", "emerald", "falcon", "feather", "fountain", "galaxy", "garnet",
    "glacier", "harbor", "harvest", "hazel", "helmet", "horizon", "iceberg", "island", "ivory", "jaguar",
    "jasmine", "kettle", "kingdom", "ladder", "lantern", "lemon", "lighthouse", "lizard", "magnet", "mango",
    "maple", "marble", "meadow", "meteor", "mirror", "monsoon", "mosaic", "mountain", "nectar", "nutmeg",
    "oasis", "octopus", "orchard", "otter", "palace", "panther", "parrot", "pebble", "pepper", "pillow",
    "planet", "pumpkin", "quartz", "rabbit", "raccoon", "rainbow", "raven", "river", "rocket", "saddle",
    "saffron", "sapphire", "scarlet", "shadow", "sparrow", "spider", "squirrel", "falconet", "sunflower", "tiger",
    "thunder", "timber", "tornado", "trumpet", "tulip", "turtle", "umbrella", "valley", "velvet", "violin",
    "volcano", "walnut", "waterfall", "whistle", "willow", "window", "winter", "wizard", "zebra", "zephyr",
)

_FALLBACK_WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which not but have has can all "
    "one will their there been if more when other into some time only new may these two would such also any most "
    "first over after used file system data user program value list option default number line command package "
    "output input version support source table function server client page window state change error message "
    "order point group field process memory access name type text string format buffer network device option"
).split()


# ----------------------------------------------------------------------------------------------------------------
# haystack text
# ----------------------------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    """ASCII only (so byte offsets are character offsets), no form feeds/tabs/CRs, at most one blank line in a row."""
    text = text.replace("\r", "").replace("\t", "    ").replace("\f", "")
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\x20-\x7e\n]", "", text)
    text = re.sub(r"[ ]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n\n"


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 200:  # skip one-liners: keep prose-like paragraphs
                out.append(doc)
    return out


def generated_text(n_bytes: int, seed: int = 1234) -> str:
    """Deterministic English-like filler (used only when no text files are found on the machine)."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        sent = []
        for _ in range(rng.randint(8, 22)):
            sent.append(rng.choice(_FALLBACK_WORDS))
        s = " ".join(sent)
        s = s[0].upper() + s[1:] + "."
        if rng.random() < 0.15:
            s += "\n\n"
        else:
            s += " "
        parts.append(s)
        size += len(s)
    return "".join(parts)


def _stdlib_dir() -> str | None:
    try:
        return sysconfig.get_paths()["stdlib"]
    except (KeyError, OSError):
        return None


_HAYSTACK_CACHE: dict = {}


def load_haystack(min_bytes: int = 1 << 20, sources: str = "auto") -> tuple[str, str]:
    """A long ASCII text for haystacks, and a description of where it came from.

    sources="auto": the licence texts in /usr/share/common-licenses/ (any Debian machine), the Python stdlib's
    LICENSE.txt and the docstrings (>= 200 characters) of the stdlib's top-level *.py modules, in sorted order,
    until `min_bytes`; when fewer than `min_bytes` are found, the deterministic generated text fills up the rest.
    sources="generated": only the generated text (for tests that must not depend on the machine).
    """
    key = (min_bytes, sources)
    if key in _HAYSTACK_CACHE:
        return _HAYSTACK_CACHE[key]
    chunks, names, size = [], [], 0
    if sources == "auto":
        files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
        std = _stdlib_dir()
        if std:
            lic = os.path.join(std, "LICENSE.txt")
            if os.path.isfile(lic):
                files.append(lic)
        for p in files:
            if size >= min_bytes:
                break
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    t = _clean(f.read())
            except OSError:
                continue
            if len(t) > 500:
                chunks.append(t)
                size += len(t)
                names.append(p)
        if std and size < min_bytes:
            n_mod = 0
            for p in sorted(glob.glob(os.path.join(std, "*.py"))):
                if size >= min_bytes:
                    break
                docs = _docstrings(p)
                if docs:
                    t = _clean("\n\n".join(docs))
                    chunks.append(t)
                    size += len(t)
                    n_mod += 1
            if n_mod:
                names.append(f"{n_mod} stdlib module docstrings ({std})")
    elif sources != "generated":
        raise ValueError(f"sources must be 'auto' or 'generated', got {sources!r}")
    if size < min_bytes:
        chunks.append(generated_text(min_bytes - size + 1024))
        names.append("generated text")
    text = "".join(chunks)
    desc = f"{len(text)} bytes from " + ", ".join(names if len(names) <= 4 else names[:3] + [f"... ({len(names)} sources)"])
    _HAYSTACK_CACHE[key] = (text, desc)
    return text, desc


# ----------------------------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    task: str
    context: int
    index: int
    ids: list  # token ids, len == context, ids[0] == BOS
    answer: str  # digits the model must produce
    depth: float  # relative position of the queried needle in the haystack (0 = start)
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return bytes(self.ids[1:]).decode("ascii")


def _rng(task: str, context: int, index: int, seed: int) -> random.Random:
    h = hashlib.sha256(f"{task}|{context}|{index}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def _needles_and_question(task: str, rng: random.Random):
    """-> (list of needle strings, index of the queried needle, question, answer)."""
    if task == "passkey":
        key = _digits(rng, 5)
        return [f"The pass key is {key}. Remember it. {key} is the pass key.\n"], 0, "\nWhat is the pass key? The pass key is ", key
    if task == "kv":
        keys, vals = [], []
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        while len(keys) < 16:
            k = "key-" + "".join(rng.choice(alphabet) for _ in range(6))
            if k not in keys:
                keys.append(k)
                vals.append(_digits(rng, 6))
        q = rng.randrange(16)
        needles = [f"{k}: {v}\n" for k, v in zip(keys, vals)]
        return needles, q, f"\nWhat is the value of {keys[q]}? {keys[q]}: ", vals[q]
    if task in ("niah", "niah_multi"):
        n = 1 if task == "niah" else 4
        words = rng.sample(NEEDLE_WORDS, n)
        nums = []
        while len(nums) < n:
            v = _digits(rng, 7)
            if v not in nums:
                nums.append(v)
        q = rng.randrange(n)
        needles = [f"The special magic number for {w} is: {v}.\n" for w, v in zip(words, nums)]
        w = words[q]
        return needles, q, f"\nWhat is the special magic number for {w}? The special magic number for {w} is: ", nums[q]
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _boundary(hay: str, pos: int) -> tuple[int, bool]:
    """Where to insert a needle near `pos`: (offset, needs_newline). The start of the line containing `pos` when it
    is at most 400 characters back; else just after the nearest space before `pos` (the needle then gets a leading
    newline so it still sits on its own line)."""
    if pos <= 0:
        return 0, False
    if pos >= len(hay):
        return len(hay), not hay.endswith("\n")
    nl = hay.rfind("\n", max(0, pos - 400), pos)
    if nl >= 0:
        return nl + 1, False
    sp = hay.rfind(" ", max(0, pos - 100), pos)
    return (sp + 1 if sp >= 0 else pos), True


def make_sample(task: str, context: int, index: int, n: int, seed: int = 0, haystack: str | None = None) -> Sample:
    """Sample `index` of `n` for one (task, context) cell; the queried needle's depth is (index + 0.5) / n."""
    if haystack is None:
        haystack, _ = load_haystack(max(1 << 20, 2 * context))
    rng = _rng(task, context, index, seed)
    needles, q, question, answer = _needles_and_question(task, rng)
    reserve = context - 1 - len(question) - sum(len(x) + 1 for x in needles)  # +1: a possible leading newline
    if reserve < 16:
        raise ValueError(f"context {context} is too short for task {task!r} (needs > {context - reserve + 16} tokens)")
    start = rng.randrange(len(haystack))
    hay = haystack[start:] + haystack[:start]
    while len(hay) < context:  # a haystack source shorter than the context: repeat it
        hay = hay + haystack
    rest = hay[reserve:]  # continuation that fills up what the unused newlines leave
    hay = hay[:reserve]
    depth = (index + 0.5) / n
    depths = [rng.random() for _ in needles]
    depths[q] = depth
    # insert needles at line starts (or word boundaries), deepest first so earlier offsets stay valid
    spots = [_boundary(hay, int(round(d * reserve))) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (spots[i][0], i), reverse=True)
    text = hay
    for i in order:
        pos, nl = spots[i]
        text = text[:pos] + ("\n" if nl else "") + needles[i] + text[pos:]
    text = text + rest[: context - 1 - len(question) - len(text)]
    text = text + question
    positions = [p for p, _ in spots]
    ids = [BOS] + list(text.encode("ascii"))
    assert len(ids) == context, (len(ids), context)
    return Sample(task, context, index, ids, answer, depth,
                  {"needle_positions": sorted(positions), "queried_position": positions[q], "haystack_chars": reserve,
                   "n_needles": len(needles)})


def make_samples(task: str, context: int, n: int, seed: int = 0, haystack: str | None = None) -> list[Sample]:
    if haystack is None:
        haystack, _ = load_haystack(max(1 << 20, 2 * context))
    return [make_sample(task, context, i, n, seed, haystack) for i in range(n)]


def natural_text_ids(context: int, continuation: int, seed: int = 0, haystack: str | None = None) -> list[int]:
    """BOS + `context - 1 + continuation` bytes of haystack text (for teacher-forced KL), starting at a line start."""
    if haystack is None:
        haystack, _ = load_haystack(max(1 << 20, 2 * (context + continuation)))
    rng = _rng("natural", context, continuation, seed)
    need = context - 1 + continuation
    start = _boundary(haystack, rng.randrange(len(haystack)))[0]
    text = haystack[start:] + haystack[:start]
    while len(text) < need:
        text += haystack
    return [BOS] + list(text[:need].encode("ascii"))


def score(answer: str, generated: str) -> bool:
    """Greedy exact match: the leading run of digits of the generation (after optional spaces) equals the answer."""
    m = re.match(r"\s*(\d+)", generated)
    return bool(m) and m.group(1) == answer


def decode(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
