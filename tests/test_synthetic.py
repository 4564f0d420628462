"""The synthetic archive: deterministic, decodable, honest notes, and signs a classifier can see at 64 px."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cxrflow import synthetic
from cxrflow.errors import CxrflowError

N_PATIENTS, SIZE, SEED = 20, 128, 11
ANNOTATION_COLUMNS = ["image_id", "patient_id", "sex", "age", "view", "file", "study_date", "annotation"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("archive")
    summary = synthetic.generate(out, N_PATIENTS, SEED, image_size=SIZE, bad_fraction=0.15)
    annotations = pd.read_csv(out / "annotations.csv", dtype={"patient_id": str, "image_id": str})
    truth = pd.read_csv(out / "truth.csv", dtype={"image_id": str, **{k: "Int8" for k in synthetic.TRUTH_KEYS}})
    return out, summary, annotations, truth


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path) -> np.ndarray:
    """Any archive image as float in [0, 1], bright = dense (MONOCHROME2 sense)."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64) / 4095
        return 1 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels
    with Image.open(path) as im:
        pixels = np.asarray(im).astype(np.float64)
        return pixels / (255 if im.mode == "L" else 65535)


def _block_mean(img: np.ndarray, out: int = 64) -> np.ndarray:
    f = img.shape[0] // out
    return img.reshape(out, f, out, f).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_archive(archive, tmp_path):
    out, *_ = archive
    synthetic.generate(tmp_path, N_PATIENTS, SEED, image_size=SIZE, bad_fraction=0.15)
    first, second = _files(out), _files(tmp_path)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_other_seed_gives_other_archive(archive, tmp_path):
    out, _, annotations, _ = archive
    synthetic.generate(tmp_path, 3, SEED + 1, image_size=SIZE)
    other = pd.read_csv(tmp_path / "annotations.csv", dtype=str)
    assert not set(other["image_id"]) & set(annotations["image_id"])


def test_first_patients_do_not_depend_on_archive_size(archive, tmp_path):
    out, _, annotations, _ = archive
    synthetic.generate(tmp_path, 4, SEED, image_size=SIZE, bad_fraction=0.15)
    small = pd.read_csv(tmp_path / "annotations.csv", dtype={"patient_id": str, "image_id": str})
    pd.testing.assert_frame_equal(small, annotations.iloc[: len(small)])
    for rel in small["file"]:
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes()


def test_adding_a_finding_changes_only_its_sign():
    normal = synthetic.render(set(), np.random.default_rng(5), SIZE)
    compacted = synthetic.render({"aorta_compacted"}, np.random.default_rng(5), SIZE)
    changed = np.abs(compacted - normal) > 1e-6
    assert changed.any()
    assert not changed[int(SIZE * 0.5) :, :].any()  # the knob sits in the upper half; nothing else moved


# ---------------------------------------------------------------------------------------------- tables


def test_annotations_columns_and_values(archive):
    out, _, annotations, truth = archive
    assert list(annotations.columns) == ANNOTATION_COLUMNS
    assert annotations["image_id"].is_unique
    assert set(annotations["sex"]) <= {"Ж", "М"}
    assert annotations["age"].between(20, 90).all()
    assert set(annotations["view"]) == {"PA"}
    for date in annotations["study_date"]:
        dt.date.fromisoformat(date)
    assert annotations["file"].str.match(r"^images/[0-9a-f]{12}\.(dcm|png)$").all()
    assert all((out / rel).is_file() for rel in annotations["file"])
    assert annotations["annotation"].str.len().gt(0).all()
    per_patient = annotations.groupby("patient_id")
    assert per_patient.size().between(1, 4).all()
    assert (per_patient["sex"].nunique() == 1).all() and (per_patient["age"].nunique() == 1).all()
    assert annotations["patient_id"].nunique() == N_PATIENTS
    assert list(truth.columns) == ["image_id", *synthetic.TRUTH_KEYS, "quality"]
    assert list(truth["image_id"]) == list(annotations["image_id"])
    assert set(truth["quality"]) <= set(synthetic.QUALITIES)


