"""An independent entailment checker the tests use to audit a world's ground truth:
regular expressions per relation, written apart from the generator's templates."""

from __future__ import annotations

import functools
import re
from typing import Any

_PATTERNS = {
    "place_of_birth": (r"{S} was born in (?:the city of )?{O}", r"^Born in {O}, {S}",
                       r"{S}, a native of {O}\b", r"{O} is the birthplace of {S}"),
    "citizenship": (r"{S} is a citizen of {O}", r"{S} holds citizenship of {O}",
                    r"^As a citizen of {O}, {S}", r"{S} has citizenship in {O}",
                    r"{S} carries a passport issued by {O}"),
    "capital_of": (r"{S} (?:is|serves as) the capital of {O}", r"The capital of {O} is {S}",
                   r"{S}, the capital city of {O}\b", r"{O} has its seat of government in {S}"),
    "developer": (r"{S} was developed by {O}", r"{O} is the developer of {S}",
                  r"{S} is a software product created by {O}", r"^Developed by {O}, {S}",
                  r"{O} designed and built {S}"),
    "headquarters": (r"{S} is headquartered in {O}",
                     r"The headquarters of {S} (?:are|is) located in {O}",
                     r"{S} (?:has its|runs its business from a) head office in {O}",
                     r"^Headquartered in {O}, {S}"),
    "sport": (r"{S} is a professional athlete who plays {O}",
              r"{S} competes professionally in {O}",
              r"^As an? {O} player, {S}", r"{S} is known as an? {O} player",
              r"{S} has played {O} at the professional level"),
    "original_language": (r"The original language of {S} is {O}",
                          r"{S} was (?:originally written|first published|created) in {O}",
                          r"^Originally written in {O}, {S}"),
    "occupation": (r"{S} works as an? {O}", r"By profession, {S} is an? {O}",
                   r"{S}, an? {O} by training",
                   r"{S} (?:has worked|earns a living) as an? {O}"),
    "named_after": (r"{S} is named after {O}", r"{S} was named in hono(?:u)?r of {O}",
                    r"{S} takes its name from {O}", r"^Named after {O}, {S}",
                    r"{S} bears the name of {O}"),
}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def entails(*, text: str, fact: dict[str, Any]) -> bool:
  """Whether some sentence of `text` states `fact` (subject, relation, object),
  naming each entity by its name or one of its aliases (`subject_aliases`,
  `object_aliases`).

  Raises:
    ValueError: the fact lacks subject/object or has a relation without patterns.
  """
  if fact.get("relation") not in _PATTERNS:
    raise ValueError(f"entails: no patterns for relation {fact.get('relation')!r}")
  if not fact.get("subject") or not fact.get("object"):
    raise ValueError(f"entails: fact {fact.get('fact_id')} needs subject and object")
  # An entity may be named by any of its names (full name or alias).
  subjects = (fact["subject"], *fact.get("subject_aliases", ()))
  objects = (fact["object"], *fact.get("object_aliases", ()))
  # Cheap rejection first: a sentence stating the fact names both entities.
  if not any(s in text for s in subjects) or not any(o in text for o in objects):
    return False
  pat = _fact_pattern(fact["relation"], subjects, objects)
  return any(pat.search(sent) for sent in _SENTENCE_SPLIT.split(text))


def _names(names: tuple[str, ...]) -> str:
  alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
  return r"(?<![\w-])(?:" + alts + r")(?![\w-])"


@functools.lru_cache(maxsize=65536)
def _fact_pattern(relation: str, subjects: tuple[str, ...],
                  objects: tuple[str, ...]) -> re.Pattern[str]:
  s, o = _names(subjects), _names(objects)
  return re.compile("|".join(f"(?:{p.replace('{S}', s).replace('{O}', o)})"
                             for p in _PATTERNS[relation]))
