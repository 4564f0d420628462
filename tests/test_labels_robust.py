"""The labeller on notes as doctors really write them (issue 12's error classes), the `normal` key, and
vocabulary errors that name file, line and term.

Every phrase here was written for this file; none is copied from the corpora in tests/data/labels/. Each
case gives the keys it must set; every key not named must be 0 (`normal` too), so a pattern that fires too
widely fails here. NA stands for missing (uncertain, with the default policy).
"""

import logging
from pathlib import Path

import pandas as pd
import pytest

from cxrflow import synthetic
from cxrflow.errors import CxrflowError
from cxrflow.labels import find_mentions, label_texts, load_keys, load_vocabulary, split_units

ROOT = Path(__file__).resolve().parents[1]
KEYS = load_keys(ROOT / "config/labels/keys.yaml")
RU = load_vocabulary(ROOT / "config/labels/ru.yaml", KEYS)
EN = load_vocabulary(ROOT / "config/labels/en.yaml", KEYS)
NA = pd.NA


def same(got, want) -> bool:
    return pd.isna(got) == pd.isna(want) and (pd.isna(got) or got == want)


def assert_labels(text, expected: dict, vocab, uncertain="missing") -> None:
    want = {key: 0 for key in KEYS} | expected
    got = label_texts(pd.Series([text]), vocab, KEYS, uncertain=uncertain).iloc[0].to_dict()
    wrong = {key: (got[key], want[key]) for key in KEYS if not same(got[key], want[key])}
    assert not wrong, f"{text!r}: (got, want) {wrong}; mentions {find_mentions(text, vocab)}"


# --- Russian ---------------------------------------------------------------------------------------------------

ABBREVIATIONS = [
    ("Ао уплотнена.", {"aorta_compacted": 1}),
    ("Дуга Ао развернута.", {"aorta_unfolded": 1}),
    ("ЛЖ умеренно увеличен.", {"enlarged_heart": 1}),
    ("Признаки гипертрофии ЛЖ.", {"enlarged_heart": 1}),
    ("Увеличение левого желудочка сердца.", {"enlarged_heart": 1}),
    ("Левый желудочек расширен.", {"enlarged_heart": 1}),
    ("ПДС слева.", {"pleurodiaphragmatic_adhesions": 1}),
    ("Левый КДУ запаян.", {"pleurodiaphragmatic_adhesions": 1}),
    ("КДУ свободны.", {}),
    ("ОГК без видимой патологии.", {"normal": 1}),
    ("Релаксация лев. купола диафрагмы. Сердце не расширено.", {"dome_relaxation": 1}),
    ("Высокое стояние пр. купола диафрагмы.", {"dome_relaxation": 1}),
    ("Корни уплотнены, т.е. тяжисты. Аорта не изменена.", {"hilar_strandiness": 1}),
    ("Единичный очаг в S1-2 слева.", {"focal_shadows": 1}),
    ("В S6 справа без очаговых теней.", {}),
]


@pytest.mark.parametrize(("text", "expected"), ABBREVIATIONS)
def test_ru_abbreviations(text, expected):
    assert_labels(text, expected, RU)


@pytest.mark.parametrize(
    ("text", "n_units"),
    [
        ("Релаксация пр. купола диафрагмы. Аорта уплотнена.", 2),
        ("Корни уплотнены, т.е. тяжисты, т. к. курит. Сердце в норме.", 2),
        ("Купол лев. диафрагмы высоко. См. предыдущее исследование.", 2),
        ("Аорта уплотнена.Корни тяжистые.", 2),  # no space after the full stop: still two sentences
    ],
)
def test_ru_sentence_splitter_keeps_abbreviations(text, n_units):
    assert len(split_units(text.lower(), RU)) == n_units


