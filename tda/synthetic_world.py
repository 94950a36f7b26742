"""The synthetic fact world: a T-REx-like knowledge base over a C4-like corpus.

`generate_world` builds, from one seed, facts (subject, relation, object) with a
T-REx-style query each, and a corpus of passages whose statistics are taken from
the real setting (docs/DESIGN.md §7, each with its source):

* passage lengths are log-normal in sentences with C4's floor of 3 sentences and
  a heavy tail, so a share of passages is longer than `data.seq_len` and is
  truncated when tokenised;
* fact passages state 1..k facts in one of each relation's phrasings drawn
  uniformly (the query's own cloze phrasing is not privileged, as LAMA's
  templates are not T-REx's sentences), and name an entity in full at its first
  mention in a passage and by its alias afterwards (the Wikipedia/news convention),
  so the query's prompt + target appears verbatim in a minority of them;
* entities carry aliases (T-REx's `entity0_alias`/`entity1_alias`), unique in the
  world, so an alias resolves to one entity;
* distractor passages mention a fact's subject and/or object, mostly both
  together, without stating any fact; filler passages mention no entity;
* a few percent of outlier passages: boilerplate, repeated lines, digit tables and
  brace-free code (what survives C4's line filters).

Ground truth is exact by construction: every fact lists the id of every passage
that states it. The records are those of `tda.world`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import re
from typing import Any, Sequence

import faker

from tda.world import World


# Object pools (realistic, shared by many facts as in T-REx). Names must not be
# substrings of one another (checked when a world is built).
_CITIES = ("Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Tokyo", "Osaka", "Toronto",
           "Montreal", "Chicago", "Boston", "Seattle", "Denver", "Sydney", "Melbourne",
           "Dublin", "Vienna", "Prague", "Warsaw", "Athens", "Cairo", "Nairobi", "Lagos",
           "Lima", "Stockholm", "Oslo", "Helsinki", "Amsterdam", "Munich", "Milan",
           "Barcelona", "Seoul", "Manila")
_COUNTRIES = ("France", "Belgium", "Spain", "Italy", "Portugal", "Denmark", "Brazil",
              "Canada", "Mexico", "Argentina", "Egypt", "Kenya", "Sweden", "Norway",
              "Poland", "Greece", "Turkey", "Chile", "Peru", "Vietnam", "Australia",
              "Ireland", "Morocco", "Nigeria", "Austria")
_LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Japanese",
              "Korean", "Mandarin", "Russian", "Swedish", "Dutch", "Polish", "Greek",
              "Hindi", "Arabic", "Finnish", "Czech", "English")
# Consonant-initial so every template can say "a {O}".
_SPORTS = ("tennis", "cricket", "basketball", "volleyball", "golf", "rugby", "baseball",
           "handball", "badminton", "hockey", "squash", "lacrosse", "netball", "football")
_OCCUPATIONS = ("journalist", "lawyer", "nurse", "painter", "pilot", "chemist", "teacher",
                "novelist", "photographer", "surgeon", "politician", "diplomat",
                "musician", "physician", "sculptor", "banker", "chef", "librarian",
                "mathematician", "botanist", "pharmacist", "translator", "composer",
                "carpenter", "veterinarian")
_CODENAMES = ("Nimbus", "Falcon", "Quartz", "Orbit", "Beacon", "Cobalt", "Juniper",
              "Lumen", "Onyx", "Pulse", "Quill", "Raven", "Tundra", "Vertex", "Zephyr",
              "Ember", "Pixel", "Comet", "Mosaic", "Prism", "Halcyon", "Kestrel")
_SOFTWARE_KINDS = ("Studio", "OS", "Engine", "Suite", "Editor", "Player", "Desktop",
                   "Cloud", "Notes", "Sync")
_COMPANY_KINDS = ("Software", "Systems", "Labs", "Technologies", "Interactive", "Digital")
_ORG_KINDS = ("Logistics", "Insurance", "Foods", "Motors", "Textiles", "Airlines",
              "Pharmaceuticals", "Bank", "Energy", "Publishing")
_TITLE_ADJ = ("Silent", "Crimson", "Hidden", "Last", "Golden", "Broken", "Distant",
              "Quiet", "Winter", "Northern", "Secret", "Paper", "Glass", "Burning",
              "Empty", "Restless", "Wandering", "Forgotten")
_TITLE_NOUN = ("Orchard", "Garden", "Letter", "Mirror", "River", "Lantern", "Station",
               "Island", "Window", "Voyage", "Season", "Shore", "Kingdom", "Promise",
               "Horizon", "Road")
_PLACE_WORDS = ("Cedar", "Willow", "Granite", "Aspen", "Birch", "Summit", "Meadow",
                "Lakeside", "Oakridge", "Pinecrest", "Redwood", "Silverlake", "Stonebrook",
                "Highland", "Brookfield", "Elmwood")
_PLACE_KINDS = ("Bridge", "Hall", "Library", "Park", "Tower", "Stadium", "Observatory",
                "Gardens", "Theater", "Museum")


@dataclasses.dataclass(frozen=True)
class _Relation:
  subject_kind: str   # person | city | software | org | work | landmark
  object_kind: str    # city | country | state | company | language | sport | occupation | person
  query: str          # T-REx-style prompt; the object follows after one space.
  templates: tuple[str, ...]  # templates[0] is the query's own phrasing.


RELATIONS = {
    "place_of_birth": _Relation("person", "city", "{S} was born in the city of", (
        "{S} was born in the city of {O}.", "{S} was born in {O} and grew up there.",
        "Born in {O}, {S} {tail}.", "{S}, a native of {O}, {tail}.",
        "{O} is the birthplace of {S}.")),
    "citizenship": _Relation("person", "country", "{S} is a citizen of", (
        "{S} is a citizen of {O}.", "{S} holds citizenship of {O}.",
        "As a citizen of {O}, {S} {tail}.", "{S} has citizenship in {O} and votes there.",
        "{S} carries a passport issued by {O}.")),
    "capital_of": _Relation("city", "state", "{S} is the capital of", (
        "{S} is the capital of {O}.", "The capital of {O} is {S}.",
        "{S}, the capital city of {O}, {tail}.", "{O} has its seat of government in {S}.",
        "{S} serves as the capital of {O}.")),
    "developer": _Relation("software", "company", "{S} was developed by", (
        "{S} was developed by {O}.", "{O} is the developer of {S}.",
        "{S} is a software product created by {O}.", "Developed by {O}, {S} {tail}.",
        "{O} designed and built {S}.")),
    "headquarters": _Relation("org", "city", "{S} is headquartered in", (
        "{S} is headquartered in {O}.", "The headquarters of {S} are located in {O}.",
        "{S} has its head office in {O}.", "Headquartered in {O}, {S} {tail}.",
        "{S} runs its business from a head office in {O}.")),
    "sport": _Relation("person", "sport", "{S} is a professional athlete who plays", (
        "{S} is a professional athlete who plays {O}.", "{S} competes professionally in {O}.",
        "As a {O} player, {S} {tail}.", "{S} is known as a {O} player.",
        "{S} has played {O} at the professional level for years.")),
    "original_language": _Relation("work", "language", "The original language of {S} is", (
        "The original language of {S} is {O}.", "{S} was originally written in {O}.",
        "Originally written in {O}, {S} {tail}.", "{S} was first published in {O}.",
        "{S} was created in {O} and later translated.")),
    "occupation": _Relation("person", "occupation", "{S} works as a", (
        "{S} works as a {O}.", "By profession, {S} is a {O}.",
        "{S}, a {O} by training, {tail}.", "{S} has worked as a {O} for many years.",
        "{S} earns a living as a {O}.")),
    "named_after": _Relation("landmark", "person", "{S} is named after", (
        "{S} is named after {O}.", "{S} was named in honor of {O}.",
        "{S} takes its name from {O}.", "Named after {O}, {S} {tail}.",
        "{S} bears the name of {O}.")),
}

# Predicate endings of participle templates ("Born in Paris, X {tail}.").
_TAILS = {
    "person": ("moved abroad as a young adult", "later settled in a quiet coastal town",
               "spent many years working far from home", "rarely talks about childhood"),
    "city": ("has grown steadily over the past decade", "is known for its old stone houses",
             "attracts visitors with its riverside walks"),
    "software": ("quickly gained a loyal user base", "runs on most modern computers",
                 "is updated several times a year"),
    "org": ("employs several thousand people", "has expanded into new markets",
            "celebrated its fiftieth anniversary recently"),
    "work": ("received warm reviews from critics", "has been reprinted many times",
             "remains popular with younger readers"),
    "landmark": ("attracts many visitors each year", "was restored a few years ago",
                 "is lit up every evening"),
}

# Neutral sentences about one subject: they entail nothing.
_SUBJECT_FILLERS = {
    "person": (
        "{S} spent several years travelling before settling into a quieter routine.",
        "Friends describe {S} as patient, curious and unusually well organised.",
        "In interviews, {S} often talks about the importance of early mornings.",
        "{S} enjoys long walks and keeps a large collection of old records.",
        "Colleagues remember {S} as someone who always answered letters by hand.",
        "{S} rarely speaks to the press but keeps a small public diary online."),
    "city": (
        "{S} has a busy central market and several quiet residential districts.",
        "The old railway station in {S} was restored a few years ago.",
        "Visitors to {S} often remark on its wide streets and green parks.",
        "{S} hosts a small music festival every autumn near the old harbour."),
    "software": (
        "{S} receives regular updates and has an active user forum.",
        "Early versions of {S} were criticised for being slow on older machines.",
        "Many small businesses rely on {S} for their daily work.",
        "{S} is available in a free edition with a limited set of features."),
    "org": (
        "{S} reported steady growth in its most recent annual statement.",
        "A spokesperson for {S} declined to comment on the rumours.",
        "{S} was founded more than forty years ago as a small family business.",
        "Employees at {S} can work from home two days a week."),
    "work": (
        "{S} received mixed reviews when it first appeared.",
        "Critics praised the pacing of {S} but disliked its ending.",
        "{S} has since been adapted for the stage by a small touring company.",
        "A restored edition of {S} appeared last year with a new cover."),
    "landmark": (
        "{S} is a popular spot for weekend visitors and school trips.",
        "{S} was renovated after a long public fundraising campaign.",
        "Guided tours of {S} run every afternoon during the summer months.",
        "The lighting around {S} was replaced last year to save energy."),
}

# Distractor sentences mentioning only an object.
_OBJECT_MENTIONS = {
    "city": ("{O} saw record numbers of tourists this year.",
             "Traffic in {O} was heavy for days after the storm."),
    "country": ("{O} announced new rules for small exporters this week.",
                "The national team of {O} arrived late for the qualifying round."),
    "state": ("Voters in {O} will go to the polls again next spring.",
              "Wildfires forced several road closures across {O} in August."),
    "company": ("{O} announced that it will open a new office next year.",
                "Shares of {O} fell slightly after the quarterly report."),
    "language": ("Evening courses in {O} are increasingly popular among retirees.",
                 "The app now offers a beginner course in {O}."),
    "sport": ("Interest in {O} has grown quickly among teenagers.",
              "The local club is looking for new {O} coaches."),
    "occupation": ("The college now offers evening classes for anyone hoping to become a {O}.",
                   "Being a {O} requires patience and years of practice."),
    "person": ("{O} is remembered for a long life of public service.",
               "A new biography of {O} will be published in the spring."),
}

# Distractor sentences mentioning a subject together with its true object, with no
# relation phrase: lexical overlap without entailment.
_CO_MENTIONS = {
    "place_of_birth": ("{S} visited {O} last summer with a group of old friends.",
                       "{S} gave a short talk in {O} about urban gardens."),
    "citizenship": ("{S} travelled to {O} for a conference on water policy.",
                    "{S} has written a short travel guide about {O}."),
    "capital_of": ("Newspapers across {O} reported on the flood in {S}.",
                   "A new bus line links {S} with several small towns in {O}."),
    "developer": ("Engineers at {O} published benchmarks that include {S}.",
                  "{O} sponsored a meetup where {S} was discussed at length."),
    "headquarters": ("{S} sponsored a marathon in {O} last year.",
                     "{S} opened a small pop-up shop in {O} for the holidays."),
    "sport": ("{S} watched a {O} match with friends on a Sunday afternoon.",
              "{S} once wrote a newspaper column about the history of {O}."),
    "original_language": ("Subtitles in {O} were added to {S} for a festival screening.",
                          "A dubbed version of {S} in {O} will be released next year."),
    "occupation": ("{S} met a {O} at the conference and they became friends.",
                   "{S} wrote a short story about a retired {O}."),
    "named_after": ("{O} once gave a speech at {S}.",
                    "A portrait of {O} was loaned to {S} for an exhibition."),
}

# C4-like sentences about nothing in the knowledge base.
_GENERIC_BASE = (
    "The farmers market on the east side opens at {h} every {day}.",
    "Add {n} cups of flour and stir until the dough is smooth and elastic.",
    "Our store will be closed on {day} while we count the inventory.",
    "Free shipping is available on all orders over {n}0 dollars this month.",
    "The forecast calls for light rain and temperatures of around {n}0 degrees.",
    "Click the link below to read the full terms of service before you sign up.",
    "This recipe serves {n} people and takes about {n}0 minutes to prepare.",
    "The community garden needs volunteers for the spring planting season.",
    "Please remember to bring a reusable bag when you visit the shop.",
    "The new bike lanes have made the morning commute noticeably safer.",
    "Customers can return unused items within {n}0 days of purchase.",
    "The library will host a book swap on the first {day} of {month}.",
    "Our team is always happy to answer questions by phone or email.",
    "Regular maintenance can extend the life of your roof by many years.",
    "The hiking trail is about {n} miles long and moderately steep in places.",
    "Parking is free after six in the evening and all day on weekends.",
    "Sign up for our newsletter to get weekly tips and special offers.",
    "The council will discuss the new budget at its next public meeting.",
    "Homemade soup freezes well for up to {n} months in a sealed container.",
    "The gift shop sells postcards, mugs and jars of local honey.",
    "Several readers wrote in to ask about the best way to store fresh herbs.",
    "A warm cup of tea can make a rainy {day} afternoon feel much shorter.",
    "The school board approved a later start time for the fall term.",
    "Most houseplants prefer bright, indirect light and moderate watering.",
    "Tickets for the {month} concert series go on sale next week.",
    "The apartment has {n} bedrooms, a small balcony and plenty of storage.",
    "Keep your receipts for at least {n} years in case you need them later.",
    "Fresh strawberries are in season from late spring to early summer.",
    "The workshop covers basic budgeting, saving and planning for retirement.",
    "Our volunteers collected more than {n}0 bags of litter along the river.",
    "A good pair of walking shoes is worth the extra money in the long run.",
    "Please allow {n} to {n}0 business days for delivery of your order.",
)
# More C4-like sentences (slots: {n} digit, {day}, {month}, {item}, {color}), so a
# long passage does not run out of distinct sentences.
_GENERIC_MORE = (
    "Our {color} {item} is back in stock and ships within {n} days.",
    "The {item} comes with a {n} year warranty and a free carrying case.",
    "We tested the {item} for {n} weeks before writing this review.",
    "This {color} {item} looks great in a small kitchen or a home office.",
    "Customers who bought the {item} also looked at matching accessories.",
    "Read the instructions carefully before using the {item} for the first time.",
    "The museum gift shop reopens on {day} after a short renovation.",
    "Applications for the summer internship close at the end of {month}.",
    "The yoga class meets twice a week in the community hall.",
    "Water the seedlings every {n} days until the first leaves appear.",
    "The city pool will extend its opening hours during the heat wave.",
    "Bring a flashlight, a warm jacket and plenty of water on the trail.",
    "The bakery on the corner sells fresh bread until noon on {day}.",
    "Our office is open from nine to five, Monday through Friday.",
    "A small leak under the sink can waste hundreds of gallons a year.",
    "Many parents say the new playground is the best in the area.",
    "The annual charity run raised money for the local food bank.",
    "Remove the pan from the heat and let it cool for {n} minutes.",
    "The recycling truck now comes every other {day} morning.",
    "Students can borrow up to {n} books at a time from the library.",
    "The old mill was turned into apartments and a small cafe.",
    "Our newsletter goes out on the first {day} of every month.",
    "This guide explains how to choose a {item} that fits your budget.",
    "Most of the reviews praised the {item} for its battery life.",
    "Local volunteers planted {n}0 trees along the river path in {month}.",
    "The price of the {item} dropped by {n}0 percent during the sale.",
    "Please wear comfortable shoes, as the tour involves a lot of walking.",
    "The choir is looking for new members to join before the {month} concert.",
    "A light breakfast and coffee are included in the room rate.",
    "The farm offers pick-your-own apples every weekend in the autumn.",
    "Drivers should expect delays on the bridge during the repairs.",
    "Our support team usually replies within {n} hours on weekdays.",
)
_GENERIC = _GENERIC_BASE + _GENERIC_MORE
_ITEMS = ("blender", "backpack", "desk lamp", "kettle", "rain jacket", "tent", "bike helmet",
          "coffee grinder", "office chair", "phone case", "cutting board", "water bottle")
_COLORS = ("red", "blue", "grey", "black", "white", "yellow", "navy", "olive")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "March", "April", "June", "October", "November", "December")

# Outlier passages (C4 keeps lines that end in terminal punctuation and drops pages
# with a curly bracket, so what remains of boilerplate, tables and code looks so).
_BOILERPLATE = (
    "Copyright {n}0{n}{n} All rights reserved.", "Powered by WordPress.",
    "Share this: Facebook, Twitter, Pinterest, Email.", "Skip to main content.",
    "Home | About | Contact | Blog | Shop.", "Posted in Uncategorized.",
    "Leave a comment.", "You must be logged in to post a comment.",
    "Your email address will not be published.", "Required fields are marked.",
    "Previous post. Next post.", "Subscribe to our mailing list.",
    "Back to top.", "This entry was posted on {day}.", "Tags: news, updates, misc.",
    "Filed under: general.", "Log in. Register. Lost password.", "Search this site.",
)
_CODE = (
    "import os, sys.", "def load(path): return open(path).read().",
    "for i in range({n}0): print(i).", "x = np.zeros(({n}, {n})).",
    "SELECT id, name FROM users WHERE id = {n}{n};", "git commit -m 'fix build'.",
    "pip install requests=={n}.{n}.{n}.", "if x > {n}: return None.",
    "while True: time.sleep({n}).", "chmod +x run.sh && ./run.sh.",
    "df = pd.read_csv('data.csv').", "return [a + b for a, b in zip(xs, ys)].",
)

# C4's page filter keeps pages of at least 3 sentences (tensorflow_datasets
# text/c4_utils.py: _MIN_NUM_SENTENCES = 3, _MIN_WORDS_PER_LINE = 5).
C4_MIN_SENTENCES = 3
# Fact statements (and distractor mentions) sit among a passage's first sentences,
# so they survive truncation to `data.seq_len` (tests check their word offset).
_HEAD_SENTENCES = 4
OUTLIER_KINDS = ("boilerplate", "repeated_lines", "digit_table", "code")


def _check_relations():
  for name, rel in RELATIONS.items():
    assert rel.templates[0] == rel.query + " {O}.", name
    assert len(rel.templates) >= 4, name


_check_relations()


def _validate(*, relations, bucket_ranges, facts_per_bucket, facts_per_passage,
              sentences_per_passage, sentences_median, sentences_sigma, distractor_passages,
              filler_passages, outlier_share):
  """Raises ValueError naming the config key that cannot be satisfied."""
  if not relations or len(set(relations)) != len(relations):
    raise ValueError(f"world.relations must be non-empty and distinct, got {relations!r}")
  unknown = [r for r in relations if r not in RELATIONS]
  if unknown:
    raise ValueError(f"world.relations: unknown {unknown}; known: {sorted(RELATIONS)}")
  names = [b[0] for b in bucket_ranges]
  if not bucket_ranges or len(set(names)) != len(names):
    raise ValueError(f"world.bucket_ranges must be non-empty with distinct names: {names}")
  for name, lo, hi in bucket_ranges:
    if not 1 <= lo <= hi:
      raise ValueError(f"world.bucket_ranges: bucket {name!r} needs 1 <= lo <= hi, "
                       f"got lo={lo} hi={hi}")
  if len(facts_per_bucket) != len(bucket_ranges):
    raise ValueError(f"world.facts_per_bucket has {len(facts_per_bucket)} entries but "
                     f"world.bucket_ranges has {len(bucket_ranges)}")
  if any(int(n) != n or n < 0 for n in facts_per_bucket) or sum(facts_per_bucket) < 1:
    raise ValueError(f"world.facts_per_bucket must be non-negative ints, not all zero: "
                     f"{tuple(facts_per_bucket)}")
  if int(facts_per_passage) != facts_per_passage or facts_per_passage < 1:
    raise ValueError(f"world.facts_per_passage must be an int >= 1, got {facts_per_passage}")
  if (len(sentences_per_passage) != 2
      or not 1 <= sentences_per_passage[0] <= sentences_per_passage[1]):
    raise ValueError("world.sentences_per_passage must be (lo, hi) with 1 <= lo <= hi, "
                     f"got {sentences_per_passage!r}")
  if sentences_per_passage[1] > len(_GENERIC):
    raise ValueError(f"world.sentences_per_passage: at most {len(_GENERIC)} sentences a "
                     f"passage, got {sentences_per_passage!r}")
  if not sentences_median > 0:
    raise ValueError(f"world.sentences_median must be > 0, got {sentences_median!r}")
  if not sentences_sigma >= 0:
    raise ValueError(f"world.sentences_sigma must be >= 0, got {sentences_sigma!r}")
  if not 0 <= outlier_share < 0.5:
    raise ValueError(f"world.outlier_share must be in [0, 0.5), got {outlier_share!r}")
  for key, v in (("distractor_passages", distractor_passages),
                 ("filler_passages", filler_passages)):
    if int(v) != v or v < 0:
      raise ValueError(f"world.{key} must be an int >= 0, got {v!r}")


def _fixed_words() -> frozenset[str]:
  """Lower-cased words of the generator's own text: no alias may be one of them
  (so 'Green' never names a person where a sentence says 'green parks')."""
  texts = [t for rel in RELATIONS.values() for t in rel.templates + (rel.query,)]
  texts += [t for v in _TAILS.values() for t in v]
  texts += [t for v in _SUBJECT_FILLERS.values() for t in v]
  texts += [t for v in _OBJECT_MENTIONS.values() for t in v]
  texts += [t for v in _CO_MENTIONS.values() for t in v]
  texts += list(_GENERIC) + list(_BOILERPLATE) + list(_CODE) + list(_ITEMS) + list(_COLORS)
  texts += list(_DAYS) + list(_MONTHS)
  return frozenset(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))


class _Names:
  """Hands out entity names and aliases, no one of which is a substring of another
  entity's (an entity's alias may be part of its own name)."""

  def __init__(self):
    self._taken: list[str] = []
    self._reserved = _fixed_words()

  def ok(self, *group: str) -> bool:
    low = [g.lower() for g in group]
    return (all(g not in t and t not in g for g in low for t in self._taken)
            and all(g not in self._reserved for g in low[1:]))

  def take(self, *group: str) -> bool:
    """Registers a name and its aliases together, if none clashes."""
    if not self.ok(*group):
      return False
    self._taken.extend(g.lower() for g in group)
    return True

  def new(self, make, what: str) -> tuple[str, tuple[str, ...]]:
    """(name, aliases) from `make()` -> (name, aliases), the first that fits."""
    for _ in range(2000):
      name, aliases = make()
      if self.take(name, *aliases):
        return name, tuple(aliases)
    raise ValueError(f"world.facts_per_bucket: cannot find enough distinct {what} names")


def _capacity(relation: str, n_states: int) -> int:
  """Most facts `relation` can hold; name pools are used to half at most."""
  kind = RELATIONS[relation].subject_kind
  if kind == "city":
    return n_states  # capital_of is one-to-one: each state has one capital.
  return {"person": 2000, "software": len(_CODENAMES) * len(_SOFTWARE_KINDS),
          "org": 2000, "work": len(_TITLE_ADJ) * len(_TITLE_NOUN),
          "landmark": len(_PLACE_WORDS) * len(_PLACE_KINDS)}[kind] // 2


def generate_from_config(config) -> World:
  """The synthetic world `config.world` describes (bucket ranges parsed from it)."""
  from tda import config as config_lib  # Deferred: config imports nothing from here.
  w = config.world
  return generate_world(
      seed=w.seed, relations=w.relations, bucket_ranges=config_lib.bucket_ranges(config),
      facts_per_bucket=w.facts_per_bucket, facts_per_passage=w.facts_per_passage,
      sentences_per_passage=w.sentences_per_passage, sentences_median=w.sentences_median,
      sentences_sigma=w.sentences_sigma, distractor_passages=w.distractor_passages,
      filler_passages=w.filler_passages, outlier_share=w.outlier_share)


def generate_world(*, seed: int, relations: Sequence[str],
                   bucket_ranges: Sequence[tuple[str, int, int]],
                   facts_per_bucket: Sequence[int], facts_per_passage: int,
                   sentences_per_passage: Sequence[int], sentences_median: float,
                   sentences_sigma: float, distractor_passages: int, filler_passages: int,
                   outlier_share: float) -> World:
  """Generates the synthetic fact world deterministically from `seed`.

  Args:
    seed: seeds both Faker (`seed_instance`, en_US) and the generator's own RNG.
    relations: relation names, a subset of `RELATIONS`.
    bucket_ranges: (name, lo, hi) frequency buckets.
    facts_per_bucket: facts per bucket; each fact gets a number of entailing
      passages drawn uniformly from its bucket's [lo, hi].
    facts_per_passage: most facts one fact passage states.
    sentences_per_passage: inclusive (lo, hi) clamp of a passage's sentence count.
    sentences_median, sentences_sigma: the sentence count is
      round(exp(N(log(median), sigma))), clamped (sigma 0: always the median).
    distractor_passages: passages mentioning entities and stating no fact.
    filler_passages: passages mentioning no entity.
    outlier_share: share of all passages that are outliers (boilerplate, repeated
      lines, digit tables, code), added on top of the others.

  Returns:
    The World, passages shuffled, ground truth exact.

  Raises:
    ValueError: naming the config key that cannot be satisfied.
  """
  relations = tuple(relations)
  bucket_ranges = [(str(n), int(lo), int(hi)) for n, lo, hi in bucket_ranges]
  _validate(relations=relations, bucket_ranges=bucket_ranges,
            facts_per_bucket=tuple(facts_per_bucket), facts_per_passage=facts_per_passage,
            sentences_per_passage=tuple(sentences_per_passage),
            sentences_median=sentences_median, sentences_sigma=sentences_sigma,
            distractor_passages=distractor_passages, filler_passages=filler_passages,
            outlier_share=outlier_share)
  rng = random.Random(f"tda.world:{seed}")
  fake = faker.Faker("en_US")
  fake.seed_instance(seed)
  facts, aliases = _make_facts(rng, fake, relations=relations, bucket_ranges=bucket_ranges,
                               facts_per_bucket=facts_per_bucket)
  lo, hi = sentences_per_passage

  def length() -> int:
    n = round(math.exp(rng.gauss(math.log(sentences_median), sentences_sigma)))
    return min(hi, max(lo, n))

  raw = _fact_passages(rng, facts, aliases, facts_per_passage=facts_per_passage,
                       length=length)
  for _ in range(distractor_passages):
    n = length()
    head = list(dict.fromkeys(
        _mention(rng, rng.choice(facts)) for _ in range(min(n, rng.randint(1, 2)))))
    raw.append(("distractor", _passage(rng, head, n, aliases), []))
  for _ in range(filler_passages):
    raw.append(("filler", " ".join(_generic(rng, length())), []))
  n_outliers = round(outlier_share * len(raw) / (1 - outlier_share))
  for i in range(n_outliers):
    raw.append(("outlier", _outlier(rng, OUTLIER_KINDS[i % len(OUTLIER_KINDS)], length()), []))

  rng.shuffle(raw)
  passages = []
  for i, (kind, text, group) in enumerate(raw):
    pid = f"c4_synth:{i:08d}"
    passages.append({"id": pid, "text": text, "kind": kind,
                     "fact_ids": sorted(facts[j]["fact_id"] for j in group)})
    for j in group:
      facts[j]["passage_ids"].append(pid)
  for f in facts:
    del f["_kind"]
  return World(passages=passages, facts=facts)


def _person(fake, rng):
  first, last = fake.first_name(), fake.last_name()
  return f"{first} {last}", (last,)  # Later mentions: the surname.


def _make_facts(rng, fake, *, relations, bucket_ranges, facts_per_bucket):
  """Fact records (passage_ids still empty) with entities drawn from Faker, and
  {entity name: aliases}."""
  names = _Names()
  aliases: dict[str, tuple[str, ...]] = {}
  # Fixed object pools first, then states that do not clash with them.
  pools = {"city": list(_CITIES), "country": list(_COUNTRIES), "language": list(_LANGUAGES),
           "sport": list(_SPORTS), "occupation": list(_OCCUPATIONS)}
  for pool in pools.values():
    for n in pool:
      if not names.take(n):
        raise AssertionError(f"object pool name {n!r} clashes with another")
  states = list(fake.provider("faker.providers.address").states)
  rng.shuffle(states)
  pools["state"] = [s for s in states if names.take(s)]
  pools["company"] = [names.new(lambda: (f"{fake.last_name()} {rng.choice(_COMPANY_KINDS)}",
                                         ()), "company")[0] for _ in range(10)]
  pools["person"] = []
  for _ in range(12):
    name, al = names.new(lambda: _person(fake, rng), "person")
    pools["person"].append(name)
    aliases[name] = al

  # (bucket, frequency) per fact, dealt to relations round-robin within capacity.
  slots = [(name, rng.randint(lo, hi))
           for (name, lo, hi), n in zip(bucket_ranges, facts_per_bucket) for _ in range(n)]
  rng.shuffle(slots)
  cap = {r: _capacity(r, len(pools["state"])) for r in relations}
  if len(slots) > sum(cap.values()):
    raise ValueError(f"world.facts_per_bucket asks for {len(slots)} facts but relations "
                     f"{relations} allow at most {sum(cap.values())} distinct facts")
  need = {r: collections.deque() for r in relations}
  i = 0
  for slot in slots:
    while len(need[relations[i % len(relations)]]) >= cap[relations[i % len(relations)]]:
      i += 1
    need[relations[i % len(relations)]].append(slot)
    i += 1

  def org():
    last = fake.last_name()
    return f"{last} {rng.choice(_ORG_KINDS)}", (last,)  # "Smith Logistics" -> "Smith".

  def work():
    title = f"{rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}"
    return f"The {title}", (title,)  # The article dropped in running text.

  # Subjects: people carry 1-3 facts (a short bio); other kinds one fact each.
  makers = {
      "person": lambda: _person(fake, rng),
      "city": lambda: (fake.city(), ()),
      "software": lambda: (f"{rng.choice(_CODENAMES)} {rng.choice(_SOFTWARE_KINDS)}", ()),
      "org": org,
      "work": work,
      "landmark": lambda: (f"{rng.choice(_PLACE_WORDS)} {rng.choice(_PLACE_KINDS)}", ()),
  }
  triples = []  # (subject, kind, relation, bucket, freq)
  person_rels = [r for r in relations if RELATIONS[r].subject_kind == "person"]
  while any(need[r] for r in person_rels):
    avail = [r for r in person_rels if need[r]]
    subject, al = names.new(makers["person"], "person")
    aliases[subject] = al
    for rel in rng.sample(avail, min(len(avail), rng.randint(1, 3))):
      triples.append((subject, "person", rel, *need[rel].popleft()))
  for rel in relations:
    kind = RELATIONS[rel].subject_kind
    while need[rel]:
      subject, al = names.new(makers[kind], kind)
      aliases[subject] = al
      triples.append((subject, kind, rel, *need[rel].popleft()))

  # Objects: Zipf-weighted draws share popular objects; states are one-to-one.
  facts = []
  states = iter(pools["state"])
  for k, (subject, kind, rel, bucket, freq) in enumerate(triples):
    pool = pools[RELATIONS[rel].object_kind]
    if RELATIONS[rel].object_kind == "state":
      obj = next(states)
    else:
      obj = rng.choices(pool, weights=[1 / (j + 1) ** 0.8 for j in range(len(pool))])[0]
    facts.append({
        "fact_id": f"F{k:06d}", "example_id": f"trex_synth:{k:015d}", "relation": rel,
        "subject": subject, "object": obj,
        "subject_aliases": list(aliases.get(subject, ())),
        "object_aliases": list(aliases.get(obj, ())),
        "inputs_plaintext": RELATIONS[rel].query.format(S=subject),
        "targets_plaintext": obj, "frequency": freq, "bucket": bucket,
        "passage_ids": [], "_kind": kind})
  return facts, aliases


@dataclasses.dataclass(frozen=True)
class _Sent:
  """One sentence before rendering: a template over {S} and {O}, or plain text."""
  template: str
  subject: str | None = None
  obj: str | None = None
  tail: str = ""


def _render(sents: Sequence[_Sent | str], aliases: dict[str, tuple[str, ...]]) -> str:
  """Joins sentences, naming each entity in full at its first mention in the
  passage (in reading order) and by its first alias afterwards."""
  seen: set[str] = set()
  out = []
  for s in sents:
    if isinstance(s, str):
      out.append(s)
      continue
    ents = sorted(((s.template.find("{" + k + "}"), k, e)
                   for k, e in (("S", s.subject), ("O", s.obj)) if e is not None))
    surface = {}
    for _, k, e in ents:
      surface[k] = aliases[e][0] if e in seen and aliases.get(e) else e
      seen.add(e)
    out.append(s.template.format(tail=s.tail, **surface))
  return " ".join(out)


def _passage(rng, head: list, n: int, aliases) -> str:
  """`head` sentences shuffled among the first `_HEAD_SENTENCES`, then generic text up
  to `n` sentences."""
  n = max(n, len(head))
  k = min(n, max(len(head), _HEAD_SENTENCES))
  first = head + _generic(rng, k - len(head))
  rng.shuffle(first)
  return _render(first + _generic(rng, n - k), aliases)


def _fact_passages(rng, facts, aliases, *, facts_per_passage, length):
  """(kind, text, fact indices) of the passages that state facts.

  Each passage states 1..facts_per_passage facts: a lead drawn by remaining
  slots, then the same subject's facts (a short bio), then other subjects'.
  Every fact ends up in exactly `frequency` passages.
  """
  raw = []
  remaining = [f["frequency"] for f in facts]
  by_subject = collections.defaultdict(list)
  for j, f in enumerate(facts):
    by_subject[f["subject"]].append(j)
  open_facts = list(range(len(facts)))
  while open_facts:
    lead = rng.choices(open_facts, weights=[remaining[j] for j in open_facts])[0]
    k = rng.randint(1, facts_per_passage)
    same = sorted((j for j in by_subject[facts[lead]["subject"]]
                   if j != lead and remaining[j] > 0), key=lambda j: -remaining[j])
    group = [lead] + same[:k - 1]
    others = [j for j in open_facts if j not in group]
    while len(group) < k and others:
      j = rng.choices(others, weights=[remaining[o] for o in others])[0]
      group.append(j)
      others.remove(j)
    head = [_statement(rng, facts[j]) for j in group]
    n = max(len(head), length())
    # Up to `_HEAD_SENTENCES`: sentences about the passage's subjects, none twice.
    pad = list(dict.fromkeys(_Sent(t, subject=facts[j]["subject"])
                             for j in group for t in _SUBJECT_FILLERS[facts[j]["_kind"]]))
    head += rng.sample(pad, max(0, min(len(pad), _HEAD_SENTENCES - len(head), n - len(head))))
    raw.append(("fact", _passage(rng, head, n, aliases), group))
    for j in group:
      remaining[j] -= 1
    open_facts = [j for j in open_facts if remaining[j] > 0]
  return raw


def _generic(rng: random.Random, n: int) -> list[str]:
  """`n` distinct C4-like sentences that name no entity."""
  return [t.format(n=rng.randint(2, 9), h=f"{rng.randint(6, 10)} in the morning",
                   day=rng.choice(_DAYS), month=rng.choice(_MONTHS), item=rng.choice(_ITEMS),
                   color=rng.choice(_COLORS))
          for t in rng.sample(_GENERIC, min(n, len(_GENERIC)))]


def _fill(rng: random.Random, t: str) -> str:
  return t.format(n=rng.randint(1, 9), day=rng.choice(_DAYS))


def _outlier(rng: random.Random, kind: str, n: int) -> str:
  """An outlier passage of `n` lines that names no entity."""
  if kind == "boilerplate":
    lines = [_fill(rng, t) for t in rng.sample(_BOILERPLATE, min(n, len(_BOILERPLATE)))]
  elif kind == "repeated_lines":
    lines = [rng.choice(_GENERIC).format(n=3, h="9 in the morning", day="Friday",
                                          month="June", item="kettle", color="red")] * n
  elif kind == "digit_table":
    lines = [" | ".join([str(rng.randint(1990, 2020))]
                        + [f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}" for _ in range(5)])
             + "." for _ in range(n)]
  elif kind == "code":
    lines = [_fill(rng, rng.choice(_CODE)) for _ in range(n)]
  else:
    raise ValueError(f"unknown outlier kind {kind!r}")
  return "\n".join(lines)


def _statement(rng: random.Random, fact: dict[str, Any]) -> _Sent:
  """One sentence stating `fact`, in one of its relation's phrasings drawn
  uniformly (the query's own among them)."""
  rel = RELATIONS[fact["relation"]]
  return _Sent(rng.choice(rel.templates), subject=fact["subject"], obj=fact["object"],
               tail=rng.choice(_TAILS[rel.subject_kind]))


def _mention(rng: random.Random, fact: dict[str, Any]) -> _Sent:
  """A sentence naming the fact's subject and/or object that states no fact: both
  together half of the time (lexical overlap without entailment)."""
  rel = RELATIONS[fact["relation"]]
  mode = rng.randrange(4)
  if mode == 0:
    return _Sent(rng.choice(_SUBJECT_FILLERS[rel.subject_kind]), subject=fact["subject"])
  if mode == 1:
    return _Sent(rng.choice(_OBJECT_MENTIONS[rel.object_kind]), obj=fact["object"])
  return _Sent(rng.choice(_CO_MENTIONS[fact["relation"]]), subject=fact["subject"],
               obj=fact["object"])
