"""Russian vocabulary (config/labels/ru.yaml) and the labelling API in cxrflow.labels.

Each case gives a note and the keys it must set; every key not named must be 0, so a pattern that
fires too widely fails here. NA stands for missing (uncertain, with the default policy).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrflow.errors import CxrflowError
from cxrflow.labels import find_mentions, label_texts, load_keys, load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
KEYS = load_keys(ROOT / "config/labels/keys.yaml")
VOCAB = load_vocabulary(ROOT / "config/labels/ru.yaml", KEYS)
NA = pd.NA

# Every phrase of the synthetic-note generator's table (/tmp/phrases.md), labelled as stated there.
PHRASE_TABLE = [
    ("Сердце расширено влево.", {"enlarged_heart": 1}),
    ("Кардиомегалия.", {"enlarged_heart": 1}),
    ("Расширение сердца.", {"enlarged_heart": 1}),
    ("Сердце увеличено в размерах.", {"enlarged_heart": 1}),
    ("Тень сердца расширена.", {"enlarged_heart_shadow": 1}),
    ("Расширение тени сердца.", {"enlarged_heart_shadow": 1}),
    ("Сердечная тень расширена влево.", {"enlarged_heart_shadow": 1}),
    ("Аорта развёрнута.", {"aorta_unfolded": 1}),
    ("Аорта развернута.", {"aorta_unfolded": 1}),
    ("Развёрнутость аорты.", {"aorta_unfolded": 1}),
    ("Развернутая аорта.", {"aorta_unfolded": 1}),
    ("Аорта уплотнена.", {"aorta_compacted": 1}),
    ("Уплотнение аорты.", {"aorta_compacted": 1}),
    ("Стенки аорты уплотнены.", {"aorta_compacted": 1}),
    ("Атеросклероз аорты.", {"aortic_atherosclerosis": 1}),
    ("Атеросклеротические изменения аорты.", {"aortic_atherosclerosis": 1}),
    ("Атероматоз аорты.", {"aortic_atherosclerosis": 1}),
    ("Релаксация правого купола диафрагмы.", {"dome_relaxation": 1}),
    ("Релаксация купола диафрагмы.", {"dome_relaxation": 1}),
    ("Правый купол диафрагмы релаксирован.", {"dome_relaxation": 1}),
    ("Склероз дуги аорты.", {"aortic_arch_sclerosis": 1}),
    ("Склеротические изменения дуги аорты.", {"aortic_arch_sclerosis": 1}),
    ("Дуга аорты склерозирована.", {"aortic_arch_sclerosis": 1}),
    ("Сколиоз грудного отдела позвоночника.", {"scoliosis": 1}),
    ("S-образный сколиоз.", {"scoliosis": 1}),
    ("Сколиотическая деформация позвоночника.", {"scoliosis": 1}),
    ("Корни сосудистые.", {"vascular_roots": 1}),
    ("Корни лёгких сосудистого типа.", {"vascular_roots": 1}),
    ("Сосудистые корни.", {"vascular_roots": 1}),
    ("Инфильтрация в нижней доле справа, пневмония.", {"pneumonia": 1, "infiltration": 1}),
    ("Правосторонняя нижнедолевая пневмония.", {"pneumonia": 1}),
    ("Признаки пневмонии.", {"pneumonia": 1}),
    ("Эмфизема лёгких.", {"emphysema": 1}),
    ("Эмфизематозные изменения лёгких.", {"emphysema": 1}),
    ("Повышенная воздушность лёгочной ткани, эмфизема.", {"emphysema": 1}),
    ("Очаговые тени в верхней доле слева.", {"focal_shadows": 1}),
    ("Очаговая тень справа.", {"focal_shadows": 1}),
    ("Единичные очаговые тени.", {"focal_shadows": 1}),
    ("Пневмосклероз.", {"pneumosclerosis": 1}),
    ("Диффузный пневмосклероз.", {"pneumosclerosis": 1}),
    ("Явления пневмосклероза.", {"pneumosclerosis": 1}),
    ("Сердце не расширено.", {"enlarged_heart": 0}),
    ("Без признаков кардиомегалии.", {"enlarged_heart": 0}),
    ("Аорта не развёрнута.", {"aorta_unfolded": 0}),
    ("Сколиоза не выявлено.", {"scoliosis": 0}),
    ("Очаговых теней не выявлено.", {"focal_shadows": 0}),
    ("Пневмонии нет.", {"pneumonia": 0}),
    ("Возможно, пневмония.", {"pneumonia": NA}),
    ("Нельзя исключить очаговые тени.", {"focal_shadows": NA}),
    ("Без патологических изменений.", {"normal": 1}),
    ("Органы грудной клетки без патологии.", {"normal": 1}),
    ("Норма.", {"normal": 1}),
    ("Лёгкие без очаговых и инфильтративных теней. Сердце и аорта в норме. Заключение: без патологии.", {"normal": 1}),
    ("Синусы свободны.", {}),
    ("Корни структурны.", {}),
    ("Купола диафрагмы чёткие.", {}),
]

HAND_WRITTEN = [
    # Inflections, word order, ё/е and case.
    ("Сердце умеренно расширено влево.", {"enlarged_heart": 1}),
    ("Сердце значительно увеличено.", {"enlarged_heart": 1}),
    ("Увеличенное сердце.", {"enlarged_heart": 1}),
    ("Границы сердца расширены в обе стороны.", {"enlarged_heart": 1}),
    ("КАРДИОМЕГАЛИЯ.", {"enlarged_heart": 1}),
    ("СЕРДЦЕ РАСШИРЕНО.", {"enlarged_heart": 1}),
    ("Тень сердца умеренно расширена влево.", {"enlarged_heart_shadow": 1}),
    ("Аорта уплотнена, развёрнута.", {"aorta_compacted": 1, "aorta_unfolded": 1}),
    ("Аорта развернута и уплотнена.", {"aorta_compacted": 1, "aorta_unfolded": 1}),
    ("Уплотнённая аорта.", {"aorta_compacted": 1}),
    ("Атеросклеротические бляшки в стенках аорты.", {"aortic_atherosclerosis": 1}),
    ("Кальциноз дуги аорты.", {"aortic_atherosclerosis": 1}),
    ("Атеросклероз дуги аорты.", {"aortic_atherosclerosis": 1}),
    ("Склероз стенок дуги аорты.", {"aortic_arch_sclerosis": 1}),
    ("Пневмосклероз в нижних отделах.", {"pneumosclerosis": 1}),
    ("Постпневмонический пневмосклероз.", {"pneumosclerosis": 1}),
    ("Высокое стояние правого купола диафрагмы.", {"dome_relaxation": 1}),
    ("Купола диафрагмы чёткие, ровные.", {}),
    ("Левосторонний сколиоз грудного отдела.", {"scoliosis": 1}),
    ("Кифосколиоз.", {"scoliosis": 1, "kyphosis": 1}),
    ("Корни сосудистые, структурны.", {"vascular_roots": 1}),
    ("Корни структурны, не расширены.", {}),
    ("Корни обогащены.", {"enriched_roots": 1}),
    ("Корни тяжистые.", {"hilar_strandiness": 1}),
    ("Тяжистость корней.", {"hilar_strandiness": 1}),
    ("Лёгочный рисунок усилен.", {"increased_lung_markings": 1}),
    ("Усиление лёгочного рисунка в прикорневых зонах.", {"increased_lung_markings": 1}),
    ("Деформация рёбер справа.", {"rib_deformity": 1}),
    ("Кальцинаты в корнях.", {"petrificates": 1}),
    ("Петрификаты в правом корне.", {"petrificates": 1}),
    ("Кальциноз хрящей рёбер.", {"calcinosis": 1}),
    ("Апикальные плевральные шапочки.", {"apical_caps": 1}),
    ("Плевродиафрагмальные спайки справа.", {"pleurodiaphragmatic_adhesions": 1}),
    ("Хронический бронхит.", {"bronchitis": 1}),
    ("Очаговый туберкулёз верхней доли.", {"tuberculosis": 1}),
    ("ТБК.", {"tuberculosis": 1}),
    ("Фиброз лёгочной ткани.", {"fibrosis": 1}),
    ("Эмфизема.", {"emphysema": 1}),
    ("Подкожная эмфизема слева.", {}),
    ("Выпот в правой плевральной полости.", {"pleural_effusion": 1}),
    ("Пневмоторакс справа.", {"pneumothorax": 1}),
    ("Дисковидный ателектаз.", {"atelectasis": 1}),
    ("Отек легких.", {"edema": 1}),
    ("Перелом 5 ребра слева.", {"fracture": 1}),
    ("Грыжа пищеводного отверстия диафрагмы.", {"hernia": 1}),
    ("ЭКС слева.", {"support_devices": 1}),
    # Negation, before and after the finding.
    ("Сердце не увеличено.", {}),
    ("Тень сердца не расширена.", {}),
    ("Лёгочный рисунок не усилен.", {}),
    ("Без признаков пневмонии.", {}),
    ("Очаговых и инфильтративных теней не определяется.", {}),
    ("Не выявлено очаговых теней.", {}),
    ("Данных за пневмонию нет.", {}),
    ("Признаков туберкулёза не выявлено.", {}),
    ("Отсутствуют признаки пневмонии.", {}),
    ("Жидкости в синусах нет.", {}),
    # Scope: a cue stops at a comma, a clause boundary or the end of its sentence.
    ("Сердце не расширено, аорта уплотнена.", {"aorta_compacted": 1}),
    ("Сердце не расширено и аорта уплотнена.", {"aorta_compacted": 1}),
    ("Сердце не резко расширено.", {}),
    ("Аорта не уплотнена, развёрнута.", {"aorta_unfolded": 1}),
    ("Аорта не уплотнена и развёрнута.", {"aorta_unfolded": 1}),
    ("Очаговых и инфильтративных теней в лёгких не определяется.", {}),
    ("Лёгкие без очаговых теней, сердце расширено влево.", {"enlarged_heart": 1}),
    ("Пневмонии нет, сколиоз.", {"scoliosis": 1}),
    ("Сколиоз. Пневмонии нет.", {"scoliosis": 1}),
    ("Сердце расширено, но аорта не уплотнена.", {"enlarged_heart": 1}),
    ("Без признаков кардиомегалии; аорта развёрнута.", {"aorta_unfolded": 1}),
    ("Пневмония без динамики.", {"pneumonia": 1}),
    # Uncertainty.
    ("Вероятно, пневмония.", {"pneumonia": NA}),
    ("Пневмония под вопросом.", {"pneumonia": NA}),
    ("Пневмония?", {"pneumonia": NA}),
    ("? пневмония.", {"pneumonia": NA}),
    ("Не исключена пневмония.", {"pneumonia": NA}),
    ("Нельзя исключить пневмонию слева.", {"pneumonia": NA}),
    ("Сомнительные очаговые тени справа.", {"focal_shadows": NA}),
    ("Подозрение на туберкулёз.", {"tuberculosis": NA}),
    ("Возможно, пневмония, сердце расширено.", {"pneumonia": NA, "enlarged_heart": 1}),
    # Several findings in one note; affirmed wins over negated and uncertain.
    (
        "Лёгкие без очаговых и инфильтративных теней. Корни структурны. Синусы свободны. "
        "Сердце расширено влево. Аорта уплотнена, развёрнута.",
        {"enlarged_heart": 1, "aorta_compacted": 1, "aorta_unfolded": 1},
    ),
    ("Диффузный пневмосклероз, эмфизема, S-образный сколиоз.", {"pneumosclerosis": 1, "emphysema": 1, "scoliosis": 1}),
    ("Пневмонии нет. Правосторонняя пневмония.", {"pneumonia": 1}),
    ("Возможно, пневмония. Признаки пневмонии.", {"pneumonia": 1}),
    ("Возможно, пневмония. Пневмонии нет.", {"pneumonia": NA}),
    # Normal studies.
    ("Без патологии.", {"normal": 1}),
    ("Вариант нормы.", {"normal": 1}),
    ("Патологических изменений не выявлено.", {"normal": 1}),
    ("Органы грудной клетки в норме.", {"normal": 1}),
    ("Без патологических изменений. Без динамики.", {"normal": 1}),
]


def labels_of(text, uncertain="missing") -> dict:
    return label_texts(pd.Series([text]), VOCAB, KEYS, uncertain=uncertain).iloc[0].to_dict()


def same(got, want) -> bool:
    # NA == x is NA, not a bool, and a row's to_dict may give None for it: compare missingness first.
    return pd.isna(got) == pd.isna(want) and (pd.isna(got) or got == want)


def assert_labels(text, expected: dict, uncertain="missing") -> None:
    want = {key: 0 for key in KEYS} | expected
    got = labels_of(text, uncertain)
    wrong = {key: (got[key], want[key]) for key in KEYS if not same(got[key], want[key])}
    assert not wrong, f"{text!r}: (got, want) {wrong}; mentions {find_mentions(text, VOCAB)}"


def test_enough_hand_written_phrases():
    assert len(HAND_WRITTEN) >= 60


@pytest.mark.parametrize(("text", "expected"), PHRASE_TABLE)
def test_generator_phrase_table(text, expected):
    assert_labels(text, expected)


@pytest.mark.parametrize(("text", "expected"), HAND_WRITTEN)
def test_hand_written_phrases(text, expected):
    assert_labels(text, expected)


def test_uncertain_policy_positive_and_negative():
    assert_labels("Возможно, пневмония, сердце расширено.", {"pneumonia": 1, "enlarged_heart": 1}, "positive")
    assert_labels("Возможно, пневмония, сердце расширено.", {"pneumonia": 0, "enlarged_heart": 1}, "negative")
    assert_labels("Пневмонии нет.", {}, "positive")


@pytest.mark.parametrize("empty", ["", "   ", "\n\t", None, np.nan, pd.NA])
def test_empty_text_is_missing_for_every_key(empty):
    labels = label_texts(pd.Series(["Кардиомегалия.", empty], dtype=object), VOCAB, KEYS)
    assert labels.iloc[1].isna().all()
    assert labels.loc[0, "enlarged_heart"] == 1


def test_result_shape_index_and_dtype():
    texts = pd.Series(["Кардиомегалия.", "Норма.", None], index=["a7", "b2", "c9"])
    labels = label_texts(texts, VOCAB, KEYS)
    assert list(labels.columns) == KEYS
    assert list(labels.index) == ["a7", "b2", "c9"]
    assert set(labels.dtypes.astype(str)) == {"Int8"}


CORPUS = [text for text, _ in PHRASE_TABLE + HAND_WRITTEN] + ["", None]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(CORPUS), min_size=1, max_size=40))
def test_distinct_text_labelling_equals_row_by_row(notes):
    texts = pd.Series(notes, dtype=object, index=range(100, 100 + len(notes)))
    together = label_texts(texts, VOCAB, KEYS)
    one_by_one = pd.concat([label_texts(texts.iloc[[row]], VOCAB, KEYS) for row in range(len(texts))])
    pd.testing.assert_frame_equal(together, one_by_one)


def test_string_dtype_and_object_dtype_agree():
    notes = ["Кардиомегалия.", "Пневмонии нет.", "Кардиомегалия.", None]
    pd.testing.assert_frame_equal(
        label_texts(pd.Series(notes, dtype="string"), VOCAB, KEYS),
        label_texts(pd.Series(notes, dtype=object), VOCAB, KEYS),
    )


def write_vocabulary(tmp_path, text: str) -> Path:
    path = tmp_path / "vocab.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_names_file_and_key(tmp_path):
    path = write_vocabulary(tmp_path, "findings:\n  big_heart: ['кардиомегали']\n")
    with pytest.raises(CxrflowError, match="big_heart") as error:
        load_vocabulary(path, KEYS)
    assert str(path) in str(error.value)


def test_unknown_key_under_absent_names_file_and_key(tmp_path):
    path = write_vocabulary(tmp_path, "absent:\n  small_heart: ['норм']\n")
    with pytest.raises(CxrflowError, match="small_heart") as error:
        load_vocabulary(path, KEYS)
    assert str(path) in str(error.value)


def test_bad_regex_names_file_key_and_pattern(tmp_path):
    path = write_vocabulary(tmp_path, "findings:\n  scoliosis: ['сколиоз', 'сколи(оз']\n")
    with pytest.raises(CxrflowError) as error:
        load_vocabulary(path, KEYS)
    assert str(path) in str(error.value) and "scoliosis" in str(error.value) and "сколи(оз" in str(error.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("findngs:\n  scoliosis: ['сколиоз']\n", "findngs"),
        ("negation:\n  - {direction: sideways, window: 3, cues: ['нет']}\n", "sideways"),
        ("negation:\n  - {direction: before, window: 0, cues: ['нет']}\n", "window"),
        ("findings:\n  scoliosis: 42\n", "scoliosis"),
        ("boundaries:\n  paragraph: ['\\n\\n']\n", "boundaries"),
    ],
)
def test_malformed_vocabulary_is_a_user_error(tmp_path, text, fragment):
    path = write_vocabulary(tmp_path, text)
    with pytest.raises(CxrflowError, match=fragment) as error:
        load_vocabulary(path, KEYS)
    assert str(path) in str(error.value)


def test_missing_vocabulary_file_names_the_file(tmp_path):
    with pytest.raises(CxrflowError, match="nothere.yaml"):
        load_vocabulary(tmp_path / "nothere.yaml", KEYS)


def test_keys_keep_file_order():
    assert KEYS[:3] == ["enlarged_heart", "enlarged_heart_shadow", "aorta_unfolded"]
    assert len(KEYS) == len(set(KEYS))