LOOKALIKES = [
    ("Kардиомегалия.", {"enlarged_heart": 1}),  # Latin K
    ("Аoрта развeрнута.", {"aorta_unfolded": 1}),  # Latin o and e
    ("Cердце расширено влево.", {"enlarged_heart": 1}),  # Latin C
    ("Дуга аорты склерозирoвана, аpта не изменена.", {"aortic_arch_sclerosis": 1}),  # Latin o, p in a short typo
    ("Kорни тяжистые, ТEНЬ сердца не расширена.", {"hilar_strandiness": 1}),  # Latin K, E
    ("Сколиоз грудного отдела, S-образный.", {"scoliosis": 1}),  # a Latin word stays as it is
    ("Очаговая тень c обеих сторон.", {"focal_shadows": 1}),  # a lone Latin "c" for the preposition "с"
    # A whole word in look-alikes, when its Cyrillic twin is a Russian word or an abbreviation.
    ("Пневмонии het, выпота he выявлено.", {}),
    ("Aopta уплотнена.", {"aorta_compacted": 1}),
    ("Сердце he расширено, аорта уплотнена.", {"aorta_compacted": 1}),
]


@pytest.mark.parametrize(("text", "expected"), LOOKALIKES)
def test_ru_latin_lookalikes_are_folded(text, expected):
    assert_labels(text, expected, RU)


TYPOS = [
    ("Атеросклроз аорты.", {"aortic_atherosclerosis": 1}),  # missing letter
    ("Пневмосклерзо в базальных отделах.", {"pneumosclerosis": 1}),  # transposed letters
    ("Кардиомеггалия.", {"enlarged_heart": 1}),  # doubled letter
    ("Эмфизкма лёгких.", {"emphysema": 1}),  # wrong letter
    ("Релаксацыя правого купола диафрагмы.", {"dome_relaxation": 1}),
]


@pytest.mark.parametrize(("text", "expected"), TYPOS)
def test_ru_single_typos_in_long_words(text, expected):
    assert_labels(text, expected, RU)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Аотра уплотнена.", {}),  # a five-letter word is never corrected
        ("Отёк мягких тканей.", {}),  # nor a short finding word ("отек" is not one edit from "отек легк...")
        ("Возмжно, пневмония.", {"pneumonia": 1}),  # a misspelt hedge is not guessed into one
        ("Развита подкожная клетчатка.", {}),  # a dictionary word near a stem ("развернута") stays as written
    ],
)
def test_ru_typo_tolerance_is_bounded(text, expected):
    assert_labels(text, expected, RU)


def test_typo_tolerance_is_counted_and_logged(caplog):
    texts = pd.Series(["Атеросклроз аорты.", "Атеросклроз аорты.", "Норма.", "Кардиомеггалия. Норма.", None])
    with caplog.at_level(logging.INFO, logger="cxrflow.labels"):
        labels = label_texts(texts, RU, KEYS)
    typos = labels.attrs["typos"]
    assert typos["rows"] == 3 and typos["sentences"] == 2
    assert typos["words"] == {"атеросклроз": "атеросклероз", "кардиомеггалия": "кардиомегалия"}
    assert "typo tolerance fired on 3 rows" in caplog.text
    assert label_texts(pd.Series(["Норма."]), RU, KEYS).attrs["typos"]["rows"] == 0


COORDINATION = [
    ("Дуга аорты уплотнена, развёрнута.", {"aorta_compacted": 1, "aorta_unfolded": 1}),
    ("Аорта удлинена, уплотнена и развернута.", {"aorta_compacted": 1, "aorta_unfolded": 1}),
    ("Корни расширены, малоструктурны.", {"hilar_strandiness": 1}),
    ("Корни лёгких уплотнены, тяжисты.", {"hilar_strandiness": 1}),
    ("Уплотнены корни.", {"hilar_strandiness": 1}),
    ("Уплотнена аорта.", {"aorta_compacted": 1}),
    ("Развернутость и уплотнение аорты.", {"aorta_compacted": 1, "aorta_unfolded": 1}),
    ("Уплотнение, развернутость аорты.", {"aorta_compacted": 1, "aorta_unfolded": 1}),
    ("Корни сосудистые, уплотнены.", {"vascular_roots": 1, "hilar_strandiness": 1}),
    # A new subject starts a new chain: the aorta is not the roots.
    ("Корни не изменены, аорта уплотнена.", {"aorta_compacted": 1}),
    ("Аорта не расширена, уплотнена.", {"aorta_compacted": 1}),
]


