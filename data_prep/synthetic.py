"""Synthetic Polish corpora for tests and benchmarks: documents recombined from sentences of a base text.

Recombining sentences (rather than copying whole documents) keeps the vocabulary realistic while every generated
document is distinct, so the hash split and the BPE see a corpus that behaves like a larger real one.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterator

BUILTIN_SENTENCES = (
    "Warszawa jest stolicą Polski i największym miastem w kraju.",
    "Zażółć gęślą jaźń – to zdanie zawiera wszystkie polskie znaki diakrytyczne.",
    "Wisła płynie przez Kraków, Warszawę i Gdańsk, zanim wpadnie do Morza Bałtyckiego.",
    "Źródła historyczne wspominają o Mieszku I jako o pierwszym władcy Polski.",
    "Ćwiczenia fizyczne poprawiają zdrowie i samopoczucie każdego człowieka.",
    "Łódź była kiedyś ważnym ośrodkiem przemysłu włókienniczego.",
    "Śnieg padał przez całą noc, a rano dzieci lepiły bałwana.",
    "Żółw powoli szedł przez ogród, nie zwracając uwagi na psa.",
    "Ósma rano to dobra pora na śniadanie z kawą i chlebem.",
    "Litera Ń istnieje w alfabecie, choć żaden wyraz się od niej nie zaczyna.",
    "ĄĘ – wielkie litery z ogonkiem pojawiają się głównie w napisach WERSALIKAMI.",
    "Uniwersytet Jagielloński jest jedną z najstarszych uczelni w Europie Środkowej.",
    "Mikołaj Kopernik sformułował heliocentryczną teorię budowy Układu Słonecznego.",
    "Maria Skłodowska-Curie dwukrotnie otrzymała Nagrodę Nobla.",
    "Pociąg do Poznania odjeżdża z peronu trzeciego o godzinie 17:45.",
    "W 2023 roku zebrano rekordowe plony pszenicy, żyta i rzepaku.",
)


def sentences_from(path: Path | None) -> list[str]:
    """Sentences of a `{"text": ...}` JSONL file, or the built-in ones when no file is given."""
    if path is None:
        return list(BUILTIN_SENTENCES)
    sentences: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line)["text"]
                sentences += [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 3]
    return sentences or list(BUILTIN_SENTENCES)


def synthetic_documents(num_bytes: int, *, seed: int = 0, base: Path | None = None,
                        max_sentences: int = 40) -> Iterator[str]:
    """Distinct documents (a few sentences, sometimes several paragraphs) totalling about `num_bytes` of UTF-8."""
    rng = random.Random(seed)
    sentences = sentences_from(base)
    written = 0
    i = 0
    while written < num_bytes:
        paragraphs = [" ".join(rng.choices(sentences, k=rng.randint(1, max_sentences)))
                      for _ in range(1 + (rng.random() < 0.3))]
        doc = "\n\n".join(paragraphs) + f" (nr {i})"
        written += len(doc.encode("utf-8"))
        i += 1
        yield doc


def write_jsonl(path: Path, docs: Iterator[str] | list[str]) -> Path:
    """Write documents as speakleash-style JSONL lines ({"text": ..., "meta": {}})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "meta": {}}, ensure_ascii=False) + "\n")
    return path
