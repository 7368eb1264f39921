"""fastroberta.tasks.inference: the task a user's training labels describe, as fastroberta-finetune infers it."""
import pytest

from fastroberta.training.errors import ConfigError
from fastroberta.tasks.inference import infer_task


@pytest.mark.parametrize("labels", [
    ["positive", "negative", "positive"],        # names (CSV text)
    ["0", "1", "1", "0"],                        # integers as CSV text
    [0, 1, 2, 1],                                # JSON integers
    [0.0, 1.0, 2.0],                             # JSON numbers written with a fraction part that is zero
    [" 1", "2 ", "-3"],                          # integer text with stray spaces, negative ids
    [True, False, True],                         # JSON booleans are two classes
    ["entailment", None, "neutral"],             # a missing label says nothing
    ["yes", "no", "1"],                          # names and integers: still class names
    ["nan", "inf", "x"],                         # non-finite numbers are names, not scores
])
def test_classification(labels):
    assert infer_task(labels) == "classification"


@pytest.mark.parametrize("labels", [
    ["0.5", "3.25", "4"],                        # CSV scores: one integer among fractions
    [0.5, 1, 4.8],                               # JSON numbers
    ["1e-3", "2"],                               # scientific notation
    [None, 2.5],
])
def test_regression(labels):
    assert infer_task(labels) == "regression"


def test_names_with_fractions_ask_for_task():
    with pytest.raises(ConfigError) as e:
        infer_task(["good", "0.5", "bad"], field="score", source="--train my.csv")
    message = str(e.value)
    assert "\n" not in message and "--train my.csv" in message and "'score'" in message
    assert "'good'" in message and "'0.5'" in message and "--task classification or --task regression" in message


@pytest.mark.parametrize("labels", [[], [None, None]])
def test_no_labels_ask_for_task(labels):
    with pytest.raises(ConfigError, match="cannot be inferred; pass --task"):
        infer_task(labels)


def test_is_a_value_error():
    """The CLI turns ValueErrors (ConfigError among them) into one line without a traceback."""
    assert issubclass(ConfigError, ValueError)
