"""Silent wrongs of the analysis side, each decided before the long pass: counts the data cannot give,
analyses the data or the batches cannot serve, a control of another architecture, splits that drop a
class or hold back replacements, and verdicts resting on missing evidence."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.results import make_results, write_results_dir
from vitscope.analyses import ALL_ANALYSES
from vitscope.analyses.preflight import ModelShape, check_control, plan_run, split_notes
from vitscope.cli import error_sentence
from vitscope.data import split_choices
from vitscope.report import evaluate_claims
from vitscope.report.claims import HOLDS, NOT_MEASURED
from vitscope.results import RunDirectory

THREE_CLASSES = np.repeat(np.arange(3), 10)  # 30 images of a folder, 10 per class


def plan(labels=THREE_CLASSES, *, named=None, wanted=None, same_source=True, size=None, **counts):
    asked = dict(num_test=512, num_train=2000, num_noise=256, batch_size=64) | counts
    n = len(labels) if labels is not None else size
    return plan_run(set(wanted or ALL_ANALYSES), named, data="folder:x", test_labels=labels, test_size=n,
                    train_size=n, same_source=same_source, **asked)  # fmt: skip


# ------------------------------------------------------------------------------------------- counts
def test_a_folder_smaller_than_the_default_counts_splits_what_it_holds_with_a_note():
    p = plan()
    assert (p.num_test, p.num_train, p.num_noise) == (15, 15, 15)
    assert p.notes[0] == (
        "the data holds 30 images, fewer than the 512 test + 2000 probe images asked (--num-images, --probe-images): "
        "using 15 for the metrics and 15 for the probes"
    )
    assert "noise robustness on all 15 test images, fewer than the 256 asked (--noise-images)" in p.notes


def test_counts_the_data_holds_are_kept_without_a_note():
    p = plan(num_test=12, num_train=10, num_noise=6)
    assert (p.num_test, p.num_train, p.num_noise, p.notes) == (12, 10, 6, ())


def test_without_a_probe_no_train_images_are_drawn():
    p = plan(wanted={"nmi"}, named=["nmi"], num_test=12)
    assert (p.num_test, p.num_train, p.num_noise, p.notes) == (12, 0, 0, ())


def test_separate_splits_shrink_each_to_its_own_size():
    p = plan_run(set(ALL_ANALYSES), None, data="fashion-mnist", num_test=512, num_train=5000, num_noise=256,
                 batch_size=64, test_labels=np.arange(1000) % 10, test_size=1000, train_size=2000,
                 same_source=False)  # fmt: skip
    assert (p.num_test, p.num_train, p.num_noise) == (512, 2000, 256)
    assert p.notes == (
        "the data holds 2000 train images, fewer than the 5000 probe images asked (--probe-images): using 2000",
    )


# ------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(("labels", "what"), [(np.full(30, -1), "no class labels"), (np.zeros(30, int), "a single")])
def test_analyses_that_need_labels_are_skipped_with_a_note_on_unlabelled_data(labels, what):
    p = plan(labels)
    assert not {"linear_probe", "noise", "tsne"} & p.wanted and "nmi" in p.wanted
    assert p.notes[0].startswith("linear_probe, noise, tsne skipped: need images of at least two classes")
    assert what in p.notes[0] and p.num_train == 0


def test_an_analysis_named_on_unlabelled_data_is_refused():
    with pytest.raises(ValueError, match=r"^linear_probe cannot run: needs images of at least two classes and "
                                         r"folder:x has no class labels \(a flat folder"):  # fmt: skip
        plan(np.full(30, -1), wanted={"nmi", "linear_probe"}, named=["nmi", "linear_probe"])


def test_noise_brings_the_probe_it_scores():
    p = plan(wanted={"noise"}, named=["noise"], num_test=10, num_train=10, num_noise=4)
    assert p.wanted == {"noise", "linear_probe"} and p.num_train == 10 and p.num_noise == 4
    assert p.notes == ("linear_probe added: noise robustness scores the last layer's linear probe",)


# ------------------------------------------------------------------------------------------- batches
def test_cka_and_localisation_are_skipped_with_a_note_on_batches_under_four():
    p = plan(batch_size=2, num_test=12, num_train=10)
    assert not {"cka", "localisation"} & p.wanted
    assert "cka, localisation skipped: need batches of at least 4 images for the unbiased HSIC of minibatch CKA " \
           "(--batch-size 2)" in p.notes  # fmt: skip


def test_cka_named_with_batches_under_four_is_refused():
    with pytest.raises(ValueError, match=r"^cka cannot run: needs batches of at least 4 images .*\(3 test images\)"):
        plan(wanted={"cka"}, named=["cka"], num_test=3)


# ------------------------------------------------------------------------------------------- control
def test_a_control_of_another_architecture_is_refused_naming_both_shapes():
    cl = ModelShape("moco", "vit", 6, 4, (4, 4), (7, 7))
    shapes = {"moco": cl, "random": ModelShape("random", "vit", 12, 12, (14, 14), (16, 16))}
    with pytest.raises(ValueError) as err:
        check_control(shapes, {"cl": "moco", "control": "random"})
    assert str(err.value) == (
        "the control 'random' (vit, 12 blocks, 12 heads, 14×14 tokens of 16×16 px) is not the architecture of the CL "
        "model 'moco' (vit, 6 blocks, 4 heads, 4×4 tokens of 7×7 px): the control must be an untrained copy of the "
        "CL model's architecture"
    )
    check_control({"moco": cl, "random": ModelShape("random", "vit", 6, 4, (4, 4), (7, 7))},
                  {"cl": "moco", "control": "random"})  # fmt: skip


# ------------------------------------------------------------------------------------------- splits
def test_a_class_of_one_image_is_kept_for_the_probes_training_with_a_note():
    labels = np.array([0] * 10 + [1] * 10 + [2])  # class 2 holds one image, index 20
    test, train = split_choices(labels, 21, labels, 21, same_source=True, num_test=9, num_train=12, seed=0)
    assert 20 in train.indices and 20 not in test.indices
    assert not set(test.indices) & set(train.indices)
    assert split_notes(labels, test.indices, train.indices, ["cat", "dog", "solo"]) == [
        "class 'solo' has 1 image(s): kept for the probe's training, not in the test images"
    ]


def test_a_class_the_test_would_take_whole_keeps_one_image_for_training():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
    test, train = split_choices(labels, 23, labels, 23, same_source=True, num_test=12, num_train=10, seed=0)
    assert (labels[test.indices] == 2).sum() == 2 and (labels[train.indices] == 2).sum() == 1


def test_without_a_probe_every_unchosen_image_may_replace_a_chosen_one():
    labels = np.repeat(np.arange(2), 12)
    test, train = split_choices(labels, 24, labels, 24, same_source=True, num_test=12, num_train=0, seed=0)
    assert len(train) == 0
    unchosen = sorted(set(range(24)) - set(test.indices.tolist()))
    assert sorted(test.reserve().tolist()) == unchosen
    for index in test.indices:
        assert sorted(test.candidates(int(index))) == [i for i in unchosen if labels[i] == labels[index]]


# ------------------------------------------------------------------------------------------- claims
def test_claims_without_metrics_json_never_hold_on_missing_evidence(tmp_path):
    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim")), arrays={})
    with_meta = evaluate_claims(RunDirectory(out).load_results(), "cl", "mim")
    assert with_meta[1].status == HOLDS
    (out / "metrics.json").unlink()  # metrics.csv alone: no grid, so no log N to tell collapse from uniform
    verdict = evaluate_claims(RunDirectory(out).load_results(), "cl", "mim")[1]
    assert verdict.status == NOT_MEASURED
    assert verdict.evidence.startswith("cannot be decided: part of its evidence is not measured.")
    assert "cannot tell collapse from near-uniform attention" in verdict.evidence


# ------------------------------------------------------------------------------------------- CLI errors
def test_error_sentences_for_bare_keys_and_system_errors(tmp_path):
    assert error_sentence(KeyError("config")) == (
        "missing key 'config' in the data read (an incomplete file, or not the kind of file expected)"
    )
    assert error_sentence(KeyError("--cl 'x' is not a model")) == "--cl 'x' is not a model"
    with pytest.raises(OSError) as err:
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir").read_text()
    assert error_sentence(err.value) == f"{tmp_path / 'dir'}: Is a directory"
    assert error_sentence(ValueError("two\nlines")) == "two lines"