@pytest.mark.parametrize(("text", "expected"), COORDINATION)
def test_ru_coordinated_predicates_and_nouns(text, expected):
    assert_labels(text, expected, RU)


SYNONYMS = [
    ("Аорта удлинена.", {"aorta_unfolded": 1}),
    ("Удлинение грудной аорты.", {"aorta_unfolded": 1}),
    ("Аорта извита.", {"aorta_unfolded": 1}),
    ("Аорта с явлениями атеросклероза.", {"aortic_atherosclerosis": 1}),
    ("Атероматоз дуги аорты.", {"aortic_atherosclerosis": 1}),
    ("Кальциноз стенок аорты.", {"aortic_atherosclerosis": 1}),
    ("Кальциноз створок аортального клапана.", {"calcinosis": 1}),
    ("Апикальные наложения с обеих сторон.", {"apical_caps": 1}),
    ("Плевральные наслоения в куполах.", {"apical_caps": 1}),
    ("Посттуберкулезные изменения верхних долей.", {"tuberculosis": 1}),
    ("Деформация лёгочного рисунка в базальных отделах.", {"pneumosclerosis": 1}),
    ("Обогащение лёгочного рисунка.", {"increased_lung_markings": 1}),
    ("Остеохондроз грудного отдела позвоночника.", {"spondylosis": 1}),
    ("Синусы запаяны.", {"pleurodiaphragmatic_adhesions": 1}),
    ("Тень сердца увеличена влево.", {"enlarged_heart_shadow": 1}),
    ("Повышенная прозрачность лёгочных полей.", {"other_finding": 1}),
    ("Повышенная прозрачность лёгочных полей, эмфизема.", {"emphysema": 1}),
    ("Металлические швы грудины.", {"other_finding": 1}),
    ("Мастэктомия слева.", {"other_finding": 1}),
]


@pytest.mark.parametrize(("text", "expected"), SYNONYMS)
def test_ru_synonyms_and_prefixes(text, expected):
    assert_labels(text, expected, RU)


NEGATED_LISTS = [
    ("Инфильтрации, очаговых теней, выпота не выявлено.", {}),
    ("Без признаков фиброза, эмфиземы и пневмосклероза.", {}),
    ("Нет данных за пневмонию, ателектаз, пневмоторакс.", {}),
    ("Не определяется очаговых теней, кальцинатов и инфильтрации.", {}),
    # A new clause with its own predicate is outside the negation.
    ("Эмфиземы нет, аорта развернута.", {"aorta_unfolded": 1}),
    ("Ребра не деформированы, аорта уплотнена.", {"aorta_compacted": 1}),
    ("Очаговых теней не выявлено, корни тяжистые.", {"hilar_strandiness": 1}),
    ("Пневмосклероза нет, сколиоз.", {"scoliosis": 1}),  # nominative: not part of the negated list
    ("Фиброза нет и аорта развёрнута.", {"aorta_unfolded": 1}),
]


@pytest.mark.parametrize(("text", "expected"), NEGATED_LISTS)
def test_ru_negation_over_lists_stops_at_a_new_clause(text, expected):
    assert_labels(text, expected, RU)


HEDGES = [
    ("Под вопросом очаговые тени справа.", {"focal_shadows": NA}),
    ("Очаговые тени справа под вопросом.", {"focal_shadows": NA}),
    ("Пневмония (?).", {"pneumonia": NA}),
    ("Сомнительно: пневмония в нижней доле.", {"pneumonia": NA}),
    ("Сердце, по-видимому, увеличено.", {"enlarged_heart": NA}),
    ("Аорта уплотнена. Сердце, вероятно, расширено.", {"aorta_compacted": 1, "enlarged_heart": NA}),
    ("Аорта (возможно) развернута.", {"aorta_unfolded": NA}),
    ("Не исключается бронхит.", {"bronchitis": NA}),
]


