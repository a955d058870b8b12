"""The online run's printed report: the example chosen by its stated rule."""
from auxiliary.evals.online_report import EXAMPLE_RULE, example_index, example_text


def test_the_example_is_the_prompt_with_the_median_length_change():
    baseline = ["one two three four", "a b c d e f", "x y", "p q r s t"]
    # changes in words (feedback - baseline): -3, -5, +1, 0 -> sorted -5 (1), -3 (0), 0 (3), +1 (2); lower middle:
    # prompt 0
    feedback = ["one", "a", "x y z", "p q r s t"]
    assert example_index(baseline, feedback) == 0
    assert example_index(baseline[:3], feedback[:3]) == 0  # -5, -3, +1: the median is -3, prompt 0
    assert example_index(["a b", "a b", "a b"], ["a", "a b c", "a b"]) == 2  # -1, +1, 0: the median 0 is prompt 2
    assert example_index([], []) == 0
    text = example_text([f"question {i}" for i in range(3)], ["a b", "a b", "a b"],
                        {"feedback": ["a", "a b c", "a b"]}, ["feedback"])
    assert text.splitlines()[0].startswith("example eval prompt #2 (" + EXAMPLE_RULE + "): question 2")
