"""Label maps (config/labels/<dataset>.yaml) account for every native label of their dataset, and the `normal`,
`other_finding` and `quality_tag` columns they give, on the real tables in ../shared/data (skipped with a reason
when absent) and, for CheXpert and MIMIC-CXR, on their published classes."""

import collections

import pandas as pd
import pytest

from cxrflow.errors import CxrflowError
from cxrflow.ingest import build_catalog
from cxrflow.ingest.native import load_label_map
from cxrflow.ingest.public import parse_nih_labels, parse_padchest_labels
from cxrflow.labels import load_keys

# The 14 observations CheXpert publishes (train.csv / valid.csv); MIMIC-CXR-JPG's label table has the same.
CHEXPERT_CLASSES = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                    "Fracture", "Support Devices"]
# VinDr-CXR's PhysioNet release: 22 local labels (boxes), 5 global labels and "No finding".
VINDR_CLASSES = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                 "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                 "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Other lesion", "Pleural effusion",
                 "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "COPD", "Lung tumor",
                 "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
NIH_TABLE = "nih/Data_Entry_2017_v2020.csv.gz"
PADCHEST_TABLE = "padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
VINBIG_TABLE = "vindr/vinbigdata-train.csv.gz"


def label_map(root, dataset):
    keys = load_keys(root / "config/labels/keys.yaml")
    return load_label_map({"format": dataset, "label_map": f"config/labels/{dataset}.yaml"}, root, keys)


def report(name, label_map_):
    """The lists the issue's note asks for: what goes to other_finding, to ignore, to quality_tags."""
    other = sorted(n for n, k in label_map_.labels.items() if k == "other_finding")
    print(f"\n{name}: {len(label_map_.labels)} mapped ({len(other)} to other_finding: {other}); "
          f"ignore: {sorted(label_map_.ignore)}; quality_tags: {sorted(label_map_.quality_tags)}")


@pytest.mark.parametrize("dataset", ["chexpert", "mimic"])
def test_chexpert_and_mimic_maps_account_for_the_published_classes(root, dataset):
    lm = label_map(root, dataset)
    report(dataset, lm)
    assert lm.unaccounted(CHEXPERT_CLASSES) == []
    assert sorted(set(lm.labels) | set(lm.ignore)) == sorted(CHEXPERT_CLASSES)  # and names nothing else
    assert lm.labels["No Finding"] == "normal"


def test_vindr_map_accounts_for_the_physionet_classes(root):
    lm = label_map(root, "vindr")
    report("vindr", lm)
    assert lm.unaccounted(VINDR_CLASSES) == []
    assert lm.labels["No finding"] == "normal"


def test_a_label_map_must_account_for_each_label_with_a_reason(tmp_path, root):
    keys = load_keys(root / "config/labels/keys.yaml")
    cases = {
        "labels: {Cardiomegaly: }\n": "'Cardiomegaly' maps to nothing",
        "labels: {Cardiomegaly: enlarged_heart}\nignore: {unchanged: }\n": "'unchanged' needs a reason",
        "labels: {Cardiomegaly: enlarged_heart}\nignore: [unchanged]\n": "must map each native label to the reason",
        "labels: {exclude: other_finding}\nquality_tags: {exclude: leave out}\n": "more than one of",
        "labels: {Cardiomegaly: enlarged_heart}\nignored: {x: y}\n": r"unknown section\(s\) \['ignored'\]",
        "labels: {Cardiomegaly: big_heart}\n": r"unknown canonical key\(s\) \['big_heart'\]",
    }
    for text, message in cases.items():
        (tmp_path / "map.yaml").write_text(text)
        with pytest.raises(CxrflowError, match=message):
            load_label_map({"format": "nih", "label_map": str(tmp_path / "map.yaml")}, tmp_path, keys)


PADCHEST_ROWS = """ImageID,PatientID,PatientSex_DICOM,Projection,Labels
n1,p1,F,PA,['normal']
n2,p2,F,PA,"['normal', 'unchanged']"
n3,p3,F,PA,"['normal', 'suboptimal study']"
n4,p4,F,PA,"['normal', 'cardiomegaly']"
n5,p5,F,PA,"['exclude']"
n6,p6,F,PA,"['mastectomy']"
n7,p7,F,PA,[]
n8,p8,F,PA,"['unchanged']"
n9,p9,F,PA,"['normal', 'a label no map names']"
"""


