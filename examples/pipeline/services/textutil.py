"""Text handling shared by the content processor and the search service: HTML to text, chunks,
and a small deterministic embedding (feature hashing of words, L2-normalised).

A real pipeline would call an embedding model here; the hashing trick keeps the demo free of model
downloads while still doing real work per request (tokenising, hashing, normalising).
"""

from __future__ import annotations

import hashlib
import html.parser
import math
import re

DIMENSIONS = 128
WORDS_PER_CHUNK = 60

_WORD = re.compile(r"[a-z0-9]+")


class _TextExtractor(html.parser.HTMLParser):
    """Keeps the visible text of a page: everything outside <script>, <style> and <head>."""

    _SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data):
        if not self._skipping and data.strip():
            self.parts.append(data.strip())


def html_to_text(page: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(page)
    extractor.close()
    return " ".join(extractor.parts)


def chunks(text: str, size: int = WORDS_PER_CHUNK) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def embed(text: str) -> list[float]:
    """A DIMENSIONS-long unit vector: each word adds +-1 to the slot its hash picks."""
    vector = [0.0] * DIMENSIONS
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "little") % DIMENSIONS
        vector[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector
