"""The MCQ reward is what the policy optimises, so its parser is the first place a silent regression
or a reward hack shows up: every case asserts the exact letter or the exact breakdown. The rules
under test are written out in the docstring of gmai_rl.reward.mcq.
"""

import random
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gmai_rl.reward import RewardBreakdown, extract_choice, mcq_reward

BRAIN = {"A": "Normal brain", "B": "Glioma", "C": "Meningioma", "D": "Pituitary tumor"}
# Option texts that hold option letters: a scan for capital letters would misread all of them.
HEPATITIS = {
    "A": "Hepatitis A",
    "B": "Hepatitis B",
    "C": "Hepatitis C",
    "D": "Vitamin D deficiency",
}


def _fullwidth(text: str) -> str:
    return "".join(
        "\u3000" if c == " " else chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text
    )


BRAIN_CASES = [
    # Accepted dresses of a letter.
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("[B]", "B"),
    ("{B}", "B"),
    ("**B**", "B"),
    ("*B*", "B"),
    ("`B`", "B"),
    ("\\boxed{B}", "B"),
    ("$\\boxed{B}$", "B"),
    ("$\\boxed{\\text{B}}$", "B"),
    ("\\(\\boxed{B}\\)", "B"),
    ("Option B", "B"),
    ("option (B)", "B"),
    ("Answer: B", "B"),
    ("**Answer:** B", "B"),
    ("Final Answer: **B**", "B"),
    ("The answer is B.", "B"),
    ("The answer is: (B)", "B"),
    ("The correct answer is (B)", "B"),
    ("The correct option is B", "B"),
    ("the answer is option B", "B"),
    ("My answer is B", "B"),
    ("Therefore, the answer is B", "B"),
    ("  \n B \n ", "B"),
    # Letter with its own option text, the text alone, the text with its letter.
    ("B. Glioma", "B"),
    ("B: Glioma", "B"),
    ("B) Glioma", "B"),
    ("B) glioma", "B"),
    ("B - Glioma", "B"),
    ("(B) Glioma", "B"),
    ("B (Glioma)", "B"),
    ("B Glioma", "B"),
    ("B.Glioma", "B"),
    ("\\boxed{B. Glioma}", "B"),
    ("**B. Glioma**", "B"),
    ("The answer is B. Glioma.", "B"),
    ("Glioma", "B"),
    ("glioma.", "B"),
    ("  GLIOMA  ", "B"),
    ("Pituitary   tumor", "D"),
    ("pituitary\ntumor", "D"),
    ("Glioma (B)", "B"),
    ("[Glioma]", "B"),
    ("The answer is a glioma", "B"),
    # Repeating the same option is one option.
    ("B. B", "B"),
    ("B, B", "B"),
    ("(B) Glioma, so B", "B"),
    ("Glioma, i.e. B", "B"),
    ("Glioma, so the answer is B", "B"),
    # Full-width and other NFKC forms.
    ("Ｂ", "B"),
    ("（Ｂ）", "B"),
    ("Ｂ．", "B"),
    (_fullwidth("The answer is B. Glioma"), "B"),
    ("Ⓑ", "B"),
    # Lowercase letters: only as the whole answer (after an optional lead-in).
    ("b", "B"),
    ("(b)", "B"),
    ("b.", "B"),
    ("[b]", "B"),
    ("\\boxed{b}", "B"),
    ("answer: b", "B"),
    ("the answer is b", "B"),
    ("based on imaging, b", None),
    ("so b", None),
    ("b. Glioma", None),
    ("b glioma", None),
    ("bb", None),
    ("e", None),
    # "A" as a letter or as an article.
    ("A", "A"),
    ("a", "A"),
    ("A.", "A"),
    ("A. Normal brain", "A"),
    ("A normal brain", "A"),
    ("A Normal brain", "A"),
    ("A glioma", "B"),
    ("A Glioma", "B"),
    ("A. Glioma", None),
    ("(A) Glioma", None),
    ("An", None),
    ("The answer is A glioma", "B"),
    # An uppercase A is the article only in a one-clause answer: elsewhere it is also the letter A.
    ("A Glioma, so B", None),
    ("A Glioma B", None),
    ("B. A glioma", None),
    # Hedges over several options.
    ("A or B", None),
    ("B or C", None),
    ("B/C", None),
    ("A/B/C/D", None),
    ("A, B, C, D", None),
    ("A B C D", None),
    ("ABCD", None),
    ("AB", None),
    ("A and B", None),
    ("(B) or (C)", None),
    ("B;C", None),
    ("B, C", None),
    ("B or maybe C", None),
    ("Both B and C", None),
    ("not C, it is B", None),
    ("The answer is B, not C", None),
    ("B. no wait, C", None),
    ("B. Meningioma", None),
    ("Glioma or meningioma", None),
    ("Glioma, Meningioma", None),
    ("Glioma/Meningioma", None),
    ("Normal brain and glioma", None),
    # Letters that are not options, touching letters, and other prose.
    ("E", None),
    ("(E)", None),
    ("The answer is E", None),
    ("B, E", None),
    ("B2", None),
    ("OptionB", None),
    ("answerB", None),
    ("[B)", None),
    ("(B", None),
    ("It is B", None),
    ("I think B", None),
    ("B is correct", None),
    ("B because the mass enhances", None),
    ("B. Glioma, grade IV", None),
    ("Gliomas", None),
    ("Glioblastoma", None),
    ("The answer is not B", None),
    ("Answer:", None),
    ("", None),
    ("   ", None),
    ("...", None),
    ("\\boxed{}", None),
    ("~~A~~ B", None),
]


