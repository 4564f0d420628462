"""English vocabulary (config/labels/en.yaml), on MIMIC-CXR / OpenI style findings and impressions.

Each case gives a report and the keys it must set; every key not named must be 0. NA stands for
missing (uncertain, with the default policy).
"""

from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrflow.errors import CxrflowError
from cxrflow.labels import find_mentions, label_texts, load_keys, load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
KEYS = load_keys(ROOT / "config/labels/keys.yaml")
VOCAB = load_vocabulary(ROOT / "config/labels/en.yaml", KEYS)
NA = pd.NA

CASES = [
    # The nine targets, in the phrasings reports use.
    ("Cardiomegaly.", {"enlarged_heart": 1}),
    ("Mild cardiomegaly.", {"enlarged_heart": 1}),
    ("CARDIOMEGALY.", {"enlarged_heart": 1}),
    ("The heart is enlarged.", {"enlarged_heart": 1}),
    ("The heart is mildly enlarged.", {"enlarged_heart": 1}),
    ("Heart size is moderately enlarged.", {"enlarged_heart": 1}),
    ("The cardiac silhouette is enlarged.", {"enlarged_heart": 1}),
    ("Moderate enlargement of the cardiac silhouette.", {"enlarged_heart": 1}),
    ("Tortuous aorta.", {"aorta_unfolded": 1}),
    ("The aorta is tortuous.", {"aorta_unfolded": 1}),
    ("Unfolding of the thoracic aorta.", {"aorta_unfolded": 1}),
    ("The thoracic aorta is tortuous and calcified.", {"aorta_unfolded": 1, "aortic_atherosclerosis": 1}),
    ("Atherosclerotic calcification of the aortic arch.", {"aortic_atherosclerosis": 1}),
    ("Atherosclerotic calcifications of the aortic knob.", {"aortic_atherosclerosis": 1}),
    ("Calcified aortic knob.", {"aortic_atherosclerosis": 1}),
    ("Aortic knob calcification.", {"aortic_atherosclerosis": 1}),
    ("Aortic atherosclerosis.", {"aortic_atherosclerosis": 1}),
    ("Sclerosis of the aortic arch.", {"aortic_arch_sclerosis": 1}),
    ("Elevated right hemidiaphragm.", {"dome_relaxation": 1}),
    ("Elevation of the left hemidiaphragm.", {"dome_relaxation": 1}),
    ("The right hemidiaphragm is elevated.", {"dome_relaxation": 1}),
    ("Mild dextroscoliosis.", {"scoliosis": 1}),
    ("Levoscoliosis of the thoracolumbar spine.", {"scoliosis": 1}),
    ("Kyphoscoliosis.", {"scoliosis": 1, "kyphosis": 1}),
    ("Prominent hilar vessels.", {"vascular_roots": 1}),
    # Exclusions and other findings.
    ("Emphysema.", {"emphysema": 1}),
    ("Emphysematous changes.", {"emphysema": 1}),
    ("Hyperinflated lungs consistent with emphysema.", {"emphysema": 1, "other_finding": 1}),
    ("Hyperinflated lungs.", {"other_finding": 1}),
    ("Subcutaneous emphysema in the left chest wall.", {}),
    ("Degenerative changes of the thoracic spine.", {"spondylosis": 1}),
    ("Pulmonary fibrosis.", {"fibrosis": 1}),
    ("Calcified granuloma in the right upper lobe.", {"petrificates": 1}),
    ("Bilateral apical caps.", {"apical_caps": 1}),
    ("Increased interstitial markings.", {"increased_lung_markings": 1}),
    ("Right lower lobe pneumonia.", {"pneumonia": 1}),
    ("Chronic bronchitis.", {"bronchitis": 1}),
    ("Aortic valve calcification.", {"calcinosis": 1}),
    ("Pericardial effusion.", {"other_finding": 1}),
    ("Mild pulmonary edema.", {"edema": 1}),
    ("Pacemaker leads terminate in the right ventricle.", {"support_devices": 1}),
    ("Old healed right rib fractures.", {"fracture": 1}),
    ("Small hiatal hernia.", {"hernia": 1}),
    # Negation.
    ("Heart size is normal.", {}),
    ("Normal heart size.", {}),
    ("The heart is not enlarged.", {}),
    ("The cardiomediastinal silhouette is within normal limits.", {}),
    ("No pneumonia.", {}),
    ("No focal consolidation, pleural effusion, or pneumothorax.", {}),
    ("There is no pleural effusion or pneumothorax.", {}),
    ("Pneumothorax is not seen.", {}),
    ("Pleural effusion or pneumothorax is not identified.", {}),
    ("No evidence of pneumonia.", {}),
    ("Without evidence of pneumothorax.", {}),
    ("Negative for pneumonia.", {}),
    ("The lungs are free of consolidation.", {}),
    ("The heart size is within normal limits; no pleural effusion.", {}),
    # Scope: a cue stops at a comma (unless it heads a list), a new clause, or the sentence end.
    ("The heart is not enlarged, aorta is tortuous.", {"aorta_unfolded": 1}),
    ("No pleural effusion, the heart is enlarged.", {"enlarged_heart": 1}),
    ("There is no pneumothorax but there is a small left pleural effusion.", {"pleural_effusion": 1}),
    ("Cardiomegaly without pulmonary edema.", {"enlarged_heart": 1}),
    ("No significant change in cardiomegaly.", {"enlarged_heart": 1}),
    ("Heart size is normal. Aortic knob is calcified.", {"aortic_atherosclerosis": 1}),
    # Uncertainty.
    ("Cannot exclude pneumonia.", {"pneumonia": NA}),
    ("Pneumonia cannot be excluded.", {"pneumonia": NA}),
    ("Possible right lower lobe pneumonia.", {"pneumonia": NA}),
    ("Bibasilar opacities may represent atelectasis or pneumonia.", {"atelectasis": NA, "pneumonia": NA}),
    ("Atelectasis versus pneumonia.", {"atelectasis": NA, "pneumonia": NA}),
    ("Questionable small left effusion.", {"pleural_effusion": NA}),
    ("Findings suspicious for pneumonia.", {"pneumonia": NA}),
    ("Heart size is borderline enlarged.", {"enlarged_heart": NA}),
    ("Pneumonia?", {"pneumonia": NA}),
    ("Scarring in the left apex, likely from prior tuberculosis.", {"tuberculosis": NA, "apical_caps": 1}),
    # Several findings; affirmed wins over negated and uncertain.
    ("Cardiomegaly. Tortuous aorta. Mild dextroscoliosis.", {"enlarged_heart": 1, "aorta_unfolded": 1, "scoliosis": 1}),
    ("No pneumonia on the left. Right lower lobe pneumonia.", {"pneumonia": 1}),
    ("Possible pneumonia. No pneumothorax.", {"pneumonia": NA}),
    ("Possible pneumonia. Right lower lobe pneumonia.", {"pneumonia": 1}),
    # Normal studies; findings a normal impression sits next to still count.
    ("No acute cardiopulmonary process.", {"normal": 1}),
    ("Normal chest.", {"normal": 1}),
    ("Normal chest radiograph.", {"normal": 1}),
    ("Unremarkable study.", {"normal": 1}),
    ("No acute cardiopulmonary process. Mild cardiomegaly.", {"enlarged_heart": 1}),
    ("No acute findings. Healed left rib fracture.", {"fracture": 1}),
]


