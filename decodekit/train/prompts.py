"""The training data of ``decodekit train``: prompts and the target's own answers to them.

The built-in prompts are instructions composed from templates, subjects and random numbers, spread over the kinds
of request the benchmark tasks cover (conversation and writing, questions, math, coding, summarizing, translating,
extracting). Deterministic for a seed; none is a Spec-Bench question or a prompt of the package's own question set
(tested). About 2,400 distinct prompts; ``training_prompts(n)`` takes a shuffled selection. Templates make narrow
text, so :func:`generated_prompts` adds prompts the target writes itself (Magpie's way): more varied requests, in the
target's own idea of what users ask.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tqdm import tqdm

from decodekit.engine import Engine, encode_prompt
from decodekit.prompts import builtin_questions
from decodekit.runtime.loader import LoadedModel
from decodekit.sampling import SamplingParams

MARK = "\x01MARK\x01"  # a user message that no template produces: where the user's text starts
GENERATED_TOKENS = 96  # the longest generated prompt, in tokens

SUBJECTS = [
    "volcanoes", "the water cycle", "honeybees", "black holes", "the Roman Empire", "photosynthesis", "electric cars",
    "the printing press", "coral reefs", "vaccines", "the stock market", "jazz music", "glaciers", "the internet",
    "solar panels", "chess", "the human heart", "rainforests", "earthquakes", "the moon landing", "recycling",
    "tea", "bicycles", "the Renaissance", "octopuses", "compound interest", "sleep", "bread baking", "lighthouses",
    "the Silk Road", "wind turbines", "penguins", "the periodic table", "origami", "hurricanes", "ancient Egypt",
    "public libraries", "migration of birds", "coffee", "the Olympic Games", "microplastics", "the telescope",
    "desert plants", "trains", "the immune system", "board games", "clouds", "the French Revolution", "mushrooms",
    "satellites", "composting", "whales", "the violin", "city parks", "antibiotics", "rivers", "robots",
]  # fmt: skip
WRITING = [
    "Write a short poem about {s}.",
    "Write a friendly email inviting a colleague to a talk about {s}.",
    "Write a two-paragraph story in which {s} play an important role.",
    "Give me five fun facts about {s}.",
    "Write a short speech for a school assembly about {s}.",
    "Describe {s} to a ten-year-old in a few sentences.",
    "Write a product description for a board game themed around {s}.",
    "List the pros and cons of learning about {s} as a hobby.",
    "Write a haiku sequence (three haiku) on {s}.",
    "Draft a social media post announcing a museum exhibition about {s}.",
]
QUESTIONS = [
    "What are {s}, and why do they matter?",
    "How do {s} work? Explain step by step.",
    "What is the history of {s}, briefly?",
    "What are common misconceptions about {s}?",
    "Why do scientists study {s}?",
    "Compare {s} and {t}: how are they alike and how do they differ?",
    "What would happen if {s} disappeared tomorrow?",
    "Explain the main ideas behind {s} in simple terms.",
]
SUMMARIES = [
    "Summarize in two sentences: {p}",
    "Give a one-line summary of this note: {p}",
    "Extract the key points as a bulleted list: {p}",
    "What is the main message of the following text? {p}",
]
TRANSLATIONS = [
    "Translate into French: {p}",
    "Translate into Spanish: {p}",
    "Translate into German: {p}",
    "Rewrite this sentence in a more formal tone: {p}",
]
CODE = [
    "Write a Python function that returns the {n}th Fibonacci number.",
    "Write a Python function that checks whether a string is a palindrome, ignoring spaces.",
    "Write a Python function that counts the words in a text and returns the {n} most common ones.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that converts a temperature from Celsius to Fahrenheit, with a docstring.",
    "Write a Python class for a bank account with deposit and withdraw methods that refuse overdrafts.",
    "Write a JavaScript function that removes duplicate values from an array.",
    "Write a SQL query that lists the {n} customers with the highest total order value.",
    "Explain what this Python line does: sorted(words, key=len)[:{n}]",
    "Write a Python function that returns all prime numbers below {m}.",
]
FACTS = [
    "{s} have fascinated people for centuries. Researchers now use new tools to measure them, and the results"
    " surprised many experts, who had expected slower change.",
    "Our town will hold an open day about {s} next Saturday. Volunteers will give short talks, children can join"
    " a quiz, and entry is free for everyone.",
    "A new report on {s} says funding has doubled over ten years, but public understanding has barely improved;"
    " the authors call for better teaching in schools.",
]


def _math(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 12)
    forms = [
        f"A shop sells pencils at {c} cents each. How much do {a} pencils cost? Show your working.",
        f"A train travels {a * c} km in {c} hours. What is its average speed?",
        f"Solve for x: {c}x + {a} = {a + c * b}.",
        f"What is {a} percent of {b * 10}? Explain.",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        f"If you save {c} dollars a week, how many weeks until you have {c * a} dollars?",
        f"What is the sum of the whole numbers from 1 to {a + b}?",
        f"Anna has {a} apples and gives {min(a - 1, b)} away. Then she buys {c} more. How many does she have?",
    ]
    return rng.choice(forms)


def all_prompts(seed: int = 0) -> list[str]:
    """Every built-in prompt once, in a fixed order for ``seed``."""
    rng = random.Random(seed)
    prompts = []
    for s in SUBJECTS:
        t = rng.choice([x for x in SUBJECTS if x != s])
        prompts += [template.format(s=s, t=t) for template in WRITING + QUESTIONS]
        for fact in FACTS:
            text = fact.format(s=s.capitalize())
            prompts += [template.format(p=text) for template in SUMMARIES + TRANSLATIONS[:1]]
        prompts += [template.format(p=f"The museum about {s} opens at nine.") for template in TRANSLATIONS]
    prompts += [template.format(n=n, m=10 * n) for template in CODE for n in range(3, 15)]
    prompts += [_math(rng) for _ in range(300)]
    unique = list(dict.fromkeys(prompts))
    rng.shuffle(unique)
    return unique


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct built-in prompts (all of them if fewer exist)."""
    return all_prompts(seed)[:count]


