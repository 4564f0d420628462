"""A synthetic chest X-ray archive: images, Russian free-text notes and a truth table, for demos and tests.

The archive imitates what a hospital export looks like, so that every later stage (ingest, quality,
labelling, cohorts, training) can run end to end without real patient data:

- ``images/<image_id>.dcm|png``: drawn radiographs (body, lungs, heart, aortic knob, spine, ribs, domes),
  as DICOM (12-bit, MONOCHROME2 or MONOCHROME1), 8-bit PNG or 16-bit PNG.
- ``annotations.csv``: one row per image with the radiologist's note in Russian.
- ``truth.csv``: what each note really says per key, and whether the image was spoiled on purpose.
  Only tests read it; the pipeline must recover the labels from the notes.

Each of the nine target findings draws a sign that stays visible at 64 x 64 px, so a small classifier can
learn it. Everything is deterministic for a seed: each patient and each image draws from its own
``SeedSequence(seed, spawn_key=...)``, so adding patients or changing one drawing leaves the others alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cxrflow.errors import CxrflowError

TARGETS = (
    "enlarged_heart",
    "enlarged_heart_shadow",
    "aorta_unfolded",
    "aorta_compacted",
    "aortic_atherosclerosis",
    "dome_relaxation",
    "aortic_arch_sclerosis",
    "scoliosis",
    "vascular_roots",
)
CONFOUNDERS = ("pneumosclerosis", "emphysema", "pneumonia", "focal_shadows")
# Order follows config/labels/keys.yaml, so truth.csv reads like a catalog.
TRUTH_KEYS = TARGETS + CONFOUNDERS
QUALITIES = ("ok", "dark", "bright", "lines", "blank")
FORMATS = ("dicom_monochrome2", "dicom_monochrome1", "png8", "png16")

AFFIRMED = {
    "enlarged_heart": (
        "Сердце расширено влево.",
        "Кардиомегалия.",
        "Расширение сердца.",
        "Сердце увеличено в размерах.",
    ),
    "enlarged_heart_shadow": ("Тень сердца расширена.", "Расширение тени сердца.", "Сердечная тень расширена влево."),
    "aorta_unfolded": ("Аорта развёрнута.", "Аорта развернута.", "Развёрнутость аорты.", "Развернутая аорта."),
    "aorta_compacted": ("Аорта уплотнена.", "Уплотнение аорты.", "Стенки аорты уплотнены."),
    "aortic_atherosclerosis": ("Атеросклероз аорты.", "Атеросклеротические изменения аорты.", "Атероматоз аорты."),
    "dome_relaxation": (
        "Релаксация правого купола диафрагмы.",
        "Релаксация купола диафрагмы.",
        "Правый купол диафрагмы релаксирован.",
    ),
    "aortic_arch_sclerosis": (
        "Склероз дуги аорты.",
        "Склеротические изменения дуги аорты.",
        "Дуга аорты склерозирована.",
    ),
    "scoliosis": (
        "Сколиоз грудного отдела позвоночника.",
        "S-образный сколиоз.",
        "Сколиотическая деформация позвоночника.",
    ),
    "vascular_roots": ("Корни сосудистые.", "Корни лёгких сосудистого типа.", "Сосудистые корни."),
    "pneumonia": (
        "Инфильтрация в нижней доле справа, пневмония.",
        "Правосторонняя нижнедолевая пневмония.",
        "Признаки пневмонии.",
    ),
    "emphysema": (
        "Эмфизема лёгких.",
        "Эмфизематозные изменения лёгких.",
        "Повышенная воздушность лёгочной ткани, эмфизема.",
    ),
    "focal_shadows": ("Очаговые тени в верхней доле слева.", "Очаговая тень справа.", "Единичные очаговые тени."),
    "pneumosclerosis": ("Пневмосклероз.", "Диффузный пневмосклероз.", "Явления пневмосклероза."),
}
NEGATED = (
    ("Сердце не расширено.", "enlarged_heart"),
    ("Без признаков кардиомегалии.", "enlarged_heart"),
    ("Аорта не развёрнута.", "aorta_unfolded"),
    ("Сколиоза не выявлено.", "scoliosis"),
    ("Очаговых теней не выявлено.", "focal_shadows"),
    ("Пневмонии нет.", "pneumonia"),
)
UNCERTAIN = {"pneumonia": "Возможно, пневмония.", "focal_shadows": "Нельзя исключить очаговые тени."}
NORMAL = (
    "Без патологических изменений.",
    "Органы грудной клетки без патологии.",
    "Норма.",
    # A normal-study phrase closes it: organ-by-organ negations alone are not a normal study (cxrflow.labels).
    "Лёгкие без очаговых и инфильтративных теней. Сердце и аорта в норме. Заключение: без патологии.",
)
FILLERS = ("Синусы свободны.", "Корни структурны.", "Купола диафрагмы чёткие.")

# Roughly the order a radiologist dictates in: lungs, roots, heart, aorta, diaphragm, spine.
_DICTATION_ORDER = {
    "emphysema": 0, "pneumonia": 1, "focal_shadows": 2, "pneumosclerosis": 3, "vascular_roots": 4,
    "enlarged_heart": 5, "enlarged_heart_shadow": 6, "aorta_unfolded": 7, "aorta_compacted": 8,
    "aortic_atherosclerosis": 9, "aortic_arch_sclerosis": 10, "dome_relaxation": 11, "scoliosis": 12,
}  # fmt: skip

_SURNAMES = (
    ("Иванов", "Иванова"), ("Смирнов", "Смирнова"), ("Кузнецов", "Кузнецова"), ("Попов", "Попова"),
    ("Соколов", "Соколова"), ("Лебедев", "Лебедева"), ("Козлов", "Козлова"), ("Новиков", "Новикова"),
    ("Морозов", "Морозова"), ("Волков", "Волкова"),
)  # fmt: skip
_GIVEN = {"M": ("Иван", "Пётр", "Сергей", "Алексей", "Дмитрий"), "F": ("Мария", "Анна", "Елена", "Ольга", "Наталья")}
_PATRONYMIC = {"M": ("Иванович", "Петрович", "Сергеевич"), "F": ("Ивановна", "Петровна", "Сергеевна")}
_HOSPITALS = ("ГБУЗ Городская клиническая больница №7", "ГБУЗ Областная больница №2", "Поликлиника №13")
_DOCTORS = ("Петров^Андрей^Викторович", "Сидорова^Ирина^Павловна", "Орлов^Максим^Олегович")

_STUDY_DAY0 = dt.date(2018, 1, 1)
_DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def generate(out_dir: Path, n_patients: int, seed: int, image_size: int = 256, bad_fraction: float = 0.03,
             intensity_gamma: float = 1.0) -> dict:
    """Write a synthetic archive under ``out_dir`` and return counts of what was written.

    The same arguments give byte-identical files. The first ``k`` patients do not depend on ``n_patients``.
    ``intensity_gamma`` imitates another site's exposure (an external test set, cxrflow.external): every image's
    intensities in [0, 1] are raised to this power (< 1 brighter and flatter, > 1 darker). It is a power, not an
    offset, so that the per-image percentile clipping of preprocessing does not undo it; 1.0 changes nothing.
    """
    if int(image_size) < 32:
        raise CxrflowError(f"synthetic: image_size must be at least 32 px, got {image_size}")
    if not intensity_gamma > 0:
        raise CxrflowError(f"synthetic: intensity_gamma must be positive, got {intensity_gamma}")
    studies = plan_archive(n_patients, seed, bad_fraction)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for study in studies:
        image = render(study["drawn"], _rng(seed, *study["key"], 1), int(image_size), sex=study["sex"])
        image = spoil(image, study["quality"], _rng(seed, *study["key"], 3))
        if intensity_gamma != 1.0:
            image = np.power(image, np.float32(intensity_gamma))
        if study["format"].startswith("dicom"):
            _write_dicom(out_dir / study["file"], image, study, seed)
        else:
            _write_png(out_dir / study["file"], image, bits=8 if study["format"] == "png8" else 16)

    annotations = pd.DataFrame(
        {
            "image_id": [s["image_id"] for s in studies],
            "patient_id": [s["patient_id"] for s in studies],
            "sex": [{"F": "Ж", "M": "М"}[s["sex"]] for s in studies],
            "age": [s["age"] for s in studies],
            "view": "PA",
            "file": [s["file"] for s in studies],
            "study_date": [s["study_date"].isoformat() for s in studies],
            "annotation": [s["note"] for s in studies],
        }
    )
    truth = truth_table(studies)
    annotations.to_csv(out_dir / "annotations.csv", index=False, encoding="utf-8", lineterminator="\n")
    truth.to_csv(out_dir / "truth.csv", index=False, encoding="utf-8", lineterminator="\n")
    formats = dict.fromkeys(FORMATS, 0)
    for study in studies:
        formats[study["format"]] += 1
    return {
        "n_patients": int(n_patients),
        "n_images": len(studies),
        "formats": formats,
        "positives": {key: int((truth[key] == 1).sum()) for key in TRUTH_KEYS},
        "n_bad": int((truth["quality"] != "ok").sum()),
        "quality": {q: int((truth["quality"] == q).sum()) for q in QUALITIES},
    }


def plan_archive(n_patients: int, seed: int, bad_fraction: float = 0.03) -> list[dict]:
    """Everything about the archive except the pixels: patients, findings, notes, formats, qualities.

    Cheap enough to run for thousands of patients, so tests can check label frequencies without drawing.
    """
    if int(n_patients) < 1:
        raise CxrflowError(f"synthetic: n_patients must be at least 1, got {n_patients}")
    if not 0.0 <= float(bad_fraction) <= 1.0:
        raise CxrflowError(f"synthetic: bad_fraction must lie in [0, 1], got {bad_fraction}")
    id_offset = int(np.random.SeedSequence(int(seed)).generate_state(1)[0]) % 10**8
    studies = []
    for p in range(int(n_patients)):
        patient = _draw_patient(seed, p, id_offset)
        for k in range(patient["n_images"]):
            image_id = hashlib.sha256(f"cxrflow-synthetic:{seed}:{p}:{k}".encode()).hexdigest()[:12]
            labels, drawn, note = _draw_study(_rng(seed, p, k, 0))
            meta = _rng(seed, p, k, 2)
            kind = _pick_format(meta)
            studies.append(
                {
                    **patient,
                    "key": (p, k),
                    "image_id": image_id,
                    "labels": labels,
                    "drawn": drawn,
                    "note": note,
                    "quality": _draw_quality(meta, bad_fraction),
                    "format": kind,
                    "file": f"images/{image_id}.{'dcm' if kind.startswith('dicom') else 'png'}",
                    "study_date": _STUDY_DAY0 + dt.timedelta(days=int(meta.integers(0, 5 * 365))),
                    "study_time": f"{int(meta.integers(8, 20)):02d}{int(meta.integers(0, 60)):02d}00",
                    "modality": "DX" if meta.random() < 0.5 else "CR",
                    "accession": f"A{int(meta.integers(10**7, 10**8))}",
                }
            )
    if len({s["image_id"] for s in studies}) != len(studies):  # a 48-bit hash collision; vanishingly rare
        raise CxrflowError(f"synthetic: image_id collision for seed {seed}; choose another seed")
    return studies


def truth_table(studies: list[dict]) -> pd.DataFrame:
    """What each note says per key (1, 0, or missing when the note is uncertain), and the image quality."""
    truth = pd.DataFrame([{"image_id": s["image_id"], **s["labels"], "quality": s["quality"]} for s in studies])
    for key in TRUTH_KEYS:
        truth[key] = truth[key].astype("Int8")
    return truth


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=key)))


def _draw_patient(seed: int, p: int, id_offset: int) -> dict:
    rng = _rng(seed, p)
    sex = "F" if rng.random() < 0.55 else "M"
    age = int(rng.integers(20, 91))
    surname = _SURNAMES[rng.integers(len(_SURNAMES))][sex == "F"]
    name = f"{surname}^{_GIVEN[sex][rng.integers(5)]}^{_PATRONYMIC[sex][rng.integers(3)]}"
    birth = dt.date(2020 - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    return {
        # An affine map with a multiplier coprime to 10**8: unique ids that do not look sequential.
        "patient_id": f"{(p * 7919 * 10007 + id_offset) % 10**8:08d}",
        "sex": sex,
        "age": age,
        "n_images": int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2])),
        "name": name,
        "birth_date": birth.strftime("%Y%m%d"),
        "institution": _HOSPITALS[rng.integers(len(_HOSPITALS))],
        "physician": _DOCTORS[rng.integers(len(_DOCTORS))],
    }


def _draw_study(rng: np.random.Generator) -> tuple[dict, set[str], str]:
    """Pick one image's findings and write its note. Returns (truth labels, findings to draw, note)."""
    labels: dict = dict.fromkeys(TRUTH_KEYS, 0)
    drawn: set[str] = set()
    if rng.random() >= 0.35:
        n_targets = 1 if rng.random() < 0.7 else 2
        for key in rng.choice(TARGETS, size=n_targets, replace=False):
            labels[str(key)] = 1
            drawn.add(str(key))
    uncertain = []
    if rng.random() < 0.15:
        n_conf = 1 if rng.random() < 0.85 else 2
        for key in rng.choice(CONFOUNDERS, size=n_conf, replace=False):
            key = str(key)
            if key in UNCERTAIN and rng.random() < 0.3:
                labels[key] = None
                uncertain.append(key)
                if rng.random() < 0.5:  # a hedged call sometimes has the finding behind it
                    drawn.add(key)
            else:
                labels[key] = 1
                drawn.add(key)

    positives = sorted((k for k in TRUTH_KEYS if labels[k] == 1), key=_DICTATION_ORDER.get)
    sentences = [str(rng.choice(AFFIRMED[k])) for k in positives]
    sentences += [UNCERTAIN[k] for k in uncertain]
    if not positives and not uncertain:
        sentences.append(str(rng.choice(NORMAL)))
    # "Сердце не расширено." beside "Тень сердца расширена." would deny what the image shows.
    negatable = [
        i
        for i, (_, key) in enumerate(NEGATED)
        if labels[key] == 0 and not (key == "enlarged_heart" and labels["enlarged_heart_shadow"] == 1)
    ]
    n_neg = min(len(negatable), int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15])))
    for i in sorted(rng.choice(negatable, size=n_neg, replace=False)) if n_neg else []:
        sentences.append(NEGATED[i][0])
    n_fill = int(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2]))
    for filler in rng.choice(FILLERS, size=n_fill, replace=False):
        sentences.insert(int(rng.integers(0, len(sentences) + 1)), str(filler))
    return labels, drawn, " ".join(sentences)


