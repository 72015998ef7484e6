"""The state-word x template prompt ensemble shared by the fixed-text methods (APRIL-GAN, MVFA).

Each state word wraps the object word ("flawless {}"), each template wraps the result ("a photo of the {}.").
The template list and its order belong to each method (the order changes the float sums of the text means),
so it is passed in; the 7 normal / 5 abnormal states are the same for both methods and live here.
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")


def ensemble_sentences(objective: str, templates: tuple[str, ...]) -> dict[str, list[str]]:
    """{"normal": 7 x len(templates) sentences, "abnormal": 5 x len(templates)} for an object word.

    States are the outer loop, templates the inner one."""
    return {
        cls: [t.format(s.format(objective)) for s in states for t in templates]
        for cls, states in (("normal", NORMAL_STATES), ("abnormal", ABNORMAL_STATES))
    }