def test_summary_counts_what_was_written(archive):
    out, summary, annotations, truth = archive
    assert summary["n_patients"] == N_PATIENTS
    assert summary["n_images"] == len(annotations) == len(list((out / "images").iterdir()))
    assert sum(summary["formats"].values()) == summary["n_images"]
    assert summary["n_bad"] == int((truth["quality"] != "ok").sum())
    for key in synthetic.TRUTH_KEYS:
        assert summary["positives"][key] == int((truth[key] == 1).sum())


def test_notes_say_what_the_truth_table_says():
    """Each positive key has an affirmed phrase, each uncertain key its hedge, and nothing contradicts."""
    studies = synthetic.plan_archive(300, SEED)
    truth = synthetic.truth_table(studies)
    for note, (_, row) in zip((s["note"] for s in studies), truth.iterrows()):
        for key in synthetic.TRUTH_KEYS:
            affirmed = any(phrase in note for phrase in synthetic.AFFIRMED[key])
            hedged = key in synthetic.UNCERTAIN and synthetic.UNCERTAIN[key] in note
            negated = any(phrase in note for phrase, k in synthetic.NEGATED if k == key)
            if pd.isna(row[key]):
                assert hedged and not affirmed and not negated, (key, note)
            elif row[key] == 1:
                assert affirmed and not hedged and not negated, (key, note)
            else:
                assert not affirmed and not hedged, (key, note)
        findings = [k for k in synthetic.TRUTH_KEYS if pd.isna(row[k]) or row[k] == 1]
        assert any(phrase in note for phrase in synthetic.NORMAL) == (not findings), note
    assert truth[list(synthetic.TARGETS)].notna().all().all()  # targets are never hedged


def test_notes_never_deny_a_heart_the_image_shows_enlarged():
    studies = synthetic.plan_archive(600, SEED)
    shadow = [s["note"] for s in studies if s["labels"]["enlarged_heart_shadow"] == 1]
    assert shadow
    assert not any("Сердце не расширено." in note or "Без признаков кардиомегалии." in note for note in shadow)


def test_label_frequencies_support_the_demo():
    """With 600 patients, every target has >= 40 confounder-free positive women and normals are plenty."""
    for seed in (0, 1, 42):  # 42 is the demo config's seed
        studies = synthetic.plan_archive(600, seed)
        truth = synthetic.truth_table(studies)
        women = np.array([s["sex"] == "F" for s in studies])
        clean = truth[list(synthetic.CONFOUNDERS)].fillna(1).sum(axis=1).eq(0).to_numpy()
        pool = truth[women & clean]
        for key in synthetic.TARGETS:
            assert (pool[key] == 1).sum() >= 40, (seed, key)
        assert pool[list(synthetic.TARGETS)].sum(axis=1).eq(0).sum() >= 150
        normal = truth[list(synthetic.TRUTH_KEYS)].fillna(1).sum(axis=1).eq(0).mean()
        assert 0.25 < normal < 0.40
        assert 0.10 < (~clean).mean() < 0.20
        patients = {s["patient_id"]: s for s in studies}
        assert 0.50 < np.mean([p["sex"] == "F" for p in patients.values()]) < 0.60
        ages = [p["age"] for p in patients.values()]
        assert min(ages) >= 20 and max(ages) <= 90 and max(ages) - min(ages) > 60


# ---------------------------------------------------------------------------------------------- files


def test_every_image_decodes_at_the_requested_size(archive):
    out, _, annotations, _ = archive
    for rel in annotations["file"]:
        assert _load(out / rel).shape == (SIZE, SIZE)


def test_formats_are_mixed(archive):
    _, summary, *_ = archive
    assert all(count > 0 for count in summary["formats"].values()), summary["formats"]


def test_dicom_tags_and_planted_identifiers(archive):
    out, _, annotations, _ = archive
    dicoms = annotations[annotations["file"].str.endswith(".dcm")]
    assert len(dicoms) > 0
    for row in dicoms.itertuples():
        ds = pydicom.dcmread(out / row.file)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() <= 4095
        assert ds.PatientID == row.patient_id
        assert ds.PatientSex == {"Ж": "F", "М": "M"}[row.sex]
        assert ds.PatientAge == f"{row.age:03d}Y"
        assert ds.StudyDate == row.study_date.replace("-", "")
        assert ds.ViewPosition == "PA" and ds.BodyPartExamined == "CHEST" and ds.Modality in {"DX", "CR"}
        for keyword in (
            "PatientName",
            "PatientBirthDate",
            "InstitutionName",
            "ReferringPhysicianName",
            "AccessionNumber",
        ):
            assert str(ds.data_element(keyword).value).strip(), keyword
        assert str(ds.StudyInstanceUID).startswith("2.25.")