def _draw_quality(rng: np.random.Generator, bad_fraction: float) -> str:
    if rng.random() >= bad_fraction:
        return "ok"
    return str(rng.choice(QUALITIES[1:]))


def _pick_format(rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.4:
        return "dicom_monochrome1" if rng.random() < 0.25 else "dicom_monochrome2"
    return "png8" if u < 0.8 else "png16"


# --------------------------------------------------------------------------------------------------
# Drawing. Coordinates are fractions of the image side: x runs left to right on the image (the patient's
# right is on the image's left, as on a PA film), y runs top to bottom. Everything is first drawn as a
# density map (bright = dense), then exposed (gain, gamma, offset), blurred and made noisy.


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Full (size, size) coordinate grids, for drawing small stamps inside a bounding box."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


@lru_cache(maxsize=8)
def _axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A (size, 1) column of y and a (1, size) row of x; broadcasting keeps one-axis terms cheap."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None].copy(), c[None, :].copy()


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """A soft inside-mask from a signed distance (positive inside): 0 outside, 1 inside, linear across edge."""
    return np.clip(0.5 + d / np.float32(edge), 0.0, 1.0)


def _ellipse(y, x, cy, cx, b, a, edge):
    r = np.sqrt(np.square((x - cx) / a) + np.square((y - cy) / b))
    return _ramp((1.0 - r) * min(a, b), edge)


def _stamp_segment(acc, size, p0, p1, half_width, value, edge):
    """Max-combine a thick line segment from p0=(y, x) to p1 into acc (only its bounding box is computed)."""
    (y0, x0), (y1, x1) = p0, p1
    pad = half_width + edge
    r0 = max(int((min(y0, y1) - pad) * size), 0)
    r1 = min(int((max(y0, y1) + pad) * size) + 2, size)
    c0 = max(int((min(x0, x1) - pad) * size), 0)
    c1 = min(int((max(x0, x1) + pad) * size) + 2, size)
    if r0 >= r1 or c0 >= c1:
        return
    gy, gx = _grid(size)
    yy, xx = gy[r0:r1, c0:c1], gx[r0:r1, c0:c1]
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-12), 0.0, 1.0)
    d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
    np.maximum(acc[r0:r1, c0:c1], value * _ramp(half_width - d, edge), out=acc[r0:r1, c0:c1])


