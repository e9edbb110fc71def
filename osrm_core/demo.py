"""Built-in demo tasks: synthetic text classification data made by this module.

The data is synthetic. Nothing is downloaded: sentences are composed from templates and slot
vocabularies below, with a random generator seeded from ``seed``, so the same seed always gives
the same texts and labels. The four tasks differ in the kind of input (product and movie
reviews, news items, questions, sentence pairs), so their feature distributions differ, which
is what a study of adapter interference needs.

To be learnable but not trivial, the sentences share distractor words across classes, use
negation ("not bad", "hardly great") and contrast, and about 5% of the examples carry a text
made for another class (label noise). Labels are balanced exactly within each split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from osrm_core.data import Split, TaskData
from osrm_core.errors import InputTypeError, OsrmInputError

DEMO_TASKS: dict[str, str] = {
    "sentiment": "Product and movie review sentiment, 2 labels (negative, positive).",
    "topic": "Topic of a news headline and sentence, 4 labels (world, sports, business, science).",
    "question": "Type of answer a question asks for, 6 labels (person, location, number, ...).",
    "paraphrase": "Sentence pairs: does the second sentence say the same as the first? 2 labels.",
}

#: Smallest and largest split sizes that ``demo_task`` accepts.
MIN_EXAMPLES, MAX_EXAMPLES = 10, 100_000
#: Share of examples whose text is made for another class than their label.
LABEL_NOISE = 0.05

Vocab = Mapping[str, Sequence[str]]
_SLOT = re.compile(r"\{(\w+)\}")
_NUMBERS = tuple(str(i) for i in range(2, 100))
_SMALL = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    # rng.random() is several times faster than rng.choice on a tuple, and still reproducible.
    return options[int(rng.random() * len(options))]


def _fill(rng: np.random.Generator, template: str, *vocabs: Vocab) -> str:
    """Replace each ``{slot}`` by a random entry of the first vocab that has it, recursively."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        for vocab in vocabs:
            if name in vocab:
                return _fill(rng, _pick(rng, vocab[name]), *vocabs)
        raise KeyError(f"no vocabulary for slot {name!r}")

    return _SLOT.sub(repl, template)


_SENTENCE_START = re.compile(r"(^|[.?!] )([a-z])")


def _tidy(text: str) -> str:
    text = " ".join(text.split()).replace(" ,", ",").replace(" .", ".").replace(" ?", "?")
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


# --------------------------------------------------------------------------- sentiment

_SENT_SHARED: Vocab = {
    "product": ("blender", "pair of headphones", "laptop", "phone case", "coffee maker",
                "backpack", "vacuum cleaner", "desk lamp", "kettle", "keyboard", "tent",
                "electric toothbrush", "office chair", "smart watch", "rice cooker", "speaker"),
    "movie": ("movie", "film", "sequel", "documentary", "thriller", "comedy", "animated film",
              "period drama", "horror movie", "series finale", "musical", "space opera"),
    "aspect_p": ("battery", "price", "design", "packaging", "manual", "cable", "color",
                 "handle", "lid", "app", "noise level", "strap"),
    "aspect_m": ("soundtrack", "ending", "plot", "pacing", "lead actor", "dialogue",
                 "camera work", "second half", "villain", "script", "running time"),
    "hedge": ("", "", "", "honestly, ", "I think ", "to be fair, ", "in my opinion ",
              "all in all, ", "frankly, ", "I have to say "),
    "aside": ("", "", "", ", and it arrived on {day}", ", which I bought for my {relative}",
              " after {n} days", ", like the other reviews said", ", the box was {color}",
              ", for what it is worth", " at around {n} dollars"),
    "when": ("last {day}", "a week ago", "for my birthday", "on sale", "after {n} days",
             "from day one", "at the weekend", "with friends"),
    "relative": ("sister", "dad", "grandmother", "roommate", "son", "partner", "boss"),
    "day": ("Monday", "Tuesday", "Friday", "Saturday", "Sunday"),
    "color": ("blue", "grey", "plain white", "dented", "huge", "tiny"),
    "n": _NUMBERS,
    "genre": ("long", "short", "loud", "quiet", "new", "dated", "French", "low budget"),
    "neg": ("not", "hardly", "far from", "never really", "not exactly", "anything but",
            "not at all"),
}
_GOOD = ("great", "excellent", "wonderful", "reliable", "delightful", "superb", "solid",
         "impressive", "well made", "a joy to use", "charming", "fantastic", "sturdy")