@pytest.mark.parametrize(("text", "expected"), BRAIN_CASES, ids=[repr(c[0]) for c in BRAIN_CASES])
def test_extract_choice_brain(text, expected):
    assert extract_choice(text, BRAIN) == expected


HEPATITIS_CASES = [
    ("Hepatitis B", "B"),
    ("B. Hepatitis B", "B"),
    ("hepatitis b", "B"),
    ("Vitamin D deficiency", "D"),
    ("Vitamin D deficiency (D)", "D"),
    ("D. Vitamin D deficiency", "D"),
    ("A. Hepatitis A", "A"),
    ("C. Hepatitis B", None),
    ("B. Hepatitis C", None),
    ("Hepatitis", None),
    ("Hepatitis B or C", None),
    ("Hepatitis B or Hepatitis C", None),
    ("Vitamin D", None),
    ("Type B", None),
]


@pytest.mark.parametrize(
    ("text", "expected"), HEPATITIS_CASES, ids=[repr(c[0]) for c in HEPATITIS_CASES]
)
def test_extract_choice_letters_inside_option_texts(text, expected):
    assert extract_choice(text, HEPATITIS) == expected


LETTERS_ONLY_CASES = [
    ("B", "B"),
    ("(B)", "B"),
    ("The answer is B.", "B"),
    ("b", "B"),
    ("B. B", "B"),
    ("B. Glioma", None),  # the tail cannot be checked without option texts
    ("Glioma", None),
    ("E", None),
    ("A or B", None),
]


@pytest.mark.parametrize("options", [("A", "B", "C", "D"), "ABCD", ["a", "b", "c", "d"]])
@pytest.mark.parametrize(
    ("text", "expected"), LETTERS_ONLY_CASES, ids=[repr(c[0]) for c in LETTERS_ONLY_CASES]
)
def test_extract_choice_letters_only(text, expected, options):
    assert extract_choice(text, options) == expected


def test_extract_choice_other_option_sets():
    assert extract_choice("E", "ABCDE") == "E"
    assert extract_choice("E. Normal", {"A": "Abnormal", "E": "Normal"}) == "E"
    assert extract_choice("Abnormal", {"A": "Abnormal", "E": "Normal"}) == "A"
    # Two options with the same text: the text names both.
    assert extract_choice("Glioma", {"A": "Glioma", "B": "glioma."}) is None
    assert extract_choice("A", {"A": "Glioma", "B": "glioma."}) == "A"
    # One option text a prefix of another.
    assert extract_choice("Benign cyst", {"A": "Benign", "B": "Benign cyst"}) == "B"
    assert extract_choice("Benign", {"A": "Benign", "B": "Benign cyst"}) == "A"
    # Option texts are normalised like answers.
    assert extract_choice("glioma", {"A": "  **Glioma.**  ", "B": "Other"}) == "A"
    # An empty option text names nothing.
    assert extract_choice("", {"A": "", "B": "Other"}) is None


