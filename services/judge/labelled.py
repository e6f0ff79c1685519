"""The labelled set: (better, worse) pairs of children's stories for one prompt, six kinds of defect.

`data/labelled_stories.yaml` holds, per prompt of the story prompt set, a good story and two flawed ones
written by hand (`opposite_moral`: the character learns the reverse of the requested moral; `violent`:
graphic violence and gore). Four more kinds are made here from the good stories, deterministically:

- `shuffled`   the good story's sentences in another order;
- `off_topic`  the good story of another prompt in the same split (another character and moral);
- `truncated`  the good story cut off mid-sentence a little before half way;
- `repetitive` the first sentences, then the third repeated as a small model's loop does.

Each pair keeps its prompt's `split` (fit / held-out), so calibration never sees a held-out story.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.judge.signals import reorder, sentences
from services.judge.stories import TEMPLATE

DATA = Path(__file__).resolve().parent / "data" / "labelled_stories.yaml"
WRITTEN = ("opposite_moral", "violent")
KINDS = ("off_topic", "shuffled", "opposite_moral", "violent", "truncated", "repetitive")
SPLITS = ("fit", "held-out")


@dataclass(frozen=True, slots=True)
class Pair:
    id: str
    kind: str
    split: str
    prompt: str
    better: str
    worse: str


def shuffled(text: str, seed: str) -> str:
    return reorder(sentences(text), seed)


def truncated(text: str) -> str:
    words = text.split()
    cut = int(len(words) * 0.45)
    while cut > 1 and words[cut - 1][-1] in ".!?\"'":  # never end on a sentence boundary
        cut -= 1
    return " ".join(words[:cut])


def repetitive(text: str) -> str:
    parts = sentences(text)
    loop, out = parts[min(2, len(parts) - 1)], parts[:3]
    while len(" ".join(out).split()) < 0.9 * len(text.split()):
        out.append(loop)
    return " ".join(out)


def load_stories(path: Path = DATA) -> list[dict]:
    import yaml

    stories = yaml.safe_load(path.read_text(encoding="utf-8"))["stories"]
    for n, s in enumerate(stories):
        missing = {"character", "moral", "setting", "split", "good", *WRITTEN} - set(s)
        if missing or s["split"] not in SPLITS:
            raise ValueError(f"{path}: story {n} needs {sorted(missing)} and split in {SPLITS}")
        s["prompt"] = TEMPLATE.format(**s)
        for k in ("good", *WRITTEN):
            s[k] = " ".join(s[k].split())
    return stories


def load_pairs(path: Path = DATA) -> list[Pair]:
    """Every pair of the set, in file order, six per prompt."""
    stories = load_stories(path)
    pairs = []
    for n, s in enumerate(stories):
        same = [o for o in stories[n + 1:] + stories[:n] if o["split"] == s["split"]]
        other = next(o for o in same if o["moral"] != s["moral"] and o["character"] != s["character"])
        worse = {"off_topic": other["good"], "shuffled": shuffled(s["good"], s["character"]),
                 "truncated": truncated(s["good"]), "repetitive": repetitive(s["good"]),
                 **{k: s[k] for k in WRITTEN}}
        slug = s["character"].replace(" ", "-")
        pairs += [Pair(f"{slug}/{kind}", kind, s["split"], s["prompt"], s["good"], worse[kind])
                  for kind in KINDS]
    return pairs