_BAD = ("awful", "disappointing", "flimsy", "terrible", "mediocre", "dull", "overpriced",
        "clumsy", "a letdown", "poorly made", "frustrating", "forgettable", "bad")
_SENT_LABEL: tuple[Vocab, ...] = (
    {"pol": ("{bad}", "{bad}", "{bad}", "{neg} {good}"), "opp": _GOOD, "bad": _BAD, "good": _GOOD,
     "verdict": ("I would not recommend it", "I regret it", "two stars at most",
                 "not worth the money", "what a waste of time", "I was hoping for more",
                 "never again")},
    {"pol": ("{good}", "{good}", "{good}", "{neg} {bad}"), "opp": _BAD, "bad": _BAD, "good": _GOOD,
     "verdict": ("I recommend it", "I would not hesitate to recommend it", "five stars",
                 "worth the money", "I was pleasantly surprised", "I would do it again",
                 "no regrets")},
)
_SENT_TEMPLATES = (
    "{hedge}the {product} I got is {pol}{aside}.",
    "{hedge}this {product} turned out {pol} {when}{aside}.",
    "bought the {product} {when} and it is {pol}. {verdict}.",
    "the {aspect_p} of this {product} is a bit {opp}, but overall it is {pol}.",
    "{verdict}: the {product} is {pol} and the {aspect_p} is {pol}.",
    "my {relative} got this {product} {when}; {hedge}it is {pol}{aside}.",
    "{hedge}the {movie} we saw was {pol}{aside}.",
    "watched the {movie} with my {relative} {when} and it was {pol}. {verdict}.",
    "the {aspect_m} was {opp}, but the {movie} itself was {pol}.",
    "{verdict}. The {genre} {movie} is {pol} and the {aspect_m} is {pol}.",
    "a {genre} {movie} that is {pol} from start to finish{aside}.",
    "{hedge}I found the {aspect_m} of this {movie} {pol}, {verdict}.",
)


def _sentiment(rng: np.random.Generator, label: int) -> tuple[str, None]:
    return _tidy(_fill(rng, _pick(rng, _SENT_TEMPLATES), _SENT_LABEL[label], _SENT_SHARED)), None


# --------------------------------------------------------------------------- topic

