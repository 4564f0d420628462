"""An archive with patient identifiers planted where the pipeline reads them, and a scanner for shareable outputs.

The archive is the synthetic one (always) plus, when ../shared/data is present, real NIH ChestX-ray14 pixels, laid
out as a hospital export often is: folders and files named after the patient, ids made of names and birth dates,
names and birth dates inside the doctors' notes, exact study dates, and identifying DICOM attributes.
"""

from __future__ import annotations

import base64
import re
import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

SURNAMES = [  # (Cyrillic, Latin), female forms; distinctive enough not to occur by chance in a report's code
    ("Иванова", "Ivanova"), ("Кузнецова", "Kuznetsova"), ("Смирнова", "Smirnova"), ("Воробьёва", "Vorobyova"),
    ("Белоусова", "Belousova"), ("Журавлёва", "Zhuravlyova"), ("Тимофеева", "Timofeeva"), ("Полякова", "Polyakova"),
    ("Гончарова", "Goncharova"), ("Третьякова", "Tretyakova"), ("Ермолаева", "Ermolaeva"), ("Шестакова", "Shestakova"),
]
FIRST_NAMES = [("Мария", "Mariya"), ("Ольга", "Olga"), ("Светлана", "Svetlana"), ("Евдокия", "Evdokiya")]
PATRONYMICS = ["Петровна", "Игоревна", "Степановна", "Аркадьевна"]
INSTITUTION = "Smolensk Regional Clinical Hospital Nr 3"
PHYSICIAN = ("Petrenko", "Oleg")

# Each kind of identifier, planted where the pipeline reads it. The scanner reports hits per kind.
KINDS = [
    "name in note (Cyrillic)", "name in note (Latin)", "birth date in note", "folder named after patient",
    "file named after patient", "patient id with name", "image id with name", "exact study date (table)",
    "DICOM PatientName", "DICOM PatientID", "DICOM PatientBirthDate", "DICOM InstitutionName",
    "DICOM AccessionNumber", "DICOM ReferringPhysicianName", "DICOM StudyDate",
]


def _date_forms(day: date) -> list[str]:
    return [day.strftime("%Y-%m-%d"), day.strftime("%Y%m%d"), day.strftime("%d.%m.%Y")]