@pytest.mark.parametrize(("text", "expected"), HEDGES)
def test_ru_hedges_before_after_brackets_colon_parenthetical(text, expected):
    assert_labels(text, expected, RU)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Талия сердца сглажена.", {"smoothed_cardiac_waist": 1}),
        ("Сглаженная талия сердца, аорта уплотнена.", {"smoothed_cardiac_waist": 1, "aorta_compacted": 1}),
        ("Талия сердца не сглажена.", {}),
        ("Талия сердца сглажена. В остальном без патологии.", {"smoothed_cardiac_waist": 1}),
    ],
)
def test_ru_smoothed_cardiac_waist(text, expected):
    assert_labels(text, expected, RU)


# --- the normal key ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "vocab"),
    [
        ("Органы грудной клетки без видимых патологических изменений.", {"normal": 1}, RU),
        ("Без патологии. Эмфиземы нет.", {"normal": 1}, RU),
        ("ОГК без особенностей.", {"normal": 1}, RU),
        ("Без особенностей.", {"normal": 1}, RU),
        # Only negated findings, no normal-study phrase: not normal, and nothing positive.
        ("Очаговых и инфильтративных теней не выявлено. Сердце не расширено.", {}, RU),
        ("Очаговой патологии нет.", {}, RU),
        ("Сердце в норме.", {}, RU),  # one organ's normal is not the study's
        ("Тень сердца не расширена, в норме.", {}, RU),
        # The heart and aorta together, as the corpus guidelines read "Сердце и аорта - в пределах нормы".
        ("Лёгкие без очаговых теней; сердце, аорта - в пределах нормы.", {"normal": 1}, RU),
        ("Без патологии. Сколиоз.", {"scoliosis": 1}, RU),
        ("Без патологии. Возможно, пневмония.", {"pneumonia": NA}, RU),
        ("No acute cardiopulmonary abnormality.", {"normal": 1}, EN),
        ("No pneumothorax or effusion.", {}, EN),
        ("Normal chest. Mild thoracic levoscoliosis.", {"scoliosis": 1}, EN),
        ("Negative chest. Heart size at the upper limits of normal.", {"normal": 1}, EN),
    ],
)
def test_normal_key(text, expected, vocab):
    assert_labels(text, expected, vocab)


def test_normal_key_ignores_the_uncertain_policy_and_is_missing_for_empty_notes():
    texts = pd.Series(["Без патологии. Возможно, пневмония.", "Норма.", "", None])
    for policy in ("missing", "positive", "negative"):
        normal = label_texts(texts, RU, KEYS, uncertain=policy)["normal"]
        assert normal.iloc[0] == 0 and normal.iloc[1] == 1
        assert normal.iloc[2:].isna().all()


def test_synthetic_normal_notes_are_normal():
    labels = label_texts(pd.Series(list(synthetic.NORMAL)), RU, KEYS)
    assert labels["normal"].fillna(0).eq(1).all(), labels["normal"].tolist()
    others = labels.drop(columns="normal")
    assert others.fillna(1).eq(0).all().all()


# --- English -----------------------------------------------------------------------------------------------------