_TOPIC_SHARED: Vocab = {
    "city": ("Geneva", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Mumbai", "Madrid",
             "Seoul", "Nairobi", "Toronto", "Perth", "Warsaw"),
    "country": ("Kenya", "Chile", "Norway", "Japan", "Egypt", "Canada", "Peru", "Poland",
                "India", "Brazil", "Spain", "Vietnam"),
    "day": ("on Monday", "on Tuesday", "on Wednesday", "late on Friday", "this week",
            "overnight", "at the weekend", "on Sunday"),
    "source": ("officials", "a spokesperson", "analysts", "reporters", "a statement",
               "local media", "insiders", "the police", "experts"),
    "tail": ("", "", "", " amid a record heatwave", " as markets watched closely",
             " ahead of the weekend", ", the report said", " despite heavy rain",
             " in a surprise move", ", a first for the region", " after months of talks"),
    "n": _NUMBERS,
}
_TOPIC_LABEL: tuple[Vocab, ...] = (
    {"head": ("{country} and {country} resume {talks}", "protests grow in {city} over {issue}",
              "{leader} visits {city} ahead of {summit}", "ceasefire holds on {country} border",
              "{country} election result disputed"),
     "body": ("{source} said {day} that the {leader} would meet {country} envoys on {issue}",
              "thousands gathered in {city} {day} to protest {issue}",
              "the {leader} called for a new {deal} with {country} on {issue}"),
     "talks": ("peace talks", "trade talks", "border talks"),
     "issue": ("fuel prices", "border controls", "refugee aid", "water rights", "sanctions",
               "election rules", "a record drought"),
     "leader": ("prime minister", "foreign minister", "president", "UN envoy",
                "opposition leader"),
     "summit": ("a regional summit", "the climate summit", "a security meeting"),
     "deal": ("treaty", "trade deal", "peace deal", "agreement")},
    {"head": ("{club} beat {club} {score}", "{club} sign {position} in {n} million deal",
              "{athlete} sets {record} in {city}", "{club} coach quits after {n} losses",
              "late goal lifts {club} into {stage}"),
     "body": ("{source} said {day} that the {position} would miss {stage} with a {injury}",
              "the {club} team won {score} in front of {n},000 fans in {city}",
              "{athlete} finished the {event} in {n} seconds, a new season record"),
     "club": ("United", "City", "Rovers", "Tigers", "Hawks", "Real", "Athletic"),
     "score": ("2-1", "3-0", "1-0", "4-2", "on penalties"),
     "position": ("striker", "goalkeeper", "midfielder", "defender", "captain"),
     "athlete": ("the sprinter", "the world champion", "the teenage swimmer", "the veteran"),
     "record": ("a world record", "a national record", "a course record"),
     "stage": ("the final", "the semi-final", "the playoffs", "the cup quarter-final"),
     "injury": ("knee injury", "hamstring strain", "broken wrist"),
     "event": ("100 metres", "200 metres", "relay", "hurdles")},
    {"head": ("{company} shares {move} after {event}", "{company} agrees {n} billion deal",
              "{company} to cut {n}00 jobs", "prices {move} {n} percent in {country}",
              "{company} posts record {metric}"),
     "body": ("{source} said {day} that {company} expects {metric} to {trend} next quarter",
              "the {company} team told investors that {event} would {trend} growth",
              "{company} said {metric} rose {n} percent in {country} markets"),
     "company": ("Acme", "Globex", "Initech", "Northwind", "Contoso", "Umbrella Corp"),
     "move": ("jump", "fall", "slide", "climb", "rise"),
     "event": ("the merger", "weak earnings", "a profit warning", "the rate cut",
               "a takeover bid"),
     "metric": ("profits", "revenue", "sales", "margins"),
     "trend": ("slow", "lift", "weaken", "boost")},
    {"head": ("researchers find {finding} in {habitat}", "{agency} launches probe to {planet}",
              "new study links {factor} to {factor}", "telescope spots {astro}",
              "{n}-year study of {habitat} reveals {finding}"),
     "body": ("{source} said {day} that the research team had measured {finding} in {habitat}",
              "a team at the university of {city} reported that {factor} may affect {factor}",
              "the {agency} mission will study {astro} for {n} months"),
     "finding": ("microplastics", "a new frog species", "ancient bacteria",
                 "high methane levels", "rare minerals"),
     "habitat": ("deep sea vents", "the Arctic ice", "cave lakes", "rainforest soil"),
     "agency": ("the space agency", "NASA", "ESA", "a private lab"),
     "planet": ("Mars", "Jupiter", "Venus", "the Moon"),
     "factor": ("sleep", "gut bacteria", "air pollution", "coffee", "exercise", "memory"),
     "astro": ("a distant galaxy", "a comet", "an exoplanet", "a black hole")},
)


def _topic(rng: np.random.Generator, label: int) -> tuple[str, None]:
    vocabs = (_TOPIC_LABEL[label], _TOPIC_SHARED)
    text = _fill(rng, "{head}. {body}{tail}.", *vocabs)
    return _tidy(text), None


# --------------------------------------------------------------------------- question

