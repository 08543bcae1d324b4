"""Builds minisum's train.jsonl / test.jsonl (shipped; rerun to regenerate identically).

Every document is invented from templates with random slots (towns, people, organisations, numbers, days), in
eight domains. Each row carries a plain human-style ``reference`` summary that keeps the gist and some specifics but
not the key numbers, and a held-out expert ``gold`` summary that states the main event with its key specifics in the
document's own words, and its template's name as ``group``: the test prompts of one template win or lose
together, so the experiment report also resamples whole groups for its confidence intervals. Usage: ``python data/minisum/generate.py`` (the shipped 128 / 48 rows, here).

A larger set for the experiment runner, with no test document sharing a (template, town, person) with a training
one: ``python data/minisum/generate.py --train 1200 --test 400 --seed 2025 --disjoint --out data/minisum_large``.
"""

import argparse
import json
import os
import random

TOWNS = ["Elmsford", "Brackwater", "Linden Falls", "Harrow Bay", "Oakridge", "Millbrook", "Stonehaven", "Kestrel Point",
         "Ashgrove", "Redfern", "Willowmere", "Copperton", "Fairhollow", "Northwick", "Silverdale", "Thornbury"]
PEOPLE = ["Maria Okafor", "Daniel Reyes", "Priya Natarajan", "Tom Becker", "Aiko Tanaka", "Lena Novak", "Samuel Osei",
          "Clara Moreau", "Jonas Lindqvist", "Fatima Haddad", "Owen Gallagher", "Mei Chen", "Rafael Duarte", "Nina Petrova"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ORGS = ["the Riverside Trust", "the Green Valley Foundation", "the county council", "the Harbor Arts Fund",
        "the Northern Rail Company", "the Civic Science Society", "the Lakeside Rotary Club", "the Regional Health Board"]

TEMPLATES = [
    dict(
        name="library",
        doc="{town}'s public library will open a new reading room on {day}. The room has {n} seats, free wifi and "
            "stays open until {hour} p.m. on weekdays. It was paid for by a grant of {money} dollars from {org}. "
            "Head librarian {person} said students had asked for a quiet place to study after school.",
        ref="The public library in {town} opens a new reading room for students with {n} seats.",
        gold="{town}'s library opens a {n}-seat reading room with free wifi on {day}, funded by {org}.",
    ),
    dict(
        name="rain",
        doc="Forecasters expect heavy rain across the {town} valley from {day} night, with up to {n} millimeters "
            "falling in twelve hours. The river road will close at {hour} p.m. as a precaution. {person} of the "
            "local emergency office urged drivers to use the hill route and to keep phones charged.",
        ref="Heavy rain is expected in the {town} valley, so the river road will close.",
        gold="Up to {n} millimeters of rain will hit the {town} valley from {day}, closing the river road at {hour} p.m.",
    ),
    dict(
        name="cup_final",
        doc="The {town} Hawks beat the {town2} Rovers {n} to {m} on {day} to win the regional football cup. "
            "Striker {person} scored twice in the second half after the Hawks trailed at the break. About {money} "
            "fans watched the final, the largest crowd the stadium has seen in ten years.",
        ref="The {town} Hawks won the regional cup final against {town2} on {day}.",
        gold="The {town} Hawks beat the {town2} Rovers {n}-{m} to win the regional cup, with {person} scoring twice.",
    ),
    dict(
        name="bakery",
        doc="A new bakery called {shop} opened on Main Street in {town} on {day}. Owner {person} trained in "
            "bread making for {n} years before moving back home. The shop sells sourdough, rye and fruit buns and "
            "employs {m} local people. It is open every day except Monday from 7 a.m.",
        ref="A new bakery called {shop} has opened on Main Street in {town}.",
        gold="{person} opened the {shop} bakery on {town}'s Main Street on {day}, employing {m} local people.",
    ),
    dict(
        name="school_fundraiser",
        doc="Pupils at {town} Primary School raised {money} dollars for the children's ward of the county "
            "hospital. Over {n} weeks they held bake sales, a sponsored walk and a school concert. Teacher "
            "{person} said the money will buy games and books. The hospital will thank the pupils at an "
            "assembly on {day}.",
        ref="Pupils in {town} raised money for the hospital with bake sales and a concert.",
        gold="{town} Primary School pupils raised {money} dollars in {n} weeks for the county hospital's children's ward.",
    ),
    dict(
        name="bus",
        doc="From {day}, the number {n} bus in {town} will run every {m} minutes instead of every half hour. "
            "{org} said more people are taking the bus to the new business park. Two new stops will be added near "
            "the station. Spokesperson {person} said fares will stay the same for the rest of the year.",
        ref="The number {n} bus in {town} will run more often from {day}.",
        gold="From {day}, {town}'s number {n} bus will run every {m} minutes, with two new stops and unchanged fares.",
    ),
    dict(
        name="puffins",
        doc="Researchers at the {town} field station counted {n} pairs of nesting puffins this spring, up from "
            "{m} pairs five years ago. Biologist {person} credits a ban on fishing near the cliffs. The team "
            "will fit small trackers to twenty birds on {day} to learn where they feed during the summer.",
        ref="The {town} field station counted more nesting puffins this spring than before.",
        gold="{town} researchers counted {n} puffin pairs this spring, up from {m} five years ago, after a fishing ban.",
    ),
    dict(
        name="flu_clinic",
        doc="The {town} health clinic will offer free flu vaccinations every {day} in October. Anyone over "
            "{n} years old, and people with asthma or diabetes, can walk in without an appointment. Nurse "
            "{person} said the clinic has {money} doses ready. The clinic asks visitors to bring a photo ID.",
        ref="The {town} health clinic is giving free flu vaccinations in October.",
        gold="The {town} clinic offers free walk-in flu shots every {day} in October to people over {n}.",
    ),
]
SHOPS = ["Golden Crust", "Rising Dough", "The Flour Mill", "Crumb and Co", "Morning Loaf", "Hearth Bread"]


def make_rows(count: int, rng: random.Random, prefix: str, seen=None) -> list[dict]:
    """``count`` rows, each with a (template, town, person) not in ``seen`` (updated; a fresh set when None)."""
    rows, seen = [], set() if seen is None else seen
    if count > len(TOWNS) * len(PEOPLE) * len(TEMPLATES) - len(seen):
        raise ValueError(f"{count} rows need more distinct (template, town, person) combinations than are left")
    while len(rows) < count:
        t = TEMPLATES[len(rows) % len(TEMPLATES)]
        town, town2 = rng.sample(TOWNS, 2)
        slots = dict(town=town, town2=town2, person=rng.choice(PEOPLE), day=rng.choice(DAYS), org=rng.choice(ORGS),
                     shop=rng.choice(SHOPS), n=rng.randint(3, 60), m=rng.randint(2, 30), hour=rng.randint(6, 10),
                     money=rng.choice([800, 1200, 2500, 4000, 6500, 9000, 15000]))
        key = (TEMPLATES.index(t), town, slots["person"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({"id": f"{prefix}-{len(rows):03d}", "document": t["doc"].format(**slots),
                     "reference": t["ref"].format(**slots), "gold": t["gold"].format(**slots), "group": t["name"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=128, help="training rows")
    p.add_argument("--test", type=int, default=48, help="test rows")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--disjoint", action="store_true",
                   help="no (template, town, person) in both splits (default off: the shipped files)")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="folder (default: here)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng, shared = random.Random(args.seed), set() if args.disjoint else None
    for split, count in (("train", args.train), ("test", args.test)):
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            for row in make_rows(count, rng, split, shared):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