def prompt_set(model: LoadedModel, templated: int, generated: int = 0) -> list[str]:
    """``templated`` built-in prompts, then ``generated`` ones the target writes (:func:`generated_prompts`)."""
    return training_prompts(templated) + (generated_prompts(model, generated) if generated else [])


def generated_prompts(model: LoadedModel, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct user requests sampled from the target itself (Magpie, Xu et al., 2024): its chat template
    up to where a user's text begins, continued at temperature 1 (top-p 0.98) until the end of the turn. Requests
    cut by the length limit, shorter than 12 characters, repeated, or among the package's own questions are
    dropped and more are sampled (four rounds at most: fewer than ``count`` may come back)."""
    ids = encode_prompt(model, MARK)
    mark = model.tokenizer.encode(MARK)
    opening = next(i for i in range(len(ids)) if ids[i : i + len(mark)] == mark)
    prefix, kept, known = ids[:opening], {}, {turn for q in builtin_questions() for turn in q.turns}
    for round_ in range(4):
        wanted = count - len(kept)
        if wanted <= 0:
            break
        seeds = [seed * 1_000_003 + round_ * count * 4 + i for i in range(wanted + wanted // 4 + 1)]
        samplings = [SamplingParams(temperature=1.0, top_p=0.98, seed=s) for s in seeds]
        for sequence, _ in answers(model, [prefix] * len(seeds), GENERATED_TOKENS, samplings=samplings):
            tail = sequence[len(prefix) :]
            if tail and tail[-1] in model.eos_token_ids:
                text = model.tokenizer.decode(tail[:-1]).strip()
                if len(text) >= 12 and text not in known:
                    kept.setdefault(text, None)
    return list(kept)[:count]


def answers(
    model: LoadedModel,
    prompts: Sequence[str | list[int]],
    max_new_tokens: int,
    max_batch: int = 4,
    samplings: Sequence[SamplingParams] | None = None,
) -> list[tuple[list[int], int]]:
    """The target's prompt + answer token ids for each prompt (in order: a user message, or token ids taken as they
    are) and the prompt's length, decoded by the engine in batches of ``max_batch`` with the default lossless method;
    greedy, or sampled with ``samplings`` (one per prompt)."""
    engine = Engine(model, method="hybrid", max_batch=max_batch)
    samplings = samplings or [SamplingParams()] * len(prompts)
    requests = [
        engine.request(prompt, max_new_tokens=max_new_tokens, sampling=sampling)
        for prompt, sampling in zip(prompts, samplings, strict=True)
    ]
    with tqdm(total=len(prompts), desc="answers", unit="prompt") as bar:
        generations = engine.run_all(requests, on_done=lambda index, generation: bar.update())
    return [(generation.prompt_ids + generation.token_ids, len(generation.prompt_ids)) for generation in generations]