_QUESTION_SHARED: Vocab = {
    "pre": ("", "", "", "", "quick question: ", "does anyone know ", "I wonder ",
            "for my homework, ", "can you tell me ", "trivia: ", "serious question, ",
            "out of curiosity, ", "for a pub quiz: ", "I forgot ", "please remind me ", "hey, "),
    "country": ("France", "Japan", "Brazil", "Egypt", "Canada", "India", "Mexico", "Italy",
                "Kenya", "Norway", "Peru", "Turkey"),
    "year": ("1900", "1920", "1969", "1848", "1776", "2001", "the 1950s", "the last century"),
    "invention": ("telephone", "light bulb", "printing press", "steam engine", "radio",
                  "bicycle", "vaccine", "computer mouse", "television", "airplane",
                  "microwave oven", "typewriter", "camera", "compass", "zipper"),
    "landmark": ("Eiffel Tower", "Great Wall", "Golden Gate Bridge", "Taj Mahal",
                 "Statue of Liberty", "Colosseum", "Sydney Opera House", "Big Ben",
                 "Leaning Tower", "Machu Picchu", "old harbour", "royal palace"),
    "animal": ("whale", "bird", "cat", "snake", "dog", "horse", "shark", "bee", "owl", "frog",
               "penguin", "bat"),
    "tail": ("", "", "", " in {year}", " in {country}", " exactly", " today", " originally",
             " according to the textbook", " if you know", " by the way", " again"),
}
_QUESTION_LABEL: tuple[Vocab, ...] = (
    {"q": ("who first invented the {invention}{tail}?", "which {job} wrote the {work}{tail}?",
           "what is the name of the {job} who discovered {finding}{tail}?",
           "who was the first {role} of {country}{tail}?",
           "name the {job} who designed the {landmark}.", "who painted the famous {work}{tail}?",
           "which {job} is best known for the {invention}?", "who owned the {landmark}{tail}?"),
     "job": ("scientist", "author", "engineer", "architect", "poet", "composer", "inventor"),
     "work": ("national anthem", "first dictionary", "opening ceremony song", "mural",
              "famous portrait", "first cookbook"),
     "finding": ("penicillin", "radium", "gravity", "the electron", "oxygen", "insulin"),
     "role": ("president", "queen", "female pilot", "astronaut", "mayor", "prime minister")},
    {"q": ("where is the {landmark} located{tail}?",
           "in which {place} was the {invention} first built{tail}?",
           "what {place} is home to the {landmark}{tail}?", "where do most {animal}s live{tail}?",
           "which {place} borders {country} to the {side}?",
           "where can you see the {landmark} from{tail}?",
           "in what {place} did the {invention} become popular{tail}?",
           "where was the first {invention} sold{tail}?"),
     "place": ("city", "country", "region", "continent", "town", "part of {country}"),
     "side": ("north", "south", "east", "west")},
    {"q": ("how many {unit} are there in a {thing}{tail}?",
           "what year was the {invention} invented{tail}?",
           "how many people live in {country}{tail}?", "how tall is the {landmark} in metres?",
           "how much does a {animal} weigh on average{tail}?",
           "how old was the {invention} when it was replaced?",
           "how many {animal}s are left in {country}{tail}?",
           "how long does a {animal} usually live{tail}?"),
     "unit": ("days", "bones", "players", "minutes", "pages", "squares", "weeks"),
     "thing": ("leap year", "human hand", "football team", "school day", "chess board",
               "decade", "short novel")},
    {"q": ("why does the {animal} {act}{tail}?", "how does a {invention} actually work?",
           "what is the meaning of {concept}{tail}?", "what causes {event} in {country}{tail}?",
           "what does it mean when a {animal} {act}?", "how was the {landmark} built{tail}?",
           "why was the {invention} so important{tail}?", "can you explain {concept} simply?"),
     "act": ("sleep all day", "change color", "migrate", "make that noise", "dig holes",
             "hide in winter"),
     "concept": ("democracy", "irony", "inflation", "photosynthesis", "gravity", "evolution",
                 "a black hole"),
     "event": ("earthquakes", "tides", "droughts", "inflation", "fog", "floods")},
    {"q": ("what {kind} of {animal} is the largest{tail}?",
           "which {instrument} did the famous composer play{tail}?",
           "what is the most popular {food} in {country}{tail}?",
           "what {animal} is the national symbol of {country}?",
           "which {kind} of {invention} sold best{tail}?",
           "what {food} is served at the {landmark}{tail}?",
           "what {kind} of {invention} did they use in {year}?",
           "which {food} goes best with {food2}?"),
     "kind": ("type", "kind", "breed", "species", "brand", "model"),
     "instrument": ("instrument", "musical instrument", "string instrument", "brass instrument"),
     "food": ("dish", "dessert", "drink", "cheese", "fruit", "bread", "soup"),
     "food2": ("rice", "fish", "pasta", "chicken", "tea")},
    {"q": ("what does {abbr} stand for{tail}?", "what is the full form of {abbr}{tail}?",
           "what is {abbr} short for{tail}?", "{abbr} is an abbreviation of what?",
           "what do the letters {abbr} mean in {field}?", "what is {abbr} an acronym for?",
           "what words make up the abbreviation {abbr}?", "the letters {abbr} mean what?"),
     "abbr": ("NASA", "UNESCO", "GDP", "DNA", "CPU", "HTML", "NATO", "FIFA", "UNICEF", "RAM",
              "GPS", "LED", "MRI", "ATM", "PDF", "OPEC", "ISBN", "VAT", "CEO", "laser", "scuba",
              "USB", "SIM", "BBC", "IQ", "PIN", "SMS", "AIDS", "radar", "WiFi"),
     "field": ("science", "computing", "medicine", "sport", "business", "{country}")},
)