def same(got, want) -> bool:
    # NA == x is NA, not a bool, and a row's to_dict may give None for it: compare missingness first.
    return pd.isna(got) == pd.isna(want) and (pd.isna(got) or got == want)


def assert_labels(text, expected: dict, uncertain="missing") -> None:
    want = {key: 0 for key in KEYS} | expected
    got = label_texts(pd.Series([text]), VOCAB, KEYS, uncertain=uncertain).iloc[0].to_dict()
    wrong = {key: (got[key], want[key]) for key in KEYS if not same(got[key], want[key])}
    assert not wrong, f"{text!r}: (got, want) {wrong}; mentions {find_mentions(text, VOCAB)}"


def test_enough_phrases():
    assert len(CASES) >= 60


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_phrases(text, expected):
    assert_labels(text, expected)


def test_uncertain_policy_positive_and_negative():
    text = "Possible pneumonia. Cardiomegaly. No effusion."
    assert_labels(text, {"pneumonia": 1, "enlarged_heart": 1}, "positive")
    assert_labels(text, {"pneumonia": 0, "enlarged_heart": 1}, "negative")
    assert_labels(text, {"pneumonia": NA, "enlarged_heart": 1}, "missing")


@pytest.mark.parametrize("policy", ["maybe", "", None, "Missing"])
def test_uncertain_policy_is_validated(policy):
    with pytest.raises(CxrflowError, match="uncertain"):
        label_texts(pd.Series(["Cardiomegaly."]), VOCAB, KEYS, uncertain=policy)


def test_texts_must_be_a_series():
    with pytest.raises(CxrflowError, match="Series"):
        label_texts(["Cardiomegaly."], VOCAB, KEYS)


def test_empty_text_is_missing_for_every_key():
    labels = label_texts(pd.Series(["", "  ", None, "No pneumonia."]), VOCAB, KEYS)
    assert labels.iloc[:3].isna().all().all()
    assert (labels.iloc[3] == 0).all()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([text for text, _ in CASES] + ["", None]), min_size=1, max_size=40))
def test_distinct_text_labelling_equals_row_by_row(notes):
    texts = pd.Series(notes, dtype=object)
    together = label_texts(texts, VOCAB, KEYS, uncertain="positive")
    one_by_one = pd.concat(
        [label_texts(texts.iloc[[row]], VOCAB, KEYS, uncertain="positive") for row in range(len(texts))]
    )
    pd.testing.assert_frame_equal(together, one_by_one)