ENGLISH = [
    # "/" between terms; a finding several words from its organ.
    ("Aortic ectasia/tortuosity.", {"aorta_unfolded": 1}),
    ("Effusion/atelectasis at the right base.", {"pleural_effusion": 1, "atelectasis": 1}),
    ("Atherosclerotic calcification present within the wall of the aorta.", {"aortic_atherosclerosis": 1}),
    # Synonyms.
    ("Ectatic thoracic aorta.", {"aorta_unfolded": 1}),
    ("Elongated, tortuous aorta.", {"aorta_unfolded": 1}),
    ("Dextrocurvature of the thoracic spine.", {"scoliosis": 1}),
    ("Mild S-shaped curvature of the thoracolumbar spine.", {"scoliosis": 1}),
    ("The heart is large.", {"enlarged_heart": 1}),
    ("Heart size is enlarged.", {"enlarged_heart": 1}),
    ("Interval increase in heart size.", {"enlarged_heart": 1}),
    ("Enlarged cardiac silhouette.", {"enlarged_heart": 1}),
    ("Eventration of the right hemidiaphragm.", {"dome_relaxation": 1}),
    ("Enlarged central pulmonary arteries.", {"vascular_roots": 1}),
    # ConText-style hedges.
    ("Question of a small left pleural effusion.", {"pleural_effusion": NA}),
    ("Findings compatible with early pneumonia.", {"pneumonia": NA}),
    ("Pneumonia is in the differential.", {"pneumonia": NA}),
    ("Correlate clinically for pneumonia.", {"pneumonia": NA}),
    ("A tiny apical pneumothorax cannot be excluded.", {"pneumothorax": NA}),
    ("No opacity to suggest pneumonia.", {}),
    # "infection" is not pneumonia; hyperinflation is not emphysema; the spine's degenerative changes are spondylosis.
    ("Findings may reflect infection.", {"other_finding": NA}),
    ("Sequelae of granulomatous infection.", {"other_finding": 1}),
    ("Calcified granulomas in the left lung.", {"petrificates": 1}),
    ("Hyperexpanded lungs with flattened diaphragms.", {"other_finding": 1}),
    ("Degenerative changes in the thoracic spine.", {"spondylosis": 1}),
    ("Degenerative changes of the right shoulder.", {"other_finding": 1}),
    # A sign without a key counts only when nothing in its sentence explains it.
    ("Right basilar opacity, likely atelectasis.", {"atelectasis": NA}),
    ("Right basilar opacity.", {"other_finding": 1}),
    # A negated list, and the verb of the list itself.
    ("No consolidation, effusion, or pneumothorax is identified.", {}),
    ("No pneumothorax, heart is enlarged.", {"enlarged_heart": 1}),
]


@pytest.mark.parametrize(("text", "expected"), ENGLISH)
def test_en_error_classes(text, expected):
    assert_labels(text, expected, EN)


# --- error classes found on the corpora's old held-out part (phrasings written here) ----------------------------

RU_STRUCTURE = [
    # A heading of one or two words before a colon, as in structured protocols.
    ("Аорта: развёрнута, уплотнена.", {"aorta_unfolded": 1, "aorta_compacted": 1}),
    ("Лёгкие: без очаговых теней. Сердце: расширено влево.", {"enlarged_heart": 1}),
    ("Корни лёгких: тяжистые, малоструктурные.", {"hilar_strandiness": 1}),
    ("Сердце: не расширено. Синусы: свободны.", {}),
    # A longer phrase before a colon is a clause: the hedge stays with its object.
    ("Дифференцировать с туберкулёзом: очаги в S6 справа.", {"focal_shadows": 1, "tuberculosis": NA}),
    # A bracketed query closes its sentence even without a full stop.
    ("Сердце расширено (?) Очаговых теней нет.", {"enlarged_heart": NA}),
    ("Релаксация правого купола (?) Синусы свободны.", {"dome_relaxation": NA}),
]


@pytest.mark.parametrize(("text", "expected"), RU_STRUCTURE)
def test_ru_headings_and_bracketed_queries(text, expected):
    assert_labels(text, expected, RU)


RU_HEDGE_PLACE = [
    # A question after a dash hedges the interpretation, not the finding before the dash.
    ("Очаговая тень в S6 справа - туберкулома?", {"focal_shadows": 1, "tuberculosis": NA}),
    ("Инфильтрация в нижней доле слева - пневмония?", {"infiltration": 1, "pneumonia": NA}),
    ("Инфильтрация в нижней доле слева?", {"infiltration": NA}),
    # A hedge between commas goes with the predicate after it; one that ends the clause looks back.
    ("Аорта уплотнена, вероятно, развёрнута.", {"aorta_compacted": 1, "aorta_unfolded": NA}),
    ("Корни сосудистые, по-видимому, тяжистые.", {"vascular_roots": 1, "hilar_strandiness": NA}),
    ("Пневмония, вероятно.", {"pneumonia": NA}),
    ("Сколиоз грудного отдела, возможно.", {"scoliosis": NA}),
    ("Аорта уплотнена, вероятно развёрнута.", {"aorta_compacted": 1, "aorta_unfolded": NA}),
]