def _question(rng: np.random.Generator, label: int) -> tuple[str, None]:
    return _tidy(_fill(rng, "{pre}{q}", _QUESTION_LABEL[label], _QUESTION_SHARED)), None


# --------------------------------------------------------------------------- paraphrase

_AGENTS = ("Maria Lopez", "Ahmed Khan", "the city council", "a local bakery", "Chen Wei",
           "the school board", "Olga Petrova", "the museum", "Tom Baker", "a small charity",
           "Priya Nair", "the fire station", "Lena Fischer", "the hospital", "Kwame Mensah",
           "the football club", "Sofia Rossi", "a farm cooperative", "Jonas Berg", "the library")
_VERBS = (("bought", "purchased", "acquired"), ("repaired", "fixed", "mended"),
          ("delivered", "shipped", "sent"), ("built", "assembled", "put together"),
          ("inspected", "checked", "examined"), ("collected", "gathered", "picked up"),
          ("cleaned", "washed"), ("moved", "carried", "transported"), ("ordered", "requested"),
          ("donated", "contributed"))
_OBJECTS = ("bicycles", "laptops", "chairs", "boxes of books", "crates of apples", "tables",
            "solar panels", "old cars", "pianos", "tents", "printers", "paintings", "boats",
            "sewing machines", "lamps", "wheelchairs")
_PLACES = ("Lisbon", "Dublin", "Accra", "Quito", "Hanoi", "Tallinn", "Bergen", "Porto",
           "Cork", "Kyoto", "Leeds", "Basel", "Austin", "Malaga")
_TIMES = ("on Monday", "on Tuesday", "on Thursday", "last week", "last month", "in March",
          "in June", "in October", "yesterday", "over the weekend", "this morning")
_LEADS = ("", "", "", "reports say that ", "according to the log, ", "it was confirmed that ",
          "a local paper wrote that ")


def _say(rng: np.random.Generator, fact: dict) -> str:
    """One of several wordings of ``fact``; all wordings of one fact mean the same."""
    verb = _pick(rng, _VERBS[fact["verb"]])
    count = fact["count"]
    number = _SMALL[count - 2] if count < 12 and rng.random() < 0.5 else str(count)
    never = "never " if fact["never"] else ""
    a, o, p, t = fact["agent"], fact["obj"], fact["place"], fact["time"]
    style = int(rng.random() * 5)
    if style == 0:
        text = f"{a} {never}{verb} {number} {o} in {p} {t}"
    elif style == 1:
        text = f"{t}, {a} {never}{verb} {number} {o} in {p}"
    elif style == 2:
        text = f"{number} {o} were {never}{verb} by {a} in {p} {t}"
    elif style == 3:
        text = f"in {p}, {a} {never}{verb} {number} {o} {t}"
    else:
        text = f"{t}, {number} {o} in {p} were {never}{verb} by {a}"
    return _tidy(_pick(rng, _LEADS) + text + ".")


def _fact(rng: np.random.Generator) -> dict:
    return {"agent": _pick(rng, _AGENTS), "verb": int(rng.random() * len(_VERBS)),
            "count": int(rng.integers(2, 60)), "obj": _pick(rng, _OBJECTS),
            "place": _pick(rng, _PLACES), "time": _pick(rng, _TIMES),
            "never": bool(rng.random() < 0.1)}