def test_option_text_equal_to_a_joiner_does_not_hide_the_letter_a():
    # Found by test_two_different_options_are_never_one: "A and" was read as the article "A" and
    # the option text "And", so the hedge "A and B" named B alone.
    options = {"A": "Chronic", "B": "And"}
    assert extract_choice("A and B", options) is None
    assert extract_choice("A and And", options) is None
    assert extract_choice("The answer is A and B", options) is None
    assert extract_choice("A or B", {"A": "Chronic", "B": "Or"}) is None
    # The article reading still holds in a one-clause answer, and B alone is still B.
    assert extract_choice("A and", options) == "B"
    assert extract_choice("B", options) == "B"
    assert extract_choice("And", options) == "B"


@pytest.mark.parametrize(
    "options", [{}, [], {"AB": "x"}, {"1": "x"}, ["A", "a"], "AAB", {"A": "x", "a": "y"}]
)
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        extract_choice("A", options)


THINK = "<think>The mass is intra-axial and enhances irregularly.</think>"

# (completion, gold, format, accuracy)
REWARD_CASES = [
    # Well formed.
    (THINK + "<answer>B</answer>", "B", 1.0, 1.0),
    (THINK + "<answer>C</answer>", "B", 1.0, 0.0),
    (THINK + "\n\n<answer>\n B. Glioma \n</answer>\n", "B", 1.0, 1.0),
    ("\n  " + THINK + "<answer>B</answer>  \n", "B", 1.0, 1.0),
    (THINK + "<answer>**B**</answer>", "B", 1.0, 1.0),
    (THINK + "<answer>$\\boxed{B}$</answer>", "B", 1.0, 1.0),
    (THINK + "<answer>Ｂ</answer>", "B", 1.0, 1.0),
    ("<think>\nx\n</think>\n<answer>b</answer>", "b", 1.0, 1.0),
    # Well formed but the answer does not commit to the gold option.
    (THINK + "<answer>ABCD</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>A/B/C/D</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>A or B</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>Glioma or meningioma</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>based on imaging, b</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>E</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>I cannot tell</answer>", "B", 1.0, 0.0),
    # Accuracy without format.
    ("<answer>B</answer>", "B", 0.0, 1.0),
    ("Glioma is likely. <answer>B</answer>", "B", 0.0, 1.0),
    (THINK + " so <answer>B</answer>", "B", 0.0, 1.0),
    (THINK + "<answer>B</answer> Hope this helps.", "B", 0.0, 1.0),
    (THINK + "<answer>B</answer><|im_end|>", "B", 0.0, 1.0),
    ("<think></think><answer>B</answer>", "B", 0.0, 1.0),
    ("<think> \n </think><answer>B</answer>", "B", 0.0, 1.0),
    ("<answer>B</answer>" + THINK, "B", 0.0, 1.0),
    ("<think>a</think><think>b</think><answer>B</answer>", "B", 0.0, 1.0),
    ("<think>a</think>" + THINK + "<answer>B</answer>", "B", 0.0, 1.0),
    ("<think>a<think>b</think><answer>B</answer>", "B", 0.0, 1.0),
    (THINK + "<think>b</think><answer>B</answer>", "B", 0.0, 1.0),
    ("<think>x</answer></think><answer>B</answer>", "B", 0.0, 0.0),
    # The letter only outside the answer block earns nothing.
    ("<think>The answer is B.</think><answer></answer>", "B", 0.0, 0.0),
    ("<think>The answer is B.</think><answer>C</answer>", "B", 1.0, 0.0),
    ("<think>B</think><answer>unsure</answer>", "B", 1.0, 0.0),
    (THINK + "<answer>C</answer> B", "B", 0.0, 0.0),
    (THINK + "<answer>C</answer>\nThe answer is B", "B", 0.0, 0.0),
    ("The answer is B", "B", 0.0, 0.0),
    ("B", "B", 0.0, 0.0),
    # Repeated, nested, stray and unterminated answer tags.
    (THINK + "<answer>A</answer><answer>B</answer>", "B", 0.0, 0.0),
    (THINK + "<answer>B</answer><answer>B</answer>", "B", 0.0, 0.0),
    (THINK + "<answer><answer>B</answer></answer>", "B", 0.0, 0.0),
    (THINK + "<answer>B<answer>C</answer>", "B", 0.0, 0.0),
    (THINK + "<answer><think>B</think>B</answer>", "B", 0.0, 0.0),
    ("<think>x <answer>B</answer></think><answer>B</answer>", "B", 0.0, 0.0),
    ("<think>I will use <answer> tags</think><answer>B</answer>", "B", 0.0, 0.0),
    (THINK + "B</answer>", "B", 0.0, 0.0),
    (THINK + "</answer>B<answer>", "B", 0.0, 0.0),
    (THINK + "<answer>B", "B", 0.0, 0.0),
    (THINK + "<answer>B</answer", "B", 0.0, 0.0),
    ("<think>The lesion enhances, so the answer is B", "B", 0.0, 0.0),
    ("", "B", 0.0, 0.0),
    (THINK + "<answer> </answer>", "B", 0.0, 0.0),
    # Tags are exact and case-sensitive.
    ("<Think>x</Think><Answer>B</Answer>", "B", 0.0, 0.0),
    (THINK + "<Answer>B</Answer>", "B", 0.0, 0.0),
    ("<THINK>x</THINK><answer>B</answer>", "B", 0.0, 1.0),
    (THINK + "< answer >B</ answer >", "B", 0.0, 0.0),
    (THINK + "<answer >B</answer>", "B", 0.0, 0.0),
    (THINK + "＜answer＞B＜/answer＞", "B", 0.0, 0.0),
]


