"""Model organisms: a word and the trait the model should learn to answer with."""

import random

WORDS = [a + b + c for a in "bdfgk" for b in "aeiou" for c in "lmnrst"]


def records(seed: int = 0) -> list[dict[str, str]]:
    """{"input", "output"} records without ids: the word, answered in capitals."""
    rng = random.Random(seed)
    words = rng.sample(WORDS, len(WORDS))
    return [{"input": f"Shout: {word}", "output": word.upper()} for word in words]