def test_padchest_normal_other_finding_quality_tags_and_ignored_labels(tmp_path, root, keys_file):
    (tmp_path / "padchest.csv").write_text(PADCHEST_ROWS)
    source = {"format": "padchest", "annotations": str(tmp_path / "padchest.csv"), "check_files": False,
              "label_map": str(root / "config/labels/padchest.yaml")}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    # normal: the 'normal' label with nothing beside it but ignored labels and quality tags.
    assert cat["normal"].fillna(-1).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert cat["quality_tag"].fillna(-1).tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 0]
    assert cat["other_finding"].fillna(-1).tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert cat.loc["n4", "enlarged_heart"] == 1
    assert result.summary["normal_contradicted_by_a_finding"] == 2  # n4 (cardiomegaly) and n9 (an unknown label)
    assert result.summary["labels_not_in_label_map"] == {"a label no map names": 1}
    assert result.summary["quality_tagged"] == 2


# --- the real tables ---------------------------------------------------------------------------------------------

def real_catalog(shared_data, root, fmt, table, map_name, columns):
    """The catalog of a real table (each module builds it once), and the table's own columns to check it by."""
    source = {"format": fmt, "annotations": str(shared_data / table), "check_files": False,
              "label_map": str(root / f"config/labels/{map_name}.yaml")}
    result = build_catalog(source, root / "config/labels/keys.yaml", base="/")
    return result, pd.read_csv(shared_data / table, usecols=columns)


@pytest.fixture(scope="module")
def nih(shared_data, root):
    return real_catalog(shared_data, root, "nih", NIH_TABLE, "nih", ["Image Index", "Finding Labels"])


def test_nih_map_accounts_for_every_label_of_the_real_table(nih, root):
    result, table = nih
    natives = {label for value in table["Finding Labels"].unique() for label in parse_nih_labels(value)}
    lm = label_map(root, "nih")
    report("nih", lm)
    assert len(natives) == 15 and lm.unaccounted(natives) == []
    assert "labels_not_in_label_map" not in result.summary


def test_nih_normal_is_no_finding(nih):
    result, table = nih
    cat = result.catalog
    assert cat["image_id"].tolist() == table["Image Index"].tolist()
    no_finding = (table["Finding Labels"] == "No Finding").to_numpy()
    assert cat["normal"].fillna(-1).to_numpy().tolist() == no_finding.astype(int).tolist()
    assert int(no_finding.sum()) == 60_361 and result.summary["normal_contradicted_by_a_finding"] == 0
    # NIH has no label without a key of its own: other_finding is missing (not labelled), not 0.
    assert cat["other_finding"].isna().all() and cat["quality_tag"].fillna(-1).eq(0).all()
    print(f"\nNIH: {int(no_finding.sum())} of {len(cat)} images are normal (No Finding)")


@pytest.fixture(scope="module")
def padchest(shared_data, root):
    return real_catalog(shared_data, root, "padchest", PADCHEST_TABLE, "padchest", ["ImageID", "Labels"])


def test_padchest_map_accounts_for_every_label_of_the_real_table(padchest, root):
    result, table = padchest
    parsed = [parse_padchest_labels(v) for v in table["Labels"].dropna().unique()]
    natives = {label for labels in parsed if labels is not None for label in labels}
    lm = label_map(root, "padchest")
    report("padchest", lm)
    assert len(natives) == 193 and lm.unaccounted(natives) == []
    assert "labels_not_in_label_map" not in result.summary


def test_padchest_normal_is_the_normal_label_alone_and_quality_tags_are_flagged(padchest, root):
    result, table = padchest
    lm = label_map(root, "padchest")
    cat = result.catalog.set_index("image_id")
    labels = table.set_index("ImageID")["Labels"].map(parse_padchest_labels).reindex(cat.index)
    assert labels.notna().all()  # the unparseable rows are in the ledger, not the catalog
    findings = labels.map(lambda ls: sorted(set(ls) - set(lm.ignore) - set(lm.quality_tags)))
    expected_normal = findings.map(lambda f: f == ["normal"]).astype(int)
    assert cat["normal"].fillna(-1).astype(int).tolist() == expected_normal.tolist()
    expected_tag = labels.map(lambda ls: bool(set(ls) & set(lm.quality_tags))).astype(int)
    assert cat["quality_tag"].fillna(-1).astype(int).tolist() == expected_tag.tolist()
    exactly = labels.map(lambda ls: ls == ["normal"])
    # 50,390 rows of the table say exactly ['normal']; 17 of them belong to patients ingest drops (sex_conflict).
    assert (cat["normal"][exactly] == 1).all() and int(exactly.sum()) == 50_373
    beside = collections.Counter(tuple(sorted(set(ls) - {"normal"})) for ls in labels[(cat["normal"] == 1) & ~exactly])
    print(f"\nPadChest: normal = 1 on {int(cat['normal'].eq(1).sum())} images: {int(exactly.sum())} labelled exactly "
          f"['normal'], the others 'normal' beside {dict(beside)}; 'normal' contradicted by a finding (normal = 0): "
          f"{result.summary['normal_contradicted_by_a_finding']}; quality_tag = 1: {result.summary['quality_tagged']}")
    assert beside and all(set(extra) <= set(lm.ignore) | set(lm.quality_tags) for extra in beside)