def _stamp_disk(acc, size, cy, cx, r, value, edge):
    _stamp_segment(acc, size, (cy, cx), (cy, cx), r, value, edge)


@lru_cache(maxsize=16)
def _value_noise_weights(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    pos = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(pos.astype(np.intp), cells - 1)
    frac = (pos - i0).astype(np.float32)
    return i0, frac * frac * (3 - 2 * frac)  # Hermite fade: smooth, no creases at the nodes


def _smooth_noise(rng, size, cells):
    """A smooth random field (value noise) with unit spread and features about 1/cells of the side.

    Plain indexing rather than a matrix product: BLAS threads fight over shared cores and cost more
    than they save on arrays this small.
    """
    i0, fade = _value_noise_weights(size, cells)
    nodes = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    rows = nodes[i0] + fade[:, None] * (nodes[i0 + 1] - nodes[i0])
    field = rows[:, i0] + fade[None, :] * (rows[:, i0 + 1] - rows[:, i0])
    return field / (field.std() + 1e-6)


def sample_anatomy(findings: set[str], rng: np.random.Generator, sex: str = "F") -> dict:
    """Shape parameters for one image; each finding moves its own parameters away from the normal range."""
    unknown = set(findings) - set(TRUTH_KEYS)
    if unknown:
        raise CxrflowError(f"synthetic: cannot draw unknown finding(s) {sorted(unknown)}")
    # Two streams: the normal anatomy and exposure, then the signs. The same seed thus gives the same
    # patient with or without a finding, and tests can compare the pair pixel by pixel.
    rng, sign_rng = rng.spawn(2)
    u = rng.uniform
    a: dict = {"sex": sex, "findings": frozenset(findings)}
    a["body_hw"] = u(0.44, 0.48)
    a["lung_off"], a["lung_a"], a["lung_top"] = u(0.195, 0.21), u(0.16, 0.175), u(0.08, 0.11)
    a["air"] = u(0.28, 0.33)
    a["dome_r"] = u(0.68, 0.72)
    a["dome_l"] = a["dome_r"] + u(0.015, 0.04)
    a["dome_curve"] = u(0.07, 0.10)
    a["shift"] = rng.normal(0.0, 0.004)
    a["heart_cy"], a["heart_b"] = u(0.63, 0.65), u(0.11, 0.13)
    a["heart_r"], a["heart_l"] = u(0.09, 0.115), u(0.19, 0.225)
    a["knob_dx"], a["knob_y"], a["knob_r"] = u(0.07, 0.08), u(0.285, 0.31), u(0.028, 0.034)
    a["knob_extra"] = u(0.03, 0.07)
    a["spine_amp"] = rng.normal(0.0, 0.003)
    a["spine_period"], a["spine_phase"] = u(0.75, 0.95), u(0.0, 1.0)
    a["rib_spacing"], a["rib_phase"], a["rib_density"] = u(0.07, 0.08), u(0.0, 1.0), u(0.08, 0.12)
    a["hilum_dx"], a["hilum_y"] = u(0.10, 0.12), u(0.43, 0.46)
    a["hilum_r"], a["hilum_density"] = u(0.02, 0.026), u(0.08, 0.12)
    a["hilum_branches"] = []
    a["gain"], a["gamma"], a["offset"] = u(0.85, 1.15), u(0.8, 1.25), u(-0.04, 0.06)
    a["noise"], a["tilt"], a["tilt_axis"] = u(0.008, 0.02), u(-0.05, 0.05), int(rng.integers(2))

    rng = sign_rng
    u = rng.uniform

    thorax_hw = a["lung_off"] + a["lung_a"]
    if "emphysema" in findings:  # hyperlucent, larger lungs; low, flat domes; a narrow, hanging heart
        a["air"] = u(0.40, 0.45)
        a["lung_a"] += 0.01
        a["lung_top"] -= 0.015
        a["dome_r"], a["dome_curve"] = u(0.80, 0.83), u(0.03, 0.05)
        a["dome_l"] = a["dome_r"] + u(0.0, 0.015)
        a["heart_r"] *= 0.85
        a["heart_l"] *= 0.85
        a["heart_cy"] += 0.03
    if "enlarged_heart" in findings:  # cardiothoracic ratio 0.60-0.68, growing to the patient's left
        ctr = u(0.60, 0.68)
        a["heart_r"] = u(0.11, 0.13)
        a["heart_l"] = max(a["heart_l"], ctr * 2 * thorax_hw - a["heart_r"])
        a["heart_b"] *= 1.1
    if "enlarged_heart_shadow" in findings:  # widened to both sides and taller
        a["heart_r"] = max(a["heart_r"], u(0.165, 0.19))
        a["heart_l"] = max(a["heart_l"], u(0.27, 0.30))
        a["heart_b"] = max(a["heart_b"], u(0.165, 0.185))
        a["heart_cy"] -= 0.02
    if "dome_relaxation" in findings:  # the right dome stands high
        a["dome_r"] -= u(0.13, 0.18)
    if "scoliosis" in findings:  # an S-curve, the mediastinum pushed slightly to the convex side
        a["spine_amp"] = rng.choice([-1.0, 1.0]) * u(0.055, 0.08)
        a["shift"] += 0.25 * a["spine_amp"]
    if "aorta_unfolded" in findings:  # the knob bulges far out and up
        a["knob_dx"] += u(0.05, 0.07)
        a["knob_y"] -= u(0.03, 0.045)
        a["knob_r"] = u(0.045, 0.055)
    if "aorta_compacted" in findings:  # a dense knob with a denser rim
        a["knob_extra"] = u(0.30, 0.40)
        a["knob_rim"] = u(0.15, 0.25)
    if "aortic_atherosclerosis" in findings:  # calcified crescent on the knob's outer rim, plus dots
        centre = u(-70.0, -20.0)  # degrees; 0 = lateral, -90 = up
        span = u(70.0, 130.0)
        a["calc_arc"] = (np.deg2rad(centre - span / 2), np.deg2rad(centre + span / 2), u(0.014, 0.02), u(0.55, 0.7))
        a["calc_dots"] = [(u(-150.0, 60.0), u(0.008, 0.012)) for _ in range(int(rng.integers(2, 5)))]
    if "aortic_arch_sclerosis" in findings:  # a thick dense outline of the whole arch
        a["arch"] = (u(0.016, 0.022), u(0.45, 0.55))
    if "vascular_roots" in findings:  # large dense hila with thick branches
        a["hilum_r"], a["hilum_density"] = u(0.045, 0.055), u(0.28, 0.34)
        for side in (-1.0, 1.0):
            for _ in range(int(rng.integers(4, 7))):
                angle = u(-40.0, 80.0)  # degrees below the horizontal, pointing outwards
                a["hilum_branches"].append((side, np.deg2rad(angle), u(0.08, 0.15), u(0.009, 0.013), u(0.22, 0.28)))
    if "pneumonia" in findings:
        side = -1.0 if rng.random() < 0.7 else 1.0  # most often the right lower lobe
        a["pneumonia"] = (side, u(0.55, 0.65), u(0.08, 0.11), u(0.06, 0.08), u(0.25, 0.35))
    if "focal_shadows" in findings:
        a["nodules"] = []
        for _ in range(int(rng.integers(3, 9))):
            side = rng.choice([-1.0, 1.0])
            a["nodules"].append((u(a["lung_top"] + 0.08, 0.6), side, u(0.3, 0.85), u(0.010, 0.017), u(0.22, 0.3)))
    if "pneumosclerosis" in findings:
        a["reticular"] = u(0.06, 0.09)

    return a


def render(
    findings: set[str], rng: np.random.Generator, size: int, sex: str = "F", with_layers: bool = False
) -> np.ndarray | tuple[np.ndarray, dict]:
    """Draw one radiograph (float32, 0 = black, 1 = white, MONOCHROME2 sense) showing ``findings``.

    With ``with_layers`` it also returns the anatomy parameters and the masks used (heart, lungs, knob,
    spine centre line per row), so that tests can measure each sign.
    """
    # Separate streams for anatomy, textures and pixel noise, so that adding a finding changes its sign
    # and nothing else.
    anatomy_rng, rng, noise_rng = rng.spawn(3)
    a = sample_anatomy(findings, anatomy_rng, sex)
    f32 = np.float32
    y, x = _axes(size)  # (size, 1) and (1, size)
    edge = 2.0 / size
    mid = 0.5 + a["shift"]
    spine_c = mid + a["spine_amp"] * np.sin(2 * np.pi * (y - a["spine_phase"]) / a["spine_period"], dtype=f32)
    w = np.abs(x - f32(0.5))

    # Soft tissue of the body, with shoulders that slope up to the neck.
    body_hw = 0.10 + (a["body_hw"] - 0.10) * np.sqrt(np.sqrt(np.clip((y + 0.01) / 0.14, 0, 1)))
    body = _ramp(body_hw - w, edge * 2)
    dens = 0.04 + 0.40 * body

    # Diaphragm domes: parabolas peaking near the middle of each hemithorax; below them, liver and spleen
    # (and a gas bubble in the stomach).
    dome_r = a["dome_r"] + a["dome_curve"] * np.square((x - (0.5 - a["lung_off"])) / 0.17)
    dome_l = a["dome_l"] + a["dome_curve"] * np.square((x - (0.5 + a["lung_off"])) / 0.17)
    dome = np.where(x < mid, dome_r, dome_l).astype(f32)
    above_dome = _ramp(dome - y, edge)
    below = (1 - above_dome) * body
    bubble = _ellipse(y, x, a["dome_l"] + 0.06, 0.5 + a["lung_off"] + 0.02, 0.03, 0.05, edge * 4)
    dens += below * (0.06 - 0.08 * bubble)

    # Lungs: a rounded apex beside the neck, a medial border along the mediastinum, a lateral wall that
    # widens downwards, and a floor cut by the dome.
    thorax_hw = a["lung_off"] + a["lung_a"]
    v = np.sqrt(np.clip((y - a["lung_top"]) / 0.45, 0.0, 1.0))
    lateral_wall = 0.12 + (thorax_hw - 0.12) * v**0.8 + 0.02 * np.clip((y - 0.55) / 0.3, 0, 1)
    medial_wall = 0.12 - 0.10 * v
    lungs = _ramp(lateral_wall - w, edge * 2) * _ramp(w - medial_wall, edge * 2) * _ramp(y - a["lung_top"], edge)
    lungs *= above_dome

    # Mediastinum, heart and aortic knob push the lungs aside.
    med_hw = 0.05 + 0.02 * np.clip((y - 0.12) / 0.25, 0, 1)
    med = _ramp(med_hw - np.abs(x - (0.5 * mid + 0.5 * spine_c)), edge * 2) * _ramp(y - 0.02, edge)
    hx = np.where(x > mid, f32(a["heart_l"]), f32(a["heart_r"]))
    # The heart's lower half is taller, so that it sits on the domes instead of floating above them.
    hy = np.where(y > a["heart_cy"], f32(a["heart_b"] * 1.6), f32(a["heart_b"]))
    heart = _ramp((1 - np.sqrt(np.square((x - mid) / hx) + np.square((y - a["heart_cy"]) / hy))) * 0.12, edge * 2)
    kx, ky, kr = mid + a["knob_dx"], a["knob_y"], a["knob_r"]
    knob = np.zeros((size, size), f32)
    _stamp_disk(knob, size, ky, kx, kr, 1.0, edge * 2)
    _stamp_segment(knob, size, (ky + 0.02, mid), (ky, kx), kr * 0.8, 1.0, edge * 2)
    solid = np.maximum(np.maximum(med, heart), knob)
    lungs *= 1 - solid
    dens += 0.04 * heart + a["knob_extra"] * knob
    if "knob_rim" in a:
        rim = np.zeros_like(knob)
        _stamp_disk(rim, size, ky, kx, kr * 1.05, 1.0, edge)
        inner = np.zeros_like(knob)
        _stamp_disk(inner, size, ky, kx, kr * 0.6, 1.0, edge)
        dens += a["knob_rim"] * (rim - inner)

    # Lung markings: faint vessels fanning out of the hila, plus a smooth mottle.
    vessels = np.zeros((size, size), f32)
    for side in (-1.0, 1.0):
        hy0, hx0 = a["hilum_y"], mid + side * a["hilum_dx"]
        for ang in np.deg2rad(rng.uniform(-60, 80, 7)):
            length = rng.uniform(0.12, 0.22)
            end = (hy0 + length * np.sin(ang), hx0 + side * length * np.cos(ang))
            _stamp_segment(vessels, size, (hy0, hx0), end, 0.004, 1.0, edge)
    mottle = _smooth_noise(rng, size, 12)
    dens += lungs * (0.05 * vessels - a["air"] * (1 - 0.08 * mottle))

    # Hila (and, in vascular_roots, thick branches).
    roots = np.zeros((size, size), f32)
    for side in (-1.0, 1.0):
        hy0, hx0 = a["hilum_y"], mid + side * a["hilum_dx"]
        top, bottom = (hy0 - a["hilum_r"] * 0.6, hx0), (hy0 + a["hilum_r"] * 0.6, hx0 + side * 0.01)
        _stamp_segment(roots, size, top, bottom, a["hilum_r"], a["hilum_density"], edge * 2)
    for side, ang, length, width, value in a["hilum_branches"]:
        hy0, hx0 = a["hilum_y"], mid + side * a["hilum_dx"]
        end = (hy0 + length * np.sin(ang), hx0 + side * length * np.cos(ang))
        _stamp_segment(roots, size, (hy0, hx0), end, width, value, edge)
        fork = (0.5 * (hy0 + end[0]), 0.5 * (hx0 + end[1]))
        twig = ang + np.deg2rad(35 if rng.random() < 0.5 else -35)
        tip = (fork[0] + 0.5 * length * np.sin(twig), fork[1] + side * 0.5 * length * np.cos(twig))
        _stamp_segment(roots, size, fork, tip, width * 0.7, value * 0.8, edge)
    dens += roots

    # Spine: a column of vertebral bodies and darker disc spaces, along the (possibly curved) centre line.
    vert = 0.7 + 0.3 * np.clip(1.5 * np.cos(2 * np.pi * (y - a["rib_phase"]) / 0.045) + 0.5, 0, 1)
    lateral = np.abs(x - spine_c)
    dens += (0.12 * vert) * _ramp(0.032 - lateral, edge * 2) * body

    # Ribs: posterior ribs arch out of the spine and fall laterally; fainter anterior ribs fall medially.
    # They show mostly against the lungs; over the heart and belly they are faint.
    in_chest = _ramp(thorax_hw + 0.03 - w, edge * 3) * _ramp(dome + 0.02 - y, edge * 3) * _ramp(lateral - 0.035, edge)
    in_chest *= 0.3 + 0.7 * lungs
    # Phase along the rib cage; its fractional part says where between two ribs a pixel lies
    # (x - floor(x) is several times faster than np.mod for floats).
    phase = lateral * (0.08 - 1.4 * lateral)
    phase += y - a["lung_top"] + 0.02
    phase *= 1 / a["rib_spacing"]
    phase += a["rib_phase"]
    phase -= np.floor(phase)
    phase -= 0.5
    post_band = np.clip(1.3 - np.abs(phase) * (1 / 0.16), 0, 1)
    phase = (y - 0.10 - 0.55 * thorax_hw) + 0.55 * lateral
    phase *= 1 / (a["rib_spacing"] * 1.15)
    phase += a["rib_phase"]
    phase -= np.floor(phase)
    phase -= 0.5
    ant_band = np.clip(1 - np.abs(phase) * (1 / 0.15), 0, 1)
    ant_band *= _ramp(lateral - 0.14, 0.04)
    post_band *= a["rib_density"]
    post_band += 0.04 * ant_band
    post_band *= in_chest
    dens += post_band

    # Clavicles, and the trachea as a dark air column above the carina.
    bones = np.zeros((size, size), f32)
    for side in (-1.0, 1.0):
        inner, bend, outer = (0.19, 0.5 + side * 0.035), (0.165, 0.5 + side * 0.17), (0.10, 0.5 + side * 0.31)
        _stamp_segment(bones, size, inner, bend, 0.011, 0.13, edge)
        _stamp_segment(bones, size, bend, outer, 0.010, 0.13, edge)
    dens += bones
    dens -= 0.10 * _ramp(0.013 - np.abs(x - (0.5 * mid + 0.5 * spine_c)), edge) * _ramp(0.31 - y, edge * 2) * body

    if a["sex"] == "F":  # breast shadows over the lower lung fields
        for side in (-1.0, 1.0):
            dens += 0.06 * _ellipse(y, x, 0.78, 0.5 + side * 0.27, 0.10, 0.16, edge * 8)

    # Aortic calcifications and arch sclerosis.
    if "calc_arc" in a:
        lo, hi, thick, value = a["calc_arc"]
        calc = np.zeros((size, size), f32)
        # A crescent is a thick arc: stamp short chords along it.
        angles = np.linspace(lo, hi, 12)
        rr = kr - thick / 2
        for t0, t1 in zip(angles[:-1], angles[1:]):
            p0 = (ky + rr * np.sin(t0), kx + rr * np.cos(t0))
            p1 = (ky + rr * np.sin(t1), kx + rr * np.cos(t1))
            _stamp_segment(calc, size, p0, p1, thick / 2, value, edge)
        for deg, r in a["calc_dots"]:
            t = np.deg2rad(deg)
            _stamp_disk(calc, size, ky + kr * np.sin(t), kx + kr * np.cos(t), r, value, edge)
        dens += calc
    if "arch" in a:
        thick, value = a["arch"]
        left_end = mid - 0.035
        acx, acy = 0.5 * (left_end + kx), ky + 0.01
        ar = 0.5 * (kx - left_end) + 0.01
        arch = np.zeros((size, size), f32)
        angles = np.linspace(np.pi, 2 * np.pi, 16)  # the upper half circle (y grows downwards)
        for t0, t1 in zip(angles[:-1], angles[1:]):
            p0 = (acy + ar * np.sin(t0), acx + ar * np.cos(t0))
            p1 = (acy + ar * np.sin(t1), acx + ar * np.cos(t1))
            _stamp_segment(arch, size, p0, p1, thick / 2, value, edge)
        dens += arch

    # Lung confounders.
    if "pneumonia" in a:
        side, cy, ry, rx, value = a["pneumonia"]
        region = _ellipse(y, x, cy, 0.5 + side * (a["lung_off"] + 0.02), ry, rx * 1.6, edge * 10)
        patch = _ramp(_smooth_noise(rng, size, 16) + 0.3, 0.6)
        dens += value * region * patch * lungs
    if "nodules" in a:
        spots = np.zeros((size, size), f32)
        for ny, side, depth, r, value in a["nodules"]:
            nx = 0.5 + side * (a["lung_off"] + (depth - 0.55) * a["lung_a"])
            _stamp_disk(spots, size, ny, nx, r, value, edge)
        dens += spots * (lungs > 0.2)
    if "reticular" in a:
        fine = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=f32), size / 160)
        fine -= ndimage.gaussian_filter(fine, size / 64)
        mesh = _ramp(0.35 - np.abs(fine) / (fine.std() + 1e-6), 0.3)
        dens += a["reticular"] * mesh * lungs

    # Exposure: gain, gamma and offset differ per image, with a gentle heel-effect gradient.
    img = ndimage.gaussian_filter(np.clip(dens * f32(1 / 0.85), 0, None), sigma=max(size / 400, 0.4), truncate=2.5)
    img = a["offset"] + a["gain"] * np.power(img, f32(a["gamma"]))
    img *= 1 + a["tilt"] * ((y if a["tilt_axis"] else x) - 0.5)
    img += noise_rng.standard_normal((size, size), dtype=f32) * f32(a["noise"])
    img = np.clip(img, 0.0, 1.0).astype(f32)
    if not with_layers:
        return img
    layers = {
        "heart": heart > 0.5,
        "lungs": lungs > 0.5,
        "knob": knob > 0.5,
        "spine_x": spine_c[:, 0].copy(),
        "thorax_hw": thorax_hw,
    }
    return img, {"anatomy": a, "layers": layers}


