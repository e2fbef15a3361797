"""Generate the quickstart dataset: extract a person's name, age, city and job as compact JSON.

Each row is a chat with a fixed system message, one user sentence describing a person, and the
assistant answer, e.g.

    user:      Maria Lopez, 34, moved to Lisbon in 2019 to work as a nurse.
    assistant: {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}

The answer always uses the same key order and `json.dumps(obj, ensure_ascii=False)` (compact
spacing), and every value is copied verbatim from the sentence (the age is written in digits), so
there is exactly one correct answer string and exact-match accuracy of greedy generations on the
held-out split is a meaningful metric. The base SmolLM2-135M-Instruct does not produce this format;
a few hundred LoRA steps teach it.

Sentences come from ~35 templates that mention the four fields in different orders and phrasings
(some with a distracting year), filled from pools of first names, last names, cities and jobs, ages
18-80. The eval split uses the same templates but full names (first + last) that never appear in
the training split, so no eval sentence or answer can be memorized from training.

Deterministic (python stdlib only, `random.Random(0)`). Regenerate with

    python scripts/make_quickstart_data.py

which rewrites configs/data/quickstart_train.jsonl (800 rows) and configs/data/quickstart_eval.jsonl
(64 rows).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Extract the person's name, age, city and job from the text. Answer with JSON only."

N_TRAIN = 800
N_EVAL = 64

FEMALE = """Maria Anna Sofia Emma Olivia Chloe Laura Elena Ines Clara Hannah Julia Amelia Zoe Mia Nora
Leila Aisha Yuki Mei Priya Fatima Ingrid Astrid Camille Lucia Beatriz Grace Ruth Eva Alice Isabel
Nadia Sara Hana Marta Freya Rosa Amara Keiko Helga Noemi Lina Ayumi Thandiwe Carmen""".split()

MALE = """James Lucas Mateo Noah Liam Daniel David Omar Ahmed Hiroshi Kenji Raj Arjun Tomas Pedro
Diego Marco Luca Felix Jonas Erik Lars Pierre Louis Hugo Samuel Ethan Oliver Ivan Dmitri Kofi Kwame
Wei Andre Rafael Victor Adam Ben Yusuf Emil Karim Jakub Nikolai Tariq Oscar""".split()

LAST = """Lopez Garcia Silva Santos Pereira Rossi Bianchi Müller Schmidt Fischer Dubois Martin Bernard
Smith Johnson Brown Taylor Wilson Nguyen Tanaka Sato Kim Park Patel Sharma Khan Ali Hassan Okafor
Mensah Kowalski Novak Horvat Jensen Hansen Larsen Andersson Nilsson Virtanen O'Brien Murphy Walsh
Petrov Popescu Papadopoulos Yilmaz Cohen Levi Fernandes Costa Moreau Janssen Wang Zhang Chen Ortiz
Reyes Morales Schneider Weber Lindqvist Kariuki Adeyemi Haddad Nakamura Suzuki Ito Romano""".split()

CITIES = [
    "Lisbon", "Porto", "Madrid", "Barcelona", "Seville", "Valencia", "Paris", "Lyon", "Marseille",
    "Berlin", "Munich", "Hamburg", "Vienna", "Zurich", "Geneva", "Amsterdam", "Rotterdam", "Brussels",
    "Copenhagen", "Stockholm", "Oslo", "Helsinki", "Dublin", "London", "Manchester", "Edinburgh",
    "Glasgow", "Rome", "Milan", "Naples", "Turin", "Athens", "Warsaw", "Krakow", "Prague", "Budapest",
    "Bucharest", "Istanbul", "Cairo", "Nairobi", "Lagos", "Cape Town", "Casablanca", "Dubai",
    "Toronto", "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Denver", "New York",
    "San Francisco", "Los Angeles", "Mexico City", "Bogotá", "Lima", "Buenos Aires", "São Paulo",
    "Rio de Janeiro", "Tokyo", "Osaka", "Seoul", "Singapore", "Bangkok", "Hanoi", "Mumbai", "Delhi",
    "Melbourne", "Auckland",
]

JOBS = [
    "nurse", "teacher", "software engineer", "architect", "electrician", "accountant", "pharmacist",
    "chef", "baker", "journalist", "dentist", "plumber", "librarian", "firefighter", "photographer",
    "lawyer", "carpenter", "mechanic", "veterinarian", "graphic designer", "data analyst", "pilot",
    "police officer", "civil engineer", "musician", "translator", "paramedic", "barista", "farmer",
    "economist", "physiotherapist", "tailor", "surgeon", "web developer", "real estate agent",
    "flight attendant", "biologist", "sales manager", "interior designer", "bus driver", "optician",
    "welder", "social worker", "hairdresser", "archaeologist", "game developer", "bookkeeper",
    "midwife", "radiologist", "florist", "geologist", "painter", "tax advisor", "IT consultant",
    "project manager", "lab technician", "yoga instructor", "marine biologist", "truck driver",
    "pastry chef",
]

# {name} {age} {city} {job}; {a_job} = "a nurse" / "an architect"; {an_age} = "a 34" / "an 18";
# {He} {he} {his} follow the first name's gender; {year} is a distracting number.
TEMPLATES = [
    "{name}, {age}, moved to {city} in {year} to work as {a_job}.",
    "{name} is {a_job} from {city}. {He} is {age} years old.",
    "Meet {name}: {a_job} in {city}, aged {age}.",
    "At {age}, {name} still works as {a_job} in {city}.",
    "{city}-based {job} {name} turned {age} last week.",
    "Our new neighbour, {name} ({age}), is {a_job} who lives in {city}.",
    "{name}, {an_age}-year-old {job}, lives in {city}.",
    "The {job} {name}, {age}, was born and raised in {city}.",
    "Name: {name}. Age: {age}. Based in {city}, working as {a_job}.",
    "{name} ({age}) - {job}, {city}.",
    "After years abroad, {name} settled in {city}, where the {age}-year-old now works as {a_job}.",
    "I met {name} in {city}; {he} is {age} and works as {a_job}.",
    "{name}, who is {age}, has been {a_job} in {city} since {year}.",
    "Profile: {job}, {age} years old, lives in {city}. Name: {name}.",
    "{name} works as {a_job} and lives in {city}. {He} is {age}.",
    "Hi, I'm {name}! I'm {age}, I live in {city} and I work as {a_job}.",
    "My name is {name}, I am {age} years old, and I am {a_job} in {city}.",
    "{name}, {age}, {job} from {city}, joined the team on Monday.",
    "Local {job} {name}, {age}, opened a small office in {city} in {year}.",
    "According to the report, {name} ({age}) is employed as {a_job} in {city}.",
    "{name} is {age} years old and has lived in {city} all {his} life, working as {a_job}.",
    "The {age}-year-old {job} {name} was interviewed in {city} yesterday.",
    "Applicant: {name}, age {age}, current city {city}, occupation {job}.",
    "{name} became {a_job} in {city} and, now {age}, has no plans to move.",
    "{city} is home to {name}, {a_job} aged {age}.",
    "Everyone in {city} knows {name}, the {age}-year-old {job} from the corner house.",
    "{name} | {age} | {job} | {city}",
    "When not working as {a_job}, {name} ({age}) explores {city} by bike.",
    "Spotted in {city}: {name}, {age}, {a_job} with a passion for music.",
    "{He} is {age}, {he} is {a_job}, {he} lives in {city}, and {his} name is {name}.",
    "Since {year}, {name} has lived in {city}. {He} is {age} and works as {a_job}.",
    "New member: {name} joins us from {city}. {He} is {a_job} and {age} years old.",
    "{name} ({job}, {age}) commutes to {city} every morning.",
    "Job: {job}. City: {city}. Name: {name}. Age: {age}.",
    "Last year {name}, then {prev_age}, took a job in {city}; today the {age}-year-old is still {a_job} there.",
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiouAEIOU" else "a"


def age_article(age: int) -> str:
    # "an 18-year-old", "an 80-year-old", "an 8x-year-old"; the rest take "a".
    return "an" if age in (11, 18) or str(age).startswith("8") else "a"


def make_row(rng: random.Random, template: str, first: str, last: str, female: bool) -> dict:
    age = rng.randint(18, 80)
    city = rng.choice(CITIES)
    job = rng.choice(JOBS)
    name = f"{first} {last}"
    he, his = ("she", "her") if female else ("he", "his")
    sentence = template.format(
        name=name, age=age, prev_age=age - 1, city=city, job=job, a_job=f"{article(job)} {job}",
        an_age=f"{age_article(age)} {age}", He=he.capitalize(), he=he, his=his,
        year=rng.randint(2005, 2023),
    )
    sentence = sentence[0].upper() + sentence[1:]
    answer = json.dumps({"name": name, "age": age, "city": city, "job": job}, ensure_ascii=False)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": sentence},
        {"role": "assistant", "content": answer},
    ]}


def random_person(rng: random.Random) -> tuple[str, str, bool]:
    female = rng.random() < 0.5
    return rng.choice(FEMALE if female else MALE), rng.choice(LAST), female


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent.parent / "configs" / "data"

    # Eval first: 64 distinct full names, cycling through every template.
    eval_rows, eval_names = [], set()
    while len(eval_rows) < N_EVAL:
        first, last, female = random_person(rng)
        if (first, last) in eval_names:
            continue
        eval_names.add((first, last))
        template = TEMPLATES[len(eval_rows) % len(TEMPLATES)]
        eval_rows.append(make_row(rng, template, first, last, female))

    # Train: full names never used in eval, templates shuffled in even rounds, no duplicate sentence.
    train_rows, seen = [], set()
    order: list[str] = []
    while len(train_rows) < N_TRAIN:
        first, last, female = random_person(rng)
        if (first, last) in eval_names:
            continue
        if not order:
            order = TEMPLATES[:]
            rng.shuffle(order)
        row = make_row(rng, order.pop(), first, last, female)
        sentence = row["messages"][1]["content"]
        if sentence in seen:
            continue
        seen.add(sentence)
        train_rows.append(row)

    for fname, rows in (("quickstart_train.jsonl", train_rows), ("quickstart_eval.jsonl", eval_rows)):
        with open(out / fname, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {out / fname}")


if __name__ == "__main__":
    main()