@pytest.mark.parametrize(("text", "expected"), RU_HEDGE_PLACE)
def test_ru_hedge_goes_with_its_own_finding(text, expected):
    assert_labels(text, expected, RU)


RU_NEGATION_FORMS = [
    # A misspelt ending of the negating verb still negates (typo tolerance never touches a cue).
    ("Пневмоторакса не выявлнено.", {}),
    ("Данных за пневмонию не получнео.", {}),
    ("Выпота в синусах не определеятся.", {}),
    # A disease treated is not present; its sequelae and an old tuberculosis are.
    ("Контроль после лечения левосторонней пневмонии: лёгкие без патологии.", {"normal": 1}),
    ("После перенесённой пневмонии пневмофиброз слева.", {"fibrosis": 1}),
    ("После лечения туберкулёза фиброзные изменения в S1.", {"tuberculosis": 1, "fibrosis": 1}),
]


@pytest.mark.parametrize(("text", "expected"), RU_NEGATION_FORMS)
def test_ru_negation_forms(text, expected):
    assert_labels(text, expected, RU)


RU_NORMAL_FORMS = [
    ("Без рентгенологических признаков патологии.", {"normal": 1}),
    ("Без видимых признаков патологии.", {"normal": 1}),
    ("Видимой патологии органов грудной клетки на момент осмотра не выявлено.", {"normal": 1}),
    ("Патологических изменений ОГК на момент исследования не выявлено.", {"normal": 1}),
    # An adjective that names one kind of finding makes it a negation, not a normal study.
    ("Свежей очаговой и инфильтративной патологии не определяется.", {}),
    ("Костно-деструктивной патологии не выявлено.", {}),
]


@pytest.mark.parametrize(("text", "expected"), RU_NORMAL_FORMS)
def test_ru_normal_study_forms(text, expected):
    assert_labels(text, expected, RU)


RU_MORE_SYNONYMS = [
    ("Ao развёрнута.", {"aorta_unfolded": 1}),  # a whole abbreviation in Latin look-alikes
    ("AO уплотнена, корни структурны.", {"aorta_compacted": 1}),
    # A predicate before its subject is joined to it by a space, never a comma: no new chain after a comma.
    ("Аорта уплотнена, корни структурны.", {"aorta_compacted": 1}),
    ("Корни уплотнены, аорта развёрнута.", {"hilar_strandiness": 1, "aorta_unfolded": 1}),
    ("Уплотнены, тяжисты корни.", {"hilar_strandiness": 1}),
    ("Корни уплотнены, атеросклероз аорты.", {"hilar_strandiness": 1, "aortic_atherosclerosis": 1}),
    ("Аорта уплотнена, в проекции правого корня тень.", {"aorta_compacted": 1}),
    ("Корни расширены за счёт расширенных сосудов.", {"vascular_roots": 1}),
    ("Атеросклероз аорты, склероз дуги.", {"aortic_atherosclerosis": 1, "aortic_arch_sclerosis": 1}),
    ("Склерозированная дуга.", {"aortic_arch_sclerosis": 1}),
    ("Дуга аорты с кальцинатами.", {"aortic_atherosclerosis": 1}),
    ("Обызвествление стенок дуги.", {"aortic_atherosclerosis": 1}),
    ("Кальциноз хрящей дуг рёбер.", {"calcinosis": 1}),  # the arcs of the ribs are not the aortic arch
    ("Обызвествление передних рёберных дуг.", {"calcinosis": 1}),
    ("Стенка аорты с кальцинатами. Кальцинаты в правом корне.", {"aortic_atherosclerosis": 1, "petrificates": 1}),
    ("Образование в нижней доле левого лёгкого 2 см.", {"nodule_mass": 1}),
    ("В корне справа образование с нечёткими контурами.", {"nodule_mass": 1}),
    ("Образование средостения.", {"nodule_mass": 1}),
    ("Лёгкие без очагов и образований.", {}),
    # Technique, not a finding.
    ("Тень сердца не расширена (гиповентиляция на вдохе).", {}),
    ("Гиповентиляция нижней доли справа.", {"other_finding": 1}),
]


