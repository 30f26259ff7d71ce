"""The system prompt a checkpoint was trained with: recorded beside its weights by the run, and
what `gmai-rl eval` and `synth` ask it with unless told otherwise."""

import pytest

from gmai_rl.data import DEFAULT_SYSTEM_PROMPT
from gmai_rl.data.trained_prompt import PROMPT_FILE, record_system_prompt, system_prompt_for


@pytest.mark.parametrize("recorded", [None, "Answer with a letter."])
def test_a_recorded_prompt_is_the_one_asked_with(recorded, tmp_path):
    record_system_prompt(tmp_path, recorded)
    prompt, whose = system_prompt_for(tmp_path)
    assert prompt == recorded and str(tmp_path / PROMPT_FILE) in whose


def test_flags_win_over_the_record_and_the_default_is_the_projects(tmp_path):
    assert system_prompt_for(tmp_path) == (DEFAULT_SYSTEM_PROMPT, "the project's default")
    assert system_prompt_for("Qwen/Qwen2.5-VL-7B-Instruct")[0] == DEFAULT_SYSTEM_PROMPT
    record_system_prompt(tmp_path, None)
    assert system_prompt_for(tmp_path, "Be brief.")[0] == "Be brief."
    assert system_prompt_for(tmp_path, "Be brief.", no_system_prompt=True)[0] is None


@pytest.mark.parametrize("text", ["{not json", '{"prompt": "x"}', '{"system_prompt": 3}', "[]"])
def test_a_broken_record_is_named(text, tmp_path):
    (tmp_path / PROMPT_FILE).write_text(text)
    with pytest.raises(ValueError, match=PROMPT_FILE):
        system_prompt_for(tmp_path)
