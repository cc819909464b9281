"""LongEmbed-style long-context retrieval, built offline: synthetic passkey and needle retrieval at
set token lengths, and QMSum meeting retrieval.

Synthetic tasks (as LongEmbed builds them; deterministic from ``seed`` and the length):

- **passkey**: every candidate document is filler text ("The grass is green. The sky is blue. ...")
  repeated to the target length, with one sentence "{name}'s passkey is {n}. Remember it. {n} is
  the passkey for {name}." inserted at a uniformly random depth; each document has its own name
  and 5-digit passkey. The query is "What is the pass key for {name}?" and its one relevant
  document is the one holding that name.
- **needle**: every candidate is a stretch of real prose (a haystack of consecutive MS MARCO
  passages from a random start) with one fact sentence (the needle, e.g. "The best thing to do in
  Lisbon is to ride the old yellow tram up the hill.") at a random depth; the query asks for that
  fact ("What is the best thing to do in Lisbon?"). Needles are built from templates over entity
  lists, distinct within a length.

Per length: ``num_candidates`` documents (100 in LongEmbed) and ``num_queries`` queries (50), each
query against all candidates; the metric is nDCG@1 (one relevant document: top-1 accuracy) x100.
A document of length L holds at most L tokens of the evaluated model's tokenizer, special tokens
included, and within one filler unit (or haystack sentence) of L: lengths are measured with the
tokenizer that will read them, so a "4096-token" document fills a 4096-token input exactly.

**QMSum** (``qmsum_task``): the test split's meeting transcripts ("speaker: content" lines) are
the candidates and its general and specific queries retrieve the transcript they were asked of.
Query texts that occur for more than one meeting ("Summarize the whole meeting.") are dropped (no
document answers them alone); the count is reported. Only the evaluation split is read.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Mapping, Sequence

import numpy as np

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

FIRST_NAMES = ("Ada", "Boris", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal",
               "Katja", "Luis", "Mariam", "Nikolai", "Olga", "Pedro", "Quentin", "Rosa", "Samir", "Tomas",
               "Ursula", "Viktor", "Wanda", "Xavier", "Yara", "Zoltan", "Amara", "Bruno", "Celia", "Dario",
               "Esther", "Felix", "Gloria", "Hugo", "Irene", "Jonas", "Leila", "Marco", "Nadia", "Oscar")
LAST_NAMES = ("Abbott", "Becker", "Castillo", "Dubois", "Eriksen", "Fischer", "Gallo", "Horvat", "Ivanova",
              "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi",
              "Schmidt", "Tanaka", "Ueda", "Vargas", "Weber", "Xu", "Yilmaz", "Zhou", "Almeida", "Brennan",
              "Costa", "Delgado", "Esposito", "Fournier", "Garcia", "Haddad", "Iglesias", "Janssen", "Keller",
              "Laurent", "Mendes", "Nielsen")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Tbilisi", "Hanoi", "Montreal", "Porto", "Seville",
          "Krakow", "Valparaiso", "Marrakesh", "Tallinn", "Cusco", "Bergen", "Ljubljana", "Cartagena",
          "Dubrovnik", "Valencia", "Salzburg", "Zanzibar", "Hobart", "Reykjavik", "Yerevan", "Bruges",
          "Granada", "Sapporo", "Istanbul", "Havana")
ACTIVITIES = ("to ride the old yellow tram up the hill", "to eat grilled sardines by the harbour at dusk",
              "to swim in the cold fjord before breakfast", "to climb the bell tower at sunrise",
              "to rent a rowing boat on the lake", "to read in the botanical garden on a rainy afternoon",
              "to cycle along the river to the lighthouse", "to listen to street musicians in the main square",
              "to visit the night market and try the dumplings", "to hike to the ruins above the valley")
FOODS = ("soup", "bread", "stew", "pie", "curry", "salad", "cake", "risotto", "dumplings", "pancakes")
INGREDIENTS = ("smoked paprika", "fresh dill", "black garlic", "preserved lemon", "toasted sesame",
               "wild fennel", "sour cherries", "roasted chestnuts", "green cardamom", "pickled ginger")
ANIMALS = ("parrot", "tortoise", "goat", "ferret", "donkey", "hedgehog", "peacock", "lizard", "rabbit", "llama")
PET_NAMES = ("Captain Biscuit", "Lady Marmalade", "Professor Puddle", "Sir Waffles", "Duchess Noodle",
             "Admiral Crumb", "Baron Pickles", "Count Dumpling", "Madame Toffee", "General Sprout")


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """One evaluation set: ``corpus`` {doc id: text}, ``queries`` {query id: text}, ``qrels``
    {query id: {doc id: 1}}, the document ``length`` in tokens (None for natural documents) and
    what was dropped or chosen while building it (``notes``)."""

    name: str
    corpus: Mapping[str, str]
    queries: Mapping[str, str]
    qrels: Mapping[str, Mapping[str, int]]
    length: int | None = None
    notes: Mapping[str, object] = dataclasses.field(default_factory=dict)


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens ``tokenizer`` (an `embedjax.data.tokenization.Tokenizer`) gives a text, special
    tokens included, without truncation."""
    framing = len(tokenizer.prefix) + len(tokenizer.suffix)
    return lambda text: framing + len(tokenizer.backend.encode(text, add_special_tokens=False).ids)


