"""Deterministic generators of tiny instruction tasks whose answers can be checked exactly.

Every example is an Alpaca row ``{"instruction", "input", "output"}``. The same operations are
also rendered as *pretraining text* in different phrasings (``the reverse of the word mango is
ognam.``, ``word: mango\nreversed: ognam``) that never use the instruction template, so a base
model pretrained on that text knows the operations but not the instruction format: fine-tuning
then has something to teach.

Tasks (sized for a ~3M-parameter character-level model trained for minutes on CPU): reverse a
word (3-7 letters), uppercase a word, sort 3-4 digits, add two 2-digit numbers without carry,
convert 1-999 km to m (1-999 rather than 1-99 so that 800 distinct training rows leave unseen
ones for eval).
"""

from __future__ import annotations

import random
# Common lowercase words (3-7 letters); pseudo-words from syllables add an open-ended supply.
_WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat bell belt
best bird blow blue boat body bone book boot born boss both bowl burn bush busy cake call calm
camp card care cart case cash cast cell chat chip city clay club coal coat code cold cook cool
copy corn cost crew crop dark data date dawn deal dear deep desk diet dirt dish door down draw
drop drum duck dust duty earth east easy edge face fact fair fall farm fast fear feet file film
fire firm fish flag flat flow food foot fork form fort free frog fuel full fund gain game gate
gift girl glad goal gold golf good gray grow hair half hall hand hard harm head heat hero hill
hole home hook hope horn host hour huge idea iron item jump jury keep kick kind king kiss knee
lake lamp land lane last lead leaf lean left lens life lift line lion list load lock long loop
lord loss love luck mail main male many map mark mask meal meat menu mild milk mind mine mint
miss mode moon more most move nail name navy neck need nest news nice noon nose note open oven
pack page pain pair palm park part pass path peak pear pine pink pipe plan play plot pole pond
pool port pull pump pure push race rain rank rate read rest rice rich ride ring rise risk road
rock role roof room root rope rose rule safe sail salt sand seat seed ship shoe shop side sign
silk sing size skin slow snow soap sock soft soil song soup spot star stay step stem stop suit
sun tail talk tall tank tape task team tent test text tide tile time tiny tone tool tour town
tree trip tube tune turn twin unit vast view vote wage walk wall warm wave weak wear week west
wide wild wind wine wing wire wise wish wolf wood wool word work yard year zone
apple bread chair cloud dance dream field fruit glass grape green heart horse house juice knife
lemon light mango money mouse music night ocean paper party peach piano pilot plant plate queen
radio river robot salad sheep shirt smile snake space spoon storm sugar table tiger toast tower
train truck water whale wheel world zebra anchor banana basket bottle bridge butter camera
candle carpet castle cheese circle coffee cookie copper dinner doctor dragon engine family
finger flower forest garden ginger guitar hammer island jacket jungle kitten ladder letter
market mirror monkey orange parrot pencil pepper pillow planet pocket potato rabbit rocket
silver spider summer tomato turtle window winter yellow balloon blanket cabbage chicken
dolphin feather kitchen lantern library morning pumpkin rainbow sandwich teacher thunder
unicorn village volcano
"""
WORDS = sorted({w for w in _WORDS.split() if 3 <= len(w) <= 7})

_CONS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"


def _word(rng: random.Random) -> str:
    """A lowercase word of 3-7 letters: half real words, half pronounceable pseudo-words."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    while True:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        if rng.random() < 0.5:
            w += rng.choice(_CONS)
        if 3 <= len(w) <= 7:
            return w


def _digits(rng: random.Random) -> str:
    """3-4 random digits (repeats allowed)."""
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 4)))


# Each task: (instruction, make_input(rng) -> (input, payload), answer(payload) -> output,
#             phrasings) where a phrasing maps (payload, output) -> (prefix, answer, suffix):
# one pretraining statement is prefix + answer + suffix. Several phrasings per operation, some
# over two lines, teach the operation itself rather than one sentence pattern; none of them is
# the instruction template.
def _t_reverse():
    def gen(rng):
        w = _word(rng)
        return w, w
    return ("Reverse the word.", gen, lambda w: w[::-1], [
        lambda w, o: (f"the reverse of the word {w} is ", o, "."),
        lambda w, o: (f"{w} reversed is ", o, "."),
        lambda w, o: (f"reverse the word {w} and you get ", o, "."),
        lambda w, o: (f"word: {w}\nreversed: ", o, ""),
    ])


def _t_upper():
    def gen(rng):
        w = _word(rng)
        return w, w
    return ("Uppercase the word.", gen, lambda w: w.upper(), [
        lambda w, o: (f"the word {w} in uppercase is ", o, "."),
        lambda w, o: (f"{w} in capitals is ", o, "."),
        lambda w, o: (f"uppercase the word {w} and you get ", o, "."),
        lambda w, o: (f"word: {w}\nuppercase: ", o, ""),
    ])