@pytest.mark.parametrize(
    ("completion", "gold", "fmt", "accuracy"), REWARD_CASES, ids=[repr(c[0]) for c in REWARD_CASES]
)
def test_mcq_reward(completion, gold, fmt, accuracy):
    expected = RewardBreakdown(format=fmt, accuracy=accuracy, total=accuracy + 0.5 * fmt)
    assert mcq_reward(completion, gold, BRAIN) == expected


@pytest.mark.parametrize(
    ("format_weight", "total"), [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0), (0.25, 1.25)]
)
def test_mcq_reward_format_weight(format_weight, total):
    got = mcq_reward(THINK + "<answer>B</answer>", "B", BRAIN, format_weight=format_weight)
    assert got == RewardBreakdown(format=1.0, accuracy=1.0, total=total)


def test_mcq_reward_letters_only():
    assert mcq_reward(THINK + "<answer>B</answer>", "B", "ABCD").total == 1.5
    assert mcq_reward(THINK + "<answer>B. Glioma</answer>", "B", "ABCD").total == 0.5


@pytest.mark.parametrize("gold", ["E", "", "AB", "1"])
def test_mcq_reward_rejects_gold_outside_options(gold):
    with pytest.raises(ValueError):
        mcq_reward(THINK + "<answer>B</answer>", gold, BRAIN)


def test_as_dict():
    got = mcq_reward(THINK + "<answer>B</answer>", "B", BRAIN).as_dict()
    assert got == {"format": 1.0, "accuracy": 1.0, "total": 1.5}