def _paraphrase(rng: np.random.Generator, label: int) -> tuple[str, str]:
    fact = _fact(rng)
    other = dict(fact)
    if label == 0:  # change one key fact, or talk about something else on the same topic
        change = int(rng.random() * 5)
        if change == 0:
            other["agent"] = _pick(rng, [x for x in _AGENTS if x != fact["agent"]])
        elif change == 1:
            step = int(rng.integers(1, 20))
            other["count"] = fact["count"] + (step if rng.random() < 0.5 else -step)
            other["count"] = other["count"] if other["count"] >= 2 else fact["count"] + 25
        elif change == 2:
            other["place"] = _pick(rng, [x for x in _PLACES if x != fact["place"]])
        elif change == 3:
            other["never"] = not fact["never"]
        else:
            other = {**_fact(rng), "obj": fact["obj"]}
    return _say(rng, fact), _say(rng, other)


# --------------------------------------------------------------------------- tasks

_Generator = Callable[[np.random.Generator, int], tuple[str, str | None]]
_SPECS: dict[str, tuple[_Generator, list[str], str]] = {
    "sentiment": (_sentiment, ["negative", "positive"], "accuracy"),
    "topic": (_topic, ["world", "sports", "business", "science"], "accuracy"),
    "question": (_question, ["person", "location", "number", "description", "entity",
                             "abbreviation"], "accuracy"),
    "paraphrase": (_paraphrase, ["not_paraphrase", "paraphrase"], "mcc"),
}


def _split(
    rng: np.random.Generator, make: _Generator, k: int, n: int, avoid: Split | None = None
) -> Split:
    """``n`` examples with balanced labels; texts that occur in ``avoid`` are drawn again."""
    seen = set() if avoid is None else set(avoid.text)
    labels = rng.permutation(np.arange(n) % k)
    texts, pairs = [], []
    for label in labels:
        source = int(label)
        if rng.random() < LABEL_NOISE:
            source = (source + int(rng.integers(1, k))) % k
        text, pair = make(rng, source)
        for _ in range(10):  # a few tries keep a test text out of train; the space is large
            if text not in seen:
                break
            text, pair = make(rng, source)
        texts.append(text)
        pairs.append(pair)
    return Split(texts, labels, None if pairs[0] is None else pairs)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputTypeError(f"{name} must be an integer in [{MIN_EXAMPLES}, {MAX_EXAMPLES}]")
    if not MIN_EXAMPLES <= value <= MAX_EXAMPLES:
        raise OsrmInputError(f"{name} must be in [{MIN_EXAMPLES}, {MAX_EXAMPLES}], got {value}")


def demo_task(key: str, seed: int = 0, n_train: int = 1200, n_test: int = 400) -> TaskData:
    """A synthetic demo task, generated deterministically from ``seed``.

    Parameters
    ----------
    key : {"sentiment", "topic", "question", "paraphrase"}
        Which task; see :data:`DEMO_TASKS`.
    seed : int, default 0
        Non-negative seed; each task adds its own offset, so tasks do not share a stream.
    n_train, n_test : int, default 1200 and 400
        Number of examples per split, in ``[MIN_EXAMPLES, MAX_EXAMPLES]``.

    Returns
    -------
    TaskData
        Named ``key``; metric "mcc" for "paraphrase", "accuracy" otherwise. Labels are
        balanced within each split (class counts differ by at most one).

    Raises
    ------
    ValueError
        For an unknown key, a negative seed or a split size outside the allowed range.
    TypeError
        For a split size that is not an integer.
    """
    if key not in _SPECS:
        raise OsrmInputError(f"unknown demo task {key!r}; known demo tasks are: {', '.join(_SPECS)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise OsrmInputError(f"seed must be a non-negative integer, got {seed!r}")
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    make, label_names, metric = _SPECS[key]
    rng = np.random.default_rng(int(seed) + 1_000_003 * list(_SPECS).index(key))
    k = len(label_names)
    train = _split(rng, make, k, int(n_train))
    test = _split(rng, make, k, int(n_test), avoid=train)
    return TaskData(key, train, test, list(label_names), metric, DEMO_TASKS[key],
                    source=f"demo:{key} (synthetic, seed {seed})")


def demo_tasks(seed: int = 0, n_train: int = 1200, n_test: int = 400) -> list[TaskData]:
    """All demo tasks in the order of :data:`DEMO_TASKS`; see :func:`demo_task`."""
    return [demo_task(key, seed, n_train, n_test) for key in DEMO_TASKS]
