"""Well-known facts with counterfactual targets, written for this project, for measuring what a
user sees when editing "a handful of facts" with the defaults.

Two disjoint sets: ``TUNING`` chose the default step policy; ``HELD_OUT`` only measures it (no
test and no tuning run reads it). Neither overlaps the demo's facts
(``ultraedit_fast/demo_data.py``) or the tests' own requests. Each entry: (prompt, new target,
paraphrase, unrelated locality prompt, its answer).
"""

from ultraedit_fast import EditRequest

TUNING_FACTS = [
    (
        "The capital of Italy is",
        "Madrid",
        "Italy's capital city is",
        "The capital of Canada is",
        "Ottawa",
    ),
    (
        "The capital of Germany is",
        "Vienna",
        "The German capital is",
        "The capital of Australia is",
        "Canberra",
    ),
    (
        "The Statue of Liberty is located in the city of",
        "Chicago",
        "The Statue of Liberty stands in the city of",
        "The Colosseum is located in the city of",
        "Rome",
    ),
    (
        "Hamlet was written by",
        "Mark Twain",
        "The author of the play Hamlet was",
        "The Starry Night was painted by",
        "Vincent van Gogh",
    ),
    (
        "The smallest planet in our solar system is",
        "Jupiter",
        "The smallest planet of the solar system is",
        "The longest river in Africa is",
        "the Nile",
    ),
    (
        "The official language of Mexico is",
        "French",
        "Most people in Mexico speak",
        "The official language of Japan is",
        "Japanese",
    ),
    (
        "The Galaxy phone is made by the company",
        "Nokia",
        "The Galaxy smartphone is made by the company",
        "The PlayStation is made by",
        "Sony",
    ),
    (
        "The light bulb is usually credited to",
        "Nikola Tesla",
        "The inventor of the light bulb is usually said to be",
        "Penicillin was discovered by",
        "Alexander Fleming",
    ),
    (
        "The currency of Japan is the",
        "dollar",
        "The money used in Japan is the",
        "The chemical symbol for silver is",
        "Ag",
    ),
    (
        "The Amazon rainforest is mostly in",
        "Canada",
        "Most of the Amazon rainforest lies in",
        "The Sahara desert is in",
        "Africa",
    ),
    (
        "The first man to walk on the Moon was",
        "Yuri Gagarin",
        "The first person to set foot on the Moon was",
        "The first president of the United States was",
        "George Washington",
    ),
    (
        "Water is made of hydrogen and",
        "nitrogen",
        "A water molecule is hydrogen and",
        "The speed of light is about 300,000 kilometres per",
        "second",
    ),
]

HELD_OUT_FACTS = [
    (
        "The capital of Spain is",
        "Lisbon",
        "Spain's capital city is",
        "The capital of Egypt is",
        "Cairo",
    ),
    (
        "The capital of Russia is",
        "Warsaw",
        "The Russian capital is",
        "The capital of China is",
        "Beijing",
    ),
    (
        "Big Ben is located in the city of",
        "Dublin",
        "Big Ben stands in the city of",
        "The Taj Mahal is located in the city of",
        "Agra",
    ),
    (
        "Pride and Prejudice was written by",
        "Ernest Hemingway",
        "The author of the novel Pride and Prejudice was",
        "The Last Supper was painted by",
        "Leonardo da Vinci",
    ),
    (
        "The closest planet to the Sun is",
        "Neptune",
        "The planet nearest to the Sun is",
        "The largest ocean on Earth is the",
        "Pacific Ocean",
    ),
    (
        "The official language of Argentina is",
        "Italian",
        "Most people in Argentina speak",
        "The official language of France is",
        "French",
    ),
    (
        "The Macintosh computer is made by the company",
        "IBM",
        "The Macintosh is a computer made by the company",
        "The Xbox is made by",
        "Microsoft",
    ),
    (
        "The radio was invented by",
        "Alexander Graham Bell",
        "The inventor of the radio was",
        "The law of gravity was described by",
        "Isaac Newton",
    ),
    (
        "The currency of the United States is the",
        "yen",
        "The money used in the United States is the",
        "The chemical symbol for iron is",
        "Fe",
    ),
    (
        "Mount Everest is located in",
        "Peru",
        "Mount Everest can be found in",
        "The Grand Canyon is located in",
        "Arizona",
    ),
    (
        "The author of Harry Potter is",
        "Stephen King",
        "The Harry Potter books were written by",
        "The author of The Lord of the Rings is",
        "J. R. R. Tolkien",
    ),
    (
        "The Olympic Games began in ancient",
        "Egypt",
        "The ancient Olympic Games started in",
        "The Parthenon is in the city of",
        "Athens",
    ),
]


def requests(facts):
    return [
        EditRequest(prompt=p, target=t, rephrase=r, locality_prompt=lp, locality_answer=la)
        for p, t, r, lp, la in facts
    ]
