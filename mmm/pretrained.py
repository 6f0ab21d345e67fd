"""Loading a named checkpoint with one clear error. Its own module, without torch, so the tokenizer
and the chat template (which a dialogue-import actor loads) do not import the encoders."""

from __future__ import annotations


class CheckpointUnavailableError(RuntimeError):
    """A named checkpoint could not be loaded (no hub access, wrong path)."""


def load_pretrained(loader, name: str, what: str, **kwargs):
    """Call a ``from_pretrained`` and turn any failure into one clear sentence."""
    try:
        return loader(name, **kwargs)
    except Exception as exc:  # hub/network/path errors come in many types
        raise CheckpointUnavailableError(
            f"cannot load the {what} checkpoint {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}. "
            "Give a local path to the checkpoint (`python jobs/weights.py small-real` makes the small-real "
            "preset's folders offline), or use the offline 'tiny' preset."
        ) from None
