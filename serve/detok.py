"""Incremental detokenization with stop sequences, for streaming.

A byte-level BPE emits pieces of UTF-8 characters, and a stop sequence can arrive split over
several tokens; the client must see neither a half character nor the start of a stop string
that later completes. So each push re-decodes the completion, cuts at the first stop sequence,
and holds back a trailing replacement character and any suffix that could still become a stop.

    stream = TextStream(tokenizer_decode, stops=("\n\n",))
    for tok in tokens:
        delta = stream.push(tok)          # text safe to send now ("" when held back)
        if stream.stopped: break
    delta = stream.flush()                # what was held back, once generation ends

A continued answer (the client wrote its start) decodes after ``prefix``, the last tokens of the
client's text: a tokenizer's decoder drops the leading space of a string (SentencePiece's "▁",
the tiny tokenizer's Strip), which is the space that joins the continuation to the client's last
word ("It is" + " a red circle"). vLLM decodes after the prompt's tail for the same reason.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (),
                 prefix: Sequence[int] = ()) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._prefix = [int(t) for t in prefix]
        self._prefix_text = decode(self._prefix) if self._prefix else ""
        self.ids: list[int] = []
        self.text = ""
        """The completion so far, cut at a stop sequence once one appears."""
        self.sent = 0
        """Characters of ``text`` already handed out."""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self._completion()
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        self.text = text
        return self._take(self._safe_end(text))

    def _completion(self) -> str:
        if self._prefix:
            text = self._decode(self._prefix + self.ids)
            if text.startswith(self._prefix_text):
                return text[len(self._prefix_text):]
        return self._decode(self.ids)

    def flush(self) -> str:
        """Everything not yet sent (generation is over, so nothing can complete a stop now)."""
        return self._take(len(self.text))

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, end - self.sent), hold, -1):
                if text[end - k:end] == stop[:k]:
                    hold = k
                    break
        return end - hold

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
