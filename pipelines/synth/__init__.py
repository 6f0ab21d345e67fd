"""Dialogue synthesis: the offline generator (known facts, checkable answers; the default) and the
LLM-backed one (real captions + an LM), both writing the DIALOGUES schema. See :mod:`.generate`."""