@pytest.mark.parametrize(("text", "expected"), RU_MORE_SYNONYMS)
def test_ru_more_synonyms_and_places(text, expected):
    assert_labels(text, expected, RU)


EN_NORMAL_FORMS = [
    ("Without acute cardiopulmonary process.", {"normal": 1}),
    ("Negative for acute intrathoracic disease.", {"normal": 1}),
    ("No acute radiographic cardiopulmonary abnormality.", {"normal": 1}),
    ("Negative frontal and lateral chest radiographs.", {"normal": 1}),
    ("Normal PA and lateral radiographs of the chest.", {"normal": 1}),
    ("Heart size normal. Lungs clear. IMPRESSION: Negative.", {"normal": 1}),
    ("Unremarkable two-view chest radiograph.", {"normal": 1}),
    ("Chest x-ray without acute findings.", {"normal": 1}),
    ("Negative for pneumothorax.", {}),
]


@pytest.mark.parametrize(("text", "expected"), EN_NORMAL_FORMS)
def test_en_normal_study_forms(text, expected):
    assert_labels(text, expected, EN)


EN_STRUCTURE = [
    # Headings before a colon, "None" after one, devices removed, and the request, which is never labelled.
    ("Tubes and catheters: None. Lungs are clear.", {}),
    ("Heart: Moderately enlarged.", {"enlarged_heart": 1}),
    ("Pleura: No effusion.", {}),
    ("Interval removal of the right chest tube.", {}),
    ("Interval removal of the left chest tube, small apical pneumothorax.", {"pneumothorax": 1}),
    ("Endotracheal tube removed.", {}),
    ("INDICATION: Cough, evaluate for pneumonia. Lungs are clear.", {}),
    ("INDICATION: Fever FINDINGS: Right lower lobe pneumonia.", {"pneumonia": 1}),  # the next heading ends it
    ("Reason for exam: rule out pneumothorax.", {}),
    ("Evaluate for effusion.", {}),
    ("History of pneumonia. Lungs are clear.", {"pneumonia": 1}),
    ("Right hemidiaphragm elevated (?) No effusion.", {"dome_relaxation": NA}),
]


@pytest.mark.parametrize(("text", "expected"), EN_STRUCTURE)
def test_en_headings_removals_and_requests(text, expected):
    assert_labels(text, expected, EN)


EN_MORE = [
    ("Diffuse increase in the interstitial markings.", {"increased_lung_markings": 1}),
    ("Prominence of the interstitial markings.", {"increased_lung_markings": 1}),
    ("Chronic lung markings, unchanged.", {"increased_lung_markings": 1}),
    ("Bilateral nodular opacities.", {"focal_shadows": 1}),
    ("Nodular interstitial opacities.", {"focal_shadows": 1}),
    ("A 1 cm nodule in the left upper lobe.", {"nodule_mass": 1}),
    ("Calcified hilar and paratracheal lymph nodes.", {"petrificates": 1}),
    ("Calcified aortopulmonary window lymph node.", {"petrificates": 1}),
    ("Mild compression deformity of T11.", {"fracture": 1}),
    ("Right chest port with its tip in the SVC.", {"support_devices": 1}),
    ("Prominence of the main pulmonary artery.", {"vascular_roots": 1}),
    ("Pulmonary artery enlargement.", {"vascular_roots": 1}),
    ("Pulmonary artery segment is enlarged.", {"vascular_roots": 1}),
    ("Left hilar prominence, likely vascular.", {"vascular_roots": NA}),
    ("Degenerative changes are present in the lower thoracic spine.", {"spondylosis": 1}),
    # Bullae describe emphysema; alone they are other_finding. "Aspiration pneumonia" is pneumonia only.
    ("Emphysema with apical bullae.", {"emphysema": 1}),
    ("Bullous emphysema.", {"emphysema": 1}),
    ("Apical bulla.", {"other_finding": 1}),
    ("COPD with emphysema.", {"emphysema": 1}),
    ("COPD.", {"other_finding": 1}),
    ("The cardiothoracic ratio is increased.", {"enlarged_heart": 1}),
    ("The aorta is mildly dilated and tortuous.", {"aorta_unfolded": 1}),
    ("Honeycombing at both bases.", {"fibrosis": 1}),
    ("Compatible with aspiration pneumonia.", {"pneumonia": NA}),
    ("Aspiration.", {"other_finding": 1}),
]


