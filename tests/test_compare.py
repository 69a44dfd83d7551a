"""`wmss compare` end to end on tiny toy models: table + JSON + PNGs, resume skips finished runs, a failing arm."""


def broken_reward(prompts, completions, **kwargs):
    """A reward function that fails: the `broken` arm of the tests overrides `reward_funcs` with it."""
    raise RuntimeError("broken_reward: this arm is meant to fail")