def _t_sort():
    def gen(rng):
        d = _digits(rng)
        return d, d
    return ("Sort the digits.", gen, lambda d: "".join(sorted(d)), [
        lambda d, o: (f"the digits {d} sorted are ", o, "."),
        lambda d, o: (f"{d} with its digits in order is ", o, "."),
        lambda d, o: (f"sort the digits {d} and you get ", o, "."),
        lambda d, o: (f"digits: {d}\nsorted: ", o, ""),
    ])


def _t_add():
    # Two 2-digit numbers whose digit sums stay below 10 (no carry): the answer is digit-wise,
    # which a 3M-parameter model learns in minutes; with carries it does not.
    def gen(rng):
        ta = rng.randint(1, 8)
        tb = rng.randint(1, 9 - ta)
        ua = rng.randint(0, 9)
        ub = rng.randint(0, 9 - ua)
        a, b = 10 * ta + ua, 10 * tb + ub
        return f"{a} + {b}", (a, b)
    return ("Add the numbers.", gen, lambda ab: str(ab[0] + ab[1]), [
        lambda ab, o: (f"{ab[0]} plus {ab[1]} equals ", o, "."),
        lambda ab, o: (f"the sum of {ab[0]} and {ab[1]} is ", o, "."),
        lambda ab, o: (f"add the numbers {ab[0]} and {ab[1]} and you get ", o, "."),
        lambda ab, o: (f"sum: {ab[0]} + {ab[1]}\ntotal: ", o, ""),
    ])


def _t_km():
    def gen(rng):
        k = rng.randint(1, 999)
        return f"{k} km", k
    return ("Convert km to m.", gen, lambda k: f"{k * 1000} m", [
        lambda k, o: (f"{k} km is ", o, "."),
        lambda k, o: (f"{k} km in metres is ", o, "."),
        lambda k, o: (f"convert {k} km to m and you get ", o, "."),
        lambda k, o: (f"distance: {k} km\nin m: ", o, ""),
    ])


TASKS = [_t_reverse(), _t_upper(), _t_sort(), _t_add(), _t_km()]
# Share of each task in the pretraining text: the easy ones (uppercase) need less.
PRETRAIN_WEIGHTS = [0.22, 0.16, 0.2, 0.22, 0.2]
INSTRUCTIONS = [t[0] for t in TASKS]


def _draw(rng: random.Random, task) -> tuple[str, object, str]:
    instruction, gen, answer, _ = task
    inp, payload = gen(rng)
    return inp, payload, answer(payload)


def make_examples(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """``n`` Alpaca rows, tasks interleaved evenly (round-robin), deterministic in ``seed``.

    Rows whose ``(instruction, input)`` is in ``exclude`` are skipped, and no pair repeats within
    the result, so an eval set drawn with ``exclude=pairs(train)`` never copies a train row.
    """
    rng = random.Random(f"examples:{seed}")
    seen = set(exclude or ())
    rows: list[dict] = []
    misses = 0
    while len(rows) < n:
        task = TASKS[len(rows) % len(TASKS)]
        inp, _, out = _draw(rng, task)
        key = (task[0], inp)
        if key in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise RuntimeError("task space exhausted; ask for fewer examples")
            continue
        seen.add(key)
        rows.append({"instruction": task[0], "input": inp, "output": out})
    return rows


def pairs(rows: list[dict]) -> set:
    """The ``(instruction, input)`` keys of some rows."""
    return {(r["instruction"], r["input"]) for r in rows}


def make_pretrain_statements(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``n`` statements as ``(instruction, prefix, answer, suffix)``; the text is the last three joined."""
    rng = random.Random(f"pretrain:{seed}")
    out = []
    for _ in range(n):
        task = rng.choices(TASKS, weights=PRETRAIN_WEIGHTS)[0]
        _, payload, answer = _draw(rng, task)
        prefix, ans, suffix = rng.choice(task[3])(payload, answer)
        out.append((task[0], prefix, ans, suffix))
    return out


def make_pretrain_text(n_lines: int, seed: int) -> list[str]:
    """``n_lines`` statements of the same operations in plain prose (no instruction format).

    A "line" may span two text lines (``word: mango\nreversed: ognam``); the builder frames each
    with ``<s>`` and ``</s>``.
    """
    return [p + a + s for _, p, a, s in make_pretrain_statements(n_lines, seed)]


def check(row: dict, prediction: str) -> bool:
    """Exact match of a generated answer (surrounding whitespace ignored)."""
    return prediction.strip() == row["output"]