def _fit(units: Sequence[str], insert: str, depth: float, length: int, count: Callable[[str], int]) -> str:
    """The longest document ``units[:n]`` joined by spaces, with ``insert`` placed at ``depth`` (0..1)
    of them, that ``count`` keeps within ``length`` tokens."""
    def build(n: int) -> str:
        at = int(round(depth * n))
        return " ".join([*units[:at], insert, *units[at:n]])

    if count(build(0)) > length:
        raise ValueError(f"the inserted sentence alone takes more than {length} tokens: {insert!r}")
    low, high = 0, 1
    while high <= len(units) and count(build(high)) <= length:  # galloping search
        low, high = high, high * 2
    high = min(high, len(units) + 1)
    while high - low > 1:  # invariant: build(low) fits, build(high) does not (or runs out of units)
        mid = (low + high) // 2
        if count(build(mid)) <= length:
            low = mid
        else:
            high = mid
    if low == len(units):
        raise ValueError(f"not enough filler text to reach {length} tokens ({len(units)} units)")
    return build(low)


def _names(rng: np.random.Generator, count: int) -> list[str]:
    pairs = [(f, s) for f in FIRST_NAMES for s in LAST_NAMES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return [f"{pairs[i][0]} {pairs[i][1]}" for i in chosen]


def _split(rng: np.random.Generator, num_candidates: int, num_queries: int) -> np.ndarray:
    if not 1 <= num_queries <= num_candidates:
        raise ValueError(f"num_queries={num_queries} must be between 1 and num_candidates={num_candidates}")
    return np.sort(rng.choice(num_candidates, size=num_queries, replace=False))


def passkey_task(length: int, count_tokens: Callable[[str], int], *, num_candidates: int = 100,
                 num_queries: int = 50, seed: int = 0) -> RetrievalTask:
    """Passkey retrieval at ``length`` tokens (see the module docstring)."""
    rng = np.random.default_rng([seed, length, 1])
    names = _names(rng, num_candidates)
    keys = rng.integers(10000, 100000, size=num_candidates)
    depths = rng.uniform(0.0, 1.0, size=num_candidates)
    units = [FILLER] * (length // 4 + 8)  # far more than fits: a unit is > 20 tokens
    corpus = {}
    for i, (name, key, depth) in enumerate(zip(names, keys, depths)):
        sentence = f"{name}'s passkey is {key}. Remember it. {key} is the passkey for {name}."
        corpus[f"passkey-{length}-d{i}"] = _fit(units, sentence, float(depth), length, count_tokens)
    asked = _split(rng, num_candidates, num_queries)
    queries = {f"passkey-{length}-q{i}": f"What is the pass key for {names[i]}?" for i in asked}
    qrels = {f"passkey-{length}-q{i}": {f"passkey-{length}-d{i}": 1} for i in asked}
    return RetrievalTask(f"passkey-{length}", corpus, queries, qrels, length, {"seed": seed})


def needles(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` distinct (fact sentence, question) pairs from four templates."""
    facts = []
    for city in CITIES:
        activity = ACTIVITIES[rng.integers(len(ACTIVITIES))]
        facts.append((f"The best thing to do in {city} is {activity}.", f"What is the best thing to do in {city}?"))
    for first in FIRST_NAMES:
        food, ingredient = FOODS[rng.integers(len(FOODS))], INGREDIENTS[rng.integers(len(INGREDIENTS))]
        facts.append((f"The secret ingredient in {first}'s grandmother's {food} is {ingredient}.",
                      f"What is the secret ingredient in {first}'s grandmother's {food}?"))
    for last in LAST_NAMES:
        animal, pet = ANIMALS[rng.integers(len(ANIMALS))], PET_NAMES[rng.integers(len(PET_NAMES))]
        facts.append((f"The {last} family's {animal} is called {pet}.",
                      f"What is the name of the {last} family's {animal}?"))
    if count > len(facts):
        raise ValueError(f"only {len(facts)} distinct needles exist; ask for at most that many candidates")
    order = rng.permutation(len(facts))[:count]
    return [facts[i] for i in order]


def read_haystack(data_dir: str | pathlib.Path) -> list[str]:
    """The haystack's sentences: MS MARCO passages (``data_dir/msmarco/corpus.jsonl``) in file order,
    each passage one unit (prose that is never trained on: msmarco is an evaluation set here)."""
    path = pathlib.Path(data_dir) / "msmarco" / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the needle task's haystack is the shared MS MARCO subset "
                                "(set EMBEDJAX_DATA_DIR to the shared data folder)")
    with path.open() as f:
        return [" ".join(json.loads(line)["text"].split()) for line in f if line.strip()]


def needle_task(length: int, count_tokens: Callable[[str], int], haystack: Sequence[str], *,
                num_candidates: int = 100, num_queries: int = 50, seed: int = 0) -> RetrievalTask:
    """Needle retrieval at ``length`` tokens over ``haystack`` units (see the module docstring)."""
    rng = np.random.default_rng([seed, length, 2])
    facts = needles(rng, num_candidates)
    depths = rng.uniform(0.0, 1.0, size=num_candidates)
    starts = rng.integers(0, len(haystack), size=num_candidates)
    corpus = {}
    for i, ((fact, _), depth, start) in enumerate(zip(facts, depths, starts)):
        units = list(haystack[start:]) + list(haystack[:start])  # wrap around: every start has enough text
        corpus[f"needle-{length}-d{i}"] = _fit(units, fact, float(depth), length, count_tokens)
    asked = _split(rng, num_candidates, num_queries)
    queries = {f"needle-{length}-q{i}": facts[i][1] for i in asked}
    qrels = {f"needle-{length}-q{i}": {f"needle-{length}-d{i}": 1} for i in asked}
    inserted = {f"needle-{length}-d{i}": fact for i, (fact, _) in enumerate(facts)}
    return RetrievalTask(f"needle-{length}", corpus, queries, qrels, length, {"seed": seed, "needles": inserted})


def synthetic_task(kind: str, length: int, count_tokens: Callable[[str], int], *, data_dir=None,
                   num_candidates: int = 100, num_queries: int = 50, seed: int = 0) -> RetrievalTask:
    """``kind`` "passkey" or "needle" at ``length`` tokens."""
    if kind == "passkey":
        return passkey_task(length, count_tokens, num_candidates=num_candidates, num_queries=num_queries, seed=seed)
    if kind == "needle":
        return needle_task(length, count_tokens, read_haystack(_data_dir(data_dir)), num_candidates=num_candidates,
                           num_queries=num_queries, seed=seed)
    raise ValueError(f"unknown synthetic task {kind!r}; use 'passkey' or 'needle'")


def _data_dir(data_dir):
    import os

    if data_dir is not None:
        return pathlib.Path(data_dir)
    if "EMBEDJAX_DATA_DIR" not in os.environ:
        raise FileNotFoundError("pass data_dir or set EMBEDJAX_DATA_DIR to the shared data folder")
    return pathlib.Path(os.environ["EMBEDJAX_DATA_DIR"])


QMSUM_QUERY_FIELDS = ("query", "answer")


def qmsum_task(data_dir=None, *, query_field: str = "query") -> RetrievalTask:
    """QMSum test meetings as a retrieval task (see the module docstring). ``query_field``
    "answer" uses the reference summaries as queries, as LongEmbed does for summarization sets."""
    if query_field not in QMSUM_QUERY_FIELDS:
        raise ValueError(f"query_field={query_field!r}; use one of {QMSUM_QUERY_FIELDS}")
    folder = _data_dir(data_dir) / "qmsum" / "test"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no QMSum test meetings under {folder}")
    corpus, asked = {}, []
    for path in files:
        meeting = json.loads(path.read_text())
        corpus[path.stem] = "\n".join(f"{turn['speaker']}: {turn['content']}" for turn in meeting["meeting_transcripts"])
        for i, item in enumerate(meeting["general_query_list"] + meeting["specific_query_list"]):
            asked.append((f"{path.stem}-q{i}", " ".join(item[query_field].split()), path.stem))
    meetings_per_text: dict[str, set] = {}
    for _, text, doc in asked:
        meetings_per_text.setdefault(text, set()).add(doc)
    kept = [(qid, text, doc) for qid, text, doc in asked if len(meetings_per_text[text]) == 1]
    queries = {qid: text for qid, text, _ in kept}
    qrels = {qid: {doc: 1} for qid, _, doc in kept}
    return RetrievalTask("qmsum-test", corpus, queries, qrels, None,
                         {"query_field": query_field, "queries_total": len(asked),
                          "dropped_ambiguous": len(asked) - len(kept)})


def evaluate(encoder, task: RetrievalTask, *, k_values: Sequence[int] = (1, 10), batch_size: int = 8,
             per_query: bool = False, show_progress: bool = False) -> dict:
    """Retrieval metrics x100 of ``encoder`` on ``task`` (nDCG@1 is LongEmbed's synthetic metric)."""
    from embedjax.eval.retrieval import retrieval

    return retrieval(encoder, dict(task.corpus), dict(task.queries), {q: dict(r) for q, r in task.qrels.items()},
                     k_values=k_values, batch_size=batch_size, per_query=per_query, show_progress=show_progress)