def test_monochrome1_is_stored_inverted(archive):
    """In MONOCHROME2 the belly (dense) stores higher than the lung (air); MONOCHROME1 stores it lower."""
    out, _, annotations, truth = archive
    seen = set()
    for row, quality in zip(annotations.itertuples(), truth["quality"]):
        if not row.file.endswith(".dcm") or quality != "ok":
            continue
        ds = pydicom.dcmread(out / row.file)
        stored = ds.pixel_array.astype(float)
        belly = stored[int(SIZE * 0.9) :, int(SIZE * 0.3) : int(SIZE * 0.45)].mean()
        lung = stored[int(SIZE * 0.35) : int(SIZE * 0.5), int(SIZE * 0.2) : int(SIZE * 0.3)].mean()
        inverted = ds.PhotometricInterpretation == "MONOCHROME1"
        assert (belly < lung) == inverted, row.file
        seen.add(ds.PhotometricInterpretation)
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_png_bit_depths(archive):
    out, summary, annotations, _ = archive
    modes = set()
    for rel in annotations["file"][annotations["file"].str.endswith(".png")]:
        with Image.open(out / rel) as im:
            modes.add(im.mode)
            if im.mode != "L":
                assert np.asarray(im).max() > 255 or np.ptp(np.asarray(im)) == 0
    assert "L" in modes and modes - {"L"} <= {"I;16", "I"}


# ---------------------------------------------------------------------------------------------- signs


def _pair(finding: str, seed: int, size: int = 256):
    """The same patient drawn without and with one finding."""
    normal = synthetic.render(set(), np.random.default_rng(seed), size, with_layers=True)
    sick = synthetic.render({finding}, np.random.default_rng(seed), size, with_layers=True)
    return normal, sick


def _ctr(layers, size):
    cols = np.flatnonzero(layers["heart"].any(axis=0))
    return (cols.max() - cols.min() + 1) / (2 * layers["thorax_hw"] * size)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_enlarged_heart_raises_the_cardiothoracic_ratio(seed):
    (_, normal), (_, sick) = _pair("enlarged_heart", seed)
    assert _ctr(normal["layers"], 256) < 0.5
    assert _ctr(sick["layers"], 256) >= 0.58


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_enlarged_heart_shadow_widens_both_sides_and_height(seed):
    (_, normal), (_, sick) = _pair("enlarged_heart_shadow", seed)

    def extent(layers):
        rows, cols = np.nonzero(layers["heart"])
        mid = 128
        return mid - cols.min(), cols.max() - mid, rows.max() - rows.min()

    right, left, height = extent(normal["layers"])
    right2, left2, height2 = extent(sick["layers"])
    assert right2 >= 1.4 * right and left2 >= 1.15 * left and height2 >= 1.15 * height
    assert _ctr(sick["layers"], 256) >= 0.58


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_unfolded_aorta_bulges_out_and_up(seed):
    (_, normal), (_, sick) = _pair("aorta_unfolded", seed)
    rows, cols = np.nonzero(normal["layers"]["knob"])
    rows2, cols2 = np.nonzero(sick["layers"]["knob"])
    assert cols2.max() - cols.max() >= 0.04 * 256
    assert rows.min() - rows2.min() >= 0.03 * 256


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scoliosis_bends_the_spine(seed):
    (_, normal), (_, sick) = _pair("scoliosis", seed)
    chest = slice(int(0.1 * 256), int(0.85 * 256))

    def bend(layers):
        x = layers["spine_x"][chest]
        return x.max() - x.min()

    assert bend(normal["layers"]) < 0.02
    assert bend(sick["layers"]) >= 0.08


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dome_relaxation_raises_the_right_dome(seed):
    (_, normal), (_, sick) = _pair("dome_relaxation", seed)
    col = int(0.3 * 256)  # the patient's right lung, on the image's left
    floor = np.flatnonzero(normal["layers"]["lungs"][:, col]).max()
    floor2 = np.flatnonzero(sick["layers"]["lungs"][:, col]).max()
    assert floor - floor2 >= 0.1 * 256


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compacted_aorta_brightens_the_knob(seed):
    (normal, layers), (sick, _) = _pair("aorta_compacted", seed)
    knob = layers["layers"]["knob"]
    assert sick[knob].mean() - normal[knob].mean() >= 0.15