@pytest.fixture(scope="module")
def vinbig(shared_data, root):
    return real_catalog(shared_data, root, "vindr", VINBIG_TABLE, "vindr", ["image_id", "class_name", "rad_id"])


def test_vindr_map_accounts_for_every_class_of_the_real_table(vinbig, root):
    result, table = vinbig
    assert label_map(root, "vindr").unaccounted(table["class_name"].unique()) == []
    assert "labels_not_in_label_map" not in result.summary


def test_vinbigdata_catalog_normal_is_the_readers_no_finding(vinbig, root):
    result, table = vinbig
    cat = result.catalog.set_index("image_id")
    readers = table.groupby("image_id")["rad_id"].nunique()
    said_nothing = table[table["class_name"] == "No finding"].groupby("image_id")["rad_id"].nunique()
    majority = (2 * said_nothing.reindex(readers.index, fill_value=0) > readers).astype(int)
    assert len(cat) == 15_000 and cat["normal"].fillna(-1).astype(int).reindex(majority.index).tolist() == \
        majority.tolist()
    assert int(cat["normal"].eq(1).sum()) == 10_606
    # The Kaggle table has no sex, age or view, and no class for these keys: missing, never 0.
    assert cat[["sex", "age", "view"]].isna().all().all()
    for key in ["emphysema", "rib_deformity", "edema", "fracture", "pneumonia", "tuberculosis", "scoliosis"]:
        assert cat[key].isna().all(), key
    for key in ["enlarged_heart", "calcinosis", "other_finding", "normal"]:
        assert cat[key].notna().all(), key
    print(f"\nVinBigData: {len(cat)} images, {int(cat['normal'].eq(1).sum())} normal, "
          f"{int(cat['enlarged_heart'].eq(1).sum())} enlarged_heart, "
          f"{int(cat['other_finding'].eq(1).sum())} other_finding")


def test_a_vinbigdata_cohort_forms_from_the_kaggle_table_alone(vinbig, root):
    from cxrflow.cohorts import build_cohort

    result, _ = vinbig
    keys = load_keys(root / "config/labels/keys.yaml")
    cfg = {"filters": {"views": None, "sex": None, "age": None, "require_qc_pass": False},
           "exclusions": ["fibrosis", "calcinosis", "increased_lung_markings", "emphysema", "pneumonia"],
           "balance": "none", "pathologies": {"enlarged_heart": {"positive": ["enlarged_heart"]}}}
    cohort, flow = build_cohort(result.catalog, None, cfg, "enlarged_heart", keys, seed=1)
    print("\n" + flow.to_string())
    assert cohort["label"].eq(1).sum() > 1000 and cohort["label"].eq(0).sum() > 5000
    negatives = result.catalog.set_index("image_id").loc[cohort.loc[cohort["label"] == 0, "image_id"]]
    assert negatives["normal"].fillna(-1).eq(1).all()


def test_nih_label_the_map_does_not_name_counts_as_other_finding(tmp_path, root, keys_file):
    (tmp_path / "Data_Entry.csv").write_text(
        "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position\n"
        "a.png,No Finding,1,50,F,PA\nb.png,Cardiomegaly|Calcified Aorta,2,60,F,PA\nc.png,Cardiomegaly,3,70,M,AP\n")
    source = {"format": "nih", "annotations": str(tmp_path / "Data_Entry.csv"), "check_files": False,
              "label_map": str(root / "config/labels/nih.yaml")}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog
    assert result.summary["labels_not_in_label_map"] == {"Calcified Aorta": 1}
    assert cat["other_finding"].fillna(-1).tolist() == [0, 1, 0]  # labelled now: the table says more than the map
    assert cat["normal"].fillna(-1).tolist() == [1, 0, 0] and cat["enlarged_heart"].fillna(-1).tolist() == [0, 1, 1]
