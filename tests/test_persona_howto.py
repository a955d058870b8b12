"""docs/personas.md: its worked example (the style short_sentences) works for every kind of user and judge
the page promises, and the code the page quotes is the code in the repository."""
import re
from pathlib import Path

import eval_online_sdpo
from auxiliary.feedback.personas import get_persona
from auxiliary.feedback.style_judge import RuleBasedJudge, build_judge_messages
from auxiliary.feedback.user_simulator import COMPLAINTS, RuleBasedUserSimulator, build_simulator_messages

REPO = Path(__file__).resolve().parent.parent
PAGE = (REPO / "docs" / "personas.md").read_text()
LONG = ("When you make the sauce you should first soften the garlic in warm olive oil and then add the tomatoes "
        "slowly while stirring.")
SHORT = "Soften the garlic in warm oil. Add the tomatoes. Stir slowly."
PROMPT = "How do I make a tomato sauce?"


def test_the_page_quotes_the_repositorys_code():
    sources = {name: (REPO / name).read_text() for name in (
        "auxiliary/feedback/personas.py", "auxiliary/feedback/style_checks.py", "auxiliary/feedback/user_simulator.py")}
    blocks = re.findall(r"```python\n(.*?)```", PAGE, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert any(line.strip() in text for text in sources.values()), line


def test_the_rule_user_complains_about_long_sentences_and_approves_short_ones():
    user = RuleBasedUserSimulator("short_sentences", seed=0)
    assert user.problems(LONG) == ["long_sentences"] and user.problems(SHORT) == []
    complaint, approval = user.generate_feedback([PROMPT, PROMPT], [LONG, SHORT])
    assert complaint in COMPLAINTS["long_sentences"] and approval not in COMPLAINTS["long_sentences"]


def test_the_rule_judge_prefers_short_sentences_in_both_orders():
    judge = RuleBasedJudge("short_sentences")
    assert judge.compare([PROMPT, PROMPT, PROMPT], [SHORT, LONG, SHORT], [LONG, SHORT, SHORT]) == ["A", "B", "C"]


def test_model_based_users_and_judges_get_the_description():
    persona = get_persona("short_sentences")
    assert "twenty words at most" in persona
    assert persona in build_simulator_messages("short_sentences", PROMPT, LONG)[0]["content"]
    assert persona in build_judge_messages("short_sentences", PROMPT, LONG, SHORT)[0]["content"]
    assert persona in build_judge_messages("short_sentences", PROMPT, LONG, SHORT, framing="neutral")[1]["content"]


def test_the_pages_command_runs(tmp_path, capsys):
    (block,) = re.findall(r"```bash\n(.*?)```", PAGE, flags=re.S)
    argv = block.replace("\\\n", " ").split()
    assert argv[:2] == [".venv/bin/python", "eval_online_sdpo.py"]
    argv = argv[2:]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "run")
    assert eval_online_sdpo.main(argv) == 0
    assert "short_sentences" in capsys.readouterr().out and (tmp_path / "run" / "summary.json").exists()