# Where each sign lies: (rows, columns) as fractions of the side, image coordinates (patient's left on the
# right). The paired difference must be strong at 64 px and must lie inside its box.
SIGN_BOXES = {
    "enlarged_heart": ((0.4, 0.9), (0.3, 0.95)),
    "enlarged_heart_shadow": ((0.35, 0.9), (0.2, 0.95)),
    "aorta_unfolded": ((0.15, 0.4), (0.45, 0.8)),
    "aorta_compacted": ((0.15, 0.4), (0.45, 0.75)),
    "aortic_atherosclerosis": ((0.15, 0.4), (0.45, 0.75)),
    "dome_relaxation": ((0.45, 1.0), (0.0, 0.55)),
    "aortic_arch_sclerosis": ((0.15, 0.4), (0.35, 0.75)),
    "scoliosis": ((0.0, 1.0), (0.0, 1.0)),
    "vascular_roots": ((0.25, 0.75), (0.1, 0.9)),
}


@pytest.mark.parametrize("finding", synthetic.TARGETS)
@pytest.mark.parametrize("seed", [4, 5])
def test_each_target_sign_is_strong_at_64_px_and_in_place(finding, seed):
    normal = synthetic.render(set(), np.random.default_rng(seed), 256)
    sick = synthetic.render({finding}, np.random.default_rng(seed), 256)
    diff = np.abs(_block_mean(sick) - _block_mean(normal))
    assert diff.max() >= 0.2, finding
    (r0, r1), (c0, c1) = SIGN_BOXES[finding]
    rows, cols = np.nonzero(diff > 0.05)
    assert rows.min() >= r0 * 64 - 1 and rows.max() <= r1 * 64 + 1, finding
    assert cols.min() >= c0 * 64 - 1 and cols.max() <= c1 * 64 + 1, finding


def test_vascular_roots_show_on_both_sides():
    normal = synthetic.render(set(), np.random.default_rng(6), 256)
    sick = synthetic.render({"vascular_roots"}, np.random.default_rng(6), 256)
    diff = np.abs(_block_mean(sick) - _block_mean(normal))
    assert diff[:, :30].max() >= 0.2 and diff[:, 34:].max() >= 0.2


def test_render_rejects_unknown_findings():
    with pytest.raises(CxrflowError, match="cardiomegaly"):
        synthetic.render({"cardiomegaly"}, np.random.default_rng(0), 64)


# ---------------------------------------------------------------------------------------------- quality


def _is_bad_as_labelled(img: np.ndarray, quality: str) -> bool:
    if quality == "dark":
        return img.mean() < 0.06
    if quality == "bright":
        return (img >= 0.99).mean() > 0.5
    if quality == "lines":
        return (img.mean(axis=1) >= 0.9).sum() >= 4
    if quality == "blank":
        return img.max() == img.min()
    return 0.1 < img.mean() < 0.9 and img.std() > 0.05


@pytest.mark.parametrize("quality", synthetic.QUALITIES)
def test_spoiled_images_are_bad(quality):
    rng = np.random.default_rng(8)
    img = synthetic.spoil(synthetic.render(set(), rng, SIZE), quality, rng)
    assert _is_bad_as_labelled(img, quality)


def test_archive_images_match_their_quality(archive):
    out, _, annotations, truth = archive
    assert (truth["quality"] != "ok").sum() > 0
    for rel, quality in zip(annotations["file"], truth["quality"]):
        assert _is_bad_as_labelled(_load(out / rel), quality), (rel, quality)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, word",
    [({"n_patients": 0}, "n_patients"), ({"image_size": 16}, "image_size"), ({"bad_fraction": 1.5}, "bad_fraction")],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, word):
    args = {"out_dir": tmp_path, "n_patients": 2, "seed": 0, **kwargs}
    with pytest.raises(CxrflowError, match=word):
        synthetic.generate(**args)
