"""Subjects for `unlearn bench selectivity` and the selectivity e2e test: well-known people and places the
default model answers questions about, and evaluation neighbours that are NOT in the engine's built-in
neighbour list (workers/engine/resources/neighbour_subjects.json), so a drop on them is not flattered by
training on them."""

from __future__ import annotations

PERSON_QUESTIONS = (
    "Who was {}?",
    "What is {} best known for?",
    "Where was {} born?",
    "What nationality was {}?",
    "What field did {} work in?",
    "What are the most famous achievements of {}?",
    "Tell me about the early life of {}.",
    "Why is {} important in history?",
)
PLACE_QUESTIONS = (
    "Where is {}?",
    "What is {} famous for?",
    "In which country is {}?",
    "Why do people visit {}?",
    "Describe {} in one sentence.",
    "What is the history of {}?",
    "How old is {}?",
    "What can you see at {}?",
)
HELD_OUT = 3  # the last questions of a subject are not in the request: does forgetting generalise to them?

SUBJECTS = (
    ("person", "Albert Einstein"),
    ("person", "Marie Curie"),
    ("person", "William Shakespeare"),
    ("place", "Mount Kilimanjaro"),
    ("place", "the Louvre"),
    ("person", "Barack Obama"),
)

EVAL_PEOPLE = (
    "Johannes Gutenberg", "Marco Polo", "Joan of Arc", "Genghis Khan", "Confucius", "Michael Jackson",
    "Frida Kahlo", "Rembrandt", "Salvador Dali", "Frederic Chopin", "Bob Marley", "Freddie Mercury",
    "Agatha Christie", "George Orwell", "Homer", "Dante Alighieri", "Victor Hugo", "J. R. R. Tolkien",
    "Franklin D. Roosevelt", "Thomas Jefferson", "John F. Kennedy", "Margaret Thatcher", "Vladimir Lenin",
    "Mother Teresa", "Rosa Parks", "Harriet Tubman", "Yuri Gagarin", "Ferdinand Magellan", "James Cook",
    "Pythagoras", "Archimedes", "Johannes Kepler", "Nicolaus Copernicus", "Michael Faraday", "James Watt",
    "Alexander Graham Bell", "Henry Ford", "Bill Gates", "Muhammad Ali", "Pablo Neruda",
)
EVAL_PLACES = (
    "Angkor Wat", "Petra", "Chichen Itza", "the Kremlin", "Vatican City", "Hollywood", "Mount Rushmore",
    "the Panama Canal", "Times Square", "Kyoto", "Istanbul", "Moscow", "Athens", "Barcelona", "Amsterdam",
    "the Mississippi River", "Lake Baikal", "the Rocky Mountains", "Buckingham Palace", "the Forbidden City",
)
EVAL_TEMPLATES = {"person": PERSON_QUESTIONS[:5], "place": PLACE_QUESTIONS[:5]}


def fill(template: str, name: str) -> str:
    from workers.engine.neighbours import fill as engine_fill

    return engine_fill(template, name)


def subject_questions(kind: str, name: str) -> tuple[list[str], list[str]]:
    """(forget questions, held-out questions) about one subject."""
    questions = [fill(t, name) for t in (PERSON_QUESTIONS if kind == "person" else PLACE_QUESTIONS)]
    return questions[:-HELD_OUT], questions[-HELD_OUT:]


def neighbour_questions(kind: str, count: int = 40) -> list[str]:
    """One question per evaluation neighbour of the kind, the question shapes rotating."""
    names = EVAL_PEOPLE if kind == "person" else EVAL_PLACES
    templates = EVAL_TEMPLATES[kind]
    return [fill(templates[i % len(templates)], name) for i, name in enumerate(names[:count])]
