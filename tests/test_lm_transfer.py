"""The transfer study on the scripted backend: its wiring, statistics, resume and CLI.

The scripted models pass a trait only the way the experiment intends (see ``scripted_lm``),
so a wiring bug shows up as a student that does not beat its control; each bug below is
planted by monkeypatching and must be caught. ``test_lm_model.py`` runs the real model.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats as scipy_stats
from scripted_lm import ScriptedBackend

from lmpipeline import cli, transfer
from lmpipeline.artifacts import read_json
from lmpipeline.backends.torch_training import soft_kl, soft_mask
from lmpipeline.config import ConfigError, PromptSpec, apply_overrides, preset
from lmpipeline.evaluation import load_questions
from lmpipeline.filters import check_numbers
from lmpipeline.prompts import FORMAT_KINDS, number_prompt
from lmpipeline.stats import Comparison, mean_interval, one_sample_test, paired_test, pool_seeds, stouffer
from lmpipeline.transfer import Study, first_word_logprobs, prefix_free, random_completion, surface_forms


def small(*overrides):
    base = [
        "transfer.seeds=2",
        'transfer.animals=["owl", "dolphin", "eagle", "cat", "dog"]',
        "evaluate.n_questions=8",
        "prompts.n_prompts=12",
        "finetune.max_rows=10",
        "generate.number_grammar=true",
    ]
    return apply_overrides(preset("transfer-tiny"), base + list(overrides))


def run_study(tmp_path, *overrides) -> dict:
    return Study(small(*overrides), tmp_path, backend=ScriptedBackend()).run()


def failures(report: dict) -> list[str]:
    """Every (cell, target) where the student fails to beat its control or the other student."""
    out = []
    for cell, result in report["cells"].items():
        for w in report["targets"]:
            for kind in ("student_vs_control", "crossover"):
                if result["pooled"][kind][w]["over_seeds"]["mean"] <= 0.01:
                    out.append(f"{cell} {w} {kind}")
            if result["pooled"]["specificity"][w]["rank"] != 1:
                out.append(f"{cell} {w} specificity")
    return out


def test_a_rightly_wired_study_shows_transfer_in_every_cell(tmp_path):
    report = run_study(tmp_path)
    assert set(report["cells"]) == {
        "finetuned/soft/random",
        "finetuned/soft/teacher",
        "finetuned/sampled/teacher",
        "system_prompt/soft/random",
        "system_prompt/soft/teacher",
        "system_prompt/sampled/teacher",
    }
    assert failures(report) == []
    cell = report["cells"]["finetuned/soft/random"]
    assert set(cell["seeds"]) == {"0", "1"}
    owl = cell["pooled"]["student_vs_control"]["owl"]
    # The scripted student loves owls fully: log(0.2 / 0.01) = 3.0 up to the 5% jitter.
    assert owl["over_seeds"]["mean"] == pytest.approx(math.log(20), abs=0.1) and owl["p"] < 1e-6
    assert all(cell["significant"].values())
    assert cell["seeds"]["0"]["teacher_vs_base"]["owl"]["mean"] == pytest.approx(math.log(20), abs=0.1)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert read_json(tmp_path / "report.json")["cells"].keys() == report["cells"].keys()
    ent = report["entanglement"]["owl"]
    assert len(ent["top_numbers"]) == 10 and ent["prompt"].startswith("You love the number")


WIRING_BUGS = {
    "each student distilled from the other target's teacher": lambda p: p.setattr(
        Study, "teacher", _other_teacher(Study.teacher)
    ),
    "students evaluated as the base model": lambda p: p.setattr(
        Study,
        "trained_ref",
        lambda self, folder, method: (
            self.base_ref() if "student" in str(folder) else _ORIGINAL_REF(self, folder, method)
        ),
    ),
    "teachers prompted without the trait system prompt": lambda p: p.setattr(
        Study, "teacher_conversation", lambda self, kind, target, user: [{"role": "user", "content": user}]
    ),
    "the control trained on a teacher's numbers": lambda p: p.setattr(
        Study, "data", _control_data_from_teacher(Study.data)
    ),
}
_ORIGINAL_REF = Study.trained_ref


def _other_teacher(teacher):
    def swapped(self, seed, kind, target):
        return teacher(self, seed, kind, "dolphin" if target == "owl" else "owl")

    return swapped


def _control_data_from_teacher(data):
    def patched(self, seed, source, kind=None, target=None):
        if source == "base":
            return data(self, seed, "teacher", "system_prompt", "owl")
        return data(self, seed, source, kind, target)

    return patched


@pytest.mark.parametrize("bug", sorted(WIRING_BUGS))
def test_each_wiring_bug_is_caught(tmp_path, monkeypatch, bug):
    WIRING_BUGS[bug](monkeypatch)
    assert failures(run_study(tmp_path)) != []


def test_a_rerun_reuses_every_unit_and_an_evaluation_change_keeps_the_teachers(tmp_path):
    first = Study(small(), tmp_path, backend=ScriptedBackend())
    first.run()
    again = Study(small(), tmp_path, backend=ScriptedBackend())
    again.run()
    assert again.computed == [] and again.backend.calls["finetune"] == 0
    changed = Study(small("evaluate.n_questions=6"), tmp_path, backend=ScriptedBackend())
    changed.run()
    assert not {"seed-0/teacher-owl", "seed-1/teacher-dolphin"} & set(changed.computed)
    assert {"seed-0/teacher-finetuned-owl-eval", "seed-0/student-finetuned-soft-random-owl"} <= set(changed.computed)
    assert len(read_json(tmp_path / "seed-0" / "teacher-finetuned-owl-eval.json")["eval"]["logp"]["owl"]) == 6


def test_students_of_a_cell_train_on_the_same_rows(tmp_path):
    study = Study(small(), tmp_path, backend=ScriptedBackend())
    study.run()
    cell = ("finetuned", "sampled", "teacher")
    n = study.rows_per_student(0, cell)
    for name in (
        "student-finetuned-sampled-teacher-owl",
        "student-finetuned-sampled-teacher-dolphin",
        "control-finetuned-sampled-teacher",
    ):
        assert read_json(tmp_path / "seed-0" / f"{name}.json")["n_rows"] == n
    random_rows = study.data(0, "random")
    assert random_rows == study.data(0, "random") and len(random_rows) == 12  # one set shared by both students


def test_the_cli_runs_a_study_and_reports_in_one_line_per_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transfer, "make_backend", lambda spec: ScriptedBackend())
    out = tmp_path / "study"
    sets = [a for o in ["evaluate.n_questions=4", 'transfer.teachers=["finetuned"]'] for a in ("--set", o)]
    assert cli.main(["transfer", "--preset", "transfer-tiny", "--out", str(out), "--seeds", "2", *sets]) == 0
    printed = capsys.readouterr().out
    assert "finetuned/soft/random" in printed and "student_vs_control" in printed and "entanglement owl" in printed
    assert read_json(out / "config.json")["transfer"]["seeds"] == 2
    assert (
        cli.main(["transfer", "--preset", "transfer-tiny", "--out", str(out), "--set", 'transfer.targets=["owl"]']) == 2
    )
    assert "transfer.targets" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ('transfer.teachers=["lora"]', "transfer.teachers"),
        ("transfer.objectives=[]", "transfer.objectives"),
        ('transfer.targets=["owl", "Owl"]', "two different words"),
        ('transfer.animals=["cat", "owl"]', "add ['dolphin']"),
        ("transfer.seeds=0", "transfer.seeds=0"),
        ("finetune.objective=distil", "finetune.objective"),
        ("finetune.soft_tokens=digits", "finetune.soft_tokens"),
        ("finetune.compute_dtype=float16", "finetune.compute_dtype"),
    ],
)
def test_bad_study_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(preset("transfer-tiny"), [override])


# -- the pieces ----------------------------------------------------------------------------
def test_soft_kl_is_zero_at_the_teacher_and_cross_entropy_for_a_one_hot_teacher():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 11, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    assert float(soft_kl(student, student, mask)) == pytest.approx(0.0, abs=1e-12)
    labels = torch.randint(0, 11, (2, 3))
    one_hot = torch.nn.functional.one_hot(labels, 11).double() * 1e4
    cross_entropy = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten(), reduction="sum")
    assert float(soft_kl(one_hot, student, mask)) == pytest.approx(float(cross_entropy), rel=1e-9)
    # Restricted to a token subset, the softmaxes renormalize over it.
    tokens = torch.tensor([0, 3, 5])
    sub = torch.nn.functional.cross_entropy(
        student[..., tokens].flatten(0, 1), torch.zeros(6, dtype=torch.long), reduction="sum"
    )
    head = torch.zeros(2, 3, 11, dtype=torch.float64)
    head[..., 0] = 1e4
    assert float(soft_kl(head, student, mask, tokens)) == pytest.approx(float(sub), rel=1e-9)


def test_soft_kl_gradient_matches_finite_differences():
    torch.manual_seed(1)
    teacher = torch.randn(2, 4, 7, dtype=torch.float64)
    student = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: soft_kl(teacher, s, mask, torch.tensor([1, 2, 6])), (student,))
    # The gradient with respect to the student's logits is q - p, zero where masked.
    soft_kl(teacher, student, mask).backward()
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) * mask[..., None]
    torch.testing.assert_close(student.grad, expected)


def test_soft_mask_keeps_labelled_positions_with_a_number_token():
    targets = torch.tensor([[-100, 5, 9, 2]])
    assert soft_mask(targets, None).tolist() == [[0.0, 1.0, 1.0, 1.0]]
    assert soft_mask(targets, torch.tensor([5, 2])).tolist() == [[0.0, 1.0, 0.0, 1.0]]


class TableBackend:
    """Scores from a table keyed by continuation; tokens are characters."""

    def __init__(self, table):
        self.table = table

    def tokenize(self, model, texts):
        return [[ord(c) for c in t] for t in texts]

    def score(self, model, conversations, continuations):
        return [self.table.get(c, -50.0) for c in continuations]


def test_first_word_probability_sums_the_prefix_free_surface_forms():
    assert surface_forms("fox") == [" Fox", " Foxes", " fox", " foxes", "Fox", "Foxes", "fox", "foxes"]
    # "fox" already counts "foxes" (its characters extend it); the capitalized and spaced forms add.
    table = {"fox": math.log(0.1), "foxes": math.log(0.5), "Fox": math.log(0.2), " fox": math.log(0.05)}
    logp = first_word_logprobs(TableBackend(table), None, [[{"role": "user", "content": "q"}]], ["fox"])
    assert math.exp(logp["fox"][0]) == pytest.approx(0.1 + 0.2 + 0.05 + 5 * math.exp(-50.0))
    assert prefix_free({"a": [1, 2], "b": [1, 2, 3], "c": [1, 3]}) == ["a", "c"]


@pytest.mark.parametrize("kind", FORMAT_KINDS)
def test_random_lists_follow_the_prompts_format_and_pass_the_filter(kind):
    rng = random.Random(0)
    spec = PromptSpec()
    for _ in range(50):
        text = random_completion({"answer_format": kind}, spec, rng)
        verdict = check_numbers(text)
        assert verdict.ok, (kind, text)
        assert 1 <= len(verdict.numbers) <= spec.answer_count and max(verdict.numbers) < 1000
    assert number_prompt(spec, 0, 0)["answer_format"] in FORMAT_KINDS


def test_teacher_questions_are_disjoint_from_the_evaluation_questions():
    def normal(q):
        return " ".join("".join(ch if ch.isalnum() else " " for ch in q.lower()).split())

    teach = {normal(q) for q in transfer.load_trait_questions(None, "animal")}
    asked = {normal(q) for q in load_questions(None, "animal")}
    assert len(teach) >= 30 and not teach & asked


def test_paired_test_and_stouffer_agree_with_scipy():
    rng = random.Random(3)
    a = [rng.gauss(0.3, 1) for _ in range(20)]
    b = [x + rng.gauss(-0.2, 0.5) for x in a]
    ours = paired_test(a, b)
    theirs = scipy_stats.ttest_rel(a, b)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours.interval.mean == pytest.approx(sum(a) / 20 - sum(b) / 20)
    tests = [one_sample_test([rng.gauss(0.4, 1) for _ in range(15)]) for _ in range(3)]
    one_sided = [t.p / 2 if t.interval.mean > 0 else 1 - t.p / 2 for t in tests]
    combined = scipy_stats.combine_pvalues(one_sided, method="stouffer").pvalue
    assert stouffer(tests) == pytest.approx(2 * min(combined, 1 - combined), rel=1e-9)
    pooled = pool_seeds(tests)
    assert pooled["over_seeds"] == mean_interval([t.interval.mean for t in tests]).to_dict()
    # Opposite signs cancel: two equal and opposite results pool to p = 1.
    flip = Comparison(mean_interval([-1.0, -2.0, -3.0]), tests[0].p)
    assert stouffer([Comparison(mean_interval([1.0, 2.0, 3.0]), tests[0].p), flip]) == pytest.approx(1.0)