@pytest.mark.parametrize(("text", "expected"), EN_MORE)
def test_en_more_synonyms_and_forms(text, expected):
    assert_labels(text, expected, EN)


EN_HEDGE_PLACE = [
    # A sign explained away as an artefact is itself in doubt.
    ("Nodular opacity at the left base, likely a nipple shadow.", {"focal_shadows": NA}),
    ("Curvature of the spine, probably positional.", {"scoliosis": NA}),
    ("Focal opacity at the left base, which may represent atelectasis.", {"focal_shadows": 1, "atelectasis": NA}),
    # A hedge that ends its clause looks back; one carried on by "as is" reaches the next item.
    ("Pneumonia, likely.", {"pneumonia": NA}),
    ("The heart is enlarged, possibly.", {"enlarged_heart": NA}),
    ("Pneumonia is possible, as is aspiration.", {"pneumonia": NA, "other_finding": NA}),
    ("Aspiration is suspected, as is a small effusion.", {"other_finding": NA, "pleural_effusion": NA}),
    ("The heart is enlarged, as is the aorta.", {"enlarged_heart": 1}),  # "as is" after no hedge hedges nothing
]


@pytest.mark.parametrize(("text", "expected"), EN_HEDGE_PLACE)
def test_en_hedge_goes_with_its_own_finding(text, expected):
    assert_labels(text, expected, EN)


# --- vocabulary errors: file, line and term ----------------------------------------------------------------------


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "vocab.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        (
            "findings:\n  scoliosis:\n    - 'сколиоз'\n    - 'сколи(оз'\n",
            4,
            ["findings.scoliosis", "сколи(оз", "bad regex"],
        ),
        ("findings:\n  scoliosis: ['сколиоз']\n  big_heart: ['кардиомегали']\n", 3, ["big_heart", "not a canonical"]),
        (
            "findings:\n  scoliosis:\n    - 'сколиоз'\n  kyphosis:\n    - 'сколиоз'\n",
            5,
            ["duplicate term", "сколиоз", ":3"],
        ),
        ("findings:\n  scoliosis: ['сколиоз']\n  scoliosis: ['кифоз']\n", 3, ["duplicate key", "scoliosis"]),
        ("macros: {and: '\\s+'}\nfindings:\n  scoliosis:\n    - 'сколиоз{or}'\n", 4, ["unknown macro", "{or}"]),
        ("abbreviations:\n  '\\b(ао)\\b': 'аорта'\n", 2, ["capturing group", "(ао)"]),
        ("normal:\n  - 'норма'\nignore:\n  - 'норма'\n", 4, ["duplicate term", "норма"]),
    ],
)
def test_vocabulary_error_names_file_line_and_term(tmp_path, text, line, fragments):
    path = write(tmp_path, text)
    with pytest.raises(CxrflowError) as error:
        load_vocabulary(path, KEYS)
    message = str(error.value)
    assert "\n" not in message
    assert f"{path}:{line}:" in message, message
    for fragment in fragments:
        assert fragment in message, message