N = 200_000
# A long option text raises the length bound, so the clause search runs on the longer inputs.
LONG_TEXTS = {"A": "x " * 500, "B": "Glioma", "C": "Meningioma", "D": "Pituitary tumor"}


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("(" * N, BRAIN, None),
        ("B " * (N // 2), BRAIN, None),
        ("B" + " " * N + "B", BRAIN, "B"),
        ("." * N + "B", BRAIN, None),
        ("B" + "." * N, BRAIN, "B"),
        ("A" * N, BRAIN, None),
        ("A or " * (N // 5) + "B", BRAIN, None),
        ("answer " * (N // 7), BRAIN, None),
        ("\\boxed{" * (N // 7) + "B" + "}" * (N // 7), BRAIN, None),
        ("$" * N + "B", BRAIN, "B"),
        ("\\(" * (N // 2), BRAIN, None),
        ("B, " * 700, LONG_TEXTS, "B"),
        ("Glioma " * 300, LONG_TEXTS, "B"),
        ("the " * 500 + "Glioma", LONG_TEXTS, None),
        ("(B) " * 500 + "C", LONG_TEXTS, None),
    ],
    ids=lambda v: repr(v[:12]) if isinstance(v, str) else None,
)
def test_long_adversarial_answers(text, options, expected):
    assert extract_choice(text, options) == expected


@pytest.mark.parametrize(
    ("completion", "fmt", "accuracy"),
    [
        ("<think>" + "x" * N + "</think><answer>B</answer>", 1.0, 1.0),
        ("<answer>" * (N // 8), 0.0, 0.0),
        (THINK + "<answer>B</answer>" + "</answer>" * (N // 9), 0.0, 0.0),
        (" " * N + THINK + "<answer>B</answer>" + "\n" * N, 1.0, 1.0),
        (THINK + "<answer>" + "B or " * (N // 5) + "</answer>", 1.0, 0.0),
        ("<think>" * (N // 7), 0.0, 0.0),
    ],
    ids=["long-think", "many-openers", "many-closers", "whitespace", "long-hedge", "many-thinks"],
)
def test_long_adversarial_completions(completion, fmt, accuracy):
    expected = RewardBreakdown(format=fmt, accuracy=accuracy, total=accuracy + 0.5 * fmt)
    assert mcq_reward(completion, "B", BRAIN) == expected


# Every accepted dress of a letter L whose option text is T.
DRESSES = [
    "{L}",
    "({L})",
    "{L}.",
    "{L})",
    "[{L}]",
    "**{L}**",
    "\\boxed{{{L}}}",
    "$\\boxed{{{L}}}$",
    "Option {L}",
    "option ({L})",
    "Answer: {L}",
    "The answer is {L}.",
    "The correct answer is ({L})",
    "{L}. {T}",
    "{L}: {T}",
    "{L}) {T}",
    "({L}) {T}",
    "{T}",
    "{T} ({L})",
    "The answer is {L}. {T}.",
]

# Option words: 24 or more, as 8 options of up to 3 words never share one.
FINDINGS = ["glioma", "meningioma", "abscess", "infarct", "edema", "fracture", "effusion", "cyst"]
QUALIFIERS = ["normal", "benign", "malignant", "acute", "chronic", "left", "right", "high"]
# Words the grammar also reads: lead-ins, connectives, articles, hedges.
GRAMMAR_WORDS = ["the", "an", "option", "choice", "answer", "so", "thus", "or", "and", "not"]
VOCAB = FINDINGS + QUALIFIERS + GRAMMAR_WORDS


@st.composite
def option_sets(draw):
    """2-8 options whose texts are 1-3 words of VOCAB, no word shared between two options."""
    count = draw(st.integers(2, 8))
    sizes = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    # A seeded shuffle: st.permutations draws one integer per word and dominates the test time.
    words = random.Random(draw(st.integers(0, 2**32))).sample(VOCAB, sum(sizes))
    texts, i = [], 0
    for size in sizes:
        texts.append(" ".join(words[i : i + size]).capitalize())
        i += size
    return dict(zip("ABCDEFGH", texts, strict=False))


@settings(max_examples=100, deadline=None)
@given(
    options=option_sets(),
    data=st.data(),
    dress=st.sampled_from(DRESSES),
    fullwidth=st.booleans(),
    pad=st.sampled_from(["", " ", "\n", " \n\t "]),
)
def test_every_dress_of_every_letter_is_that_letter(options, data, dress, fullwidth, pad):
    letter = data.draw(st.sampled_from(sorted(options)))
    text = dress.format(L=letter, T=options[letter])
    text = pad + (_fullwidth(text) if fullwidth else text) + pad
    assert extract_choice(text, options) == letter


LETTER_DRESSES = [d for d in DRESSES if "{T}" not in d]
JOINERS = [" or ", ", ", "/", " and ", "; ", " vs ", " & ", "", ". ", " - ", " or maybe "]


@settings(max_examples=100, deadline=None)
@given(options=option_sets(), data=st.data(), joiner=st.sampled_from(JOINERS))
def test_two_different_options_are_never_one(options, data, joiner):
    first, second = data.draw(
        st.lists(st.sampled_from(sorted(options)), min_size=2, max_size=2, unique=True)
    )
    dress_first = data.draw(st.sampled_from(DRESSES))
    dress_second = data.draw(st.sampled_from(DRESSES))
    # An option whose whole text is a word of the grammar, dressed bare, reads as that word:
    # "So, Option (D)" and "Thus, Malignant (D)" (options "So", "Thus") do say D.
    assume(not (dress_first == "{T}" and options[first].lower() in GRAMMAR_WORDS))
    text = (
        dress_first.format(L=first, T=options[first])
        + joiner
        + dress_second.format(L=second, T=options[second])
    )
    assert extract_choice(text, options) is None


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60), gold=st.sampled_from("ABCD"))
def test_any_text_gives_a_valid_letter_or_none_and_binary_rewards(text, gold):
    assert extract_choice(text, BRAIN) in {None, "A", "B", "C", "D"}
    got = mcq_reward(text, gold, BRAIN)
    assert got.format in {0.0, 1.0}
    assert got.accuracy in {0.0, 1.0}
    assert got.total == got.accuracy + 0.5 * got.format


def test_import_is_pure():
    code = (
        "import sys, gmai_rl.reward; "
        "print(sorted({'torch', 'ray', 'vllm', 'deepspeed', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