def spoil(img: np.ndarray, quality: str, rng: np.random.Generator) -> np.ndarray:
    """Turn a good image into a deliberately bad one of the named kind ("ok" returns it unchanged)."""
    if quality == "ok":
        return img
    if quality == "dark":
        return (img * rng.uniform(0.03, 0.07)).astype(np.float32)
    if quality == "bright":
        return np.clip(0.75 + 1.5 * img, 0, 1).astype(np.float32)
    if quality == "lines":
        out = img.copy()
        size = img.shape[0]
        for _ in range(int(rng.integers(4, 11))):
            row = int(rng.integers(0, size - 3))
            out[row : row + int(rng.integers(1, 4)), :] = rng.uniform(0.92, 1.0)
        return out
    if quality == "blank":
        return np.full_like(img, rng.uniform(0.0, 1.0))
    raise CxrflowError(f"synthetic: unknown image quality {quality!r}; expected one of {QUALITIES}")


# --------------------------------------------------------------------------------------------------
# Writing.


def _write_png(path: Path, img: np.ndarray, bits: int) -> None:
    if bits == 8:
        Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(path, format="PNG", compress_level=1)
    else:
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(path, format="PNG", compress_level=1)


def _write_dicom(path: Path, img: np.ndarray, study: dict, seed: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = _DX_SOP_CLASS if study["modality"] == "DX" else _CR_SOP_CLASS
    monochrome1 = study["format"] == "dicom_monochrome1"

    def uid(kind: str) -> str:
        # A UUID-derived "2.25." UID from a hash, not pydicom's generate_uid(prefix=None), which is random.
        digest = hashlib.sha256(f"cxrflow-synthetic:{seed}:{kind}:{study['image_id']}".encode()).digest()
        return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"

    stored = np.round(img * 4095).astype(np.uint16)
    if monochrome1:  # MONOCHROME1: the archive stores bright anatomy as low values
        stored = (4095 - stored).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study["study_date"].strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study["study_time"]
    ds.AccessionNumber = study["accession"]
    ds.Modality = study["modality"]
    ds.InstitutionName = study["institution"]
    ds.ReferringPhysicianName = study["physician"]
    ds.PatientName = study["name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = study["birth_date"]
    ds.PatientSex = study["sex"]
    ds.PatientAge = f"{study['age']:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = study["key"][1] + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{430.0 / stored.shape[0]:.4f}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