def plant_archive(synthetic: Path, archive: Path, nih1000: Path | None) -> dict[str, set[str]]:
    """Write ``archive/notes.csv`` and its images from a synthetic archive (and NIH1000 pixels, when given);
    return every planted string by kind, in every form it was planted."""
    import pydicom

    planted: dict[str, set[str]] = {kind: set() for kind in KINDS}
    table = pd.read_csv(synthetic / "annotations.csv", dtype=str)
    if nih1000 is not None:
        table = pd.concat([table, _nih_rows(nih1000)], ignore_index=True)
    rng = np.random.default_rng(7)
    rows = []
    for n, (patient, group) in enumerate(table.groupby("patient_id", sort=True)):
        cyr, lat = SURNAMES[n % len(SURNAMES)]
        first_cyr, first_lat = FIRST_NAMES[n % len(FIRST_NAMES)]
        if group["sex"].iloc[0] in ("М", "M"):  # male forms: drop the feminine ending
            cyr, lat = cyr[:-1], lat[:-1]
        birth = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 20000)))
        patient_id = f"{lat.upper()}_{first_lat.upper()}_{birth:%Y%m%d}_{n:03d}"
        folder = f"{lat}_{first_lat}_{birth:%Y%m%d}"
        planted["patient id with name"].add(patient_id)
        planted["folder named after patient"].add(folder)
        planted["name in note (Cyrillic)"] |= {cyr, f"{cyr} {first_cyr}"}
        planted["name in note (Latin)"] |= {lat, f"{lat}, {first_lat}"}
        planted["birth date in note"] |= set(_date_forms(birth))
        for i, row in enumerate(group.itertuples(index=False)):
            source = Path(row.file) if Path(row.file).is_absolute() else synthetic / row.file
            image_id = f"{lat}_{first_lat}_{n:03d}_{i + 1}"
            file = f"{folder}/{lat}_{first_lat}_{birth:%d%m%Y}_{i + 1}{source.suffix}"
            (archive / folder).mkdir(parents=True, exist_ok=True)
            study = date.fromisoformat(row.study_date)
            if source.suffix == ".dcm":
                ds = pydicom.dcmread(source)
                ds.PatientName = f"{lat}^{first_lat}"
                ds.PatientID = patient_id
                ds.PatientBirthDate = f"{birth:%Y%m%d}"
                ds.InstitutionName = INSTITUTION
                ds.AccessionNumber = f"ACC{lat.upper()[:5]}{i:03d}"
                ds.ReferringPhysicianName = f"{PHYSICIAN[0]}^{PHYSICIAN[1]}"
                ds.StudyDate = f"{study:%Y%m%d}"
                ds.save_as(archive / file)
                planted["DICOM PatientName"].add(f"{lat}^{first_lat}")
                planted["DICOM PatientID"].add(patient_id)
                planted["DICOM PatientBirthDate"].add(f"{birth:%Y%m%d}")
                planted["DICOM InstitutionName"].add(INSTITUTION)
                planted["DICOM AccessionNumber"].add(ds.AccessionNumber)
                planted["DICOM ReferringPhysicianName"] |= {PHYSICIAN[0], f"{PHYSICIAN[0]}^{PHYSICIAN[1]}"}
                planted["DICOM StudyDate"].add(f"{study:%Y%m%d}")
            else:
                shutil.copyfile(source, archive / file)
            planted["image id with name"].add(image_id)
            planted["file named after patient"].add(Path(file).stem)
            planted["exact study date (table)"] |= set(_date_forms(study))
            note = (f"Пациентка {cyr} {first_cyr} {PATRONYMICS[n % 4]}, {birth:%d.%m.%Y} г.р. {row.annotation} "
                    f"Направила: {lat}, {first_lat}.")
            rows.append({**row._asdict(), "image_id": image_id, "patient_id": patient_id, "file": file,
                         "annotation": note})
    # A file that cannot be decoded and a row whose file is missing, both in folders named after patients.
    broken = f"{SURNAMES[0][1]}_{FIRST_NAMES[0][1]}_broken"
    (archive / broken).mkdir(exist_ok=True)
    (archive / broken / f"{SURNAMES[0][1]}_broken_scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    planted["folder named after patient"].add(broken)
    planted["file named after patient"].add(f"{SURNAMES[0][1]}_broken_scan")
    template = rows[0]
    rows.append({**template, "image_id": f"{SURNAMES[0][1]}_broken_scan",
                 "file": f"{broken}/{SURNAMES[0][1]}_broken_scan.png"})
    rows.append({**template, "image_id": f"{SURNAMES[1][1]}_lost_film",
                 "file": f"{SURNAMES[1][1]}_{FIRST_NAMES[1][1]}_missing/{SURNAMES[1][1]}_lost_film.png"})
    planted["image id with name"] |= {f"{SURNAMES[0][1]}_broken_scan", f"{SURNAMES[1][1]}_lost_film"}
    pd.DataFrame(rows).to_csv(archive / "notes.csv", index=False)
    return planted


def _nih_rows(nih1000: Path) -> pd.DataFrame:
    """Real NIH pixels with Russian notes made from NIH's labels (women and men, so that sex filters apply)."""
    labels = pd.read_csv(nih1000 / "labels.csv")
    labels = labels.loc[labels["view"].isin(["PA", "AP"])].sort_values("image_path").head(120)
    start = date(2018, 1, 1)
    return pd.DataFrame({
        "image_id": labels["image_path"].map(lambda p: Path(p).stem),
        "patient_id": "nih" + labels["patient_id"].astype(str),
        "sex": labels["sex"].map({"F": "Ж", "M": "М"}),
        "age": labels["age"].astype(str),
        "view": labels["view"],
        "file": labels["image_path"].map(lambda p: str(nih1000 / Path(p).relative_to("nih1000"))),
        "study_date": [(start + timedelta(days=int(f) * 30)).isoformat() for f in labels["follow_up"]],
        "annotation": np.where(labels["cardiomegaly"] == 1, "Сердце расширено влево.",
                               np.where(labels["no_finding"] == 1, "Без патологических изменений.",
                                        "Очаговая тень в правом лёгком.")),
    })


# Words of planted strings too common to mean a patient (an institution's "Regional Clinical Hospital").
_COMMON = {"regional", "clinical", "hospital"}


def _targets(planted: dict[str, set[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """(whole tokens, words) to look for, each with its kind. A planted string without spaces (an id, a file
    name, a date) must appear as a whole token; a name is looked for word by word ("Ivanova, Mariya" leaks if
    "Ivanova" appears anywhere, e.g. inside "Ivanova_scan.png"). Matching tokens instead of a regex alternation of
    every string keeps the scan linear in the size of the outputs, model weights and report included."""
    whole, words = {}, {}
    for kind, values in planted.items():
        for value in values:
            if not re.search(r"[\s,^]", value):
                whole.setdefault(value.lower(), kind)
            if value[:1].isdigit():
                continue  # dates and numbers: whole tokens only ("20190627" inside a float's digits is no date)
            for word in re.split(r"[\W_\d]+", value.lower()):
                if len(word) >= 5 and word not in _COMMON:
                    words.setdefault(word, kind)
    return whole, words


def _texts(path: Path) -> list[str]:
    """Every text a file carries: parquet cells and schema metadata, PNG text chunks, base64 blobs of HTML."""
    raw = path.read_bytes()
    texts = [raw.decode("utf-8", "replace")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        texts.append(pd.read_parquet(path).to_csv())
        metadata = pq.read_schema(path).metadata or {}
        texts += [v.decode("utf-8", "replace") for v in metadata.values()]
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            texts += [f"{k}={v}" for k, v in getattr(image, "text", {}).items()]
    elif path.suffix in {".html", ".js", ".json"}:
        for blob in re.findall(r"[A-Za-z0-9+/]{64,}={0,2}", texts[0]):
            try:
                texts.append(base64.b64decode(blob + "=" * (-len(blob) % 4)).decode("utf-8", "replace"))
            except ValueError:
                continue
    return texts


def scan(paths, planted: dict[str, set[str]]) -> dict[str, list[str]]:
    """Hits per kind: 'file: matched text' for every planted string found in any of the files."""
    whole, words = _targets(planted)
    hits: dict[str, list[str]] = {kind: [] for kind in planted}
    for path in paths:
        for text in _texts(path):
            text = text.lower()
            tokens = {t.strip(".-") for t in re.findall(r"[\w.\-]+", text)}
            for token in tokens & whole.keys():
                hits[whole[token]].append(f"{path}: {token}")
            for word in set(re.findall(r"[^\W_\d]+", text)) & words.keys():
                hits[words[word]].append(f"{path}: {word}")
    return hits
